package badgerstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// reader reads one published snapshot, through the record cache
// (cache.go): what it reads is exactly the snapshot's state.
type reader struct {
	txn   *badger.Txn
	seq   uint64       // the commit the snapshot shows
	cache *recordCache // nil: the snapshot alone
	// ctx, when set, ends a long walk (Verify's) once it is done: iterate
	// checks it every ctxEvery keys.
	ctx context.Context
}

// ctxEvery is how many keys a walk with a context reads between checks.
const ctxEvery = 1024

// get reads one key.
func (r *reader) get(key []byte) ([]byte, bool, error) {
	if v, ok := r.cache.getAt(key, r.seq); ok {
		return v, v != nil, nil
	}
	item, err := r.txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		r.cache.fillAt(key, nil, r.seq)
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read %q: %w", key, unavailable(err))
	}
	v, err := item.ValueCopy(nil)
	if err != nil {
		return nil, false, fmt.Errorf("read %q: %w", key, unavailable(err))
	}
	r.cache.fillAt(key, v, r.seq)
	return v, true, nil
}

// iterate is iterate on the snapshot (index scans do not use the cache).
func (r *reader) iterate(prefix, start []byte, reverse, keysOnly bool, fn func(k, v []byte) (bool, error)) error {
	return iterate(r.txn, prefix, start, reverse, keysOnly, r.withCtx(fn))
}

// withCtx makes fn stop the walk once r.ctx (when set) is done.
func (r *reader) withCtx(fn func(k, v []byte) (bool, error)) func(k, v []byte) (bool, error) {
	if r.ctx == nil {
		return fn
	}
	n := 0
	return func(k, v []byte) (bool, error) {
		if n++; n%ctxEvery == 0 {
			if err := r.ctx.Err(); err != nil {
				return false, err
			}
		}
		return fn(k, v)
	}
}

// iterateBorrowed is iterate of values whose keys fn reads and does not
// keep: k is valid only until fn returns.
func (r *reader) iterateBorrowed(prefix, start []byte, fn func(k, v []byte) (bool, error)) error {
	return iterateKeys(r.txn, prefix, start, false, false, false, r.withCtx(fn))
}

func loadStateTxn(r *reader, thread string) (threadState, error) {
	k := stateKey(thread)
	b, ok, err := r.get(k)
	if err != nil || !ok {
		return threadState{}, err
	}
	return decodeThreadState(k, b)
}

func loadDispatchTxn(r *reader, id string) (*engine.Dispatch, error) {
	k := dispatchKey(id)
	b, ok, err := r.get(k)
	if err != nil || !ok {
		return nil, err
	}
	return decodeDispatch(k, b)
}

func loadDispatches(r *reader, ids []string) ([]engine.Dispatch, error) {
	out := make([]engine.Dispatch, 0, len(ids))
	for _, id := range ids {
		d, err := loadDispatchTxn(r, id)
		if err != nil {
			return nil, err
		}
		if d == nil {
			return nil, fmt.Errorf("index names missing dispatch %s: %w", id, engine.ErrCorrupt)
		}
		out = append(out, *d)
	}
	return out, nil
}

// LoadDispatch implements engine.DispatchStore.
func (s *Store) LoadDispatch(ctx context.Context, dispatchID string) (*engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return nil, err
	}
	var out *engine.Dispatch
	err := s.view(ctx, func(r *reader) error {
		var err error
		out, err = loadDispatchTxn(r, dispatchID)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("load dispatch %s: %w", dispatchID, err)
	}
	return out, nil
}

