package badgerstore

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// threadState is everything claim needs to know about a thread in one
// key, e<thread>, so a claim reads one small record instead of four:
//
//	epoch    the dispatch epoch (bumped by interrupt; never goes down)
//	queued   how many of its dispatches are queued
//	claimed  the id of its claimed dispatch, "" when none (the per-thread
//	         claim guard: at most one, ever)
//	floor    a queue-order suffix (priority, created_at, dispatch_id) at or
//	         below every queued entry of the thread. Claim seeks the queue
//	         there instead of at its start, so it does not wade through the
//	         deletion markers that claimed dispatches leave in the LSM tree
//	         until compaction drops them.
//
// Encoding: epoch u64 | queued u64 | len(claimed) u16 | claimed | floor.
// A state that is all zero is deleted; a thread whose epoch was bumped
// keeps its state forever, so epochs stay monotonic. A presence marker
// h<thread> exists exactly while queued > 0 (QueuedThreadIDs lists them).
type threadState struct {
	epoch   uint64
	queued  uint64
	claimed string
	floor   []byte
}

func (st *threadState) zero() bool {
	return st.epoch == 0 && st.queued == 0 && st.claimed == ""
}

func encodeThreadState(st threadState) []byte {
	b := make([]byte, 0, 18+len(st.claimed)+len(st.floor))
	b = binary.BigEndian.AppendUint64(b, st.epoch)
	b = binary.BigEndian.AppendUint64(b, st.queued)
	b = binary.BigEndian.AppendUint16(b, uint16(len(st.claimed)))
	b = append(b, st.claimed...)
	return append(b, st.floor...)
}

func decodeThreadState(key, b []byte) (threadState, error) {
	var st threadState
	if len(b) < 18 {
		return st, fmt.Errorf("thread state %q is %d bytes: %w", key, len(b), engine.ErrCorrupt)
	}
	st.epoch = binary.BigEndian.Uint64(b)
	st.queued = binary.BigEndian.Uint64(b[8:])
	n := int(binary.BigEndian.Uint16(b[16:]))
	if len(b) < 18+n {
		return st, fmt.Errorf("thread state %q: claimed id overruns the record: %w", key, engine.ErrCorrupt)
	}
	st.claimed = string(b[18 : 18+n])
	st.floor = b[18+n:]
	return st, nil
}

// state reads a thread's state through the overlay (zero when absent).
func (w *writeTx) state(thread string) (threadState, error) {
	k := stateKey(thread)
	b, ok, err := w.get(k)
	if err != nil || !ok {
		return threadState{}, err
	}
	return decodeThreadState(k, b)
}

// putState writes a thread's state (deleting an all-zero one) and keeps
// the queued-thread marker in step with it.
func (w *writeTx) putState(thread string, before, st threadState) {
	if st.zero() {
		w.del(stateKey(thread))
	} else {
		if st.queued == 0 {
			st.floor = nil
		}
		w.set(stateKey(thread), encodeThreadState(st))
	}
	switch {
	case before.queued == 0 && st.queued > 0:
		w.set(threadQKey(thread), nil)
	case before.queued > 0 && st.queued == 0:
		w.del(threadQKey(thread))
	}
}

// epoch reads a thread's epoch through the overlay.
func (w *writeTx) epoch(thread string) (uint64, error) {
	st, err := w.state(thread)
	return st.epoch, err
}

func queueSuffix(d *engine.Dispatch) []byte {
	return orderKey(pQueue, d)[1+2+len(d.ThreadID):]
}

// applyStatusChange updates the thread state for a dispatch moving from
// old (nil when new, or when deleted: then d is nil) to d.
func (w *writeTx) applyStatusChange(old, d *engine.Dispatch) error {
	ref := d
	if ref == nil {
		ref = old
	}
	before, err := w.state(ref.ThreadID)
	if err != nil {
		return err
	}
	st := before
	if old != nil {
		switch old.Status {
		case engine.StatusQueued:
			if st.queued == 0 {
				return fmt.Errorf("queued count of thread %s below zero: %w", old.ThreadID, engine.ErrCorrupt)
			}
			st.queued--
		case engine.StatusClaimed:
			if st.claimed == old.DispatchID {
				st.claimed = ""
			}
		}
	}
	if d != nil {
		switch d.Status {
		case engine.StatusQueued:
			if suf := queueSuffix(d); st.queued == 0 || bytes.Compare(suf, st.floor) < 0 {
				st.floor = suf
			}
			st.queued++
		case engine.StatusClaimed:
			if st.claimed != "" && st.claimed != d.DispatchID {
				return fmt.Errorf("thread %s already has claimed dispatch %s: %w", d.ThreadID, st.claimed, engine.ErrCorrupt)
			}
			st.claimed = d.DispatchID
		}
	}
	w.putState(ref.ThreadID, before, st)
	return nil
}
