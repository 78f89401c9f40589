package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// RunStatus is the lifecycle of a run record:
//
//	created → running | done
//	running → waiting | done
//	waiting → running | done
//	done    → (nothing)
//
// and any status to itself.
type RunStatus string

// The run statuses.
const (
	RunCreated RunStatus = "created"
	RunRunning RunStatus = "running"
	RunWaiting RunStatus = "waiting"
	RunDone    RunStatus = "done"
)

// Valid reports whether s is one of the four run statuses.
func (s RunStatus) Valid() bool {
	switch s {
	case RunCreated, RunRunning, RunWaiting, RunDone:
		return true
	}
	return false
}

// CanTransitionTo reports whether a run may move from s to next.
func (s RunStatus) CanTransitionTo(next RunStatus) bool {
	if s == next {
		return s.Valid()
	}
	switch s {
	case RunCreated:
		return next == RunRunning || next == RunDone
	case RunRunning:
		return next == RunWaiting || next == RunDone
	case RunWaiting:
		return next == RunRunning || next == RunDone
	}
	return false
}

// Termination kinds (the "type" of the adjacently tagged JSON form).
const (
	TermNaturalEnd        = "natural_end"
	TermBehaviorRequested = "behavior_requested"
	TermStopped           = "stopped"
	TermCancelled         = "cancelled"
	TermBlocked           = "blocked"
	TermSuspended         = "suspended"
	TermError             = "error"
)

// Termination is why a run stopped: {"type":"…","value":…}. Value is a
// string for blocked and error, {"code","detail"} for stopped, absent
// otherwise.
type Termination struct {
	Type  string          `json:"type"`
	Value json.RawMessage `json:"value,omitempty"`
}

// RunStatus maps a termination to the run status it leaves: suspended →
// waiting, everything else → done.
func (t *Termination) RunStatus() RunStatus {
	if t != nil && t.Type == TermSuspended {
		return RunWaiting
	}
	return RunDone
}

// ErrorTermination returns {"type":"error","value":msg}.
func ErrorTermination(msg string) *Termination {
	v, _ := json.Marshal(msg)
	return &Termination{Type: TermError, Value: v}
}

// Waiting reasons of RunWaitingState.
const (
	WaitToolPermission  = "tool_permission"
	WaitUserInput       = "user_input"
	WaitBackgroundTasks = "background_tasks"
	WaitExternalEvent   = "external_event"
	WaitRateLimit       = "rate_limit"
	WaitManualPause     = "manual_pause"
)

// RunWaitingState says why a waiting run waits.
type RunWaitingState struct {
	Reason          string          `json:"reason"`
	TicketIDs       []string        `json:"ticket_ids,omitempty"`
	Tickets         json.RawMessage `json:"tickets,omitempty"`
	SinceDispatchID string          `json:"since_dispatch_id,omitempty"`
	Message         string          `json:"message,omitempty"`
}

// Decision is one tool-call decision carried by a request.
type Decision struct {
	CallID string          `json:"call_id"`
	Resume json.RawMessage `json:"resume"`
}

// RunRequestSnapshot is the durable copy of the request that created or
// continued a run; the executor rebuilds the run request from it.
type RunRequestSnapshot struct {
	Origin             string          `json:"origin,omitempty"` // "User" (default), "A2A", "Internal"
	SenderID           string          `json:"sender_id,omitempty"`
	InputMessageIDs    []string        `json:"input_message_ids,omitempty"`
	InputMessageCount  int             `json:"input_message_count,omitempty"`
	RequestExtras      json.RawMessage `json:"request_extras,omitempty"`
	Decisions          []Decision      `json:"decisions,omitempty"`
	FrontendTools      json.RawMessage `json:"frontend_tools,omitempty"`
	ParentThreadID     string          `json:"parent_thread_id,omitempty"`
	TransportRequestID string          `json:"transport_request_id,omitempty"`
}

// SeqRange is a 1-based inclusive range of message sequence numbers.
type SeqRange struct {
	From uint64 `json:"from_seq"`
	To   uint64 `json:"to_seq"`
}

// RunMessageInput says which messages of the thread a run reads.
type RunMessageInput struct {
	ThreadID            string          `json:"thread_id"`
	Range               *SeqRange       `json:"range,omitempty"`
	TriggerMessageIDs   []string        `json:"trigger_message_ids,omitempty"`
	SelectedMessageIDs  []string        `json:"selected_message_ids,omitempty"`
	ContextPolicy       json.RawMessage `json:"context_policy,omitempty"`
	CompactedSnapshotID string          `json:"compacted_snapshot_id,omitempty"`
}

