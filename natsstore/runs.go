package natsstore

import (
	"context"
	"fmt"
	"strconv"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// CreateRun implements engine.RunStore.
func (s *Store) CreateRun(ctx context.Context, run engine.RunRecord) error {
	if err := run.Validate(); err != nil {
		return err
	}
	r := run
	err := s.update(ctx, r.ThreadID, func(t *txn) error {
		if b, err := t.get(s.sub.run(r.RunID)); err != nil {
			return err
		} else if b != nil {
			return fmt.Errorf("run_id=%s: %w", r.RunID, engine.ErrAlreadyExists)
		}
		return t.putRun(nil, &r)
	})
	if err != nil {
		return fmt.Errorf("create run %s: %w", run.RunID, err)
	}
	return nil
}

// loadRun reads one run outside a transaction; nil when missing.
func (s *Store) loadRun(ctx context.Context, id string) (*engine.RunRecord, error) {
	subj := s.sub.run(id)
	r, err := s.getLast(ctx, subj)
	if err != nil || r.data == nil {
		return nil, err
	}
	return decodeRun(subj, r.data)
}

// LoadRun implements engine.RunStore.
func (s *Store) LoadRun(ctx context.Context, runID string) (*engine.RunRecord, error) {
	if err := engine.ValidateID("run_id", runID); err != nil {
		return nil, err
	}
	out, err := s.loadRun(ctx, runID)
	if err != nil {
		return nil, fmt.Errorf("load run %s: %w", runID, err)
	}
	return out, nil
}

// LatestRun implements engine.RunStore. The index names the run; the
// record is read from the stream.
func (s *Store) LatestRun(ctx context.Context, threadID string) (*engine.RunRecord, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	if err := s.fresh(ctx); err != nil {
		return nil, fmt.Errorf("latest run of %s: %w", threadID, err)
	}
	id := s.idx.latestRun(threadID)
	if id == "" {
		return nil, nil
	}
	out, err := s.loadRun(ctx, id)
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
	if err := s.fresh(ctx); err != nil {
		return engine.RunPage{}, fmt.Errorf("list runs: %w", err)
	}
	ids, total := s.idx.listRuns(q.Status, q.ThreadID, offset, limit)
	page := engine.RunPage{Items: make([]engine.RunRecord, 0, len(ids)), Total: total}
	subjs := make([]string, len(ids))
	for i, id := range ids {
		subjs[i] = s.sub.run(id)
	}
	rs, err := s.getMany(ctx, subjs)
	if err != nil {
		return engine.RunPage{}, fmt.Errorf("list runs: %w", err)
	}
	for i, r := range rs {
		if r.data == nil {
			continue
		}
		run, err := decodeRun(subjs[i], r.data)
		if err != nil {
			return engine.RunPage{}, fmt.Errorf("list runs: %w", err)
		}
		page.Items = append(page.Items, *run)
	}
	page.HasMore = offset+len(page.Items) < page.Total
	return page, nil
}

// LoadThread implements engine.RunStore.
func (s *Store) LoadThread(ctx context.Context, threadID string) (*engine.Thread, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return nil, err
	}
	subj := s.sub.thread(threadID)
	r, err := s.getLast(ctx, subj)
	if err != nil {
		return nil, fmt.Errorf("load thread %s: %w", threadID, err)
	}
	if r.data == nil {
		return nil, nil
	}
	return decodeThread(subj, r.data)
}

