package storetest

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// dqWorkers is how many goroutines race in the concurrency cases.
const dqWorkers = 32

// dqErrs collects failures from worker goroutines (t.Fatal must not be
// called off the test goroutine).
type dqErrs struct {
	mu   sync.Mutex
	errs []string
}

func (e *dqErrs) add(format string, args ...any) {
	e.mu.Lock()
	e.errs = append(e.errs, fmt.Sprintf(format, args...))
	e.mu.Unlock()
}

func (e *dqErrs) check(t *testing.T) {
	t.Helper()
	if len(e.errs) > 0 {
		t.Fatalf("%d worker errors, first: %s", len(e.errs), e.errs[0])
	}
}

// Concurrency: store.md rules 44, 47, 88 and conformance B28.
func dispatchConcurrencyCases() []Case {
	return []Case{
		{"S44_concurrent_claims_on_one_thread_have_one_winner", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			var errs dqErrs
			var winners atomic.Int32
			var won engine.Dispatch
			dqParallel(dqWorkers, func(i int) {
				d, err := s.Claim(h.ctx, "t1", fmt.Sprintf("c%d", i), dqLease, 1000)
				if err != nil {
					errs.add("Claim #%d: %v", i, err)
					return
				}
				if d != nil {
					winners.Add(1)
					won = *d
				}
			})
			errs.check(t)
			if n := winners.Load(); n != 1 {
				t.Fatalf("%d claims won, want exactly 1", n)
			}
			h.same(won)
			h.ack("d1", won.ClaimToken, 2000)
		}},
		{"S44_concurrent_claims_of_a_busy_queue_never_share_a_thread", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			for i := range 8 {
				h.add(fmt.Sprintf("d%d", i), "t1", 1000)
			}
			var errs dqErrs
			var winners atomic.Int32
			dqParallel(dqWorkers, func(i int) {
				d, err := s.Claim(h.ctx, "t1", fmt.Sprintf("c%d", i), dqLease, 1000)
				if err != nil {
					errs.add("Claim #%d: %v", i, err)
				} else if d != nil {
					winners.Add(1)
				}
			})
			errs.check(t)
			if n := winners.Load(); n != 1 {
				t.Fatalf("%d claims won on one thread, want exactly 1", n)
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusClaimed: 1, engine.StatusQueued: 7})
		}},
		{"S47_concurrent_claim_dispatch_on_one_thread_has_one_winner", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			for i := range dqWorkers {
				h.add(fmt.Sprintf("d%02d", i), "t1", 1000)
			}
			var errs dqErrs
			var winners atomic.Int32
			dqParallel(dqWorkers, func(i int) {
				d, err := s.ClaimDispatch(h.ctx, fmt.Sprintf("d%02d", i), fmt.Sprintf("c%d", i), dqLease, 1000)
				if err != nil {
					errs.add("ClaimDispatch #%d: %v", i, err)
				} else if d != nil {
					winners.Add(1)
				}
			})
			errs.check(t)
			if n := winners.Load(); n != 1 {
				t.Fatalf("%d ClaimDispatch calls won on one thread, want exactly 1", n)
			}
			if got := h.list("t1", engine.StatusFilter{engine.StatusClaimed}, 100, 0); len(got) != 1 {
				t.Fatalf("%d claimed dispatches on t1, want 1", len(got))
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusClaimed: 1, engine.StatusQueued: dqWorkers - 1})
		}},
		{"S47_concurrent_claim_dispatch_on_different_threads_all_win", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			for i := range dqWorkers {
				h.add(fmt.Sprintf("d%02d", i), fmt.Sprintf("t%02d", i), 1000)
			}
			var errs dqErrs
			var mu sync.Mutex
			tokens := map[string]bool{}
			dqParallel(dqWorkers, func(i int) {
				d, err := s.ClaimDispatch(h.ctx, fmt.Sprintf("d%02d", i), fmt.Sprintf("c%d", i), dqLease, 1000)
				if err != nil || d == nil {
					errs.add("ClaimDispatch #%d = %v, %v; want the dispatch", i, d, err)
					return
				}
				mu.Lock()
				tokens[d.ClaimToken] = true
				mu.Unlock()
			})
			errs.check(t)
			if len(tokens) != dqWorkers {
				t.Fatalf("%d distinct tokens, want %d", len(tokens), dqWorkers)
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusClaimed: dqWorkers})
		}},
		{"B28_concurrent_enqueues_lose_nothing", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			var errs dqErrs
			dqParallel(dqWorkers, func(i int) {
				// Half share one thread, half have their own.
				thread := "shared"
				if i%2 == 1 {
					thread = fmt.Sprintf("t%02d", i)
				}
				d := dqQueued(fmt.Sprintf("d%02d", i), thread, uint8(i), 1000+int64(i))
				d.DedupeKey = fmt.Sprintf("k%02d", i)
				if _, err := s.Enqueue(h.ctx, d); err != nil {
					errs.add("Enqueue #%d: %v", i, err)
				}
			})
			errs.check(t)
			if got := h.list("shared", nil, 100, 0); len(got) != dqWorkers/2 {
				t.Fatalf("shared thread lists %d dispatches, want %d", len(got), dqWorkers/2)
			}
			for i := range dqWorkers {
				h.status(fmt.Sprintf("d%02d", i), engine.StatusQueued)
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusQueued: dqWorkers})
			if ids := h.queuedThreads(); len(ids) != dqWorkers/2+1 {
				t.Fatalf("QueuedThreadIDs has %d threads, want %d", len(ids), dqWorkers/2+1)
			}
		}},
		{"S36_concurrent_enqueues_of_one_id_have_one_winner", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			var errs dqErrs
			var winners atomic.Int32
			dqParallel(dqWorkers, func(i int) {
				d := dqQueued("same", fmt.Sprintf("t%02d", i), 128, 1000)
				_, err := s.Enqueue(h.ctx, d)
				switch {
				case err == nil:
					winners.Add(1)
				case !errors.Is(err, engine.ErrAlreadyExists):
					errs.add("Enqueue #%d: %v, want nil or ErrAlreadyExists", i, err)
				}
			})
			errs.check(t)
			if n := winners.Load(); n != 1 {
				t.Fatalf("%d enqueues of one id succeeded, want 1", n)
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusQueued: 1})
			if ids := h.queuedThreads(); len(ids) != 1 {
				t.Fatalf("QueuedThreadIDs = %q, want one thread", ids)
			}
		}},
		{"S32_concurrent_enqueues_of_one_dedupe_key_have_one_winner", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			var errs dqErrs
			var winners atomic.Int32
			dqParallel(dqWorkers, func(i int) {
				d := dqQueued(fmt.Sprintf("d%02d", i), "t1", 128, 1000)
				d.DedupeKey = "k"
				_, err := s.Enqueue(h.ctx, d)
				switch {
				case err == nil:
					winners.Add(1)
				case !errors.Is(err, engine.ErrAlreadyExists):
					errs.add("Enqueue #%d: %v, want nil or ErrAlreadyExists", i, err)
				}
			})
			errs.check(t)
			if n := winners.Load(); n != 1 {
				t.Fatalf("%d enqueues with one dedupe key succeeded, want 1", n)
			}
			if got := h.list("t1", nil, 100, 0); len(got) != 1 {
				t.Fatalf("t1 lists %d dispatches, want 1", len(got))
			}
		}},
		{"S72_interrupt_racing_claims_never_lets_a_stale_claim_start", func(t *testing.T, s engine.Store) {
			dqInterruptRace(t, s, false)
		}},
		{"S72_interrupt_racing_enqueue_and_claims_never_lets_a_stale_claim_start", func(t *testing.T, s engine.Store) {
			dqInterruptRace(t, s, true)
		}},
		{"S88_concurrent_reclaims_make_one_transition", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			var errs dqErrs
			var returned atomic.Int32
			dqParallel(dqWorkers/2, func(i int) {
				ds, err := s.ReclaimExpired(h.ctx, 40_000, 10)
				if err != nil {
					errs.add("ReclaimExpired #%d: %v", i, err)
					return
				}
				returned.Add(int32(len(ds)))
			})
			errs.check(t)
			if n := returned.Load(); n != 1 {
				t.Fatalf("the expired lease appears in %d result lists, want 1", n)
			}
			d := h.status("d1", engine.StatusQueued)
			if d.AttemptCount != c.AttemptCount+1 || len(d.Errors) != 1 {
				t.Fatalf("attempt_count %d with %d history entries, want one transition", d.AttemptCount, len(d.Errors))
			}
			dqWantIDs(t, "later sweep", h.reclaim(50_000, 10))
		}},
		{"S51_concurrent_acks_with_one_token_have_one_winner", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			var errs dqErrs
			var winners atomic.Int32
			dqParallel(dqWorkers, func(i int) {
				err := s.Ack(h.ctx, "d1", c.ClaimToken, 2000+int64(i))
				switch {
				case err == nil:
					winners.Add(1)
				case !errors.Is(err, engine.ErrStaleClaim):
					errs.add("Ack #%d: %v, want nil or ErrStaleClaim", i, err)
				}
			})
			errs.check(t)
			if n := winners.Load(); n != 1 {
				t.Fatalf("%d acks succeeded, want 1", n)
			}
			h.status("d1", engine.StatusAcked)
		}},
		{"S66_cancel_racing_claim_dispatch_has_one_winner", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			for round := range 16 {
				id := fmt.Sprintf("d%02d", round)
				h.add(id, "t-"+id, 1000)
				var cancelled, claimed *engine.Dispatch
				var cErr, kErr error
				dqParallel(2, func(i int) {
					if i == 0 {
						cancelled, cErr = s.Cancel(h.ctx, id, 2000)
					} else {
						claimed, kErr = s.ClaimDispatch(h.ctx, id, "c1", dqLease, 2000)
					}
				})
				if cErr != nil || kErr != nil {
					t.Fatalf("round %d: Cancel error %v, ClaimDispatch error %v", round, cErr, kErr)
				}
				if (cancelled == nil) == (claimed == nil) {
					t.Fatalf("round %d: cancel won %v, claim won %v; want exactly one", round, cancelled != nil, claimed != nil)
				}
				want := engine.StatusCancelled
				if claimed != nil {
					want = engine.StatusClaimed
				}
				h.status(id, want)
			}
		}},
	}
}

