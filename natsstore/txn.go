package natsstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"time"
)

// Transactions. Every operation reads the records it needs (direct gets,
// each remembered with its stream sequence), decides with the same rules
// as badgerstore, and writes every changed record in one atomic batch:
//
//   - each written subject carries Nats-Expected-Last-Subject-Sequence =
//     the sequence it was read at (0: it must not exist), and
//   - each subject read but not written gets a check message on <p>.x
//     carrying Nats-Expected-Last-Subject-Sequence(-Subject) for it,
//
// so the batch commits only if nothing the operation read has changed
// since: optimistic concurrency with full read-set validation
// (serializable). A refused batch is retried from the reads, up to
// Config.MaxConflictRetries times with jittered backoff.
//
// Inside one process, operations on one thread also take that thread's
// lock (locks.go), so they queue instead of failing each other's batches;
// across processes only the batch decides.
type txn struct {
	s      *Store
	ctx    context.Context
	reads  map[string]rec
	writes map[string]int // subject → index in order
	order  []outMsg
}

func (s *Store) newTxn(ctx context.Context) *txn {
	return &txn{s: s, ctx: ctx, reads: make(map[string]rec, 8), writes: make(map[string]int, 8)}
}

// get returns the body of subj as this transaction sees it (its own
// writes first); nil when missing or deleted.
func (t *txn) get(subj string) ([]byte, error) {
	if i, ok := t.writes[subj]; ok {
		return t.order[i].data, nil
	}
	if r, ok := t.reads[subj]; ok {
		return r.data, nil
	}
	r, err := t.s.getLast(t.ctx, subj)
	if err != nil {
		return nil, err
	}
	t.reads[subj] = r
	return r.data, nil
}

// put writes data to subj. A subject never read is expected not to exist.
func (t *txn) put(subj string, data []byte) { t.write(outMsg{subj: subj, data: data}) }

// del writes a tombstone to subj.
func (t *txn) del(subj string) { t.write(outMsg{subj: subj, del: true}) }

func (t *txn) write(m outMsg) {
	if i, ok := t.writes[m.subj]; ok {
		t.order[i].data, t.order[i].del = m.data, m.del
		return
	}
	t.writes[m.subj] = len(t.order)
	t.order = append(t.order, m)
}

func (t *txn) dirty() bool { return len(t.order) > 0 }

// commit publishes the batch and returns the stream sequence of its last
// message the index consumes (0 when none).
func (t *txn) commit() (uint64, error) {
	msgs := make([]outMsg, 0, len(t.order)+len(t.reads))
	checks := make([]string, 0, len(t.reads))
	for s := range t.reads {
		if _, written := t.writes[s]; !written {
			checks = append(checks, s)
		}
	}
	sort.Strings(checks)
	for _, s := range checks {
		msgs = append(msgs, outMsg{checkSubj: s, expect: t.reads[s].seq})
	}
	// Thread states go last, so that every other record of a batch has a
	// lower sequence than the state it wrote (Claim and Interrupt rely on
	// it: once the index has applied a state's sequence it has applied
	// the dispatches written with it).
	var states []outMsg
	for _, m := range t.order {
		m.expect = t.reads[m.subj].seq
		fam, _ := t.s.sub.family(m.subj)
		m.indexed = t.s.indexed(fam)
		if fam == famState {
			states = append(states, m)
			continue
		}
		msgs = append(msgs, m)
	}
	msgs = append(msgs, states...)
	last, err := t.s.commit(t.ctx, msgs)
	if err != nil {
		return 0, err
	}
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].indexed {
			seq := last - uint64(len(msgs)-1-i)
			t.s.noteCommitted(seq)
			return seq, nil
		}
	}
	return 0, nil
}

// update runs fn as a transaction on thread ("" when the operation is not
// bound to one thread) and commits what it wrote, retrying the whole
// function after a conflict. fn must be safe to run again: it sees a fresh
// transaction each time.
func (s *Store) update(ctx context.Context, thread string, fn func(t *txn) error) error {
	if thread != "" {
		unlock, err := s.locks.lock(ctx, thread)
		if err != nil {
			return unavailable(err)
		}
		defer unlock()
	}
	for attempt := 0; ; attempt++ {
		t := s.newTxn(ctx)
		err := fn(t)
		if err == nil {
			if !t.dirty() {
				return nil
			}
			_, err = t.commit()
			if err == nil {
				return nil
			}
		}
		if !errors.Is(err, errConflict) && !errors.Is(err, errBusy) {
			return err
		}
		if attempt+1 >= s.cfg.MaxConflictRetries {
			return fmt.Errorf("gave up after %d conflicting attempts: %w", attempt+1, unavailable(err))
		}
		if err := backoff(ctx, attempt); err != nil {
			return unavailable(err)
		}
	}
}

// backoff sleeps a jittered, exponentially growing time (at most ~50ms).
func backoff(ctx context.Context, attempt int) error {
	limit := time.Duration(200<<min(attempt, 8)) * time.Microsecond
	limit = min(limit, 50*time.Millisecond)
	d := time.Duration(rand.Int64N(int64(limit))) + 50*time.Microsecond
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
