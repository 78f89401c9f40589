package natsstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// threadOf returns the thread of a dispatch (from the index, else from the
// record), "" when the dispatch does not exist. It only chooses the lock
// an operation takes; the operation reads the record again under it.
func (s *Store) threadOf(ctx context.Context, id string) (string, error) {
	if t := s.idx.threadOf(id); t != "" {
		return t, nil
	}
	subj := s.sub.dispatch(id)
	r, err := s.getLast(ctx, subj)
	if err != nil || r.data == nil {
		return "", err
	}
	d, err := decodeDispatch(subj, r.data)
	if err != nil {
		return "", err
	}
	return d.ThreadID, nil
}

// updateDispatch runs fn as a transaction under the lock of the
// dispatch's thread.
func (s *Store) updateDispatch(ctx context.Context, id string, fn func(t *txn) error) error {
	thread, err := s.threadOf(ctx, id)
	if err != nil {
		return err
	}
	return s.update(ctx, thread, fn)
}

// claimOne moves the queued dispatch old to claimed under token.
func (t *txn) claimOne(old *engine.Dispatch, token, consumerID string, leaseUntil, now int64) (*engine.Dispatch, error) {
	d := old.Clone()
	if err := d.Claim(token, consumerID, leaseUntil, now); err != nil {
		return nil, err
	}
	if err := t.putDispatch(old, &d, now); err != nil {
		return nil, err
	}
	return &d, nil
}

// Enqueue implements engine.DispatchStore.
func (s *Store) Enqueue(ctx context.Context, d engine.Dispatch) (engine.Dispatch, error) {
	d = d.Clone()
	if err := d.PrepareEnqueue(); err != nil {
		return engine.Dispatch{}, err
	}
	if err := s.update(ctx, d.ThreadID, func(t *txn) error { return t.enqueue(&d) }); err != nil {
		return engine.Dispatch{}, fmt.Errorf("enqueue %s: %w", d.DispatchID, err)
	}
	s.signal(&d)
	return d, nil
}

// enqueue stores a prepared queued dispatch, stamping its epoch.
func (t *txn) enqueue(d *engine.Dispatch) error {
	if b, err := t.get(t.s.sub.dispatch(d.DispatchID)); err != nil {
		return err
	} else if b != nil {
		return fmt.Errorf("dispatch_id=%s: %w", d.DispatchID, engine.ErrAlreadyExists)
	}
	if d.DedupeKey != "" {
		if b, err := t.get(t.s.sub.dedupe(d.ThreadID, d.DedupeKey)); err != nil {
			return err
		} else if b != nil {
			return fmt.Errorf("dedupe_key=%s: %w", d.DedupeKey, engine.ErrAlreadyExists)
		}
	}
	ep, err := t.epoch(d.ThreadID)
	if err != nil {
		return err
	}
	d.Epoch = ep
	return t.putDispatch(nil, d, d.UpdatedAt)
}

// Submit implements engine.RunStore: the checkpoint and the enqueue of a
// submitted run in one batch.
func (s *Store) Submit(ctx context.Context, c engine.Checkpoint, d engine.Dispatch) ([]engine.MessageRecord, engine.Dispatch, error) {
	d, run, err := engine.PrepareSubmit(&c, d)
	if err != nil {
		return nil, engine.Dispatch{}, err
	}
	var recs []engine.MessageRecord
	err = s.update(ctx, c.ThreadID, func(t *txn) error {
		var err error
		if recs, err = t.checkpoint(&c, run); err != nil {
			return err
		}
		return t.enqueue(&d)
	})
	if err != nil {
		return nil, engine.Dispatch{}, fmt.Errorf("submit %s: %w", c.ThreadID, err)
	}
	s.signal(&d)
	return recs, d, nil
}

// Claim implements engine.DispatchStore (see claimNext).
func (s *Store) Claim(ctx context.Context, threadID, consumerID string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	ms, token, err := engine.ClaimArgs("thread_id", threadID, consumerID, lease)
	if err != nil {
		return nil, err
	}
	out, err := s.claimLoop(ctx, threadID, func(t *txn) (*engine.Dispatch, bool, error) {
		return t.claimStartNext(threadID, consumerID, token, now+ms, "", now)
	})
	if err != nil {
		return nil, fmt.Errorf("claim thread %s: %w", threadID, err)
	}
	return out, nil
}

