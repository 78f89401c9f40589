package badgerstore

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// CreateRun implements engine.RunStore.
func (s *Store) CreateRun(ctx context.Context, run engine.RunRecord) error {
	if err := run.Validate(); err != nil {
		return err
	}
	r := run
	err := s.update(ctx, "create_run", func(w *writeTx) error {
		if _, ok, err := w.get(runKey(r.RunID)); err != nil {
			return err
		} else if ok {
			return fmt.Errorf("run_id=%s: %w", r.RunID, engine.ErrAlreadyExists)
		}
		return w.putRun(nil, &r)
	})
	if err != nil {
		return fmt.Errorf("create run %s: %w", run.RunID, err)
	}
	return nil
}

func loadRunTxn(r *reader, id string) (*engine.RunRecord, error) {
	k := runKey(id)
	b, ok, err := r.get(k)
	if err != nil || !ok {
		return nil, err
	}
	return decodeRun(k, b)
}

// LoadRun implements engine.RunStore.
func (s *Store) LoadRun(ctx context.Context, runID string) (*engine.RunRecord, error) {
	if err := engine.ValidateID("run_id", runID); err != nil {
		return nil, err
	}
	var out *engine.RunRecord
	err := s.view(ctx, func(r *reader) error {
		var err error
		out, err = loadRunTxn(r, runID)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("load run %s: %w", runID, err)
	}
	return out, nil
}

// LatestRun implements engine.RunStore.
func (s *Store) LatestRun(ctx context.Context, threadID string) (*engine.RunRecord, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	var out *engine.RunRecord
	err := s.view(ctx, func(r *reader) error {
		prefix := threadPrefix(pRunLatest, threadID)
		latest, known := r.cache.getAt(prefix, r.seq)
		if !known {
			err := r.iterate(prefix, nil, true, true, func(k, _ []byte) (bool, error) {
				latest = k
				return false, nil
			})
			if err != nil {
				return err
			}
			r.cache.fillLatestRun(prefix, latest, r.seq)
		}
		if latest == nil {
			return nil
		}
		if len(latest) < len(prefix)+2*tsBytes+1 {
			return fmt.Errorf("run index key %q: %w", latest, engine.ErrCorrupt)
		}
		id := string(latest[len(prefix)+2*tsBytes:])
		var err error
		out, err = loadRunTxn(r, id)
		if err == nil && out == nil {
			err = fmt.Errorf("run index names missing run %s: %w", id, engine.ErrCorrupt)
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("latest run of %s: %w", threadID, err)
	}
	return out, nil
}

// ListRuns implements engine.RunStore.
func (s *Store) ListRuns(ctx context.Context, q engine.RunQuery) (engine.RunPage, error) {
	if q.Status != "" && !q.Status.Valid() {
		return engine.RunPage{}, engine.Validationf("unknown run status %q", q.Status)
	}
	if q.ThreadID != "" {
		if err := engine.ValidateID("thread_id", q.ThreadID); err != nil {
			return engine.RunPage{}, err
		}
	}
	limit := q.Limit
	if limit <= 0 || limit > engine.MaxRunPage {
		limit = engine.MaxRunPage
	}
	offset := max(q.Offset, 0)
	page := engine.RunPage{Items: []engine.RunRecord{}}
	err := s.view(ctx, func(r *reader) error {
		// Choose the narrowest index; its keys end in <created ts><run_id>.
		// Only waiting runs have an index of their own; other statuses
		// are filtered from the records.
		var prefix []byte
		filterStatus := q.Status != ""
		switch {
		case q.ThreadID != "":
			prefix = threadPrefix(pRunThread, q.ThreadID)
		case q.Status == engine.RunWaiting:
			prefix, filterStatus = []byte{pRunWaiting}, false
		default:
			prefix = []byte{pRunAll}
		}
		idx := 0
		return r.iterate(prefix, nil, false, true, func(k, _ []byte) (bool, error) {
			if len(k) < len(prefix)+tsBytes {
				return false, fmt.Errorf("run index key %q: %w", k, engine.ErrCorrupt)
			}
			id := string(k[len(prefix)+tsBytes:])
			var run *engine.RunRecord
			if filterStatus || (idx >= offset && len(page.Items) < limit) {
				var err error
				if run, err = loadRunTxn(r, id); err != nil {
					return false, err
				}
				if run == nil {
					return false, fmt.Errorf("run index names missing run %s: %w", id, engine.ErrCorrupt)
				}
				if filterStatus && run.Status != q.Status {
					return true, nil
				}
			}
			if idx >= offset && len(page.Items) < limit {
				page.Items = append(page.Items, *run)
			}
			idx++
			page.Total = idx
			return true, nil
		})
	})
	if err != nil {
		return engine.RunPage{}, fmt.Errorf("list runs: %w", err)
	}
	page.HasMore = offset+len(page.Items) < page.Total
	return page, nil
}

// LoadThread implements engine.RunStore.
func (s *Store) LoadThread(ctx context.Context, threadID string) (*engine.Thread, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	var out *engine.Thread
	err := s.view(ctx, func(r *reader) error {
		k := threadKey(threadID)
		b, ok, err := r.get(k)
		if err != nil || !ok {
			return err
		}
		out, err = decodeThread(k, b)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("load thread %s: %w", threadID, err)
	}
	return out, nil
}

// Checkpoint implements engine.RunStore.
func (s *Store) Checkpoint(ctx context.Context, c engine.Checkpoint) ([]engine.MessageRecord, error) {
	run, err := c.Check()
	if err != nil {
		return nil, err
	}
	var out []engine.MessageRecord
	err = s.update(ctx, "checkpoint", func(w *writeTx) error {
		var err error
		out, err = w.checkpoint(&c, run)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", c.ThreadID, err)
	}
	return out, nil
}

// checkpoint applies a checked checkpoint: the guarded append, the run
// upsert and the thread projection.
func (w *writeTx) checkpoint(c *engine.Checkpoint, run *engine.RunRecord) ([]engine.MessageRecord, error) {
	b, _, err := w.get(msgCountKey(c.ThreadID))
	if err != nil {
		return nil, err
	}
	count, err := counter(msgCountKey(c.ThreadID), b)
	if err != nil {
		return nil, err
	}
	if count != c.ExpectedCount {
		return nil, &engine.ConflictError{What: "message_count", Expected: c.ExpectedCount, Actual: count}
	}
	for i := range c.Messages {
		if c.Minted.MessageIDs {
			break // all new by construction (engine.Minted): nothing to look up
		}
		if _, ok, err := w.get(messageIDKey(c.ThreadID, c.Messages[i].ID)); err != nil {
			return nil, err
		} else if ok {
			return nil, fmt.Errorf("message %s: %w", c.Messages[i].ID, engine.ErrAlreadyExists)
		}
	}
	out := make([]engine.MessageRecord, 0, len(c.Messages))
	for i := range c.Messages {
		count++
		rec := engine.MessageRecord{
			MessageID:       c.Messages[i].ID,
			ThreadID:        c.ThreadID,
			Seq:             count,
			Message:         c.Messages[i],
			ProducedByRunID: c.ProducedByRunID,
			ToolCallID:      c.Messages[i].ToolCallID,
			CreatedAt:       c.CreatedAt,
		}
		enc, err := encode(&rec)
		if err != nil {
			return nil, err
		}
		w.set(messageKey(c.ThreadID, count), enc)
		w.set(messageIDKey(c.ThreadID, rec.MessageID), u64(count))
		out = append(out, rec)
	}
	if len(c.Messages) > 0 {
		w.set(msgCountKey(c.ThreadID), u64(count))
	}
	if run != nil && c.Minted.RunID { // a minted run id names no stored run
		if err := w.putNewRun(run); err != nil {
			return nil, err
		}
	} else if run != nil {
		old, err := w.loadRun(run.RunID)
		if err != nil {
			return nil, err
		}
		if err := w.putRun(old, run); err != nil {
			return nil, err
		}
	}
	t, err := w.loadThreadOrNew(c.ThreadID)
	if err != nil {
		return nil, err
	}
	t.MessageCount = count
	return out, w.putThread(t)
}

// MessageCount implements engine.RunStore.
func (s *Store) MessageCount(ctx context.Context, threadID string) (uint64, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return 0, err
	}
	var n uint64
	err := s.view(ctx, func(r *reader) error {
		b, _, err := r.get(msgCountKey(threadID))
		if err != nil {
			return err
		}
		n, err = counter(msgCountKey(threadID), b)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("message count of %s: %w", threadID, err)
	}
	return n, nil
}

// LoadMessages implements engine.RunStore.
func (s *Store) LoadMessages(ctx context.Context, threadID string) ([]engine.MessageRecord, error) {
	return s.LoadMessageRange(ctx, threadID, 1, ^uint64(0))
}

// LoadMessage implements engine.RunStore.
func (s *Store) LoadMessage(ctx context.Context, threadID, messageID string) (*engine.MessageRecord, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	if err := engine.ValidateID("message_id", messageID); err != nil {
		return nil, err
	}
	var out *engine.MessageRecord
	err := s.view(ctx, func(r *reader) error {
		ik := messageIDKey(threadID, messageID)
		b, ok, err := r.get(ik)
		if err != nil || !ok {
			return err
		}
		seq, err := counter(ik, b)
		if err != nil {
			return err
		}
		k := messageKey(threadID, seq)
		v, ok, err := r.get(k)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("message index names missing %q: %w", k, engine.ErrCorrupt)
		}
		m, err := decodeMessage(k, v)
		out = &m
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("load message %s/%s: %w", threadID, messageID, err)
	}
	return out, nil
}

// LoadMessageRange implements engine.RunStore.
func (s *Store) LoadMessageRange(ctx context.Context, threadID string, from, to uint64) ([]engine.MessageRecord, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	out := []engine.MessageRecord{}
	if from == 0 {
		from = 1
	}
	if from > to {
		return out, nil
	}
	out = make([]engine.MessageRecord, 0, min(to-from+1, 512)) // the default window whole
	err := s.view(ctx, func(r *reader) error {
		prefix := threadPrefix(pMessage, threadID)
		// The key is read, not kept: the thread and seq are the caller's
		// and the walk's (and an error names a copy).
		return r.iterateBorrowed(prefix, messageKey(threadID, from), func(k, v []byte) (bool, error) {
			if len(k) != len(prefix)+8 {
				return false, fmt.Errorf("message key %q: %w", k, engine.ErrCorrupt)
			}
			seq := binary.BigEndian.Uint64(k[len(prefix):])
			if seq > to {
				return false, nil
			}
			m, err := decodeMessageOf(threadID, seq, k, v, true) // iterate's v is a copy of our own
			if err != nil {
				return false, err
			}
			out = append(out, m)
			return true, nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("load messages %s [%d,%d]: %w", threadID, from, to, err)
	}
	return out, nil
}
