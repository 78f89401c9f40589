package engine

import (
	"context"
	"encoding/json"
	"slices"
	"time"
)

// Executor is the runtime boundary: it runs one attempt of a run on an
// agent. The agent hub of package ipc implements it over the agent
// socket; engine tests use a scripted fake.
//
// Cancellation is the context's: when the engine cancels a run (a user's
// cancel, an interrupt, a lost lease, shutdown) it cancels ctx, and the
// executor tells the agent (CANCEL) and returns once the agent finished or
// gave up. Live commands reach the run through RunRequest.Commands.
type Executor interface {
	// Run executes req and blocks until the attempt ends. Events go to
	// sink in order. The outcome says how the attempt ended. Run may
	// drop req.Messages and req.Context.Messages (set them nil) once it
	// has passed them on: the engine does not read them after the call,
	// and a long run need not hold its thread's history.
	Run(ctx context.Context, req *RunRequest, sink EventSink) RunOutcome
	// Capacity is how many runs the connected agents accept at once in
	// total (0 when no agent is connected). The engine never has more
	// runs executing than this.
	Capacity() int
	// CapacityChanged is signalled (non-blocking, coalesced) when an
	// agent connected or left, and when Capacity grew. A Capacity that
	// only shrank need not be signalled (the engine reads it at every
	// pass): a signal ends the holds of the threads set aside for lack
	// of an agent, to be claimed again.
	CapacityChanged() <-chan struct{}
}

// Drainer is an Executor that holds attempts past their cancellation
// while the agent still runs them (the hub: a run not finished after its
// CANCEL). Stop calls Drain once its grace is over and it cancels what
// still runs: the executor then gives such attempts up instead of
// holding them, so that Stop does not wait on an agent that ignores its
// cancels.
type Drainer interface {
	Drain()
}

// SlotCounter is an Executor that can tell which of its agents have free
// slots and which agent ids each serves (the hub: its connections serve
// different agent ids, while Capacity counts all their slots together). A
// thread set aside because its agents were full (CodeAgentBusy) is then
// claimed again as soon as one of them has a free slot, and no more such
// threads at once than there are such slots (claimhold.go).
type SlotCounter interface {
	// FreeSlots lists the agents (connections) with a free slot now.
	FreeSlots() []AgentSlots
	// Serves reports whether a connected agent takes runs of agent id id
	// (full or not). A submit does not claim inline a run that no agent
	// serves: it is queued (and answered so) until one comes.
	Serves(id string) bool
}

// AgentSlots is one agent's free slots and the agent ids it serves.
type AgentSlots struct {
	Free     int
	AgentIDs []string
	Any      bool // it serves every agent id ("*")
}

// serves reports whether a serves agent id id.
func (a *AgentSlots) serves(id string) bool { return a.Any || slices.Contains(a.AgentIDs, id) }

// EventSink receives one run's events. Emit must not block for long: the
// engine's sinks copy the event into a bounded per-run buffer.
type EventSink interface {
	// Emit takes one agent event: a JSON object with at least a "type"
	// field, forwarded to clients byte for byte. The sink does not keep
	// data after Emit returns.
	Emit(data []byte)
}

// QuietSink is an EventSink that can hold back waking the readers of its
// events (the SSE streams). An executor that takes several frames from
// one read of the agent's socket emits each event with EmitQuiet and
// calls WakeReaders once it has handled the frames it has read: the
// readers are woken once per read, not once per event, and after the
// run's other frames of that read (a CHECKPOINT) were handed on. On a
// busy processor Go runs the goroutine woken last first, so the stream
// writer then goes before the checkpoint's commit instead of after it.
type QuietSink interface {
	EventSink
	// EmitQuiet is Emit without waking the readers.
	EmitQuiet(data []byte)
	// WakeReaders wakes the readers of the events emitted so far.
	WakeReaders()
}

// RunRequest is one attempt of a run as the executor sees it: the durable
// run record's request, rebuilt, plus the thread history the agent needs.
type RunRequest struct {
	DispatchID string `json:"dispatch_id"`
	RunID      string `json:"run_id"`
	ThreadID   string `json:"thread_id"`
	AgentID    string `json:"agent_id"`
	// SessionID is the dispatch instance id: new for every attempt.
	SessionID string `json:"session_id"`
	// Attempt counts from 1.
	Attempt uint32 `json:"attempt"`

	// Messages are the activation messages of this run.
	Messages           []Message       `json:"messages"`
	RunMode            string          `json:"run_mode"`
	Origin             string          `json:"origin"`
	ContinueRunID      string          `json:"continue_run_id,omitempty"`
	ParentRunID        string          `json:"parent_run_id,omitempty"`
	ParentThreadID     string          `json:"parent_thread_id,omitempty"`
	TransportRequestID string          `json:"transport_request_id,omitempty"`
	Decisions          []Decision      `json:"decisions,omitempty"`
	FrontendTools      json.RawMessage `json:"frontend_tools,omitempty"`
	Overrides          json.RawMessage `json:"overrides,omitempty"`
	Traceparent        string          `json:"traceparent,omitempty"`

	// Context is the recent thread history, capped by Config.
	Context ThreadContext `json:"context"`

	// Commands carries live commands to the running attempt. The executor
	// answers every command on its Reply channel.
	Commands <-chan Command `json:"-"`
	// Checkpoint persists what the agent reports mid-run (messages to
	// append, run-record fields) and returns once it is durable.
	Checkpoint func(ctx context.Context, c RunCheckpoint) error `json:"-"`
	// SlotTaken, when set, is called by an executor that counts free
	// slots (SlotCounter) once the attempt holds a slot of the agent it
	// runs on: from then on FreeSlots counts it taken.
	SlotTaken func() `json:"-"`
}

