package storetest

import (
	"fmt"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// dispatchCases returns the dispatch-queue half of the suite: one case per
// rule of store.md §2 that applies to a single-node store (rules 32–91; the
// signal and live-channel rules 92–101 are not part of the store interface),
// the upstream conformance cases of conformance.md A, B and C (and D/G cases
// re-expressed for one node), and the concurrency cases. Case names start
// with the rule ("S32_…") or case id ("A13_…") they check; the rest are
// project decisions recorded in engine/store.go (Release, Requeue,
// ListDeadLetters, ReadyThreads, error history, run settlement).
func dispatchCases() []Case {
	var all []Case
	for _, group := range [][]Case{
		dispatchEnqueueCases(),
		dispatchClaimCases(),
		dispatchTokenCases(),
		dispatchAckCases(),
		dispatchRecordCases(),
		dispatchCompleteCases(),
		dispatchNackCases(),
		dispatchDeadLetterCancelCases(),
		dispatchLeaseCases(),
		dispatchInterruptCases(),
		dispatchSupersedeCases(),
		dispatchReleaseRequeueCases(),
		dispatchReadCases(),
		dispatchReclaimPurgeCases(),
		dispatchSettleRunCases(),
		dispatchConcurrencyCases(),
		dispatchConformanceCases(),
	} {
		all = append(all, group...)
	}
	return all
}

// dispatchConformanceCases are the upstream cases of conformance.md that no
// rule case above already carries in its name.
func dispatchConformanceCases() []Case {
	return []Case{
		{"A02_B02_claim_returns_queued_dispatch", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			q := h.add("d1", "t1", 1000)
			c := h.claim("t1", "c1", 1000)
			if c.DispatchID != "d1" || c.Status != engine.StatusClaimed || c.ClaimToken == "" || c.ClaimedBy != "c1" {
				t.Fatalf("claim = %s %s token %q by %q", c.DispatchID, c.Status, c.ClaimToken, c.ClaimedBy)
			}
			dqEqual(t, "claimed", c, dqClaimed(q, c.ClaimToken, "c1", 1000))
		}},
		{"A03_B03_claim_respects_available_at", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 5000)
			h.claimNone("t1", 1000)
			if c := h.claim("t1", "c1", 5000); c.DispatchID != "d1" {
				t.Fatalf("claim at 5000 = %s", c.DispatchID)
			}
		}},
		{"A04_claim_respects_priority_before_created_at", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			low := dqQueued("low", "t1", 200, 10)
			high := dqQueued("high", "t1", 10, 20)
			h.enqueue(low)
			h.enqueue(high)
			if c := h.claim("t1", "c1", 1000); c.DispatchID != "high" {
				t.Fatalf("claimed %s, want high", c.DispatchID)
			}
		}},
		{"A08_B08_C11_ack_rejects_wrong_claim_token", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			err := s.Ack(h.ctx, "d1", "wrong-token", 2000)
			dqWantErr(t, "Ack(wrong token)", err, engine.ErrStaleClaim)
			dqWantErr(t, "Ack(wrong token)", err, engine.ErrVersionConflict)
			h.same(c)
		}},
		{"A34_B27_fifo_ordering_within_same_priority", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// Enqueued out of order; created_at decides.
			for _, i := range []int{3, 1, 4, 0, 2} {
				h.enqueue(dqQueued(fmt.Sprintf("d%d", i), "t1", 128, int64(100*(i+1))))
			}
			for i := range 5 {
				c := h.claim("t1", "c1", 1000)
				if want := fmt.Sprintf("d%d", i); c.DispatchID != want {
					t.Fatalf("claim #%d = %s, want %s", i+1, c.DispatchID, want)
				}
				h.ack(c.DispatchID, c.ClaimToken, 1000)
			}
		}},
		{"B06_claim_priority_ordering", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.enqueue(dqQueued("p200", "t1", 200, 100))
			h.enqueue(dqQueued("p128", "t1", 128, 200))
			h.enqueue(dqQueued("p10", "t1", 10, 300))
			for _, want := range []string{"p10", "p128", "p200"} {
				c := h.claim("t1", "c1", 1000)
				if c.DispatchID != want {
					t.Fatalf("claimed %s, want %s", c.DispatchID, want)
				}
				h.ack(c.DispatchID, c.ClaimToken, 1000)
			}
		}},
		{"B30_claim_respects_per_thread_isolation", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			h.add("d2", "t2", 1000)
			a := h.claim("t1", "c1", 1000)
			b := h.claim("t2", "c1", 1000)
			if a.DispatchID != "d1" || b.DispatchID != "d2" || a.ClaimToken == b.ClaimToken {
				t.Fatalf("claims = %s/%s tokens equal %v", a.DispatchID, b.DispatchID, a.ClaimToken == b.ClaimToken)
			}
		}},
		{"C06_claim_and_ack", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			h.add("d2", "t1", 1000)
			c := h.claim("t1", "c1", 2000)
			if c.LeaseUntil != 2000+30_000 {
				t.Fatalf("lease_until = %d, want 32000", c.LeaseUntil)
			}
			h.claimNone("t1", 2000)
			h.ack(c.DispatchID, c.ClaimToken, 3000)
			h.status(c.DispatchID, engine.StatusAcked)
			if next := h.claim("t1", "c1", 3000); next.DispatchID != "d2" {
				t.Fatalf("next claim = %s, want d2", next.DispatchID)
			}
		}},
		{"D02_nack_with_retry_in_the_past_is_claimable", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.nack("d1", c.ClaimToken, 500, "transient", 2000)
			if again := h.claim("t1", "c1", 2000); again.DispatchID != "d1" || again.AttemptCount != 1 {
				t.Fatalf("claim after nack = %s attempt %d", again.DispatchID, again.AttemptCount)
			}
		}},
		{"D31_G01_hot_thread_among_many_claims_its_oldest", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// A hot thread enqueued newest first, beside unrelated threads.
			const hot = 150
			for i := hot - 1; i >= 0; i-- {
				h.enqueue(dqQueued(fmt.Sprintf("h%03d", i), "hot", 128, int64(i)))
			}
			for i := range 100 {
				h.enqueue(dqQueued(fmt.Sprintf("u%03d", i), fmt.Sprintf("u%03d", i), 0, 0))
			}
			c := h.claim("hot", "c1", 10_000)
			if c.DispatchID != "h000" || c.CreatedAt != 0 {
				t.Fatalf("claimed %s created %d, want h000 created 0", c.DispatchID, c.CreatedAt)
			}
			h.claimNone("hot", 10_000)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusQueued: hot + 100 - 1, engine.StatusClaimed: 1})
		}},
	}
}
