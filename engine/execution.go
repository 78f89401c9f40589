package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// execution is one attempt of a run claimed by this process.
type execution struct {
	dispatch Dispatch // as claimed (token, lease)
	claiming bool     // placeholder while the claim is in flight

	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{} // closed when the attempt has finished and released its slot

	events *EventLog
	// prevLog is the log of an earlier attempt of the run that this
	// process still held when this one started (nil when none); set at
	// the start.
	prevLog *EventLog
	// errorCode is the code of the attempt's failure (RunOutcome.ErrorCode),
	// for its run_finish (execute goroutine only).
	errorCode string
	// prevSkipped counts the recorded starts of attempts between prevLog's
	// and this one that no agent took, whose log this one was handed
	// (handOnLog): they had no events (set at the start).
	prevSkipped uint32
	// starts is the run's StartCount as this attempt knows it (its own
	// start included once recorded), known once the run was read
	// (countKnown); numbered: the log's ids are fixed (execute goroutine
	// only).
	starts     uint32
	countKnown bool
	numbered   bool
	commands   chan Command
	suspended  atomic.Int32 // >0 while a tool call waits (longer lease)
	startedAt  int64        // Unix ms of the recorded start (execute goroutine only)
	claimedAt  time.Time    // when the claim came back here (monotonic; claim_to_start)
	// preStarted: the start was recorded with the claim (dispatch.InstanceID).
	preStarted bool
	sawFinish  atomic.Bool // the agent emitted run_finish
	// heldFinish is the agent's run_finish, held back until the attempt's
	// outcome is known (agentSink): passed on if it completed, else the
	// engine's run_finish says how it ended.
	heldFinish atomic.Pointer[[]byte]
	// afterFinish counts agent events sent after its run_finish, dropped
	// (agentSink); logged once the attempt ends.
	afterFinish atomic.Int64
	// instance is the attempt's dispatch instance id once its start is
	// recorded (by its claim or by RecordDispatchStart).
	instance atomic.Pointer[string]
	// started: the store recorded the attempt's start under instance, so
	// instance is the run's session id (execute goroutine only).
	started bool
	// cancelSettled: a user's cancel already acked the dispatch as
	// cancelled; the attempt records nothing more.
	cancelSettled atomic.Bool
	// agentID is the run's agent id once its request is built (execute
	// goroutine only): a hold for a full agent names it (claimhold.go).
	agentID string
	// handOn: no agent took the attempt (agent_unavailable, agent_busy);
	// its log goes on with the run's next attempt (handOnLog).
	handOn bool
	// capSeen is Mailbox.capChanges when the attempt started (guarded by
	// Mailbox.mu): an executor's "no agent" answer given before agents
	// came or went sets no hold (claimhold.go).
	capSeen uint64
	// queueChanged: the thread's queue changed while the attempt was in
	// flight (a submit of other work, a cancel, an interrupt; guarded by
	// Mailbox.mu): its "no agent" answer sets no hold, since the thread's
	// next dispatch may now be another, for an agent that is here
	// (releaseAgentHoldAfter found no hold to end yet; found by review).
	queueChanged bool
	// changedBy is, on a claim's placeholder, the one dispatch whose
	// submit changed the queue ("" for anything else): a claim that
	// returns that very dispatch saw the change.
	changedBy string
	// unserved is the thread's last hold for an agent id no agent served
	// (startExecution; 0: none): a refusal for that again doubles it.
	unserved time.Duration
	// corruptDelay is the thread's last hold for records that did not
	// decode (startExecution; 0: none): a run that cannot be rebuilt
	// again doubles it.
	corruptDelay time.Duration
	// setAside: the attempt set its thread aside (settle, records that
	// do not decode); finish does not claim the thread's next dispatch.
	setAside bool
	// liveKeys are the dedupe keys of live-then-queue submits whose
	// messages this attempt accepted live (guarded by Mailbox.mu): a
	// repeat of one is answered as delivered, not appended again. The
	// newest maxLiveKeys are kept: liveKeyRing holds them in the order
	// taken, and once full liveKeyNext is the oldest, replaced next.
	liveKeys    map[string]struct{}
	liveKeyRing []string
	liveKeyNext int
	// next is the thread's next dispatch, claimed in the commit that
	// completed this attempt (CompleteClaimer): finish starts it in this
	// attempt's slot (execute goroutine only).
	next *Dispatch
	// nextStarted: that commit also recorded next's start (StartClaimer).
	nextStarted bool
	// handoff: the completion may claim the thread's next dispatch, which
	// then belongs to this entry of the threads map until finish starts
	// it (cancelAndAwait waits, as for a claim in flight).
	handoff atomic.Bool
}

// instanceID is the attempt's instance id, or "" before its start is
// recorded.
func (e *execution) instanceID() string {
	if p := e.instance.Load(); p != nil {
		return *p
	}
	return ""
}

// attempt is the result of trying to start work on a thread.
type attempt uint8

const (
	attemptClaimed attempt = iota + 1 // an attempt started
	attemptBusy                       // the thread already runs here
	attemptNoSlot                     // no free agent slot
	attemptNone                       // nothing claimable
	attemptError                      // the claim failed
	attemptCorrupt                    // the claim failed on a damaged record (ErrCorrupt): this thread's alone
)

// reserveSlot takes an agent slot for a foreground submit on thread.
func (m *Mailbox) reserveSlot(thread string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closing || m.inFlight >= m.exec.Capacity() {
		return false
	}
	m.inFlight++
	return true
}

// reserveSlotAfterProbes is reserveSlot for a foreground submit that has
// just freed a slot by interrupting the thread's attempt: when every slot
// is taken but some only by claims probing for due work (tryDispatch),
// it waits for those to end — a probe that finds nothing gives its slot
// back within one store operation — instead of queueing the run behind a
// slot that is about to be free (the submit came back queued, to start a
// moment later, when the dispatcher probed between the attempt's end and
// the submit's claim).
func (m *Mailbox) reserveSlotAfterProbes(thread string) bool {
	m.awaitProbes()
	return m.reserveSlot(thread)
}

// awaitProbes waits, while every slot is taken, for the claims probing for
// due work to end (see reserveSlotAfterProbes).
func (m *Mailbox) awaitProbes() {
	m.mu.Lock()
	for !m.closing && m.inFlight >= m.exec.Capacity() && m.probes > 0 {
		m.probeDone.Wait()
	}
	m.mu.Unlock()
}

func (m *Mailbox) releaseSlot(string) {
	m.mu.Lock()
	m.inFlight--
	m.signalIdleLocked()
	m.mu.Unlock()
	m.kick()
}

