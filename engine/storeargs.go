package engine

import (
	"fmt"
	"time"

	"github.com/google/uuid"
)

// Argument checks every Store implementation makes before it touches its
// storage: one definition, so the backends cannot drift apart.

// Check validates a checkpoint (thread id, messages valid and distinct,
// producer id, run of the same thread) and returns a copy of its run, or
// nil when it carries none.
func (c *Checkpoint) Check() (*RunRecord, error) {
	if err := ValidateID("thread_id", c.ThreadID); err != nil {
		return nil, err
	}
	seen := make(map[string]struct{}, len(c.Messages))
	for i := range c.Messages {
		m := &c.Messages[i]
		if err := m.Validate(); err != nil {
			return nil, err
		}
		if _, dup := seen[m.ID]; dup {
			return nil, Validationf("checkpoint %s: message %s twice", c.ThreadID, m.ID)
		}
		seen[m.ID] = struct{}{}
	}
	if c.ProducedByRunID != "" {
		if err := ValidateID("produced_by_run_id", c.ProducedByRunID); err != nil {
			return nil, err
		}
	}
	if c.Run == nil {
		return nil, nil
	}
	r := *c.Run
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if r.ThreadID != c.ThreadID {
		return nil, Validationf("checkpoint %s: run %s belongs to thread %s", c.ThreadID, r.RunID, r.ThreadID)
	}
	return &r, nil
}

// PrepareSubmit checks the arguments of RunStore.Submit (and of
// IdleSubmitter.SubmitIdle): it returns the dispatch prepared for its
// enqueue (a clone) and the checkpoint's run (Check).
func PrepareSubmit(c *Checkpoint, d Dispatch) (Dispatch, *RunRecord, error) {
	d = d.Clone()
	if err := d.PrepareEnqueue(); err != nil {
		return Dispatch{}, nil, err
	}
	if d.ThreadID != c.ThreadID {
		return Dispatch{}, nil, Validationf("submit: dispatch thread %s differs from checkpoint thread %s", d.ThreadID, c.ThreadID)
	}
	run, err := c.Check()
	if err != nil {
		return Dispatch{}, nil, err
	}
	return d, run, nil
}

// LeaseMs is a lease in whole milliseconds; less than 1 ms is
// ErrValidation.
func LeaseMs(lease time.Duration) (int64, error) {
	ms := lease.Milliseconds()
	if ms <= 0 {
		return 0, Validationf("lease %s must be at least 1ms", lease)
	}
	return ms, nil
}

// ClaimArgs checks the arguments of a claim (the id of kind, the
// consumer, the lease) and mints its claim token.
func ClaimArgs(kind, id, consumerID string, lease time.Duration) (ms int64, token string, err error) {
	if err = ValidateID(kind, id); err != nil {
		return 0, "", err
	}
	if err = ValidateID("consumer_id", consumerID); err != nil {
		return 0, "", err
	}
	if ms, err = LeaseMs(lease); err != nil {
		return 0, "", err
	}
	tok, err := uuid.NewV7()
	if err != nil {
		return 0, "", fmt.Errorf("claim token: %w", err)
	}
	return ms, tok.String(), nil
}
