package badgerstore_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Power loss is simulated on the files: a copy of the data directory as
// the store left it, its memtable logs as they are (their pages written
// back), its value-log files as they were at an earlier moment (the
// values written since never reached the disk). That is the state a power
// loss leaves when the kernel wrote a memtable log's page back before the
// store's sync of the value log, which Badger, with SyncWrites off, does
// not order (docs/store.md).

// copyFile copies src to dst.
func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// copyDir copies the regular files of src whose names pass keep into dst.
func copyDir(t *testing.T, src, dst string, keep func(name string) bool) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o750); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Type().IsRegular() && keep(e.Name()) {
			copyFile(t, filepath.Join(src, e.Name()), filepath.Join(dst, e.Name()))
		}
	}
}

func isVlog(name string) bool { return strings.HasSuffix(name, ".vlog") }

// powerLossCopy is dir as a power loss leaves it: every file as it is now,
// but the value-log files as they are in vlogs.
func powerLossCopy(t *testing.T, dir, vlogs string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "after-power-loss")
	copyDir(t, dir, out, func(n string) bool { return !isVlog(n) })
	copyDir(t, vlogs, out, isVlog)
	return out
}

// openForGC opens a store for the value-log GC tests: small value-log
// files (GC finds whole files of garbage soon), no GC of its own, tables
// compacted at Close (GC learns what is garbage). The caller closes it.
func openForGC(t *testing.T) (string, badgerstore.Options, *badgerstore.Store) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	opts := badgerstore.CompactOnClose(badgerstore.Options{Dir: dir, ValueLogFileSize: 2 << 20, GCInterval: -1})
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	return dir, opts, s
}

func bigMessage(id string) engine.Message {
	content, _ := json.Marshal(strings.Repeat(id, (80<<10)/len(id))) // above the 64 KiB ValueThreshold
	return engine.Message{ID: id, Role: "user", Content: content}
}

// An unacknowledged batch whose large record's value did not reach the
// value log: Open drops it, as if the power had gone before it was
// written, and keeps every acknowledged record.
func TestOpenDropsABatchWhoseLargeValueDidNotReachTheDisk(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data")
	opts := badgerstore.Options{Dir: dir, GCInterval: -1}
	s := mustOpen(t, opts)
	// Acknowledged: a small message and a large one.
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{
		{ID: "m1", Role: "user", Content: json.RawMessage(`"small"`)}, bigMessage("m2"),
	}, CreatedAt: 1}); err != nil {
		t.Fatal(err)
	}
	vlogs := filepath.Join(t.TempDir(), "vlogs-before")
	copyDir(t, dir, vlogs, isVlog)
	// The batch the power loss catches: a small message and a large one.
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", ExpectedCount: 2, Messages: []engine.Message{
		{ID: "m3", Role: "user", Content: json.RawMessage(`"small"`)}, bigMessage("m4"),
	}, CreatedAt: 2}); err != nil {
		t.Fatal(err)
	}
	lost := powerLossCopy(t, dir, vlogs)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := mustOpen(t, badgerstore.Options{Dir: lost, GCInterval: -1})
	if got := metricLine(t, s2, "mailbox_store_open_log_cuts_total"); got != "mailbox_store_open_log_cuts_total 1" {
		t.Fatalf("after the cut: %q", got)
	}
	msgs, err := s2.LoadMessages(ctx, "t1")
	if err != nil {
		t.Fatalf("messages after the power loss: %v", err)
	}
	var ids []string
	for _, m := range msgs {
		ids = append(ids, m.MessageID)
	}
	if got := strings.Join(ids, ","); got != "m1,m2" {
		t.Fatalf("messages after the power loss: %s, want m1,m2 (the last batch dropped whole)", got)
	}
	if string(msgs[1].Message.Content) != string(bigMessage("m2").Content) {
		t.Fatalf("m2 is %d bytes, not what was written", len(msgs[1].Message.Content))
	}
	verifyClean(t, s2)
	// The thread goes on: the same ids again, and a large value lands
	// where the lost one was and reads back.
	if _, err := s2.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", ExpectedCount: 2, Messages: []engine.Message{
		{ID: "m3", Role: "user", Content: json.RawMessage(`"again"`)}, bigMessage("m5"),
	}, CreatedAt: 3}); err != nil {
		t.Fatal(err)
	}
	msgs, err = s2.LoadMessages(ctx, "t1")
	if err != nil || len(msgs) != 4 || string(msgs[3].Message.Content) != string(bigMessage("m5").Content) {
		t.Fatalf("after a new append: %d messages, %v", len(msgs), err)
	}
	verifyClean(t, s2)
}