// tryDispatch claims the thread's next due dispatch if the thread is not
// already executing here and an agent slot is free, and starts it.
func (m *Mailbox) tryDispatch(ctx context.Context, thread string) attempt {
	m.mu.Lock()
	if m.closing {
		m.mu.Unlock()
		return attemptNoSlot
	}
	if m.threads[thread] != nil {
		m.mu.Unlock()
		return attemptBusy
	}
	if m.inFlight >= m.exec.Capacity() || m.heldForAgentLocked(thread, m.cfg.Now()) {
		m.mu.Unlock()
		return attemptNoSlot
	}
	m.inFlight++
	m.probes++
	hold := &execution{claiming: true}
	m.threads[thread] = hold
	m.mu.Unlock()

	d, started, err := m.claim(ctx, thread)
	if err != nil || d == nil {
		m.arrived(thread) // admitted from a hold, it will not run
		m.mu.Lock()
		m.probes-- // with the slot's release: a waiter sees both at once
		m.probeDone.Broadcast()
		if m.threads[thread] == hold {
			delete(m.threads, thread)
		}
		m.inFlight--
		m.signalIdleLocked()
		// A claim that ended with its caller's context (a client gone
		// after its durable submit) says nothing of the thread: no hold.
		// The caller's context decides, not the error: a store's own
		// request timeout (NATS) also reads as a deadline.
		callerGone := err != nil && ctx.Err() != nil
		var delay time.Duration
		switch {
		case callerGone:
		case err != nil:
			delay = m.holdLocked(thread, err, m.cfg.Now())
		default:
			m.releaseHoldLocked(thread)
		}
		m.mu.Unlock()
		if callerGone {
			m.log.Debug("claim ended with its caller", "thread_id", thread, "err", err)
			m.kick() // the dispatcher claims it
			return attemptError
		}
		if err != nil {
			level := slog.LevelWarn
			if errors.Is(err, ErrCorrupt) {
				level = slog.LevelError
			}
			m.log.Log(ctx, level, "claim failed; the thread is set aside", "thread_id", thread, "retry_in", delay, "err", err)
			if level == slog.LevelError {
				return attemptCorrupt
			}
			return attemptError
		}
		return attemptNone
	}
	m.mu.Lock()
	m.probes-- // the slot stays taken: the claim found work
	m.probeDone.Broadcast()
	lapsed := m.held[thread] // the hold that lapsed, if the thread was set aside
	m.releaseHoldLocked(thread)
	m.mu.Unlock()
	m.startExecution(*d, started, lapsed)
	return attemptClaimed
}

// claim claims the thread's next due dispatch and, on a store that can
// (StartClaimer), records its start in the same commit. started reports
// that it did.
func (m *Mailbox) claim(ctx context.Context, thread string) (d *Dispatch, started bool, err error) {
	sc, ok := m.raw.(StartClaimer)
	if !ok {
		d, err = m.store.Claim(ctx, thread, m.cfg.ConsumerID, m.cfg.Lease, m.cfg.Now())
		return d, false, err
	}
	instance := newID()
	d, err = observe(m.metrics, "claim", func() (*Dispatch, error) {
		return sc.ClaimStart(ctx, thread, m.cfg.ConsumerID, m.cfg.Lease, instance, m.cfg.Now())
	}, nilDispatch)
	return d, d != nil && d.InstanceID == instance, err
}

// claimSawNot reports whether p, a claim's placeholder, had the thread's
// queue changed while it was in flight by other work than the dispatch
// it took (claimed): the attempt of claimed is then marked queueChanged.
func (p *execution) claimSawNot(claimed string) bool {
	return p.claiming && p.queueChanged && p.changedBy != claimed
}

// startExecution runs a claimed dispatch; its agent slot is already
// reserved. started: the claim's commit also recorded the attempt's start
// (IdleSubmitter, StartClaimer), under the dispatch's instance id.
// lapsed: the thread's hold that lapsed as it was claimed (zero: none),
// because no agent served its run or its records did not decode; a
// failure of that kind again doubles its delay.
func (m *Mailbox) startExecution(d Dispatch, started bool, lapsed claimHold) {
	ctx, cancel := context.WithCancelCause(context.Background())
	e := &execution{dispatch: d, ctx: ctx, cancel: cancel, done: make(chan struct{}), commands: make(chan Command, 16), preStarted: started, claimedAt: time.Now()}
	if started {
		// Known from the claim: a cancel settling the attempt before its
		// goroutine runs records the right instance.
		e.instance.Store(&e.dispatch.InstanceID)
	}
	m.mu.Lock()
	e.events = m.pending[d.DispatchID]
	delete(m.pending, d.DispatchID)
	if e.events == nil {
		e.events = m.newEventLog()
	}
	if prev := m.logs[d.ThreadID]; prev != nil && prev != e.events && prev.run == d.RunID {
		e.prevLog = prev
	} else if h := e.events.handed; h.from != nil && h.from.run == d.RunID {
		// Handed on by attempts no agent took: the one before them.
		e.prevLog, e.prevSkipped = h.from, h.skipped
	}
	e.events.handed = handedOn{} // read: the log keeps no earlier log alive (a review)
	e.events.run = d.RunID
	if prev := m.threads[d.ThreadID]; prev != nil && prev.claimSawNot(d.DispatchID) {
		e.queueChanged = true
	}
	m.threads[d.ThreadID] = e
	delete(m.fgWaiting, d.ThreadID) // whichever dispatch of it starts: the thread is served
	m.byRun[d.RunID] = e
	m.logs[d.ThreadID] = e.events
	e.capSeen = m.capChanges
	if lapsed.unserved {
		e.unserved = lapsed.delay
	}
	if lapsed.corrupt {
		e.corruptDelay = lapsed.delay
	}
	if m.closing {
		// Stop began while this claim was in flight: do not start it; the
		// attempt releases the dispatch without spending an attempt.
		e.cancel(errShutdown)
	}
	m.mu.Unlock()
	go m.execute(e)
}

// finish releases an attempt's slot and wakes the dispatcher.
func (m *Mailbox) finish(e *execution) {
	e.cancel(nil)
	m.arrived(e.dispatch.ThreadID) // an attempt that never reached the executor
	m.closeSettledStream(e)
	if !e.handOn || e.sawFinish.Load() || !m.handOnLog(e) {
		e.events.Close(m.cfg.Now())
		m.retainClosed(e.events)
	}
	next := e.next
	m.mu.Lock()
	if m.threads[e.dispatch.ThreadID] == e {
		if next != nil {
			m.threads[e.dispatch.ThreadID] = &execution{claiming: true} // until next starts
		} else {
			delete(m.threads, e.dispatch.ThreadID)
		}
	}
	if m.byRun[e.dispatch.RunID] == e {
		delete(m.byRun, e.dispatch.RunID)
	}
	if next == nil {
		m.inFlight--
		m.signalIdleLocked()
	}
	closing := m.closing
	m.mu.Unlock()
	close(e.done)
	if next != nil {
		// Claimed with the completion: it takes over this attempt's slot
		// (startExecution cancels it unspent if Stop began meanwhile).
		m.startExecution(*next, e.nextStarted, claimHold{})
		return
	}
	// The thread's next dispatch is claimed here, without a scan of every
	// ready thread, unless other threads may be waiting for a slot, or the
	// attempt was interrupted: then a foreground submit is about to claim
	// the thread inline, and the slot is left free for it.
	interrupted := errors.Is(context.Cause(e.ctx), errInterrupted)
	if !closing && !interrupted && !e.setAside && !m.starved.Load() && m.followOnFor(e.agentID) && m.tryDispatch(context.Background(), e.dispatch.ThreadID) == attemptClaimed {
		return
	}
	m.kick()
}

