package badgerstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// heldFirstCommit opens a store whose first commit waits until the test
// fails or releases it; every later commit goes through at once.
func heldFirstCommit(t *testing.T, opts Options) (s *Store, entered <-chan struct{}, fail func(error)) {
	t.Helper()
	opts.Dir = t.TempDir()
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan error)
	in := make(chan struct{}, 1)
	first := true
	s.testCommit = func(txn *badger.Txn) func(cb func(error)) {
		held := first
		first = false
		return func(cb func(error)) {
			if !held {
				txn.CommitWith(cb)
				return
			}
			go func() {
				in <- struct{}{}
				if err := <-release; err != nil {
					txn.Discard()
					cb(err)
					return
				}
				txn.CommitWith(cb)
			}()
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			return // the writer may be stuck: Close would hang
		}
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s, in, func(err error) { release <- err }
}

// await returns what ch delivers, failing the test if nothing comes
// within 10 s (a stuck writer).
func await(t *testing.T, what string, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no answer within 10 s: the writer is stuck", what)
		return nil
	}
}

// startOp runs fn as one operation and reports on ran once it has run the
// first time (it runs again in a rebuild).
func startOp(s *Store, name string, ran chan<- struct{}, fn opFunc) <-chan error {
	out := make(chan error, 1)
	once := false
	go func() {
		out <- s.update(context.Background(), name, func(w *writeTx) error {
			err := fn(w)
			if !once {
				once = true
				ran <- struct{}{}
			}
			return err
		})
	}()
	return out
}

func bigText(n int) json.RawMessage {
	b, _ := json.Marshal(strings.Repeat("x", n))
	return b
}

func sizedMessages(prefix string, count, size int) []engine.Message {
	out := make([]engine.Message, count)
	for i := range out {
		out[i] = engine.Message{ID: fmt.Sprintf("%s-%d", prefix, i), Role: engine.RoleUser, Content: bigText(size)}
	}
	return out
}

