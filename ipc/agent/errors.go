package agent

import (
	"errors"
	"fmt"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// Conditions. Test with errors.Is. ErrCancelled, ErrShutdown and
// ErrConnectionLost are also the causes (context.Cause) of a run context
// that the SDK cancelled, so a handler can tell why it was stopped.
var (
	// ErrRunFinished reports a call on a run whose FINISH was already sent
	// (its handler returned). A Checkpoint still waiting for its answer
	// when the handler returns gets it too: that checkpoint was sent
	// before the FINISH and may or may not have been applied (found by
	// review). It is also the cause of the run's context once the handler
	// has returned.
	ErrRunFinished = errors.New("agent: run finished")
	// ErrConnectionLost reports that the connection to the sidecar went
	// away. A run on it is cancelled with this cause; its FINISH is not
	// sent, and the sidecar retries the run.
	ErrConnectionLost = errors.New("agent: connection to the sidecar lost")
	// ErrCancelled is the cause of a run context cancelled by the
	// sidecar's CANCEL (a user's cancel or an interrupt).
	ErrCancelled = errors.New("agent: run cancelled by the sidecar")
	// ErrShutdown is the cause of a run context cancelled because the
	// client is shutting down and ShutdownGrace ran out. Such a run's
	// Cancelled() (or zero) result is reported as Transient("shutdown"),
	// so the sidecar retries it.
	ErrShutdown = errors.New("agent: client shutting down")
	// ErrHandlersStuck reports that Serve returned while run handlers
	// still ran: they ignored their cancelled context for StopTimeout
	// after shutdown's grace. The process should exit.
	ErrHandlersStuck = errors.New("agent: run handlers did not return after shutdown")
	// ErrServing reports a second concurrent call of Client.Serve.
	ErrServing = errors.New("agent: client already serving")
)

// HandshakeError reports that the sidecar refused the HELLO (an ERROR on
// stream 0 in place of WELCOME), or answered with a WELCOME this SDK cannot
// speak.
type HandshakeError struct {
	Code    string // ERROR code, e.g. ipc.CodeUnsupportedProtocol
	Message string
}

// Error describes the refusal.
func (e *HandshakeError) Error() string {
	return fmt.Sprintf("agent: sidecar refused the handshake: %s: %s", e.Code, e.Message)
}

// Retryable reports whether connecting again may succeed. A protocol
// version mismatch never does; Serve returns such an error.
func (e *HandshakeError) Retryable() bool { return e.Code != ipc.CodeUnsupportedProtocol }

// CheckpointError reports a checkpoint the sidecar refused (ERROR with the
// checkpoint's seq on the run stream). The run may go on or give up.
// Reason says why: nothing of the checkpoint was written, except that a
// store failure (ipc.ReasonUnavailable, Retryable) may still have applied
// it.
type CheckpointError struct {
	Seq     uint64
	Code    string // usually ipc.CodeCheckpointFailed
	Message string
	// Reason is one of the ipc.Reason* constants or another client API
	// error code (validation, conflict, too_large …); empty from a
	// sidecar that sends none.
	Reason string
}

// Error describes the failed checkpoint.
func (e *CheckpointError) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("agent: checkpoint %d failed (%s): %s: %s", e.Seq, e.Reason, e.Code, e.Message)
	}
	return fmt.Sprintf("agent: checkpoint %d failed: %s: %s", e.Seq, e.Code, e.Message)
}

// Retryable reports whether sending the same checkpoint again may succeed:
// the store could not take it now (ipc.ReasonUnavailable), or the
// thread's log kept changing under it (ipc.ReasonConflict). A checkpoint
// refused as unavailable may also have been applied after all, so resend
// it only with message ids: a copy already stored is then refused with
// ipc.ReasonAlreadyExists, and nothing is logged twice. Every other
// reason fails again as sent (a message id already in the log, a
// checkpoint too large, the run ended).
func (e *CheckpointError) Retryable() bool {
	return e.Reason == ipc.ReasonUnavailable || e.Reason == ipc.ReasonConflict
}

// SubmitError reports a SUBMIT the sidecar refused (SUBMIT_RESULT with an
// error), e.g. a validation failure or ipc.CodeBusy.
type SubmitError struct {
	Code    string
	Message string
}

// Error describes the refusal.
func (e *SubmitError) Error() string {
	return fmt.Sprintf("agent: submit refused: %s: %s", e.Code, e.Message)
}