// handOnLog keeps the event log of an attempt no agent took open for the
// run's next attempt here (startExecution takes it from m.pending), to be
// numbered by that attempt. It reports false, and the log is closed,
// when it cannot be: events were appended to it, or the dispatch has a
// waiting log already. A dispatch that does not run here again (settled
// or claimed elsewhere) has its log closed by GC, as a queued foreground
// run's.
func (m *Mailbox) handOnLog(e *execution) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.pending[e.dispatch.DispatchID]; ok || !e.events.unnumber() {
		return false
	}
	m.pending[e.dispatch.DispatchID] = e.events
	e.events.waitFrom = e.dispatch.AttemptCount
	// The attempt that numbers the log tells a reader of the attempt
	// before this one to go on without a reset as this one would have:
	// this one's recorded start, if any, is no attempt the reader missed
	// (found by review: it got a reset).
	h := handedOn{from: e.prevLog, skipped: e.prevSkipped}
	if e.started || e.preStarted {
		h.skipped++
	}
	e.events.handed = h
	return true
}

// recordStart records the attempt's start unless its claim already did.
// Only then does the attempt's instance id become known to a cancel
// (settleCancel): a cancel settling the claim before the start records
// no instance, and the run keeps the one it has, instead of naming an
// attempt that never started.
func (m *Mailbox) recordStart(ctx context.Context, e *execution, instance string, now int64) error {
	if !e.preStarted {
		if err := m.store.RecordDispatchStart(ctx, e.dispatch.DispatchID, e.dispatch.ClaimToken, instance, now); err != nil {
			return err
		}
		e.instance.Store(&instance)
	}
	e.started = true
	return nil
}

// runsOn reports whether an attempt (not only a claim) runs on thread.
func (m *Mailbox) runsOn(thread string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.threads[thread]
	return e != nil && !e.claiming
}

// signalIdleLocked wakes Stop once no attempt is claimed or executing.
func (m *Mailbox) signalIdleLocked() {
	if m.closing && m.inFlight == 0 && m.idle != nil && !m.idleClosed {
		close(m.idle)
		m.idleClosed = true
	}
}

// runSink feeds a run's events into its EventLog and tracks suspension.
type runSink struct{ e *execution }

func (s runSink) Emit(data []byte) { s.emit(data, true) }

// EmitQuiet implements QuietSink.
func (s runSink) EmitQuiet(data []byte) { s.emit(data, false) }

// WakeReaders implements QuietSink.
func (s runSink) WakeReaders() { s.e.events.WakeReaders() }

func (s runSink) emit(data []byte, wake bool) { s.emitTyped(eventType(data), data, wake) }

// emitTyped is emit with the event's type already read.
func (s runSink) emitTyped(typ string, data []byte, wake bool) {
	switch suspensionChange(typ, data) {
	case 1:
		s.e.suspended.Add(1)
	case -1:
		if s.e.suspended.Add(-1) < 0 {
			s.e.suspended.Store(0)
		}
	}
	if typ == "run_finish" {
		s.e.sawFinish.Store(true)
	}
	s.e.events.appendWaking(typ, data, wake)
}

// agentSink is the sink the executor gets: runSink, except that the
// agent's run_finish is held back (execution.heldFinish) until the
// attempt's outcome is known, and passed on only if it completed. An
// attempt that fails is retried (transient), dead-lettered (permanent) or
// put back in the queue (shutdown, no agent): its clients get the
// sidecar's run_finish saying so (retry_at for a retry) instead of the
// agent's, which may say it ended well. They were told "cancelled" (a
// shutdown, a lost lease) or natural_end (the connection lost before
// FINISH) while the run then ran again (found by review).
type agentSink struct{ runSink }

func (s agentSink) Emit(data []byte) { s.emitAgent(data, true) }

// EmitQuiet implements QuietSink.
func (s agentSink) EmitQuiet(data []byte) { s.emitAgent(data, false) }

func (s agentSink) emitAgent(data []byte, wake bool) {
	if s.e.heldFinish.Load() != nil {
		// run_finish is the attempt's last event (docs/protocol.md): one
		// sent after it would reach clients before it, since it is held
		// until the outcome is known (found by review).
		s.e.afterFinish.Add(1)
		return
	}
	typ := eventType(data)
	if typ == "run_finish" {
		b := bytes.Clone(data) // the sink keeps no data after Emit returns
		s.e.heldFinish.Store(&b)
		return
	}
	s.emitTyped(typ, data, wake)
}

