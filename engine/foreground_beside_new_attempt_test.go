package engine_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// afterInterrupt runs hook once, right after the first Interrupt of the
// store committed. It embeds the engine.Store interface: the mailbox
// sees no IdleSubmitter, so a foreground submit takes the slow path.
type afterInterrupt struct {
	engine.Store
	once atomic.Bool
	hook func()
}

func (a *afterInterrupt) Interrupt(ctx context.Context, thread string, now int64) (engine.InterruptResult, error) {
	res, err := a.Store.Interrupt(ctx, thread, now)
	if err == nil && a.once.CompareAndSwap(false, true) {
		a.hook()
	}
	return res, err
}

// A background run submitted after a foreground submit's interrupt
// committed is of the new epoch: nothing superseded or cancelled it. If
// it is claimed and executing here before the foreground submit looks for
// an attempt still stopping, that look must not cancel it (it used to:
// the run ended done/cancelled although nobody cancelled it, or, had its
// agent failed, was retried after the foreground run). The foreground
// submit is queued at the head of the thread and runs after it (it used
// to answer the active-run conflict, with its message already logged).
func TestForegroundSubmitDoesNotCancelARunSubmittedAfterItsInterrupt(t *testing.T) {
	started := make(chan struct{}, 1)
	exec := newFake(2, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		started <- struct{}{}
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	})
	a := &afterInterrupt{}
	r := newRigWith(t, exec, engine.Config{CancelWait: 200 * time.Millisecond}, func(s *badgerstore.Store) engine.Store { a.Store = s; return a })
	r.start(t)
	ctx := context.Background()
	var bg engine.SubmitResult
	a.hook = func() {
		var err error
		if bg, err = r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("bg")}}); err != nil {
			t.Error(err)
			return
		}
		<-started
	}
	fg, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("fg")}})
	if bg.DispatchID == "" {
		t.Fatal("the background run was not submitted")
	}
	if st := dispatchStatus(t, r.store, bg.DispatchID); st != engine.StatusClaimed {
		run, _ := r.store.LoadRun(ctx, bg.RunID)
		t.Fatalf("the background run submitted after the interrupt: dispatch %s, run %+v; want it still executing", st, run)
	}
	if err != nil || fg.Status != engine.SubmitQueued || events == nil {
		t.Fatalf("foreground submit beside the executing run: %+v %v, want queued behind it", fg, err)
	}
	if ok, err := r.mb.Cancel(ctx, bg.DispatchID); !ok || err != nil {
		t.Fatalf("cancel of the background run: %v %v", ok, err)
	}
	// The foreground run starts once the thread is free, then stops at
	// its own cancel.
	eventually(t, "the foreground run started", func() bool { return dispatchStatus(t, r.store, fg.DispatchID) == engine.StatusClaimed })
	<-started
	if ok, err := r.mb.Cancel(ctx, fg.DispatchID); !ok || err != nil {
		t.Fatalf("cancel of the foreground run: %v %v", ok, err)
	}
	eventually(t, "both runs stopped", func() bool { return r.mb.InFlight() == 0 })
	if last := waitClosed(t, events); last != "run_finish" {
		t.Fatalf("the foreground stream ended with %q", last)
	}
}
