package storetest

import (
	"errors"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// dispatchCompleteCases check Complete: RecordRunResult and Ack in one
// commit.
func dispatchCompleteCases() []Case {
	return []Case{
		{"Complete_records_the_result_settles_the_run_and_acks", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			res := engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "fine"}
			if err := s.Complete(h.ctx, "d1", c.ClaimToken, res, 7000); err != nil {
				t.Fatal(err)
			}
			d := h.load("d1")
			if d.Status != engine.StatusAcked || d.RunStatus != engine.RunDone || d.RunResponse != "fine" || d.InstanceID != "inst-1" ||
				d.CompletedAt != 7000 || d.ClaimToken != "" {
				t.Fatalf("dispatch after Complete: %+v", d)
			}
			r := h.loadRun("run-d1")
			if r.Status != engine.RunDone || string(r.FinalOutput) != `"fine"` || r.FinishedAt != 7 || r.TerminationReason.Type != engine.TermNaturalEnd {
				t.Fatalf("run after Complete: %+v", r)
			}
			// The delivery is consumed: a second Complete is refused.
			if err := s.Complete(h.ctx, "d1", c.ClaimToken, res, 8000); !errors.Is(err, engine.ErrStaleClaim) {
				t.Fatalf("second Complete: got %v, want ErrStaleClaim", err)
			}
		}},
		{"Complete_refuses_wrong_token_unknown_id_and_foreign_result_and_changes_nothing", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			before := h.load("d1")
			runBefore := h.loadRun("run-d1")
			res := engine.RunResult{RunID: "run-d1", InstanceID: "i", Status: engine.RunDone}
			if err := s.Complete(h.ctx, "d1", "wrong", res, 2000); !errors.Is(err, engine.ErrStaleClaim) {
				t.Fatalf("wrong token: %v", err)
			}
			if err := s.Complete(h.ctx, "nope", c.ClaimToken, res, 2000); !errors.Is(err, engine.ErrNotFound) {
				t.Fatalf("unknown id: %v", err)
			}
			foreign := res
			foreign.RunID = "run-other"
			if err := s.Complete(h.ctx, "d1", c.ClaimToken, foreign, 2000); !errors.Is(err, engine.ErrValidation) {
				t.Fatalf("foreign result: %v", err)
			}
			if after := h.load("d1"); after.Status != before.Status || after.UpdatedAt != before.UpdatedAt || after.RunStatus != "" {
				t.Fatalf("refused Complete changed the dispatch: %+v", after)
			}
			h.runUnchanged(runBefore)
		}},
		{"Complete_of_a_superseded_claim_supersedes_and_conflicts", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			if _, err := s.Interrupt(h.ctx, "t1", 1500); err != nil {
				t.Fatal(err)
			}
			err := s.Complete(h.ctx, "d1", c.ClaimToken, engine.RunResult{RunID: "run-d1", InstanceID: "i", Status: engine.RunDone}, 2000)
			var conflict *engine.ConflictError
			if !errors.As(err, &conflict) {
				t.Fatalf("Complete after interrupt: got %v, want *ConflictError", err)
			}
			if d := h.load("d1"); d.Status != engine.StatusSuperseded {
				t.Fatalf("dispatch is %s, want superseded", d.Status)
			}
			if r := h.loadRun("run-d1"); r.Status != engine.RunDone || r.TerminationReason.Type != engine.TermCancelled {
				t.Fatalf("run after superseded Complete: %+v", r)
			}
		}},
	}
}