// execute is one attempt, from the pre-flight checks to the settled
// dispatch (engine.md §8).
func (m *Mailbox) execute(e *execution) {
	defer m.finish(e)
	ctx := context.Background() // store calls outlive a cancelled run: they settle it
	d := &e.dispatch
	log := &attemptLog{base: m.log, d: d}

	// No separate pre-flight read: RecordDispatchStart below refuses a
	// dispatch that is no longer ours (stale token) or whose epoch fell
	// behind (then it supersedes it and settles its run in the same
	// commit), and the agent is never reached for such a dispatch.
	instance := newID()
	if e.preStarted {
		instance = d.InstanceID // e.instance has it since startExecution
	}
	if errors.Is(context.Cause(e.ctx), errShutdown) {
		m.settle(ctx, e, RunOutcome{Kind: OutcomeAbandoned, Error: errShutdown.Error()}, instance, log)
		return
	}
	req, run, err := m.reconstruct(ctx, d)
	if run != nil {
		e.starts = startsOf(run) // this attempt's start included if its claim recorded it
		e.countKnown = true
	}
	if err == nil && run.Status == RunDone {
		// A previous attempt finished the run but crashed before its ack
		// (lessons.md B5): consume the delivery, do not run it twice.
		log.Info("run already done; acking its dispatch")
		// The stream closes with how the run really ended, as the attempt
		// that finished it would have closed it.
		m.emitFinishSession(e, run.SessionID, doneRunTermination(run))
		if err := m.store.Ack(ctx, d.DispatchID, d.ClaimToken, m.cfg.Now()); err != nil {
			log.Warn("ack of a finished run failed", "err", err)
		}
		return
	}
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			// Its records went bad on the disk: no attempt of it can run
			// until they are mended, so none is spent; the thread is set
			// aside, and the others run on (found by review: each attempt
			// failed at once as transient, and the run was dead-lettered
			// within a second).
			log.Error("the run's records do not decode: its thread is set aside, no attempt spent (mailbox-sidecar verify lists the damage; repair mends it)", "err", err)
			m.settle(ctx, e, RunOutcome{Kind: OutcomeAbandoned, ErrorCode: codeRecordsCorrupt, Error: err.Error()}, instance, log)
			return
		}
		if !errors.Is(err, ErrValidation) {
			// The store failed, not the request: try again later.
			log.Warn("reconstruct run request failed", "err", err)
			m.settle(ctx, e, RunOutcome{Kind: OutcomeTransient, Error: err.Error()}, instance, log)
			return
		}
		log.Error("run request cannot be rebuilt", "err", err)
		if err := m.recordStart(ctx, e, instance, m.cfg.Now()); err != nil {
			log.Info("dispatch not started", "err", err)
			return
		}
		m.settle(ctx, e, RunOutcome{Kind: OutcomePermanent, ErrorCode: "invalid_activation", Error: err.Error()}, instance, log)
		return
	}
	req.SessionID = instance
	startAt := m.cfg.Now()
	if e.preStarted {
		startAt = d.UpdatedAt
	}
	// The dispatch's first attempt: none spent, none started before (an
	// attempt put back without spending one recorded its instance).
	first := d.AttemptCount == 0 && (d.InstanceID == "" || e.preStarted && d.InstanceID == instance)
	if err := m.recordStart(ctx, e, instance, startAt); err != nil {
		// Superseded, or no longer ours: the store has settled it.
		log.Info("dispatch not started", "err", err)
		return // finish closes the stream with a run_finish if it was settled
	}
	if !e.preStarted {
		e.starts++ // counted by the start just recorded
	}
	if m.stoppedBeforeRun(ctx, e, instance, log) {
		return
	}
	m.numberEvents(e, true)
	ms := func(v int64) time.Duration { return time.Duration(v) * time.Millisecond }
	if first {
		// The queue's latency: a retry's start, from the same creation,
		// would count its earlier attempts and backoff, a put-back's its
		// earlier attempt (found by review); eligible_to_start covers
		// them, from when they fell due.
		m.metrics.seconds(metricEnqToStart, ms(startAt-d.CreatedAt))
	}
	m.metrics.seconds(metricEligStart, ms(startAt-d.AvailableAt))
	// Measured here, not from the claim's millisecond timestamp: under a
	// millisecond, every sample read 0 (found by review).
	m.metrics.seconds(metricClaimStart, time.Since(e.claimedAt))
	e.startedAt = startAt
	e.agentID = req.AgentID
	req.Commands = e.commands
	req.Checkpoint = func(cctx context.Context, c RunCheckpoint) error {
		return m.agentCheckpoint(cctx, d.ThreadID, d.RunID, c)
	}
	req.SlotTaken = func() { m.arrived(d.ThreadID) }

	stopRenew := make(chan struct{})
	renewDone := make(chan struct{})
	go func() {
		defer close(renewDone)
		m.renewLease(e, stopRenew, log)
	}()
	outcome := m.exec.Run(e.ctx, req, agentSink{runSink{e}})
	close(stopRenew)
	<-renewDone
	m.arrived(d.ThreadID) // when no slot was taken

	switch cause := context.Cause(e.ctx); {
	case errors.Is(cause, errShutdown) && (outcome.Kind != OutcomeCompleted || outcome.Termination != nil && outcome.Termination.Type == TermCancelled):
		// Shutdown cut the attempt short (the agent obeyed the cancel or
		// failed): the run goes back to the queue without spending an
		// attempt. A run that completed on its own is acked.
		outcome = RunOutcome{Kind: OutcomeAbandoned, Error: cause.Error()}
	case errors.Is(cause, errLeaseLost) && (outcome.Kind != OutcomeCompleted || outcome.Termination != nil && outcome.Termination.Type == TermCancelled):
		// The claim lapsed or was taken (the sidecar paused, the store
		// stalled): not the user's cancel. The attempt failed and the run
		// is retried, as a sweep's reclaim would (an attempt spent); a
		// nack the reclaim beat is refused.
		outcome = RunOutcome{Kind: OutcomeTransient, ErrorCode: "lease_lost", Error: cause.Error()}
	case outcome.Kind == OutcomeCompleted:
	case errors.Is(cause, errCancelled):
		// The user cancelled it: whatever the agent reports, it is not
		// retried.
		outcome = RunOutcome{Kind: OutcomeCompleted, Status: RunDone, Termination: &Termination{Type: TermCancelled}}
	}
	if n := e.afterFinish.Load(); n > 0 {
		log.Warn("agent events after its run_finish dropped: run_finish must be the last event", "events", n)
	}
	if held := e.heldFinish.Swap(nil); held != nil && (outcome.Kind == OutcomeCompleted || errors.Is(context.Cause(e.ctx), errInterrupted)) {
		// It completed on its own, or an interrupt superseded it (it is
		// not retried, whatever the agent reports): the agent's word
		// stands (found by review: an interrupted run that then failed
		// was told its retry was coming).
		runSink{e}.Emit(*held)
	}
	m.settle(ctx, e, outcome, instance, log)
}

// stoppedBeforeRun ends an attempt that may not be given to the agent
// after all: its context ended after the claim (a user's cancel, which
// acked the dispatch already; an interrupt; shutdown), or — for a start
// recorded in the claim's own commit (StartClaimer, IdleSubmitter) — the
// pre-flight of engine.md §8 finds the claim no longer ours or its epoch
// behind the thread's. On the two-step path RecordDispatchStart refuses
// such a dispatch; a start made in the claiming commit was checked by
// nothing since, and an interrupt may have committed after it (a
// foreground submit during a hand-over, say) with the cancel of this
// attempt still on its way. The runtime is never entered for a stale
// dispatch, nor counted as started. It reports whether the attempt ended.
func (m *Mailbox) stoppedBeforeRun(ctx context.Context, e *execution, instance string, log *attemptLog) bool {
	cause := context.Cause(e.ctx)
	d := &e.dispatch
	switch {
	case errors.Is(cause, errShutdown):
		m.settle(ctx, e, RunOutcome{Kind: OutcomeAbandoned, Error: cause.Error()}, instance, log)
		return true
	case e.cancelSettled.Load():
		// The cancel acked the dispatch and settled its run; finish
		// closes the stream with the store's outcome.
		log.Info("dispatch cancelled before its run started")
		return true
	case cause == nil && !e.preStarted:
		return false // RecordDispatchStart made the checks
	case cause == nil:
		cur, err := m.store.LoadDispatch(ctx, d.DispatchID)
		if err != nil {
			// As an error reading the epoch (engine.md §8): the dispatch
			// stays claimed until its lease expires.
			log.Warn("pre-flight read of the dispatch failed", "err", err)
			return true
		}
		if cur == nil || cur.CheckOwner(d.ClaimToken) != nil {
			log.Info("dispatch settled before its run started")
			return true // finish closes the stream with the store's outcome
		}
		ep, err := m.store.CurrentEpoch(ctx, d.ThreadID)
		if err != nil {
			log.Warn("pre-flight read of the thread's epoch failed", "err", err)
			return true
		}
		if cur.Epoch >= ep {
			return false
		}
	}
	// Interrupted: the release finds the epoch stale, supersedes the
	// dispatch and settles its run as cancelled (as the start would have);
	// finish closes the stream. A claim already settled needs nothing.
	log.Info("dispatch interrupted before its run started", "cause", cause)
	if _, err := m.store.Release(ctx, d.DispatchID, d.ClaimToken, m.cfg.Now()); err != nil && !errors.Is(err, ErrVersionConflict) {
		log.Warn("release of a dispatch stopped before its run failed", "err", err)
	}
	return true
}

// attemptLog is an attempt's logger with its thread, run, dispatch and
// attempt attached, made on first use: most attempts log nothing, and
// attaching the attributes costs more than that.
type attemptLog struct {
	base *slog.Logger
	d    *Dispatch
	once sync.Once
	l    *slog.Logger
}

