package engine

import (
	"context"
	"time"
)

// StatusFilter selects dispatches by status: nil selects every status, an
// empty non-nil slice selects none.
type StatusFilter []DispatchStatus

// Match reports whether s passes the filter.
func (f StatusFilter) Match(s DispatchStatus) bool {
	if f == nil {
		return true
	}
	for _, x := range f {
		if x == s {
			return true
		}
	}
	return false
}

// StatusCounts holds the number of dispatches in each status, indexed by
// DispatchStatus.
type StatusCounts [StatusDeadLetter + 1]int64

// Get returns the count for s.
func (c StatusCounts) Get(s DispatchStatus) int64 {
	if !s.Valid() {
		return 0
	}
	return c[s]
}

// TerminalCursor is a position in the terminal-dispatch order (updated_at,
// created_at, dispatch_id). The zero cursor is before the first record.
type TerminalCursor struct {
	UpdatedAt  int64
	CreatedAt  int64
	DispatchID string
}

// CursorAfter returns the cursor just past d.
func CursorAfter(d *Dispatch) TerminalCursor {
	return TerminalCursor{UpdatedAt: d.UpdatedAt, CreatedAt: d.CreatedAt, DispatchID: d.DispatchID}
}

// DispatchStore is the durable dispatch queue (store.md §2). Every method
// that returns success has made its change durable, and all changes of one
// call (the record, its indexes, and the run record a terminal dispatch
// settles) commit together. now and every other timestamp are Unix ms and
// chosen by the caller.
//
// Error conventions: an unknown id is ErrNotFound; a wrong or stale claim
// token is ErrStaleClaim; a dispatch whose epoch fell behind its thread is
// superseded by the call, which then returns a *ConflictError (both are
// ErrVersionConflict); bad arguments are ErrValidation.
//
// A dispatch that becomes cancelled, superseded or dead_letter settles its
// run record in the same commit when the run exists, belongs to the same
// thread and is not done yet (RunRecord.Settle).
type DispatchStore interface {
	// Enqueue stores a clean queued dispatch, stamping the thread's
	// current epoch over the caller's. A duplicate dispatch id, or a
	// dedupe key held by a non-terminal dispatch of the same thread, is
	// ErrAlreadyExists. It returns the stored record.
	Enqueue(ctx context.Context, d Dispatch) (Dispatch, error)
	// Claim claims the thread's best queued dispatch (priority, then
	// created_at, then dispatch_id) whose available_at ≤ now, unless the
	// thread already has a claimed dispatch (even one whose lease lapsed
	// and was not reclaimed yet). nil when there is nothing to claim.
	Claim(ctx context.Context, threadID, consumerID string, lease time.Duration, now int64) (*Dispatch, error)
	// ClaimDispatch claims one queued dispatch by id, ignoring
	// available_at. nil when it is missing, not queued, stale (then it is
	// superseded) or another dispatch of its thread is claimed.
	ClaimDispatch(ctx context.Context, dispatchID, consumerID string, lease time.Duration, now int64) (*Dispatch, error)
	// Ack marks a claimed dispatch acked; the runtime projection is kept.
	Ack(ctx context.Context, dispatchID, claimToken string, now int64) error
	// RecordDispatchStart writes the runtime projection of a started
	// attempt and, in the same commit, marks its run running
	// (RunRecord.MarkStarted).
	RecordDispatchStart(ctx context.Context, dispatchID, claimToken, instanceID string, now int64) error
	// RecordRunResult writes the runtime outcome; the dispatch stays
	// claimed. In the same commit the run records it (RunRecord.ApplyResult).
	// A result for another run id is ErrValidation.
	RecordRunResult(ctx context.Context, dispatchID, claimToken string, result RunResult, now int64) error
	// Complete is RecordRunResult and Ack in one commit: the attempt's
	// outcome, its run record and the consumed delivery together (no
	// window in which a recorded result waits for its ack).
	Complete(ctx context.Context, dispatchID, claimToken string, result RunResult, now int64) error
	// Nack spends an attempt: queued again at retryAt, or dead_letter at
	// max attempts. It returns the resulting record.
	Nack(ctx context.Context, dispatchID, claimToken string, retryAt int64, errMsg string, now int64) (Dispatch, error)
	// DeadLetter terminalizes a claimed dispatch without spending an attempt.
	DeadLetter(ctx context.Context, dispatchID, claimToken, errMsg string, now int64) error
	// Cancel cancels a queued dispatch and returns it; nil (no error) when
	// the dispatch is missing, claimed or terminal.
	Cancel(ctx context.Context, dispatchID string, now int64) (*Dispatch, error)
	// Release puts a claimed dispatch back to queued, available at now,
	// without spending an attempt (shutdown; a run never started).
	Release(ctx context.Context, dispatchID, claimToken string, now int64) (Dispatch, error)
	// ExtendLease sets lease_until = now + lease. false (no error) when the
	// dispatch is missing, not claimed, or the token does not match; a
	// stale epoch supersedes the dispatch and returns false.
	ExtendLease(ctx context.Context, dispatchID, claimToken string, lease time.Duration, now int64) (bool, error)
	// Interrupt bumps the thread epoch and supersedes all its queued
	// dispatches; the claimed dispatch, if any, is reported as Active and
	// left claimed. The bump commits atomically with the first of the
	// queued dispatches; a long queue may take further commits. From the
	// bump on no dispatch of an older epoch is claimed: a claim that meets
	// one supersedes it. An error with a non-zero NewEpoch reports an
	// interrupt that took effect but whose later commits failed: the
	// result lists what was superseded.
	Interrupt(ctx context.Context, threadID string, now int64) (InterruptResult, error)
	// CurrentEpoch returns the thread's epoch (0 for an unknown thread).
	CurrentEpoch(ctx context.Context, threadID string) (uint64, error)
	// SupersedeClaimed supersedes a claimed dispatch. nil when missing or
	// not claimed; a token mismatch is ErrStaleClaim.
	SupersedeClaimed(ctx context.Context, dispatchID, claimToken, reason string, now int64) (*Dispatch, error)
	// Requeue is an operator's retry of a dead letter: it creates the new
	// queued dispatch newDispatchID for the same run (attempts reset,
	// current epoch, error history carried over), marks the dead letter
	// RequeuedAs (it leaves the dead-letter listing and stays terminal) and
	// reopens the run record (status created, outcome cleared). Requeueing
	// a non-dead-letter is ErrValidation, twice ErrAlreadyExists; a dedupe
	// key now held by another dispatch is ErrAlreadyExists; a dead letter
	// whose run has moved on to another dispatch (RunRecord.MovedOnFrom)
	// is ErrVersionConflict, and nothing changes.
	Requeue(ctx context.Context, dispatchID, newDispatchID string, now int64) (Dispatch, error)
	// ReclaimExpired processes claimed dispatches whose lease_until < now,
	// oldest lease first, until limit of them have spent an attempt and
	// been queued again or dead-lettered (both returned) or none is left;
	// a stale one is superseded on the way (not returned, not counted).
	// Fewer than limit returned means no lapsed lease is left.
	ReclaimExpired(ctx context.Context, now int64, limit int) ([]Dispatch, error)
	// PurgeTerminal deletes terminal dispatches with updated_at < olderThan
	// and returns how many. Thread epochs are kept (they stay monotonic).
	PurgeTerminal(ctx context.Context, olderThan int64) (int, error)

	// LoadDispatch returns the dispatch, or nil when unknown.
	LoadDispatch(ctx context.Context, dispatchID string) (*Dispatch, error)
	// ListDispatches lists a thread's dispatches ordered by (priority,
	// created_at, dispatch_id), filtered, then offset, then limit.
	ListDispatches(ctx context.Context, threadID string, filter StatusFilter, limit, offset int) ([]Dispatch, error)
	// CountByStatus counts dispatches in each status.
	CountByStatus(ctx context.Context) (StatusCounts, error)
	// ListTerminal lists terminal dispatches strictly after the cursor in
	// (updated_at, created_at, dispatch_id) order. A record that does not
	// decode is skipped (and logged), not an error: the list serves the
	// start's reconciliation, which one damaged record must not stop.
	// Fewer than limit means the end.
	ListTerminal(ctx context.Context, after TerminalCursor, limit int) ([]Dispatch, error)
	// ListDeadLetters lists dead-lettered dispatches not yet requeued,
	// newest (completed_at) first.
	ListDeadLetters(ctx context.Context, limit, offset int) ([]Dispatch, error)
	// QueuedThreadIDs returns the sorted distinct threads that have at
	// least one queued dispatch, available or not.
	QueuedThreadIDs(ctx context.Context) ([]string, error)
	// ReadyThreads returns up to limit claimable threads (queued work and
	// no claimed dispatch) whose earliest queued dispatch is due (≤ now),
	// the one due longest first, and the earliest due time after now among
	// claimable threads (0 when none), so a caller can sleep until then. A
	// thread that holds a claim is not listed and its later work does not
	// count: it becomes claimable again when that dispatch settles. The
	// list starts strictly after the position after in the ready order
	// (the zero ReadyEntry: at its start); nextDueAt does not depend on
	// after or limit.
	ReadyThreads(ctx context.Context, now int64, after ReadyEntry, limit int) (threads []ReadyEntry, nextDueAt int64, err error)
}

