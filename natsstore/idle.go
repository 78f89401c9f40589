package natsstore

import (
	"context"
	"fmt"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

var _ engine.IdleSubmitter = (*Store)(nil)

// SubmitIdle implements engine.IdleSubmitter: on a thread with no queued
// and no claimed dispatch, the interrupt (an epoch bump that supersedes
// nothing), the submit, the claim and the recorded start of a foreground
// run in one atomic batch.
//
// Idleness is decided from records the batch validates, never from the
// index alone. The thread state, read at sequence S, says whether the
// thread holds a claim. For queued dispatches it proceeds as Interrupt
// does: it waits until the index has applied S (the state is written last
// in every batch, so the index then holds every dispatch that was queued
// at S), reads every dispatch the index lists as queued directly (a read
// the batch checks), and declines if one is still queued. The batch
// rewrites the state expected at S, and every transition of a dispatch
// into queued rewrites the state, so no dispatch can have become queued
// unseen between the reads and the commit; a dispatch the index still
// shows as queued but that has left the queue is read at its current
// version, which the batch checks too.
func (s *Store) SubmitIdle(ctx context.Context, c engine.Checkpoint, d engine.Dispatch, consumerID string, lease time.Duration, instanceID string, now int64) ([]engine.MessageRecord, *engine.Dispatch, error) {
	d, run, err := engine.PrepareSubmit(&c, d)
	if err != nil {
		return nil, nil, err
	}
	ms, token, err := engine.ClaimArgs("dispatch_id", d.DispatchID, consumerID, lease)
	if err != nil {
		return nil, nil, err
	}
	thread := c.ThreadID
	var recs []engine.MessageRecord
	var out *engine.Dispatch
	err = s.update(ctx, thread, func(t *txn) error {
		recs, out = nil, nil
		st, err := t.state(thread)
		if err != nil || st.Claimed != "" {
			return err // claimed: nothing written, the caller interrupts
		}
		idle, err := t.noQueued(thread)
		if err != nil || !idle {
			return err // queued work: nothing written, the caller interrupts
		}
		st.Epoch++
		if err := t.putState(thread, st); err != nil {
			return err
		}
		if recs, err = t.checkpoint(&c, run); err != nil {
			return err
		}
		q := d
		if err := t.enqueue(&q); err != nil { // stamps the bumped epoch
			return err
		}
		claimed, err := t.claimOne(&q, token, consumerID, now+ms, now)
		if err != nil {
			return err
		}
		out, err = t.startUnlessDone(claimed, instanceID, now)
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("submit %s: %w", thread, err)
	}
	// The dispatch is claimed already: no signal (nothing for another
	// sidecar to claim).
	return recs, out, nil
}

// noQueued reports whether thread has no queued dispatch, deciding with
// records this transaction reads (see SubmitIdle). It reads the thread
// state (if t has not yet) and must run before t writes it.
func (t *txn) noQueued(thread string) (bool, error) {
	s := t.s
	if _, err := t.state(thread); err != nil {
		return false, err
	}
	if err := s.waitIndex(t.ctx, t.reads[s.sub.state(thread)].seq); err != nil {
		return false, err
	}
	for _, c := range s.idx.threadDispatches(thread, func(e *dEntry) bool { return e.status == engine.StatusQueued }) {
		d, err := t.loadDispatch(c.id)
		if err != nil {
			return false, err
		}
		if d != nil && d.Status == engine.StatusQueued {
			return false, nil
		}
	}
	return true, nil
}
