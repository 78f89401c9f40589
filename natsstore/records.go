package natsstore

import (
	"fmt"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Records are JSON (snake_case, the API's shape), as in badgerstore. A
// record that does not decode, or that breaks its invariants, is
// engine.ErrCorrupt naming its subject; it never panics.

// threadState is the record <p>.e.<thread>: the thread's dispatch epoch
// (bumped by interrupt, never lowered) and the id of its one claimed
// dispatch ("" when none). Claimed is the claim guard: it is written in
// the same batch as every dispatch transition into or out of claimed, so
// it can never disagree with the dispatches. Every transition of a
// dispatch into queued rewrites the state too (even when nothing in it
// changes), so a writer that read the state at sequence S knows that no
// dispatch of the thread became queued after S unless the state moved.
type threadState struct {
	Epoch   uint64 `json:"epoch"`
	Claimed string `json:"claimed,omitempty"`
}

func unmarshal(b []byte, v any) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("json decoder panic: %v", r)
		}
	}()
	return json.Unmarshal(b, v)
}

func encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode: %w: %w", engine.ErrCorrupt, err)
	}
	return b, nil
}

func decodeDispatch(subj string, b []byte) (*engine.Dispatch, error) {
	d := new(engine.Dispatch)
	if err := unmarshal(b, d); err != nil {
		return nil, fmt.Errorf("decode dispatch %s: %w: %w", subj, engine.ErrCorrupt, err)
	}
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("decode dispatch %s: %w: %w", subj, engine.ErrCorrupt, err)
	}
	return d, nil
}

func decodeRun(subj string, b []byte) (*engine.RunRecord, error) {
	r := new(engine.RunRecord)
	if err := unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("decode run %s: %w: %w", subj, engine.ErrCorrupt, err)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("decode run %s: %w: %w", subj, engine.ErrCorrupt, err)
	}
	return r, nil
}

func decodeThread(subj string, b []byte) (*engine.Thread, error) {
	t := new(engine.Thread)
	if err := unmarshal(b, t); err != nil {
		return nil, fmt.Errorf("decode thread %s: %w: %w", subj, engine.ErrCorrupt, err)
	}
	return t, nil
}

func decodeState(subj string, b []byte) (threadState, error) {
	var st threadState
	if b == nil {
		return st, nil
	}
	if err := unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("decode thread state %s: %w: %w", subj, engine.ErrCorrupt, err)
	}
	return st, nil
}

func decodeMessage(subj string, b []byte) (engine.MessageRecord, error) {
	var m engine.MessageRecord
	if err := unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("decode message %s: %w: %w", subj, engine.ErrCorrupt, err)
	}
	return m, nil
}

// loadDispatch reads a dispatch; nil when missing.
func (t *txn) loadDispatch(id string) (*engine.Dispatch, error) {
	subj := t.s.sub.dispatch(id)
	b, err := t.get(subj)
	if err != nil || b == nil {
		return nil, err
	}
	return decodeDispatch(subj, b)
}

// mustLoad reads the dispatch the thread state read by t names as
// claimed. Missing, it was settled and purged after t read the state
// (the state has moved on: t is retried like a refused batch), unless
// the state still names it (corrupt).
func (t *txn) mustLoad(thread, id string) (*engine.Dispatch, error) {
	d, err := t.loadDispatch(id)
	if err != nil || d != nil {
		return d, err
	}
	subj := t.s.sub.state(thread)
	r, err := t.s.getLast(t.ctx, subj)
	if err != nil {
		return nil, err
	}
	if r.seq != t.reads[subj].seq {
		return nil, fmt.Errorf("claimed dispatch %s purged since the thread state was read: %w", id, errConflict)
	}
	return nil, fmt.Errorf("thread state names missing dispatch %s: %w", id, engine.ErrCorrupt)
}

// state reads a thread's state (zero when absent).
func (t *txn) state(thread string) (threadState, error) {
	subj := t.s.sub.state(thread)
	b, err := t.get(subj)
	if err != nil {
		return threadState{}, err
	}
	return decodeState(subj, b)
}

func (t *txn) putState(thread string, st threadState) error {
	b, err := encode(&st)
	if err != nil {
		return err
	}
	t.put(t.s.sub.state(thread), b)
	return nil
}

// epoch reads a thread's epoch.
func (t *txn) epoch(thread string) (uint64, error) {
	st, err := t.state(thread)
	return st.Epoch, err
}

// putDispatch writes d (old is its previous version, nil when new) with
// what follows from its transition in the same batch: the thread state
// (claim guard; rewritten on every transition into queued), the dedupe
// lock (held while non-terminal), and, when d becomes cancelled,
// superseded or dead_letter, the settlement of its run.
func (t *txn) putDispatch(old, d *engine.Dispatch, now int64) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("write dispatch %s: %w", d.DispatchID, err)
	}
	b, err := encode(d)
	if err != nil {
		return err
	}
	t.put(t.s.sub.dispatch(d.DispatchID), b)
	changed := old == nil || old.Status != d.Status
	if !changed {
		return nil
	}
	if err := t.applyStatusChange(old, d); err != nil {
		return err
	}
	switch d.Status {
	case engine.StatusCancelled, engine.StatusSuperseded, engine.StatusDeadLetter:
		return t.settleRun(d, now)
	}
	return nil
}