// ReadyEntry is a claimable thread and its place in the ready order:
// by Due (Unix ms: since when the thread has waited, its oldest queued
// work or its last run's end if that is later), then by ThreadID. The
// dispatcher passes one back to ReadyThreads to list what follows it.
type ReadyEntry struct {
	ThreadID string
	Due      int64
}

// IsZero reports whether e is the zero entry: the start of the order.
func (e ReadyEntry) IsZero() bool { return e.ThreadID == "" }

// Before reports whether e comes before o in the ready order.
func (e ReadyEntry) Before(o ReadyEntry) bool {
	return e.Due < o.Due || e.Due == o.Due && e.ThreadID < o.ThreadID
}

// RunQuery selects run records for ListRuns. Empty fields do not filter.
type RunQuery struct {
	Status   RunStatus
	ThreadID string
	Offset   int
	Limit    int // clamped to 1..MaxRunPage; 0 means MaxRunPage
}

// MaxRunPage is the largest page ListRuns returns.
const MaxRunPage = 200

// RunPage is one page of ListRuns, ordered by (created_at, run_id).
type RunPage struct {
	Items   []RunRecord `json:"items"`
	Total   int         `json:"total"`
	HasMore bool        `json:"has_more"`
}

// Checkpoint is one atomic write to a thread: append messages to its log
// and upsert a run record and the thread projection.
type Checkpoint struct {
	ThreadID string
	// ExpectedCount is the message count the caller read; the append
	// happens only if the log still has exactly that many messages,
	// otherwise the checkpoint fails with a *ConflictError.
	ExpectedCount uint64
	// Messages are appended in order with seq ExpectedCount+1, … Their ids
	// must be set and new to the thread.
	Messages []Message
	// ProducedByRunID and CreatedAt annotate the new records.
	ProducedByRunID string
	CreatedAt       int64 // Unix ms
	// Run, when set, is upserted (it must belong to ThreadID) and applied
	// to the thread projection (Thread.ApplyRun).
	Run *RunRecord
	// Minted says which ids of this write the engine made for it.
	Minted Minted
}

