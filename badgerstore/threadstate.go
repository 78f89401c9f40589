package badgerstore

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// threadState is everything claim and the ready listing need to know about
// a thread, in one key e<thread>, so a claim reads one small record:
//
//	epoch    the dispatch epoch (bumped by interrupt; never goes down)
//	queued   how many of its dispatches are queued
//	due      the earliest available_at among them (valid while queued > 0),
//	         raised to when the thread's last claim ended if that is later
//	         (round-robin among ready threads, see finishThreads);
//	         while the thread has a claimed dispatch it may be "unknown"
//	         (stored as dueUnknown): a claim removes the earliest entry, and
//	         the next one is looked up only when the thread becomes
//	         claimable again, which a busy thread's claim-on-completion
//	         never lets happen
//	claimed  the id of its claimed dispatch, "" when none (the per-thread
//	         claim guard: at most one, ever)
//	floor    a claim-order suffix (priority, created_at, dispatch_id) at or
//	         below every queued entry of the thread: claim seeks the queue
//	         there, not at its start, so it never wades through the
//	         deletion markers that claimed dispatches leave in the LSM tree
//	vfloor   the same for the thread's due-order index (available_at,
//	         dispatch_id), used when due has to be found again
//
// Encoding: epoch u64 | queued u64 | due ts | len u16 + claimed |
// len u16 + floor | vfloor. An all-zero state is deleted; a thread whose
// epoch was bumped keeps its state forever, so epochs stay monotonic.
//
// Derived keys, written when an operation ends (finishThreads): the
// marker h<thread> exists while queued > 0 (QueuedThreadIDs lists them);
// the entry r<due><thread> exists while the thread is claimable — queued
// work and no claimed dispatch — so ReadyThreads reads one entry per
// claimable thread, in due order.
type threadState struct {
	epoch   uint64
	queued  uint64
	due     int64
	claimed string
	floor   []byte
	vfloor  []byte

	dueStale bool  // the minimum may have left; found again once claimable
	released int64 // when this operation ended the thread's claim (not stored)
}

// dueUnknown is the stored due of a claimed thread whose earliest queued
// entry has not been looked up since the last one left (no real time is
// this far in the past).
const dueUnknown = math.MinInt64

func (st *threadState) zero() bool {
	return st.epoch == 0 && st.queued == 0 && st.claimed == ""
}

// claimable reports whether the thread belongs in the ready index.
func (st *threadState) claimable() bool { return st.queued > 0 && st.claimed == "" }

func encodeThreadState(st threadState) []byte {
	b := make([]byte, 0, 30+len(st.claimed)+len(st.floor)+len(st.vfloor))
	b = binary.BigEndian.AppendUint64(b, st.epoch)
	b = binary.BigEndian.AppendUint64(b, st.queued)
	due := st.due
	if st.dueStale {
		due = dueUnknown
	}
	b = appendTS(b, due)
	b = binary.BigEndian.AppendUint16(b, uint16(len(st.claimed)))
	b = append(b, st.claimed...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(st.floor)))
	b = append(b, st.floor...)
	return append(b, st.vfloor...)
}

func decodeThreadState(key, b []byte) (threadState, error) {
	var st threadState
	bad := func(what string) (threadState, error) {
		return threadState{}, fmt.Errorf("thread state %q: %s: %w", key, what, engine.ErrCorrupt)
	}
	if len(b) < 26 {
		return bad(fmt.Sprintf("%d bytes", len(b)))
	}
	st.epoch = binary.BigEndian.Uint64(b)
	st.queued = binary.BigEndian.Uint64(b[8:])
	st.due = readTS(b[16:])
	st.dueStale = st.due == dueUnknown && st.queued > 0
	b = b[24:]
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n+2 {
		return bad("claimed id overruns the record")
	}
	st.claimed = string(b[2 : 2+n])
	b = b[2+n:]
	n = int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return bad("floor overruns the record")
	}
	st.floor = b[2 : 2+n]
	st.vfloor = b[2+n:]
	return st, nil
}

// state reads a thread's state: this operation's version first, then the
// transaction's (zero when absent).
func (w *writeTx) state(thread string) (threadState, error) {
	if st, ok := w.states[thread]; ok {
		return st, nil
	}
	k := stateKey(thread)
	b, ok, err := w.get(k)
	if err != nil || !ok {
		return threadState{}, err
	}
	return decodeThreadState(k, b)
}

// putState records a thread's new state for this operation; it reaches
// the batch, with its derived keys, in finishThreads.
func (w *writeTx) putState(thread string, st threadState) error {
	if _, seen := w.origStates[thread]; !seen {
		orig, err := w.state(thread)
		if err != nil {
			return err
		}
		w.origStates[thread] = orig
	}
	w.states[thread] = st
	return nil
}

// epoch reads a thread's epoch.
func (w *writeTx) epoch(thread string) (uint64, error) {
	st, err := w.state(thread)
	return st.epoch, err
}