// RunRecord is the durable record of one run. Timestamps are Unix seconds.
type RunRecord struct {
	RunID              string              `json:"run_id"`
	ThreadID           string              `json:"thread_id"`
	AgentID            string              `json:"agent_id"`
	ParentRunID        string              `json:"parent_run_id,omitempty"`
	Request            *RunRequestSnapshot `json:"request,omitempty"`
	Input              *RunMessageInput    `json:"input,omitempty"`
	Output             json.RawMessage     `json:"output,omitempty"`
	Status             RunStatus           `json:"status"`
	TerminationReason  *Termination        `json:"termination_reason,omitempty"`
	FinalOutput        json.RawMessage     `json:"final_output,omitempty"`
	ErrorPayload       json.RawMessage     `json:"error_payload,omitempty"`
	DispatchID         string              `json:"dispatch_id,omitempty"`
	SessionID          string              `json:"session_id,omitempty"`
	TransportRequestID string              `json:"transport_request_id,omitempty"`
	Waiting            *RunWaitingState    `json:"waiting,omitempty"`
	Outcome            json.RawMessage     `json:"outcome,omitempty"`
	CreatedAt          int64               `json:"created_at"`
	StartedAt          int64               `json:"started_at,omitempty"`
	FinishedAt         int64               `json:"finished_at,omitempty"`
	UpdatedAt          int64               `json:"updated_at"`
	Steps              int64               `json:"steps"`
	InputTokens        int64               `json:"input_tokens"`
	OutputTokens       int64               `json:"output_tokens"`
	State              json.RawMessage     `json:"state,omitempty"`
	// StartCount is how many attempts of the run recorded their start
	// (MarkStarted, in the commit that starts the attempt), over all its
	// dispatches, retries, requeues and sidecar restarts. It only grows: a
	// store writing a run over its stored version keeps the higher count
	// (WithStartCountOf), and Reopen keeps it. The engine numbers the run's
	// events from it (EventLog).
	StartCount uint32 `json:"start_count,omitempty"`
}

// Validate checks the fields a store relies on.
func (r *RunRecord) Validate() error {
	if err := ValidateID("run_id", r.RunID); err != nil {
		return err
	}
	if err := ValidateID("thread_id", r.ThreadID); err != nil {
		return err
	}
	if !r.Status.Valid() {
		return Validationf("run %s: unknown status %q", r.RunID, r.Status)
	}
	if r.DispatchID != "" {
		if err := ValidateID("dispatch_id", r.DispatchID); err != nil {
			return err
		}
	}
	return nil
}

// WaitingReason returns the reason of a waiting run, or "".
func (r *RunRecord) WaitingReason() string {
	if r.Status == RunWaiting && r.Waiting != nil {
		return r.Waiting.Reason
	}
	return ""
}

// IsResumableWaiting reports whether the run waits with any reason.
func (r *RunRecord) IsResumableWaiting() bool { return r.WaitingReason() != "" }

// IsBackgroundTaskWaiting reports whether the run waits on background tasks.
func (r *RunRecord) IsBackgroundTaskWaiting() bool { return r.WaitingReason() == WaitBackgroundTasks }

// SettleKind says how a terminal dispatch settles its run record.
type SettleKind int

// Settlement kinds.
const (
	SettleCancelled SettleKind = iota + 1 // cancelled or superseded dispatch
	SettleErrored                         // dead-lettered dispatch
)

// Settle marks a not-yet-done run as done because its dispatch d became
// terminal without an ack (store.md: a terminal dispatch and the run it
// settles commit together). It reports whether the run changed. nowSec is
// Unix seconds.
func (r *RunRecord) Settle(d *Dispatch, nowSec int64) bool {
	if r.Status == RunDone || r.ThreadID != d.ThreadID {
		return false
	}
	switch d.Status {
	case StatusCancelled, StatusSuperseded:
		r.TerminationReason = &Termination{Type: TermCancelled}
		r.ErrorPayload = nil
	case StatusDeadLetter:
		reason := d.RunError
		if reason == "" {
			reason = d.LastError
		}
		if reason == "" {
			reason = ReasonDeadLetteredDefault
		}
		r.TerminationReason = ErrorTermination(reason)
		p, _ := json.Marshal(map[string]string{"message": reason})
		r.ErrorPayload = p
	default:
		return false
	}
	r.Status = RunDone
	r.DispatchID = d.DispatchID
	r.SessionID = d.InstanceID
	r.Waiting = nil
	r.FinishedAt = nowSec
	r.UpdatedAt = nowSec
	return true
}

