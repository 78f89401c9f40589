package hub_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// An SDK agent, the real hub, engine and store: a checkpoint whose
// message id is already in the thread log is refused with the reason
// already_exists, one that carries an id twice with validation, neither
// retryable, and nothing of either is written; the run goes on and
// completes.
func TestACheckpointOfAMessageAlreadyLoggedSaysSo(t *testing.T) {
	st := newStack(t, hub.Config{})
	second, third := make(chan error, 1), make(chan error, 1)
	handler := func(ctx context.Context, run *agent.Run) agent.Result {
		first := agent.Checkpoint{Messages: []agent.Message{{ID: "reply-1", Role: "assistant", Content: []byte(`"first"`)}}}
		if err := run.Checkpoint(ctx, first); err != nil {
			return agent.Transient("checkpoint_failed", err.Error())
		}
		again := agent.Checkpoint{Messages: []agent.Message{
			{ID: "reply-2", Role: "assistant", Content: []byte(`"not logged"`)},
			{ID: "reply-1", Role: "assistant", Content: []byte(`"again"`)},
		}}
		second <- run.Checkpoint(ctx, again)
		twice := agent.Checkpoint{Messages: []agent.Message{
			{ID: "reply-3", Role: "assistant", Content: []byte(`"a"`)},
			{ID: "reply-3", Role: "assistant", Content: []byte(`"b"`)},
		}}
		third <- run.Checkpoint(ctx, twice)
		return agent.Done("first")
	}
	st.serveSDK(t, agent.Config{MaxRuns: 1, Handler: agent.HandlerFunc(handler), ShutdownGrace: time.Second})
	ctx := context.Background()
	eventually(t, "SDK agent connected", func() bool { return st.hub.Capacity() == 1 })

	res, err := st.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "dup", Messages: []engine.Message{text("hi")}})
	if err != nil {
		t.Fatal(err)
	}
	var ce *agent.CheckpointError
	select {
	case err := <-second:
		if !errors.As(err, &ce) || ce.Code != ipc.CodeCheckpointFailed || ce.Reason != ipc.ReasonAlreadyExists || ce.Retryable() {
			t.Fatalf("second checkpoint = %v, want a CheckpointError with reason already_exists, not retryable", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the run never made its second checkpoint")
	}
	// Two messages of one checkpoint with one id: a checkpoint to mend,
	// not one the log holds already (found by review: it said
	// already_exists, and an agent would have taken it as stored).
	select {
	case err := <-third:
		if !errors.As(err, &ce) || ce.Reason != "validation" || ce.Retryable() {
			t.Fatalf("third checkpoint = %v, want a CheckpointError with reason validation, not retryable", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the run never made its third checkpoint")
	}
	waitDispatch(t, st.store, res.DispatchID, engine.StatusAcked)
	msgs, err := st.store.LoadMessages(ctx, "dup")
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || msgs[1].Message.ID != "reply-1" || string(msgs[1].Message.Content) != `"first"` {
		t.Fatalf("thread log %+v, want the user message and the first reply only", msgs)
	}
}
