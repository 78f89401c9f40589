package storetest

import (
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Claim and ClaimDispatch: store.md rules 38–47.
func dispatchClaimCases() []Case {
	return []Case{
		{"S38_claim_never_returns_dispatch_of_older_epoch", func(t *testing.T, s engine.Store) {
			// A queued dispatch with a stale epoch cannot be observed in a
			// single-node store (interrupt supersedes all queued work in its
			// commit), so the rule is checked by its effect: after an
			// interrupt no pre-interrupt dispatch is ever claimed, and the
			// queue goes on with the post-interrupt one.
			h := newDQ(t, s)
			h.add("old1", "t1", 1000)
			h.add("old2", "t1", 1000)
			h.interrupt("t1", 2000)
			h.add("new", "t1", 3000)
			c := h.claim("t1", "c1", 4000)
			if c.DispatchID != "new" || c.Epoch != 1 {
				t.Fatalf("claimed %s epoch %d, want new epoch 1", c.DispatchID, c.Epoch)
			}
			h.ack("new", c.ClaimToken, 5000)
			h.claimNone("t1", 6000)
			for _, id := range []string{"old1", "old2"} {
				h.claimIDNone(id, 6000)
				h.status(id, engine.StatusSuperseded)
			}
		}},
		{"S39_B26_claim_blocked_while_thread_has_claimed_dispatch", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			h.add("d2", "t1", 1000)
			h.add("o1", "t2", 1000)
			c1 := h.claim("t1", "c1", 1000)
			h.claimNone("t1", 1000)
			h.claimIDNone("d2", 1000)
			h.status("d2", engine.StatusQueued)
			// Another thread is not blocked.
			if o := h.claim("t2", "c2", 1000); o.DispatchID != "o1" {
				t.Fatalf("claim(t2) = %s, want o1", o.DispatchID)
			}
			h.ack(c1.DispatchID, c1.ClaimToken, 2000)
			if c2 := h.claim("t1", "c1", 2000); c2.DispatchID != "d2" {
				t.Fatalf("claim after ack = %s, want d2", c2.DispatchID)
			}
		}},
		{"S39_claim_blocked_by_expired_unreclaimed_lease", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			h.add("d2", "t1", 1000)
			c1 := h.claimID("d1", "c1", 1000)
			late := c1.LeaseUntil + 60_000
			h.claimNone("t1", late)
			h.claimIDNone("d2", late)
			got := h.reclaim(late, 10)
			dqWantIDs(t, "reclaimed", got, "d1")
			// d1 is back with attempt 1 and d2 is untouched; both are
			// claimable again, d1 first (same priority and created_at, id order).
			if c := h.claim("t1", "c2", late); c.DispatchID != "d1" || c.AttemptCount != 1 {
				t.Fatalf("claim after reclaim = %s attempt %d, want d1 attempt 1", c.DispatchID, c.AttemptCount)
			}
		}},
		{"S40_claim_order_priority_created_at_dispatch_id", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			add := func(id string, prio uint8, created int64) {
				d := dqQueued(id, "t1", prio, 100)
				d.CreatedAt = created
				h.enqueue(d)
			}
			add("e", 200, 10)
			add("c", 10, 30)
			add("b", 10, 20)
			add("a", 10, 20)
			add("z", 0, 50)
			add("d", 128, 5)
			want := []string{"z", "a", "b", "c", "d", "e"}
			for i, id := range want {
				c := h.claim("t1", "c1", 1000+int64(i))
				if c.DispatchID != id {
					t.Fatalf("claim #%d = %s, want %s (order %q)", i+1, c.DispatchID, id, want)
				}
				h.ack(c.DispatchID, c.ClaimToken, 1000+int64(i))
			}
			h.claimNone("t1", 5000)
		}},
		{"S40_claim_respects_available_at_inclusive", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.enqueue(dqQueued("late", "t1", 0, 5000))
			h.enqueue(dqQueued("early", "t1", 200, 1000))
			// The higher-priority dispatch is not available yet.
			if c := h.claim("t1", "c1", 4999); c.DispatchID != "early" {
				t.Fatalf("claim at 4999 = %s, want early", c.DispatchID)
			}
			h.claimNone("t1", 4999)
			h.ack("early", h.load("early").ClaimToken, 4999)
			h.claimNone("t1", 4999)
			if c := h.claim("t1", "c1", 5000); c.DispatchID != "late" {
				t.Fatalf("claim at available_at = %s, want late", c.DispatchID)
			}
		}},
		{"S41_claim_sets_claim_fields", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 7, 1000)
			d.DedupeKey = "k1"
			d.MaxAttempts = 3
			q := h.enqueue(d)
			c := h.claim("t1", "consumer-a", 2000)
			if c.ClaimToken == "" {
				t.Fatalf("claim token is empty")
			}
			want := dqClaimed(q, c.ClaimToken, "consumer-a", 2000)
			dqEqual(t, "returned claim", c, want)
			dqEqual(t, "stored claim", h.load("d1"), want)
			if c.LeaseUntil != 32_000 {
				t.Fatalf("lease_until = %d, want 32000", c.LeaseUntil)
			}
		}},
		{"S41_claim_token_is_fresh_per_claim", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			h.add("d2", "t2", 1000)
			seen := map[string]bool{}
			a := h.claim("t1", "c1", 1000)
			b := h.claim("t2", "c1", 1000)
			seen[a.ClaimToken], seen[b.ClaimToken] = true, true
			if len(seen) != 2 {
				t.Fatalf("two claims share token %q", a.ClaimToken)
			}
			for i := range 3 {
				h.release("d1", a.ClaimToken, 2000+int64(i))
				a = h.claim("t1", "c1", 2000+int64(i))
				if seen[a.ClaimToken] {
					t.Fatalf("re-claim #%d reused token %q", i+1, a.ClaimToken)
				}
				seen[a.ClaimToken] = true
			}
		}},
		{"S41_claim_rejects_blank_consumer", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			q := h.add("d1", "t1", 1000)
			_, err := s.Claim(h.ctx, "t1", "", dqLease, 1000)
			dqWantErr(t, "Claim with blank consumer", err, engine.ErrValidation)
			_, err = s.ClaimDispatch(h.ctx, "d1", " ", dqLease, 1000)
			dqWantErr(t, "ClaimDispatch with blank consumer", err, engine.ErrValidation)
			h.same(q)
		}},
		{"S42_B04_B05_B31_C07_claim_returns_one_dispatch_per_call", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			for _, id := range []string{"d1", "d2", "d3"} {
				h.add(id, "t1", 1000)
			}
			c := h.claim("t1", "c1", 1000)
			if c.DispatchID != "d1" {
				t.Fatalf("claimed %s, want d1", c.DispatchID)
			}
			dqWantIDs(t, "claimed list", h.list("t1", engine.StatusFilter{engine.StatusClaimed}, 10, 0), "d1")
			dqWantIDs(t, "queued list", h.list("t1", engine.StatusFilter{engine.StatusQueued}, 10, 0), "d2", "d3")
		}},
		{"S43_claim_unknown_thread_returns_nil", func(t *testing.T, s engine.Store) {
			// Rule 43 (limit 0) has no Go form: Claim returns at most one.
			h := newDQ(t, s)
			h.claimNone("nobody", 1000)
			h.add("d1", "t1", 1000)
			h.claimNone("t", 1000)
			h.claimNone("t10", 1000)
			h.status("d1", engine.StatusQueued)
		}},
		{"S45_claim_dispatch_nil_for_missing_or_not_queued", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.claimIDNone("missing", 1000)
			claimed := h.addClaimed("claimed", "t1", 1000)
			h.claimIDNone("claimed", 1000)
			h.same(claimed)
			a := h.addClaimed("acked", "t2", 1000)
			h.ack("acked", a.ClaimToken, 1500)
			h.add("cancelled", "t3", 1000)
			h.cancel("cancelled", 1500)
			dl := h.addClaimed("dead", "t4", 1000)
			h.deadLetter("dead", dl.ClaimToken, "fatal", 1500)
			h.add("superseded", "t5", 1000)
			h.interrupt("t5", 1500)
			for _, id := range []string{"acked", "cancelled", "dead", "superseded"} {
				before := h.load(id)
				h.claimIDNone(id, 2000)
				h.same(before)
			}
		}},
		{"S45_claim_dispatch_nil_when_thread_has_claimed_dispatch", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.addClaimed("d1", "t1", 1000)
			q := h.add("d2", "t1", 1000)
			h.claimIDNone("d2", 1000)
			h.same(q)
			// Still nil after the lease lapsed but before reclaim.
			h.claimIDNone("d2", 1_000_000)
			h.same(q)
		}},
		{"S45_claim_dispatch_after_interrupt_nil_for_pre_interrupt_dispatch", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("old", "t1", 1000)
			h.interrupt("t1", 2000)
			before := h.status("old", engine.StatusSuperseded)
			h.claimIDNone("old", 3000)
			h.same(before)
		}},
		{"S46_claim_dispatch_ignores_available_at", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// The inline path: enqueued with a guard of now+60s.
			q := h.add("d1", "t1", 61_000)
			h.claimNone("t1", 1000)
			c := h.claimID("d1", "c1", 1000)
			dqEqual(t, "inline claim", c, dqClaimed(q, c.ClaimToken, "c1", 1000))
		}},
		{"S47_A29_B23_claim_dispatch_sets_claim_fields", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			q := h.add("d1", "t1", 1000)
			h.add("d2", "t1", 500)
			c := h.claimID("d1", "consumer-b", 1500)
			if c.ClaimToken == "" {
				t.Fatalf("claim token is empty")
			}
			want := dqClaimed(q, c.ClaimToken, "consumer-b", 1500)
			dqEqual(t, "returned claim", c, want)
			dqEqual(t, "stored claim", h.load("d1"), want)
			// The other dispatch of the thread stays queued.
			h.status("d2", engine.StatusQueued)
		}},
		{"S47_B33_claim_dispatch_different_threads_both_succeed", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			h.add("d2", "t2", 1000)
			a := h.claimID("d1", "c1", 1000)
			b := h.claimID("d2", "c2", 1000)
			if a.ClaimToken == b.ClaimToken {
				t.Fatalf("claims on two threads share token %q", a.ClaimToken)
			}
		}},
	}
}
