package engine

import "context"

// Test hooks: unexported steps of the mailbox, for the seed-mirroring
// tests of package engine_test.

// ValidateRunInputs exposes validateRunInputs.
func ValidateRunInputs(r *SubmitRequest) error { return validateRunInputs(r) }

// NormalizeRunMode exposes normalizeRunMode.
func NormalizeRunMode(r *SubmitRequest, background bool) { normalizeRunMode(r, background) }

// NormalizeMessageIDs exposes normalizeMessageIDs.
func NormalizeMessageIDs(msgs []Message) []Message { return normalizeMessageIDs(msgs) }

// ExtrasOf exposes extrasOf.
func ExtrasOf(r *SubmitRequest) RequestExtras { return extrasOf(r) }

// PrepareRun exposes prepareRun (the durable run precreate of every submit).
func (m *Mailbox) PrepareRun(ctx context.Context, r *SubmitRequest) (string, error) {
	return m.prepareRun(ctx, r)
}

// BuildDispatch exposes buildDispatch.
func (m *Mailbox) BuildDispatch(r *SubmitRequest, availableAt int64) (Dispatch, error) {
	return m.buildDispatch(r, availableAt)
}

// Reconstruct exposes reconstruct.
func (m *Mailbox) Reconstruct(ctx context.Context, d *Dispatch) (*RunRequest, *RunRecord, error) {
	return m.reconstruct(ctx, d)
}

// ThreadContextOf exposes threadContext.
func (m *Mailbox) ThreadContextOf(ctx context.Context, thread string) (ThreadContext, error) {
	return m.threadContext(ctx, thread)
}

// ReusableWaitingRun exposes reusableWaitingRun.
func (m *Mailbox) ReusableWaitingRun(ctx context.Context, thread string) (string, error) {
	return m.reusableWaitingRun(ctx, thread)
}

// InFlight reports the attempts claimed or executing here.
func (m *Mailbox) InFlight() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.inFlight
}

// Starved reports whether the dispatcher's last look found a thread
// waiting for a slot.
func (m *Mailbox) Starved() bool { return m.starved.Load() }

// HeldPrefix is the dispatcher's held head of the ready order: its
// threads and its last entry (heldprefix.go).
func (m *Mailbox) HeldPrefix() (int, ReadyEntry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.prefix.n, m.prefix.last
}

// HeldPrefixMin exposes heldPrefixMin.
const HeldPrefixMin = heldPrefixMin