func (a *attemptLog) logger() *slog.Logger {
	a.once.Do(func() {
		a.l = a.base.With("thread_id", a.d.ThreadID, "run_id", a.d.RunID, "dispatch_id", a.d.DispatchID, "attempt", a.d.AttemptCount+1)
	})
	return a.l
}

func (a *attemptLog) Info(msg string, args ...any)  { a.logger().Info(msg, args...) }
func (a *attemptLog) Warn(msg string, args ...any)  { a.logger().Warn(msg, args...) }
func (a *attemptLog) Error(msg string, args ...any) { a.logger().Error(msg, args...) }
func (a *attemptLog) Debug(msg string, args ...any) { a.logger().Debug(msg, args...) }

// observeEnd counts an ended attempt by its outcome label and records
// its waits: from the dispatch's creation, and from its start (0 for an
// attempt that never started).
func (m *Mailbox) observeEnd(e *execution, now int64, label string) {
	m.metrics.count(metricRuns, "outcome", label).Inc()
	m.metrics.seconds(metricEnqToDone, time.Duration(now-e.dispatch.CreatedAt)*time.Millisecond, "outcome", label)
	runtime := time.Duration(0)
	if e.startedAt > 0 {
		runtime = time.Duration(now-e.startedAt) * time.Millisecond
	}
	m.metrics.seconds(metricRuntime, runtime, "outcome", label)
	m.metrics.seconds(metricRunSeconds, runtime, "outcome", label)
}

// settle records an attempt's outcome and settles its dispatch: ack,
// nack with backoff, dead letter, or release.
func (m *Mailbox) settle(ctx context.Context, e *execution, o RunOutcome, instance string, log interface {
	Warn(string, ...any)
	Info(string, ...any)
	Debug(string, ...any)
}) {
	d := &e.dispatch
	if e.cancelSettled.Load() {
		// A user's cancel settled the dispatch already (Mailbox.Cancel).
		// Counted as cancelled, not completed (found by review). Its
		// agent-shutdown count, if any, goes with it.
		m.countAgentShutdowns(d.DispatchID, RunOutcome{Kind: OutcomeCompleted})
		m.observeEnd(e, m.cfg.Now(), outcomeCancelled)
		m.emitFinishWith(e, &Termination{Type: TermCancelled})
		return
	}
	// An agent's error text is cut as the dispatch's copy is: the run's
	// record took it whole, and a store refused a record over its limit
	// (NATS's max_payload), so that a permanent failure's dead letter was
	// never written and the run executed again after its lease (found by
	// review).
	o.Error = truncateError(o.Error)
	o = m.countAgentShutdowns(d.DispatchID, o)
	e.errorCode = o.ErrorCode
	now := m.cfg.Now()
	label := o.MetricLabel()
	if errors.Is(context.Cause(e.ctx), errInterrupted) {
		// An interrupt ended it, whatever the agent (or the hub, for a run
		// no agent took yet) reported: counted as a transient failure or
		// as put back, it hid interrupts (found by review).
		label = outcomeCancelled
	}
	m.observeEnd(e, now, label)
	switch o.Kind {
	case OutcomeCompleted:
		status := o.Status
		if status != RunWaiting {
			status = RunDone
		}
		res := RunResult{RunID: d.RunID, InstanceID: instance, Status: status, Termination: o.Termination, Response: o.Response, Waiting: o.Waiting}
		if o.Termination != nil && o.Termination.Type == TermError {
			res.Error = o.Error
		}
		// Streams always close with a run_finish (ipc.md): the agent's,
		// or one made from its outcome.
		term := o.Termination
		if term == nil {
			term = &Termination{Type: TermNaturalEnd}
			if status == RunWaiting {
				term = &Termination{Type: TermSuspended}
			}
		}
		m.emitFinishWith(e, term)
		// The result, the run's outcome and the ack commit together. If
		// that cannot be written the dispatch stays claimed, its lease
		// lapses and the retry finds the run as it was.
		err := m.completeRecorded(ctx, e, res, now, log)
		switch {
		case err == nil:
		case errors.Is(err, ErrVersionConflict) || errors.Is(err, ErrNotFound):
			// A cancel or an interrupt settled the dispatch first: the
			// expected end of every interrupted run, at debug (found by
			// review: an info line with err= at each interrupt).
			log.Debug("complete refused: the dispatch was settled meanwhile", "err", err)
		case errors.Is(err, ErrTooLarge):
			// Too large even with its response cut: its termination or
			// its waiting state (a suspended run's tickets), which every
			// attempt would make again. Left to its lease, the run
			// executed again at every attempt before it was
			// dead-lettered; it is dead-lettered now, once, saying why.
			m.deadLetterTooLarge(ctx, e, err, now, log)
		default:
			log.Warn("complete failed; the attempt will be retried after its lease", "err", err)
		}
	case OutcomeTransient:
		msg := o.Error
		if msg == "" {
			msg = o.Kind.String()
		}
		// The run stays open for the retry; a nack that spends the last
		// attempt dead-letters the dispatch and errors the run in the same
		// commit. The run_finish of an attempt that is retried says when
		// (retry_at): its client re-attaches to follow the retry (Attach).
		delay := RetryDelayMs(d.AttemptCount, m.cfg.RetryDelay.Milliseconds(), m.cfg.MaxRetryDelay.Milliseconds())
		term := ErrorTermination(msg)
		if cause := context.Cause(e.ctx); d.AttemptCount+1 < d.MaxAttempts && (cause == nil || errors.Is(cause, errLeaseLost)) {
			// Retried: not when an interrupt or a user's cancel ended the
			// attempt (their dispatch is settled; the nack is refused).
			m.emitFinishRetry(e, term, now+delay)
		} else {
			m.emitFinishWith(e, term)
		}
		// Every failure is logged with the attempt's ids (found by review:
		// an operator with a third-party agent saw none in the sidecar's
		// log, dead letters included).
		if nd, err := m.store.Nack(ctx, d.DispatchID, d.ClaimToken, now+delay, msg, now); err != nil {
			log.Warn("nack failed", "err", err)
		} else if nd.Status == StatusDeadLetter {
			m.metrics.count(metricDeadLetter, "cause", deadLetterAttempts).Inc()
			log.Warn("run failed and its attempts are spent: dead-lettered", "code", o.ErrorCode, "error", msg)
		} else if nd.Status == StatusQueued {
			log.Info("run failed; retried", "code", o.ErrorCode, "error", msg, "retry_in", time.Duration(delay)*time.Millisecond)
		}
	case OutcomePermanent:
		msg := o.Error
		if msg == "" {
			msg = o.Kind.String()
		}
		m.emitFinish(e, msg)
		// One commit: the dead letter errors its run in the same commit
		// (a crash between a separate run result and the dead letter left
		// a done run whose retry was acked instead; found by the crash
		// harness).
		if err := m.store.DeadLetter(ctx, d.DispatchID, d.ClaimToken, msg, now); err != nil {
			log.Warn("dead letter failed", "err", err)
		} else {
			m.metrics.count(metricDeadLetter, "cause", deadLetterPermanent).Inc()
			log.Warn("run failed permanently: dead-lettered", "code", o.ErrorCode, "error", msg)
		}
	case OutcomeAbandoned:
		noAgent := o.ErrorCode == CodeAgentUnavailable || o.ErrorCode == CodeAgentBusy
		if noAgent && context.Cause(e.ctx) == nil {
			// No agent ever had the run, and it runs again here once one
			// has a slot: its clients' streams go on with that attempt
			// (finish hands the log on). An "interrupted" run_finish told a
			// client the run was over, and it then ran unseen (found by
			// review).
			e.handOn = true
		} else if cause := context.Cause(e.ctx); cause == nil || errors.Is(cause, errShutdown) {
			// Released without spending an attempt, by a shutdown here or
			// its agent's (agent_shutdown): the run goes on, after the
			// restart or on another agent, and its run_finish says so, as
			// a retried attempt's does (found by review: without retry_at
			// clients took it for a final failure). An interrupt or a
			// cancel (a cause) ends it.
			m.emitFinishRetry(e, ErrorTermination("run interrupted: "+o.Error), now)
		} else {
			m.emitFinish(e, "run interrupted: "+o.Error)
		}
		if o.ErrorCode == codeRecordsCorrupt {
			// Set aside before its claim is released, as below.
			m.mu.Lock()
			if !e.queueChanged {
				delay := claimHoldFirst
				if e.corruptDelay > 0 {
					delay = min(2*e.corruptDelay, claimHoldMax)
				}
				m.setHoldLocked(d.ThreadID, claimHold{until: now + delay.Milliseconds(), delay: delay, corrupt: true}, now)
				e.setAside = true // finish claims nothing of the thread now
			}
			m.mu.Unlock()
		}
		if noAgent {
			// No agent took it: the thread is set aside before its claim
			// is released, so that the dispatcher does not claim it again
			// at once, only to be refused again.
			m.mu.Lock()
			if !e.queueChanged {
				m.holdForAgentLocked(d.ThreadID, d.DispatchID, o.ErrorCode, e.agentID, e.capSeen, e.unserved, now)
			}
			warn, held := o.ErrorCode == CodeAgentUnavailable && m.unservedWarnLocked(e.agentID, now), len(m.held)
			m.mu.Unlock()
			if warn {
				log.Warn("no connected agent serves the run's agent id: its work waits in the queue for one",
					"agent_id", e.agentID, "held_threads", held)
			}
		}
		if _, err := m.store.Release(ctx, d.DispatchID, d.ClaimToken, now); err != nil {
			log.Warn("release failed", "err", err)
		} else if !noAgent {
			// The stop's summary counted these alone; an operator could not
			// tell which runs went back (found by review).
			log.Info("run put back in the queue without spending an attempt", "code", o.ErrorCode, "error", o.Error)
		}
	}
}