// claimLoop runs op, a claim of the thread's next dispatch, once more
// for as long as it stops after superseding a chunk of stale entries
// (claimNext's staleLeft) without claiming: one call supersedes all of
// them, a chunk a batch, and returns the dispatch behind them or none. A
// claim that came back empty after one chunk left the thread at the head
// of the ready order, its stale entries each waiting for a dispatcher
// wake (found by review).
func (s *Store) claimLoop(ctx context.Context, threadID string, op func(t *txn) (*engine.Dispatch, bool, error)) (*engine.Dispatch, error) {
	for {
		var out *engine.Dispatch
		var more bool
		err := s.update(ctx, threadID, func(t *txn) error {
			var err error
			out, more, err = op(t) // a retried transaction starts afresh
			return err
		})
		if err != nil || out != nil || !more {
			return out, err
		}
		// A supersession moves no thread state: bring the index up to
		// the batch just committed, or the next would load its
		// dispatches again.
		if err := s.fresh(ctx); err != nil {
			return nil, err
		}
	}
}

// claimStartNext is claimNext, then startUnlessDone of what it claimed
// unless instanceID is "".
func (t *txn) claimStartNext(threadID, consumerID, token string, leaseUntil int64, instanceID string, now int64) (*engine.Dispatch, bool, error) {
	claimed, staleLeft, err := t.claimNext(threadID, consumerID, token, leaseUntil, now)
	if err != nil || claimed == nil || instanceID == "" {
		return claimed, staleLeft, err
	}
	out, err := t.startUnlessDone(claimed, instanceID, now)
	return out, false, err
}

var _ engine.StartClaimer = (*Store)(nil)

// ClaimStart implements engine.StartClaimer: Claim, then in the same
// transaction RecordDispatchStart, unless the dispatch's run is done.
func (s *Store) ClaimStart(ctx context.Context, threadID, consumerID string, lease time.Duration, instanceID string, now int64) (*engine.Dispatch, error) {
	ms, token, err := engine.ClaimArgs("thread_id", threadID, consumerID, lease)
	if err != nil {
		return nil, err
	}
	if err := engine.ValidateID("instance_id", instanceID); err != nil {
		return nil, err
	}
	out, err := s.claimLoop(ctx, threadID, func(t *txn) (*engine.Dispatch, bool, error) {
		return t.claimStartNext(threadID, consumerID, token, now+ms, instanceID, now)
	})
	if err != nil {
		return nil, fmt.Errorf("claim thread %s: %w", threadID, err)
	}
	return out, nil
}

// start records the start of a dispatch claimed in this transaction
// (RecordDispatchStart without its ownership checks: the claim is ours
// and of the current epoch) and returns the started dispatch.
func (t *txn) start(claimed *engine.Dispatch, instanceID string, now int64) (*engine.Dispatch, error) {
	started := claimed.Clone()
	if err := started.RecordStart(instanceID, now); err != nil {
		return nil, err
	}
	if err := t.updateRunOf(&started, func(r *engine.RunRecord) bool { return r.MarkStarted(&started, instanceID, now/1000) }); err != nil {
		return nil, err
	}
	if err := t.putDispatch(claimed, &started, now); err != nil {
		return nil, err
	}
	return &started, nil
}

// startUnlessDone is start, except that a dispatch whose run is already
// done (the engine acks it without running it) or waiting (a
// continuation: the engine rebuilds the request from the run as it waits,
// then records the start) is left claimed only.
func (t *txn) startUnlessDone(claimed *engine.Dispatch, instanceID string, now int64) (*engine.Dispatch, error) {
	run, err := t.loadRun(claimed.RunID)
	if err != nil {
		return nil, err
	}
	if run != nil && (run.Status == engine.RunDone || run.Status == engine.RunWaiting) {
		return claimed, nil
	}
	return t.start(claimed, instanceID, now)
}

