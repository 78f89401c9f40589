package badgerstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// copyAsKilled copies the regular files of src into a new directory, as a
// SIGKILL leaves them: what the process wrote, synced or not, as the page
// cache holds it.
func copyAsKilled(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "after-kill")
	if err := os.MkdirAll(dst, 0o750); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			copyFile(t, filepath.Join(src, e.Name()), filepath.Join(dst, e.Name()))
		}
	}
	return dst
}

// brokenBySyncFailure opens a store, writes r1, then fails the memtable
// log's sync of r2's write; it returns the directory as a SIGKILL then
// leaves it.
func brokenBySyncFailure(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	s, l := openSynced(t, Options{Dir: dir})
	ctx := context.Background()
	createRun(t, s, "r1", 10)
	l.setFail(func(name string) error {
		if strings.HasSuffix(name, memExt) {
			return errors.New("injected: EIO")
		}
		return nil
	})
	run := engine.RunRecord{RunID: "r2", ThreadID: "t-r2", AgentID: "a", Status: engine.RunRunning, CreatedAt: 1, UpdatedAt: 1}
	if err := s.CreateRun(ctx, run); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("create with a failing sync: %v, want unavailable", err)
	}
	cause, err := os.ReadFile(filepath.Join(dir, syncFailedMarker))
	if err != nil || !strings.Contains(string(cause), "injected: EIO") {
		t.Fatalf("marker after the failed sync: %q %v, want one naming the failure", cause, err)
	}
	return copyAsKilled(t, dir)
}

// A store whose log sync failed leaves a marker; the next Open writes
// every memtable log out again (byte for byte), syncs it before Badger
// reads it, and removes the marker. The failed batch's outcome was
// unknown to its caller (unavailable): it is replayed with the log.
func TestAfterAFailedSyncTheNextOpenWritesTheLogsOutAgain(t *testing.T) {
	dir := brokenBySyncFailure(t)
	before := map[string][]byte{}
	for _, name := range logFiles(t, dir, memExt) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		before[name] = b
	}
	if len(before) == 0 {
		t.Fatal("no memtable log left behind")
	}

	// The syncs made while the marker stands are the rewrite's.
	var rewritten []string
	s := openCountingRewrites(t, Options{Dir: dir, syncedHook: func(name string) error {
		if markerStands(dir) && strings.HasSuffix(name, memExt) {
			rewritten = append(rewritten, name)
			if !bytes.Equal(mustRead(t, filepath.Join(dir, name)), before[name]) {
				t.Errorf("%s changed by its rewrite", name)
			}
		}
		return nil
	}}, 1)
	slices.Sort(rewritten)
	if want := slices.Sorted(maps.Keys(before)); !slices.Equal(rewritten, want) {
		t.Fatalf("memtable logs written out again while the marker stood: %v, want %v", rewritten, want)
	}
	ctx := context.Background()
	for _, id := range []string{"r1", "r2"} {
		if r, err := s.LoadRun(ctx, id); err != nil || r == nil {
			t.Fatalf("run %s after the reopen: %v %v", id, r, err)
		}
	}
}

// When the rewrite's sync fails too, Open fails as unavailable and the
// marker stays for the next try, which then succeeds.
func TestAnOpenWhoseRewriteFailsKeepsTheMarker(t *testing.T) {
	dir := brokenBySyncFailure(t)
	_, err := Open(Options{Dir: dir, syncedHook: func(name string) error {
		if strings.HasSuffix(name, memExt) {
			return errors.New("injected: still EIO")
		}
		return nil
	}})
	if !errors.Is(err, engine.ErrUnavailable) || !strings.Contains(err.Error(), "still EIO") {
		t.Fatalf("open with the rewrite's sync failing: %v, want unavailable", err)
	}
	if !markerStands(dir) {
		t.Fatal("the marker is gone after a failed rewrite, want it kept")
	}
	openCountingRewrites(t, Options{Dir: dir}, 1)
}

