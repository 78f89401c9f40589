package engine

import (
	"errors"
	"fmt"
)

// Sentinel errors shared by every store implementation and by the engine.
// Test with errors.Is; every error a client can see maps to one stable code
// through Code.
var (
	// ErrValidation reports input that can never succeed as given.
	ErrValidation = errors.New("validation error")
	// ErrNotFound reports an unknown id.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists reports a duplicate id or an occupied dedupe key.
	ErrAlreadyExists = errors.New("already exists")
	// ErrVersionConflict reports that the record changed under the caller:
	// a stale claim token, a superseded epoch or a message-count mismatch.
	ErrVersionConflict = errors.New("version conflict")
	// ErrStaleClaim reports a claim token that no longer owns the dispatch
	// (wrong token, or the dispatch is not claimed any more). It is a
	// version conflict.
	ErrStaleClaim = fmt.Errorf("%w: stale or wrong claim token", ErrVersionConflict)
	// ErrTooLarge reports an operation or value larger than the store can
	// take in one atomic write.
	ErrTooLarge = errors.New("too large")
	// ErrCorrupt reports a persisted record that cannot be decoded or
	// violates the record invariants. The wrapping error names the key.
	ErrCorrupt = errors.New("serialization error")
	// ErrUnavailable reports a store that cannot serve now: closed, disk
	// full, I/O failure. Callers may retry later.
	ErrUnavailable = errors.New("io error")
	// ErrQueueFull reports a background submit refused because
	// Config.MaxQueued dispatches are queued. It is ErrUnavailable: retry
	// later.
	ErrQueueFull = fmt.Errorf("%w: queue full", ErrUnavailable)
	// ErrDataDirInUse reports that another process holds the data directory.
	ErrDataDirInUse = errors.New("data directory in use by another process")
	// ErrNextClaim marks a CompleteAndClaim that failed in its claim half
	// (CompleteClaimer): nothing was written, and the attempt is to be
	// completed alone. What it wraps may be any error, a stale claim
	// included (a damaged record of the next dispatch), so the engine
	// tells the halves apart by this mark, not by the error's kind.
	ErrNextClaim = errors.New("claim of the thread's next dispatch failed")
)

// ConflictError carries the two versions of a version conflict: epochs for
// a superseded dispatch, message counts for a guarded append.
type ConflictError struct {
	What     string // "dispatch_epoch" or "message_count"
	Expected uint64
	Actual   uint64
}

// Error implements error.
func (e *ConflictError) Error() string {
	return fmt.Sprintf("version conflict: %s expected %d, actual %d", e.What, e.Expected, e.Actual)
}

// Is makes errors.Is(err, ErrVersionConflict) true.
func (e *ConflictError) Is(target error) bool { return target == ErrVersionConflict }

// Validationf returns an ErrValidation with a formatted message.
func Validationf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrValidation, fmt.Sprintf(format, args...))
}

// Code is the stable, client-visible code of an error (used by HTTP and IPC
// alike).
func Code(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrValidation):
		return "validation"
	case errors.Is(err, ErrNotFound):
		return "not_found"
	case errors.Is(err, ErrAlreadyExists):
		return "already_exists"
	case errors.Is(err, ErrVersionConflict):
		return "conflict"
	case errors.Is(err, ErrTooLarge):
		return "too_large"
	case errors.Is(err, ErrUnavailable), errors.Is(err, ErrDataDirInUse):
		return "unavailable"
	default:
		return "internal"
	}
}