// claimNext claims the thread's next due dispatch of its current epoch
// (nil: none, or the thread holds a claim), superseding the stale queued
// dispatches it meets on the way. The thread state says whether the
// thread holds a claim; the index, once it has applied the sequence the
// state was read at, knows every dispatch that was queued then and picks
// the best one; the claim rewrites the dispatch and the state, each
// expected at the sequence read, so a change of either by anyone refuses
// the batch. It sees t's own writes: after a transition in t that freed
// the thread's claim (CompleteAndClaim) it claims the next dispatch in the
// same batch.
func (t *txn) claimNext(threadID, consumerID, token string, leaseUntil, now int64) (_ *engine.Dispatch, staleLeft bool, err error) {
	s := t.s
	st, err := t.state(threadID)
	if err != nil || st.Claimed != "" {
		return nil, false, err
	}
	// t.state read the state if t had neither read nor written it; a
	// state t wrote without reading is expected not to exist (sequence 0).
	if err := s.waitIndex(t.ctx, t.reads[s.sub.state(threadID)].seq); err != nil {
		return nil, false, err
	}
	cands := s.idx.threadDispatches(threadID, func(e *dEntry) bool { return e.status == engine.StatusQueued })
	stale := 0
	for _, c := range cands {
		if c.epoch >= st.Epoch && c.avail > now {
			continue
		}
		if c.epoch < st.Epoch && stale == staleChunk {
			// At most staleChunk a batch: the claim goes on in the
			// next (claimLoop).
			return nil, true, nil
		}
		d, err := t.loadDispatch(c.id)
		if err != nil {
			return nil, false, err
		}
		if d == nil || d.Status != engine.StatusQueued {
			continue
		}
		if d.Epoch < st.Epoch {
			// An interrupt whose later batches a crash prevented leaves
			// stale queued dispatches behind; a record restored from
			// elsewhere may too.
			if stale == staleChunk {
				return nil, true, nil
			}
			stale++
			old := d.Clone()
			d.Supersede(st.Epoch, engine.ReasonNewerEpoch, now)
			if err := t.putDispatch(&old, d, now); err != nil {
				return nil, false, err
			}
			continue
		}
		if d.AvailableAt > now {
			continue
		}
		d, err = t.claimOne(d, token, consumerID, leaseUntil, now)
		return d, false, err
	}
	return nil, false, nil
}

// ClaimDispatch implements engine.DispatchStore.
func (s *Store) ClaimDispatch(ctx context.Context, dispatchID, consumerID string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	ms, token, err := engine.ClaimArgs("dispatch_id", dispatchID, consumerID, lease)
	if err != nil {
		return nil, err
	}
	var out *engine.Dispatch
	err = s.updateDispatch(ctx, dispatchID, func(t *txn) error {
		out = nil
		old, err := t.loadDispatch(dispatchID)
		if err != nil || old == nil || old.Status != engine.StatusQueued {
			return err
		}
		st, err := t.state(old.ThreadID)
		if err != nil {
			return err
		}
		if old.Epoch < st.Epoch {
			d := old.Clone()
			d.Supersede(st.Epoch, engine.ReasonNewerEpoch, now)
			return t.putDispatch(old, &d, now)
		}
		if st.Claimed != "" {
			return nil
		}
		out, err = t.claimOne(old, token, consumerID, now+ms, now)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("claim dispatch %s: %w", dispatchID, err)
	}
	return out, nil
}

// owned runs one transition on a dispatch claimed under token: a missing
// dispatch is ErrNotFound, a wrong token ErrStaleClaim; a stale epoch
// supersedes the dispatch (committed) and returns a *ConflictError.
// mutate changes the clone it is given; its error aborts the operation.
func (s *Store) owned(ctx context.Context, name, dispatchID, token, staleReason string, now int64, mutate func(t *txn, d *engine.Dispatch) error) (engine.Dispatch, error) {
	return s.ownedThen(ctx, name, dispatchID, token, staleReason, now, mutate, nil)
}

// ownedThen is owned with then, when not nil, run in the same transaction
// (one batch) after the mutated dispatch is written (not when it was
// superseded); its error aborts the operation.
func (s *Store) ownedThen(ctx context.Context, name, dispatchID, token, staleReason string, now int64, mutate, then func(t *txn, d *engine.Dispatch) error) (engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return engine.Dispatch{}, err
	}
	var out engine.Dispatch
	var result error // returned after a commit that must happen anyway
	err := s.updateDispatch(ctx, dispatchID, func(t *txn) error {
		result = nil
		old, err := t.loadDispatch(dispatchID)
		if err != nil {
			return err
		}
		if old == nil {
			return fmt.Errorf("dispatch %s: %w", dispatchID, engine.ErrNotFound)
		}
		if err := old.CheckOwner(token); err != nil {
			return err
		}
		ep, err := t.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		d := old.Clone()
		if old.Epoch < ep {
			d.Supersede(ep, staleReason, now)
			result = &engine.ConflictError{What: "dispatch_epoch", Expected: old.Epoch, Actual: ep}
			out = d
			return t.putDispatch(old, &d, now)
		}
		if err := mutate(t, &d); err != nil {
			return err
		}
		out = d
		if err := t.putDispatch(old, &d, now); err != nil || then == nil {
			return err
		}
		return then(t, &d)
	})
	if err == nil {
		err = result
	}
	if err != nil {
		return out, fmt.Errorf("%s %s: %w", name, dispatchID, err)
	}
	return out, nil
}