// maxAgentShutdownPutBacks is how many attempts in a row of one dispatch
// its agents may give up by shutting down (CodeAgentShutdown) and have it
// put back without spending an attempt; from the next on each spends
// one, with the retry's backoff. An agent that went away with every run
// it took (GOAWAY, FINISH shutdown, reconnect: a crash loop) had the run
// executed again at once, for ever, and nothing recorded it (found by
// review: forty attempts in 0.9 s, attempt_count 0).
const maxAgentShutdownPutBacks = 3

// countAgentShutdowns counts o against dispatch id's run of attempts its
// agents gave up by shutting down, and returns it, or a transient
// failure in its place once that run is longer than
// maxAgentShutdownPutBacks. Any other outcome ends the run.
func (m *Mailbox) countAgentShutdowns(id string, o RunOutcome) RunOutcome {
	shutdown := o.Kind == OutcomeAbandoned && o.ErrorCode == CodeAgentShutdown
	if !shutdown && m.agentShutdownsN.Load() == 0 {
		return o // the common case: no lock
	}
	m.mu.Lock()
	defer func() {
		m.agentShutdownsN.Store(int32(len(m.agentShutdowns)))
		m.mu.Unlock()
	}()
	if !shutdown {
		delete(m.agentShutdowns, id)
		return o
	}
	if m.agentShutdowns == nil || len(m.agentShutdowns) >= maxTrackedShutdowns {
		m.agentShutdowns = map[string]int{} // entries of dispatches settled elsewhere: dropped
	}
	n := m.agentShutdowns[id] + 1
	m.agentShutdowns[id] = n
	if n <= maxAgentShutdownPutBacks {
		return o
	}
	return RunOutcome{Kind: OutcomeTransient, ErrorCode: CodeAgentShutdown,
		Error: fmt.Sprintf("%s (its agent shut down with it %d times in a row: from the %dth on each spends an attempt)", o.Error, n, maxAgentShutdownPutBacks+1)}
}

// maxTrackedShutdowns bounds Mailbox.agentShutdowns.
const maxTrackedShutdowns = 10000

// completeRecorded completes the attempt with res (complete), again
// after a moment while the store is unavailable. A result the store
// refuses as too large is written again with its response cut
// (responseCuts): the run completed, and the refusal left its claim to
// lapse, so that it executed again at every attempt and was then
// dead-lettered (found by review: a 1.2 MB response on a NATS store whose
// server takes 1 MiB messages). Its clients saw the response whole, in
// the run's events.
func (m *Mailbox) completeRecorded(ctx context.Context, e *execution, res RunResult, now int64, log interface{ Warn(string, ...any) }) error {
	full, cuts := res.Response, 0
	for try := 0; ; {
		err := m.complete(ctx, e, res, now)
		switch {
		case errors.Is(err, ErrTooLarge) && cuts < len(responseCuts) && len(full) > responseCuts[cuts]:
			res.Response = cutResponse(full, responseCuts[cuts])
			cuts++
			log.Warn("run result too large for the store: its response is recorded cut", "response_bytes", len(full), "kept_bytes", len(res.Response), "err", err)
			continue
		case err == nil || !errors.Is(err, ErrUnavailable) || try == 2:
			return err
		}
		try++
		time.Sleep(time.Duration(try) * 50 * time.Millisecond)
	}
}

// deadLetterTooLarge dead-letters the attempt of e whose completed result
// the store refused as too large (err) after its response was cut.
func (m *Mailbox) deadLetterTooLarge(ctx context.Context, e *execution, err error, now int64, log interface{ Warn(string, ...any) }) {
	d := &e.dispatch
	msg := truncateError("run result too large for the store, even with its response cut: " + err.Error())
	if derr := m.store.DeadLetter(ctx, d.DispatchID, d.ClaimToken, msg, now); derr != nil {
		var conflict *ConflictError
		if errors.Is(derr, ErrStaleClaim) || errors.Is(derr, ErrNotFound) || errors.Is(derr, ErrVersionConflict) || errors.As(derr, &conflict) {
			// A cancel or an interrupt settled the dispatch first.
			log.Warn("complete refused as too large; the dispatch was settled meanwhile", "err", err, "dead_letter_err", derr)
			return
		}
		log.Warn("complete refused as too large, and its dead letter failed; the attempt will be retried after its lease", "err", err, "dead_letter_err", derr)
		return
	}
	m.metrics.count(metricDeadLetter, "cause", deadLetterPermanent).Inc()
	log.Warn("run result too large for the store: dead-lettered", "err", err)
}

