package storetest

import (
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// claimStartCases check the optional engine.StartClaimer: a claim that
// records the attempt's start in its own commit. They are part of the
// suite only for stores that implement it (see Run).
func claimStartCases() []Case {
	sc := func(t *testing.T, s engine.Store) engine.StartClaimer {
		t.Helper()
		c, ok := s.(engine.StartClaimer)
		if !ok {
			t.Fatalf("%T does not implement engine.StartClaimer", s)
		}
		return c
	}
	started := func(t *testing.T, h *dq, d *engine.Dispatch, id, instance string, now int64) {
		t.Helper()
		if d == nil || d.DispatchID != id || d.Status != engine.StatusClaimed || d.InstanceID != instance || d.RunStatus != engine.RunRunning ||
			d.LeaseUntil != now+dqLeaseMs || d.ClaimToken == "" {
			t.Fatalf("claimed %+v, want %s claimed and started by %s", d, id, instance)
		}
		h.same(*d)
		r := h.loadRun(d.RunID)
		if r.Status != engine.RunRunning || r.SessionID != instance || r.DispatchID != id || r.StartedAt != now/1000 {
			t.Fatalf("run %+v, want running under %s since %d", r, instance, now/1000)
		}
	}
	// twoQueued queues d1 and d2 (runs run-d1, run-d2, created) on t1.
	twoQueued := func(t *testing.T, s engine.Store) *dq {
		h := newDQ(t, s)
		for i, id := range []string{"d1", "d2"} {
			h.createRun(dqRun("run-"+id, "t1", engine.RunCreated))
			h.add(id, "t1", 1000+100*int64(i))
		}
		return h
	}
	return []Case{
		{"ClaimStart_claims_and_starts_in_one_call", func(t *testing.T, s engine.Store) {
			h := twoQueued(t, s)
			d, err := sc(t, s).ClaimStart(h.ctx, "t1", "c1", dqLease, "i1", 2000)
			if err != nil {
				t.Fatal(err)
			}
			started(t, h, d, "d1", "i1", 2000)
			// One claim per thread; nothing due on an empty thread.
			if d2, err := sc(t, s).ClaimStart(h.ctx, "t1", "c1", dqLease, "i2", 2000); err != nil || d2 != nil {
				t.Fatalf("second ClaimStart on t1 = %+v, %v; want none", d2, err)
			}
			if d3, err := sc(t, s).ClaimStart(h.ctx, "empty", "c1", dqLease, "i3", 2000); err != nil || d3 != nil {
				t.Fatalf("ClaimStart on an empty thread = %+v, %v", d3, err)
			}
			// The start is a real one: the token settles it.
			h.ack("d1", d.ClaimToken, 3000)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusAcked: 1, engine.StatusQueued: 1})
		}},
		{"ClaimStart_leaves_a_done_run_unstarted", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			done := dqRun("run-d1", "t1", engine.RunDone)
			done.SessionID = "earlier"
			h.createRun(done)
			h.add("d1", "t1", 1000)
			d, err := sc(t, s).ClaimStart(h.ctx, "t1", "c1", dqLease, "i1", 2000)
			if err != nil || d == nil || d.Status != engine.StatusClaimed || d.InstanceID != "" || d.RunStatus != "" {
				t.Fatalf("ClaimStart of a done run's dispatch = %+v, %v; want claimed only", d, err)
			}
			h.same(*d)
			if r := h.loadRun("run-d1"); r.Status != engine.RunDone || r.SessionID != "earlier" {
				t.Fatalf("done run changed: %+v", r)
			}
		}},
		{"ClaimStart_leaves_a_waiting_runs_continuation_unstarted", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			w := dqRun("run-d1", "t1", engine.RunWaiting)
			w.Waiting = &engine.RunWaitingState{Reason: engine.WaitUserInput, TicketIDs: []string{"k1"}}
			h.createRun(w)
			h.add("d1", "t1", 1000)
			d, err := sc(t, s).ClaimStart(h.ctx, "t1", "c1", dqLease, "i1", 2000)
			if err != nil || d == nil || d.Status != engine.StatusClaimed || d.InstanceID != "" || d.RunStatus != "" {
				t.Fatalf("ClaimStart of a waiting run's dispatch = %+v, %v; want claimed only", d, err)
			}
			h.same(*d)
			if r := h.loadRun("run-d1"); r.Status != engine.RunWaiting || r.Waiting == nil || len(r.Waiting.TicketIDs) != 1 {
				t.Fatalf("waiting run changed: %+v", r)
			}
			// The two-step start follows, with the token of the claim.
			h.start("d1", d.ClaimToken, "i1", 2100)
			if r := h.loadRun("run-d1"); r.Status != engine.RunRunning || r.SessionID != "i1" {
				t.Fatalf("run after the start: %+v", r)
			}
		}},
		{"CompleteAndClaimStart_starts_the_next_dispatch", func(t *testing.T, s engine.Store) {
			h := twoQueued(t, s)
			d, err := sc(t, s).ClaimStart(h.ctx, "t1", "c1", dqLease, "i1", 2000)
			if err != nil {
				t.Fatal(err)
			}
			res := engine.RunResult{RunID: "run-d1", InstanceID: "i1", Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
			next, err := sc(t, s).CompleteAndClaimStart(h.ctx, "d1", d.ClaimToken, res, 3000, "c1", dqLease, "i2")
			if err != nil {
				t.Fatal(err)
			}
			started(t, h, next, "d2", "i2", 3000)
			if r := h.loadRun("run-d1"); r.Status != engine.RunDone {
				t.Fatalf("completed run %+v", r)
			}
			h.status("d1", engine.StatusAcked)
			// Nothing left: it completes only.
			res2 := engine.RunResult{RunID: "run-d2", InstanceID: "i2", Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
			if n, err := sc(t, s).CompleteAndClaimStart(h.ctx, "d2", next.ClaimToken, res2, 4000, "c1", dqLease, "i3"); err != nil || n != nil {
				t.Fatalf("CompleteAndClaimStart with nothing queued = %+v, %v", n, err)
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusAcked: 2})
		}},
		{"CompleteAndClaimStart_with_a_stale_token_claims_nothing", func(t *testing.T, s engine.Store) {
			h := twoQueued(t, s)
			if _, err := sc(t, s).ClaimStart(h.ctx, "t1", "c1", dqLease, "i1", 2000); err != nil {
				t.Fatal(err)
			}
			res := engine.RunResult{RunID: "run-d1", InstanceID: "i1", Status: engine.RunDone}
			next, err := sc(t, s).CompleteAndClaimStart(h.ctx, "d1", "not-the-token", res, 3000, "c1", dqLease, "i2")
			dqWantErr(t, "CompleteAndClaimStart with a stale token", err, engine.ErrStaleClaim)
			if next != nil {
				t.Fatalf("next = %+v, want nil", next)
			}
			h.status("d2", engine.StatusQueued)
			if r := h.loadRun("run-d2"); r.Status != engine.RunCreated {
				t.Fatalf("run of d2 %+v, want created", r)
			}
		}},
	}
}
