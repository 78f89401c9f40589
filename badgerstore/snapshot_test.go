package badgerstore_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The ready-index floor skips the deletion markers of claimed threads, yet
// a thread made ready below the floor is still found.
func TestReadyFloorNeverHidesWork(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	ready := func(now int64) []string {
		t.Helper()
		got, _, err := s.ReadyThreads(ctx, now, engine.ReadyEntry{}, 100)
		if err != nil {
			t.Fatal(err)
		}
		return readyIDs(got)
	}
	// 50 threads due at 1000..1049, all claimed: 50 markers.
	for i := range 50 {
		if _, err := s.Enqueue(ctx, queued(fmt.Sprintf("d%d", i), fmt.Sprintf("t%02d", i), int64(1000+i))); err != nil {
			t.Fatal(err)
		}
	}
	if got := ready(5000); len(got) != 50 {
		t.Fatalf("ready before claims = %d threads, want 50", len(got))
	}
	for i := range 50 {
		if d, err := s.Claim(ctx, fmt.Sprintf("t%02d", i), "c", 30*time.Second, 5000); err != nil || d == nil {
			t.Fatalf("claim t%02d: %v %v", i, d, err)
		}
	}
	if _, err := s.Enqueue(ctx, queued("late", "tlate", 2000)); err != nil {
		t.Fatal(err)
	}
	if got := ready(5000); !slices.Equal(got, []string{"tlate"}) {
		t.Fatalf("ready = %v, want [tlate]", got)
	}
	if f := s.ReadyFloor(); f != 2000 {
		t.Fatalf("floor = %d, want 2000 (the lowest live key)", f)
	}
	// Work made ready below the floor: an old dispatch, and a released
	// claim available at an earlier time.
	if _, err := s.Enqueue(ctx, queued("old", "told", 10)); err != nil {
		t.Fatal(err)
	}
	d, err := s.LoadDispatch(ctx, "d7")
	if err != nil || d == nil {
		t.Fatal(d, err)
	}
	if _, err := s.Release(ctx, "d7", d.ClaimToken, 500); err != nil {
		t.Fatal(err)
	}
	if got := ready(5000); !slices.Equal(got, []string{"told", "t07", "tlate"}) {
		t.Fatalf("ready = %v, want [told t07 tlate] (oldest due first)", got)
	}
	if f := s.ReadyFloor(); f > 10 {
		t.Fatalf("floor = %d above a live key due at 10", f)
	}
	verifyClean(t, s)
}

// Readers racing writers: a thread enqueued below the floor while scans run
// is never missed once its enqueue has returned.
// A failed commit drops the ready-index floor to the bottom (Badger may
// have applied part of it, ready keys included).
func TestReadyFloorDropsAfterAFailedCommit(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if _, err := s.Enqueue(ctx, queued("d1", "t1", 2000)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.ReadyThreads(ctx, 5000, engine.ReadyEntry{}, 10); err != nil {
		t.Fatal(err)
	}
	if f := s.ReadyFloor(); f != 2000 {
		t.Fatalf("floor = %d, want 2000", f)
	}
	release := make(chan error, 1)
	entered := make(chan struct{}, 1)
	s.HoldCommits(release, entered)
	done := make(chan error, 1)
	go func() { _, err := s.Enqueue(ctx, queued("d2", "t2", 3000)); done <- err }()
	<-entered
	release <- errors.New("injected commit failure")
	if err := <-done; err == nil {
		t.Fatal("enqueue committed, want the injected failure")
	}
	if f := s.ReadyFloor(); f != math.MinInt64 {
		t.Fatalf("floor = %d after a failed commit, want the bottom", f)
	}
}

func TestReadyFloorConcurrentInserts(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(stop); wg.Wait() }) // before the store closes
	wg.Go(func() {                               // scans keep raising the floor
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, _, err := s.ReadyThreads(ctx, 1<<40, engine.ReadyEntry{}, 10); err != nil {
				t.Error(err)
				return
			}
		}
	})
	for i := range 300 {
		// Alternately high and low due times; each claimed at once except
		// the low ones, which must be visible right after their enqueue.
		due := int64(1_000_000 + i)
		low := i%3 == 0
		if low {
			due = int64(i)
		}
		th := fmt.Sprintf("t%03d", i)
		if _, err := s.Enqueue(ctx, queued(fmt.Sprintf("d%03d", i), th, due)); err != nil {
			t.Fatal(err)
		}
		if low {
			got, _, err := s.ReadyThreads(ctx, 1<<40, engine.ReadyEntry{}, 1)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(readyIDs(got), []string{th}) {
				t.Fatalf("after enqueueing %s due at %d: ready = %v", th, due, got)
			}
		}
		if d, err := s.Claim(ctx, th, "c", 30*time.Second, 1<<40); err != nil || d == nil {
			t.Fatalf("claim %s: %v %v", th, d, err)
		}
	}
	var _ engine.Store = s
}

