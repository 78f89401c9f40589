package storetest

import (
	"errors"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// completeClaimCases check the optional engine.CompleteClaimer: Complete
// and the Claim of the thread's next dispatch in one commit. They are part
// of the suite only for stores that implement it (see Run).
func completeClaimCases() []Case {
	cc := func(t *testing.T, s engine.Store) engine.CompleteClaimer {
		t.Helper()
		c, ok := s.(engine.CompleteClaimer)
		if !ok {
			t.Fatalf("%T does not implement engine.CompleteClaimer", s)
		}
		return c
	}
	done := func(runID string) engine.RunResult {
		return engine.RunResult{RunID: runID, InstanceID: "inst", Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	}
	return []Case{
		{"CompleteAndClaim_acks_and_claims_the_threads_next_due_dispatch", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.createRun(dqRun("run-d2", "t1", engine.RunCreated))
			h.add("d2", "t1", 1100)
			h.createRun(dqRun("run-d3", "t1", engine.RunCreated))
			h.add("d3", "t1", 1200)
			h.add("o1", "other", 1000) // another thread's work is not taken
			next, err := cc(t, s).CompleteAndClaim(h.ctx, "d1", c.ClaimToken, done("run-d1"), 2000, "c2", dqLease)
			if err != nil {
				t.Fatal(err)
			}
			if next == nil || next.DispatchID != "d2" || next.Status != engine.StatusClaimed || next.ClaimedBy != "c2" ||
				next.LeaseUntil != 2000+dqLeaseMs || next.ClaimToken == "" || next.ClaimToken == c.ClaimToken {
				t.Fatalf("next = %+v, want d2 claimed by c2 until %d with a new token", next, 2000+dqLeaseMs)
			}
			h.same(*next)
			if d := h.status("d1", engine.StatusAcked); d.RunStatus != engine.RunDone || d.CompletedAt != 2000 {
				t.Fatalf("completed dispatch %+v", d)
			}
			if r := h.loadRun("run-d1"); r.Status != engine.RunDone {
				t.Fatalf("run after CompleteAndClaim: %+v", r)
			}
			h.status("d3", engine.StatusQueued)
			h.status("o1", engine.StatusQueued)
			// One claimed dispatch per thread: nothing more for t1.
			h.claimNone("t1", 3000)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusAcked: 1, engine.StatusClaimed: 1, engine.StatusQueued: 2})
			// The claim is a real one: its token settles it.
			h.ack("d2", next.ClaimToken, 3000)
		}},
		{"CompleteAndClaim_without_due_work_only_completes", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.add("later", "t1", 9000) // not due at 2000
			next, err := cc(t, s).CompleteAndClaim(h.ctx, "d1", c.ClaimToken, done("run-d1"), 2000, "c2", dqLease)
			if err != nil || next != nil {
				t.Fatalf("CompleteAndClaim = %+v, %v; want nil, nil", next, err)
			}
			h.status("d1", engine.StatusAcked)
			h.status("later", engine.StatusQueued)
			if got := h.claim("t1", "c3", 9000); got.DispatchID != "later" {
				t.Fatalf("claimed %s once due, want later", got.DispatchID)
			}
		}},
		{"CompleteAndClaim_refused_claims_nothing_and_changes_nothing", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.add("d2", "t1", 1100)
			before := h.load("d1")
			if next, err := cc(t, s).CompleteAndClaim(h.ctx, "d1", "wrong", done("run-d1"), 2000, "c2", dqLease); !errors.Is(err, engine.ErrStaleClaim) || next != nil {
				t.Fatalf("wrong token: %+v, %v", next, err)
			}
			if next, err := cc(t, s).CompleteAndClaim(h.ctx, "nope", c.ClaimToken, done("run-d1"), 2000, "c2", dqLease); !errors.Is(err, engine.ErrNotFound) || next != nil {
				t.Fatalf("unknown id: %+v, %v", next, err)
			}
			if next, err := cc(t, s).CompleteAndClaim(h.ctx, "d1", c.ClaimToken, done("run-d1"), 2000, "", dqLease); !errors.Is(err, engine.ErrValidation) || next != nil {
				t.Fatalf("blank consumer: %+v, %v", next, err)
			}
			if after := h.load("d1"); after.Status != engine.StatusClaimed || after.UpdatedAt != before.UpdatedAt {
				t.Fatalf("refused CompleteAndClaim changed the dispatch: %+v", after)
			}
			h.status("d2", engine.StatusQueued)
		}},
		{"CompleteAndClaim_of_a_superseded_claim_conflicts_and_claims_nothing", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.interrupt("t1", 1500)
			h.createRun(dqRun("run-d2", "t1", engine.RunCreated))
			h.add("d2", "t1", 1600) // queued after the interrupt: current epoch
			next, err := cc(t, s).CompleteAndClaim(h.ctx, "d1", c.ClaimToken, done("run-d1"), 2000, "c2", dqLease)
			var conflict *engine.ConflictError
			if !errors.As(err, &conflict) || next != nil {
				t.Fatalf("CompleteAndClaim after interrupt: %+v, %v; want nil and *ConflictError", next, err)
			}
			h.status("d1", engine.StatusSuperseded)
			h.status("d2", engine.StatusQueued)
		}},
	}
}
