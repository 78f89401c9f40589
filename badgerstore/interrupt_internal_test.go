package badgerstore

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// enqueueQueued enqueues n dispatches id<i> on thread, available at
// avail, from 8 goroutines (they share group commits).
func enqueueQueued(t *testing.T, s *Store, thread, prefix string, n int, avail int64) {
	t.Helper()
	inParallel(t, n, func(i int) error {
		d := engine.Dispatch{DispatchID: fmt.Sprintf("%s%05d", prefix, i), ThreadID: thread, RunID: fmt.Sprintf("r-%s%05d", prefix, i),
			Priority: engine.DefaultPriority, Status: engine.StatusQueued, AvailableAt: avail, CreatedAt: avail, MaxAttempts: 5}
		_, err := s.Enqueue(context.Background(), d)
		return err
	})
}

// inParallel calls do(i) for every i < n from 8 goroutines and fails the
// test on the first error.
func inParallel(t *testing.T, n int, do func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < n; i += 8 {
				if err := do(i); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// An interrupt of a thread with more queued dispatches than one commit
// holds (3 000–4 000 with their runs, 5 000–10 000 without, of the transaction's 2.4 MiB)
// supersedes them all: it was refused as too large (HTTP 413), and the
// thread could not be interrupted.
func TestAnInterruptSupersedesMoreThanOneCommitHolds(t *testing.T) {
	t.Run("chunks", func(t *testing.T) { interruptMany(t) })
	// A chunk too large for one commit (dispatches with long run records
	// can make it so) is halved until it fits.
	t.Run("a chunk halved", func(t *testing.T) {
		defer func(n int) { interruptChunk = n }(interruptChunk)
		interruptChunk = 1 << 20
		interruptMany(t)
	})
}

func interruptMany(t *testing.T) {
	s := openInMemory(t)
	ctx := context.Background()
	const n = 12000
	enqueueQueued(t, s, "t1", "d", n, 1000)
	r, err := s.Interrupt(ctx, "t1", 2000)
	if err != nil {
		t.Fatalf("interrupt of %d queued: %v", n, err)
	}
	if r.NewEpoch != 1 || r.SupersededN != n || len(r.Superseded) != n {
		t.Fatalf("interrupt = epoch %d, count %d, %d returned; want 1, %d", r.NewEpoch, r.SupersededN, len(r.Superseded), n)
	}
	counts, err := s.CountByStatus(ctx)
	if err != nil || counts.Get(engine.StatusSuperseded) != n || counts.Get(engine.StatusQueued) != 0 {
		t.Fatalf("counts %+v %v, want %d superseded and none queued", counts, err, n)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify: %v %v", rep.Problems, err)
	}
}

// A crash between an interrupt's commits leaves queued dispatches of the
// old epoch: none of them is ever claimed, and the thread's next claim
// supersedes them all, a chunk a commit, and claims what follows them.
func TestClaimsSupersedeWhatACutShortInterruptLeft(t *testing.T) {
	defer func(n, m int) { interruptChunk, staleChunk = n, m }(interruptChunk, staleChunk)
	interruptChunk, staleChunk = 4, 4
	s := openInMemory(t)
	ctx := context.Background()
	enqueueQueued(t, s, "t1", "old", 13, 1000)
	// The first commit only, as if the process died after it.
	res, _, more, err := s.interruptFirst(ctx, "t1", 2000, interruptChunk)
	if err != nil || !more || len(res.Superseded) != 4 || res.NewEpoch != 1 {
		t.Fatalf("first commit: %d superseded, more %v, epoch %d, %v; want 4, true, 1", len(res.Superseded), more, res.NewEpoch, err)
	}
	if n := queuedOld(t, s, "old%05d", 13); n != 9 {
		t.Fatalf("%d old dispatches queued after the first commit, want 9", n)
	}
	enqueueQueued(t, s, "t1", "new", 1, 3000)
	c, err := s.ClaimStart(ctx, "t1", "c", engine.DefaultLease, "i1", 3000)
	if err != nil || c == nil || c.DispatchID != "new00000" || c.Epoch != 1 || c.InstanceID != "i1" {
		t.Fatalf("claim: %+v %v, want new00000 at epoch 1, started", c, err)
	}
	if n := queuedOld(t, s, "old%05d", 13); n != 0 {
		t.Fatalf("%d old dispatches queued after the claim, want none", n)
	}
	d, err := s.LoadDispatch(ctx, "old00012")
	if err != nil || d.LastError != engine.ReasonNewerEpoch {
		t.Fatalf("a stale dispatch a claim superseded: %+v %v, want the newer-epoch reason", d, err)
	}
	// Only stale entries behind a finishing run: the completion claims
	// past them all and finds nothing.
	enqueueQueued(t, s, "t2", "two", 9, 1000)
	if _, _, _, err := s.interruptFirst(ctx, "t2", 2000, interruptChunk); err != nil {
		t.Fatal(err)
	}
	enqueueQueued(t, s, "t2", "run", 1, 3000)
	r, err := s.Claim(ctx, "t2", "c", engine.DefaultLease, 3000)
	if err != nil || r == nil || r.DispatchID != "run00000" {
		t.Fatalf("claim of t2: %+v %v", r, err)
	}
	if n := queuedOld(t, s, "two%05d", 9); n != 0 {
		t.Fatalf("%d stale dispatches of t2 queued after its claim, want none", n)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify: %v %v", rep.Problems, err)
	}
}

// A completion whose claim of the thread's next dispatch meets more stale
// entries than a chunk goes on past them in commits of their own.
func TestACompletionClaimsPastACutShortInterruptsLeftovers(t *testing.T) {
	defer func(n, m int) { interruptChunk, staleChunk = n, m }(interruptChunk, staleChunk)
	interruptChunk, staleChunk = 2, 3
	s := openInMemory(t)
	ctx := context.Background()
	enqueueQueued(t, s, "t1", "first", 1, 1000)
	c, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 1000)
	if err != nil || c == nil {
		t.Fatalf("claim: %+v %v", c, err)
	}
	enqueueQueued(t, s, "t1", "old", 11, 1100)
	if _, _, _, err := s.interruptFirst(ctx, "t1", 2000, interruptChunk); err != nil {
		t.Fatal(err)
	}
	// The claimed dispatch is of the old epoch too: its completion is
	// refused as stale. A dispatch of the new epoch claimed after the
	// interrupt finishes instead.
	if _, err := s.SupersedeClaimed(ctx, c.DispatchID, c.ClaimToken, engine.ReasonInterrupt, 2100); err != nil {
		t.Fatal(err)
	}
	enqueueQueued(t, s, "t1", "mid", 1, 900) // due before the stale ones: claimed first
	m, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 2200)
	if err != nil || m == nil || m.DispatchID != "mid00000" {
		t.Fatalf("claim of the new epoch's work: %+v %v", m, err)
	}
	enqueueQueued(t, s, "t1", "next", 1, 2300)
	next, err := s.CompleteAndClaimStart(ctx, m.DispatchID, m.ClaimToken, engine.RunResult{RunID: m.RunID, Status: engine.RunDone}, 2400, "c", engine.DefaultLease, "i2")
	if err != nil || next == nil || next.DispatchID != "next00000" {
		t.Fatalf("complete and claim: %+v %v, want next00000 past the stale entries", next, err)
	}
	if n := queuedOld(t, s, "old%05d", 11); n != 0 {
		t.Fatalf("%d stale dispatches queued, want none", n)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify: %v %v", rep.Problems, err)
	}
}

