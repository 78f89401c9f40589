package engine_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A cancel settles the attempt's claim before the agent has stopped (the
// cancel is durable when it is answered). A foreground submit right after
// finds the thread released in the store, but the cancelled attempt still
// executes here: the new run must not start beside it. While the agent
// does not stop, the submit fails with the active-run conflict after
// CancelWait and nothing runs; once it has stopped, the next submit runs.
// (Found by the crash harness's review: the fast path started a second
// run of the thread, the slow path never looked.)
func TestForegroundAfterCancelWaitsForTheStoppingAttempt(t *testing.T) {
	started := make(chan struct{}, 4)
	gate := make(chan struct{})
	var n atomic.Int32
	exec := newFake(2, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		started <- struct{}{}
		if n.Add(1) == 1 {
			<-ctx.Done()
			<-gate // the agent takes its time to stop
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
		}
		return complete(ctx, req, sink)
	})
	r := newRig(t, exec, engine.Config{CancelWait: 100 * time.Millisecond})
	var gateOnce sync.Once
	open := func() { gateOnce.Do(func() { close(gate) }) }
	t.Cleanup(open) // before the rig stops, should the test fail holding it
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	if ok, err := r.mb.Cancel(ctx, res.DispatchID); !ok || err != nil {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	if d := execLoad(t, r.store, res.DispatchID); !d.Status.Terminal() {
		t.Fatalf("cancelled dispatch %+v, want settled before the agent stopped", d)
	}
	_, _, err = r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("b")}})
	if !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("foreground submit beside the stopping attempt: %v, want the active-run conflict", err)
	}
	if runs, _, overlap := exec.stats(); runs != 1 || overlap {
		t.Fatalf("the agent ran %d times (overlap %v), want the cancelled attempt alone", runs, overlap)
	}
	open()
	fg, log, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("c")}})
	if err != nil || fg.Status != engine.SubmitRunning {
		t.Fatalf("foreground submit after the attempt stopped: %+v %v", fg, err)
	}
	execReadAll(t, log)
	if runs, _, overlap := exec.stats(); runs != 2 || overlap {
		t.Fatalf("the agent ran %d times (overlap %v), want 2 one after the other", runs, overlap)
	}
}