// Pipelined commits: a batch built on top of one in flight reads its
// writes; if that commit then fails, the batch runs again without them.
func TestPipelinedBatchRebuiltAfterFailedCommit(t *testing.T) {
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	release := make(chan error, 2)
	entered := make(chan struct{}, 4)
	s.HoldCommits(release, entered)
	k, k2 := []byte("zz-k"), []byte("zz-k2")

	aErr := make(chan error, 1)
	go func() { aErr <- s.RawSet(k, []byte("1")) }()
	<-entered // A is in flight
	ran := make(chan struct{}, 1)
	bErr := make(chan error, 1)
	go func() { bErr <- s.CopyKey(k, k2, ran) }()
	<-ran // B ran on top of A's writes (it read "1")
	release <- fmt.Errorf("injected commit failure")
	if err := <-aErr; err == nil {
		t.Fatal("A: want the injected commit failure")
	}
	<-entered // B, rebuilt, is being committed
	release <- nil
	if err := <-bErr; err != nil {
		t.Fatalf("B: %v", err)
	}
	if _, ok, err := s.RawGet(k); err != nil || ok {
		t.Fatalf("k after its failed commit: present=%v err=%v", ok, err)
	}
	v, ok, err := s.RawGet(k2)
	if err != nil || !ok || string(v) != "missing" {
		t.Fatalf("k2 = %q (present %v, err %v), want \"missing\": B kept a read of the failed batch", v, ok, err)
	}
}

