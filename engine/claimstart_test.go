package engine_test

import (
	"context"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A queued dispatch whose run is already done (an earlier attempt finished
// it and its ack was lost, lessons.md B5) is acked without reaching the
// agent, and — claimed through StartClaimer — is not recorded as started:
// its runtime projection and the run's session stay as they were.
func TestDispatchOfADoneRunIsAckedUnstarted(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	ctx := context.Background()
	run := engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunDone, SessionID: "earlier",
		Request: &engine.RunRequestSnapshot{}, CreatedAt: 1, UpdatedAt: 1}
	if err := r.store.CreateRun(ctx, run); err != nil {
		t.Fatal(err)
	}
	if _, err := r.store.Enqueue(ctx, engine.Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Priority: engine.DefaultPriority, MaxAttempts: 3, CreatedAt: 1, AvailableAt: 1}); err != nil {
		t.Fatal(err)
	}
	r.start(t)
	eventually(t, "d1 acked", func() bool { return dispatchStatus(t, r.store, "d1") == engine.StatusAcked })
	if runs, _, _ := r.exec.stats(); runs != 0 {
		t.Fatalf("the agent ran %d times, want 0", runs)
	}
	d, _ := r.store.LoadDispatch(ctx, "d1")
	if d.InstanceID != "" || d.RunStatus != "" {
		t.Fatalf("acked %+v: recorded as started", d)
	}
	if got, _ := r.store.LoadRun(ctx, "r1"); got.Status != engine.RunDone || got.SessionID != "earlier" {
		t.Fatalf("run %+v changed", got)
	}
}