// responseCuts are the sizes a completed run's response is cut to, in
// turn, while the store refuses its result as too large: a prefix, then
// the note alone.
var responseCuts = []int{64 << 10, 0}

// cutResponse is response cut to at most limit bytes (at a character
// boundary), with a note of the cut; with limit 0, the note alone.
func cutResponse(response string, limit int) string {
	note := fmt.Sprintf("[mailbox-sidecar: the response of %d bytes was cut, too large for the store]", len(response))
	n := max(limit-len(note)-1, 0)
	for n > 0 && !utf8.RuneStart(response[n]) {
		n--
	}
	if n == 0 {
		return note
	}
	return response[:n] + "\n" + note
}

// complete acknowledges a completed attempt. On a store that can
// (CompleteClaimer), the same commit claims the thread's next due dispatch
// into e.next, unless other threads wait for a slot (they go first), the
// agents' capacity shrank below the slots in use, or Stop began.
func (m *Mailbox) complete(ctx context.Context, e *execution, res RunResult, now int64) error {
	d := &e.dispatch
	cc, ok := m.raw.(CompleteClaimer)
	if !ok || !m.mayFollowOn() || !m.followOnFor(e.agentID) {
		return m.store.Complete(ctx, d.DispatchID, d.ClaimToken, res, now)
	}
	e.handoff.Store(true)
	sc, startToo := m.raw.(StartClaimer)
	instance := ""
	if startToo {
		instance = newID()
	}
	next, err := observe(m.metrics, "complete", func() (*Dispatch, error) {
		if startToo {
			return sc.CompleteAndClaimStart(ctx, d.DispatchID, d.ClaimToken, res, now, m.cfg.ConsumerID, m.cfg.Lease, instance)
		}
		return cc.CompleteAndClaim(ctx, d.DispatchID, d.ClaimToken, res, now, m.cfg.ConsumerID, m.cfg.Lease)
	}, nil) // counted as a complete; no next dispatch is not an empty result
	if err == nil && next != nil {
		e.next = next
		e.nextStarted = instance != "" && next.InstanceID == instance
		return nil
	}
	e.handoff.Store(false)
	var conflict *ConflictError
	if err == nil || !errors.Is(err, ErrNextClaim) && (errors.Is(err, ErrStaleClaim) || errors.Is(err, ErrNotFound) || errors.As(err, &conflict)) {
		if conflict != nil {
			m.putBack("") // superseded: the thread's queued work is back (heldprefix.go)
		}
		return err // Complete's own answer
	}
	// The claim half failed (say, a damaged record of the next dispatch),
	// or the commit did: that must not cost this attempt its completion.
	m.log.Warn("complete with the next claim failed; completing alone", "dispatch_id", d.DispatchID, "err", err)
	return m.store.Complete(ctx, d.DispatchID, d.ClaimToken, res, now)
}

// mayFollowOn reports whether a finishing attempt may claim its thread's
// next dispatch into its own slot.
func (m *Mailbox) mayFollowOn() bool {
	if m.starved.Load() {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.closing && m.inFlight <= m.exec.Capacity()
}

// closeSettledStream ends the stream of an attempt that produced no
// run_finish (none from the agent, none synthetic) when its dispatch is
// settled for good: superseded or cancelled before its start, or found
// done by an earlier attempt. A client following it would otherwise see
// the stream end without one. A dispatch that runs again (released,
// reclaimed) is left alone: its next attempt goes on numbering the
// events, and a re-attached client follows it.
func (m *Mailbox) closeSettledStream(e *execution) {
	if e.sawFinish.Load() {
		return
	}
	cur, err := m.store.LoadDispatch(context.Background(), e.dispatch.DispatchID)
	if err != nil || cur != nil && !cur.Status.Terminal() {
		return
	}
	term := &Termination{Type: TermCancelled}
	if cur != nil && cur.Status == StatusAcked && cur.Termination != nil {
		term = cur.Termination
	}
	session := ""
	if cur != nil {
		session = cur.InstanceID // as the store recorded it for the run
	}
	m.emitFinishSession(e, session, term)
}

// doneRunTermination is the termination a done run's run_finish reports:
// the run record's, else natural_end (as a completion that reported none
// is closed).
func doneRunTermination(r *RunRecord) *Termination {
	if r.TerminationReason != nil {
		return r.TerminationReason
	}
	return &Termination{Type: TermNaturalEnd}
}

// emitFinish closes a client stream that the agent left open: a synthetic
// run_finish with an error termination, through the run's event log.
func (m *Mailbox) emitFinish(e *execution, msg string) {
	m.emitFinishWith(e, ErrorTermination(msg))
}

// emitFinishWith closes a client stream the agent left open with a
// synthetic run_finish carrying term and, once the attempt's start was
// recorded, its session id (the dispatch instance id the agent was given).
func (m *Mailbox) emitFinishWith(e *execution, term *Termination) {
	session := ""
	if e.started {
		session = e.instanceID()
	}
	m.emitFinishSession(e, session, term)
}

// emitFinishSession is emitFinishWith with the session id given.
func (m *Mailbox) emitFinishSession(e *execution, session string, term *Termination) {
	m.emitFinishAt(e, session, term, 0)
}

// emitFinishRetry is emitFinishWith for an attempt whose run is retried
// at retryAt (Unix ms): its run_finish says so (retry_at).
func (m *Mailbox) emitFinishRetry(e *execution, term *Termination, retryAt int64) {
	session := ""
	if e.started {
		session = e.instanceID()
	}
	m.emitFinishAt(e, session, term, retryAt)
}

// emitFinishAt writes the synthetic run_finish unless the agent sent one.
func (m *Mailbox) emitFinishAt(e *execution, session string, term *Termination, retryAt int64) {
	if e.sawFinish.Load() {
		return
	}
	m.numberEvents(e, false)
	runSink{e}.Emit(finishEvent(&e.dispatch, session, term, retryAt, e.errorCode))
}

// numberEvents fixes the ids of the attempt's events before its first
// one (README, "Event ids"): from the run's start count when the agent is
// about to run it (reached), otherwise — its only event is the sidecar's
// run_finish — apart from every id a started attempt uses. Never below
// the ids of the run's earlier attempt held here. A reader at that
// attempt's last id goes on without a reset only when it was the run's
// previous attempt: no start of the run was recorded between the two (in
// another sidecar on a shared store, say), but those of attempts here no
// agent took (prevSkipped), as far as their start counts tell; when
// either is unknown, the reader gets a reset.
func (m *Mailbox) numberEvents(e *execution, reached bool) {
	if e.numbered {
		return
	}
	e.numbered = true
	base := unstartedBase(e.starts)
	if reached {
		base = attemptBase(e.starts)
	}
	own := reached || e.preStarted // e.starts counts this attempt's own start
	var last, prev uint64
	if p := e.prevLog; p != nil {
		last = p.LastSeq()
		if s, ok := p.startsAfter(); ok && e.countKnown && (own && s+e.prevSkipped+1 == e.starts || !own && s+e.prevSkipped == e.starts) {
			prev = last
		}
	}
	e.events.number(max(base, last+1), prev)
	if e.countKnown {
		e.events.noteStarts(e.starts)
	}
}

// finishEvent is the run_finish event the engine writes for d's run when
// no agent did. As the seed's (mailbox_run_identity), it names the thread,
// the run, the dispatch and the session (the dispatch instance id, as the
// run record holds it); session "" (no attempt of it started) is left out.
func finishEvent(d *Dispatch, session string, term *Termination, retryAt int64, errorCode string) []byte {
	ev := map[string]any{
		"type": "run_finish", "thread_id": d.ThreadID, "run_id": d.RunID,
		"dispatch_id": d.DispatchID, "termination": term,
	}
	if errorCode != "" {
		// The failure's code (FINISH's error.code, or the sidecar's:
		// agent_lost, run_too_large …): the message alone did not tell
		// agent_not_found from inference_failed (found by review).
		ev["error_code"] = errorCode
	}
	if session != "" {
		ev["session_id"] = session
	}
	if retryAt > 0 {
		ev["retry_at"] = retryAt
	}
	b, _ := json.Marshal(ev)
	return b
}

// renewLease keeps an attempt's claim alive until stop. A lost lease
// cancels the run; a failing renewal is retried until the lease is about
// to lapse, then the run is cancelled too (engine.md §15 hazard 69).
func (m *Mailbox) renewLease(e *execution, stop <-chan struct{}, log interface{ Warn(string, ...any) }) {
	t := time.NewTicker(m.cfg.RenewInterval)
	defer t.Stop()
	leaseUntil := e.dispatch.LeaseUntil
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		lease := m.cfg.Lease
		if e.suspended.Load() > 0 {
			lease = m.cfg.SuspendedLease
		}
		now := m.cfg.Now()
		ok, err := m.store.ExtendLease(context.Background(), e.dispatch.DispatchID, e.dispatch.ClaimToken, lease, now)
		switch {
		case err != nil:
			m.metrics.count(metricRenewals, "result", "error").Inc()
			if leaseUntil-now <= m.cfg.RenewInterval.Milliseconds() {
				log.Warn("lease renewal keeps failing and the lease is about to lapse; cancelling the run", "err", err)
				e.cancel(errLeaseLost)
				return
			}
			log.Warn("lease renewal failed; retrying", "err", err)
		case !ok && (e.cancelSettled.Load() || errors.Is(context.Cause(e.ctx), errInterrupted) || errors.Is(context.Cause(e.ctx), errCancelled)):
			// A user's cancel or an interrupt settled the claim while the
			// agent was still stopping (errCancelled follows a settled
			// cancel, or a cancel that found the claim superseded by an
			// interrupt, here or routed from another sidecar): nothing to
			// renew, nothing lost
			// (found by review: counted and logged as a lost lease, an
			// alert's false positive at every slow stop).
			return
		case !ok:
			m.metrics.count(metricRenewals, "result", "lost").Inc()
			log.Warn("lease lost; cancelling the run")
			e.cancel(errLeaseLost)
			return
		default:
			m.metrics.count(metricRenewals, "result", "ok").Inc()
			leaseUntil = now + lease.Milliseconds()
		}
	}
}

