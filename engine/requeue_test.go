package engine_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// An operator's requeue of a dead letter survives the next reconciliation
// of terminal dispatches (a sweep within the overlap window, or the
// recovery of a later start): the reopened run belongs to the new
// dispatch and runs. The reconciliation used to settle it again from the
// old dead letter, and the requeued dispatch was then acked without
// running (found by review).
func TestRequeueSurvivesTheSweepsReconciliation(t *testing.T) {
	var calls atomic.Int32
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if calls.Add(1) == 1 {
			return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "no such agent"}
		}
		return complete(ctx, req, sink)
	}
	fe := newFake(1, script)
	r := newRig(t, fe, engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-dl", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "dead letter", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
	fe.setCapacity(0) // no agent for a moment: the requeued dispatch waits
	d, err := r.mb.Requeue(ctx, res.DispatchID)
	if err != nil {
		t.Fatal(err)
	}
	if run := execRun(t, r.store, res.RunID); run.Status == engine.RunDone {
		t.Fatalf("requeue did not reopen the run: %+v", run)
	}
	r.mb.Sweep(ctx) // what the maintenance loop does every SweepInterval
	run := execRun(t, r.store, res.RunID)
	if run.Status == engine.RunDone {
		t.Fatalf("the sweep settled the reopened run again: %+v", run)
	}
	fe.setCapacity(1)
	eventually(t, "requeued dispatch settled", func() bool { return dispatchStatus(t, r.store, d.DispatchID).Terminal() })
	if n := calls.Load(); n != 2 {
		t.Fatalf("requeued dispatch %s was settled without running (executor calls %d, want 2); run %+v", d.DispatchID, n, execRun(t, r.store, res.RunID))
	}
}

// The same through a restart: the recovery at Start scans the whole
// terminal index.
func TestRequeueSurvivesARestartsRecovery(t *testing.T) {
	var calls atomic.Int32
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if calls.Add(1) == 1 {
			return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "no such agent"}
		}
		return complete(ctx, req, sink)
	}
	fe := newFake(1, script)
	r := newRig(t, fe, engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-dl", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "dead letter", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
	fe.setCapacity(0)
	d, err := r.mb.Requeue(ctx, res.DispatchID)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := r.mb.Stop(sctx); err != nil {
		t.Fatal(err)
	}
	// Restart: a new mailbox on the same store.
	mb2 := liveMailbox(t, r.store, fe, engine.Config{})
	fe.setCapacity(1)
	if err := mb2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "requeued dispatch settled", func() bool { return dispatchStatus(t, r.store, d.DispatchID).Terminal() })
	if n := calls.Load(); n != 2 {
		t.Fatalf("after restart the requeued dispatch %s was settled without running (executor calls %d, want 2); run %+v", d.DispatchID, n, execRun(t, r.store, res.RunID))
	}
}