func queueSuffix(d *engine.Dispatch) []byte {
	return orderKey(pQueue, d)[1+2+len(d.ThreadID):]
}

func availSuffix(d *engine.Dispatch) []byte {
	return availKey(d)[1+2+len(d.ThreadID):]
}

// applyStatusChange updates the thread state for a dispatch moving from
// old (nil when new) to d (nil when deleted).
func (w *writeTx) applyStatusChange(old, d *engine.Dispatch) error {
	ref := d
	if ref == nil {
		ref = old
	}
	st, err := w.state(ref.ThreadID)
	if err != nil {
		return err
	}
	if old != nil {
		switch old.Status {
		case engine.StatusQueued:
			if st.queued == 0 {
				return fmt.Errorf("queued count of thread %s below zero: %w", old.ThreadID, engine.ErrCorrupt)
			}
			st.queued--
			if old.AvailableAt <= st.due {
				st.dueStale = true
			}
		case engine.StatusClaimed:
			if st.claimed == old.DispatchID {
				st.claimed = ""
				if d != nil && (d.Status == engine.StatusAcked || d.Status == engine.StatusDeadLetter) {
					// Its run ended (not cut short: a reclaimed or released
					// dispatch keeps its place, store.md §2.15 item 86; nor
					// withdrawn). The NATS index orders by the same ends.
					st.released = d.UpdatedAt
				}
			}
		}
	}
	if d != nil {
		switch d.Status {
		case engine.StatusQueued:
			if suf := queueSuffix(d); st.queued == 0 || bytes.Compare(suf, st.floor) < 0 {
				st.floor = suf
			}
			if vs := availSuffix(d); st.queued == 0 || bytes.Compare(vs, st.vfloor) < 0 {
				st.vfloor = vs
			}
			if st.queued == 0 || d.AvailableAt < st.due {
				st.due = d.AvailableAt
			}
			st.queued++
		case engine.StatusClaimed:
			if st.claimed != "" && st.claimed != d.DispatchID {
				return fmt.Errorf("thread %s already has claimed dispatch %s: %w", d.ThreadID, st.claimed, engine.ErrCorrupt)
			}
			st.claimed = d.DispatchID
		}
	}
	return w.putState(ref.ThreadID, st)
}

// finishThreads writes the states this operation changed, finding a due
// time again where its minimum left, and keeps the queued-thread markers
// and the ready index in step.
func (w *writeTx) finishThreads() error {
	for thread, st := range w.states {
		orig := w.origStates[thread]
		if st.queued == 0 {
			st.due, st.floor, st.vfloor, st.dueStale = 0, nil, nil, false
		} else if st.dueStale && st.claimed == "" {
			// Only a claimable thread needs its due time (the ready index).
			// A due raised by a run's end stays raised (the earliest entry
			// found is no later than a due that was the earliest).
			prev := st.due
			if err := w.findDue(thread, &st); err != nil {
				return err
			}
			st.due = max(st.due, prev)
		}
		if st.claimable() && st.released > st.due {
			// A thread whose run just ended waits behind the threads that
			// were waiting already: its ready entry is keyed by when its
			// claim ended, not by its oldest queued work, or a thread with
			// a deep backlog went before every thread with newer work, run
			// after run (found by review: a lone thread waited for a whole
			// backlog of 1 000 runs on another).
			st.due = st.released
		}
		if st.zero() {
			w.del(stateKey(thread))
		} else {
			w.set(stateKey(thread), encodeThreadState(st))
		}
		switch {
		case orig.queued == 0 && st.queued > 0:
			w.set(threadQKey(thread), nil)
		case orig.queued > 0 && st.queued == 0:
			w.del(threadQKey(thread))
		}
		oldReady, newReady := []byte(nil), []byte(nil)
		if orig.claimable() {
			oldReady = readyKey(thread, orig.due)
		}
		if st.claimable() {
			newReady = readyKey(thread, st.due)
		}
		if oldReady != nil && !bytes.Equal(oldReady, newReady) {
			w.del(oldReady)
		}
		if newReady != nil && !bytes.Equal(oldReady, newReady) {
			w.set(newReady, nil)
		}
	}
	return nil
}

// findDue sets st.due and st.vfloor from the thread's first live entry in
// due order, from the floor on (iterate sees this operation's writes).
func (w *writeTx) findDue(thread string, st *threadState) error {
	prefix := threadPrefix(pAvail, thread)
	var first []byte
	err := w.iterate(prefix, append(prefix[:len(prefix):len(prefix)], st.vfloor...), true, func(k, _ []byte) (bool, error) {
		first = k
		return false, nil
	})
	if err != nil {
		return err
	}
	if first == nil || len(first) < len(prefix)+tsBytes {
		return fmt.Errorf("thread %s counts %d queued dispatches but its due index is empty: %w", thread, st.queued, engine.ErrCorrupt)
	}
	st.due = readTS(first[len(prefix):])
	st.vfloor = append([]byte(nil), first[len(prefix):]...)
	st.dueStale = false
	return nil
}