// A value-log GC whose moves did not reach the disk: Open drops the moved
// pointers, and the records read from their old copies, which GC had not
// deleted yet.
func TestOpenUndoesAValueLogGCWhoseMovesDidNotReachTheDisk(t *testing.T) {
	ctx := context.Background()
	dir, opts, s := openForGC(t)
	// Many versions of one large run record (garbage for GC), and
	// large messages that stay live beside them.
	run := createLargeRun(t, s)
	for i := range 60 {
		run.UpdatedAt = int64(2 + i)
		run.Steps = int64(i)
		cp := engine.Checkpoint{ThreadID: "t1", Run: &run, ExpectedCount: uint64(i / 6), CreatedAt: int64(i)}
		if i%6 == 5 {
			cp.Messages = []engine.Message{bigMessage(fmt.Sprintf("m%02d", i/6))}
		}
		if _, err := s.Checkpoint(ctx, cp); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil { // flushes and compacts: GC learns what is garbage
		t.Fatal(err)
	}
	s = mustOpen(t, opts)
	vlogs := filepath.Join(t.TempDir(), "vlogs-before-gc")
	copyDir(t, dir, vlogs, isVlog)
	// The power loss comes before the moves' sync: the memtable log as GC
	// wrote it (before the marker that follows the sync), the value log
	// as it was before GC.
	var lost string
	s.BeforeGCMark(func() {
		if lost == "" {
			lost = powerLossCopy(t, dir, vlogs)
		}
	})
	if rewritten := s.RunValueLogGC(); rewritten == 0 || lost == "" {
		t.Fatal("value-log GC rewrote nothing: the test needs a move")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := mustOpen(t, badgerstore.CompactOnClose(badgerstore.Options{Dir: lost, ValueLogFileSize: 2 << 20, GCInterval: -1}))
	got, err := s2.LoadRun(ctx, "r1")
	if err != nil || got == nil || got.Steps != 59 || string(got.State) != string(run.State) {
		t.Fatalf("run after the power loss: %+v, %v", got, err)
	}
	msgs, err := s2.LoadMessages(ctx, "t1")
	if err != nil || len(msgs) != 10 {
		t.Fatalf("messages after the power loss: %d, %v", len(msgs), err)
	}
	for i, m := range msgs {
		if want := bigMessage(fmt.Sprintf("m%02d", i)); m.MessageID != want.ID || string(m.Message.Content) != string(want.Content) {
			t.Fatalf("message %d: %s, %d bytes", i, m.MessageID, len(m.Message.Content))
		}
	}
	verifyClean(t, s2)
	// GC can run again, and moves what it must.
	s2.RunValueLogGC()
	if got, err := s2.LoadRun(ctx, "r1"); err != nil || got == nil || got.Steps != 59 {
		t.Fatalf("run after a second GC: %+v, %v", got, err)
	}
	verifyClean(t, s2)
}

// The other side: after a value-log GC that deleted files, a memtable log
// holding pointers into the value-log files before and after a rotation,
// GC's moves and acknowledged writes after them, left as SIGKILL leaves
// it, is whole, and Open keeps all of it. (A pointer into a file GC
// deleted, which a memtable log can also hold, is tested on synthetic
// logs: TestRepairTellsDanglingPointersFromSupersededOnes.)
func TestOpenKeepsAWholeLogAfterValueLogGC(t *testing.T) {
	ctx := context.Background()
	dir, opts, s := openForGC(t)
	big := func(c string) json.RawMessage { b, _ := json.Marshal(strings.Repeat(c, 100<<10)); return b }
	put := func(s *badgerstore.Store, id string, steps int, state json.RawMessage) {
		t.Helper()
		run := engine.RunRecord{RunID: id, ThreadID: "t-" + id, AgentID: "a", Status: engine.RunRunning, State: state, CreatedAt: 1, UpdatedAt: int64(1 + steps), Steps: int64(steps)}
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
	for i := range 40 { // garbage in the older files, once flushed and compacted
		put(s, "r1", i, big("a"))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustOpen(t, opts)
	// In the memtable now: values in the newest file and the next.
	put(s, "r2", 0, big("b"))
	for i := range 30 {
		put(s, "r3", i, big("c"))
	}
	files := func(d string) int {
		n := 0
		es, _ := os.ReadDir(d)
		for _, e := range es {
			if isVlog(e.Name()) {
				n++
			}
		}
		return n
	}
	before := files(dir)
	if s.RunValueLogGC() == 0 || files(dir) >= before {
		t.Fatalf("GC deleted no value-log file (%d before, %d after): the test needs one", before, files(dir))
	}
	put(s, "r4", 0, big("d")) // acknowledged after the GC
	var logs strings.Builder
	killed := filepath.Join(t.TempDir(), "killed")
	copyDir(t, dir, killed, func(string) bool { return true }) // as SIGKILL leaves it
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := mustOpen(t, badgerstore.Options{Dir: killed, ValueLogFileSize: 2 << 20, GCInterval: -1, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	for id, want := range map[string]json.RawMessage{"r1": big("a"), "r2": big("b"), "r3": big("c"), "r4": big("d")} {
		got, err := s2.LoadRun(ctx, id)
		if err != nil || got == nil || string(got.State) != string(want) {
			t.Fatalf("run %s after the kill: %v (found %v)\nlogs:\n%s", id, err, got != nil, logs.String())
		}
	}
	if strings.Contains(logs.String(), "dropped") {
		t.Fatalf("Open cut a log:\n%s", logs.String())
	}
	verifyClean(t, s2)
}

// A value that goes bad after it was synced (a media error), followed by
// acknowledged writes: not a power loss's torn tail. Open cuts nothing,
// and every write after it is kept.
func TestOpenKeepsWritesAfterAValueThatWentBad(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data")
	s := mustOpen(t, badgerstore.Options{Dir: dir, GCInterval: -1})
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{bigMessage("m1")}, CreatedAt: 1}); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t2", ExpectedCount: uint64(i), CreatedAt: int64(i),
			Messages: []engine.Message{{ID: fmt.Sprintf("s%d", i), Role: "user", Content: json.RawMessage(`"small"`)}}}); err != nil {
			t.Fatal(err)
		}
	}
	killed := filepath.Join(t.TempDir(), "killed")
	copyDir(t, dir, killed, func(string) bool { return true })
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// One byte of m1's value flips on the disk.
	es, _ := os.ReadDir(killed)
	flipped := false
	for _, e := range es {
		if !isVlog(e.Name()) {
			continue
		}
		path := filepath.Join(killed, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if i := strings.Index(string(b), "m1m1m1m1"); i >= 0 {
			b[i+1000] ^= 0x20
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			flipped = true
		}
	}
	if !flipped {
		t.Fatal("m1's value not found in the value log")
	}
	var logs strings.Builder
	s2 := mustOpen(t, badgerstore.Options{Dir: killed, GCInterval: -1, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if n, err := s2.MessageCount(ctx, "t2"); err != nil || n != 10 {
		t.Fatalf("t2 after the flip: %d messages, %v; want all 10\nlogs:\n%s", n, err, logs.String())
	}
	if strings.Contains(logs.String(), "dropped") || metricLine(t, s2, "mailbox_store_open_log_cuts_total") != "mailbox_store_open_log_cuts_total 0" {
		t.Fatalf("Open cut a log:\n%s", logs.String())
	}
}

// metricLine is the line of the store's metrics that starts with name.
func metricLine(t *testing.T, s *badgerstore.Store, name string) string {
	t.Helper()
	var b strings.Builder
	s.Metrics().WritePrometheus(&b)
	for _, l := range strings.Split(b.String(), "\n") {
		if strings.HasPrefix(l, name) {
			return l
		}
	}
	t.Fatalf("no metric %s in:\n%s", name, b.String())
	return ""
}