// Ack implements engine.DispatchStore.
func (s *Store) Ack(ctx context.Context, dispatchID, claimToken string, now int64) error {
	_, err := s.owned(ctx, "ack", dispatchID, claimToken, engine.ReasonStaleBeforeAck, now, func(_ *txn, d *engine.Dispatch) error {
		d.Ack(now)
		return nil
	})
	return err
}

// RecordDispatchStart implements engine.DispatchStore.
func (s *Store) RecordDispatchStart(ctx context.Context, dispatchID, claimToken, instanceID string, now int64) error {
	_, err := s.owned(ctx, "record_dispatch_start", dispatchID, claimToken, engine.ReasonStaleBeforeStart, now, func(t *txn, d *engine.Dispatch) error {
		if err := d.RecordStart(instanceID, now); err != nil {
			return err
		}
		return t.updateRunOf(d, func(r *engine.RunRecord) bool { return r.MarkStarted(d, instanceID, now/1000) })
	})
	return err
}

// RecordRunResult implements engine.DispatchStore.
func (s *Store) RecordRunResult(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64) error {
	_, err := s.owned(ctx, "record_run_result", dispatchID, claimToken, engine.ReasonStaleBeforeResult, now, func(t *txn, d *engine.Dispatch) error {
		return t.recordResult(d, result, now)
	})
	return err
}

// recordResult projects an attempt's result onto the dispatch and its run.
func (t *txn) recordResult(d *engine.Dispatch, result engine.RunResult, now int64) error {
	if err := d.RecordResult(result, now); err != nil {
		return err
	}
	return t.updateRunOf(d, func(r *engine.RunRecord) bool { return r.ApplyResult(d, result, now/1000) })
}

// Complete implements engine.DispatchStore.
func (s *Store) Complete(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64) error {
	_, err := s.owned(ctx, "complete", dispatchID, claimToken, engine.ReasonStaleBeforeResult, now, func(t *txn, d *engine.Dispatch) error {
		return t.complete(d, result, now)
	})
	return err
}

// complete records an attempt's result and acks its dispatch.
func (t *txn) complete(d *engine.Dispatch, result engine.RunResult, now int64) error {
	if err := t.recordResult(d, result, now); err != nil {
		return err
	}
	d.Ack(now)
	return nil
}

var _ engine.CompleteClaimer = (*Store)(nil)

// CompleteAndClaim implements engine.CompleteClaimer: Complete, then, in
// the same atomic batch, Claim of the thread's next due dispatch
// (claimNext, under the thread lock Complete takes). A refused completion
// (unknown dispatch, wrong token, superseded epoch) claims nothing and
// returns Complete's error. Like Claim and Complete it publishes no
// signal: the claimed dispatch's enqueue signal finds the thread claimed.
func (s *Store) CompleteAndClaim(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64, consumerID string, lease time.Duration) (*engine.Dispatch, error) {
	return s.completeAndClaim(ctx, dispatchID, claimToken, result, now, consumerID, lease, "")
}

// CompleteAndClaimStart implements engine.StartClaimer: CompleteAndClaim
// whose claim also records the next dispatch's start, as ClaimStart.
func (s *Store) CompleteAndClaimStart(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64, consumerID string, lease time.Duration, instanceID string) (*engine.Dispatch, error) {
	if err := engine.ValidateID("instance_id", instanceID); err != nil {
		return nil, err
	}
	return s.completeAndClaim(ctx, dispatchID, claimToken, result, now, consumerID, lease, instanceID)
}

