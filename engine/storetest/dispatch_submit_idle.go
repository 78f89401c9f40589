package storetest

import (
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// submitIdleCases check the optional engine.IdleSubmitter: the foreground
// fast path's submit, claim and start in one commit. They are part of the
// suite only for stores that implement it (see Run); the stores' own tests
// check the idleness rules and the single write.
func submitIdleCases() []Case {
	submit := func(t *testing.T, s engine.Store, thread string, run engine.RunRecord) *engine.Dispatch {
		t.Helper()
		is, ok := s.(engine.IdleSubmitter)
		if !ok {
			t.Fatalf("%T does not implement engine.IdleSubmitter", s)
		}
		d := dqQueued("d-"+thread, thread, engine.DefaultPriority, 1000)
		d.RunID = run.RunID
		c := engine.Checkpoint{ThreadID: thread, CreatedAt: 1000, Run: &run,
			Messages: []engine.Message{{ID: "m-" + thread, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
		_, out, err := is.SubmitIdle(t.Context(), c, d, "c1", dqLease, "inst", 1000)
		if err != nil || out == nil || out.Status != engine.StatusClaimed {
			t.Fatalf("SubmitIdle on idle thread %s = %+v, %v; want claimed", thread, out, err)
		}
		return out
	}
	return []Case{
		{"SubmitIdle_starts_a_new_run_but_not_a_continued_waiting_one", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// A new run: started in the commit, under the instance id.
			d := submit(t, s, "t-new", dqRun("run-new", "t-new", engine.RunCreated))
			if d.InstanceID != "inst" || d.RunStatus != engine.RunRunning {
				t.Fatalf("new run's dispatch %+v, want started by inst", d)
			}
			if r := h.loadRun("run-new"); r.Status != engine.RunRunning || r.SessionID != "inst" {
				t.Fatalf("new run %+v, want running under inst", r)
			}
			// A continuation (the checkpoint keeps its run waiting): claimed,
			// not started; the run waits on, its waiting state and session
			// kept, for the engine to rebuild the request from it before it
			// records the start (as ClaimStart).
			w := dqRun("run-w", "t-w", engine.RunWaiting)
			w.Waiting = &engine.RunWaitingState{Reason: engine.WaitUserInput, TicketIDs: []string{"ticket-1"}}
			w.SessionID = "earlier"
			d = submit(t, s, "t-w", w)
			if d.InstanceID != "" {
				t.Fatalf("continuation's dispatch %+v, want claimed and not started", d)
			}
			h.same(*d)
			r := h.loadRun("run-w")
			if r.Status != engine.RunWaiting || r.Waiting == nil || len(r.Waiting.TicketIDs) != 1 || r.SessionID != "earlier" {
				t.Fatalf("continued run %+v, want still waiting with its ticket and session", r)
			}
		}},
	}
}