// ThreadContext is the slice of thread history sent with a run.
type ThreadContext struct {
	Messages []MessageRecord `json:"messages"`
	// FirstSeq is the sequence number of Messages[0] (0 when empty).
	FirstSeq uint64 `json:"first_seq"`
	// TotalMessages is the length of the whole log.
	TotalMessages uint64     `json:"total_messages"`
	LatestRun     *RunRecord `json:"latest_run,omitempty"`
}

// RunCheckpoint is what an agent persists mid-run.
type RunCheckpoint struct {
	// Messages are appended to the thread log (ids assigned when blank).
	Messages []Message `json:"messages,omitempty"`
	// Run carries run-record fields to update; only the fields the agent
	// may own are applied (status running/waiting, waiting, state, steps,
	// tokens, output).
	Run *RunPatch `json:"run,omitempty"`
}

// RunPatch is the part of a run record an agent may write.
type RunPatch struct {
	Status       RunStatus        `json:"status,omitempty"`
	Waiting      *RunWaitingState `json:"waiting,omitempty"`
	State        json.RawMessage  `json:"state,omitempty"`
	Output       json.RawMessage  `json:"output,omitempty"`
	Steps        *int64           `json:"steps,omitempty"`
	InputTokens  *int64           `json:"input_tokens,omitempty"`
	OutputTokens *int64           `json:"output_tokens,omitempty"`
}

// CommandKind says what a live command carries.
type CommandKind uint8

// The live commands (cancellation is the run context's).
const (
	CommandMessages CommandKind = iota + 1
	CommandDecision
)

// Command is one live command for a running attempt.
type Command struct {
	Kind      CommandKind
	Messages  []MessageRecord // CommandMessages: already in the thread log
	Decisions []Decision      // CommandDecision
	// Reply receives nil when the agent accepted the command, an error
	// otherwise. It is buffered; the executor sends exactly once.
	Reply chan<- error
	// Deadline is when the engine stops waiting for Reply and falls back
	// (live messages queued as a new dispatch): the executor must not let
	// the agent take the command later (zero: the executor's own
	// timeout).
	Deadline time.Time
}

// OutcomeKind classifies how an attempt ended (the engine acts on it).
type OutcomeKind uint8

// Outcome kinds.
const (
	// OutcomeCompleted: the agent finished (whatever its termination); the
	// dispatch is acked.
	OutcomeCompleted OutcomeKind = iota + 1
	// OutcomeTransient: retry after backoff (nack); dead letter once the
	// attempts are spent. A lost or silent agent is transient.
	OutcomeTransient
	// OutcomePermanent: never retry (dead letter; the run is errored).
	OutcomePermanent
	// OutcomeAbandoned: the attempt never really ran (no agent took it, or
	// the sidecar is shutting down); the dispatch goes back to queued
	// without spending an attempt.
	OutcomeAbandoned
)

// Error codes of abandoned attempts that no agent took, which tell the
// engine how long to set the thread aside (claimhold.go).
const (
	// CodeAgentUnavailable: agents are connected and none serves the
	// run's agent id. The thread waits until agents come or go (the
	// executor's CapacityChanged), at most a minute.
	CodeAgentUnavailable = "agent_unavailable"
	// CodeAgentBusy: the agents that serve it were full (the engine
	// counts the slots of every agent id together): at once when the free
	// slot was another agent's, else after the executor's wait for one.
	// The thread waits for their free slot (SlotCounter), else a second.
	CodeAgentBusy = "agent_busy"
)

// CodeAgentShutdown is the code of an attempt its agent gave up because
// it shut down (after its GOAWAY): put back without spending an attempt,
// up to maxAgentShutdownPutBacks times in a row (settle).
const CodeAgentShutdown = "agent_shutdown"

var outcomeLabels = [...]string{"", "completed", "transient_error", "permanent_error", "abandoned"}

// String is the stable metric label of the kind.
func (k OutcomeKind) String() string {
	if int(k) < len(outcomeLabels) {
		return outcomeLabels[k]
	}
	return "unknown"
}

// RunOutcome is the result of one attempt.
type RunOutcome struct {
	Kind        OutcomeKind
	Status      RunStatus // done or waiting (completed outcomes)
	Termination *Termination
	Response    string
	Waiting     *RunWaitingState
	// ErrorCode and Error describe a transient or permanent failure.
	ErrorCode string
	Error     string
}

// OutcomeCancelledLabel is the metric label of an attempt that ended
// cancelled: a user's cancel or an interrupt, however the agent reported
// it (mailbox_runs_total, mailbox_agent_runs_total).
const OutcomeCancelledLabel = "cancelled"

// MetricLabel is the outcome's label in the run metrics: the kind's, or
// OutcomeCancelledLabel for a completed attempt whose termination is
// cancelled (an interrupted run completes cancelled; counted as completed
// it hid every interrupt among the successes, found by review).
func (o *RunOutcome) MetricLabel() string {
	if o.Kind == OutcomeCompleted && o.Termination != nil && o.Termination.Type == TermCancelled {
		return OutcomeCancelledLabel
	}
	return o.Kind.String()
}