// A store that stopped without a failed sync leaves no marker, and its
// next Open writes nothing out again.
func TestACleanStopLeavesNoMarker(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSynced(t, Options{Dir: dir})
	createRun(t, s, "r1", 10)
	killed := copyAsKilled(t, dir)
	if markerStands(killed) {
		t.Fatal("a marker without a failed sync")
	}
	openCountingRewrites(t, Options{Dir: killed}, 0)
}

// markerStands reports whether dir holds syncFailedMarker (safe to call
// from a sync hook, on any goroutine).
func markerStands(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, syncFailedMarker))
	return err == nil
}

// openCountingRewrites opens a store on dir (closed when the test ends)
// and checks that its Open wrote the logs out again want times (0 or 1)
// and left no marker.
func openCountingRewrites(t *testing.T, opts Options, want uint64) *Store {
	t.Helper()
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	if got := s.metrics.logRewrites.Get(); got != want {
		t.Fatalf("mailbox_store_open_log_rewrites_total = %d, want %d", got, want)
	}
	if markerStands(opts.Dir) {
		t.Fatal("the marker stands after Open")
	}
	return s
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The review's scenario: a value-log sync fails under a value the store
// refuses (v2), which the disk may not hold although the page cache does
// (the kernel marked its pages clean). The next Open writes the value-log
// file out again, byte for byte, and syncs it before Badger reads it, so
// v2's pointer, once Badger's replay makes it durable in a table file,
// points at bytes on the disk; without the rewrite the sync found the
// pages clean and wrote nothing, and after a power loss the key read 0
// bytes, hiding the acknowledged v1. (The kernel's side cannot be
// modelled here: the test checks that the file is written out again
// before anything reads it.)
func TestAFailedValueLogSyncIsWrittenOutAgainBeforeItIsRead(t *testing.T) {
	dir := t.TempDir()
	s, l := openSynced(t, Options{Dir: dir, GCInterval: -1})
	key := runKey("big")
	v1 := bytes.Repeat([]byte("1"), 100<<10) // above ValueThreshold: in the value log
	v2 := bytes.Repeat([]byte("2"), 100<<10)
	if err := s.RawSet(key, v1); err != nil {
		t.Fatal(err)
	}
	l.setFail(func(name string) error {
		if strings.HasSuffix(name, vlogExt) {
			return errors.New("injected: EIO")
		}
		return nil
	})
	if err := s.RawSet(key, v2); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("v2 with a failing value-log sync: %v, want unavailable", err)
	}
	p2 := copyAsKilled(t, dir)
	vlogs := logFiles(t, p2, vlogExt)
	slices.SortFunc(vlogs, func(a, b string) int {
		fa, _ := logFid(a, vlogExt)
		fb, _ := logFid(b, vlogExt)
		return fa - fb
	})
	newest := vlogs[len(vlogs)-1]
	before := mustRead(t, filepath.Join(p2, newest))
	if !bytes.Contains(before, v2[:4096]) {
		t.Fatalf("the refused value is not in %s as the cache holds it", newest)
	}
	rewritten := false
	s2 := openCountingRewrites(t, Options{Dir: p2, GCInterval: -1, syncedHook: func(name string) error {
		if markerStands(p2) && name == newest {
			rewritten = true
			if !bytes.Equal(mustRead(t, filepath.Join(p2, name)), before) {
				t.Errorf("%s changed by its rewrite", name)
			}
		}
		return nil
	}}, 1)
	if !rewritten {
		t.Fatalf("%s, holding the refused value, was not written out and synced before the marker went", newest)
	}
	if got, found, err := s2.RawGet(key); err != nil || !found || !bytes.Equal(got, v2) {
		t.Fatalf("key after the reopen: %d bytes, found %v, err %v; want v2, the refused write replayed", len(got), found, err)
	}
}

