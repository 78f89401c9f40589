package hub_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// The Go SDK against the real hub and engine: events, a checkpoint, a
// live message, a suspended tool call resumed by a decision, a cancel,
// and a SUBMIT that wakes another thread.
func TestSDKAgentThroughEngine(t *testing.T) {
	st := newStack(t, hub.Config{})
	var sdk *agent.Client
	handler := func(ctx context.Context, run *agent.Run) agent.Result {
		text, _ := run.Request.Messages[0].Text()
		run.Emit(map[string]any{"type": "run_start", "run_id": run.RunID})
		switch text {
		case "live":
			live := run.Messages()
			select {
			case batch := <-live:
				got, _ := batch[0].Message.Text()
				run.Emit(map[string]any{"type": "text_delta", "delta": "live: " + got})
			case <-time.After(5 * time.Second):
				return agent.Transient("no_live_message", "timed out")
			}
		case "suspend":
			decisions := run.Decisions()
			run.Emit(map[string]any{"type": "tool_call_done", "call_id": "c1", "outcome": "suspended"})
			select {
			case d := <-decisions:
				run.Emit(map[string]any{"type": "tool_call_resumed", "call_id": d[0].CallID, "resume": d[0].Resume})
			case <-ctx.Done():
				return agent.Cancelled()
			}
		case "block":
			<-ctx.Done()
			return agent.Cancelled()
		case "wake":
			res, err := sdk.Submit(ctx, agent.SubmitRequest{ThreadID: "woken", Messages: []agent.Message{agent.TextMessage("user", "from agent")}})
			if err != nil || res.DispatchID == "" {
				return agent.Transient("submit_failed", err.Error())
			}
		}
		if err := run.Checkpoint(ctx, agent.Checkpoint{Messages: []agent.Message{agent.TextMessage("assistant", "echo: "+text)}}); err != nil {
			return agent.Transient("checkpoint_failed", err.Error())
		}
		run.Emit(map[string]any{"type": "run_finish", "termination": map[string]string{"type": "natural_end"}})
		return agent.Done("echo: " + text)
	}
	sdk, _ = st.serveSDK(t, agent.Config{MaxRuns: 4, Handler: agent.HandlerFunc(handler), ShutdownGrace: time.Second})
	ctx := context.Background()
	eventually(t, "SDK agent connected", func() bool { return st.hub.Capacity() == 4 })

	types := func(evs []engine.Event) string {
		var out []string
		for _, e := range evs {
			out = append(out, e.Type)
		}
		return strings.Join(out, ",")
	}

	// A plain run: events, checkpointed echo, completed.
	res, log, err := st.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "plain", Messages: []engine.Message{text("hi")}})
	if err != nil {
		t.Fatal(err)
	}
	if got := types(streamEvents(t, log)); got != "run_start,run_finish" {
		t.Fatalf("plain events %s", got)
	}
	waitDispatch(t, st.store, res.DispatchID, engine.StatusAcked)
	if msgs, _ := st.store.LoadMessages(ctx, "plain"); len(msgs) != 2 || !strings.Contains(string(msgs[1].Message.Content), "echo: hi") {
		t.Fatalf("plain log %+v", msgs)
	}

	// A live message reaches the running run.
	res, log, err = st.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "live", Messages: []engine.Message{text("live")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "live run started", func() bool { evs, _, _, _ := log.Read(0, 10, nil); return len(evs) > 0 })
	var delivery engine.LiveDelivery
	eventually(t, "live delivery", func() bool {
		_, delivery, err = st.mb.SendMessages(ctx, engine.SubmitRequest{ThreadID: "live", Messages: []engine.Message{text("more")}}, res.RunID)
		return err == nil && delivery == engine.DeliveredLive
	})
	if got := types(streamEvents(t, log)); got != "run_start,text_delta,run_finish" {
		t.Fatalf("live events %s", got)
	}

	// A suspended tool call resumed by a live decision.
	res, log, err = st.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "tool", Messages: []engine.Message{text("suspend")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "suspended", func() bool { evs, _, _, _ := log.Read(0, 10, nil); return len(evs) >= 2 })
	delivered, err := st.mb.SendDecision(ctx, res.RunID, engine.Decision{CallID: "c1", Resume: []byte(`{"approved":true}`)})
	if err != nil || !delivered {
		t.Fatalf("decision delivered=%v err=%v", delivered, err)
	}
	if got := types(streamEvents(t, log)); got != "run_start,tool_call_done,tool_call_resumed,run_finish" {
		t.Fatalf("tool events %s", got)
	}

	// A cancel ends a blocked run; it is not retried.
	res, log, err = st.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "blocked", Messages: []engine.Message{text("block")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "blocked run started", func() bool { evs, _, _, _ := log.Read(0, 10, nil); return len(evs) > 0 })
	if ok, err := st.mb.Cancel(ctx, res.DispatchID); err != nil || !ok {
		t.Fatalf("cancel %v %v", ok, err)
	}
	streamEvents(t, log)
	waitDispatch(t, st.store, res.DispatchID, engine.StatusAcked)
	if run, _ := st.store.LoadRun(ctx, res.RunID); run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
		t.Fatalf("cancelled run %+v", run)
	}
	// Counted as cancelled, not among the completed runs (found by review).
	eventually(t, "the cancelled run counted", func() bool {
		var m strings.Builder
		st.hub.Metrics().WritePrometheus(&m)
		return strings.Contains(m.String(), `mailbox_agent_runs_total{outcome="cancelled"} 1`+"\n")
	})

	// SUBMIT from the agent wakes another thread.
	res, log, err = st.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "waker", Messages: []engine.Message{text("wake")}})
	if err != nil {
		t.Fatal(err)
	}
	streamEvents(t, log)
	eventually(t, "woken thread ran", func() bool {
		msgs, _ := st.store.LoadMessages(ctx, "woken")
		return len(msgs) == 2 && strings.Contains(string(msgs[1].Message.Content), "echo: from agent")
	})
}