// Minted names the ids of a write that the engine made for it (newID: a
// UUIDv7, 74 random bits per millisecond). No record can hold such an id
// yet, so a store may skip checking it for a duplicate: a read of a key
// that is never there, which in an LSM tree probes every memtable and
// level. A store that checks all the same is correct too. Ids a caller
// supplied (hints, message ids) are never marked.
type Minted struct {
	// MessageIDs: every message of the checkpoint had no id and got one.
	MessageIDs bool
	// RunID: the checkpoint's Run is a new record under an id made for
	// it; there is no stored version to read or replace.
	RunID bool
	// DispatchID: the dispatch of a Submit (or SubmitIdle) carries an id
	// made for it.
	DispatchID bool
}

// RunStore holds run records, thread projections and each thread's
// append-only message log (store.md §3). Writes are durable and atomic as
// for DispatchStore.
type RunStore interface {
	// CreateRun stores a new run; a duplicate run id is ErrAlreadyExists.
	CreateRun(ctx context.Context, run RunRecord) error
	// LoadRun returns the run, or nil.
	LoadRun(ctx context.Context, runID string) (*RunRecord, error)
	// LatestRun returns the thread's run with the greatest (updated_at,
	// created_at, run_id), or nil.
	LatestRun(ctx context.Context, threadID string) (*RunRecord, error)
	// ListRuns pages through run records.
	ListRuns(ctx context.Context, q RunQuery) (RunPage, error)
	// LoadThread returns the thread projection, or nil. A thread that has
	// a run has a projection: every write of a run record (CreateRun, a
	// checkpoint's run, the settling of a run with its dispatch, a
	// requeue) updates it in the same commit. The engine relies on it: a
	// thread without one has no run to continue or to inherit from.
	LoadThread(ctx context.Context, threadID string) (*Thread, error)
	// Checkpoint appends messages guarded by the expected count and
	// upserts the run and thread projection in one commit. It returns the
	// appended records.
	Checkpoint(ctx context.Context, c Checkpoint) ([]MessageRecord, error)
	// Submit is Checkpoint and Enqueue in one commit: a submitted run's
	// messages, run record and dispatch are written together or not at
	// all (no dispatch without its run record). Errors are those of both.
	Submit(ctx context.Context, c Checkpoint, d Dispatch) ([]MessageRecord, Dispatch, error)
	// MessageCount returns the number of messages in the thread's log.
	MessageCount(ctx context.Context, threadID string) (uint64, error)
	// LoadMessages returns the whole log in order (empty for an unknown thread).
	LoadMessages(ctx context.Context, threadID string) ([]MessageRecord, error)
	// LoadMessage returns one message by id, or nil.
	LoadMessage(ctx context.Context, threadID, messageID string) (*MessageRecord, error)
	// LoadMessageRange returns the records with from ≤ seq ≤ to.
	LoadMessageRange(ctx context.Context, threadID string, from, to uint64) ([]MessageRecord, error)
}