// completeAndClaim starts the next dispatch too unless instanceID is "".
func (s *Store) completeAndClaim(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64, consumerID string, lease time.Duration, instanceID string) (*engine.Dispatch, error) {
	ms, token, err := engine.ClaimArgs("dispatch_id", dispatchID, consumerID, lease)
	if err != nil {
		return nil, err
	}
	var next *engine.Dispatch
	var staleLeft bool
	var threadID string
	_, err = s.ownedThen(ctx, "complete", dispatchID, claimToken, engine.ReasonStaleBeforeResult, now, func(t *txn, d *engine.Dispatch) error {
		next, staleLeft = nil, false // a retried transaction starts afresh
		return t.complete(d, result, now)
	}, func(t *txn, d *engine.Dispatch) error {
		var err error
		threadID = d.ThreadID
		if next, staleLeft, err = t.claimStartNext(d.ThreadID, consumerID, token, now+ms, instanceID, now); err != nil {
			return fmt.Errorf("%w: %w", engine.ErrNextClaim, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if next == nil && staleLeft {
		// The completion is committed; the claim goes on past the stale
		// entries in batches of its own (claimLoop). Its failure is no
		// ErrNextClaim, which promises that nothing was written: the
		// completion stands, and the dispatcher claims the thread later.
		if err := s.fresh(ctx); err != nil {
			return nil, nil
		}
		next, err = s.claimLoop(ctx, threadID, func(t *txn) (*engine.Dispatch, bool, error) {
			return t.claimStartNext(threadID, consumerID, token, now+ms, instanceID, now)
		})
		if err != nil {
			return nil, nil
		}
	}
	return next, nil
}

// Nack implements engine.DispatchStore.
func (s *Store) Nack(ctx context.Context, dispatchID, claimToken string, retryAt int64, errMsg string, now int64) (engine.Dispatch, error) {
	d, err := s.owned(ctx, "nack", dispatchID, claimToken, engine.ReasonStaleBeforeNack, now, func(_ *txn, d *engine.Dispatch) error {
		d.Nack(retryAt, errMsg, now)
		return nil
	})
	if err == nil {
		s.signal(&d)
	}
	return d, err
}

// DeadLetter implements engine.DispatchStore.
func (s *Store) DeadLetter(ctx context.Context, dispatchID, claimToken, errMsg string, now int64) error {
	_, err := s.owned(ctx, "dead_letter", dispatchID, claimToken, engine.ReasonStaleBeforeDead, now, func(_ *txn, d *engine.Dispatch) error {
		d.DeadLetter(errMsg, now)
		return nil
	})
	return err
}

// Release implements engine.DispatchStore.
func (s *Store) Release(ctx context.Context, dispatchID, claimToken string, now int64) (engine.Dispatch, error) {
	d, err := s.owned(ctx, "release", dispatchID, claimToken, engine.ReasonStaleBeforeRelease, now, func(_ *txn, d *engine.Dispatch) error {
		d.Release(now)
		return nil
	})
	if err == nil {
		s.signal(&d)
	}
	return d, err
}

// Cancel implements engine.DispatchStore.
func (s *Store) Cancel(ctx context.Context, dispatchID string, now int64) (*engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return nil, err
	}
	var out *engine.Dispatch
	err := s.updateDispatch(ctx, dispatchID, func(t *txn) error {
		out = nil
		old, err := t.loadDispatch(dispatchID)
		if err != nil || old == nil || old.Status != engine.StatusQueued {
			return err
		}
		d := old.Clone()
		d.Cancel(now)
		if err := t.putDispatch(old, &d, now); err != nil {
			return err
		}
		out = &d
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cancel %s: %w", dispatchID, err)
	}
	return out, nil
}

// ExtendLease implements engine.DispatchStore.
func (s *Store) ExtendLease(ctx context.Context, dispatchID, claimToken string, lease time.Duration, now int64) (bool, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return false, err
	}
	ms, err := engine.LeaseMs(lease)
	if err != nil {
		return false, err
	}
	var ok bool
	err = s.updateDispatch(ctx, dispatchID, func(t *txn) error {
		ok = false
		old, err := t.loadDispatch(dispatchID)
		if err != nil || old == nil || old.CheckOwner(claimToken) != nil {
			return err
		}
		ep, err := t.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		d := old.Clone()
		if old.Epoch < ep {
			d.Supersede(ep, engine.ReasonStaleDuringRenewal, now)
			return t.putDispatch(old, &d, now)
		}
		d.LeaseUntil = now + ms
		d.UpdatedAt = now
		ok = true
		return t.putDispatch(old, &d, now)
	})
	if err != nil {
		return false, fmt.Errorf("extend lease %s: %w", dispatchID, err)
	}
	return ok, nil
}

// interruptChunk bounds the queued dispatches one interrupt batch
// supersedes (a variable for tests). Each costs the batch two or three
// messages of the server's 1 000 (a batch refused as too large is
// halved): in one batch an interrupt of a thread with more than about
// 500 queued dispatches was refused as too large.
var interruptChunk = 200

// staleChunk bounds the stale queued dispatches (an older epoch's, left
// by an interrupt a crash cut short) one claim supersedes on its way:
// the claim's batch stays small, and the claims after it take the rest.
var staleChunk = 32

// Interrupt implements engine.DispatchStore. Its first batch bumps the
// thread's epoch and supersedes up to interruptChunk queued dispatches;
// further batches supersede the rest, each atomic. Each batch expects
// the thread state at the sequence read, and every transition into
// queued rewrites that state, so no dispatch can become queued unseen
// between a read and its commit. From the first batch on no dispatch of
// an older epoch can be claimed (claimNext supersedes any it meets), so
// a crash between batches leaves stale entries that the thread's claims
// supersede, never work that runs.
func (s *Store) Interrupt(ctx context.Context, threadID string, now int64) (engine.InterruptResult, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return engine.InterruptResult{}, err
	}
	chunk := interruptChunk
	res, more, err := s.interruptFirst(ctx, threadID, now, chunk)
	for errors.Is(err, engine.ErrTooLarge) && chunk > 1 {
		chunk /= 2
		res, more, err = s.interruptFirst(ctx, threadID, now, chunk)
	}
	if err != nil {
		return engine.InterruptResult{}, fmt.Errorf("interrupt thread %s: %w", threadID, err)
	}
	if more {
		return s.supersedeRest(ctx, threadID, res, chunk, now)
	}
	res.SupersededN = len(res.Superseded)
	return res, nil
}

// supersedeRest is an interrupt's batches after its first (res): the
// thread's queued dispatches of an older epoch than res.NewEpoch, chunk
// a batch.
func (s *Store) supersedeRest(ctx context.Context, threadID string, res engine.InterruptResult, chunk int, now int64) (engine.InterruptResult, error) {
	var err error
	for more := true; more; {
		// The batches after the first read no thread state: what they
		// supersede is of an older epoch, and nothing of one can become
		// queued again, so a batch need not fail on another process's
		// enqueue. The index is brought up to this process's writes, the
		// batch before this one among them.
		if err = s.fresh(ctx); err == nil {
			var got []engine.Dispatch
			err = s.update(ctx, threadID, func(t *txn) error {
				var err error
				got, more, err = t.supersedeOlder(threadID, res.NewEpoch, now, chunk)
				return err
			})
			if err == nil {
				res.Superseded = append(res.Superseded, got...)
				continue
			}
		}
		if errors.Is(err, engine.ErrTooLarge) && chunk > 1 {
			chunk, more = chunk/2, true
			continue
		}
		// The epoch is bumped: what is left is superseded as the
		// thread's claims meet it, or by the next interrupt.
		res.SupersededN = len(res.Superseded)
		return res, fmt.Errorf("interrupt thread %s: %d queued dispatches superseded, the rest not yet: %w", threadID, len(res.Superseded), err)
	}
	res.SupersededN = len(res.Superseded)
	return res, nil
}

// interruptFirst is an interrupt's first batch: the epoch bump and the
// first chunk (up to n) of the thread's queued dispatches superseded.
func (s *Store) interruptFirst(ctx context.Context, threadID string, now int64, n int) (res engine.InterruptResult, more bool, err error) {
	var chunk []engine.Dispatch
	err = s.update(ctx, threadID, func(t *txn) error {
		before, err := t.state(threadID)
		if err != nil {
			return err
		}
		st := before
		st.Epoch++
		if err := t.putState(threadID, st); err != nil {
			return err
		}
		res.NewEpoch, res.Active = st.Epoch, nil
		if before.Claimed != "" {
			a, err := t.mustLoad(threadID, before.Claimed)
			if err != nil {
				return err
			}
			res.Active = a
		}
		chunk, more, err = t.supersedeOlder(threadID, st.Epoch, now, n)
		return err
	})
	res.Superseded = append([]engine.Dispatch{}, chunk...)
	return res, more, err
}

// supersedeOlder supersedes, as interrupted, up to n of the thread's
// queued dispatches of an epoch before ep, and reports whether more may
// follow. When t has read the thread's state, the index is brought up to
// it first.
func (t *txn) supersedeOlder(threadID string, ep uint64, now int64, n int) ([]engine.Dispatch, bool, error) {
	s := t.s
	if err := s.waitIndex(t.ctx, t.reads[s.sub.state(threadID)].seq); err != nil {
		return nil, false, err
	}
	queued := s.idx.threadDispatches(threadID, func(e *dEntry) bool { return e.status == engine.StatusQueued && e.epoch < ep })
	out := []engine.Dispatch{}
	for i, c := range queued {
		if len(out) == n {
			return out, i < len(queued), nil
		}
		old, err := t.loadDispatch(c.id)
		if err != nil {
			return nil, false, err
		}
		if old == nil || old.Status != engine.StatusQueued || old.Epoch >= ep {
			continue
		}
		d := old.Clone()
		d.Supersede(ep, engine.ReasonInterrupt, now)
		if err := t.putDispatch(old, &d, now); err != nil {
			return nil, false, err
		}
		out = append(out, d)
	}
	return out, false, nil
}

// CurrentEpoch implements engine.DispatchStore.
func (s *Store) CurrentEpoch(ctx context.Context, threadID string) (uint64, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return 0, err
	}
	subj := s.sub.state(threadID)
	r, err := s.getLast(ctx, subj)
	if err != nil {
		return 0, fmt.Errorf("current epoch of %s: %w", threadID, err)
	}
	st, err := decodeState(subj, r.data)
	return st.Epoch, err
}

// SupersedeClaimed implements engine.DispatchStore.
func (s *Store) SupersedeClaimed(ctx context.Context, dispatchID, claimToken, reason string, now int64) (*engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return nil, err
	}
	var out *engine.Dispatch
	err := s.updateDispatch(ctx, dispatchID, func(t *txn) error {
		out = nil
		old, err := t.loadDispatch(dispatchID)
		if err != nil || old == nil || old.Status != engine.StatusClaimed {
			return err
		}
		if err := old.CheckOwner(claimToken); err != nil {
			return err
		}
		ep, err := t.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		d := old.Clone()
		d.Supersede(ep, reason, now)
		if err := t.putDispatch(old, &d, now); err != nil {
			return err
		}
		out = &d
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("supersede claimed %s: %w", dispatchID, err)
	}
	return out, nil
}

// Requeue implements engine.DispatchStore.
func (s *Store) Requeue(ctx context.Context, dispatchID, newDispatchID string, now int64) (engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return engine.Dispatch{}, err
	}
	var out engine.Dispatch
	err := s.updateDispatch(ctx, dispatchID, func(t *txn) error {
		old, err := t.loadDispatch(dispatchID)
		if err != nil {
			return err
		}
		if old == nil {
			return fmt.Errorf("dispatch %s: %w", dispatchID, engine.ErrNotFound)
		}
		if old.Status != engine.StatusDeadLetter {
			return engine.Validationf("dispatch %s: status %s is not dead_letter", dispatchID, old.Status)
		}
		if old.RequeuedAs == "" {
			if err := engine.ValidateID("dispatch_id", newDispatchID); err != nil {
				return err
			}
			if b, err := t.get(t.s.sub.dispatch(newDispatchID)); err != nil {
				return err
			} else if b != nil {
				return fmt.Errorf("dispatch_id=%s: %w", newDispatchID, engine.ErrAlreadyExists)
			}
		}
		ep, err := t.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		dl := old.Clone()
		n, err := dl.Requeue(newDispatchID, ep, now)
		if err != nil {
			return err
		}
		if n.DedupeKey != "" {
			if b, err := t.get(t.s.sub.dedupe(n.ThreadID, n.DedupeKey)); err != nil {
				return err
			} else if b != nil {
				return fmt.Errorf("dedupe_key=%s: %w", n.DedupeKey, engine.ErrAlreadyExists)
			}
		}
		run, err := t.loadRun(n.RunID)
		if err != nil {
			return err
		}
		if run != nil && run.ThreadID == n.ThreadID && run.MovedOnFrom(old.DispatchID) {
			return engine.ErrRunMovedOn(dispatchID, run)
		}
		if err := t.putDispatch(old, &dl, now); err != nil {
			return err
		}
		if err := t.putDispatch(nil, &n, now); err != nil {
			return err
		}
		out = n
		if run == nil || run.ThreadID != n.ThreadID {
			return nil
		}
		r := *run
		r.Reopen(n.DispatchID, now/1000)
		return t.writeRun(run, &r, true)
	})
	if err != nil {
		return engine.Dispatch{}, fmt.Errorf("requeue %s: %w", dispatchID, err)
	}
	s.signal(&out)
	return out, nil
}