// A claim past more stale entries than one commit holds: a chunk a
// commit, so the claim is not refused as too large.
func TestAClaimPastMoreStaleEntriesThanOneCommitHolds(t *testing.T) {
	defer func(n int) { interruptChunk = n }(interruptChunk)
	interruptChunk = 1
	s := openInMemory(t)
	ctx := context.Background()
	const n = 12000
	enqueueQueued(t, s, "t1", "old", n, 1000)
	if _, _, _, err := s.interruptFirst(ctx, "t1", 2000, interruptChunk); err != nil {
		t.Fatal(err)
	}
	c, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 3000)
	if err != nil || c != nil {
		t.Fatalf("claim of a thread of %d stale entries: %+v %v, want none", n-1, c, err)
	}
	counts, err := s.CountByStatus(ctx)
	if err != nil || counts.Get(engine.StatusQueued) != 0 || counts.Get(engine.StatusSuperseded) != n {
		t.Fatalf("counts %+v %v, want all %d superseded", counts, err, n)
	}
}

// A thread left with only stale entries by an interrupt cut short does
// not hold up the threads behind it in the ready order: with one free
// slot, the dispatcher's claim of it supersedes them all and the next
// thread's run starts (found by review: it waited a sweep for every
// chunk, about 12 minutes for 1 500 entries).
func TestAThreadOfStaleEntriesDoesNotHoldUpOthers(t *testing.T) {
	ex := &oneSlotExec{changed: make(chan struct{}, 1)} // no slot yet
	s, mb := openMailbox(t, Options{InMemory: true}, ex)
	ctx := context.Background()
	enqueueQueued(t, s, "t1", "old", 2000, 1000)
	if _, _, _, err := s.interruptFirst(ctx, "t1", 2000, interruptChunk); err != nil {
		t.Fatal(err)
	}
	startMailbox(t, mb)
	res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t2", Messages: []engine.Message{userText("real work")}})
	if err != nil {
		t.Fatal(err)
	}
	ex.open.Store(true)
	ex.changed <- struct{}{} // one slot
	waitFor(t, "t2's run to finish behind t1's stale entries", func() bool {
		r, _ := s.LoadRun(ctx, res.RunID)
		return r != nil && r.Status == engine.RunDone
	})
	if n := queuedOld(t, s, "old%05d", 2000); n != 0 {
		t.Fatalf("%d stale entries still queued", n)
	}
}

