package agent

import (
	"encoding/json"
	"strings"
)

// The data types below mirror the wire shapes of the sidecar's data model
// (snake_case JSON, the engine package's run.go, executor.go and
// request.go) without importing it. Nested structures the SDK does not
// interpret are kept as json.RawMessage, so fields a newer sidecar adds
// inside them reach the agent unchanged.

// Message roles.
const (
	RoleSystem    = "system"
	RoleUser      = "user"
	RoleAssistant = "assistant"
	RoleTool      = "tool"
)

// Run statuses a run record, a checkpoint or a FINISH carries.
const (
	StatusCreated = "created" // the run exists but has not started
	StatusRunning = "running" // an attempt executes it
	StatusWaiting = "waiting" // suspended: waits for a decision, input or an event
	StatusDone    = "done"    // finished, whatever its termination
)

// Termination types: the "type" of a Termination.
const (
	TermNaturalEnd        = "natural_end"
	TermBehaviorRequested = "behavior_requested"
	TermStopped           = "stopped"
	TermCancelled         = "cancelled"
	TermBlocked           = "blocked"
	TermSuspended         = "suspended"
	TermError             = "error"
)

// Run modes of a Request.
const (
	ModeForeground   = "foreground"    // a client waits on the run's stream
	ModeResume       = "resume"        // continues a waiting run (decisions or continue_run_id)
	ModeScheduled    = "scheduled"     // a background dispatch
	ModeInternalWake = "internal_wake" // the thread was woken internally
)

// Origins of a Request or SubmitRequest, as a SubmitRequest spells them;
// RUN payloads may carry them capitalised ("User", "A2A", "Internal").
const (
	OriginUser     = "user"
	OriginA2A      = "a2a"
	OriginInternal = "internal"
)

// Message is one message of a thread. Content, tool calls and metadata are
// opaque JSON: Content is usually a JSON string, or an array of content
// parts such as {"type":"text","text":"…"}.
type Message struct {
	ID         string          `json:"id,omitempty"`
	Role       string          `json:"role"`
	Content    json.RawMessage `json:"content,omitempty"`
	ToolCalls  json.RawMessage `json:"tool_calls,omitempty"`
	ToolCallID string          `json:"tool_call_id,omitempty"`
	Visibility string          `json:"visibility,omitempty"` // "" (all) or "internal"
	Metadata   json.RawMessage `json:"metadata,omitempty"`
}

// TextMessage returns a message of role whose content is the JSON string
// text.
func TextMessage(role, text string) Message {
	b, _ := json.Marshal(text) // a string always marshals
	return Message{Role: role, Content: b}
}

// Text returns the text of the message's content and whether it has any:
// the content itself when it is a JSON string, the "text" member of a
// {"type":"text","text":…} object, or the texts of the text parts of an
// array of parts (a part is such an object or a string), concatenated.
// Other content (images, tool results as objects, null) has no text.
func (m Message) Text() (string, bool) {
	return contentText(m.Content)
}

type textPart struct {
	Type string  `json:"type"`
	Text *string `json:"text"`
}

// firstByte is raw's first byte that is not JSON space (0 when none).
func firstByte(raw []byte) byte {
	for _, c := range raw {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return c
		}
	}
	return 0
}

func contentText(raw json.RawMessage) (string, bool) {
	i := 0
	for i < len(raw) && (raw[i] == ' ' || raw[i] == '\t' || raw[i] == '\n' || raw[i] == '\r') {
		i++
	}
	if i == len(raw) {
		return "", false
	}
	switch raw[i] {
	case '"':
		var s string
		if unmarshal(raw, &s) != nil {
			return "", false
		}
		return s, true
	case '{':
		var p textPart
		if unmarshal(raw, &p) != nil || p.Text == nil || (p.Type != "" && p.Type != "text") {
			return "", false
		}
		return *p.Text, true
	case '[':
		var parts []json.RawMessage
		if unmarshal(raw, &parts) != nil {
			return "", false
		}
		var b strings.Builder
		found := false
		for _, p := range parts {
			// A part is a string or a text part; nested arrays are not
			// parts.
			if firstByte(p) == '[' {
				continue // not decoded: nesting must cost nothing (found by review: quadratic)
			}
			if t, ok := contentText(p); ok {
				b.WriteString(t)
				found = true
			}
		}
		return b.String(), found
	}
	return "", false
}