// updateRun applies change to a run record in a guarded checkpoint that
// appends nothing (lessons.md B1: no blind whole-list writes). change
// returns false to skip the write; it may be called more than once, each
// time on a fresh read.
func (m *Mailbox) updateRun(ctx context.Context, thread, runID string, change func(*RunRecord) bool) error {
	unlock := m.locks.lock(thread)
	defer unlock()
	load := func() (*RunRecord, error) {
		r, err := m.store.LoadRun(ctx, runID)
		if err == nil && r == nil {
			err = fmt.Errorf("run %s: %w", runID, ErrNotFound)
		}
		return r, err
	}
	// Most calls change nothing (the store settled the run in the
	// dispatch's own commit): the run alone is read first, and the
	// count the write needs only when it will write; a read fewer per
	// terminal dispatch at a start's reconciliation, a round trip on a
	// shared store (found by measuring a restart on NATS).
	r, err := load()
	if err != nil || !change(r) {
		return err
	}
	for attempt := 0; ; attempt++ {
		count, err := m.store.MessageCount(ctx, thread)
		if err != nil {
			return err
		}
		r, err := load()
		if err != nil {
			return err
		}
		if !change(r) {
			return nil
		}
		r.UpdatedAt = m.cfg.Now() / 1000
		_, err = m.store.Checkpoint(ctx, Checkpoint{ThreadID: thread, ExpectedCount: count, Run: r})
		var conflict *ConflictError
		if errors.As(err, &conflict) && attempt < maxAppendRetries {
			continue
		}
		return err
	}
}

// agentCheckpoint persists an agent's CHECKPOINT: messages appended to
// the thread log (guarded) and the run fields an agent may write.
func (m *Mailbox) agentCheckpoint(ctx context.Context, thread, runID string, c RunCheckpoint) error {
	if c.Run != nil && c.Run.Status != "" && c.Run.Status != RunRunning && c.Run.Status != RunWaiting {
		return Validationf("checkpoint of run %s: an agent may set status running or waiting, not %q", runID, c.Run.Status)
	}
	if c.Run != nil {
		for _, f := range []struct {
			name string
			v    *int64
		}{{"steps", c.Run.Steps}, {"input_tokens", c.Run.InputTokens}, {"output_tokens", c.Run.OutputTokens}} {
			if f.v != nil && *f.v < 0 {
				return Validationf("checkpoint of run %s: %s %d is negative", runID, f.name, *f.v)
			}
		}
	}
	msgs, minted := mintMessageIDs(c.Messages)
	for i := range msgs {
		if err := msgs[i].Validate(); err != nil {
			return err
		}
	}
	unlock := m.locks.lock(thread)
	defer unlock()
	for attempt := 0; ; attempt++ {
		count, err := m.store.MessageCount(ctx, thread)
		if err != nil {
			return err
		}
		r, err := m.store.LoadRun(ctx, runID)
		if err != nil {
			return err
		}
		if r == nil {
			return fmt.Errorf("run %s: %w", runID, ErrNotFound)
		}
		if p := c.Run; p != nil {
			if p.Status != "" {
				r.Status = p.Status
			}
			if p.Waiting != nil || p.Status == RunRunning {
				r.Waiting = p.Waiting
			}
			if p.State != nil {
				r.State = p.State
			}
			if p.Output != nil {
				r.Output = p.Output
			}
			if p.Steps != nil {
				r.Steps = *p.Steps
			}
			if p.InputTokens != nil {
				r.InputTokens = *p.InputTokens
			}
			if p.OutputTokens != nil {
				r.OutputTokens = *p.OutputTokens
			}
		}
		// Every checkpoint, messages only too, writes the run: its
		// updated_at keeps the running run the thread's latest (latest_run
		// goes by updated_at; live messages and prepare follow it), as the
		// seed's runtime checkpoints do.
		r.UpdatedAt = m.cfg.Now() / 1000
		_, err = m.store.Checkpoint(ctx, Checkpoint{ThreadID: thread, ExpectedCount: count, Messages: msgs, ProducedByRunID: runID, CreatedAt: m.cfg.Now(), Run: r, Minted: Minted{MessageIDs: minted}})
		var conflict *ConflictError
		if errors.As(err, &conflict) && attempt < maxAppendRetries {
			continue
		}
		return err
	}
}