// ListDispatches implements engine.DispatchStore. limit ≤ 0 means no limit.
func (s *Store) ListDispatches(ctx context.Context, threadID string, filter engine.StatusFilter, limit, offset int) ([]engine.Dispatch, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	if filter != nil && len(filter) == 0 {
		return []engine.Dispatch{}, nil
	}
	var out []engine.Dispatch
	err := s.view(ctx, func(r *reader) error {
		var err error
		if openOnly(filter) {
			out, err = listOpenDispatches(r, threadID, filter, limit, offset)
		} else {
			out, err = listAllDispatches(r, threadID, filter, limit, offset)
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list dispatches of %s: %w", threadID, err)
	}
	return out, nil
}

// openOnly reports whether filter asks for queued and claimed
// dispatches only.
func openOnly(filter engine.StatusFilter) bool {
	if filter == nil {
		return false
	}
	for _, st := range filter {
		if st != engine.StatusQueued && st != engine.StatusClaimed {
			return false
		}
	}
	return true
}

// listOpenDispatches lists a thread's queued and claimed dispatches (as
// filter asks) from its queue index and its thread state, in the order of
// the listing index (priority, created_at, id): the listing entries carry
// no status.
func listOpenDispatches(r *reader, thread string, filter engine.StatusFilter, limit, offset int) ([]engine.Dispatch, error) {
	st, err := loadStateTxn(r, thread)
	if err != nil {
		return nil, err
	}
	var claimed *engine.Dispatch
	var claimedKey []byte
	if st.claimed != "" && filter.Match(engine.StatusClaimed) {
		if claimed, err = loadDispatchTxn(r, st.claimed); err != nil {
			return nil, err
		}
		if claimed == nil || claimed.Status != engine.StatusClaimed {
			return nil, fmt.Errorf("thread %s state names claimed dispatch %s, which is not claimed: %w", thread, st.claimed, engine.ErrCorrupt)
		}
		claimedKey = orderKey(pQueue, claimed)
	}
	var ids []string
	skip := offset
	full := func() bool { return limit > 0 && len(ids) >= limit }
	take := func(id string) {
		if skip > 0 {
			skip--
			return
		}
		ids = append(ids, id)
	}
	if filter.Match(engine.StatusQueued) && st.queued > 0 {
		prefix := threadPrefix(pQueue, thread)
		err = r.iterate(prefix, append(prefix[:len(prefix):len(prefix)], st.floor...), false, true, func(k, _ []byte) (bool, error) {
			if claimedKey != nil && bytes.Compare(claimedKey, k) < 0 {
				take(claimed.DispatchID)
				claimedKey = nil
			}
			if !full() {
				take(orderKeyID(k, thread))
			}
			return !full(), nil
		})
		if err != nil {
			return nil, err
		}
	}
	if claimedKey != nil && !full() {
		take(claimed.DispatchID)
	}
	return loadDispatches(r, ids)
}

// listAllDispatches lists a thread's dispatches from the listing index,
// reading each record the filter needs to see.
func listAllDispatches(r *reader, thread string, filter engine.StatusFilter, limit, offset int) ([]engine.Dispatch, error) {
	out := []engine.Dispatch{}
	skip := offset
	err := r.iterate(threadPrefix(pAll, thread), nil, false, true, func(k, _ []byte) (bool, error) {
		id := orderKeyID(k, thread)
		if filter == nil && skip > 0 {
			skip--
			return true, nil
		}
		d, err := loadDispatchTxn(r, id)
		if err != nil {
			return false, err
		}
		if d == nil {
			return false, fmt.Errorf("listing index of %s names missing dispatch %s: %w", thread, id, engine.ErrCorrupt)
		}
		if !filter.Match(d.Status) {
			return true, nil
		}
		if skip > 0 {
			skip--
			return true, nil
		}
		out = append(out, *d)
		return limit <= 0 || len(out) < limit, nil
	})
	return out, err
}

// CountByStatus implements engine.DispatchStore.
func (s *Store) CountByStatus(ctx context.Context) (engine.StatusCounts, error) {
	var c engine.StatusCounts
	err := s.view(ctx, func(r *reader) error {
		for _, st := range engine.AllStatuses {
			b, _, err := r.get(countKey(st))
			if err != nil {
				return err
			}
			n, err := counter(countKey(st), b)
			if err != nil {
				return err
			}
			c[st] = int64(n)
		}
		return nil
	})
	if err != nil {
		return c, fmt.Errorf("count dispatches: %w", err)
	}
	return c, nil
}

// ListTerminal implements engine.DispatchStore.
func (s *Store) ListTerminal(ctx context.Context, after engine.TerminalCursor, limit int) ([]engine.Dispatch, error) {
	if limit <= 0 {
		return []engine.Dispatch{}, nil
	}
	var out []engine.Dispatch
	err := s.view(ctx, func(r *reader) error {
		var start, exclude []byte
		if after != (engine.TerminalCursor{}) {
			start = terminalCursorKey(after)
			exclude = start
		}
		// A record that does not decode, or is missing, is skipped and
		// logged (verify lists it, repair mends it), and the page is
		// filled past it: this list is the start's reconciliation, and one
		// damaged finished dispatch failed the whole start (found by
		// review: a crash loop, while the README promises that only a
		// damaged thread stops).
		return r.iterate([]byte{pTerminal}, start, false, true, func(k, _ []byte) (bool, error) {
			if exclude != nil && string(k) == string(exclude) {
				return true, nil
			}
			if len(k) < 1+2*tsBytes {
				s.log.Error("a terminal index key is malformed: skipped (mailbox-sidecar repair mends it)", "key", fmt.Sprintf("%q", k))
				return true, nil
			}
			id := string(k[1+2*tsBytes:])
			d, err := loadDispatchTxn(r, id)
			switch {
			case errors.Is(err, engine.ErrCorrupt):
				s.log.Error("a finished dispatch does not decode: skipped (mailbox-sidecar repair mends it)", "dispatch_id", id, "err", err)
				return true, nil
			case err != nil:
				return false, err
			case d == nil:
				s.log.Error("the terminal index names a missing dispatch: skipped (mailbox-sidecar repair mends it)", "dispatch_id", id)
				return true, nil
			}
			out = append(out, *d)
			return len(out) < limit, nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list terminal dispatches: %w", err)
	}
	return out, nil
}

// ListDeadLetters implements engine.DispatchStore. limit ≤ 0 means no limit.
func (s *Store) ListDeadLetters(ctx context.Context, limit, offset int) ([]engine.Dispatch, error) {
	var out []engine.Dispatch
	err := s.view(ctx, func(r *reader) error {
		var ids []string
		skip := offset
		err := r.iterate([]byte{pDead}, nil, true, true, func(k, _ []byte) (bool, error) {
			if skip > 0 {
				skip--
				return true, nil
			}
			if len(k) < 1+tsBytes {
				return false, fmt.Errorf("dead-letter index key %q: %w", k, engine.ErrCorrupt)
			}
			ids = append(ids, string(k[1+tsBytes:]))
			return limit <= 0 || len(ids) < limit, nil
		})
		if err != nil {
			return err
		}
		out, err = loadDispatches(r, ids)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	return out, nil
}

// QueuedThreadIDs implements engine.DispatchStore.
func (s *Store) QueuedThreadIDs(ctx context.Context) ([]string, error) {
	out := []string{}
	err := s.view(ctx, func(r *reader) error {
		return r.iterate([]byte{pThreadQ}, nil, false, true, func(k, _ []byte) (bool, error) {
			out = append(out, string(k[1:]))
			return true, nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("queued thread ids: %w", err)
	}
	return out, nil
}

// ReadyThreads implements engine.DispatchStore. It reads one ready-index
// entry per claimable thread, in due order.
func (s *Store) ReadyThreads(ctx context.Context, now int64, after engine.ReadyEntry, limit int) ([]engine.ReadyEntry, int64, error) {
	if limit <= 0 {
		return []engine.ReadyEntry{}, 0, nil
	}
	out := []engine.ReadyEntry{}
	var next int64
	err := s.viewReady(ctx, func(r *reader, floor int64) (int64, error) {
		// Seek past the deletion markers below the floor (snapshot.go).
		start := []byte{pReady}
		if floor > math.MinInt64 {
			start = appendTS(start, floor)
		}
		fromStart := after.IsZero()
		if !fromStart {
			// Strictly after the entry: its key followed by a zero byte is
			// the least key above it.
			if k := append(readyKey(after.ThreadID, after.Due), 0); bytes.Compare(k, start) > 0 {
				start = k
			}
		}
		lowest := int64(math.MaxInt64)
		err := r.iterate([]byte{pReady}, start, false, true, func(k, _ []byte) (bool, error) {
			if len(k) < 1+tsBytes {
				return false, fmt.Errorf("ready index key %q: %w", k, engine.ErrCorrupt)
			}
			due := readTS(k[1 : 1+tsBytes])
			lowest = min(lowest, due)
			if due > now {
				return false, nil
			}
			out = append(out, engine.ReadyEntry{ThreadID: string(k[1+tsBytes:]), Due: due})
			return len(out) < limit, nil
		})
		if err != nil {
			return 0, err
		}
		if !fromStart {
			// A walk from a later place saw only part of the index: it
			// cannot vouch for the keys below it (no raise of the floor).
			lowest = math.MinInt64
		}
		// The earliest future due time is one seek away.
		return lowest, r.iterate([]byte{pReady}, appendTS([]byte{pReady}, max(now+1, floor)), false, true, func(k, _ []byte) (bool, error) {
			next = readTS(k[1 : 1+tsBytes])
			return false, nil
		})
	})
	if err != nil {
		return nil, 0, fmt.Errorf("ready threads: %w", err)
	}
	return out, next, nil
}
