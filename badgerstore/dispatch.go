package badgerstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// claimOne moves the queued dispatch old to claimed under token.
func (w *writeTx) claimOne(old *engine.Dispatch, token, consumerID string, leaseUntil, now int64) (*engine.Dispatch, error) {
	d := old.Clone()
	if err := d.Claim(token, consumerID, leaseUntil, now); err != nil {
		return nil, err
	}
	if err := w.putDispatch(old, &d, now); err != nil {
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
	if err := s.update(ctx, "enqueue", func(w *writeTx) error { return w.enqueue(&d, false) }); err != nil {
		return engine.Dispatch{}, err
	}
	return d, nil
}

// enqueue stores a prepared queued dispatch, stamping its epoch. A
// minted id (engine.Minted) is not looked up: no dispatch can hold it.
func (w *writeTx) enqueue(d *engine.Dispatch, mintedID bool) error {
	if !mintedID {
		if _, ok, err := w.get(dispatchKey(d.DispatchID)); err != nil {
			return err
		} else if ok {
			return fmt.Errorf("enqueue: dispatch_id=%s: %w", d.DispatchID, engine.ErrAlreadyExists)
		}
	}
	if d.DedupeKey != "" {
		if _, ok, err := w.get(dedupeKeyFor(d.ThreadID, d.DedupeKey)); err != nil {
			return err
		} else if ok {
			return fmt.Errorf("enqueue: dedupe_key=%s: %w", d.DedupeKey, engine.ErrAlreadyExists)
		}
	}
	ep, err := w.epoch(d.ThreadID)
	if err != nil {
		return err
	}
	d.Epoch = ep
	return w.putDispatch(nil, d, d.UpdatedAt)
}

// Submit implements engine.RunStore: the checkpoint and the enqueue of a
// submitted run in one commit.
func (s *Store) Submit(ctx context.Context, c engine.Checkpoint, d engine.Dispatch) ([]engine.MessageRecord, engine.Dispatch, error) {
	d, run, err := engine.PrepareSubmit(&c, d)
	if err != nil {
		return nil, engine.Dispatch{}, err
	}
	var recs []engine.MessageRecord
	err = s.update(ctx, "submit", func(w *writeTx) error {
		var err error
		if recs, err = w.checkpoint(&c, run); err != nil {
			return err
		}
		return w.enqueue(&d, c.Minted.DispatchID)
	})
	if err != nil {
		return nil, engine.Dispatch{}, fmt.Errorf("submit %s: %w", c.ThreadID, err)
	}
	return recs, d, nil
}

// SubmitIdle implements engine.IdleSubmitter: on a thread with no queued
// and no claimed dispatch, the interrupt (an epoch bump that supersedes
// nothing), the submit, the claim and the recorded start of a foreground
// run in one commit.
func (s *Store) SubmitIdle(ctx context.Context, c engine.Checkpoint, d engine.Dispatch, consumerID string, lease time.Duration, instanceID string, now int64) ([]engine.MessageRecord, *engine.Dispatch, error) {
	d, run, err := engine.PrepareSubmit(&c, d)
	if err != nil {
		return nil, nil, err
	}
	ms, token, err := engine.ClaimArgs("dispatch_id", d.DispatchID, consumerID, lease)
	if err != nil {
		return nil, nil, err
	}
	var recs []engine.MessageRecord
	var out *engine.Dispatch
	err = s.update(ctx, "submit_idle", func(w *writeTx) error {
		recs, out = nil, nil
		st, err := w.state(c.ThreadID)
		if err != nil || st.claimed != "" || st.queued > 0 {
			return err // not idle: nothing written, the caller interrupts
		}
		st.epoch++
		if err := w.putState(c.ThreadID, st); err != nil {
			return err
		}
		if recs, err = w.checkpoint(&c, run); err != nil {
			return err
		}
		q := d
		if err := w.enqueue(&q, c.Minted.DispatchID); err != nil {
			return err
		}
		claimed, err := w.claimOne(&q, token, consumerID, now+ms, now)
		if err != nil {
			return err
		}
		out, err = w.startUnlessDone(claimed, instanceID, now)
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("submit %s: %w", c.ThreadID, err)
	}
	return recs, out, nil
}

// Claim implements engine.DispatchStore.
func (s *Store) Claim(ctx context.Context, threadID, consumerID string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	ms, token, err := engine.ClaimArgs("thread_id", threadID, consumerID, lease)
	if err != nil {
		return nil, err
	}
	out, err := s.claimLoop(ctx, "claim", nil, func(w *writeTx, resume []byte) (*engine.Dispatch, []byte, error) {
		return w.claimNext(threadID, consumerID, token, now+ms, now, resume)
	})
	if err != nil {
		return nil, fmt.Errorf("claim thread %s: %w", threadID, err)
	}
	return out, nil
}

var _ engine.StartClaimer = (*Store)(nil)

// ClaimStart implements engine.StartClaimer: Claim, then in the same
// commit RecordDispatchStart, unless the dispatch's run is done.
func (s *Store) ClaimStart(ctx context.Context, threadID, consumerID string, lease time.Duration, instanceID string, now int64) (*engine.Dispatch, error) {
	ms, token, err := engine.ClaimArgs("thread_id", threadID, consumerID, lease)
	if err != nil {
		return nil, err
	}
	if err := engine.ValidateID("instance_id", instanceID); err != nil {
		return nil, err
	}
	out, err := s.claimLoop(ctx, "claim", nil, func(w *writeTx, resume []byte) (*engine.Dispatch, []byte, error) {
		return w.claimStartNext(threadID, consumerID, token, now+ms, instanceID, now, resume)
	})
	if err != nil {
		return nil, fmt.Errorf("claim thread %s: %w", threadID, err)
	}
	return out, nil
}

// claimStartNext is claimNext, then startUnlessDone of what it claimed
// unless instanceID is "".
func (w *writeTx) claimStartNext(threadID, consumerID, token string, leaseUntil int64, instanceID string, now int64, resume []byte) (*engine.Dispatch, []byte, error) {
	claimed, staleLast, err := w.claimNext(threadID, consumerID, token, leaseUntil, now, resume)
	if err != nil || claimed == nil || instanceID == "" {
		return claimed, staleLast, err
	}
	out, err := w.startUnlessDone(claimed, instanceID, now)
	return out, nil, err
}

// start records the start of a dispatch claimed by this operation
// (RecordDispatchStart without its ownership checks: the claim is ours
// and of the current epoch) and returns the started dispatch.
func (w *writeTx) start(claimed *engine.Dispatch, instanceID string, now int64) (*engine.Dispatch, error) {
	started := claimed.Clone()
	if err := started.RecordStart(instanceID, now); err != nil {
		return nil, err
	}
	if err := w.updateRunOf(&started, func(r *engine.RunRecord) bool { return r.MarkStarted(&started, instanceID, now/1000) }); err != nil {
		return nil, err
	}
	return &started, w.putDispatch(claimed, &started, now)
}

// startUnlessDone is start, except that a dispatch whose run is already
// done (the engine acks it without running it) or waiting (a
// continuation: the engine rebuilds the request from the run as it waits,
// then records the start) is left claimed only.
func (w *writeTx) startUnlessDone(claimed *engine.Dispatch, instanceID string, now int64) (*engine.Dispatch, error) {
	run, err := w.loadRun(claimed.RunID)
	if err != nil {
		return nil, err
	}
	if run != nil && (run.Status == engine.RunDone || run.Status == engine.RunWaiting) {
		return claimed, nil
	}
	return w.start(claimed, instanceID, now)
}

// claimNext claims the thread's next due dispatch of its current epoch
// (nil: none, or the thread has a claimed one). A walk that stops after
// superseding staleChunk stale entries returns the queue suffix of the
// last of them (staleLast): the claim goes on in another commit
// (claimLoop) from after it (resume; nil: from the floor).
func (w *writeTx) claimNext(threadID, consumerID, token string, leaseUntil, now int64, resume []byte) (_ *engine.Dispatch, staleLast []byte, err error) {
	st, err := w.state(threadID)
	if err != nil || st.claimed != "" || st.queued == 0 {
		return nil, nil, err
	}
	ep, floor := st.epoch, st.floor
	// Walk the thread's queue in claim order from its floor. Entries
	// of an older epoch are superseded on the way (an interrupt whose
	// later commits a crash prevented leaves some, and so may a record
	// restored from elsewhere); the first available entry of the current
	// epoch is claimed.
	var stale []string
	var cand string
	var first, next, lastStale []byte
	keptSeen := false  // a walked entry of the current epoch stays queued
	staleLeft := false // the walk stopped at staleChunk
	prefix := threadPrefix(pQueue, threadID)
	start := append(prefix[:len(prefix):len(prefix)], floor...)
	if resume != nil {
		// The walk goes on after the stale entries the commit before
		// superseded: entries before them were walked then (nothing of
		// them is due at now), and a damaged entry a supersession could
		// not remove is not met twice.
		start = append(append(prefix[:len(prefix):len(prefix)], resume...), 0)
	}
	// The floor often names the head itself (the previous claim's walk
	// left it there): a point read claims it without an iterator, which
	// costs a seek in every table that may hold the thread's queue.
	if len(floor) > 0 && resume == nil {
		v, ok, err := w.get(append(prefix[:len(prefix):len(prefix)], floor...))
		if err != nil {
			return nil, nil, err
		}
		if ok && len(v) == 16 && readU64(v[8:]) == ep && readTS(v[:8]) <= now {
			cand = orderKeyID(append(prefix[:len(prefix):len(prefix)], floor...), threadID)
			first = floor
		}
	}
	if cand == "" {
		err = w.iterate(prefix, start, false, func(k, v []byte) (bool, error) {
			if len(v) != 16 {
				return false, fmt.Errorf("queue entry %q: %w", k, engine.ErrCorrupt)
			}
			if cand != "" {
				next = k[len(prefix):] // the entry after the claimed head
				return false, nil
			}
			if first == nil {
				first = k[len(prefix):]
			}
			id := orderKeyID(k, threadID)
			if readU64(v[8:]) < ep {
				if len(stale) == staleChunk {
					// At most staleChunk a commit: the claim goes on
					// in the next, from here.
					staleLeft = true
					if !keptSeen {
						next = k[len(prefix):] // everything walked before it leaves the queue
					}
					return false, nil
				}
				stale = append(stale, id)
				lastStale = k[len(prefix):]
				return true, nil
			}
			if readTS(v[:8]) <= now {
				cand = id
				// When the claimed entry is the head, the next entry is the
				// head after this claim: walk one more for the floor.
				return bytes.Equal(first, k[len(prefix):]), nil
			}
			keptSeen = true
			return true, nil
		})
		if err != nil {
			return nil, nil, err
		}
		if next != nil {
			first = next // no live entry is left below it
		}
	}
	for _, id := range stale {
		if err := w.supersedeQueued(id, ep, engine.ReasonNewerEpoch, now); err != nil {
			return nil, nil, err
		}
	}
	if first != nil && !bytes.Equal(first, floor) && resume == nil {
		// Raise the floor to the first live entry: the deletion
		// markers below it are never walked again.
		cur, err := w.state(threadID)
		if err != nil {
			return nil, nil, err
		}
		cur.floor = first
		if err := w.putState(threadID, cur); err != nil {
			return nil, nil, err
		}
	}
	if cand == "" {
		if staleLeft {
			return nil, lastStale, nil
		}
		return nil, nil, nil
	}
	old, err := w.mustLoad(cand)
	if err != nil {
		return nil, nil, err
	}
	d, err := w.claimOne(old, token, consumerID, leaseUntil, now)
	return d, nil, err
}

// claimLoop runs op, a claim of one thread's next dispatch, once more
// for as long as it stops after superseding a chunk of stale entries
// without claiming (claimNext's staleLast), from after the last of them
// (resume: where the first op starts; nil from the floor): one call
// supersedes them all, a chunk a commit, and returns the dispatch behind
// them or none.
// An interrupt a crash cut short leaves such entries; a claim that came
// back empty after one chunk kept the thread at the head of the ready
// order, and the dispatcher served the threads behind it only after
// every chunk had had its own wake (found by review: 12 minutes for
// 1 500 entries at the default sweep).
func (s *Store) claimLoop(ctx context.Context, name string, resume []byte, op func(w *writeTx, resume []byte) (*engine.Dispatch, []byte, error)) (*engine.Dispatch, error) {
	for first := true; first || resume != nil; first = false {
		var out *engine.Dispatch
		var last []byte
		from := resume // an op may run more than once: it starts from here each time
		err := s.update(ctx, name, func(w *writeTx) error {
			var err error
			out, last, err = op(w, from)
			return err
		})
		if err != nil || out != nil {
			return out, err
		}
		resume = last // strictly after from: the loop ends
	}
	return nil, nil
}

func (w *writeTx) mustLoad(id string) (*engine.Dispatch, error) {
	d, err := w.loadDispatch(id)
	if err != nil {
		return nil, err
	}
	if d == nil {
		return nil, fmt.Errorf("index names missing dispatch %s: %w", id, engine.ErrCorrupt)
	}
	return d, nil
}

func (w *writeTx) supersedeQueued(id string, ep uint64, reason string, now int64) error {
	old, err := w.mustLoad(id)
	if err != nil {
		return err
	}
	d := old.Clone()
	d.Supersede(ep, reason, now)
	return w.putDispatch(old, &d, now)
}

// ClaimDispatch implements engine.DispatchStore.
func (s *Store) ClaimDispatch(ctx context.Context, dispatchID, consumerID string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	ms, token, err := engine.ClaimArgs("dispatch_id", dispatchID, consumerID, lease)
	if err != nil {
		return nil, err
	}
	var out *engine.Dispatch
	err = s.update(ctx, "claim_dispatch", func(w *writeTx) error {
		out = nil
		old, err := w.loadDispatch(dispatchID)
		if err != nil || old == nil || old.Status != engine.StatusQueued {
			return err
		}
		ep, err := w.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		if old.Epoch < ep {
			d := old.Clone()
			d.Supersede(ep, engine.ReasonNewerEpoch, now)
			return w.putDispatch(old, &d, now)
		}
		if st, err := w.state(old.ThreadID); err != nil || st.claimed != "" {
			return err
		}
		out, err = w.claimOne(old, token, consumerID, now+ms, now)
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
func (s *Store) owned(ctx context.Context, name, dispatchID, token, staleReason string, now int64, mutate func(w *writeTx, d *engine.Dispatch) error) (engine.Dispatch, error) {
	return s.ownedThen(ctx, name, dispatchID, token, staleReason, now, mutate, nil)
}

// ownedThen is owned with then, when not nil, run in the same operation
// after the mutated dispatch is written (not when it was superseded).
func (s *Store) ownedThen(ctx context.Context, name, dispatchID, token, staleReason string, now int64, mutate, then func(w *writeTx, d *engine.Dispatch) error) (engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return engine.Dispatch{}, err
	}
	var out engine.Dispatch
	var result error // returned after a commit that must happen anyway
	err := s.update(ctx, name, func(w *writeTx) error {
		result = nil
		old, err := w.loadDispatch(dispatchID)
		if err != nil {
			return err
		}
		if old == nil {
			return fmt.Errorf("dispatch %s: %w", dispatchID, engine.ErrNotFound)
		}
		if err := old.CheckOwner(token); err != nil {
			return err
		}
		ep, err := w.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		d := old.Clone()
		if old.Epoch < ep {
			d.Supersede(ep, staleReason, now)
			result = &engine.ConflictError{What: "dispatch_epoch", Expected: old.Epoch, Actual: ep}
			out = d
			return w.putDispatch(old, &d, now)
		}
		if err := mutate(w, &d); err != nil {
			return err
		}
		out = d
		if err := w.putDispatch(old, &d, now); err != nil || then == nil {
			return err
		}
		return then(w, &d)
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
	_, err := s.owned(ctx, "ack", dispatchID, claimToken, engine.ReasonStaleBeforeAck, now, func(_ *writeTx, d *engine.Dispatch) error {
		d.Ack(now)
		return nil
	})
	return err
}

// RecordDispatchStart implements engine.DispatchStore.
func (s *Store) RecordDispatchStart(ctx context.Context, dispatchID, claimToken, instanceID string, now int64) error {
	_, err := s.owned(ctx, "record_dispatch_start", dispatchID, claimToken, engine.ReasonStaleBeforeStart, now, func(w *writeTx, d *engine.Dispatch) error {
		if err := d.RecordStart(instanceID, now); err != nil {
			return err
		}
		return w.updateRunOf(d, func(r *engine.RunRecord) bool { return r.MarkStarted(d, instanceID, now/1000) })
	})
	return err
}

// RecordRunResult implements engine.DispatchStore.
func (s *Store) RecordRunResult(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64) error {
	_, err := s.owned(ctx, "record_run_result", dispatchID, claimToken, engine.ReasonStaleBeforeResult, now, func(w *writeTx, d *engine.Dispatch) error {
		return w.recordResult(d, result, now)
	})
	return err
}

// recordResult projects an attempt's result onto the dispatch and its run.
func (w *writeTx) recordResult(d *engine.Dispatch, result engine.RunResult, now int64) error {
	if err := d.RecordResult(result, now); err != nil {
		return err
	}
	return w.updateRunOf(d, func(r *engine.RunRecord) bool { return r.ApplyResult(d, result, now/1000) })
}

// Complete implements engine.DispatchStore.
func (s *Store) Complete(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64) error {
	_, err := s.owned(ctx, "complete", dispatchID, claimToken, engine.ReasonStaleBeforeResult, now, func(w *writeTx, d *engine.Dispatch) error {
		if err := w.recordResult(d, result, now); err != nil {
			return err
		}
		d.Ack(now)
		return nil
	})
	return err
}

var _ engine.CompleteClaimer = (*Store)(nil)

// CompleteAndClaim implements engine.CompleteClaimer: Complete, then in
// the same commit Claim of the thread's next due dispatch.
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
	var staleLast []byte
	var threadID string
	_, err = s.ownedThen(ctx, "complete", dispatchID, claimToken, engine.ReasonStaleBeforeResult, now, func(w *writeTx, d *engine.Dispatch) error {
		next, staleLast = nil, nil
		if err := w.recordResult(d, result, now); err != nil {
			return err
		}
		d.Ack(now)
		return nil
	}, func(w *writeTx, d *engine.Dispatch) error {
		var err error
		threadID = d.ThreadID
		if next, staleLast, err = w.claimStartNext(d.ThreadID, consumerID, token, now+ms, instanceID, now, nil); err != nil {
			return fmt.Errorf("%w: %w", engine.ErrNextClaim, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if next == nil && staleLast != nil {
		// The completion is committed; the claim goes on past the stale
		// entries in commits of its own (claimLoop). Its failure is no
		// ErrNextClaim, which promises that nothing was written: the
		// completion stands, and the dispatcher claims the thread later.
		next, err = s.claimLoop(ctx, "claim", staleLast, func(w *writeTx, resume []byte) (*engine.Dispatch, []byte, error) {
			return w.claimStartNext(threadID, consumerID, token, now+ms, instanceID, now, resume)
		})
		if err != nil {
			return nil, nil
		}
	}
	return next, nil
}

// Nack implements engine.DispatchStore.
func (s *Store) Nack(ctx context.Context, dispatchID, claimToken string, retryAt int64, errMsg string, now int64) (engine.Dispatch, error) {
	return s.owned(ctx, "nack", dispatchID, claimToken, engine.ReasonStaleBeforeNack, now, func(_ *writeTx, d *engine.Dispatch) error {
		d.Nack(retryAt, errMsg, now)
		return nil
	})
}

// DeadLetter implements engine.DispatchStore.
func (s *Store) DeadLetter(ctx context.Context, dispatchID, claimToken, errMsg string, now int64) error {
	_, err := s.owned(ctx, "dead_letter", dispatchID, claimToken, engine.ReasonStaleBeforeDead, now, func(_ *writeTx, d *engine.Dispatch) error {
		d.DeadLetter(errMsg, now)
		return nil
	})
	return err
}

// Release implements engine.DispatchStore.
func (s *Store) Release(ctx context.Context, dispatchID, claimToken string, now int64) (engine.Dispatch, error) {
	return s.owned(ctx, "release", dispatchID, claimToken, engine.ReasonStaleBeforeRelease, now, func(_ *writeTx, d *engine.Dispatch) error {
		d.Release(now)
		return nil
	})
}

// Cancel implements engine.DispatchStore.
func (s *Store) Cancel(ctx context.Context, dispatchID string, now int64) (*engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return nil, err
	}
	var out *engine.Dispatch
	err := s.update(ctx, "cancel", func(w *writeTx) error {
		out = nil
		old, err := w.loadDispatch(dispatchID)
		if err != nil || old == nil || old.Status != engine.StatusQueued {
			return err
		}
		d := old.Clone()
		d.Cancel(now)
		if err := w.putDispatch(old, &d, now); err != nil {
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
	err = s.update(ctx, "extend_lease", func(w *writeTx) error {
		ok = false
		old, err := w.loadDispatch(dispatchID)
		if err != nil || old == nil || old.CheckOwner(claimToken) != nil {
			return err
		}
		ep, err := w.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		d := old.Clone()
		if old.Epoch < ep {
			d.Supersede(ep, engine.ReasonStaleDuringRenewal, now)
			return w.putDispatch(old, &d, now)
		}
		d.LeaseUntil = now + ms
		d.UpdatedAt = now
		ok = true
		return w.putDispatch(old, &d, now)
	})
	if err != nil {
		return false, fmt.Errorf("extend lease %s: %w", dispatchID, err)
	}
	return ok, nil
}

// interruptChunk bounds the queued dispatches one interrupt commit
// supersedes (a variable for tests). Each costs about a kilobyte of the
// transaction's 2.4 MiB with its run record (more with a long one: a
// chunk refused as too large is halved): in one commit an interrupt of a
// thread with more than 3 000–4 000 queued runs was refused as too large.
var interruptChunk = 512

// staleChunk bounds the stale queued dispatches (an older epoch's, left
// by an interrupt a crash cut short) one claim supersedes on its way:
// the claim's commit stays small, and the claims after it take the rest.
var staleChunk = 64

// Interrupt implements engine.DispatchStore. Its first commit bumps the
// thread's epoch and supersedes up to interruptChunk queued dispatches;
// further commits supersede the rest, each its own atomic commit. From
// the first commit on no dispatch of an older epoch can be claimed
// (claimNext supersedes any it meets), so a crash between commits leaves
// stale entries that are superseded as the thread's claims walk past
// them, never work that runs.
func (s *Store) Interrupt(ctx context.Context, threadID string, now int64) (engine.InterruptResult, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return engine.InterruptResult{}, err
	}
	chunk := interruptChunk
	res, after, more, err := s.interruptFirst(ctx, threadID, now, chunk)
	for errors.Is(err, engine.ErrTooLarge) && chunk > 1 {
		chunk /= 2
		res, after, more, err = s.interruptFirst(ctx, threadID, now, chunk)
	}
	if err != nil {
		return engine.InterruptResult{}, fmt.Errorf("interrupt thread %s: %w", threadID, err)
	}
	if more {
		return s.supersedeRest(ctx, threadID, res, after, chunk, now)
	}
	res.SupersededN = len(res.Superseded)
	return res, nil
}

// supersedeRest is an interrupt's commits after its first (res): the
// thread's queued dispatches of an older epoch than res.NewEpoch, after
// the queue key after, chunk a commit.
func (s *Store) supersedeRest(ctx context.Context, threadID string, res engine.InterruptResult, after []byte, chunk int, now int64) (engine.InterruptResult, error) {
	for more := true; more; {
		var got []engine.Dispatch
		var last []byte
		err := s.update(ctx, "interrupt", func(w *writeTx) error {
			var err error
			got, last, more, err = w.supersedeOlder(threadID, res.NewEpoch, after, now, chunk)
			return err
		})
		if errors.Is(err, engine.ErrTooLarge) && chunk > 1 {
			chunk, more = chunk/2, true
			continue
		}
		if err != nil {
			// The epoch is bumped: what is left is superseded as the
			// thread's claims meet it, or by the next interrupt.
			res.SupersededN = len(res.Superseded)
			return res, fmt.Errorf("interrupt thread %s: %d queued dispatches superseded, the rest not yet: %w", threadID, len(res.Superseded), err)
		}
		res.Superseded = append(res.Superseded, got...)
		after = last
	}
	res.SupersededN = len(res.Superseded)
	return res, nil
}

// interruptFirst is an interrupt's first commit: the epoch bump and the
// first chunk (up to n) of the thread's queued dispatches superseded.
func (s *Store) interruptFirst(ctx context.Context, threadID string, now int64, n int) (res engine.InterruptResult, after []byte, more bool, err error) {
	var chunk []engine.Dispatch
	err = s.update(ctx, "interrupt", func(w *writeTx) error {
		before, err := w.state(threadID)
		if err != nil {
			return err
		}
		st := before
		st.epoch++
		if err := w.putState(threadID, st); err != nil {
			return err
		}
		res.NewEpoch, res.Active = st.epoch, nil
		if before.claimed != "" {
			a, err := w.mustLoad(before.claimed)
			if err != nil {
				return err
			}
			res.Active = a
		}
		chunk, after, more, err = w.supersedeOlder(threadID, st.epoch, nil, now, n)
		return err
	})
	res.Superseded = append([]engine.Dispatch{}, chunk...)
	return res, after, more, err
}

// supersedeOlder supersedes, as interrupted, up to n of the thread's
// queued dispatches of an epoch before ep, walking its queue after the
// key after (nil: from the start). It returns them, the last key it
// superseded and whether more may follow.
func (w *writeTx) supersedeOlder(threadID string, ep uint64, after []byte, now int64, n int) (out []engine.Dispatch, last []byte, more bool, err error) {
	prefix := threadPrefix(pQueue, threadID)
	start := prefix
	if after != nil {
		start = append(append([]byte(nil), after...), 0)
	}
	var ids []string
	err = w.iterate(prefix, start, false, func(k, v []byte) (bool, error) {
		if len(v) != 16 {
			return false, fmt.Errorf("queue entry %q: %w", k, engine.ErrCorrupt)
		}
		if readU64(v[8:]) >= ep {
			return true, nil
		}
		if len(ids) == n {
			more = true
			return false, nil
		}
		ids = append(ids, orderKeyID(k, threadID))
		last = append(last[:0], k...)
		return true, nil
	})
	if err != nil {
		return nil, nil, false, err
	}
	out = make([]engine.Dispatch, 0, len(ids))
	for _, id := range ids {
		old, err := w.mustLoad(id)
		if err != nil {
			return nil, nil, false, err
		}
		d := old.Clone()
		d.Supersede(ep, engine.ReasonInterrupt, now)
		if err := w.putDispatch(old, &d, now); err != nil {
			return nil, nil, false, err
		}
		out = append(out, d)
	}
	return out, last, more, nil
}

// CurrentEpoch implements engine.DispatchStore.
func (s *Store) CurrentEpoch(ctx context.Context, threadID string) (uint64, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return 0, err
	}
	var ep uint64
	err := s.view(ctx, func(r *reader) error {
		st, err := loadStateTxn(r, threadID)
		ep = st.epoch
		return err
	})
	return ep, err
}

// SupersedeClaimed implements engine.DispatchStore.
func (s *Store) SupersedeClaimed(ctx context.Context, dispatchID, claimToken, reason string, now int64) (*engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return nil, err
	}
	var out *engine.Dispatch
	err := s.update(ctx, "supersede_claimed", func(w *writeTx) error {
		out = nil
		old, err := w.loadDispatch(dispatchID)
		if err != nil || old == nil || old.Status != engine.StatusClaimed {
			return err
		}
		if err := old.CheckOwner(claimToken); err != nil {
			return err
		}
		ep, err := w.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		d := old.Clone()
		d.Supersede(ep, reason, now)
		if err := w.putDispatch(old, &d, now); err != nil {
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
	err := s.update(ctx, "requeue", func(w *writeTx) error {
		old, err := w.loadDispatch(dispatchID)
		if err != nil {
			return err
		}
		if old == nil {
			return fmt.Errorf("dispatch %s: %w", dispatchID, engine.ErrNotFound)
		}
		if old.Status != engine.StatusDeadLetter {
			return engine.Validationf("dispatch %s: status %s is not dead_letter", dispatchID, old.Status)
		}
		if _, ok, err := w.get(dispatchKey(newDispatchID)); err != nil {
			return err
		} else if ok {
			return fmt.Errorf("dispatch_id=%s: %w", newDispatchID, engine.ErrAlreadyExists)
		}
		ep, err := w.epoch(old.ThreadID)
		if err != nil {
			return err
		}
		dl := old.Clone()
		n, err := dl.Requeue(newDispatchID, ep, now)
		if err != nil {
			return err
		}
		if n.DedupeKey != "" {
			if _, held, err := w.get(dedupeKeyFor(n.ThreadID, n.DedupeKey)); err != nil {
				return err
			} else if held {
				return fmt.Errorf("dedupe_key=%s: %w", n.DedupeKey, engine.ErrAlreadyExists)
			}
		}
		run, err := w.loadRun(n.RunID)
		if err != nil {
			return err
		}
		if run != nil && run.ThreadID == n.ThreadID && run.MovedOnFrom(old.DispatchID) {
			return engine.ErrRunMovedOn(dispatchID, run)
		}
		if err := w.putDispatch(old, &dl, now); err != nil {
			return err
		}
		if err := w.putDispatch(nil, &n, now); err != nil {
			return err
		}
		out = n
		if run == nil || run.ThreadID != n.ThreadID {
			return nil
		}
		r := cloneRun(run)
		r.Reopen(n.DispatchID, now/1000)
		return w.writeRun(run, r, true, false)
	})
	if err != nil {
		return engine.Dispatch{}, fmt.Errorf("requeue %s: %w", dispatchID, err)
	}
	return out, nil
}

// reclaimChunk bounds the dispatches one reclaim transaction processes.
const reclaimChunk = 64

// ReclaimExpired implements engine.DispatchStore. It works in chunks of
// reclaimChunk dispatches, each its own atomic commit, so a large backlog
// of lapsed leases never makes one transaction too large; a chunk that
// still is too large is halved until it fits.
//
// Each chunk walks the lease index from where the chunk before it
// stopped, not from the start: every lease a chunk reclaims leaves a
// deletion marker at the low end of the index until compaction drops it,
// and a walk from the start steps over all of them again (after a crash
// with 1 000 lapsed leases, 16 chunks spent half a second doing so). A
// lease written between two chunks is due at its claim or renewal time
// plus the lease, later than every lapsed lease passed, so it is not
// skipped; were the clock to step back by more than a lease, the next
// call, which starts from the beginning, finds it.
func (s *Store) ReclaimExpired(ctx context.Context, now int64, limit int) ([]engine.Dispatch, error) {
	var out []engine.Dispatch
	chunk := reclaimChunk
	var after []byte // the last lease key a chunk walked past
	for done := 0; done < limit; {
		n := min(chunk, limit-done)
		got, seen, settled, last, err := s.reclaimSome(ctx, now, n, after)
		if errors.Is(err, engine.ErrTooLarge) && chunk > 1 {
			chunk /= 2
			continue
		}
		if err != nil {
			return out, fmt.Errorf("reclaim expired leases: %w", err)
		}
		out = append(out, got...)
		done += len(got) // superseded ones do not count (see the contract)
		if seen < n || settled == 0 {
			// No candidate is left, or every one seen was an index
			// entry without a lapsed claim behind it (Verify reports
			// those): reading them again would not end.
			break
		}
		after = last
	}
	return out, nil
}

// reclaimSome reclaims up to n lapsed leases in one commit, walking the
// lease index from just after the key after (from its start when nil);
// seen counts the candidates read, settled those reclaimed or superseded,
// and last is the last candidate's key.
func (s *Store) reclaimSome(ctx context.Context, now int64, n int, after []byte) (out []engine.Dispatch, seen, settled int, last []byte, err error) {
	var start []byte
	if after != nil {
		start = append(after[:len(after):len(after)], 0) // the least key above after
	}
	err = s.update(ctx, "reclaim", func(w *writeTx) error {
		out, seen, settled, last = out[:0], 0, 0, nil
		var ids []string
		err := w.iterate([]byte{pLease}, start, true, func(k, _ []byte) (bool, error) {
			if len(k) < 1+tsBytes || readTS(k[1:1+tsBytes]) >= now {
				return false, nil
			}
			ids = append(ids, string(k[1+tsBytes:]))
			last = append(last[:0], k...)
			return len(ids) < n, nil
		})
		if err != nil {
			return err
		}
		for _, id := range ids {
			seen++
			old, err := w.mustLoad(id)
			if err != nil {
				return err
			}
			if old.Status != engine.StatusClaimed || old.LeaseUntil >= now {
				continue
			}
			d, reclaimed, err := w.reclaimClaim(old, now, (*engine.Dispatch).ReclaimExpired, engine.ReasonLeaseExpiredStale)
			if err != nil {
				return err
			}
			settled++
			if reclaimed {
				out = append(out, d)
			}
		}
		return nil
	})
	return out, seen, settled, last, err
}

// reclaimClaim settles the claim old whose holder is gone: superseded
// with staleReason when an interrupt left its epoch behind the thread's
// (reclaimed false), else by reclaim (an attempt spent: queued again or
// dead-lettered; reclaimed true). It returns the written record.
func (w *writeTx) reclaimClaim(old *engine.Dispatch, now int64, reclaim func(*engine.Dispatch, int64), staleReason string) (engine.Dispatch, bool, error) {
	ep, err := w.epoch(old.ThreadID)
	if err != nil {
		return engine.Dispatch{}, false, err
	}
	d := old.Clone()
	stale := old.Epoch < ep
	if stale {
		d.Supersede(ep, staleReason, now)
	} else {
		reclaim(&d, now)
	}
	if err := w.putDispatch(old, &d, now); err != nil {
		return engine.Dispatch{}, false, err
	}
	return d, !stale, nil
}

// purgeChunk bounds the dispatches one purge transaction deletes.
const purgeChunk = 512

// PurgeTerminal implements engine.DispatchStore.
func (s *Store) PurgeTerminal(ctx context.Context, olderThan int64) (int, error) {
	total := 0
	for {
		n := 0
		err := s.update(ctx, "purge_terminal", func(w *writeTx) error {
			n = 0
			var ids []string
			err := w.iterate([]byte{pTerminal}, nil, true, func(k, _ []byte) (bool, error) {
				if len(k) < 1+2*tsBytes || readTS(k[1:1+tsBytes]) >= olderThan {
					return false, nil
				}
				ids = append(ids, string(k[1+2*tsBytes:]))
				return len(ids) < purgeChunk, nil
			})
			if err != nil {
				return err
			}
			for _, id := range ids {
				d, err := w.mustLoad(id)
				if err != nil {
					return err
				}
				if err := w.deleteDispatch(d); err != nil {
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
		if n < purgeChunk {
			return total, nil
		}
	}
}