// MessageRecord is a message at its place in the thread log.
type MessageRecord struct {
	MessageID       string  `json:"message_id"`
	ThreadID        string  `json:"thread_id"`
	Seq             uint64  `json:"seq"` // 1-based position in the thread log
	Message         Message `json:"message"`
	ProducedByRunID string  `json:"produced_by_run_id,omitempty"`
	StepIndex       *int64  `json:"step_index,omitempty"`
	ToolCallID      string  `json:"tool_call_id,omitempty"`
	CreatedAt       int64   `json:"created_at,omitempty"` // Unix milliseconds
}

// Decision is one tool-call decision: the call it answers and the value the
// suspended call resumes with.
type Decision struct {
	CallID string          `json:"call_id"`
	Resume json.RawMessage `json:"resume"`
}

// Termination is why a run stopped: {"type":"…","value":…}. Value is a JSON
// string for blocked and error, {"code","detail"} for stopped, absent
// otherwise.
type Termination struct {
	Type  string          `json:"type"`
	Value json.RawMessage `json:"value,omitempty"`
}

// Waiting reasons of a WaitingState.
const (
	WaitToolPermission  = "tool_permission"
	WaitUserInput       = "user_input"
	WaitBackgroundTasks = "background_tasks"
	WaitExternalEvent   = "external_event"
	WaitRateLimit       = "rate_limit"
	WaitManualPause     = "manual_pause"
)

// WaitingState says why a waiting run waits.
type WaitingState struct {
	Reason          string          `json:"reason"`
	TicketIDs       []string        `json:"ticket_ids,omitempty"`
	Tickets         json.RawMessage `json:"tickets,omitempty"`
	SinceDispatchID string          `json:"since_dispatch_id,omitempty"`
	Message         string          `json:"message,omitempty"`
}

// RunRecord is the durable record of a run, as the sidecar keeps it.
// Timestamps are Unix seconds. The request snapshot, the message input and
// the outputs are kept as raw JSON.
type RunRecord struct {
	RunID              string          `json:"run_id"`
	ThreadID           string          `json:"thread_id"`
	AgentID            string          `json:"agent_id"`
	ParentRunID        string          `json:"parent_run_id,omitempty"`
	Request            json.RawMessage `json:"request,omitempty"`
	Input              json.RawMessage `json:"input,omitempty"`
	Output             json.RawMessage `json:"output,omitempty"`
	Status             string          `json:"status"`
	TerminationReason  *Termination    `json:"termination_reason,omitempty"`
	FinalOutput        json.RawMessage `json:"final_output,omitempty"`
	ErrorPayload       json.RawMessage `json:"error_payload,omitempty"`
	DispatchID         string          `json:"dispatch_id,omitempty"`
	SessionID          string          `json:"session_id,omitempty"`
	TransportRequestID string          `json:"transport_request_id,omitempty"`
	Waiting            *WaitingState   `json:"waiting,omitempty"`
	Outcome            json.RawMessage `json:"outcome,omitempty"`
	CreatedAt          int64           `json:"created_at"`
	StartedAt          int64           `json:"started_at,omitempty"`
	FinishedAt         int64           `json:"finished_at,omitempty"`
	UpdatedAt          int64           `json:"updated_at"`
	Steps              int64           `json:"steps"`
	InputTokens        int64           `json:"input_tokens"`
	OutputTokens       int64           `json:"output_tokens"`
	State              json.RawMessage `json:"state,omitempty"`
}

// ThreadContext is the slice of thread history a RUN carries: the most
// recent messages of the thread log, oldest first. Older history is read
// over the sidecar's HTTP API (GET /v1/threads/{thread_id}/messages).
type ThreadContext struct {
	Messages []MessageRecord `json:"messages"`
	// FirstSeq is the sequence number of Messages[0] (0 when empty).
	FirstSeq uint64 `json:"first_seq"`
	// TotalMessages is the length of the whole thread log.
	TotalMessages uint64 `json:"total_messages"`
	// LatestRun is the thread's latest run record when the run was
	// claimed: usually this run's own (status running); in a continuation
	// possibly a newer run of the thread.
	LatestRun *RunRecord `json:"latest_run,omitempty"`
}

