package agent

import (
	"encoding/json"
	"unicode/utf8"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// Result is how a run ended: the FINISH payload. Build one with Done,
// Cancelled, Suspended, Transient or Permanent; a handler may also fill the
// fields itself (missing ones are completed as described at
// Handler.HandleRun).
//
// A Result without Error completes the run whatever its termination (the
// dispatch is acknowledged). An Error of kind ipc.KindTransient makes the
// sidecar retry the run after a backoff; ipc.KindPermanent dead-letters it.
type Result struct {
	Status      string           `json:"status"` // StatusDone or StatusWaiting
	Termination *Termination     `json:"termination,omitempty"`
	Response    string           `json:"response,omitempty"` // the final text, stored as the run's final output
	Waiting     *WaitingState    `json:"waiting,omitempty"`  // why the run waits (StatusWaiting)
	Error       *ipc.FinishError `json:"error,omitempty"`
}

// Done is a run that completed: status done, termination natural_end, with
// response as its final text.
func Done(response string) Result {
	return Result{Status: StatusDone, Termination: &Termination{Type: TermNaturalEnd}, Response: response}
}

// Cancelled is a run that stopped because it was cancelled: status done,
// termination cancelled. Return it when the context passed to the handler
// is cancelled.
func Cancelled() Result {
	return Result{Status: StatusDone, Termination: &Termination{Type: TermCancelled}}
}

// Suspended is a run that waits (for a tool decision, user input, …):
// status waiting, termination suspended. The sidecar starts a resume run
// when what it waits for arrives.
func Suspended(w WaitingState) Result {
	return Result{Status: StatusWaiting, Termination: &Termination{Type: TermSuspended}, Waiting: &w}
}

// Transient is a run that failed for a reason that may pass (inference
// failure, an unavailable dependency): the sidecar retries it with
// exponential backoff and dead-letters it once its attempts are spent.
func Transient(code, msg string) Result { return failed(ipc.KindTransient, code, msg) }

// Permanent is a run that failed for good (bad input, an unknown agent):
// the sidecar dead-letters it at once and marks the run errored.
func Permanent(code, msg string) Result { return failed(ipc.KindPermanent, code, msg) }

// MaxFailureMessage bounds the message Transient and Permanent send, in
// bytes; a longer one is cut at a character boundary and marked "…" (the
// sidecar keeps 4 KiB of it). It goes in the FINISH twice, and a message
// of more than half a frame turned a transient failure into a permanent
// result_too_large (found by review).
const MaxFailureMessage = 64 << 10

func failed(kind, code, msg string) Result {
	if len(msg) > MaxFailureMessage {
		cut := MaxFailureMessage - len("…")
		for cut > 0 && !utf8.RuneStart(msg[cut]) {
			cut--
		}
		msg = msg[:cut] + "…"
	}
	v, _ := json.Marshal(msg) // a string always marshals
	return Result{
		Status:      StatusDone,
		Termination: &Termination{Type: TermError, Value: v},
		Error:       &ipc.FinishError{Kind: kind, Code: code, Message: msg},
	}
}

// isZero reports whether r has no field set.
func (r *Result) isZero() bool {
	return r.Status == "" && r.Termination == nil && r.Response == "" && r.Waiting == nil && r.Error == nil
}

// complete returns the Result to send for what a handler returned:
// cancelled says whether the run's context was done when it returned.
//
//   - the zero Result is Cancelled() after cancellation, Done("") otherwise;
//   - a missing status is waiting when the result carries a waiting state or
//     a suspended termination, done otherwise;
//   - a missing termination is suspended for waiting, error for a failure,
//     natural_end otherwise;
//   - an error without a kind is transient.
func (r Result) complete(cancelled bool) Result {
	if r.isZero() {
		if cancelled {
			return Cancelled()
		}
		return Done("")
	}
	if r.Status == "" {
		r.Status = StatusDone
		if r.Waiting != nil || (r.Termination != nil && r.Termination.Type == TermSuspended) {
			r.Status = StatusWaiting
		}
	}
	if r.Termination == nil {
		switch {
		case r.Error != nil:
			v, _ := json.Marshal(r.Error.Message)
			r.Termination = &Termination{Type: TermError, Value: v}
		case r.Status == StatusWaiting:
			r.Termination = &Termination{Type: TermSuspended}
		default:
			r.Termination = &Termination{Type: TermNaturalEnd}
		}
	}
	if r.Error != nil && r.Error.Kind == "" {
		e := *r.Error
		e.Kind = ipc.KindTransient
		r.Error = &e
	}
	return r
}