// A caller's reads after its write returns see the write, while later
// batches are in flight (shared snapshots are published before answers).
func TestReadYourWritesUnderPipelining(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 100 {
				id := fmt.Sprintf("w%d-%d", w, i)
				if _, err := s.Enqueue(ctx, queued(id, fmt.Sprintf("t%d", w), 1)); err != nil {
					t.Error(err)
					return
				}
				d, err := s.LoadDispatch(ctx, id)
				if err != nil || d == nil {
					t.Errorf("LoadDispatch(%s) right after its enqueue: %v %v", id, d, err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// SubmitIdle: on an idle thread the interrupt, the submit and the claim are
// one commit; on a thread with queued or claimed work it writes nothing.
func TestSubmitIdle(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	cp := func(thread, msg string, count uint64) engine.Checkpoint {
		// The run of dispatch "f"+n is "run-f"+n (queued).
		run := &engine.RunRecord{RunID: "run-f" + msg[1:], ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
		return engine.Checkpoint{ThreadID: thread, ExpectedCount: count, CreatedAt: 1000, Run: run,
			Messages: []engine.Message{{ID: msg, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
	}
	batches0, _ := s.BatchStats()
	recs, d, err := s.SubmitIdle(ctx, cp("t1", "m1", 0), queued("f1", "t1", 1000), "me", 30*time.Second, "inst", 1000)
	if err != nil || d == nil {
		t.Fatalf("idle thread: %v %v", d, err)
	}
	if batches, _ := s.BatchStats(); batches != batches0+1 {
		t.Fatalf("%d commits, want 1", batches-batches0)
	}
	if d.Status != engine.StatusClaimed || d.ClaimedBy != "me" || d.Epoch != 1 || d.LeaseUntil != 31_000 || d.InstanceID != "inst" || d.RunStatus != engine.RunRunning || len(recs) != 1 || recs[0].Seq != 1 {
		t.Fatalf("claimed %+v, records %v", d, recs)
	}
	if run, err := s.LoadRun(ctx, d.RunID); err != nil || run == nil || run.Status != engine.RunRunning || run.SessionID != "inst" {
		t.Fatalf("run after SubmitIdle: %+v %v, want running with the instance id", run, err)
	}
	if ep, _ := s.CurrentEpoch(ctx, "t1"); ep != 1 {
		t.Fatalf("epoch %d, want 1 (the interrupt)", ep)
	}
	// Claimed work on the thread: declined, nothing written.
	if _, d2, err := s.SubmitIdle(ctx, cp("t1", "m2", 1), queued("f2", "t1", 1000), "me", 30*time.Second, "inst", 1000); err != nil || d2 != nil {
		t.Fatalf("thread with a claim: %v %v, want declined", d2, err)
	}
	// Queued work on the thread: declined, nothing written.
	if _, err := s.Enqueue(ctx, queued("q3", "t3", 1000)); err != nil {
		t.Fatal(err)
	}
	if _, d3, err := s.SubmitIdle(ctx, cp("t3", "m3", 0), queued("f3", "t3", 1000), "me", 30*time.Second, "inst", 1000); err != nil || d3 != nil {
		t.Fatalf("thread with queued work: %v %v, want declined", d3, err)
	}
	for _, id := range []string{"f2", "f3"} {
		if got, _ := s.LoadDispatch(ctx, id); got != nil {
			t.Fatalf("declined submit stored %s", id)
		}
	}
	for thread, want := range map[string]uint64{"t1": 1, "t3": 0} {
		if n, _ := s.MessageCount(ctx, thread); n != want {
			t.Fatalf("%s has %d messages, want %d", thread, n, want)
		}
		if ep, _ := s.CurrentEpoch(ctx, thread); ep != want {
			t.Fatalf("%s epoch %d, want %d", thread, ep, want)
		}
	}
	// A stale expected count fails like Submit: nothing written.
	if _, _, err := s.SubmitIdle(ctx, cp("t4", "m4", 5), queued("f4", "t4", 1000), "me", 30*time.Second, "inst", 1000); !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("stale count: %v, want a version conflict", err)
	}
	verifyClean(t, s)
}

// readyIDs are the threads of a ReadyThreads listing.
func readyIDs(es []engine.ReadyEntry) []string {
	ids := make([]string, len(es))
	for i, e := range es {
		ids[i] = e.ThreadID
	}
	return ids
}

// A listing that starts after an entry saw only the index after it: it
// must not raise the floor past the entries before it, or a listing from
// the start misses them.
func TestAListingAfterAnEntryKeepsTheFloor(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	for i, due := range []int64{1000, 2000, 3000} {
		if _, err := s.Enqueue(ctx, queued(fmt.Sprintf("d%d", i), fmt.Sprintf("t%d", i), due)); err != nil {
			t.Fatal(err)
		}
	}
	after := engine.ReadyEntry{ThreadID: "t0", Due: 1000}
	for range 3 {
		got, _, err := s.ReadyThreads(ctx, 5000, after, 10)
		if err != nil {
			t.Fatal(err)
		}
		if ids := readyIDs(got); !slices.Equal(ids, []string{"t1", "t2"}) {
			t.Fatalf("after t0: %v, want [t1 t2]", ids)
		}
	}
	got, _, err := s.ReadyThreads(ctx, 5000, engine.ReadyEntry{}, 10)
	if err != nil {
		t.Fatal(err)
	}
	if ids := readyIDs(got); !slices.Equal(ids, []string{"t0", "t1", "t2"}) {
		t.Fatalf("from the start after listings after t0: %v, want [t0 t1 t2]", ids)
	}
}
