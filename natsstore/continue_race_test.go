package natsstore_test

import (
	"context"
	"errors"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Two sidecars sharing a stream can both decide to give one run to a new
// dispatch (both continue the same waiting run: each checked, before the
// other committed, that no dispatch of it was pending). The commit
// checks again against what it reads: the second is refused as the
// engine's own check would have refused it, and writes nothing. Without
// the check both dispatches were queued for the run; the first to run
// finished it and the second was acked unrun (found by the crash
// harness's two-sidecar test).
func TestASecondDispatchForAPendingRunIsRefusedAtCommit(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	submit := func(s engine.Store, id string) error {
		run := engine.RunRecord{RunID: "run-w", ThreadID: "tw", AgentID: "a", Status: engine.RunCreated, DispatchID: id, CreatedAt: 1, UpdatedAt: 1}
		d := queued(id, "tw", 1000)
		d.RunID = run.RunID
		_, _, err := s.Submit(ctx, engine.Checkpoint{ThreadID: "tw", Run: &run, CreatedAt: 5}, d)
		return err
	}
	if err := submit(a, "d-first"); err != nil {
		t.Fatal(err)
	}
	if err := submit(b, "d-second"); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("a second dispatch for the run while the first is queued: %v, want a validation error", err)
	}
	if d, err := b.LoadDispatch(ctx, "d-second"); err != nil || d != nil {
		t.Fatalf("the refused dispatch: %+v, %v; want none", d, err)
	}
	r, err := a.LoadRun(ctx, "run-w")
	if err != nil || r == nil || r.DispatchID != "d-first" {
		t.Fatalf("the run: %+v, %v; want it still given to d-first", r, err)
	}
	// The first dispatch's own submit, repeated, is not refused.
	if err := submit(a, "d-first"); err != nil && !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("d-first again: %v", err)
	}
}
