package hub_test

import (
	"context"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// The whole chain of an agent's shutdown, SDK to store: the SDK sends
// GOAWAY, gives its running run its grace, then gives it up with code
// shutdown; the run goes back to the queue without spending an attempt,
// and the agent that replaces it runs it (in a pod the agent stops first:
// every stop cost each long run an attempt; found by two reviews).
func TestAnAgentsShutdownSpendsNoAttemptOfItsRuns(t *testing.T) {
	st := newStack(t, hub.Config{})
	entered := make(chan struct{}, 1)
	serve := func(handler agent.HandlerFunc) (stop func()) {
		_, stop = st.serveSDK(t, agent.Config{MaxRuns: 1, Handler: handler, ShutdownGrace: 100 * time.Millisecond})
		return stop
	}
	stop := serve(func(ctx context.Context, run *agent.Run) agent.Result {
		entered <- struct{}{}
		<-ctx.Done() // a long run: the shutdown's grace runs out
		return agent.Cancelled()
	})
	eventually(t, "the first agent", func() bool { return st.hub.Capacity() == 1 })
	ctx := context.Background()
	res, err := st.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{text("x")}})
	if err != nil {
		t.Fatal(err)
	}
	<-entered
	stop()
	eventually(t, "the run back in the queue", func() bool {
		d, err := st.store.LoadDispatch(ctx, res.DispatchID)
		return err == nil && d.Status == engine.StatusQueued
	})
	if d, _ := st.store.LoadDispatch(ctx, res.DispatchID); d.AttemptCount != 0 {
		t.Fatalf("after the agent's shutdown the run spent %d attempts (%q); want none", d.AttemptCount, d.LastError)
	}
	serve(func(ctx context.Context, run *agent.Run) agent.Result { return agent.Done("ok") })
	eventually(t, "the run done by the next agent", func() bool {
		d, err := st.store.LoadDispatch(ctx, res.DispatchID)
		return err == nil && d.Status == engine.StatusAcked
	})
}