// Checkpoint implements engine.RunStore.
func (s *Store) Checkpoint(ctx context.Context, c engine.Checkpoint) ([]engine.MessageRecord, error) {
	run, err := c.Check()
	if err != nil {
		return nil, err
	}
	var out []engine.MessageRecord
	err = s.update(ctx, c.ThreadID, func(t *txn) error {
		var err error
		out, err = t.checkpoint(&c, run)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", c.ThreadID, err)
	}
	return out, nil
}

// checkpoint applies a checked checkpoint: the append guarded by the
// thread projection's message count, the run upsert and the projection.
func (t *txn) checkpoint(c *engine.Checkpoint, run *engine.RunRecord) ([]engine.MessageRecord, error) {
	th, err := t.loadThreadOrNew(c.ThreadID)
	if err != nil {
		return nil, err
	}
	count := th.MessageCount
	if count != c.ExpectedCount {
		return nil, &engine.ConflictError{What: "message_count", Expected: c.ExpectedCount, Actual: count}
	}
	for i := range c.Messages {
		if b, err := t.get(t.s.sub.messageID(c.ThreadID, c.Messages[i].ID)); err != nil {
			return nil, err
		} else if b != nil {
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
		t.put(t.s.sub.message(c.ThreadID, count), enc)
		t.put(t.s.sub.messageID(c.ThreadID, rec.MessageID), strconv.AppendUint(nil, count, 10))
		out = append(out, rec)
	}
	if run != nil {
		old, err := t.loadRun(run.RunID)
		if err != nil {
			return nil, err
		}
		if err := t.checkNotPending(old, run); err != nil {
			return nil, err
		}
		if err := t.putRun(old, run); err != nil {
			return nil, err
		}
	}
	th, err = t.loadThreadOrNew(c.ThreadID)
	if err != nil {
		return nil, err
	}
	th.MessageCount = count
	return out, t.putThread(th)
}

// MessageCount implements engine.RunStore.
func (s *Store) MessageCount(ctx context.Context, threadID string) (uint64, error) {
	if err := engine.ValidateID("thread_id", threadID); err != nil {
		return 0, err
	}
	th, err := s.LoadThread(ctx, threadID)
	if err != nil || th == nil {
		return 0, err
	}
	return th.MessageCount, nil
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
	isubj := s.sub.messageID(threadID, messageID)
	r, err := s.getLast(ctx, isubj)
	if err != nil {
		return nil, fmt.Errorf("load message %s/%s: %w", threadID, messageID, err)
	}
	if r.data == nil {
		return nil, nil
	}
	seq, err := strconv.ParseUint(string(r.data), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("load message %s/%s: id lock %s: %w", threadID, messageID, isubj, engine.ErrCorrupt)
	}
	subj := s.sub.message(threadID, seq)
	m, err := s.getLast(ctx, subj)
	if err != nil {
		return nil, fmt.Errorf("load message %s/%s: %w", threadID, messageID, err)
	}
	if m.data == nil {
		return nil, fmt.Errorf("load message %s/%s: id lock names missing %s: %w", threadID, messageID, subj, engine.ErrCorrupt)
	}
	rec, err := decodeMessage(subj, m.data)
	if err != nil {
		return nil, err
	}
	return &rec, nil
}

// LoadMessageRange implements engine.RunStore. The thread projection's
// message count bounds the range; the messages are read with batched
// direct gets (getMany), not one round trip each.
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
	n, err := s.MessageCount(ctx, threadID)
	if err != nil {
		return nil, fmt.Errorf("load messages %s [%d,%d]: %w", threadID, from, to, err)
	}
	to = min(to, n)
	if from > to {
		return out, nil
	}
	subjs := make([]string, 0, to-from+1)
	for seq := from; seq <= to; seq++ {
		subjs = append(subjs, s.sub.message(threadID, seq))
	}
	rs, err := s.getMany(ctx, subjs)
	if err != nil {
		return nil, fmt.Errorf("load messages %s [%d,%d]: %w", threadID, from, to, err)
	}
	out = make([]engine.MessageRecord, 0, len(rs))
	for i, r := range rs {
		subj := subjs[i]
		if r.data == nil {
			return nil, fmt.Errorf("load messages %s: %s missing below the count %d: %w", threadID, subj, n, engine.ErrCorrupt)
		}
		m, err := decodeMessage(subj, r.data)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// checkNotPending refuses a checkpoint that gives run to a new dispatch
// while the dispatch its stored version names has not started (queued,
// or claimed before its start was recorded): that dispatch would execute
// the new request and the new one find the run done, its own request
// never run. The engine checks this before it commits
// (checkOpenForDispatch); the check is made again here, against the
// records the commit reads, because a sidecar sharing the store can
// continue the same waiting run in between (found by the crash harness:
// a decision through one sidecar and a queued live message through the
// other continued one run, and the later dispatch was acked unrun). The
// engine answers the refusal as its own: a request that named no run
// gets a run of its own.
func (t *txn) checkNotPending(old, run *engine.RunRecord) error {
	if old == nil || old.DispatchID == "" || old.DispatchID == run.DispatchID {
		return nil
	}
	d, err := t.loadDispatch(old.DispatchID)
	if err != nil {
		return err
	}
	if d != nil && d.RunID == old.RunID && (d.Status == engine.StatusQueued || d.Status == engine.StatusClaimed && d.RunStatus == "") {
		return engine.Validationf("run_id '%s' is not open for dispatch", run.RunID)
	}
	return nil
}