// Store is a complete backend: the dispatch queue and the run store on one
// database, so a terminal dispatch and the run it settles commit together.
type Store interface {
	DispatchStore
	RunStore
	// Close flushes and closes the store; safe to call twice.
	Close() error
}

// CompleteClaimer is implemented by stores that can acknowledge an
// attempt and claim its thread's next dispatch in one commit: one sync
// instead of two between consecutive runs of a busy thread.
type CompleteClaimer interface {
	// CompleteAndClaim is Complete followed, in the same commit, by
	// Claim(the dispatch's thread, consumerID, lease, now); next is nil
	// when nothing was claimable. When Complete fails (a stale token, a
	// superseded dispatch) nothing is claimed, and the error is
	// Complete's. When the claim fails, nothing at all is written and the
	// error wraps ErrNextClaim (the engine then completes alone).
	CompleteAndClaim(ctx context.Context, dispatchID, claimToken string, result RunResult, now int64, consumerID string, lease time.Duration) (next *Dispatch, err error)
}

// OrphanReclaimer is implemented by a store that one process owns alone
// (the Badger store: its directory's lock). The claims it held when it
// was opened are those of a sidecar process that is gone: Recover
// reclaims them at once, instead of waiting up to a lease (a suspended
// run's: ten minutes) for them to lapse. ReclaimOrphans treats each as
// ReclaimExpired treats a lapsed lease (an attempt spent, queued again or
// dead-lettered, a stale epoch superseded), under Dispatch.ReclaimOrphan's
// reasons, and skips one settled since (its claim token changed). It
// returns up to limit reclaimed dispatches; fewer when none is left.
// Claims made after the store was opened are never its business. A
// store shared by several processes (NATS) cannot tell and does not
// implement it: there, claims lapse.
type OrphanReclaimer interface {
	ReclaimOrphans(ctx context.Context, now int64, limit int) ([]Dispatch, error)
}

