package natsstore

import (
	"context"
	"fmt"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// loadDispatches reads the records the index named, in order; one that
// vanished since (purged by another process) is left out.
func (s *Store) loadDispatches(ctx context.Context, ids []string) ([]engine.Dispatch, error) {
	subjs := make([]string, len(ids))
	for i, id := range ids {
		subjs[i] = s.sub.dispatch(id)
	}
	rs, err := s.getMany(ctx, subjs)
	if err != nil {
		return nil, err
	}
	out := make([]engine.Dispatch, 0, len(ids))
	for i, r := range rs {
		if r.data == nil {
			continue
		}
		d, err := decodeDispatch(subjs[i], r.data)
		if err != nil {
			return nil, err
		}
		out = append(out, *d)
	}
	return out, nil
}

// LoadDispatch implements engine.DispatchStore. It reads the record from
// the stream, never the index.
func (s *Store) LoadDispatch(ctx context.Context, dispatchID string) (*engine.Dispatch, error) {
	if err := engine.ValidateID("dispatch_id", dispatchID); err != nil {
		return nil, err
	}
	subj := s.sub.dispatch(dispatchID)
	r, err := s.getLast(ctx, subj)
	if err != nil {
		return nil, fmt.Errorf("load dispatch %s: %w", dispatchID, err)
	}
	if r.data == nil {
		return nil, nil
	}
	return decodeDispatch(subj, r.data)
}

// ListDispatches implements engine.DispatchStore. limit ≤ 0 means no limit.
func (s *Store) ListDispatches(ctx context.Context, threadID string, filter engine.StatusFilter, limit, offset int) ([]engine.Dispatch, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	if filter != nil && len(filter) == 0 {
		return []engine.Dispatch{}, nil
	}
	if err := s.fresh(ctx); err != nil {
		return nil, fmt.Errorf("list dispatches of %s: %w", threadID, err)
	}
	es := s.idx.threadDispatches(threadID, func(e *dEntry) bool { return filter.Match(e.status) })
	out, err := s.loadDispatches(ctx, ids(es, offset, limit))
	if err != nil {
		return nil, fmt.Errorf("list dispatches of %s: %w", threadID, err)
	}
	return out, nil
}

// CountByStatus implements engine.DispatchStore.
func (s *Store) CountByStatus(ctx context.Context) (engine.StatusCounts, error) {
	if err := s.fresh(ctx); err != nil {
		return engine.StatusCounts{}, fmt.Errorf("count dispatches: %w", err)
	}
	return s.idx.statusCounts(), nil
}

// ListTerminal implements engine.DispatchStore.
func (s *Store) ListTerminal(ctx context.Context, after engine.TerminalCursor, limit int) ([]engine.Dispatch, error) {
	if limit <= 0 {
		return []engine.Dispatch{}, nil
	}
	if err := s.fresh(ctx); err != nil {
		return nil, fmt.Errorf("list terminal dispatches: %w", err)
	}
	// A record that does not decode is skipped (and logged), and so is
	// one gone since the index listed it (purged): the page is filled
	// past them, so that fewer than limit means the end
	// (engine.DispatchStore; found by review: a short page ended the
	// start's reconciliation, and one damaged record failed it).
	out := make([]engine.Dispatch, 0, limit)
	cur := after
	for len(out) < limit {
		want := limit - len(out)
		cs := s.idx.terminalCursorsAfter(cur, want)
		subjs := make([]string, len(cs))
		for i, c := range cs {
			subjs[i] = s.sub.dispatch(c.DispatchID)
		}
		rs, err := s.getMany(ctx, subjs)
		if err != nil {
			return nil, fmt.Errorf("list terminal dispatches: %w", err)
		}
		for i, c := range cs {
			r, subj := rs[i], subjs[i]
			if r.data == nil {
				continue
			}
			d, err := decodeDispatch(subj, r.data)
			if err != nil {
				s.log.Error("a finished dispatch does not decode: skipped", "dispatch_id", c.DispatchID, "err", err)
				continue
			}
			out = append(out, *d)
		}
		if len(cs) < want {
			break // the index's end
		}
		cur = cs[len(cs)-1]
	}
	return out, nil
}

// ListDeadLetters implements engine.DispatchStore. limit ≤ 0 means no limit.
func (s *Store) ListDeadLetters(ctx context.Context, limit, offset int) ([]engine.Dispatch, error) {
	if err := s.fresh(ctx); err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	out, err := s.loadDispatches(ctx, s.idx.deadLetters(limit, offset))
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	return out, nil
}

// QueuedThreadIDs implements engine.DispatchStore.
func (s *Store) QueuedThreadIDs(ctx context.Context) ([]string, error) {
	if err := s.fresh(ctx); err != nil {
		return nil, fmt.Errorf("queued thread ids: %w", err)
	}
	return s.idx.queuedThreads(), nil
}

// ReadyThreads implements engine.DispatchStore.
func (s *Store) ReadyThreads(ctx context.Context, now int64, after engine.ReadyEntry, limit int) ([]engine.ReadyEntry, int64, error) {
	if limit <= 0 {
		return []engine.ReadyEntry{}, 0, nil
	}
	if err := s.fresh(ctx); err != nil {
		return nil, 0, fmt.Errorf("ready threads: %w", err)
	}
	out, next := s.idx.ready(now, after, limit)
	return out, next, nil
}

// DedupeHolder implements engine.DedupeLookup: the dispatch holding the
// thread's dedupe key, read from its lock record, not from the index
// (eventually consistent across sidecars: a repeat through another
// sidecar a moment after the first did not see it); "" when none holds it.
func (s *Store) DedupeHolder(ctx context.Context, threadID, key string) (string, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return "", err
	}
	r, err := s.getLast(ctx, s.sub.dedupe(threadID, key))
	if err != nil {
		return "", fmt.Errorf("load dedupe key %s of %s: %w", key, threadID, err)
	}
	return string(r.data), nil
}
