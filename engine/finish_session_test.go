package engine_test

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The run_finish the engine writes when the agent sent none names the
// attempt's session, as the agent's own does and as the seed's does
// (mailbox_run_identity: dispatch id + session id): the dispatch instance
// id the agent was given, which the run record keeps as its session_id.
// It used to carry no session_id at all. A failure's code is in it too.
func TestSyntheticRunFinishCarriesTheSession(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		sink.Emit([]byte(`{"type":"run_start"}`))
		switch execText(req.Messages[0]) {
		case "permanent":
			return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "no such agent"}
		case "transient":
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "inference failed"}
		case "cancelled":
			<-ctx.Done()
			return execCancelled()
		}
		// Completed, but the agent sent no run_finish.
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	}
	// One attempt per dispatch: the transient failure is dead-lettered at
	// once, and its only attempt's stream is the one re-attached.
	r := newRig(t, newFake(4, script), engine.Config{MaxAttempts: 1})
	r.start(t)
	ctx := context.Background()
	for _, kind := range []string{"permanent", "transient", "completed", "cancelled"} {
		t.Run(kind, func(t *testing.T) {
			thread := "session-" + kind
			res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg(kind)}})
			if err != nil {
				t.Fatal(err)
			}
			if kind == "cancelled" {
				// The executor has it (a run record says running as soon as
				// a claim records the start, before the agent gets the run).
				eventually(t, "the run executing", func() bool {
					for _, rq := range r.exec.execRuns() {
						if rq.ThreadID == thread {
							return true
						}
					}
					return false
				})
				if ok, err := r.mb.Cancel(ctx, res.RunID); !ok || err != nil {
					t.Fatalf("cancel: %v %v", ok, err)
				}
			}
			eventually(t, "the dispatch settled", func() bool { return dispatchStatus(t, r.store, res.DispatchID).Terminal() })
			evs := execReadAll(t, r.mb.Reattach(thread))
			if len(evs) != 2 || evs[1].Type != "run_finish" {
				t.Fatalf("events %v, want run_start and the synthetic run_finish", execTypes(evs))
			}
			var fin struct {
				RunID      string  `json:"run_id"`
				DispatchID string  `json:"dispatch_id"`
				SessionID  *string `json:"session_id"`
				ErrorCode  string  `json:"error_code"`
			}
			if err := json.Unmarshal(evs[1].Data, &fin); err != nil {
				t.Fatal(err)
			}
			// The failure's code, when it has one (found by review: only
			// the message reached the client).
			if want := map[string]string{"permanent": "agent_not_found"}[kind]; fin.ErrorCode != want {
				t.Fatalf("run_finish %s: error_code %q, want %q", evs[1].Data, fin.ErrorCode, want)
			}
			var session string
			for _, rq := range r.exec.execRuns() {
				if rq.ThreadID == thread {
					session = rq.SessionID
				}
			}
			run := execRun(t, r.store, res.RunID)
			if session == "" || run.SessionID != session {
				t.Fatalf("the agent's session %q, the run record's %q", session, run.SessionID)
			}
			if fin.RunID != res.RunID || fin.DispatchID != res.DispatchID || fin.SessionID == nil || *fin.SessionID != session {
				t.Fatalf("synthetic run_finish %s, want run %s, dispatch %s, session_id %s", evs[1].Data, res.RunID, res.DispatchID, session)
			}
		})
	}
}