// Thread is the projection of a thread: which runs are active, open and
// latest.
type Thread struct {
	ID             string          `json:"id"`
	ResourceID     string          `json:"resource_id,omitempty"`
	ParentThreadID string          `json:"parent_thread_id,omitempty"`
	Metadata       json.RawMessage `json:"metadata,omitempty"`
	ActiveRunID    string          `json:"active_run_id,omitempty"`
	OpenRunID      string          `json:"open_run_id,omitempty"`
	// OpenRunStatus is the open run's status as last applied ("" in
	// projections written before it existed).
	OpenRunStatus RunStatus `json:"open_run_status,omitempty"`
	LatestRunID   string    `json:"latest_run_id,omitempty"`
	MessageCount  uint64    `json:"message_count"`
}

// ApplyRun updates the projection for a checkpointed run (store.md rule 29).
func (t *Thread) ApplyRun(r *RunRecord) {
	t.LatestRunID = r.RunID
	switch r.Status {
	case RunCreated, RunWaiting:
		t.ActiveRunID = ""
		t.OpenRunID, t.OpenRunStatus = r.RunID, r.Status
	case RunRunning:
		t.ActiveRunID = r.RunID
		t.OpenRunID, t.OpenRunStatus = r.RunID, r.Status
	case RunDone:
		if t.ActiveRunID == r.RunID {
			t.ActiveRunID = ""
		}
		if t.OpenRunID == r.RunID {
			t.OpenRunID, t.OpenRunStatus = "", ""
		}
	}
	if t.ParentThreadID == "" && r.Request != nil {
		t.ParentThreadID = r.Request.ParentThreadID
	}
}

// ApplyReopen updates the projection for a run an operator's requeue has
// reopened (RunRecord.Reopen: status created again, for a new dispatch).
// A requeue is no checkpoint of the run, so rule 29's created branch is
// not applied whole: another run of the thread that is running or waiting
// keeps its place. latest_run_id names the reopened run (it is the run
// updated last, as LatestRun orders them); active_run_id is cleared only
// when it named the reopened run (which no longer runs); open_run_id
// moves to the reopened run only when no run is open or the open run is
// this one.
func (t *Thread) ApplyReopen(r *RunRecord) {
	t.LatestRunID = r.RunID
	if t.ActiveRunID == r.RunID {
		t.ActiveRunID = ""
	}
	if t.OpenRunID == "" || t.OpenRunID == r.RunID {
		t.OpenRunID, t.OpenRunStatus = r.RunID, r.Status
	}
	if t.ParentThreadID == "" && r.Request != nil {
		t.ParentThreadID = r.Request.ParentThreadID
	}
}

// Message roles.
const (
	RoleSystem    = "system"
	RoleUser      = "user"
	RoleAssistant = "assistant"
	RoleTool      = "tool"
)

// Message is one message of a thread. Content, tool calls and metadata are
// opaque JSON to the store.
type Message struct {
	ID         string          `json:"id,omitempty"`
	Role       string          `json:"role"`
	Content    json.RawMessage `json:"content,omitempty"`
	ToolCalls  json.RawMessage `json:"tool_calls,omitempty"`
	ToolCallID string          `json:"tool_call_id,omitempty"`
	Visibility string          `json:"visibility,omitempty"` // "" (all) or "internal"
	Metadata   json.RawMessage `json:"metadata,omitempty"`
}

// Validate checks a message before it is appended.
func (m *Message) Validate() error {
	if err := ValidateID("message id", m.ID); err != nil {
		return err
	}
	switch m.Role {
	case RoleSystem, RoleUser, RoleAssistant, RoleTool:
	default:
		return Validationf("message %s: unknown role %q", m.ID, m.Role)
	}
	switch m.Visibility {
	case "", "all", "internal":
	default:
		return Validationf("message %s: unknown visibility %q", m.ID, m.Visibility)
	}
	for _, f := range [...]struct {
		name string
		v    json.RawMessage
	}{{"content", m.Content}, {"tool_calls", m.ToolCalls}, {"metadata", m.Metadata}} {
		if err := ValidateRawJSON(f.v); err != nil {
			return Validationf("message %s: %s %v", m.ID, f.name, err)
		}
	}
	return nil
}

// ValidateRawJSON checks a raw JSON field a caller hands in (empty: none).
// Stores keep such fields as given and the agent protocol copies them
// into RUN frames, which the agent refuses unless they are UTF-8 JSON: a
// field that is not would break the agent's connection, with every run on
// it, at every run of its thread.
func ValidateRawJSON(v json.RawMessage) error {
	if err := ValidateStoredJSON(v); err != nil {
		return err
	}
	switch {
	case len(v) == 0:
		return nil
	case HasLoneSurrogate(v):
		return errLoneSurrogate
	case JSONDepth(v) > MaxJSONDepth:
		return errTooDeep
	}
	return nil
}