// applyStatusChange keeps the thread state and the dedupe lock in step
// with a dispatch moving from old (nil when new) to d (nil when deleted).
func (t *txn) applyStatusChange(old, d *engine.Dispatch) error {
	ref := d
	if ref == nil {
		ref = old
	}
	wasClaimed := old != nil && old.Status == engine.StatusClaimed
	isClaimed := d != nil && d.Status == engine.StatusClaimed
	intoQueue := d != nil && d.Status == engine.StatusQueued && (old == nil || old.Status != engine.StatusQueued)
	if wasClaimed || isClaimed || intoQueue {
		st, err := t.state(ref.ThreadID)
		if err != nil {
			return err
		}
		next := st
		if wasClaimed && st.Claimed == old.DispatchID {
			next.Claimed = ""
		}
		if isClaimed {
			if next.Claimed != "" && next.Claimed != d.DispatchID {
				return fmt.Errorf("thread %s already has claimed dispatch %s: %w", d.ThreadID, next.Claimed, engine.ErrCorrupt)
			}
			next.Claimed = d.DispatchID
		}
		if err := t.putState(ref.ThreadID, next); err != nil {
			return err
		}
	}
	// Dedupe lock: held from enqueue until the dispatch is terminal.
	if ref.DedupeKey == "" {
		return nil
	}
	wasLive := old != nil && !old.Status.Terminal()
	isLive := d != nil && !d.Status.Terminal()
	k := t.s.sub.dedupe(ref.ThreadID, ref.DedupeKey)
	switch {
	case isLive && !wasLive:
		t.put(k, []byte(d.DispatchID))
	case wasLive && !isLive:
		holder, err := t.get(k)
		if err != nil {
			return err
		}
		if string(holder) == old.DispatchID {
			t.del(k)
		}
	}
	return nil
}

// deleteDispatch writes the tombstone of a terminal dispatch (which holds
// no claim and no dedupe lock, so nothing else changes).
func (t *txn) deleteDispatch(d *engine.Dispatch) error {
	if !d.Status.Terminal() {
		return fmt.Errorf("delete dispatch %s: status %s is not terminal: %w", d.DispatchID, d.Status, engine.ErrCorrupt)
	}
	t.del(t.s.sub.dispatch(d.DispatchID))
	return nil
}

// settleRun marks the run of a dispatch that ended without an ack as done,
// unless the run has moved on to another dispatch (as badgerstore's).
func (t *txn) settleRun(d *engine.Dispatch, nowMs int64) error {
	old, err := t.loadRun(d.RunID)
	if err != nil || old == nil {
		return err
	}
	if old.DispatchID != "" && old.DispatchID != d.DispatchID {
		return nil // the run belongs to a later dispatch now
	}
	r := *old
	if !r.Settle(d, nowMs/1000) {
		return nil
	}
	return t.putRun(old, &r)
}

// updateRunOf applies change to the run of dispatch d, if the run exists
// and the change is a legal status transition.
func (t *txn) updateRunOf(d *engine.Dispatch, change func(*engine.RunRecord) bool) error {
	old, err := t.loadRun(d.RunID)
	if err != nil || old == nil {
		return err
	}
	r := *old
	if !change(&r) || !old.Status.CanTransitionTo(r.Status) {
		return nil
	}
	return t.putRun(old, &r)
}

// loadRun reads a run; nil when missing.
func (t *txn) loadRun(id string) (*engine.RunRecord, error) {
	subj := t.s.sub.run(id)
	b, err := t.get(subj)
	if err != nil || b == nil {
		return nil, err
	}
	return decodeRun(subj, b)
}

// putRun writes r (old is its previous version, nil when new) and the
// thread projection; the status change must be a legal transition.
func (t *txn) putRun(old, r *engine.RunRecord) error { return t.writeRun(old, r, false) }

// writeRun is putRun, or, with reopen, the write of an operator's
// requeue: the transition check is skipped (a done run becomes created
// again) and the thread projection is updated by Thread.ApplyReopen, not
// as a checkpoint of the run (which would clear another run's
// active_run_id).
func (t *txn) writeRun(old, r *engine.RunRecord, reopen bool) error {
	if err := r.Validate(); err != nil {
		return err
	}
	if old != nil {
		if old.ThreadID != r.ThreadID {
			return engine.Validationf("run %s belongs to thread %s, not %s", r.RunID, old.ThreadID, r.ThreadID)
		}
		if !reopen && !old.Status.CanTransitionTo(r.Status) {
			return engine.Validationf("run %s: status %s cannot become %s", r.RunID, old.Status, r.Status)
		}
	}
	r = r.WithStartCountOf(old) // the count of started attempts never goes back
	b, err := encode(r)
	if err != nil {
		return err
	}
	t.put(t.s.sub.run(r.RunID), b)
	th, err := t.loadThreadOrNew(r.ThreadID)
	if err != nil {
		return err
	}
	if reopen {
		th.ApplyReopen(r)
	} else {
		th.ApplyRun(r)
	}
	return t.putThread(th)
}

func (t *txn) loadThreadOrNew(id string) (*engine.Thread, error) {
	subj := t.s.sub.thread(id)
	b, err := t.get(subj)
	if err != nil {
		return nil, err
	}
	if b == nil {
		return &engine.Thread{ID: id}, nil
	}
	return decodeThread(subj, b)
}

func (t *txn) putThread(th *engine.Thread) error {
	b, err := encode(th)
	if err != nil {
		return err
	}
	t.put(t.s.sub.thread(th.ID), b)
	return nil
}
