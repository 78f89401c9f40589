package engine_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// requeued is a dead letter an operator requeued while no agent slot was
// free: its first attempt failed permanently, and calls counts the
// executor's attempts.
type requeued struct {
	r        *rig
	fe       *fakeExecutor
	calls    *atomic.Int32
	dead     engine.SubmitResult
	requeued engine.Dispatch
}

func newRequeued(t *testing.T) requeued {
	t.Helper()
	calls := new(atomic.Int32)
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
	return requeued{r: r, fe: fe, calls: calls, dead: res, requeued: d}
}

// ran checks that the requeued dispatch settled after a second attempt.
func (q requeued) ran(t *testing.T) {
	t.Helper()
	eventually(t, "requeued dispatch settled", func() bool {
		return dispatchStatus(t, q.r.store, q.requeued.DispatchID).Terminal()
	})
	if n := q.calls.Load(); n != 2 {
		t.Fatalf("requeued dispatch %s was settled without running (executor calls %d, want 2); run %+v",
			q.requeued.DispatchID, n, execRun(t, q.r.store, q.dead.RunID))
	}
}

// An operator's requeue of a dead letter survives the next reconciliation
// of terminal dispatches (a sweep within the overlap window, or the
// recovery of a later start): the reopened run belongs to the new
// dispatch and runs. The reconciliation used to settle it again from the
// old dead letter, and the requeued dispatch was then acked without
// running (found by review).
func TestRequeueSurvivesTheSweepsReconciliation(t *testing.T) {
	q := newRequeued(t)
	q.r.mb.Sweep(context.Background()) // what the maintenance loop does every SweepInterval
	if run := execRun(t, q.r.store, q.dead.RunID); run.Status == engine.RunDone {
		t.Fatalf("the sweep settled the reopened run again: %+v", run)
	}
	q.fe.setCapacity(1)
	q.ran(t)
}

// The same through a restart: the recovery at Start scans the whole
// terminal index.
func TestRequeueSurvivesARestartsRecovery(t *testing.T) {
	q := newRequeued(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := q.r.mb.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	mb2 := liveMailbox(t, q.r.store, q.fe, engine.Config{}) // a new mailbox on the same store
	q.fe.setCapacity(1)
	if err := mb2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	q.ran(t)
}