// ValidateStoredJSON is the check a stored raw JSON field must pass to be
// sent in a RUN at all: UTF-8 JSON (empty: none). ValidateRawJSON adds
// the rules for what comes in (no lone surrogate escape, at most
// MaxJSONDepth levels); verify and repair hold stored records to this one
// only, so that a message taken before those rules is not reported, and
// replaced, as damaged (found by review).
func ValidateStoredJSON(v json.RawMessage) error {
	switch {
	case len(v) == 0:
		return nil
	case !utf8.Valid(v):
		return errNotUTF8
	case !json.Valid(v):
		return errNotJSON
	}
	return nil
}

// MaxJSONDepth is how deep a raw JSON field (a message's content, tool
// calls or metadata, a request's overrides …) may nest arrays and
// objects. A RUN frame nests a message's content five levels down, and
// common JSON decoders stop at 128 levels (Rust's serde_json) or about a
// thousand (Python's, by recursion): a deeper field took the agent down
// at every run of its thread (found by review: 2 000 levels, and the
// Python example agent exited).
const MaxJSONDepth = 100

// JSONDepth is the deepest nesting of arrays and objects in the JSON
// text b (0 for a scalar). b must be valid JSON.
func JSONDepth(b []byte) int {
	depth, deepest, inString := 0, 0, false
	for i := 0; i < len(b); i++ {
		c := b[i]
		switch {
		case inString:
			switch c {
			case '\\':
				i++ // the escaped character
			case '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '[' || c == '{':
			depth++
			deepest = max(deepest, depth)
		case c == ']' || c == '}':
			depth--
		}
	}
	return deepest
}

var (
	errNotUTF8       = errors.New("is not valid UTF-8")
	errNotJSON       = errors.New("is not valid JSON")
	errTooDeep       = fmt.Errorf("nests arrays and objects more than %d levels deep, which agents that decode JSON by recursion cannot read", MaxJSONDepth)
	errLoneSurrogate = errors.New(`holds a \u escape of a lone surrogate (\uD800 to \uDFFF without its pair), which is no character: agents that decode JSON strictly cannot read it`)
)

// HasLoneSurrogate reports whether the JSON text b holds a \u escape of
// a UTF-16 surrogate that is not half of a pair: a high one (D800–DBFF)
// not followed by a \u escape of a low one (DC00–DFFF), or a low one
// alone. Such a string is no Unicode text: Go's decoders read it as
// U+FFFD, others keep it and then cannot encode it (found by review: the
// Python example agent failed every attempt of a run whose message held
// one, and the run was dead-lettered). b must be valid JSON, where a
// backslash appears only inside strings.
func HasLoneSurrogate(b []byte) bool {
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		if i+1 < len(b) && b[i+1] != 'u' {
			i++ // \" \\ \n …: skip the escaped character
			continue
		}
		r, ok := hex4(b, i+2)
		if !ok {
			continue // not valid JSON: not this check's to say
		}
		switch {
		case r >= 0xDC00 && r <= 0xDFFF:
			return true // a low half with no high half before it
		case r >= 0xD800 && r <= 0xDBFF:
			low, ok := uint16(0), false
			if i+11 < len(b) && b[i+6] == '\\' && b[i+7] == 'u' {
				low, ok = hex4(b, i+8)
			}
			if !ok || low < 0xDC00 || low > 0xDFFF {
				return true
			}
			i += 11 // the pair
		default:
			i += 5
		}
	}
	return false
}

// hex4 reads four hex digits at b[i:].
func hex4(b []byte, i int) (uint16, bool) {
	if i+4 > len(b) {
		return 0, false
	}
	var r uint16
	for _, c := range b[i : i+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | uint16(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | uint16(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | uint16(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

// MessageRecord is a message at its place in the thread log.
type MessageRecord struct {
	MessageID       string  `json:"message_id"`
	ThreadID        string  `json:"thread_id"`
	Seq             uint64  `json:"seq"` // 1-based
	Message         Message `json:"message"`
	ProducedByRunID string  `json:"produced_by_run_id,omitempty"`
	StepIndex       *int64  `json:"step_index,omitempty"`
	ToolCallID      string  `json:"tool_call_id,omitempty"`
	CreatedAt       int64   `json:"created_at,omitempty"` // Unix ms
}

// String is a short description for logs and test failures.
func (m MessageRecord) String() string {
	return fmt.Sprintf("%s#%d(%s)", m.ThreadID, m.Seq, m.MessageID)
}

// Reopen makes a settled run dispatchable again for an operator's requeue
// of its dead letter: status created, outcome cleared, dispatch_id set to
// the new dispatch (StartCount is kept). It is the one sanctioned way out
// of done.
func (r *RunRecord) Reopen(dispatchID string, nowSec int64) {
	// A start of a version that did not count them is told by StartedAt,
	// cleared below: count it now, or the run's next start is its first
	// again (and numbers its events over its earlier attempt's).
	r.StartCount = startsOf(r)
	r.Status = RunCreated
	r.TerminationReason = nil
	r.ErrorPayload = nil
	r.Outcome = nil
	r.FinalOutput = nil
	r.SessionID = ""
	r.Waiting = nil
	r.StartedAt = 0
	r.FinishedAt = 0
	r.DispatchID = dispatchID
	r.UpdatedAt = nowSec
}

// MovedOnFrom reports whether the run now belongs to a dispatch other
// than dispatchID (a later dispatch took it over, as a continuation does):
// requeueing dead letter dispatchID would reopen a run that has moved on.
// A run that names no dispatch belongs to any.
func (r *RunRecord) MovedOnFrom(dispatchID string) bool {
	return r.DispatchID != "" && r.DispatchID != dispatchID
}

// ErrRunMovedOn is the error for a dead letter whose run has moved on to
// another dispatch (MovedOnFrom): it cannot be requeued.
func ErrRunMovedOn(dispatchID string, r *RunRecord) error {
	return fmt.Errorf("dispatch %s: its run %s has moved on to dispatch %s; submit the work anew: %w", dispatchID, r.RunID, r.DispatchID, ErrVersionConflict)
}

// MarkStarted records that attempt instanceID of dispatch d started the
// run (the store applies it in the same commit as the dispatch's start).
// A done run, or one of another thread, is left alone; it reports
// whether the run changed.
func (r *RunRecord) MarkStarted(d *Dispatch, instanceID string, nowSec int64) bool {
	if r.Status == RunDone || r.ThreadID != d.ThreadID {
		return false
	}
	if r.Status == RunWaiting {
		// The wait is over: its termination (suspended) would read as the
		// running attempt's (found by review: running with termination
		// suspended while the continuation ran).
		r.TerminationReason = nil
	}
	r.Status = RunRunning
	r.Waiting = nil
	r.DispatchID = d.DispatchID
	r.SessionID = instanceID
	r.StartCount = startsOf(r) + 1
	if r.StartedAt == 0 {
		r.StartedAt = nowSec
	}
	r.UpdatedAt = nowSec
	return true
}

// startsOf is r's StartCount, counting one start for a run started under
// a version that did not count them (StartedAt set, StartCount 0).
func startsOf(r *RunRecord) uint32 {
	if r.StartCount == 0 && r.StartedAt != 0 {
		return 1
	}
	return r.StartCount
}

// WithStartCountOf returns r, or a copy of r with old's StartCount when
// old's is higher. A store writes this over the stored version old of a
// run, so a writer that read the run before an attempt recorded its start
// (an agent's checkpoint racing the next attempt's start, say) cannot take
// the count back.
func (r *RunRecord) WithStartCountOf(old *RunRecord) *RunRecord {
	if old == nil || old.StartCount <= r.StartCount {
		return r
	}
	c := *r
	c.StartCount = old.StartCount
	return &c
}

// ApplyResult records an attempt's outcome on the run (the store applies
// it in the same commit as the dispatch's run result): done or waiting,
// the termination, the final output and, for an error, the error payload.
// A done run, or one of another thread, is left alone.
func (r *RunRecord) ApplyResult(d *Dispatch, res RunResult, nowSec int64) bool {
	if r.Status == RunDone || r.ThreadID != d.ThreadID || (res.Status != RunDone && res.Status != RunWaiting) {
		return false
	}
	r.Status = res.Status
	r.TerminationReason = res.Termination
	r.DispatchID = d.DispatchID
	if res.InstanceID != "" {
		r.SessionID = res.InstanceID
	}
	r.Waiting = nil
	if res.Status == RunWaiting {
		r.Waiting = res.Waiting
	} else {
		r.FinishedAt = nowSec
	}
	if res.Response != "" {
		r.FinalOutput, _ = json.Marshal(res.Response)
	}
	if res.Error != "" {
		r.ErrorPayload, _ = json.Marshal(map[string]string{"message": res.Error})
	}
	r.UpdatedAt = nowSec
	return true
}