// A sync that fails in Open itself (of the logs a killed process left)
// leaves the marker too: those pages are clean now, and the next Open
// writes them out again (found by review).
func TestAnOpenWhoseOwnSyncFailsLeavesTheMarker(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSynced(t, Options{Dir: dir})
	createRun(t, s, "r1", 10)
	killed := copyAsKilled(t, dir)
	_, err := Open(Options{Dir: killed, syncedHook: func(name string) error {
		if strings.HasSuffix(name, memExt) {
			return errors.New("injected: EIO")
		}
		return nil
	}})
	if !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("open with a failing sync: %v, want unavailable", err)
	}
	marker, err := os.ReadFile(filepath.Join(killed, syncFailedMarker))
	if err != nil || !strings.HasPrefix(string(marker), vlogFromPrefix+"0\n") || !strings.Contains(string(marker), "injected: EIO") {
		t.Fatalf("marker after Open's failed sync: %q %v, want every value-log file and the cause", marker, err)
	}
	s2 := openCountingRewrites(t, Options{Dir: killed}, 1)
	if r, err := s2.LoadRun(context.Background(), "r1"); err != nil || r == nil {
		t.Fatalf("run r1 after the reopen: %v %v", r, err)
	}
}

// Without syncs per commit the store follows the value log only when GC
// syncs it, from the file followed at Open on: a failure there names that
// file in the marker, and the rewrite starts from it, not from the two
// newest (found by review).
func TestTheRewriteStartsAtTheValueLogFileTheFailedSyncCouldReach(t *testing.T) {
	dir := t.TempDir()
	s, l := openSynced(t, Options{Dir: dir, NoSync: true, GCInterval: -1, ValueLogFileSize: 1 << 20})
	first := s.dur.vlog.fid
	for i := range 12 {
		if err := s.RawSet(runKey(fmt.Sprint("big", i)), bytes.Repeat([]byte{byte('a' + i)}, 300<<10)); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(logFiles(t, dir, vlogExt)); n < 3 {
		t.Fatalf("%d value-log files, want at least 3", n)
	}
	failing := fmt.Sprintf("%06d%s", first, vlogExt)
	l.setFail(func(name string) error {
		if name == failing {
			return errors.New("injected: EIO")
		}
		return nil
	})
	if err := s.dur.afterGC(0); err == nil {
		t.Fatal("afterGC did not fail")
	}
	killed := copyAsKilled(t, dir)
	var rewritten []string
	openCountingRewrites(t, Options{Dir: killed, NoSync: true, GCInterval: -1, ValueLogFileSize: 1 << 20, syncedHook: func(name string) error {
		if markerStands(killed) {
			rewritten = append(rewritten, name)
		}
		return nil
	}}, 1)
	if !slices.Contains(rewritten, failing) {
		t.Fatalf("%s, whose sync failed, was not written out again (written: %v)", failing, rewritten)
	}
}

// The rewrite leaves a sparse file's holes alone and its data as it was.
func TestARewriteKeepsHolesAndData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "000001.vlog")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("x"), 3<<20) // more than one buffer
	if _, err := f.WriteAt(data, 8<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("tail"), 40<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	before := mustRead(t, path)
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	blocks := st.Blocks
	n, err := rewriteFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, path), before) {
		t.Fatal("the rewrite changed the file")
	}
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks != blocks || n > int64(len(data))+64<<10 {
		t.Fatalf("the rewrite wrote %d bytes and the file holds %d blocks, was %d: it filled holes", n, st.Blocks, blocks)
	}
}

// The rewrite takes the directory's lock, as repair does: it never writes
// the logs of a directory another process holds (found by review).
func TestTheRewriteLeavesADirectoryInUseAlone(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSynced(t, Options{Dir: dir}) // holds the directory
	createRun(t, s, "r1", 10)
	if err := markSyncFailed(dir, 0, errors.New("injected: EIO")); err != nil {
		t.Fatal(err)
	}
	var synced []string
	_, err := rewriteAfterFailedSync(dir, func(name string) error { synced = append(synced, name); return nil }, s.log)
	if !errors.Is(err, engine.ErrDataDirInUse) || len(synced) > 0 {
		t.Fatalf("rewrite of a directory in use: %v, synced %v; want ErrDataDirInUse and nothing written", err, synced)
	}
	if !markerStands(dir) {
		t.Fatal("the marker is gone after the refused rewrite, want it kept")
	}
	if _, err := Open(Options{Dir: dir}); !errors.Is(err, engine.ErrDataDirInUse) {
		t.Fatalf("a second Open of the directory: %v, want ErrDataDirInUse", err)
	}
}
