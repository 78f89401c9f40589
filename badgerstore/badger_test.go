package badgerstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

func queued(id, thread string, at int64) engine.Dispatch {
	return engine.Dispatch{DispatchID: id, ThreadID: thread, RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: at, CreatedAt: at, MaxAttempts: 5}
}

func mustOpen(t *testing.T, o badgerstore.Options) *badgerstore.Store {
	t.Helper()
	s, err := badgerstore.Open(o)
	if err != nil {
		t.Fatalf("open %+v: %v", o, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func verifyClean(t *testing.T, s *badgerstore.Store) badgerstore.Report {
	t.Helper()
	rep, err := s.Verify(context.Background())
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if len(rep.Problems) > 0 {
		t.Fatalf("verify: %v", rep.Problems)
	}
	return rep
}

func TestOpenRefusesDataDirInUse(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	mustOpen(t, badgerstore.Options{Dir: dir})
	_, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if !errors.Is(err, engine.ErrDataDirInUse) {
		t.Fatalf("second open: got %v, want ErrDataDirInUse", err)
	}
	if !strings.Contains(err.Error(), dir) {
		t.Fatalf("error %q does not name the directory", err)
	}
}

func TestOpenValidatesOptions(t *testing.T) {
	t.Parallel()
	if _, err := badgerstore.Open(badgerstore.Options{}); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("open without dir: got %v, want ErrValidation", err)
	}
	if _, err := badgerstore.Open(badgerstore.Options{InMemory: true, MemTableSize: 1 << 20, ValueThreshold: 1 << 20}); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("value threshold over the batch size: got %v, want ErrValidation", err)
	}
}

func TestDurableAcrossReopen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := context.Background()
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Enqueue(ctx, queued("d1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	c, err := s.Claim(ctx, "t1", "c1", time.Minute, 1000)
	if err != nil || c == nil {
		t.Fatalf("claim: %v %v", c, err)
	}
	if _, err := s.Interrupt(ctx, "t1", 1001); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := s.LoadDispatch(ctx, "d1"); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("load after close: got %v, want ErrUnavailable", err)
	}
	s2 := mustOpen(t, badgerstore.Options{Dir: dir})
	d, err := s2.LoadDispatch(ctx, "d1")
	if err != nil || d == nil || d.Status != engine.StatusClaimed || d.ClaimToken != c.ClaimToken {
		t.Fatalf("after reopen: %+v %v", d, err)
	}
	if ep, err := s2.CurrentEpoch(ctx, "t1"); err != nil || ep != 1 {
		t.Fatalf("epoch after reopen: %d %v", ep, err)
	}
	verifyClean(t, s2)
}

func TestCorruptRecordIsReportedWithItsKey(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if _, err := s.Enqueue(ctx, queued("good", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Enqueue(ctx, queued("bad", "t1", 1001)); err != nil {
		t.Fatal(err)
	}
	for _, garbage := range []string{"{not json", `{"dispatch_id":"bad","thread_id":"t1","run_id":"r","status":"flying","max_attempts":5}`, `{"dispatch_id":"bad","thread_id":"t1","run_id":"r","status":"claimed","max_attempts":5}`, `{"dispatch_id":"other","thread_id":"t1","run_id":"r","status":"queued","max_attempts":5}`} {
		if err := s.RawSet(badgerstore.DispatchKey("bad"), []byte(garbage)); err != nil {
			t.Fatal(err)
		}
		_, err := s.LoadDispatch(ctx, "bad")
		if !errors.Is(err, engine.ErrCorrupt) || !strings.Contains(err.Error(), `"dbad"`) {
			t.Fatalf("load of %s: got %v, want ErrCorrupt naming the key", garbage, err)
		}
		if _, err := s.ListDispatches(ctx, "t1", nil, 10, 0); !errors.Is(err, engine.ErrCorrupt) {
			t.Fatalf("list over a corrupt record: got %v, want ErrCorrupt", err)
		}
		if err := s.Ack(ctx, "bad", "x", 2000); !errors.Is(err, engine.ErrCorrupt) {
			t.Fatalf("ack of a corrupt record: got %v, want ErrCorrupt", err)
		}
		rep, err := s.Verify(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Problems) == 0 || !strings.Contains(strings.Join(rep.Problems, "\n"), `"dbad"`) {
			t.Fatalf("verify did not report the corrupt record: %v", rep.Problems)
		}
	}
	// The good record is unaffected.
	if d, err := s.LoadDispatch(ctx, "good"); err != nil || d == nil {
		t.Fatalf("good record: %v %v", d, err)
	}
}

func TestVerifyFindsDamagedIndexes(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if _, err := s.Enqueue(ctx, queued("d1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Claim(ctx, "t1", "c1", time.Minute, 1000); err != nil {
		t.Fatal(err)
	}
	verifyClean(t, s)
	if err := s.RawDelete(badgerstore.StateKey("t1")); err != nil {
		t.Fatal(err)
	}
	rep, _ := s.Verify(ctx)
	if !strings.Contains(strings.Join(rep.Problems, "\n"), "thread t1 has no state record but 0 queued, 1 claimed") {
		t.Fatalf("lost claim guard not reported: %v", rep.Problems)
	}
	if err := s.RawSet(badgerstore.QueuedMarkerKey("t9"), nil); err != nil {
		t.Fatal(err)
	}
	rep, _ = s.Verify(ctx)
	if !strings.Contains(strings.Join(rep.Problems, "\n"), "stray queued-thread marker for t9") {
		t.Fatalf("stray marker not reported: %v", rep.Problems)
	}
	if err := s.RawDelete(badgerstore.DispatchKey("d1")); err != nil {
		t.Fatal(err)
	}
	rep, _ = s.Verify(ctx)
	if !strings.Contains(strings.Join(rep.Problems, "\n"), "stray index entry") {
		t.Fatalf("index entries of a vanished record not reported: %v", rep.Problems)
	}
}

func TestGroupCommitSharesSyncsAndIsolatesFailures(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{Dir: t.TempDir()})
	ctx := context.Background()
	const workers, each = 64, 20
	var wg sync.WaitGroup
	errs := make(chan error, workers*each*2)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				id := fmt.Sprintf("w%d-%d", w, i)
				if _, err := s.Enqueue(ctx, queued(id, fmt.Sprintf("t%d", w%8), 1000)); err != nil {
					errs <- err
				}
				// A duplicate fails inside the same batches and must not
				// take the others down.
				if _, err := s.Enqueue(ctx, queued(id, "tx", 1000)); !errors.Is(err, engine.ErrAlreadyExists) {
					errs <- fmt.Errorf("duplicate %s: got %v", id, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	c, err := s.CountByStatus(ctx)
	if err != nil || c.Get(engine.StatusQueued) != workers*each {
		t.Fatalf("queued count %d (err %v), want %d", c.Get(engine.StatusQueued), err, workers*each)
	}
	batches, ops := s.BatchStats()
	if ops < 2*workers*each || batches >= ops {
		t.Fatalf("group commit did not batch: %d ops in %d commits", ops, batches)
	}
	t.Logf("%d ops in %d commits (%.1f per fsync)", ops, batches, float64(ops)/float64(batches))
	verifyClean(t, s)
}

func TestBatchesSplitWhenTooLargeForOneTransaction(t *testing.T) {
	t.Parallel()
	// A 1 MiB memtable allows ~150 KiB per transaction: 48 concurrent
	// 20 KiB appends cannot share one.
	s := mustOpen(t, badgerstore.Options{InMemory: true, MemTableSize: 1 << 20, ValueThreshold: 32 << 10})
	ctx := context.Background()
	big := []byte(`"` + strings.Repeat("x", 20<<10) + `"`)
	var wg sync.WaitGroup
	for w := range 48 {
		wg.Go(func() {
			thread := fmt.Sprintf("t%d", w)
			_, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: thread, Messages: []engine.Message{{ID: "m1", Role: engine.RoleUser, Content: big}}})
			if err != nil {
				t.Errorf("append to %s: %v", thread, err)
			}
		})
	}
	wg.Wait()
	rep := verifyClean(t, s)
	if rep.Messages != 48 {
		t.Fatalf("messages: %d, want 48", rep.Messages)
	}
	// One operation larger than a transaction fails alone and cleanly.
	huge := make([]engine.Message, 12)
	for i := range huge {
		huge[i] = engine.Message{ID: fmt.Sprintf("h%d", i), Role: engine.RoleUser, Content: big}
	}
	_, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t0", ExpectedCount: 1, Messages: huge})
	if !errors.Is(err, engine.ErrTooLarge) || !strings.Contains(err.Error(), "too large") {
		t.Fatalf("oversized checkpoint: got %v, want a too-large validation error", err)
	}
	if n, _ := s.MessageCount(ctx, "t0"); n != 1 {
		t.Fatalf("oversized checkpoint left %d messages, want 1", n)
	}
	verifyClean(t, s)
}

// mountTmpfs mounts a tmpfs of the given size for fault tests. They need
// root (CI runs as root); elsewhere they are skipped with the reason.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("fault test needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	return dir
}

func TestFullDiskFailsWritesAndRecovers(t *testing.T) {
	dir := mountTmpfs(t, "64m")
	data := filepath.Join(dir, "data")
	opts := badgerstore.Options{Dir: data, MemTableSize: 4 << 20, ValueLogFileSize: 4 << 20, MinFreeBytes: 16 << 20}
	s := mustOpen(t, opts)
	ctx := context.Background()
	if _, err := s.Enqueue(ctx, queued("before", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	// Fill the file system until less than MinFreeBytes is left.
	ballast := filepath.Join(dir, "ballast")
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	fill := int64(st.Bavail)*int64(st.Bsize) - opts.MinFreeBytes/2
	if out, err := exec.Command("fallocate", "-l", fmt.Sprint(fill), ballast).CombinedOutput(); err != nil {
		t.Fatalf("fallocate: %v: %s", err, out)
	}
	var err error
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, err = s.Enqueue(ctx, queued(fmt.Sprintf("during-%d", time.Now().UnixNano()), "t1", 1000)); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond) // the guard re-reads statfs every 250ms
	}
	if !errors.Is(err, engine.ErrUnavailable) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("enqueue on a full disk: got %v, want disk-full ErrUnavailable", err)
	}
	if err := s.Writable(); !errors.Is(err, engine.ErrUnavailable) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Writable on a full disk: %v", err)
	}
	// Badger writes memtables and tables through memory maps: on a full
	// disk, a store is neither opened (a new memtable's log) nor closed
	// (the flush of its memtables); both were SIGBUS (found by review).
	if err := s.Closable(); !errors.Is(err, engine.ErrUnavailable) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Closable on a full disk: %v", err)
	}
	other := opts
	other.Dir = filepath.Join(dir, "other")
	if s2, err := badgerstore.Open(other); err == nil {
		s2.Close()
		t.Fatal("a store opened on a full disk")
	} else if !errors.Is(err, engine.ErrUnavailable) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Open on a full disk: %v", err)
	}
	// Reads still work and nothing acknowledged is lost.
	if d, err := s.LoadDispatch(ctx, "before"); err != nil || d == nil {
		t.Fatalf("load on a full disk: %v %v", d, err)
	}
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	if err := s.Writable(); err != nil {
		t.Fatalf("Writable after space returned: %v", err)
	}
	if err := s.Closable(); err != nil {
		t.Fatalf("Closable after space returned: %v", err)
	}
	if _, err := s.Enqueue(ctx, queued("after", "t1", 1000)); err != nil {
		t.Fatalf("enqueue after space returned: %v", err)
	}
	verifyClean(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := mustOpen(t, opts)
	for _, id := range []string{"before", "after"} {
		if d, err := s2.LoadDispatch(ctx, id); err != nil || d == nil {
			t.Fatalf("%s after reopen: %v %v", id, d, err)
		}
	}
	verifyClean(t, s2)
}

