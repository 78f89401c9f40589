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
	s := startStopping(t, 1, engine.Config{})
	ctx := context.Background()
	if _, err := s.mb.Interrupt(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	ok, err := s.mb.Cancel(ctx, s.res.DispatchID)
	s.release()
	if err != nil || !ok {
		t.Fatalf("cancel of the interrupted attempt still stopping: %v, %v", ok, err)
	}
	if got := dispatchStatus(t, s.store, s.res.DispatchID); got != engine.StatusSuperseded {
		t.Fatalf("dispatch %s, want superseded", got)
	}
	run, err := s.store.LoadRun(ctx, s.res.RunID)
	if err != nil || run == nil || run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
		t.Fatalf("run %+v (%v): want done, cancelled", run, err)
	}
	eventually(t, "the attempt ended", func() bool { return s.mb.InFlight() == 0 })
	if n := len(s.exec.execRuns()); n != 1 {
		t.Fatalf("the superseded dispatch ran %d times", n)
	}
}
