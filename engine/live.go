package engine

import (
	"context"
	"errors"
	"time"
)

// LiveTarget names the exact run a live command is for: thread + run +
// (dispatch or none). A target with a dispatch id and one without are
// different channels (store.md rule 14).
type LiveTarget struct {
	ThreadID   string `json:"thread_id"`
	RunID      string `json:"run_id"`
	DispatchID string `json:"dispatch_id,omitempty"`
}

// LiveCommandKind says what a live command carries.
type LiveCommandKind uint8

// Live command kinds.
const (
	LiveMessages LiveCommandKind = iota + 1
	LiveCancel
	LiveDecision
)

// LiveCommand is a command for a run executing in another process.
type LiveCommand struct {
	Kind      LiveCommandKind
	Messages  []MessageRecord
	Decisions []Decision
}

// LiveRouter is implemented by stores shared between processes (the NATS
// store): it carries a command to the process executing the target run
// and reports whether that process accepted it. A single-process store
// does not implement it; every run then executes here.
type LiveRouter interface {
	// DeliverLive returns true only once the receiving process accepted
	// the command; no subscriber or no receipt in time is false.
	DeliverLive(ctx context.Context, target LiveTarget, cmd LiveCommand) (bool, error)
}

// DispatchSignal is one wake-up hint from a work-queue store: "thread has
// dispatch". Signals are at-least-once; correctness comes from the claim.
type DispatchSignal struct {
	ThreadID   string
	DispatchID string
	Receipt    SignalReceipt
}

// SignalReceipt settles one signal.
type SignalReceipt interface {
	// Deliveries is the delivery count (1 = first); ok false when unknown.
	Deliveries() (n int, ok bool)
	Ack() error
	// Nack redelivers after delay (0: at once).
	Nack(delay time.Duration) error
}

// SignalSource is implemented by stores that publish a signal per
// enqueue (engine.md §13); the engine then runs a signal loop.
type SignalSource interface {
	PullDispatchSignals(ctx context.Context, max int, wait time.Duration) ([]DispatchSignal, error)
}

// Permanent error codes of an agent's FINISH (ipc.md): these are never
// retried.
var permanentCodes = map[string]bool{
	"agent_not_found":        true,
	"resolve_failed":         true,
	"thread_already_running": true,
	"invalid_activation":     true,
}

// ClassifyFailure maps an agent's reported failure to an outcome kind:
// kind "permanent" or a permanent code → OutcomePermanent; anything else
// (inference, storage, unknown) → OutcomeTransient (engine.md item 48).
func ClassifyFailure(kind, code string) OutcomeKind {
	if kind == "permanent" || permanentCodes[code] {
		return OutcomePermanent
	}
	return OutcomeTransient
}

// HandleLive applies a live command that another process routed to a run
// executing here (the receiving side of a LiveRouter). The target must
// match exactly: a stale target for an older run or dispatch of the
// thread is refused. A claim or hand-over of the thread in flight here is
// waited for (up to CancelWait), as a local Cancel waits: the command may
// be for the attempt that comes out of it. It reports whether the command
// was accepted.
func (m *Mailbox) HandleLive(ctx context.Context, target LiveTarget, cmd LiveCommand) bool {
	return m.AnswerLive(ctx, target, cmd) == LiveAccepted
}

// LiveAnswer is how the receiving side of a LiveRouter answers a routed
// command.
type LiveAnswer uint8

// Live answers.
const (
	// LiveNotHere: the target does not execute in this process (another
	// may be its owner); a router says nothing back.
	LiveNotHere LiveAnswer = iota
	// LiveRefused: the target executes here and did not take the command
	// (a decision for no waiting call, messages the agent refused, a
	// cancel of a claim already settled); a router can tell the sender at
	// once instead of letting it wait out its timeout.
	LiveRefused
	// LiveAccepted: taken.
	LiveAccepted
)

// AnswerLive is HandleLive telling a refusal by the target's owner
// (LiveRefused) apart from a target that is not here (LiveNotHere).
func (m *Mailbox) AnswerLive(ctx context.Context, target LiveTarget, cmd LiveCommand) LiveAnswer {
	e := m.settledEntry(ctx, target.ThreadID)
	if e == nil || e.claiming || e.dispatch.RunID != target.RunID ||
		(target.DispatchID != "" && e.dispatch.DispatchID != target.DispatchID) {
		return LiveNotHere
	}
	answer := func(ok bool) LiveAnswer {
		if ok {
			return LiveAccepted
		}
		return m.refusedHere(ctx, e)
	}
	switch cmd.Kind {
	case LiveCancel:
		// As a local Cancel: durable before it is accepted, so a crash
		// right after the receipt cannot bring the run back. A stale
		// epoch (an interrupt) has the store supersede the claim and
		// settle its run as cancelled: accepted, the attempt is stopped.
		// A claim the attempt already settled itself — the run finished
		// and was acked, or failed and went back to the queue for a
		// retry — cancelled nothing: refused, as the local Cancel answers
		// false then (accepted, its sender answered cancelled:true for a
		// dispatch that ended acked, or ran again).
		ok, err := m.settleCancel(ctx, e)
		switch {
		case errors.Is(err, ErrVersionConflict):
		case err != nil:
			m.log.Warn("live cancel not made durable", "dispatch_id", e.dispatch.DispatchID, "err", err)
			return m.refusedHere(ctx, e)
		case !ok:
			return m.refusedHere(ctx, e)
		}
		e.cancel(errCancelled)
		return LiveAccepted
	case LiveMessages:
		return answer(m.command(ctx, e, Command{Kind: CommandMessages, Messages: cmd.Messages}))
	case LiveDecision:
		return answer(m.command(ctx, e, Command{Kind: CommandDecision, Decisions: cmd.Decisions}))
	}
	return LiveRefused
}

// refusedHere is the answer to a command the attempt e did not take:
// LiveRefused, unless another process holds the dispatch's claim now (e
// lost its lease and is stopping while a retry runs there), whose answer
// must not be pre-empted by this one (found by review: a stale attempt's
// quick refusal beat the real owner's receipt).
func (m *Mailbox) refusedHere(ctx context.Context, e *execution) LiveAnswer {
	cur, err := m.store.LoadDispatch(ctx, e.dispatch.DispatchID)
	if err != nil || cur != nil && cur.Status == StatusClaimed && cur.ClaimToken != e.dispatch.ClaimToken {
		return LiveNotHere
	}
	return LiveRefused
}

// settledEntry returns the thread's entry here once no claim or hand-over
// of it is in flight (waiting up to CancelWait or until ctx ends), or nil.
// A cancel and a routed live command wait through it alike.
func (m *Mailbox) settledEntry(ctx context.Context, thread string) *execution {
	deadline := time.Now().Add(m.cfg.CancelWait)
	for {
		m.mu.Lock()
		e := m.threads[thread]
		m.mu.Unlock()
		if e == nil || !e.claiming && !e.handoff.Load() || !time.Now().Before(deadline) || ctx.Err() != nil {
			return e
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Millisecond):
		}
	}
}