// ReclaimExpired implements engine.DispatchStore. The index lists the
// candidates (claimed, lease_until < now, oldest lease first); each is
// read again and reclaimed in its own transaction, so a candidate another
// process settled meanwhile is skipped, and two concurrent reclaims of one
// lease make one transition. A wave of candidates is reclaimed at once,
// so that their transactions merge into one atomic batch (group commit,
// group.go): one at a time, each paid a batch of its own, about 5 ms
// (BenchmarkReclaimExpired). The wave adapts: it halves after a wave
// during which a publish of this store was refused (another sidecar
// sweeping the same leases refuses the whole merged batch, whose members
// then publish one by one), down to one at a time, and doubles after one
// without, up to maxReclaimWave. The result keeps the candidates' order.
func (s *Store) ReclaimExpired(ctx context.Context, now int64, limit int) ([]engine.Dispatch, error) {
	if limit <= 0 {
		return nil, nil
	}
	if err := s.fresh(ctx); err != nil {
		return nil, fmt.Errorf("reclaim expired leases: %w", err)
	}
	var out []engine.Dispatch
	cands := s.idx.expired(now)
	for len(cands) > 0 && len(out) < limit {
		// Superseded and skipped candidates do not count against limit:
		// a wave takes no more than the reclaims still allowed.
		size := int(s.reclaimWave.Load())
		if size <= 0 {
			size = maxReclaimWave
		}
		wave := cands[:min(len(cands), limit-len(out), size)]
		cands = cands[len(wave):]
		got := make([]*engine.Dispatch, len(wave))
		errs := make([]error, len(wave))
		refused := s.metrics.commitsConflict.Get()
		var wg sync.WaitGroup
		for i, c := range wave {
			wg.Go(func() { got[i], errs[i] = s.reclaimOne(ctx, c, now) })
		}
		wg.Wait()
		if s.metrics.commitsConflict.Get() > refused {
			size = max(1, size/2)
		} else {
			size = min(maxReclaimWave, size*2)
		}
		s.reclaimWave.Store(int32(size))
		var first error
		for i, d := range got {
			if errs[i] != nil && first == nil {
				first = fmt.Errorf("reclaim expired lease of %s: %w", wave[i].id, errs[i])
			}
			if d != nil { // reclaimed, whatever failed beside it
				s.signal(d)
				out = append(out, *d)
			}
		}
		if first != nil {
			return out, first
		}
	}
	return out, nil
}

