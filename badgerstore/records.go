package badgerstore

import (
	"bytes"
	"fmt"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// kv is one index entry.
type kv struct{ k, v []byte }

// dispatchIndex returns every index entry the record d implies (see keys.go).
func dispatchIndex(d *engine.Dispatch) []kv {
	out := make([]kv, 0, 4)
	// The listing entry is written once, when the dispatch is created: a
	// status change does not rewrite it (ListDispatches finds the
	// statuses elsewhere). Entries of earlier versions carry the status
	// as their value, which nothing reads any more.
	out = append(out, kv{orderKey(pAll, d), nil})
	switch {
	case d.Status == engine.StatusQueued:
		v := appendTS(make([]byte, 0, 16), d.AvailableAt)
		v = append(v, u64(d.Epoch)...)
		out = append(out, kv{orderKey(pQueue, d), v}, kv{availKey(d), nil})
	case d.Status == engine.StatusClaimed:
		out = append(out, kv{leaseKey(d), nil})
	case d.Status.Terminal():
		out = append(out, kv{terminalKey(d), nil})
		if d.Status == engine.StatusDeadLetter && d.RequeuedAs == "" {
			out = append(out, kv{deadKey(d), nil})
		}
	}
	if !d.Status.Terminal() && d.DedupeKey != "" {
		out = append(out, kv{dedupeKey(d), []byte(d.DispatchID)})
	}
	return out
}

func containsKV(set []kv, e kv) bool {
	for _, x := range set {
		if bytes.Equal(x.k, e.k) && bytes.Equal(x.v, e.v) {
			return true
		}
	}
	return false
}

func containsKey(set []kv, k []byte) bool {
	for _, x := range set {
		if bytes.Equal(x.k, k) {
			return true
		}
	}
	return false
}

// loadDispatch reads a dispatch through the overlay; nil when missing.
func (w *writeTx) loadDispatch(id string) (*engine.Dispatch, error) {
	k := dispatchKey(id)
	b, ok, err := w.get(k)
	if err != nil || !ok {
		return nil, err
	}
	return decodeDispatch(k, b)
}

// addCounter adds delta to a counter key, deleting it at zero.
func (w *writeTx) addCounter(k []byte, delta int64) error {
	b, _, err := w.get(k)
	if err != nil {
		return err
	}
	n, err := counter(k, b)
	if err != nil {
		return err
	}
	v := int64(n) + delta
	if v < 0 {
		return fmt.Errorf("counter %q below zero: %w", k, engine.ErrCorrupt)
	}
	if v == 0 {
		w.del(k)
	} else {
		w.set(k, u64(uint64(v)))
	}
	return nil
}

// putDispatch writes d (old is its previous version, nil when new) with
// its index and counter changes. When d becomes cancelled, superseded or
// dead_letter it settles its run record in the same write.
func (w *writeTx) putDispatch(old, d *engine.Dispatch, now int64) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("write dispatch %s: %w", d.DispatchID, err)
	}
	b, err := encode(d)
	if err != nil {
		return err
	}
	w.set(dispatchKey(d.DispatchID), b)
	newIdx := dispatchIndex(d)
	var oldIdx []kv
	if old != nil {
		oldIdx = dispatchIndex(old)
	}
	for _, e := range oldIdx {
		if !containsKey(newIdx, e.k) {
			w.del(e.k)
		}
	}
	for _, e := range newIdx {
		if !containsKV(oldIdx, e) {
			w.set(e.k, e.v)
		}
	}
	if old == nil || old.Status != d.Status {
		if old != nil {
			if err := w.addCounter(countKey(old.Status), -1); err != nil {
				return err
			}
		}
		if err := w.addCounter(countKey(d.Status), 1); err != nil {
			return err
		}
		if err := w.applyStatusChange(old, d); err != nil {
			return err
		}
		switch d.Status {
		case engine.StatusCancelled, engine.StatusSuperseded, engine.StatusDeadLetter:
			return w.settleRun(d, now)
		}
	}
	return nil
}

// deleteDispatch removes d and its index entries.
func (w *writeTx) deleteDispatch(d *engine.Dispatch) error {
	w.del(dispatchKey(d.DispatchID))
	for _, e := range dispatchIndex(d) {
		w.del(e.k)
	}
	if err := w.addCounter(countKey(d.Status), -1); err != nil {
		return err
	}
	return w.applyStatusChange(d, nil)
}

