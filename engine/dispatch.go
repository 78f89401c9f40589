package engine

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// DispatchStatus is the state of a dispatch.
//
//	queued ──claim──► claimed ──ack──► acked
//	  │  ▲              │ nack / lease reclaim (attempts left), release
//	  │  └──────────────┘
//	  │                 ├─ nack / reclaim at max attempts, dead_letter ─► dead_letter
//	  │                 └─ supersede_claimed, stale epoch ─────────────► superseded
//	  ├─cancel──► cancelled
//	  └─interrupt / stale epoch──► superseded
//	dead_letter ──requeue (operator)──► queued
//
// acked, cancelled, superseded and dead_letter are terminal; only an
// operator's requeue takes a dead letter back to queued, and purge removes
// terminal records.
type DispatchStatus uint8

// The dispatch statuses. The zero value is invalid.
const (
	StatusQueued DispatchStatus = iota + 1
	StatusClaimed
	StatusAcked
	StatusCancelled
	StatusSuperseded
	StatusDeadLetter
)

// AllStatuses lists every valid status in declaration order.
var AllStatuses = []DispatchStatus{StatusQueued, StatusClaimed, StatusAcked, StatusCancelled, StatusSuperseded, StatusDeadLetter}

var statusNames = [...]string{"", "queued", "claimed", "acked", "cancelled", "superseded", "dead_letter"}

// String returns the snake_case name used on the wire and on disk.
func (s DispatchStatus) String() string {
	if s.Valid() {
		return statusNames[s]
	}
	return fmt.Sprintf("invalid(%d)", uint8(s))
}

// Valid reports whether s is one of the six statuses.
func (s DispatchStatus) Valid() bool { return s >= StatusQueued && s <= StatusDeadLetter }

// Terminal reports whether s is acked, cancelled, superseded or dead_letter.
func (s DispatchStatus) Terminal() bool { return s >= StatusAcked && s <= StatusDeadLetter }

// ParseDispatchStatus parses a snake_case status name.
func ParseDispatchStatus(name string) (DispatchStatus, error) {
	for i := StatusQueued; i <= StatusDeadLetter; i++ {
		if statusNames[i] == name {
			return i, nil
		}
	}
	return 0, Validationf("unknown dispatch status %q", name)
}

