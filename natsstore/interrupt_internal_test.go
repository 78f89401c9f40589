package natsstore

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// A crash between an interrupt's batches leaves queued dispatches of the
// old epoch: none of them is ever claimed, and the thread's claims
// supersede them a chunk at a time (a claim that superseded them all in
// one batch would be refused as too large for a long enough queue).
func TestClaimsSupersedeWhatACutShortInterruptLeft(t *testing.T) {
	defer func(n, m int) { interruptChunk, staleChunk = n, m }(interruptChunk, staleChunk)
	interruptChunk, staleChunk = 4, 4
	s, enqueue := openThreadT1(t, "CUT")
	ctx := context.Background()
	for i := range 13 {
		enqueue(fmt.Sprintf("old%02d", i), 1000+int64(i))
	}
	// The first batch only, as if the process died after it.
	res, more, err := s.interruptFirst(ctx, "t1", 2000, interruptChunk)
	if err != nil || !more || len(res.Superseded) != 4 || res.NewEpoch != 1 {
		t.Fatalf("first batch: %d superseded, more %v, epoch %d, %v; want 4, true, 1", len(res.Superseded), more, res.NewEpoch, err)
	}
	queuedOld := func() int {
		t.Helper()
		n := 0
		for i := range 13 {
			d, err := s.LoadDispatch(ctx, fmt.Sprintf("old%02d", i))
			if err != nil || d == nil {
				t.Fatalf("load old%02d: %v", i, err)
			}
			if d.Status == engine.StatusQueued {
				n++
			} else if d.Status != engine.StatusSuperseded {
				t.Fatalf("old%02d is %s", i, d.Status)
			}
		}
		return n
	}
	if n := queuedOld(); n != 9 {
		t.Fatalf("%d old dispatches queued after the first batch, want 9", n)
	}
	enqueue("new", 3000)
	c, err := s.ClaimStart(ctx, "t1", "c", engine.DefaultLease, "i1", 3000)
	if err != nil || c == nil || c.DispatchID != "new" || c.Epoch != 1 || c.InstanceID != "i1" {
		t.Fatalf("claim: %+v %v, want new at epoch 1, started", c, err)
	}
	if n := queuedOld(); n != 0 {
		t.Fatalf("%d old dispatches queued after the claim, want none (superseded a chunk a batch)", n)
	}
	d, err := s.LoadDispatch(ctx, "old12")
	if err != nil || d.LastError != engine.ReasonNewerEpoch {
		t.Fatalf("a stale dispatch a claim superseded: %+v %v, want the newer-epoch reason", d, err)
	}
	// A completion whose claim of the next meets stale entries goes on
	// past them in batches of its own.
	for i := range 9 {
		enqueue(fmt.Sprintf("two%02d", i), 3100)
	}
	if _, _, err := s.interruptFirst(ctx, "t1", 3200, interruptChunk); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SupersedeClaimed(ctx, c.DispatchID, c.ClaimToken, engine.ReasonInterrupt, 3300); err != nil {
		t.Fatal(err)
	}
	enqueue("mid", 900) // due before the stale ones: claimed first
	m, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 3400)
	if err != nil || m == nil || m.DispatchID != "mid" {
		t.Fatalf("claim of the new epoch's work: %+v %v", m, err)
	}
	enqueue("next", 3500)
	next, err := s.CompleteAndClaimStart(ctx, m.DispatchID, m.ClaimToken, engine.RunResult{RunID: m.RunID, Status: engine.RunDone}, 3600, "c", engine.DefaultLease, "i2")
	if err != nil || next == nil || next.DispatchID != "next" {
		t.Fatalf("complete and claim: %+v %v, want next past the stale entries", next, err)
	}
	for i := range 9 {
		if d, err := s.LoadDispatch(ctx, fmt.Sprintf("two%02d", i)); err != nil || d.Status != engine.StatusSuperseded {
			t.Fatalf("two%02d: %+v %v, want superseded", i, d, err)
		}
	}
}

// Work enqueued between an interrupt's batches carries the new epoch: the
// later batches leave it queued (they take only the older epoch's).
func TestAnInterruptsLaterBatchesLeaveWorkQueuedAfterItsFirst(t *testing.T) {
	defer func(n int) { interruptChunk = n }(interruptChunk)
	interruptChunk = 3
	s, enqueue := openThreadT1(t, "LATER")
	ctx := context.Background()
	for i := range 10 {
		enqueue(fmt.Sprintf("old%02d", i), 1000+int64(i))
	}
	res, more, err := s.interruptFirst(ctx, "t1", 2000, interruptChunk)
	if err != nil || !more {
		t.Fatalf("first batch: more %v, %v", more, err)
	}
	for _, id := range []string{"new0", "new1"} {
		enqueue(id, 500)
	}
	res, err = s.supersedeRest(ctx, "t1", res, interruptChunk, 2600)
	if err != nil || res.SupersededN != 10 {
		t.Fatalf("the later batches: %d superseded, %v; want 10", res.SupersededN, err)
	}
	for _, id := range []string{"new0", "new1"} {
		if d, err := s.LoadDispatch(ctx, id); err != nil || d.Status != engine.StatusQueued || d.Epoch != 1 {
			t.Fatalf("%s enqueued after the first batch: %+v %v, want queued at epoch 1", id, d, err)
		}
	}
}

// openThreadT1 opens a store on a fresh server (stream name stream) and
// returns it with a function that enqueues dispatch id on thread t1,
// created and available at at.
func openThreadT1(t *testing.T, stream string) (*Store, func(id string, at int64)) {
	t.Helper()
	srv := natstest.Start(t)
	ctx := context.Background()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: stream, Prefix: strings.ToLower(stream)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, func(id string, at int64) {
		t.Helper()
		d := engine.Dispatch{DispatchID: id, ThreadID: "t1", RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: at, CreatedAt: at, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
}