// dqInterruptRace runs rounds of Interrupt racing Claim and ClaimDispatch on
// one thread (and, with enqueue, an Enqueue too). A claim that won before the
// interrupt must be reported as the interrupt's active dispatch and can never
// start; one that won after it carries the new epoch and starts normally.
func dqInterruptRace(t *testing.T, s engine.Store, enqueue bool) {
	h := newDQ(t, s)
	const rounds = 24
	var before, after, none int
	defer func() { t.Logf("claims won before the interrupt: %d, after: %d, none: %d", before, after, none) }()
	for round := range rounds {
		now := int64(1000 + 100*round)
		pre := fmt.Sprintf("pre%02d", round)
		post := fmt.Sprintf("post%02d", round)
		if !enqueue {
			h.add(pre, "t1", now)
		} else {
			h.add(pre, "t1", now+50) // only ClaimDispatch can take it
		}
		var res engine.InterruptResult
		var iErr, eErr error
		claims := make([]*engine.Dispatch, 3)
		claimErrs := make([]error, 3)
		// Vary who goes first from round to round; the assertions hold
		// for every interleaving, the delays only make more of them occur.
		lead := time.Duration(round%4) * 100 * time.Microsecond
		dqParallel(5, func(i int) {
			if i == 0 {
				time.Sleep(lead)
			} else {
				time.Sleep(300*time.Microsecond - lead)
			}
			switch i {
			case 0:
				res, iErr = s.Interrupt(h.ctx, "t1", now+1)
			case 1:
				if enqueue {
					_, eErr = s.Enqueue(h.ctx, dqQueued(post, "t1", 128, now))
				}
			case 2:
				claims[0], claimErrs[0] = s.ClaimDispatch(h.ctx, pre, "c-id", dqLease, now+2)
			default:
				claims[i-2], claimErrs[i-2] = s.Claim(h.ctx, "t1", fmt.Sprintf("c%d", i), dqLease, now+2)
			}
		})
		if iErr != nil || eErr != nil {
			t.Fatalf("round %d: Interrupt error %v, Enqueue error %v", round, iErr, eErr)
		}
		var won []engine.Dispatch
		for i, c := range claims {
			if claimErrs[i] != nil {
				t.Fatalf("round %d: claim #%d: %v", round, i, claimErrs[i])
			}
			if c != nil {
				won = append(won, *c)
			}
		}
		if len(won) > 1 {
			t.Fatalf("round %d: %d claims won on one thread: %q", round, len(won), dqIDs(won))
		}
		if res.SupersededN != len(res.Superseded) {
			t.Fatalf("round %d: superseded_count %d, list %d", round, res.SupersededN, len(res.Superseded))
		}
		if len(won) == 0 {
			none++
			// Nobody claimed: the pre-interrupt dispatch was superseded.
			h.status(pre, engine.StatusSuperseded)
			if !enqueue {
				dqWantIDs(t, fmt.Sprintf("round %d superseded", round), res.Superseded, pre)
				continue
			}
			// post was superseded too (enqueued first) or is queued
			// under the new epoch (enqueued after).
			if d := h.load(post); d.Status == engine.StatusQueued {
				if d.Epoch != res.NewEpoch {
					t.Fatalf("round %d: %s queued with epoch %d after interrupt to %d", round, post, d.Epoch, res.NewEpoch)
				}
				dqWantIDs(t, fmt.Sprintf("round %d superseded", round), res.Superseded, pre)
				h.cancel(post, now+3)
			} else {
				dqWantIDSet(t, fmt.Sprintf("round %d superseded", round), res.Superseded, pre, post)
			}
			continue
		}
		c := won[0]
		err := s.RecordDispatchStart(h.ctx, c.DispatchID, c.ClaimToken, "inst", now+3)
		if c.Epoch == res.NewEpoch {
			// Claimed after the interrupt: only a post-interrupt dispatch.
			if c.DispatchID != post {
				t.Fatalf("round %d: claimed %s with the new epoch %d", round, c.DispatchID, c.Epoch)
			}
			if err != nil {
				t.Fatalf("round %d: start of post-interrupt claim %s: %v", round, c.DispatchID, err)
			}
			after++
			h.ack(c.DispatchID, c.ClaimToken, now+4)
			h.status(pre, engine.StatusSuperseded)
			continue
		}
		// Claimed before the interrupt: it must be the active dispatch,
		// and it can never start.
		if res.Active == nil || res.Active.DispatchID != c.DispatchID || res.Active.ClaimToken != c.ClaimToken {
			t.Fatalf("round %d: %s claimed with epoch %d (new %d) but interrupt reported active %v",
				round, c.DispatchID, c.Epoch, res.NewEpoch, res.Active)
		}
		if res.SupersededN != 0 && !enqueue {
			t.Fatalf("round %d: interrupt superseded %q while %s was claimed", round, dqIDs(res.Superseded), c.DispatchID)
		}
		if !errors.Is(err, engine.ErrVersionConflict) {
			t.Fatalf("round %d: start of stale claim %s = %v, want a version conflict", round, c.DispatchID, err)
		}
		h.status(c.DispatchID, engine.StatusSuperseded)
		before++
		if enqueue {
			if d := h.load(post); d.Status == engine.StatusQueued {
				h.cancel(post, now+4)
			}
		}
	}
	if e := h.epoch("t1"); e != rounds {
		t.Fatalf("epoch after %d interrupts = %d", rounds, e)
	}
	h.claimNone("t1", 1_000_000)
}
