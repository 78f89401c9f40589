package hub_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// Agents of different ids, one of them serving two, and a backlog for
// each (SDK agents, runs of random length): every run finishes, each
// thread held for a full agent claimed again as a slot of its agent frees,
// well within the hold's one-minute bound (a review's stress test of the
// busy holds).
func TestABacklogForAgentsOfDifferentIDsAllRuns(t *testing.T) {
	st := newStack(t, hub.Config{AgentWait: time.Minute})
	handler := func(ctx context.Context, run *agent.Run) agent.Result {
		select {
		case <-time.After(time.Duration(rand.IntN(40)) * time.Millisecond):
		case <-ctx.Done():
			return agent.Cancelled()
		}
		return agent.Done("ok")
	}
	start := func(ids []string, max int) {
		st.serveSDK(t, agent.Config{AgentIDs: ids, MaxRuns: max, Handler: agent.HandlerFunc(handler), ShutdownGrace: time.Second})
	}
	start([]string{"planner"}, 1)
	start([]string{"coder"}, 2)
	start([]string{"planner", "coder"}, 1)
	eventually(t, "capacity", func() bool { return st.hub.Capacity() == 4 })
	ctx := context.Background()
	var ids []string
	for i := range 60 {
		agentID := "planner"
		if i%3 == 0 {
			agentID = "coder"
		}
		res, err := st.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprint("t", i%25), AgentID: agentID, Messages: []engine.Message{text("x")}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.DispatchID)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, id := range ids {
		for {
			d, err := st.store.LoadDispatch(ctx, id)
			if err == nil && d.Status == engine.StatusAcked {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("dispatch %s still %v after 30 s", id, d.Status)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}