// settleRun marks the run of a dispatch that ended without an ack as done.
func (w *writeTx) settleRun(d *engine.Dispatch, nowMs int64) error {
	old, err := w.loadRun(d.RunID)
	if err != nil || old == nil {
		return err
	}
	if old.DispatchID != "" && old.DispatchID != d.DispatchID {
		return nil // the run belongs to a later dispatch now
	}
	r := cloneRun(old)
	if !r.Settle(d, nowMs/1000) {
		return nil
	}
	return w.putRun(old, r)
}

// updateRunOf applies change to the run of dispatch d, if the run exists
// and the change is a legal status transition; a run that cannot take it
// is left as it is.
func (w *writeTx) updateRunOf(d *engine.Dispatch, change func(*engine.RunRecord) bool) error {
	old, err := w.loadRun(d.RunID)
	if err != nil || old == nil {
		return err
	}
	r := cloneRun(old)
	if !change(r) || !old.Status.CanTransitionTo(r.Status) {
		return nil
	}
	return w.putRun(old, r)
}

// loadRun reads a run through the overlay; nil when missing.
func (w *writeTx) loadRun(id string) (*engine.RunRecord, error) {
	k := runKey(id)
	b, ok, err := w.get(k)
	if err != nil || !ok {
		return nil, err
	}
	return decodeRun(k, b)
}

func cloneRun(r *engine.RunRecord) *engine.RunRecord {
	c := *r
	return &c
}

// runIndex returns the index keys of a run record.
func runIndex(r *engine.RunRecord) [][]byte {
	if r.Status == engine.RunWaiting {
		return [][]byte{runLatestKey(r), runAllKey(r), runThreadKey(r), runWaitingKey(r.CreatedAt, r.RunID)}
	}
	// Runs of other statuses are listed by status from A or U (nothing
	// lists them on a hot path): three index writes fewer per run.
	return [][]byte{runLatestKey(r), runAllKey(r), runThreadKey(r)}
}

// putRun writes r (old is its previous version, nil when new), its indexes
// and the thread projection; the status change must be a legal transition.
func (w *writeTx) putRun(old, r *engine.RunRecord) error { return w.writeRun(old, r, false, false) }

// putNewRun is putRun of a run known not to be stored (its id minted for
// this write, engine.Minted): nothing is read, not even to see whether
// the record changes.
func (w *writeTx) putNewRun(r *engine.RunRecord) error { return w.writeRun(nil, r, false, true) }

// writeRun is putRun, or, with reopen, the write of an operator's
// requeue: the transition check is skipped (a done run becomes created
// again) and the thread projection is updated by Thread.ApplyReopen, not
// as a checkpoint of the run (which would clear another run's
// active_run_id). With isNew (old is nil) the record is written unread.
func (w *writeTx) writeRun(old, r *engine.RunRecord, reopen, isNew bool) error {
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
	if isNew {
		w.set(runKey(r.RunID), b)
	} else if err := w.setIfChanged(runKey(r.RunID), b); err != nil {
		return err
	}
	newIdx := runIndex(r)
	var oldIdx [][]byte
	if old != nil {
		oldIdx = runIndex(old)
		for _, k := range oldIdx {
			if !hasKey(newIdx, k) {
				w.del(k)
			}
		}
	}
	for _, k := range newIdx {
		if !hasKey(oldIdx, k) { // an unchanged index key is not rewritten
			w.set(k, nil)
		}
	}
	t, err := w.loadThreadOrNew(r.ThreadID)
	if err != nil {
		return err
	}
	if reopen {
		t.ApplyReopen(r)
	} else {
		t.ApplyRun(r)
	}
	return w.putThread(t)
}

func (w *writeTx) loadThreadOrNew(id string) (*engine.Thread, error) {
	k := threadKey(id)
	b, ok, err := w.get(k)
	if err != nil {
		return nil, err
	}
	if !ok {
		return &engine.Thread{ID: id}, nil
	}
	return decodeThread(k, b)
}

func (w *writeTx) putThread(t *engine.Thread) error {
	b, err := encode(t)
	if err != nil {
		return err
	}
	return w.setIfChanged(threadKey(t.ID), b)
}

// hasKey reports whether keys holds k.
func hasKey(keys [][]byte, k []byte) bool {
	for _, x := range keys {
		if bytes.Equal(x, k) {
			return true
		}
	}
	return false
}