// maxReclaimWave bounds the leases ReclaimExpired reclaims at once.
const maxReclaimWave = 64

// reclaimOne reclaims candidate c if its lease has still lapsed: queued
// again (or dead-lettered when its attempts are spent), or superseded
// when its epoch is behind its thread's (then nil is returned).
func (s *Store) reclaimOne(ctx context.Context, c dEntry, now int64) (*engine.Dispatch, error) {
	var got *engine.Dispatch
	err := s.update(ctx, c.thread, func(t *txn) error {
		got = nil
		old, err := t.loadDispatch(c.id)
		if err != nil || old == nil || old.Status != engine.StatusClaimed || old.LeaseUntil >= now {
			return err
		}
		ep, err := t.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		d := old.Clone()
		if old.Epoch < ep {
			d.Supersede(ep, engine.ReasonLeaseExpiredStale, now)
			return t.putDispatch(old, &d, now)
		}
		d.ReclaimExpired(now)
		if err := t.putDispatch(old, &d, now); err != nil {
			return err
		}
		got = &d
		return nil
	})
	return got, err
}

// purgeChunk bounds the dispatches one purge batch deletes.
const purgeChunk = 256

// PurgeTerminal implements engine.DispatchStore. It writes a tombstone
// for each terminal dispatch with updated_at < olderThan, purgeChunk per
// batch, each expected at the version read.
func (s *Store) PurgeTerminal(ctx context.Context, olderThan int64) (int, error) {
	if err := s.fresh(ctx); err != nil {
		return 0, fmt.Errorf("purge terminal: %w", err)
	}
	cands := s.idx.purgeable(olderThan)
	total := 0
	for len(cands) > 0 {
		chunk := cands[:min(purgeChunk, len(cands))]
		cands = cands[len(chunk):]
		n := 0
		err := s.update(ctx, "", func(t *txn) error {
			n = 0
			for _, c := range chunk {
				d, err := t.loadDispatch(c.id)
				if err != nil {
					return err
				}
				if d == nil || !d.Status.Terminal() || d.UpdatedAt >= olderThan {
					continue
				}
				if err := t.deleteDispatch(d); err != nil {
					return err
				}
				n++
			}
			return nil
		})
		if err != nil {
			return total, fmt.Errorf("purge terminal: %w", err)
		}
		total += n
	}
	return total, nil
}