// An operation that conflicted on top of the batch in flight may write
// much more when that batch fails and its own batch is run again. When it
// is too large on its own, only it is refused: the operations after it
// are run again, not answered with its error, and the writer goes on
// (it used to refuse them all and, with the batch full, stop for good).
func TestRebuildRefusesOnlyTheOperationTooLargeAlone(t *testing.T) {
	s, entered, fail := heldFirstCommit(t, Options{ValueLogFileSize: 1 << 20})
	ctx := context.Background()
	ran := make(chan struct{}, maxBatch)

	a := startOp(s, "a", ran, func(w *writeTx) error {
		_, err := w.checkpoint(&engine.Checkpoint{ThreadID: "t1", Messages: sizedMessages("a", 1, 2)}, nil)
		return err
	})
	<-entered // a is in flight
	<-ran
	// b expects an empty log: on top of a it conflicts and writes nothing;
	// without a it writes a value larger than a value-log file.
	b := startOp(s, "b", ran, func(w *writeTx) error {
		_, err := w.checkpoint(&engine.Checkpoint{ThreadID: "t1", Messages: sizedMessages("b", 1, 1100<<10)}, nil)
		return err
	})
	<-ran
	const n = maxBatch - 1 // the batch is full
	small := make([]<-chan error, n)
	for i := range small {
		small[i] = startOp(s, "small", ran, func(w *writeTx) error {
			w.set(fmt.Appendf(nil, "zz-%03d", i), []byte("v"))
			return nil
		})
		<-ran
	}
	fail(errors.New("injected commit failure"))
	if err := await(t, "a", a); err == nil {
		t.Fatal("a: committed, want the injected failure")
	}
	if err := await(t, "b", b); !errors.Is(err, engine.ErrTooLarge) {
		t.Fatalf("b: %v, want ErrTooLarge", err)
	}
	for i, c := range small {
		if err := await(t, "small operation", c); err != nil {
			t.Fatalf("small operation %d: %v", i, err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- s.RawSet([]byte("zz-after"), []byte("1")) }()
	if err := await(t, "a write after the rebuild", done); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if _, ok, err := s.RawGet(fmt.Appendf(nil, "zz-%03d", i)); err != nil || !ok {
			t.Fatalf("zz-%03d: found %v, %v", i, ok, err)
		}
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) > 0 {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
}

// When an operation no longer fits next to those before it in the rebuilt
// batch (though it fits alone), it and those after it run again in the
// next batch instead of being refused.
func TestRebuildSpillsWhatNoLongerFitsToTheNextBatch(t *testing.T) {
	// A 4 MiB memtable limits a transaction to 600 KiB of small values.
	s, entered, fail := heldFirstCommit(t, Options{MemTableSize: 4 << 20})
	ctx := context.Background()
	ran := make(chan struct{}, 8)

	a := startOp(s, "a", ran, func(w *writeTx) error {
		_, err := w.checkpoint(&engine.Checkpoint{ThreadID: "t1", Messages: sizedMessages("a", 1, 2)}, nil)
		return err
	})
	<-entered
	<-ran
	// b1 writes 420 KB on its own thread; b2 conflicts on top of a, and
	// without a writes another 420 KB: more than one transaction takes.
	b1 := startOp(s, "b1", ran, func(w *writeTx) error {
		_, err := w.checkpoint(&engine.Checkpoint{ThreadID: "t2", Messages: sizedMessages("b1", 7, 60<<10)}, nil)
		return err
	})
	<-ran
	b2 := startOp(s, "b2", ran, func(w *writeTx) error {
		_, err := w.checkpoint(&engine.Checkpoint{ThreadID: "t1", Messages: sizedMessages("b2", 7, 60<<10)}, nil)
		return err
	})
	<-ran
	c := startOp(s, "c", ran, func(w *writeTx) error {
		w.set([]byte("zz-c"), []byte("v"))
		return nil
	})
	<-ran
	fail(errors.New("injected commit failure"))
	if err := await(t, "a", a); err == nil {
		t.Fatal("a: committed, want the injected failure")
	}
	for name, ch := range map[string]<-chan error{"b1": b1, "b2": b2, "c": c} {
		if err := await(t, name, ch); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	for thread, want := range map[string]int{"t1": 7, "t2": 7} {
		msgs, err := s.LoadMessages(ctx, thread)
		if err != nil || len(msgs) != want {
			t.Fatalf("%s: %d messages (%v), want %d", thread, len(msgs), err, want)
		}
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) > 0 {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
}

// After a failed commit the ready-index floor drops to the bottom, and a
// scan of a snapshot from before the failure cannot raise it again:
// Badger may have applied part of the failed commit, ready keys included,
// and the failed commit's inserts are recorded nowhere.
func TestFailedCommitDropsTheReadyFloor(t *testing.T) {
	ss := &snapshots{cache: newRecordCache(0)}
	ss.publish(nil, nil, math.MinInt64) // commit 1
	ss.raiseFloor(1, 100)
	if ss.floor != 100 {
		t.Fatalf("floor %d, want 100", ss.floor)
	}
	ss.dropFloor() // commit 2 failed
	if ss.floor != math.MinInt64 {
		t.Fatalf("floor %d after a failed commit, want the bottom", ss.floor)
	}
	ss.raiseFloor(1, 100) // a scan of commit 1's snapshot
	if ss.floor != math.MinInt64 {
		t.Fatalf("a scan from before the failure raised the floor to %d", ss.floor)
	}
	ss.publish(nil, nil, math.MaxInt64) // commit 2, after the failure
	ss.raiseFloor(2, 100)
	if ss.floor != 100 {
		t.Fatalf("floor %d, want 100 from a scan after the failure", ss.floor)
	}
}

// The batch built while another is being written is handed to Badger as
// soon as that one is durable, before its callers are answered: woken
// first, the callers would queue ahead of Badger's write goroutine on the
// processor and leave the disk idle while they run.
func TestNextBatchIsSentBeforeTheCallersAreAnswered(t *testing.T) {
	s, err := Open(Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	}()
	var aReturned atomic.Bool
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	secondSent := make(chan bool, 1) // whether a had returned when the second batch was sent
	commits := 0
	s.testCommit = func(txn *badger.Txn) func(cb func(error)) {
		commits++
		n := commits
		return func(cb func(error)) {
			switch n {
			case 1:
				go func() {
					entered <- struct{}{}
					<-release
					txn.CommitWith(cb)
				}()
				return
			case 2:
				// Before the fix a was answered first and returned
				// within microseconds; give it ample time to show.
				deadline := time.Now().Add(200 * time.Millisecond)
				for !aReturned.Load() && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
				secondSent <- aReturned.Load()
			}
			txn.CommitWith(cb)
		}
	}
	ran := make(chan struct{}, 2)
	a := startOp(s, "a", ran, func(w *writeTx) error {
		w.set([]byte("zz-a"), []byte("1"))
		return nil
	})
	aDone := make(chan error, 1)
	go func() {
		err := <-a
		aReturned.Store(true)
		aDone <- err
	}()
	<-entered // a is in flight
	<-ran
	b := startOp(s, "b", ran, func(w *writeTx) error {
		w.set([]byte("zz-b"), []byte("1"))
		return nil
	})
	<-ran // b is built on top of a
	close(release)
	if err := await(t, "a", aDone); err != nil {
		t.Fatal(err)
	}
	if err := await(t, "b", b); err != nil {
		t.Fatal(err)
	}
	if answeredFirst := <-secondSent; answeredFirst {
		t.Fatal("a's caller was answered before the next batch was sent")
	}
}

// Stalled reports a commit that has been with Badger for longer than the
// limit (a hung disk), and nothing once it completed.
func TestStalledReportsACommitStuckInBadger(t *testing.T) {
	s, entered, fail := heldFirstCommit(t, Options{})
	if err := s.Stalled(time.Now().Add(time.Hour), time.Minute); err != nil {
		t.Fatalf("idle store: %v", err)
	}
	ran := make(chan struct{}, 1)
	a := startOp(s, "a", ran, func(w *writeTx) error {
		w.set([]byte("zz-a"), []byte("1"))
		return nil
	})
	<-entered
	if err := s.Stalled(time.Now(), time.Minute); err != nil {
		t.Fatalf("in flight for less than the limit: %v", err)
	}
	if err := s.Stalled(time.Now().Add(2*time.Minute), time.Minute); err == nil || !strings.Contains(err.Error(), "commit") {
		t.Fatalf("in flight for longer than the limit: %v, want the commit named", err)
	}
	fail(nil)
	if err := await(t, "a", a); err != nil {
		t.Fatal(err)
	}
	if err := s.Stalled(time.Now().Add(time.Hour), time.Minute); err != nil {
		t.Fatalf("after the commit: %v", err)
	}
}

// A commit Badger refuses counts as mailbox_store_commits_total{result="error"}
// and adds no committed operations; the next one counts as ok.
func TestMetricsCountAFailedCommit(t *testing.T) {
	s, entered, fail := heldFirstCommit(t, Options{})
	ran := make(chan struct{}, 1)
	a := startOp(s, "a", ran, func(w *writeTx) error {
		w.set([]byte("zz-a"), []byte("1"))
		return nil
	})
	<-entered
	<-ran
	fail(errors.New("disk on fire"))
	if err := await(t, "a", a); err == nil {
		t.Fatal("the operation of a failed commit succeeded")
	}
	b := startOp(s, "b", ran, func(w *writeTx) error {
		w.set([]byte("zz-b"), []byte("1"))
		return nil
	})
	if err := await(t, "b", b); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	s.Metrics().WritePrometheus(&out)
	for _, want := range []string{
		`mailbox_store_commits_total{result="error"} 1`,
		`mailbox_store_commits_total{result="ok"} 1`,
		`mailbox_store_committed_operations_total 1`,
	} {
		if !strings.Contains(out.String(), want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, out.String())
		}
	}
}

// flushError tells Badger's refusals apart: a key or a transaction over
// its limits is too large (413); a key it reserves is not the caller's
// doing (unavailable, 503). Each refusal is Badger's own, from a real
// transaction.
func TestFlushErrorTellsTooLargeFromOtherRefusals(t *testing.T) {
	db, err := badger.Open(badger.DefaultOptions("").WithInMemory(true).WithLogger(nil).WithMemTableSize(1 << 20).WithValueThreshold(1 << 10))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	txn := db.NewTransaction(true)
	defer txn.Discard()
	refusal := func(key, val []byte) error {
		err := txn.Set(key, val)
		if err == nil {
			t.Fatalf("Badger took a %d-byte key", len(key))
		}
		return flushError("op", err)
	}
	tooBig := error(nil)
	for i := 0; tooBig == nil; i++ { // fill the transaction past its limit
		if err := txn.Set(fmt.Appendf(nil, "k%08d", i), make([]byte, 1000)); err != nil {
			tooBig = flushError("op", err)
		}
	}
	for _, c := range []struct {
		name string
		err  error
		want error
	}{
		{"transaction too big", tooBig, engine.ErrTooLarge},
		{"key too long", refusal(make([]byte, 70000), nil), engine.ErrTooLarge},
		{"key Badger reserves", refusal([]byte("!badger!x"), nil), engine.ErrUnavailable},
	} {
		if !errors.Is(c.err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, c.err, c.want)
		}
		if c.want == engine.ErrUnavailable && errors.Is(c.err, engine.ErrTooLarge) {
			t.Errorf("%s: %v is also too large", c.name, c.err)
		}
		if len(c.err.Error()) > 300 || strings.Contains(c.err.Error(), "\n") {
			t.Errorf("%s: message not cut: %d bytes", c.name, len(c.err.Error()))
		}
	}
}

// The free-space check asks statfs again before spaceCheckEvery has
// passed once the batches sent since wrote half the room above
// MinFreeBytes, and not before.
func TestSpaceGuardAsksAgainAfterABurstOfWrites(t *testing.T) {
	o := Options{Dir: t.TempDir()}
	var st syscall.Statfs_t
	if err := syscall.Statfs(o.Dir, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	o.MinFreeBytes = free / 2 // room: about free/2
	var g spaceGuard
	if err := g.check(o); err != nil {
		t.Fatal(err)
	}
	first := g.checked
	g.wrote(free / 16) // well under half the room
	if err := g.check(o); err != nil || !g.checked.Equal(first) {
		t.Fatalf("asked again after %d of %d bytes of room (%v)", free/16, free/2, err)
	}
	g.wrote(free / 4) // now over half of it
	if err := g.check(o); err != nil {
		t.Fatal(err)
	}
	if !g.checked.After(first) || g.written != 0 {
		t.Fatalf("did not ask again after %d of %d bytes of room", free/16+free/4, free/2)
	}
}

// What a sent batch writes, values in full, counts toward the next
// free-space check.
func TestSentBatchesCountTheirBytesForTheSpaceCheck(t *testing.T) {
	s, err := Open(Options{Dir: t.TempDir(), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	big := make([]byte, 200<<10)
	if err := s.update(context.Background(), "raw_set", func(w *writeTx) error {
		w.set([]byte("ztest-big"), big)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if s.space.written < int64(len(big)) {
		t.Fatalf("the space check counted %d bytes after a batch of %d", s.space.written, len(big))
	}
}

// The writer reuses its write sets: commits one at a time (the writer
// idle between them, so each batch in flight is recycled when it is
// reaped) and in bursts make no more than the three a pipeline holds (in
// flight, building, spare). With one spare slot, every idle commit
// dropped a set and the next batch grew a new one.
func TestTheWriterReusesItsWriteSets(t *testing.T) {
	s, err := Open(Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var made atomic.Int64
	s.testWriteSetMade = func() { made.Add(1) }
	for i := range 200 {
		if err := s.RawSet([]byte(fmt.Sprintf("zk%d", i)), []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	// Bursts that end: the pipeline goes idle 50 times.
	for burst := range 50 {
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 3 {
					if err := s.RawSet([]byte(fmt.Sprintf("zb%d-%d-%d", burst, g, i)), []byte("v")); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	if n := made.Load(); n > 3 {
		t.Fatalf("the writer made %d write sets for 200 commits alone and 50 bursts; want at most 3", n)
	}
}

// Once low, the free-space check stays low until a tenth more than
// MinFreeBytes is free: space hovering at the floor does not flip it (and
// its logged change) at every check (found by review).
func TestSpaceGuardLeavesTheLowStateAboveTheFloorOnly(t *testing.T) {
	o := Options{Dir: t.TempDir()}
	var st syscall.Statfs_t
	if err := syscall.Statfs(o.Dir, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	o.MinFreeBytes = free - free/50 // about 2 % above the floor
	var ok spaceGuard
	if err := ok.check(o); err != nil || ok.low {
		t.Fatalf("2%% above the floor, not low before: %v low=%v", err, ok.low)
	}
	low := spaceGuard{low: true}
	if err := low.check(o); err == nil || !low.low || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("2%% above the floor, low before: %v low=%v; want still low", err, low.low)
	}
	o.MinFreeBytes = free / 2
	if err := low.check(o); err != nil || low.low {
		t.Fatalf("far above the floor, low before: %v low=%v; want no longer low", err, low.low)
	}
}
