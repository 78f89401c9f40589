package engine_test

import (
	"context"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A cancel of an attempt whose claim an interrupt has just made stale —
// the interrupted attempt still stopping, its dispatch still claimed —
// answers cancelled:true (engine.md item 31: the executor has the run),
// and the store supersedes the stale claim in the cancel's own commit and
// settles the run as cancelled: the dispatch ends superseded, not
// cancelled, and never runs again. (The crash harness counted this as an
// UNJUSTIFIED superseded, "lost 1", in about one NATS run in 40: there a
// store commit takes a few ms, so the cancel wins the thread lock over the
// attempt's own settlement more often than on Badger.)
func TestCancelOfAnInterruptedAttemptStillStopping(t *testing.T) {
	started := make(chan struct{}, 2)
	gate := make(chan struct{})
	exec := newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		started <- struct{}{}
		<-ctx.Done()
		<-gate // the agent takes a moment to stop
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	})
	r := newRig(t, exec, engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	if _, err := r.mb.Interrupt(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	ok, err := r.mb.Cancel(ctx, res.DispatchID)
	close(gate)
	if err != nil || !ok {
		t.Fatalf("cancel of the interrupted attempt still stopping: %v, %v", ok, err)
	}
	if got := dispatchStatus(t, r.store, res.DispatchID); got != engine.StatusSuperseded {
		t.Fatalf("dispatch %s, want superseded", got)
	}
	run, err := r.store.LoadRun(ctx, res.RunID)
	if err != nil || run == nil || run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
		t.Fatalf("run %+v (%v): want done, cancelled", run, err)
	}
	eventually(t, "the attempt ended", func() bool { return r.mb.InFlight() == 0 })
	if n := len(exec.execRuns()); n != 1 {
		t.Fatalf("the superseded dispatch ran %d times", n)
	}
}
