package ipc

import "encoding/json"

// ProtocolVersion is the protocol version this package speaks (HELLO and
// WELCOME carry it as "protocol").
const ProtocolVersion = 1

// Error codes carried by ERROR and GOAWAY frames and by COMMAND_ACK
// reasons. Peers may send others; these are the ones the sidecar uses.
const (
	CodeProtocolError       = "protocol_error"       // framing or payload broke the rules; connection closes
	CodeUnsupportedProtocol = "unsupported_protocol" // HELLO asked for another protocol version
	CodeHandshakeTimeout    = "handshake_timeout"    // no HELLO in time
	CodeUnknownStream       = "unknown_stream"       // a run frame for a stream that is not open
	CodeCheckpointFailed    = "checkpoint_failed"    // a checkpoint could not be made durable
	CodeHeartbeatTimeout    = "heartbeat_timeout"    // the peer was silent for 3 × heartbeat
	CodeShutdown            = "shutdown"             // GOAWAY: the sender is shutting down
	CodeBusy                = "busy"                 // SUBMIT refused: too many in flight
)

// Reasons an ERROR checkpoint_failed carries (Status.Reason): why the
// checkpoint was not applied. Besides these, the client API's error codes
// (validation, not_found, too_large) may appear; a peer treats a reason
// it does not know like ReasonInternal.
const (
	// ReasonUnavailable: the store could not take the write now (a full
	// disk, an I/O error, a store shutting down). The checkpoint may still
	// have been applied (a commit whose sync failed can survive a
	// restart): resend it only with message ids, so a copy already stored
	// is refused as ReasonAlreadyExists.
	ReasonUnavailable = "unavailable"
	// ReasonAlreadyExists: a message id of the checkpoint is already in
	// the thread log. Nothing was written.
	ReasonAlreadyExists = "already_exists"
	// ReasonConflict: the thread's log changed under the checkpoint at
	// each of its tries (other writers appending at once). Nothing was
	// written; it may be sent again.
	ReasonConflict = "conflict"
	// ReasonInternal: anything else; nothing the agent can mend.
	ReasonInternal = "internal"
	// ReasonRunEnded: the run ended (cancelled, failed, finished) before
	// the checkpoint was applied. Nothing was written.
	ReasonRunEnded = "run_ended"
	// ReasonCheckpointBacklog: too many of the run's checkpoints awaited
	// their answer; this and every later checkpoint of the run are
	// refused and the run fails. Nothing was written.
	ReasonCheckpointBacklog = "checkpoint_backlog"
)

// Hello is the HELLO payload: the agent's first frame.
type Hello struct {
	Protocol int    `json:"protocol"`
	Name     string `json:"name,omitempty"`
	// AgentIDs are the agents this process serves; "*" (the default when
	// empty) serves any.
	AgentIDs []string `json:"agent_ids,omitempty"`
	// MaxRuns is how many runs the process executes at once (≥ 1).
	MaxRuns int `json:"max_runs"`
}

// Welcome is the WELCOME payload: the sidecar's handshake reply.
type Welcome struct {
	Protocol    int    `json:"protocol"`
	SidecarID   string `json:"sidecar_id"`
	HeartbeatMs int64  `json:"heartbeat_ms"`
	MaxFrame    uint32 `json:"max_frame"`
}

// Status is the payload of GOAWAY and ERROR frames. On a run stream an
// ERROR that answers a CHECKPOINT carries the checkpoint's Seq and, from
// this sidecar, a Reason (the Reason* constants).
type Status struct {
	Code    string  `json:"code"`
	Message string  `json:"message,omitempty"`
	Seq     *uint64 `json:"seq,omitempty"`
	Reason  string  `json:"reason,omitempty"`
}

// CheckpointAck is the CHECKPOINT_ACK payload.
type CheckpointAck struct {
	Seq uint64 `json:"seq"`
}

// Command is the payload of CANCEL, MESSAGES and DECISION: a command id
// and, for MESSAGES and DECISION, what it carries (JSON arrays).
type Command struct {
	Cmd       string          `json:"cmd"`
	Messages  json.RawMessage `json:"messages,omitempty"`
	Decisions json.RawMessage `json:"decisions,omitempty"`
	// AckBy (MESSAGES and DECISION; Unix ms) is when the agent's ACK is
	// due: an agent that reads the command later refuses it (accepted
	// false, reason late), since the sidecar may have fallen back by then
	// (the messages queued as a new dispatch). 0: no deadline.
	AckBy int64 `json:"ack_by,omitempty"`
}

// CommandAck is the COMMAND_ACK payload.
type CommandAck struct {
	Cmd      string `json:"cmd"`
	Accepted bool   `json:"accepted"`
	Reason   string `json:"reason,omitempty"`
}

// FinishError is the "error" member of a FINISH payload.
type FinishError struct {
	// Kind is "transient" (retried with backoff) or "permanent" (dead
	// letter at once). Anything else counts as transient.
	Kind    string `json:"kind"`
	Code    string `json:"code,omitempty"`
	Message string `json:"message,omitempty"`
}

// Finish error kinds.
const (
	KindTransient = "transient"
	KindPermanent = "permanent"
)

// SubmitResult is the SUBMIT_RESULT payload: either the queued dispatch or
// an error.
type SubmitResult struct {
	Req        string  `json:"req"`
	DispatchID string  `json:"dispatch_id,omitempty"`
	RunID      string  `json:"run_id,omitempty"`
	ThreadID   string  `json:"thread_id,omitempty"`
	Status     string  `json:"status,omitempty"`
	Error      *Status `json:"error,omitempty"`
}
