package badgerstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// ClaimStart claims and records the start in one commit; a dispatch whose
// run is already done is claimed only; CompleteAndClaimStart starts the
// thread's next dispatch in the completing commit.
func TestClaimStart(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	submit := func(id, thread string, status engine.RunStatus) {
		t.Helper()
		run := &engine.RunRecord{RunID: "run-" + id, ThreadID: thread, AgentID: "a", Status: status, CreatedAt: 1, UpdatedAt: 1, SessionID: "old"}
		n, _ := s.MessageCount(ctx, thread)
		c := engine.Checkpoint{ThreadID: thread, ExpectedCount: n, CreatedAt: 1000, Run: run,
			Messages: []engine.Message{{ID: "m-" + id, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
		if _, _, err := s.Submit(ctx, c, queued(id, thread, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	submit("a1", "t1", engine.RunCreated)
	submit("a2", "t1", engine.RunCreated)
	submit("b1", "t2", engine.RunDone)

	batches0, _ := s.BatchStats()
	d, err := s.ClaimStart(ctx, "t1", "me", 30*time.Second, "i1", 2000)
	if err != nil || d == nil || d.DispatchID != "a1" {
		t.Fatalf("ClaimStart = %+v, %v", d, err)
	}
	if batches, _ := s.BatchStats(); batches != batches0+1 {
		t.Fatalf("%d commits, want 1", batches-batches0)
	}
	if d.Status != engine.StatusClaimed || d.InstanceID != "i1" || d.RunStatus != engine.RunRunning || d.LeaseUntil != 32_000 {
		t.Fatalf("claimed %+v, want claimed and started by i1", d)
	}
	if got, _ := s.LoadDispatch(ctx, "a1"); got == nil || got.InstanceID != "i1" || got.RunStatus != engine.RunRunning || got.ClaimToken != d.ClaimToken {
		t.Fatalf("stored %+v", got)
	}
	if run, _ := s.LoadRun(ctx, "run-a1"); run == nil || run.Status != engine.RunRunning || run.SessionID != "i1" || run.DispatchID != "a1" || run.StartedAt != 2 {
		t.Fatalf("run after ClaimStart: %+v", run)
	}
	if th, _ := s.LoadThread(ctx, "t1"); th == nil || th.ActiveRunID != "run-a1" {
		t.Fatalf("thread after ClaimStart: %+v", th)
	}

	// The run of b1 is done (its attempt finished, the ack was lost):
	// claimed, not started, the run left alone.
	b, err := s.ClaimStart(ctx, "t2", "me", 30*time.Second, "i2", 2000)
	if err != nil || b == nil || b.Status != engine.StatusClaimed || b.InstanceID != "" || b.RunStatus != "" {
		t.Fatalf("ClaimStart of a done run = %+v, %v; want claimed only", b, err)
	}
	if run, _ := s.LoadRun(ctx, "run-b1"); run == nil || run.Status != engine.RunDone || run.SessionID != "old" {
		t.Fatalf("done run changed: %+v", run)
	}
	if err := s.Ack(ctx, "b1", b.ClaimToken, 2100); err != nil {
		t.Fatal(err)
	}

	// Completing a1 starts a2 in the same commit.
	res := engine.RunResult{RunID: "run-a1", InstanceID: "i1", Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	next, err := s.CompleteAndClaimStart(ctx, "a1", d.ClaimToken, res, 3000, "me", 30*time.Second, "i3")
	if err != nil || next == nil || next.DispatchID != "a2" || next.InstanceID != "i3" || next.RunStatus != engine.RunRunning {
		t.Fatalf("CompleteAndClaimStart = %+v, %v", next, err)
	}
	if run, _ := s.LoadRun(ctx, "run-a2"); run == nil || run.Status != engine.RunRunning || run.SessionID != "i3" {
		t.Fatalf("next run: %+v", run)
	}
	if run, _ := s.LoadRun(ctx, "run-a1"); run == nil || run.Status != engine.RunDone {
		t.Fatalf("completed run: %+v", run)
	}
	// Nothing left to claim; a bad instance id is refused.
	if d, err := s.ClaimStart(ctx, "t2", "me", 30*time.Second, "i4", 4000); err != nil || d != nil {
		t.Fatalf("empty thread: %+v, %v", d, err)
	}
	if _, err := s.ClaimStart(ctx, "t1", "me", 30*time.Second, " ", 4000); err == nil {
		t.Fatal("a blank instance id was accepted")
	}
	verifyClean(t, s)
}