// StartClaimer is implemented by stores that can record an attempt's
// start in the commit that claims its dispatch: one commit and one write
// of the dispatch fewer per run than Claim then RecordDispatchStart. (The
// pre-execution checks that RecordDispatchStart makes — the claim still
// ours, its epoch current — cannot fail inside the claim's own commit.)
type StartClaimer interface {
	// ClaimStart is Claim followed, in the same commit, by
	// RecordDispatchStart(the claimed dispatch, its token, instanceID,
	// now) — unless the dispatch's run is already done (a previous attempt
	// finished it and lost its ack: the engine acks the dispatch) or
	// waiting (a continuation: the engine rebuilds the request from the
	// run as it waits, then records the start); such a dispatch is
	// claimed only. The returned dispatch was started iff its InstanceID
	// is instanceID.
	ClaimStart(ctx context.Context, threadID, consumerID string, lease time.Duration, instanceID string, now int64) (*Dispatch, error)
	// CompleteAndClaimStart is CompleteAndClaim (CompleteClaimer) whose
	// claim half is ClaimStart's.
	CompleteAndClaimStart(ctx context.Context, dispatchID, claimToken string, result RunResult, now int64, consumerID string, lease time.Duration, instanceID string) (next *Dispatch, err error)
}

// SubmitSizer is implemented by stores whose commits are bounded in size.
// Mailbox.Submit asks one, before it interrupts a busy thread, whether
// the request would fit in one commit: a submit refused as too large
// after the interrupt had superseded the thread's queued work and
// cancelled its run, and nothing took their place (found by review).
type SubmitSizer interface {
	// CheckSubmitSize returns ErrTooLarge when a submit of msgs to
	// thread, with requestBytes of its other fields, might not fit in one
	// commit. It may refuse a submit that would just fit; it never passes
	// one that does not.
	CheckSubmitSize(thread string, msgs []Message, requestBytes int) error
}

// IdleSubmitter is implemented by stores that can start a foreground run
// on an idle thread in one commit, the fast path of Mailbox.Submit (one
// sync before the agent sees the run instead of four).
type IdleSubmitter interface {
	// SubmitIdle checks, inside the commit, that the thread has no queued
	// and no claimed dispatch. If so, in one commit, it bumps the thread's
	// epoch (an Interrupt that supersedes nothing), does Submit(c, d),
	// claims d for consumerID under lease and records the attempt's start
	// with instanceID (RecordDispatchStart) — unless d's run is waiting (a
	// continuation: the engine rebuilds the request from the run as it
	// waits, then records the start), as ClaimStart — and returns the
	// appended messages and the dispatch, started iff its InstanceID is
	// instanceID. Otherwise it writes nothing and
	// returns a nil dispatch: the caller takes the general path (Interrupt,
	// cancel the active run, SubmitIdle again, and only if the thread is
	// still not idle Submit and ClaimDispatch). Errors are Submit's.
	SubmitIdle(ctx context.Context, c Checkpoint, d Dispatch, consumerID string, lease time.Duration, instanceID string, now int64) ([]MessageRecord, *Dispatch, error)
}

// DedupeLookup is implemented by stores whose listings may lag their
// writes (a store shared between processes): the dispatch holding a
// thread's dedupe key, read from the record that holds it ("" when none
// does), so that an idempotent repeat through another process a moment
// after the first finds it.
type DedupeLookup interface {
	DedupeHolder(ctx context.Context, threadID, key string) (string, error)
}