// Request is what the run was asked to do: the "request" member of RUN.
type Request struct {
	// Messages are the activation messages of this run (already in the
	// thread log; do not checkpoint them again).
	Messages           []Message       `json:"messages"`
	RunMode            string          `json:"run_mode"` // one of the Mode constants
	Origin             string          `json:"origin"`
	ContinueRunID      string          `json:"continue_run_id,omitempty"`
	ParentRunID        string          `json:"parent_run_id,omitempty"`
	ParentThreadID     string          `json:"parent_thread_id,omitempty"`
	TransportRequestID string          `json:"transport_request_id,omitempty"`
	Decisions          []Decision      `json:"decisions,omitempty"`
	FrontendTools      json.RawMessage `json:"frontend_tools,omitempty"`
	Overrides          json.RawMessage `json:"overrides,omitempty"`
	Traceparent        string          `json:"traceparent,omitempty"` // W3C trace context of the submit
}

// Checkpoint is what a run persists mid-run: messages appended to the
// thread log and run-record fields to update. Run.Checkpoint numbers it.
type Checkpoint struct {
	// Messages are appended to the thread log (ids assigned by the sidecar
	// when blank).
	Messages []Message `json:"messages"`
	// Run carries run-record fields to update; nil updates none.
	Run *RunPatch `json:"run,omitempty"`
}

// RunPatch is the part of a run record an agent may write. Nil or empty
// fields are left as they are.
type RunPatch struct {
	Status       string          `json:"status,omitempty"` // StatusRunning or StatusWaiting
	Waiting      *WaitingState   `json:"waiting,omitempty"`
	State        json.RawMessage `json:"state,omitempty"`
	Output       json.RawMessage `json:"output,omitempty"`
	Steps        *int64          `json:"steps,omitempty"`
	InputTokens  *int64          `json:"input_tokens,omitempty"`
	OutputTokens *int64          `json:"output_tokens,omitempty"`
}

// SubmitRequest asks the sidecar to queue a background run (Client.Submit):
// the body of the HTTP API's submit endpoints. All fields are optional
// except Messages, which may be empty only when Decisions is not.
type SubmitRequest struct {
	ThreadID           string          `json:"thread_id,omitempty"` // blank: a new thread
	AgentID            string          `json:"agent_id,omitempty"`
	Messages           []Message       `json:"messages"`
	Decisions          []Decision      `json:"decisions,omitempty"`
	FrontendTools      json.RawMessage `json:"frontend_tools,omitempty"`
	Overrides          json.RawMessage `json:"overrides,omitempty"`
	ContinueRunID      string          `json:"continue_run_id,omitempty"`
	RunIDHint          string          `json:"run_id,omitempty"`
	DispatchIDHint     string          `json:"dispatch_id,omitempty"`
	ParentRunID        string          `json:"parent_run_id,omitempty"`
	ParentThreadID     string          `json:"parent_thread_id,omitempty"`
	TransportRequestID string          `json:"transport_request_id,omitempty"`
	Origin             string          `json:"origin,omitempty"`   // one of the Origin constants; default user
	RunMode            string          `json:"run_mode,omitempty"` // one of the Mode constants
	Priority           *uint8          `json:"priority,omitempty"`
	// DedupeKey makes the submit idempotent: a repeat while the first
	// dispatch is not terminal returns the first dispatch. Set it when a
	// Submit may be retried after a lost connection.
	DedupeKey string `json:"dedupe_key,omitempty"`
}

// SubmitResult is the dispatch a Submit queued.
type SubmitResult struct {
	DispatchID string `json:"dispatch_id"`
	RunID      string `json:"run_id"`
	ThreadID   string `json:"thread_id"`
	Status     string `json:"status"` // "queued"
}