func TestReadOnlyDataDirIsAnError(t *testing.T) {
	dir := mountTmpfs(t, "64m")
	data := filepath.Join(dir, "data")
	s, err := badgerstore.Open(badgerstore.Options{Dir: data, MemTableSize: 4 << 20, ValueLogFileSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Enqueue(context.Background(), queued("d1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "remount,ro", dir).CombinedOutput(); err != nil {
		t.Fatalf("remount ro: %v: %s", err, out)
	}
	_, err = badgerstore.Open(badgerstore.Options{Dir: data, MemTableSize: 4 << 20, ValueLogFileSize: 4 << 20})
	if !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("open on a read-only file system: got %v, want ErrUnavailable", err)
	}
	if out, err := exec.Command("mount", "-o", "remount,rw", dir).CombinedOutput(); err != nil {
		t.Fatalf("remount rw: %v: %s", err, out)
	}
	s2 := mustOpen(t, badgerstore.Options{Dir: data, MemTableSize: 4 << 20, ValueLogFileSize: 4 << 20})
	if d, err := s2.LoadDispatch(context.Background(), "d1"); err != nil || d == nil {
		t.Fatalf("after remount: %v %v", d, err)
	}
	verifyClean(t, s2)
}

func TestWritableReportsClosedStore(t *testing.T) {
	s, err := badgerstore.Open(badgerstore.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Writable(); err != nil {
		t.Fatalf("fresh store not writable: %v", err)
	}
	s.Close()
	if err := s.Writable(); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("closed store Writable = %v", err)
	}
}
