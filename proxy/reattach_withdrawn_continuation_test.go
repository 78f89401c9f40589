package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// askAgent: "ask" emits two events and ends waiting for user input;
// anything else is scriptAgent's.
type askAgent struct{ scriptAgent }

func (a askAgent) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	if text, _ := run.Request.Messages[0].Text(); text == "ask" && run.Request.ContinueRunID == "" {
		run.EmitRaw([]byte(`{"type":"text_delta","delta":"which one?"}`))
		run.EmitRaw([]byte(`{"type":"text_delta","delta":"a or b"}`))
		return agent.Suspended(agent.WaitingState{Reason: agent.WaitUserInput})
	}
	return a.scriptAgent.HandleRun(ctx, run)
}

// A waiting run's continuation, submitted in the foreground while no agent
// slot is free, waits queued; an interrupt then withdraws it, and its log
// (the thread's, for re-attachment) ends with the sidecar's run_finish.
// That run_finish is an attempt of the same run that never reached the
// agent, and had id 1 — an id of the run's first attempt. A client that
// saw only that attempt's first event (id 1) and re-attached was served
// "everything after 1" of the withdrawn log: nothing, no reset, and its
// stream ended without the run_finish that says how the run ended.
func TestReattachToAWithdrawnContinuationWithTheFirstAttemptsID(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{maxRuns: 1, handler: askAgent{}, proxy: proxyConfig(20 * time.Millisecond)})
	st := sc.stream(req{method: "POST", path: "/v1/threads/c/runs", body: submitBody("ask")})
	sub := decode[submitResult](t, st.next().Data)
	first := st.next()
	if first.ID != "1" {
		t.Fatalf("the run's first event: %+v", first)
	}
	st.rest()
	sc.waitDispatch(sub.DispatchID, engine.StatusAcked)

	busy := sc.stream(req{method: "POST", path: "/v1/threads/busy/runs", body: submitBody("wait")})
	busy.next()
	busy.next()
	busy.next() // the only agent slot is taken
	cont := sc.stream(req{method: "POST", path: "/v1/threads/c/runs", body: submitBody("b")})
	if cs := decode[submitResult](t, cont.next().Data); cs.Status != "queued" || cs.RunID != sub.RunID {
		t.Fatalf("continuation %+v, want the waiting run %s continued, queued", cs, sub.RunID)
	}
	sc.call(req{method: "POST", path: "/v1/threads/c/interrupt"}, 200, nil)
	if evs := cont.rest(); types(evs) != "run_finish" {
		t.Fatalf("the withdrawn continuation's stream: %+v", evs)
	}

	re := sc.stream(req{method: "GET", path: "/v1/threads/c/events", headers: []string{"Last-Event-ID", first.ID}})
	evs := re.rest()
	sc.call(req{method: "POST", path: "/v1/threads/busy/messages", body: `{"messages":[{"role":"user","content":"done"}]}`}, 200, nil)
	busy.rest()
	if len(evs) == 0 || evs[len(evs)-1].Event != "run_finish" || !strings.Contains(evs[len(evs)-1].Data, `"cancelled"`) {
		t.Fatalf("re-attached with Last-Event-ID %s (the run's first attempt's): %+v, want the withdrawn continuation's run_finish (after a reset)", first.ID, evs)
	}
}
