package engine_test

import (
	"context"
	"errors"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// An agent's checkpoint may not set a negative step or token count (found
// by review: steps -3 was stored); the refusal is a validation error
// (checkpoint_failed on the wire) and writes nothing.
func TestACheckpointWithANegativeCountIsRefused(t *testing.T) {
	errs := make(chan error, 4)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		neg, pos := int64(-3), int64(2)
		for _, p := range []engine.RunPatch{{Steps: &neg}, {InputTokens: &neg}, {OutputTokens: &neg}, {Steps: &pos}} {
			errs <- req.Checkpoint(ctx, engine.RunCheckpoint{Run: &p})
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("go")}})
	if err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{"steps", "input_tokens", "output_tokens"} {
		if err := <-errs; !errors.Is(err, engine.ErrValidation) {
			t.Fatalf("checkpoint %d with a negative %s: %v, want a validation error", i, name, err)
		}
	}
	if err := <-errs; err != nil {
		t.Fatalf("checkpoint with steps 2: %v", err)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	run, err := r.store.LoadRun(ctx, res.RunID)
	if err != nil || run.Steps != 2 || run.InputTokens != 0 || run.OutputTokens != 0 {
		t.Fatalf("run %+v %v, want steps 2 and no tokens", run, err)
	}
}