// queuedOld counts the dispatches fmt.Sprintf(format, i), i < n, that
// are queued; each must be queued or superseded.
func queuedOld(t *testing.T, s *Store, format string, n int) int {
	t.Helper()
	q := 0
	for i := range n {
		id := fmt.Sprintf(format, i)
		d, err := s.LoadDispatch(context.Background(), id)
		if err != nil || d == nil {
			t.Fatalf("load %s: %v", id, err)
		}
		switch d.Status {
		case engine.StatusQueued:
			q++
		case engine.StatusSuperseded:
		default:
			t.Fatalf("%s is %s", id, d.Status)
		}
	}
	return q
}

// The user's case: background runs queued on one thread behind an agent
// that takes none, then an interrupt through the engine (POST
// /v1/threads/{id}/interrupt). Each queued run costs the commit its run
// record too: past 3 000–4 000 of them the interrupt was refused (413).
func TestAnInterruptOfThousandsOfQueuedRunsThroughTheEngine(t *testing.T) {
	ex := &oneSlotExec{changed: make(chan struct{}, 1)} // no slot: all stay queued
	s, mb := openMailbox(t, Options{InMemory: true}, ex)
	ctx := context.Background()
	const n = 4000
	inParallel(t, n, func(i int) error {
		_, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userText(fmt.Sprint("queued ", i))}})
		return err
	})
	res, err := mb.Interrupt(ctx, "t1")
	if err != nil || res.SupersededN != n || res.NewEpoch != 1 {
		t.Fatalf("interrupt = %d superseded, epoch %d, %v; want %d, 1, nil", res.SupersededN, res.NewEpoch, err, n)
	}
	for _, d := range []engine.Dispatch{res.Superseded[0], res.Superseded[n-1]} {
		r, err := s.LoadRun(ctx, d.RunID)
		if err != nil || r == nil || r.Status != engine.RunDone {
			t.Fatalf("run %s of a superseded dispatch: %+v %v, want it settled", d.RunID, r, err)
		}
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify: %v %v", rep.Problems, err)
	}
}

// Work enqueued between an interrupt's commits carries the new epoch: the
// later commits leave it queued (they take only the older epoch's).
func TestAnInterruptsLaterCommitsLeaveWorkQueuedAfterItsFirst(t *testing.T) {
	defer func(n int) { interruptChunk = n }(interruptChunk)
	interruptChunk = 3
	s := openInMemory(t)
	ctx := context.Background()
	enqueueQueued(t, s, "t1", "old", 10, 1000)
	res, after, more, err := s.interruptFirst(ctx, "t1", 2000, interruptChunk)
	if err != nil || !more {
		t.Fatalf("first commit: more %v, %v", more, err)
	}
	enqueueQueued(t, s, "t1", "new", 2, 500)   // before the stale ones in claim order
	enqueueQueued(t, s, "t1", "late", 2, 2500) // after them
	res, err = s.supersedeRest(ctx, "t1", res, after, interruptChunk, 2600)
	if err != nil || res.SupersededN != 10 {
		t.Fatalf("the later commits: %d superseded, %v; want 10", res.SupersededN, err)
	}
	if n := queuedOld(t, s, "old%05d", 10); n != 0 {
		t.Fatalf("%d old dispatches queued", n)
	}
	for _, id := range []string{"new00000", "new00001", "late00000", "late00001"} {
		if d, err := s.LoadDispatch(ctx, id); err != nil || d.Status != engine.StatusQueued || d.Epoch != 1 {
			t.Fatalf("%s enqueued after the first commit: %+v %v, want queued at epoch 1", id, d, err)
		}
	}
}
