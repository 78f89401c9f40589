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
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < n; i += 8 {
				d := engine.Dispatch{DispatchID: fmt.Sprintf("%s%05d", prefix, i), ThreadID: thread, RunID: fmt.Sprintf("r-%s%05d", prefix, i),
					Priority: engine.DefaultPriority, Status: engine.StatusQueued, AvailableAt: avail, CreatedAt: avail, MaxAttempts: 5}
				if _, err := s.Enqueue(context.Background(), d); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("enqueue: %v", err)
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
// old epoch: none of them is ever claimed, and the thread's claims
// supersede them a chunk at a time (a claim that superseded them all in
// one commit would be refused as too large for a long enough queue).
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
	queuedOld := func() int {
		t.Helper()
		n := 0
		for i := range 13 {
			d, err := s.LoadDispatch(ctx, fmt.Sprintf("old%05d", i))
			if err != nil || d == nil {
				t.Fatalf("load old%05d: %v", i, err)
			}
			if d.Status == engine.StatusQueued {
				n++
			} else if d.Status != engine.StatusSuperseded {
				t.Fatalf("old%05d is %s", i, d.Status)
			}
		}
		return n
	}
	if n := queuedOld(); n != 9 {
		t.Fatalf("%d old dispatches queued after the first commit, want 9", n)
	}
	enqueueQueued(t, s, "t1", "new", 1, 3000)
	c, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 3000)
	if err != nil || c == nil || c.DispatchID != "new00000" || c.Epoch != 1 {
		t.Fatalf("claim: %+v %v, want new00000 at epoch 1", c, err)
	}
	if n := queuedOld(); n != 5 {
		t.Fatalf("%d old dispatches queued after one claim, want 5 (a chunk of 4 superseded)", n)
	}
	if err := s.Ack(ctx, c.DispatchID, c.ClaimToken, 3100); err != nil {
		t.Fatal(err)
	}
	for want := 1; want >= 0; want-- {
		c, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 3200)
		if err != nil || c != nil {
			t.Fatalf("claim of a thread with only stale work: %+v %v, want none", c, err)
		}
		if n := queuedOld(); n != want {
			t.Fatalf("%d old dispatches queued, want %d", n, want)
		}
	}
	d, err := s.LoadDispatch(ctx, "old00012")
	if err != nil || d.LastError != engine.ReasonNewerEpoch {
		t.Fatalf("a stale dispatch a claim superseded: %+v %v, want the newer-epoch reason", d, err)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify: %v %v", rep.Problems, err)
	}
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
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < n; i += 8 {
				if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userText(fmt.Sprint("queued ", i))}}); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("submit: %v", err)
	}
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
