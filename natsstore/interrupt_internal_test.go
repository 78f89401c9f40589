package natsstore

import (
	"context"
	"fmt"
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
	srv := natstest.Start(t)
	ctx := context.Background()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: "CUT", Prefix: "cut"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	enqueue := func(id string, at int64) {
		t.Helper()
		d := engine.Dispatch{DispatchID: id, ThreadID: "t1", RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: at, CreatedAt: at, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
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
	c, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 3000)
	if err != nil || c == nil || c.DispatchID != "new" || c.Epoch != 1 {
		t.Fatalf("claim: %+v %v, want new at epoch 1", c, err)
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
	d, err := s.LoadDispatch(ctx, "old12")
	if err != nil || d.LastError != engine.ReasonNewerEpoch {
		t.Fatalf("a stale dispatch a claim superseded: %+v %v, want the newer-epoch reason", d, err)
	}
}