// MarshalText implements encoding.TextMarshaler.
func (s DispatchStatus) MarshalText() ([]byte, error) {
	if !s.Valid() {
		return nil, Validationf("invalid dispatch status %d", uint8(s))
	}
	return []byte(statusNames[s]), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *DispatchStatus) UnmarshalText(b []byte) error {
	v, err := ParseDispatchStatus(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// DefaultPriority is the priority of a dispatch that names none; lower wins.
const DefaultPriority uint8 = 128

// DefaultMaxAttempts is the attempt budget of a dispatch that names none.
const DefaultMaxAttempts uint32 = 5

// MaxIDLen is the longest id (thread, dispatch, run, message, dedupe key,
// consumer) a store accepts, in bytes.
const MaxIDLen = 256

// MaxErrorHistory bounds the per-attempt error history kept on a dispatch.
const MaxErrorHistory = 32

// MaxErrorLen bounds one error text kept on a dispatch, in bytes; longer
// texts are cut (at a character boundary) and marked with "…".
const MaxErrorLen = 4096

// truncateError cuts msg to MaxErrorLen bytes.
func truncateError(msg string) string {
	if len(msg) <= MaxErrorLen {
		return msg
	}
	cut := MaxErrorLen - len("…")
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut] + "…"
}

// AttemptError is one entry of a dispatch's error history.
type AttemptError struct {
	Attempt uint32 `json:"attempt"`
	Error   string `json:"error"`
	At      int64  `json:"at"` // Unix ms
}

// Dispatch is one durable unit of work: "run RunID on ThreadID". Timestamps
// are Unix milliseconds. Empty strings and zero times mean "absent".
type Dispatch struct {
	DispatchID   string         `json:"dispatch_id"`
	ThreadID     string         `json:"thread_id"`
	RunID        string         `json:"run_id"`
	Priority     uint8          `json:"priority"`
	DedupeKey    string         `json:"dedupe_key,omitempty"`
	Epoch        uint64         `json:"dispatch_epoch"`
	Status       DispatchStatus `json:"status"`
	AvailableAt  int64          `json:"available_at"`
	AttemptCount uint32         `json:"attempt_count"`
	MaxAttempts  uint32         `json:"max_attempts"`
	LastError    string         `json:"last_error,omitempty"`
	Errors       []AttemptError `json:"errors,omitempty"`
	// RequeuedAs names the dispatch an operator's requeue created from
	// this dead letter; set at most once.
	RequeuedAs string `json:"requeued_as,omitempty"`

	ClaimToken string `json:"claim_token,omitempty"`
	ClaimedBy  string `json:"claimed_by,omitempty"`
	LeaseUntil int64  `json:"lease_until,omitempty"`

	// Runtime projection, written by RecordDispatchStart / RecordRunResult.
	InstanceID  string       `json:"dispatch_instance_id,omitempty"`
	RunStatus   RunStatus    `json:"run_status,omitempty"`
	Termination *Termination `json:"termination,omitempty"`
	RunResponse string       `json:"run_response,omitempty"`
	RunError    string       `json:"run_error,omitempty"`
	CompletedAt int64        `json:"completed_at,omitempty"`

	CreatedAt int64 `json:"created_at"`
	UpdatedAt int64 `json:"updated_at"`
}

// RunResult is the runtime outcome projected onto a dispatch by
// RecordRunResult. It is separate from ack: acked means "delivery consumed",
// not "the agent succeeded".
type RunResult struct {
	RunID       string       `json:"run_id"`
	InstanceID  string       `json:"dispatch_instance_id"`
	Status      RunStatus    `json:"status"`
	Termination *Termination `json:"termination,omitempty"`
	Response    string       `json:"response,omitempty"`
	Error       string       `json:"error,omitempty"`
	// Waiting is why a run that ended waiting waits (run record only; not
	// projected onto the dispatch).
	Waiting *RunWaitingState `json:"waiting,omitempty"`
}

// InterruptResult is what an interrupt did: the new epoch, the thread's
// claimed dispatch (left claimed; the engine cancels its run) and the queued
// dispatches it superseded (already carrying status superseded).
type InterruptResult struct {
	NewEpoch    uint64     `json:"new_dispatch_epoch"`
	Active      *Dispatch  `json:"active_dispatch"`
	Superseded  []Dispatch `json:"superseded_dispatches"`
	SupersededN int        `json:"superseded_count"`
}

// Reason texts written to last_error by store transitions.
const (
	ReasonInterrupt          = "queued dispatch superseded by interrupt"
	ReasonNewerEpoch         = "queued dispatch superseded by newer dispatch epoch"
	ReasonStaleBeforeAck     = "claimed dispatch superseded before ack"
	ReasonStaleBeforeNack    = "claimed dispatch superseded before nack"
	ReasonStaleBeforeDead    = "claimed dispatch superseded before dead letter"
	ReasonStaleBeforeStart   = "claimed dispatch superseded before runtime start"
	ReasonStaleBeforeResult  = "claimed dispatch superseded before run result"
	ReasonStaleBeforeRelease = "claimed dispatch superseded before release"
	ReasonStaleDuringRenewal = "claimed dispatch superseded during lease renewal"
	ReasonLeaseExpiredStale  = "claimed dispatch lease expired after interrupt"
	ReasonLeaseExpiredMax    = "lease expired; max attempts reached"
	ReasonLeaseExpired       = "lease expired"
	// ReasonOrphaned and ReasonOrphanedMax: the claim of a sidecar process
	// that is gone, reclaimed when the next one started (OrphanReclaimer).
	ReasonOrphaned    = "claimed by an earlier sidecar process (restarted)"
	ReasonOrphanedMax = "claimed by an earlier sidecar process (restarted); max attempts reached"
	// ReasonOrphanedStale: such a claim an interrupt had made stale.
	ReasonOrphanedStale       = "claimed by an earlier sidecar process (restarted) after interrupt"
	ReasonDeadLetteredDefault = "mailbox dispatch dead-lettered"
)

// ValidateID checks an id for the store: non-blank, at most MaxIDLen bytes,
// valid UTF-8 and free of control characters.
func ValidateID(kind, id string) error {
	if strings.TrimSpace(id) == "" {
		return Validationf("%s is blank", kind)
	}
	if len(id) > MaxIDLen {
		return Validationf("%s is %d bytes, longer than %d", kind, len(id), MaxIDLen)
	}
	if !utf8.ValidString(id) {
		return Validationf("%s is not valid UTF-8", kind)
	}
	for _, r := range id {
		if r < 0x20 || r == 0x7f {
			return Validationf("%s contains a control character", kind)
		}
	}
	return nil
}

// Validate checks the record invariants of every status (store.md §1.2 rule 8).
func (d *Dispatch) Validate() error {
	if err := ValidateID("dispatch_id", d.DispatchID); err != nil {
		return err
	}
	if err := ValidateID("thread_id", d.ThreadID); err != nil {
		return err
	}
	if err := ValidateID("run_id", d.RunID); err != nil {
		return err
	}
	if d.DedupeKey != "" {
		if err := ValidateID("dedupe_key", d.DedupeKey); err != nil {
			return err
		}
	}
	if d.MaxAttempts < 1 {
		return Validationf("dispatch %s: max_attempts must be at least 1", d.DispatchID)
	}
	if d.AttemptCount > d.MaxAttempts {
		return Validationf("dispatch %s: attempt_count %d exceeds max_attempts %d", d.DispatchID, d.AttemptCount, d.MaxAttempts)
	}
	if d.RunStatus != "" && !d.RunStatus.Valid() {
		return Validationf("dispatch %s: unknown run_status %q", d.DispatchID, d.RunStatus)
	}
	hasClaim := d.ClaimToken != "" || d.ClaimedBy != "" || d.LeaseUntil != 0
	switch {
	case d.Status == StatusQueued:
		if hasClaim {
			return Validationf("dispatch %s: queued with claim fields", d.DispatchID)
		}
		if d.CompletedAt != 0 || d.hasProjection() {
			return Validationf("dispatch %s: queued with a completion time or runtime projection", d.DispatchID)
		}
	case d.Status == StatusClaimed:
		if strings.TrimSpace(d.ClaimToken) == "" || strings.TrimSpace(d.ClaimedBy) == "" || d.LeaseUntil == 0 {
			return Validationf("dispatch %s: claimed without token, owner or lease", d.DispatchID)
		}
	case d.Status.Terminal():
		if hasClaim {
			return Validationf("dispatch %s: %s with claim fields", d.DispatchID, d.Status)
		}
		if d.CompletedAt == 0 {
			return Validationf("dispatch %s: %s without completed_at", d.DispatchID, d.Status)
		}
	default:
		return Validationf("dispatch %s: invalid status %d", d.DispatchID, uint8(d.Status))
	}
	return nil
}

func (d *Dispatch) hasProjection() bool {
	return d.InstanceID != "" || d.RunStatus != "" || d.Termination != nil || d.RunResponse != "" || d.RunError != ""
}

func (d *Dispatch) clearClaim() { d.ClaimToken, d.ClaimedBy, d.LeaseUntil = "", "", 0 }

func (d *Dispatch) clearProjection() {
	d.InstanceID, d.RunStatus, d.Termination, d.RunResponse, d.RunError = "", "", nil, "", ""
}

// recordError records msg as the error of attempt number attempt (1 for
// the dispatch's first).
func (d *Dispatch) recordError(msg string, attempt uint32, now int64) {
	msg = truncateError(msg)
	d.LastError = msg
	if msg == "" {
		return
	}
	d.Errors = append(d.Errors, AttemptError{Attempt: attempt, Error: msg, At: now})
	if n := len(d.Errors); n > MaxErrorHistory {
		d.Errors = append(d.Errors[:0:0], d.Errors[n-MaxErrorHistory:]...)
	}
}

func (d *Dispatch) terminate(s DispatchStatus, now int64) {
	d.Status = s
	d.clearClaim()
	d.CompletedAt = now
	d.UpdatedAt = now
}

// The transition functions below are the only way a store changes a
// dispatch. Each checks its precondition, applies the change and leaves a
// record that satisfies Validate. Stores persist the result.

// PrepareEnqueue checks that d is a clean queued record and fills defaults
// (priority and max attempts are kept as given). The caller stamps Epoch.
func (d *Dispatch) PrepareEnqueue() error {
	if d.Status == 0 {
		d.Status = StatusQueued
	}
	if d.Status != StatusQueued {
		return Validationf("enqueue dispatch %s: status must be queued, not %s", d.DispatchID, d.Status)
	}
	if d.MaxAttempts == 0 {
		d.MaxAttempts = DefaultMaxAttempts
	}
	if d.UpdatedAt == 0 {
		d.UpdatedAt = d.CreatedAt
	}
	if d.LastError != "" || len(d.Errors) > 0 {
		return Validationf("enqueue dispatch %s: must not carry errors", d.DispatchID)
	}
	return d.Validate()
}

// Claim moves a queued dispatch to claimed under a fresh token.
func (d *Dispatch) Claim(token, consumer string, leaseUntil, now int64) error {
	if d.Status != StatusQueued {
		return fmt.Errorf("claim dispatch %s: status %s: %w", d.DispatchID, d.Status, ErrStaleClaim)
	}
	if err := ValidateID("consumer_id", consumer); err != nil {
		return err
	}
	d.Status = StatusClaimed
	d.ClaimToken, d.ClaimedBy, d.LeaseUntil = token, consumer, leaseUntil
	d.UpdatedAt = now
	return nil
}

// CheckOwner reports ErrStaleClaim unless d is claimed under token.
func (d *Dispatch) CheckOwner(token string) error {
	if d.Status != StatusClaimed || token == "" || d.ClaimToken != token {
		return fmt.Errorf("dispatch %s (%s): %w", d.DispatchID, d.Status, ErrStaleClaim)
	}
	return nil
}

// Supersede terminalizes a queued or claimed dispatch whose epoch is behind
// the thread epoch; the epoch is raised to current and the projection
// cleared.
func (d *Dispatch) Supersede(current uint64, reason string, now int64) {
	if current > d.Epoch {
		d.Epoch = current
	}
	d.LastError = truncateError(reason)
	d.clearProjection()
	d.terminate(StatusSuperseded, now)
}

// Ack marks a claimed dispatch consumed; the runtime projection is kept.
func (d *Dispatch) Ack(now int64) { d.terminate(StatusAcked, now) }

// Nack spends an attempt: back to queued at retryAt with a fresh
// projection, or dead_letter when the attempts are used up.
func (d *Dispatch) Nack(retryAt int64, msg string, now int64) {
	d.AttemptCount++
	d.recordError(msg, d.AttemptCount, now)
	if d.AttemptCount >= d.MaxAttempts {
		// The run is settled as errored in the same commit: the dispatch
		// says so too, as a permanent dead letter's does (it said
		// run_status running; found by review).
		d.failProjection(msg, now)
		d.terminate(StatusDeadLetter, now)
		return
	}
	d.requeue(retryAt, now)
}

func (d *Dispatch) requeue(availableAt, now int64) {
	d.Status = StatusQueued
	d.clearClaim()
	d.clearProjection()
	d.CompletedAt = 0
	d.AvailableAt = availableAt
	d.UpdatedAt = now
}

// DeadLetter terminalizes a claimed dispatch without spending an attempt.
// Unless a result was recorded already, the attempt's runtime projection
// becomes the failure (run done, error termination, run_error), so a
// permanent failure is recorded and dead-lettered in one commit.
func (d *Dispatch) DeadLetter(msg string, now int64) {
	// The attempt that failed is the one after those spent (a review
	// found a first attempt's permanent failure recorded as attempt 0,
	// and a second's as 1, the number of the first's).
	d.recordError(msg, d.AttemptCount+1, now)
	d.failProjection(msg, now)
	d.terminate(StatusDeadLetter, now)
}

// failProjection makes the attempt's runtime projection the failure msg
// (run done, error termination, run_error), unless a result was
// recorded already.
func (d *Dispatch) failProjection(msg string, now int64) {
	if d.RunStatus != RunDone {
		d.RunStatus = RunDone
		d.Termination = ErrorTermination(msg)
		d.RunResponse = ""
		d.RunError = truncateError(msg)
		d.CompletedAt = now
	}
}

// Cancel terminalizes a queued dispatch.
func (d *Dispatch) Cancel(now int64) { d.terminate(StatusCancelled, now) }

// Release puts a claimed dispatch back to queued without spending an
// attempt; it is available again at once.
func (d *Dispatch) Release(now int64) { d.requeue(now, now) }

// ReclaimExpired spends an attempt for a lapsed lease: queued again, or
// dead_letter at max attempts. Queued, it keeps its available_at (as the
// seed's memory and sqlite stores do; at most now: an inline claim's
// guard may lie ahead), so that work cut short by a crash is served before
// work queued after it, not behind the whole backlog (store.md §2.15 item
// 86 allows both; the seed's NATS store sets now).
func (d *Dispatch) ReclaimExpired(now int64) {
	d.reclaim(ReasonLeaseExpired, ReasonLeaseExpiredMax, now)
}

// ReclaimOrphan is ReclaimExpired for the claim of a sidecar process that
// is gone, before its lease lapses (OrphanReclaimer): an attempt spent,
// as for a lapse, under its own reason.
func (d *Dispatch) ReclaimOrphan(now int64) { d.reclaim(ReasonOrphaned, ReasonOrphanedMax, now) }

func (d *Dispatch) reclaim(reason, reasonMax string, now int64) {
	d.AttemptCount++
	if d.AttemptCount >= d.MaxAttempts {
		d.recordError(reasonMax, d.AttemptCount, now)
		d.clearProjection()
		d.terminate(StatusDeadLetter, now)
		return
	}
	d.recordError(reason, d.AttemptCount, now)
	d.requeue(min(d.AvailableAt, now), now)
}

// RecordStart writes the runtime projection of a started attempt.
func (d *Dispatch) RecordStart(instanceID string, now int64) error {
	if err := ValidateID("dispatch_instance_id", instanceID); err != nil {
		return err
	}
	d.clearProjection()
	d.InstanceID = instanceID
	d.RunStatus = RunRunning
	d.CompletedAt = 0
	d.UpdatedAt = now
	return nil
}

// RecordResult writes the runtime outcome; the dispatch stays claimed.
func (d *Dispatch) RecordResult(r RunResult, now int64) error {
	if r.RunID != d.RunID {
		return Validationf("run result for run %q does not match dispatch %s run %q", r.RunID, d.DispatchID, d.RunID)
	}
	if !r.Status.Valid() {
		return Validationf("run result for dispatch %s: unknown run status %q", d.DispatchID, r.Status)
	}
	if r.InstanceID != "" {
		// A result without one (a cancel that settled the attempt before
		// it knew its instance) keeps the instance the start recorded.
		d.InstanceID = r.InstanceID
	}
	d.RunStatus = r.Status
	d.Termination = r.Termination
	d.RunResponse = r.Response
	d.RunError = truncateError(r.Error)
	d.CompletedAt = now
	d.UpdatedAt = now
	return nil
}

// Requeue builds the fresh queued dispatch newID that an operator's
// requeue of the dead letter d creates for the same run: attempts reset,
// epoch stamped, error history carried over. d itself stays dead_letter and
// is marked RequeuedAs newID; requeueing it twice is ErrAlreadyExists.
func (d *Dispatch) Requeue(newID string, epoch uint64, now int64) (Dispatch, error) {
	if d.Status != StatusDeadLetter {
		return Dispatch{}, Validationf("status %s is not dead_letter", d.Status)
	}
	if d.RequeuedAs != "" {
		return Dispatch{}, fmt.Errorf("already requeued as %s: %w", d.RequeuedAs, ErrAlreadyExists)
	}
	if err := ValidateID("dispatch_id", newID); err != nil {
		return Dispatch{}, err
	}
	n := d.Clone()
	n.DispatchID = newID
	n.AttemptCount = 0
	n.Epoch = epoch
	n.CreatedAt = now
	n.RequeuedAs = ""
	n.requeue(now, now)
	d.RequeuedAs = newID
	return n, nil
}

// Clone returns a deep copy of d.
func (d *Dispatch) Clone() Dispatch {
	c := *d
	if d.Errors != nil {
		c.Errors = append([]AttemptError(nil), d.Errors...)
	}
	if d.Termination != nil {
		t := *d.Termination
		c.Termination = &t
	}
	return c
}

// RetryDelay is the engine's exponential backoff for attempt n (the
// pre-increment attempt count): base·2^min(n−1,6), capped at max.
func RetryDelayMs(attempt uint32, baseMs, maxMs int64) int64 {
	exp := int64(0)
	if attempt > 1 {
		exp = int64(attempt - 1)
	}
	if exp > 6 {
		exp = 6
	}
	d := baseMs << exp
	if d > maxMs {
		d = maxMs
	}
	return d
}
