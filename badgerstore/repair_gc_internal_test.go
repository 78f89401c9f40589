package badgerstore

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A value-log GC that finished (moves synced, source files deleted),
// then a crash before the next batch, and one moved value that went bad
// on the disk since. The moves are not the memtable log's last request
// (GC's synced marker follows them), so Open cuts nothing: without the
// marker the repair cut from the bad move on, and the records moved after
// it, their old copies deleted, were lost (found by review).
func TestOpenKeepsTheMovesOfAFinishedGC(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data")
	opts := Options{Dir: dir, ValueLogFileSize: 2 << 20, GCInterval: -1, compactL0OnClose: true}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	state := func(id string) json.RawMessage {
		b, _ := json.Marshal(strings.Repeat(id, (100<<10)/len(id)))
		return b
	}
	put := func(id string, steps int) {
		t.Helper()
		run := engine.RunRecord{RunID: id, ThreadID: "t-" + id, AgentID: "a", Status: engine.RunRunning, State: state(fmt.Sprintf("%s-%d", id, steps)), CreatedAt: 1, UpdatedAt: int64(1 + steps), Steps: int64(steps)}
		if steps == 0 {
			if err := s.CreateRun(ctx, run); err != nil {
				t.Fatal(err)
			}
			return
		}
		if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: run.ThreadID, Run: &run}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 30 { // live records among garbage, over several files
		put(fmt.Sprintf("r%02d", i), 0)
		put("g", i)
		put("g", i+100)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(opts); err != nil {
		t.Fatal(err)
	}
	rewritten := 0
	for range 30 { // each call stops starting files after gcBudget (100 ms): go on until none is left
		n := s.RunValueLogGC()
		if n == 0 {
			break
		}
		rewritten += n
	}
	if rewritten < 2 {
		t.Fatalf("GC rewrote %d files: the test needs moves into more than one", rewritten)
	}
	killed := filepath.Join(t.TempDir(), "killed")
	if err := os.MkdirAll(killed, 0o750); err != nil {
		t.Fatal(err)
	}
	es, _ := os.ReadDir(dir)
	newestVlog := -1
	for _, e := range es {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(killed, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
		if fid, ok := logFid(e.Name(), vlogExt); ok {
			newestVlog = max(newestVlog, fid)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Flip a byte in the value of the last move into a file that is not
	// the newest.
	var bad *logPointer
	for _, e := range es {
		if _, ok := logFid(e.Name(), memExt); !ok {
			continue
		}
		f, err := os.Open(filepath.Join(killed, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := f.Stat()
		_, _ = f.Seek(logFileHeader, io.SeekStart)
		r := bufio.NewReader(f)
		off := int64(logFileHeader)
		var buf []byte
		for {
			en, n, err := readLogEntry(r, off, fi.Size()-off, &buf)
			if err != nil || len(en.key) == 0 {
				break
			}
			if en.meta&(bitTxn|bitFinTxn) == 0 && en.meta&bitValuePointer != 0 && int(binary.NativeEndian.Uint32(en.value)) < newestVlog {
				bad = &logPointer{offset: off, key: append([]byte(nil), en.key...), ptr: append([]byte(nil), en.value...)}
			}
			off += n
		}
		f.Close()
	}
	if bad == nil {
		t.Fatal("no GC move into a file older than the newest")
	}
	fid, length, offset := binary.NativeEndian.Uint32(bad.ptr), binary.NativeEndian.Uint32(bad.ptr[4:]), binary.NativeEndian.Uint32(bad.ptr[8:])
	path := filepath.Join(killed, fmt.Sprintf("%06d%s", fid, vlogExt))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[offset+length-100] ^= 0x01 // inside the value
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	badRun := strings.TrimPrefix(string(bad.key[:len(bad.key)-8]), "R")

	s2, err := Open(Options{Dir: killed, ValueLogFileSize: 2 << 20, GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for i := range 30 {
		id := fmt.Sprintf("r%02d", i)
		got, err := s2.LoadRun(ctx, id)
		if id == badRun {
			continue // its value went bad: whatever it reads as
		}
		if err != nil || got == nil || string(got.State) != string(state(id+"-0")) {
			t.Fatalf("run %s (the bad value is %s's): %v, found %v", id, badRun, err, got != nil)
		}
	}
}
