package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ErrShuttingDown is returned to new submits once Stop has begun.
var ErrShuttingDown = fmt.Errorf("mailbox is shutting down: %w", ErrUnavailable)

// ConflictActiveRun is the exact text of the error a foreground submit
// returns when the thread's active run could not be released.
const ConflictActiveRun = "thread has an active run; cannot claim inline"

// errActiveRun is that conflict as an error (a version conflict).
var errActiveRun = fmt.Errorf("%w: %s", ErrVersionConflict, ConflictActiveRun)

// Causes with which the engine cancels a running attempt.
var (
	errCancelled   = errors.New("run cancelled")
	errInterrupted = errors.New("run interrupted by a newer submit")
	errLeaseLost   = errors.New("dispatch lease lost")
	errShutdown    = errors.New("sidecar shutting down")
)

// SubmitStatus says whether a submitted run started at once or waits.
type SubmitStatus string

// Submit statuses.
const (
	SubmitRunning SubmitStatus = "running"
	SubmitQueued  SubmitStatus = "queued"
	// SubmitCancelled: a foreground submit taken (its messages logged,
	// its run and dispatch made) that a concurrent foreground submit to
	// the thread superseded before it started; its stream ends with
	// run_finish cancelled.
	SubmitCancelled SubmitStatus = "cancelled"
)

// SubmitResult identifies a submitted run.
type SubmitResult struct {
	DispatchID string       `json:"dispatch_id"`
	RunID      string       `json:"run_id"`
	ThreadID   string       `json:"thread_id"`
	Status     SubmitStatus `json:"status"`
}

// Mailbox is the mailbox service: it turns submits into durable runs,
// claims them when an agent slot is free, executes them through the
// Executor, settles their dispatches, and carries live commands to the
// run that is executing.
//
// Locks: mu guards the maps and counters below it; it is never held
// across store or executor calls. Per-thread request preparation is
// serialised by locks (a striped mutex), taken before mu when both are
// needed.
type Mailbox struct {
	cfg   Config
	store Store // instrumented: every call is timed and counted
	raw   Store // the store as given (optional interfaces: LiveRouter, SignalSource)
	exec  Executor
	slots SlotCounter // exec, when it counts free slots by agent id (nil otherwise)
	log   *slog.Logger
	locks *threadLocks
	// keyLocks serialise live-then-queue and foreground submits that carry a dedupe key,
	// per (thread, key), taken before locks: a repeat sees what the first
	// left (SendMessages).
	keyLocks *threadLocks
	metrics  *engineMetrics

	mu      sync.Mutex
	threads map[string]*execution // thread → its attempt executing here (or being claimed: exec.claiming)
	// capChanges counts the executor's CapacityChanged signals the
	// dispatcher took (agents came or went; claimhold.go).
	capChanges uint64
	byRun      map[string]*execution
	inFlight   int // attempts claimed or executing here (capacity accounting)
	// probes counts the slots tryDispatch holds while its claim is in
	// flight (most find nothing and give the slot back); probeDone is
	// broadcast (on mu) when one ends.
	probes    int
	probeDone *sync.Cond
	logs      map[string]*EventLog // thread → event log of its current or last run (re-attachment)
	pending   map[string]*EventLog // dispatch id → event log made by a foreground submit before the run starts
	// fgWaiting: threads whose foreground submit waits for an agent slot
	// (thread → when it began waiting, ms). The dispatcher serves them
	// before the threads the ready index lists (foreground.go).
	fgWaiting map[string]fgWait
	unwritten map[string]struct{} // pending logs whose dispatch is not written yet (GC leaves them alone)
	started   bool
	closing   bool
	startMu   sync.Mutex // serialises Start: one recovery at a time

	wake chan struct{} // wakes the dispatcher; buffered, coalesced
	// starved: the dispatcher's last look found (or may have found) more
	// due threads than free agent slots. While it is set a finished
	// attempt hands its slot to the dispatcher (oldest waiting thread
	// first); otherwise it claims its own thread's next dispatch at once.
	starved     starvedMark
	loopStop    context.CancelFunc
	loops       sync.WaitGroup // dispatcher and maintenance loops
	watch       loopWatches    // what each loop is busy with, for Alive
	idle        chan struct{}  // made by Stop; closed once inFlight is 0 after Stop began (guarded by mu)
	idleClosed  bool
	reconcileMu sync.Mutex           // serialises reconciliation; guards termAfter
	termAfter   TerminalCursor       // reconciliation high-water mark
	tails       *tailCache           // newest messages of recent threads (nil: off)
	held        map[string]claimHold // threads whose claims failed, set aside (claimhold.go; guarded by mu)
	// agentShutdowns counts, per dispatch, the attempts in a row its
	// agents gave up by shutting down (countAgentShutdowns; guarded by mu).
	agentShutdowns  map[string]int
	agentShutdownsN atomic.Int32 // len(agentShutdowns), read without mu
	// closedSince is the bytes of event logs closed since the last
	// trimRetained (EventRetentionBytes).
	closedSince atomic.Int64
	// live bounds the event bytes of the open logs (EventBufferTotalBytes).
	live LiveBudget
	// reclaimWarnAt is when a failed reclaim was last logged (Unix ms).
	reclaimWarnAt atomic.Int64
	// prefixGen counts what may make a thread before the end of prefix
	// (the held head of the ready order) claimable: a hold ended or
	// shortened before it lapsed, work put back at its old place.
	// holdCount is the last walk of held (guarded by mu; claimhold.go,
	// heldprefix.go).
	prefixGen uint64
	holdCount holdCount
	prefix    heldPrefix
	prefixIDs uint64 // the last heldPrefix.id given
	// unservedWarned is when a refusal for each agent id no agent served
	// was last logged (guarded by mu; unservedWarnLocked).
	unservedWarned map[string]int64
	// busyWaiting are the agent ids for which threads set aside for a
	// full agent waited after the dispatcher's last look (claimhold.go;
	// guarded by mu).
	busyWaiting    map[string]struct{}
	anyBusyWaiting atomic.Bool // busyWaiting is not empty
	// busyInTransit are the threads admitted from such a hold whose
	// attempt has not reached the executor yet (claimhold.go; guarded by
	// mu).
	busyInTransit map[string]transit
	inTransit     atomic.Int32 // len(busyInTransit), read without mu
}

// New builds a Mailbox over a store and an executor. Start recovers and
// starts it; Stop shuts it down.
func New(store Store, exec Executor, cfg Config) (*Mailbox, error) {
	if store == nil || exec == nil {
		return nil, Validationf("mailbox needs a store and an executor")
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	m := &Mailbox{
		cfg: cfg, raw: store, exec: exec, log: cfg.Logger, locks: newThreadLocks(), keyLocks: newThreadLocks(),
		threads: map[string]*execution{}, byRun: map[string]*execution{},
		logs: map[string]*EventLog{}, pending: map[string]*EventLog{}, fgWaiting: map[string]fgWait{},
		wake: make(chan struct{}, 1), tails: newTailCache(cfg.ContextCacheBytes),
		live: LiveBudget{limit: cfg.EventBufferTotalBytes},
	}
	m.probeDone = sync.NewCond(&m.mu)
	m.slots, _ = exec.(SlotCounter)
	m.metrics = newEngineMetrics(func() (StatusCounts, error) {
		ctx, cancel := context.WithTimeout(context.Background(), depthTimeout)
		defer cancel()
		return store.CountByStatus(ctx)
	}, func() (float64, error) {
		// How long the thread first in the ready order has waited: since
		// its oldest queued work fell due, or its last run ended if that
		// is later (0: nothing waits). Held threads wait too.
		ctx, cancel := context.WithTimeout(context.Background(), depthTimeout)
		defer cancel()
		now := m.cfg.Now()
		first, _, err := store.ReadyThreads(ctx, now, ReadyEntry{}, 1)
		if err != nil || len(first) == 0 {
			return 0, err
		}
		return float64(max(now-first[0].Due, 0)) / 1000, nil
	}, func() float64 { return float64(m.runningCount()) })
	m.metrics.set.NewGauge(metricHeld, m.heldThreads)
	m.metrics.set.NewGauge(metricEventBufferBytes, func() float64 { return float64(m.live.Used()) })
	m.metrics.set.NewGauge(metricSuspendedRuns, func() float64 { return float64(m.suspendedCount()) })
	m.store = instrumentedStore{Store: store, em: m.metrics, tails: m.tails, keep: m.cfg.ContextMessages, putBack: m.putBack}
	return m, nil
}

// Config returns the effective configuration (defaults filled in).
func (m *Mailbox) Config() Config { return m.cfg }

func (m *Mailbox) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *Mailbox) accepting() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closing {
		return ErrShuttingDown
	}
	return nil
}

// admitQueued refuses a background submit while Config.MaxQueued
// dispatches are queued (ErrQueueFull), live-then-queue's fallback
// excepted: its messages are in the log already. A submit that repeats a
// caller's dispatch or run id hint gets what it would below the bound
// (ErrAlreadyExists), not a refusal to retry: a retry could never succeed.
func (m *Mailbox) admitQueued(ctx context.Context, req *SubmitRequest) error {
	if m.cfg.MaxQueued <= 0 || req.messagesLogged {
		return nil
	}
	q := m.metrics.counts().Get(StatusQueued)
	if q < m.cfg.MaxQueued {
		return nil
	}
	if req.DispatchIDHint != "" && !req.dispatchIDMinted {
		if d, err := m.store.LoadDispatch(ctx, req.DispatchIDHint); err != nil {
			return fmt.Errorf("submit to %s: %w", req.ThreadID, err)
		} else if d != nil {
			return fmt.Errorf("submit to %s: dispatch_id=%s: %w", req.ThreadID, req.DispatchIDHint, ErrAlreadyExists)
		}
	}
	if req.RunIDHint != "" {
		if r, err := m.store.LoadRun(ctx, req.RunIDHint); err != nil {
			return fmt.Errorf("submit to %s: %w", req.ThreadID, err)
		} else if r != nil {
			return fmt.Errorf("submit to %s: run_id=%s: %w", req.ThreadID, req.RunIDHint, ErrAlreadyExists)
		}
	}
	m.metrics.count(metricQueueFull).Inc()
	return fmt.Errorf("submit to %s: %w (%d dispatches queued, the bound is %d)", req.ThreadID, ErrQueueFull, q, m.cfg.MaxQueued)
}

// SubmitBackground queues a run (seed submit_background): the run record
// and its dispatch are durable when it returns; the run starts at once if
// an agent slot is free, otherwise when one frees.
func (m *Mailbox) SubmitBackground(ctx context.Context, req SubmitRequest) (SubmitResult, error) {
	if err := m.accepting(); err != nil {
		return SubmitResult{}, err
	}
	if err := validateRunInputs(&req); err != nil {
		return SubmitResult{}, err
	}
	normalizeRunMode(&req, true)
	if req.DedupeKey != "" {
		if res, ok, err := m.existingByDedupe(ctx, req.ThreadID, req.DedupeKey); err != nil || ok {
			return res, err
		}
	}
	if err := m.admitQueued(ctx, &req); err != nil {
		return SubmitResult{}, err
	}
	runID, d, err := m.submitRun(ctx, &req, m.cfg.Now())
	if err == nil {
		// New work of the thread may be for an agent that is here.
		m.releaseAgentHoldAfter(req.ThreadID, d.DispatchID)
	}
	if err != nil {
		if errors.Is(err, ErrAlreadyExists) && req.DedupeKey != "" {
			if res, ok, lerr := m.existingByDedupe(ctx, req.ThreadID, req.DedupeKey); lerr == nil && ok {
				return res, nil
			}
		}
		return SubmitResult{}, fmt.Errorf("submit to %s: %w", req.ThreadID, err)
	}
	res := SubmitResult{DispatchID: d.DispatchID, RunID: runID, ThreadID: req.ThreadID, Status: SubmitQueued}
	if !m.servedWithSlot(&req) {
		if !m.runsOn(req.ThreadID) && m.served(req.AgentID) {
			// (Its own attempt, executing here, claims it as it finishes:
			// the dispatcher does not count it as waiting either.)
			m.waitsForSlot()
		}
		m.kick() // the dispatcher sets the thread aside until an agent for it comes, or has a slot
		return res, nil
	}
	switch m.tryDispatch(ctx, req.ThreadID) {
	case attemptClaimed:
		if m.runningDispatch(req.ThreadID) == d.DispatchID {
			res.Status = SubmitRunning
		}
	case attemptBusy:
		if !m.runsOn(req.ThreadID) {
			m.kick() // a claim in flight may have missed it
		}
		// Otherwise the attempt running on the thread claims it when it
		// finishes (finish).
	case attemptNoSlot:
		m.waitsForSlot()
		m.kick()
	default:
		m.kick()
	}
	return res, nil
}

// waitsForSlot notes that a thread accepted here waits for an agent slot:
// until the dispatcher has looked (it resets the mark when nothing
// waits), a finishing attempt hands its slot to the dispatcher, oldest
// waiting thread first, rather than claim its own thread's newer work.
// Left to the dispatcher alone, a finish that came before it had woken
// ran the busy thread's second run ahead of a thread submitted earlier
// (CI, a loaded machine: TestFinishedAttemptLeavesTheSlotToAWaitingThread).
func (m *Mailbox) waitsForSlot() {
	m.starved.mark()
}

// repeatLog is the log an idempotent repeat of a foreground submit
// follows: the first's run, running here, queued, or executing in another
// process (a waiting log its end closes); nil when none can be followed.
// Only the run's attempt here was followed before: a repeat of a queued
// run, or of one on another sidecar, got `submitted` and an ended stream
// (found by review).
func (m *Mailbox) repeatLog(ctx context.Context, thread string, res SubmitResult) *EventLog {
	if res.Status == SubmitRunning && m.runningDispatch(thread) == res.DispatchID {
		return m.Reattach(thread)
	}
	l, other, err := m.AttachRun(ctx, thread, res.RunID, 0)
	if err == nil && l != nil && !other {
		return l
	}
	// Queued, or (the thread's log here being an earlier run's) claimed
	// by another process (found by review: followed nothing).
	if q, err := m.runWaitLog(ctx, thread, res.RunID, true); err == nil && q != nil {
		return q
	}
	return nil
}

// existingByDedupe finds the non-terminal dispatch holding a dedupe key
// on a thread (an idempotent repeat returns it instead of a new run).
func (m *Mailbox) existingByDedupe(ctx context.Context, thread, key string) (SubmitResult, bool, error) {
	if dl, ok := m.raw.(DedupeLookup); ok {
		id, err := dl.DedupeHolder(ctx, thread, key)
		if err != nil || id == "" {
			return SubmitResult{}, false, err
		}
		d, err := m.store.LoadDispatch(ctx, id)
		if err != nil || d == nil || d.Status.Terminal() || d.DedupeKey != key {
			return SubmitResult{}, false, err
		}
		st := SubmitQueued
		if d.Status == StatusClaimed {
			st = SubmitRunning
		}
		return SubmitResult{DispatchID: d.DispatchID, RunID: d.RunID, ThreadID: thread, Status: st}, true, nil
	}
	ds, err := m.store.ListDispatches(ctx, thread, StatusFilter{StatusQueued, StatusClaimed}, 0, 0)
	if err != nil {
		return SubmitResult{}, false, err
	}
	for _, d := range ds {
		if d.DedupeKey == key {
			st := SubmitQueued
			if d.Status == StatusClaimed {
				st = SubmitRunning
			}
			return SubmitResult{DispatchID: d.DispatchID, RunID: d.RunID, ThreadID: thread, Status: st}, true, nil
		}
	}
	return SubmitResult{}, false, nil
}

// runningDispatch returns the dispatch executing on a thread here, or "".
func (m *Mailbox) runningDispatch(thread string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.threads[thread]; e != nil {
		return e.dispatch.DispatchID
	}
	return ""
}

// Cancel cancels by dispatch id, run id or thread id (seed cancel): a
// queued dispatch is cancelled in the store (its run settles with it); a
// run executing here is cancelled. It reports whether anything was
// cancelled.
func (m *Mailbox) Cancel(ctx context.Context, id string) (bool, error) {
	if err := ValidateID("id", id); err != nil {
		return false, err
	}
	d, err := m.store.Cancel(ctx, id, m.cfg.Now())
	if err != nil {
		return false, fmt.Errorf("cancel %s: %w", id, err)
	}
	if d != nil {
		m.withdrawPending(*d)
		m.releaseAgentHold(d.ThreadID)
		return true, nil
	}
	if e := m.executingSettled(ctx, id); e != nil {
		// The cancel is made durable before it is reported: the claimed
		// dispatch is acked with termination cancelled (its run settles in
		// the same commit), so a crash before the agent stops cannot bring
		// the run back (found by the crash harness). The attempt still
		// executing finds its claim settled and records nothing more.
		ok, err := m.settleCancel(ctx, e)
		if errors.Is(err, ErrVersionConflict) {
			// Stale epoch (an interrupt): the store superseded the claim
			// and settled its run as cancelled; stop the attempt, as
			// HandleLive does.
			ok, err = true, nil
		}
		if err != nil || !ok {
			return false, err
		}
		// A refused attempt may have set its thread's hold already, its
		// claim not yet released: the work behind the cancelled dispatch
		// may be for an agent that is here (found by review).
		m.releaseAgentHold(e.dispatch.ThreadID)
		e.cancel(errCancelled)
		return true, nil
	}
	return m.deliverElsewhere(ctx, id, LiveCommand{Kind: LiveCancel})
}

// settleCancel acks the dispatch an attempt executes with termination
// cancelled. false (no error) when the attempt's claim was already
// settled: the run finished first.
func (m *Mailbox) settleCancel(ctx context.Context, e *execution) (bool, error) {
	d := &e.dispatch
	res := RunResult{RunID: d.RunID, InstanceID: e.instanceID(), Status: RunDone, Termination: &Termination{Type: TermCancelled}}
	err := m.store.Complete(ctx, d.DispatchID, d.ClaimToken, res, m.cfg.Now())
	switch {
	case err == nil:
		e.cancelSettled.Store(true)
		return true, nil
	case errors.Is(err, ErrStaleClaim) || errors.Is(err, ErrNotFound):
		return false, nil
	}
	return false, fmt.Errorf("cancel %s: %w", d.DispatchID, err)
}

// executingSettled is executing, after waiting (at most CancelWait) while
// a claim of id's thread is completing here, or a finished attempt hands
// the thread over to its next dispatch, claimed with its completion: the
// attempt to act on is the one that comes out of it. id is a thread, a
// dispatch or a run; the last two are looked up to find their thread.
func (m *Mailbox) executingSettled(ctx context.Context, id string) *execution {
	// Nothing in transit here (the common case): no lookups, no wait.
	m.mu.Lock()
	_, isThread := m.threads[id]
	anyInTransit := false
	for _, e := range m.threads {
		if e.claiming || e.handoff.Load() {
			anyInTransit = true
			break
		}
	}
	m.mu.Unlock()
	if !anyInTransit {
		return m.executing(id)
	}
	thread := id
	if !isThread {
		if d, err := m.store.LoadDispatch(ctx, id); err == nil && d != nil {
			thread = d.ThreadID
		} else if r, err := m.store.LoadRun(ctx, id); err == nil && r != nil {
			thread = r.ThreadID
		}
	}
	m.settledEntry(ctx, thread)
	return m.executing(id)
}

// executing returns the attempt executing here whose run, dispatch or
// thread is id, or nil.
func (m *Mailbox) executing(id string) *execution {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.byRun[id]
	if e == nil {
		e = m.threads[id]
	}
	if e == nil {
		for _, x := range m.threads {
			if x.dispatch.DispatchID == id {
				e = x
				break
			}
		}
	}
	if e == nil || e.claiming {
		return nil
	}
	return e
}

// deliverElsewhere carries a command to a run executing in another
// process (stores that implement LiveRouter): id is a claimed dispatch, a
// run, or a thread (its latest run) that is running or waiting.
func (m *Mailbox) deliverElsewhere(ctx context.Context, id string, cmd LiveCommand) (bool, error) {
	router, ok := m.raw.(LiveRouter)
	if !ok {
		return false, nil
	}
	d, err := m.store.LoadDispatch(ctx, id)
	if err != nil {
		return false, err
	}
	if d != nil && d.Status == StatusClaimed {
		if d.ClaimedBy == m.cfg.ConsumerID {
			return false, nil // this process's own claim (threadTarget)
		}
		return router.DeliverLive(ctx, LiveTarget{ThreadID: d.ThreadID, RunID: d.RunID, DispatchID: d.DispatchID}, cmd)
	}
	run, err := m.store.LoadRun(ctx, id)
	if err != nil {
		return false, err
	}
	if run == nil {
		target, ok, err := m.threadTarget(ctx, id, true)
		if err != nil || !ok {
			return false, err
		}
		return router.DeliverLive(ctx, target, cmd)
	}
	if run.Status == RunRunning || run.Status == RunWaiting {
		return router.DeliverLive(ctx, LiveTarget{ThreadID: run.ThreadID, RunID: run.RunID, DispatchID: run.DispatchID}, cmd)
	}
	return false, nil
}

// threadTarget is where a command for thread goes when no attempt of it
// executes here: the run of its claimed dispatch (executing in another
// process), else its latest run when that is running (or, with waiting,
// waiting). ok false: none. The latest run alone missed the run executing
// whenever work was queued behind it, whose run is newer (found by
// review: messages and a cancel by thread id sent to another sidecar than
// the run's were queued, or answered "nothing to cancel").
func (m *Mailbox) threadTarget(ctx context.Context, thread string, waiting bool) (LiveTarget, bool, error) {
	claimed, err := m.store.ListDispatches(ctx, thread, StatusFilter{StatusClaimed}, 1, 0)
	if err != nil {
		return LiveTarget{}, false, err
	}
	if len(claimed) > 0 {
		d := &claimed[0]
		if d.ClaimedBy == m.cfg.ConsumerID {
			// This process's own claim, whose attempt was not found
			// settled here: routed, it would come back unanswered after
			// the whole timeout (found by review).
			return LiveTarget{}, false, nil
		}
		return LiveTarget{ThreadID: d.ThreadID, RunID: d.RunID, DispatchID: d.DispatchID}, true, nil
	}
	run, err := m.store.LatestRun(ctx, thread)
	if err != nil || run == nil {
		return LiveTarget{}, false, err
	}
	if run.Status == RunRunning || waiting && run.Status == RunWaiting {
		return LiveTarget{ThreadID: run.ThreadID, RunID: run.RunID, DispatchID: run.DispatchID}, true, nil
	}
	return LiveTarget{}, false, nil
}

// cancelLocal cancels the attempt executing here whose run, dispatch or
// thread is id.
func (m *Mailbox) cancelLocal(id string, cause error) bool {
	m.mu.Lock()
	e := m.byRun[id]
	if e == nil {
		e = m.threads[id]
	}
	if e == nil {
		for _, x := range m.threads {
			if x.dispatch.DispatchID == id {
				e = x
				break
			}
		}
	}
	m.mu.Unlock()
	if e == nil || e.claiming {
		return false
	}
	e.cancel(cause)
	return true
}

// Interrupt bumps the thread's epoch: its queued dispatches are superseded
// (their runs settle as cancelled) and the run executing here, if any, is
// cancelled.
func (m *Mailbox) Interrupt(ctx context.Context, thread string) (InterruptResult, error) {
	res, err := m.store.Interrupt(ctx, thread, m.cfg.Now())
	if err != nil && res.NewEpoch == 0 {
		return res, err
	}
	// An error with a new epoch is an interrupt whose later commits
	// failed (a long queue is superseded in several): it took effect, and
	// the rest of the queue is superseded as claims meet it.
	m.interrupted(ctx, thread, res)
	return res, err
}

// interrupted ends what an interrupt superseded: the foreground streams
// waiting on its queued dispatches, the thread's agent hold, and the run
// it found active (cancelled here, or routed to its process).
func (m *Mailbox) interrupted(ctx context.Context, thread string, res InterruptResult) {
	m.metrics.add("supersede", res.SupersededN)
	m.withdrawPending(res.Superseded...)
	m.releaseAgentHold(thread)
	if res.Active != nil {
		// A claim of the thread in flight here may be the active one.
		m.settledEntry(ctx, thread)
		// Cancel exactly the dispatch the interrupt found active, not
		// whatever runs on the thread by now; on a shared store it may
		// execute in another process (best effort: otherwise its next
		// lease renewal finds it stale).
		if !m.cancelLocal(res.Active.DispatchID, errInterrupted) {
			if router, ok := m.raw.(LiveRouter); ok {
				target := LiveTarget{ThreadID: res.Active.ThreadID, RunID: res.Active.RunID, DispatchID: res.Active.DispatchID}
				if _, err := router.DeliverLive(ctx, target, LiveCommand{Kind: LiveCancel}); err != nil {
					m.log.Warn("interrupt: cancel of a run elsewhere failed", "dispatch_id", res.Active.DispatchID, "err", err)
				}
			}
		}
	}
}

// Submit is the foreground submit (seed submit): it interrupts the
// thread — queued work superseded, the active run cancelled and awaited —
// then starts this request at once if an agent slot is free; otherwise it
// waits at the head of its thread for a slot. The returned EventLog
// follows the run. If the active run does not release its claim in time,
// nothing is written and the error is a conflict.
func (m *Mailbox) Submit(ctx context.Context, req SubmitRequest) (SubmitResult, *EventLog, error) {
	if err := m.accepting(); err != nil {
		return SubmitResult{}, nil, err
	}
	if err := validateRunInputs(&req); err != nil {
		return SubmitResult{}, nil, err
	}
	normalizeRunMode(&req, false)
	thread := req.ThreadID
	// An idempotent repeat answers the first dispatch and interrupts
	// nothing; a request the store would refuse is refused before the
	// interrupt, so a failed submit leaves the thread as it was. Repeats
	// are serialised per (thread, key), as SendMessages's are: two at once
	// both found no dispatch, and the second's interrupt superseded the
	// first's, whose client was told it ran (found by review).
	if req.DedupeKey != "" {
		unlock := m.keyLocks.lock(thread + "\x00" + req.DedupeKey)
		defer unlock()
		if res, ok, err := m.existingByDedupe(ctx, thread, req.DedupeKey); err != nil || ok {
			if err != nil {
				return SubmitResult{}, nil, fmt.Errorf("submit to %s: %w", thread, err)
			}
			return res, m.repeatLog(ctx, thread, res), nil
		}
	}
	if err := m.precheckSubmit(ctx, &req); err != nil {
		return SubmitResult{}, nil, fmt.Errorf("submit to %s: %w", thread, err)
	}
	if res, events, done, err := m.submitIdle(ctx, &req); done || err != nil {
		return res, events, err
	}
	// The thread is busy: a request too large for one commit is refused
	// before the interrupt (SubmitSizer). On an idle thread submitIdle's
	// commit refused it, with nothing written.
	if sz, ok := m.raw.(SubmitSizer); ok && !req.messagesLogged {
		if err := sz.CheckSubmitSize(thread, req.Messages, requestBytes(&req)); err != nil {
			return SubmitResult{}, nil, fmt.Errorf("submit to %s: %w", thread, err)
		}
	}
	ir, err := m.store.Interrupt(ctx, thread, m.cfg.Now())
	if err != nil {
		if ir.NewEpoch != 0 {
			m.interrupted(ctx, thread, ir) // it took effect: see Interrupt
		}
		return SubmitResult{}, nil, fmt.Errorf("submit to %s: %w", thread, err)
	}
	m.metrics.add("supersede", ir.SupersededN)
	m.withdrawPending(ir.Superseded...)
	m.releaseAgentHold(thread) // the dispatch it was held for is superseded
	if ir.Active != nil {
		if !m.cancelAndAwait(ctx, ir.Active) {
			return SubmitResult{}, nil, fmt.Errorf("dispatch %s did not release the thread: %w", ir.Active.DispatchID, errActiveRun)
		}
	}
	if id, ok := m.awaitStopping(ctx, thread, ir.NewEpoch); !ok {
		return SubmitResult{}, nil, fmt.Errorf("dispatch %s did not stop: %w", id, errActiveRun)
	}
	// The thread is idle now, unless work arrived meanwhile: the fast
	// path's one commit submits, claims and starts (the path below takes
	// three). It also leaves no moment, as the path below does between its
	// queued write and its inline claim, in which a crash strands the
	// dispatch behind the inline-claim guard for a minute.
	m.awaitProbes()
	if res, events, done, err := m.submitIdle(ctx, &req); done || err != nil {
		return res, events, err
	}
	// With a free slot, claim inline behind a guard that keeps background
	// claimers away; without one, queue it at the head of the thread.
	// A thread that work claimed again after the interrupt (a concurrent
	// foreground submit, or a background one, that came after it) is
	// queued at the head too: the inline claim could only lose, and this
	// request runs once that work ends, as a slot's waiter does.
	// (A claim in flight here is waited for: a probe of a finishing
	// attempt finds nothing and goes.)
	slot := m.servedWithSlot(&req) && m.reserveSlotAfterProbes(thread)
	if slot {
		if e := m.settledEntry(ctx, thread); e != nil && !e.claiming {
			m.releaseSlot(thread)
			slot = false
		}
	}
	availableAt := m.cfg.Now()
	if slot {
		availableAt += InlineClaimGuard.Milliseconds()
	} else if req.Priority == nil {
		head := uint8(0)
		req.Priority = &head
	}
	// The run's event log exists before its dispatch does, so the caller
	// follows the run from its first event even if the dispatcher starts it
	// at once; it becomes the thread's log for re-attachment only once the
	// run is really ours.
	if req.DispatchIDHint == "" {
		req.DispatchIDHint, req.dispatchIDMinted = newID(), true
	}
	events := m.newEventLog()
	m.addPending(req.DispatchIDHint, events)
	runID, d, err := m.submitRun(ctx, &req, availableAt)
	m.written(req.DispatchIDHint)
	if err != nil {
		m.dropPending(req.DispatchIDHint)
		if slot {
			m.releaseSlot(thread)
		}
		return SubmitResult{}, nil, fmt.Errorf("submit to %s: %w", thread, err)
	}
	m.mu.Lock()
	if events.run == "" {
		events.pendingRun = runID // AttachedRun, until its attempt starts
	}
	if !slot {
		// Waiting for a slot, it is the thread's run to re-attach to;
		// waiting behind an attempt executing here, that attempt's log
		// stays the thread's until this one starts (startExecution).
		if _, waiting := m.pending[d.DispatchID]; waiting && m.threads[thread] == nil {
			m.logs[thread] = events
		}
		if _, waiting := m.pending[d.DispatchID]; waiting {
			m.fgWaiting[thread] = fgWait{since: m.cfg.Now(), dispatchID: d.DispatchID}
		}
	}
	m.mu.Unlock()
	res := SubmitResult{DispatchID: d.DispatchID, RunID: runID, ThreadID: thread, Status: SubmitQueued}
	if !slot {
		if !m.runsOn(thread) && m.served(req.AgentID) {
			m.waitsForSlot()
		}
		m.kick()
		return res, events, nil
	}
	claimed, err := m.store.ClaimDispatch(ctx, d.DispatchID, m.cfg.ConsumerID, m.cfg.Lease, m.cfg.Now())
	if err != nil {
		m.releaseSlot(thread)
		m.dropPending(d.DispatchID)
		return SubmitResult{}, nil, fmt.Errorf("submit to %s: %w", thread, err)
	}
	if claimed == nil {
		// Lost the race for the thread to a foreground submit that came
		// after our interrupt (or the dispatch was cancelled or
		// superseded meanwhile). As if the two had come one after the
		// other, ours was superseded by the later one before it started:
		// its dispatch is cancelled (its run settles as cancelled in the
		// same commit), or superseded if the later one's interrupt reached
		// it first, and its stream ends with run_finish cancelled. Its
		// message stays in the log, as a superseded submit's does; the
		// request was taken, so it is not answered as failed.
		m.releaseSlot(thread)
		final, cerr := m.store.Cancel(ctx, d.DispatchID, m.cfg.Now())
		if cerr == nil && final == nil {
			final, cerr = m.store.LoadDispatch(ctx, d.DispatchID) // not queued any more: cancelled or superseded
		}
		switch {
		case cerr == nil && final == nil:
			cerr = fmt.Errorf("dispatch %s: %w", d.DispatchID, ErrNotFound)
		case cerr == nil && !final.Status.Terminal():
			// Claimed after all (by the dispatcher here: the run takes
			// the pending log, which the caller follows).
			return res, events, nil
		}
		if cerr != nil {
			m.dropPending(d.DispatchID)
			return SubmitResult{}, nil, fmt.Errorf("withdraw foreground dispatch %s after its inline claim lost the thread: %w", d.DispatchID, cerr)
		}
		m.withdrawPending(*final)
		res.Status = SubmitCancelled
		return res, events, nil
	}
	m.startExecution(*claimed, false, claimHold{})
	res.Status = SubmitRunning
	return res, events, nil
}

// submitIdle is the fast path of Submit for an idle thread with a free
// agent slot, on stores that offer it (IdleSubmitter): the interrupt, the
// submit, the inline claim and the start (not of a continued waiting run:
// that attempt records it after the rebuild) in one commit, so the agent
// sees the run after one sync instead of four. Submit tries it first, and
// again once an interrupt has left the thread idle. done is false when it
// did not apply (no slot, something of the thread still here, or the
// thread has queued or claimed work); then nothing was written and req is
// as it was.
func (m *Mailbox) submitIdle(ctx context.Context, req *SubmitRequest) (SubmitResult, *EventLog, bool, error) {
	is, ok := m.raw.(IdleSubmitter)
	if !ok {
		return SubmitResult{}, nil, false, nil
	}
	thread := req.ThreadID
	if !m.servedWithSlot(req) || !m.reserveSlot(thread) {
		return SubmitResult{}, nil, false, nil
	}
	// A claim in flight, as tryDispatch's: a cancel or an interrupt
	// arriving between the commit and the execution waits for it.
	hold := &execution{claiming: true}
	m.mu.Lock()
	placed := m.threads[thread] == nil
	if placed {
		m.threads[thread] = hold
	}
	m.mu.Unlock()
	if !placed {
		// Something of the thread is here: an attempt (maybe one whose
		// claim a cancel settled while it stops, which the store does not
		// see) or a claim. The slow path interrupts and awaits it.
		m.releaseSlot(thread)
		return SubmitResult{}, nil, false, nil
	}
	saved := *req
	if req.DispatchIDHint == "" {
		req.DispatchIDHint, req.dispatchIDMinted = newID(), true
	}
	events := m.newEventLog()
	m.addPending(req.DispatchIDHint, events)
	defer m.written(req.DispatchIDHint)
	var claimed *Dispatch
	instance := newID()
	runID, _, err := m.persistRun(ctx, req, new(m.cfg.Now()+InlineClaimGuard.Milliseconds()), func(ctx context.Context, c Checkpoint, d Dispatch) (Dispatch, error) {
		var err error
		claimed, err = observe(m.metrics, "submit_idle", func() (*Dispatch, error) {
			recs, out, err := is.SubmitIdle(ctx, c, d, m.cfg.ConsumerID, m.cfg.Lease, instance, m.cfg.Now())
			if out != nil {
				m.tails.appended(c.ThreadID, recs, m.cfg.ContextMessages)
				m.tails.submitted(c.ThreadID, recs)
			}
			return out, err
		}, func(d *Dispatch) bool { return d == nil })
		if claimed != nil {
			return *claimed, err
		}
		return d, err
	})
	if err != nil || claimed == nil {
		m.mu.Lock()
		if m.threads[thread] == hold {
			delete(m.threads, thread)
		}
		m.mu.Unlock()
		m.dropPending(req.DispatchIDHint)
		m.releaseSlot(thread)
		if err != nil {
			return SubmitResult{}, nil, true, fmt.Errorf("submit to %s: %w", thread, err)
		}
		*req = saved
		return SubmitResult{}, nil, false, nil
	}
	m.startExecution(*claimed, claimed.InstanceID == instance, claimHold{})
	return SubmitResult{DispatchID: claimed.DispatchID, RunID: runID, ThreadID: thread, Status: SubmitRunning}, events, true, nil
}

// served reports whether a run for agent id id, as a submit names it,
// may be claimed inline: some connected agent serves it, or the executor
// cannot tell (no SlotCounter), or the submit names none (its run takes
// the thread's last agent id, unknown here; the usual agent serves "*").
// Otherwise the run is queued and answered queued, not running: claimed
// inline, it was answered running while no agent would take it (found by
// review).
func (m *Mailbox) served(id string) bool {
	return m.slots == nil || m.slots.Serves(runAgentID(id))
}

// runAgentID is the agent id a request's run gets (runForDispatch): its
// own, else "default" (a continuation keeps its run's: servedWithSlot
// does not ask). A request without one was taken for served by any
// agent, and answered "running" with no agent serving "default" (found
// by review: docs/protocol.md says queued).
func runAgentID(id string) string {
	if id = strings.TrimSpace(id); id == "" {
		return DefaultAgentID
	}
	return id
}

// DefaultAgentID is the agent id of a run whose request names none.
const DefaultAgentID = "default"

// slotFreeFor reports whether an agent serving agent id id has a free
// slot, as far as the executor counts them (SlotCounter; true when it
// does not, or for no id). A submit claims inline only then: the engine
// counts the slots of every agent id together, and the inline claim of a
// run for a full agent, answered "running", was refused at once and
// queued (found by review: http.md says such a submit is answered
// queued). The dispatcher takes it when that agent has a slot (the held
// threads' prefix).
func (m *Mailbox) slotFreeFor(id string) bool {
	id = strings.TrimSpace(id)
	if m.slots == nil || id == "" {
		// No id: "default", whose slots are not looked at (the inline
		// claim finds out). Asking the executor at every submit cost the
		// sidecar a few per cent more CPU per run (DurableRuns/64).
		return true
	}
	if c, ok := m.slots.(freeSlotChecker); ok {
		return c.HasFreeSlot(id) // without FreeSlots' list (a review: 3 allocations a submit)
	}
	for _, a := range m.slots.FreeSlots() {
		if a.Free > 0 && a.serves(id) {
			return true
		}
	}
	return false
}

// freeSlotChecker is a SlotCounter that answers slotFreeFor's question
// without listing every agent (the hub).
type freeSlotChecker interface {
	// HasFreeSlot reports whether an agent serving agent id id has a
	// free slot now.
	HasFreeSlot(id string) bool
}

// servedWithSlot is served and slotFreeFor together: whether a submit
// for agent id id may claim inline.
func (m *Mailbox) servedWithSlot(req *SubmitRequest) bool {
	id := req.AgentID
	if strings.TrimSpace(id) == "" && (strings.TrimSpace(req.ContinueRunID) != "" || len(req.Decisions) > 0) {
		// It continues a run, whose agent id it keeps (runForDispatch),
		// which is not known here: taken for served, as before, rather
		// than queue a decision for agent "default" (found by review).
		return true
	}
	return m.served(id) && m.slotFreeFor(id)
}

// precheckSubmit refuses, without writing anything, what persistRun
// would refuse after a foreground submit has already interrupted the
// thread: a run hint naming another thread's run or a run not open for
// dispatch (checkOpenForDispatch: one whose dispatch has not started yet
// included), a dispatch id hint or a message id already taken.
func (m *Mailbox) precheckSubmit(ctx context.Context, r *SubmitRequest) error {
	for _, id := range []string{strings.TrimSpace(r.ContinueRunID), strings.TrimSpace(r.RunIDHint)} {
		if id == "" {
			continue
		}
		run, err := m.store.LoadRun(ctx, id)
		if err != nil {
			return err
		}
		if run == nil {
			continue
		}
		if err := m.checkOpenForDispatch(ctx, run, id, r.ThreadID); err != nil {
			return err
		}
	}
	if id := strings.TrimSpace(r.DispatchIDHint); id != "" {
		d, err := m.store.LoadDispatch(ctx, id)
		if err != nil {
			return err
		}
		if d != nil {
			return fmt.Errorf("dispatch_id=%s: %w", id, ErrAlreadyExists)
		}
	}
	if r.messagesLogged {
		return nil
	}
	for _, msg := range r.Messages {
		if msg.ID == "" {
			continue
		}
		rec, err := m.store.LoadMessage(ctx, r.ThreadID, msg.ID)
		if err != nil {
			return err
		}
		if rec != nil {
			return fmt.Errorf("message %s: %w", msg.ID, ErrAlreadyExists)
		}
	}
	return nil
}

// requestBytes bounds the bytes of r's fields other than its messages
// as a run record keeps them (decisions and frontend tools twice: in the
// request's extras and in its snapshot).
func requestBytes(r *SubmitRequest) int {
	n := 2*len(r.FrontendTools) + len(r.Overrides) + 1024
	for i := range r.Decisions {
		b, _ := json.Marshal(&r.Decisions[i])
		n += 2 * len(b)
	}
	return n
}

// addPending registers the event log of a foreground dispatch about to be
// written, as not written yet: GC leaves it alone until written is called
// (found by review: GC found no dispatch, took the run for one that had
// ended elsewhere and closed its stream, and the run then ran into a log
// nobody read).
func (m *Mailbox) addPending(id string, l *EventLog) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pending[id] = l
	if m.unwritten == nil {
		m.unwritten = map[string]struct{}{}
	}
	m.unwritten[id] = struct{}{}
}

// written ends addPending's protection: the dispatch is written (or its
// submit failed and dropped the log).
func (m *Mailbox) written(id string) {
	m.mu.Lock()
	delete(m.unwritten, id)
	m.mu.Unlock()
}

// dropPending forgets the event logs made for foreground dispatches that
// will not start (cancelled, superseded, lost their claim) and closes
// them, so their readers see the end.
func (m *Mailbox) dropPending(dispatchIDs ...string) {
	now := m.cfg.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, id := range dispatchIDs {
		if l := m.pending[id]; l != nil {
			delete(m.pending, id)
			l.Close(now)
		}
	}
}

// newEventLog is a log of a run's attempt, bounded by EventBuffer and
// EventBufferBytes, and with the other open logs by EventBufferTotalBytes.
func (m *Mailbox) newEventLog() *EventLog {
	l := NewBoundedEventLog(m.cfg.EventBuffer, m.cfg.EventBufferBytes)
	l.budget = &m.live
	return l
}

// LiveEventBytes is the event data the open logs hold
// (EventBufferTotalBytes bounds it).
func (m *Mailbox) LiveEventBytes() int64 { return m.live.Used() }

// withdrawPending closes the event logs of queued foreground runs whose
// dispatches were withdrawn (superseded or cancelled) before they ran,
// each with a run_finish (termination cancelled) as its last event, so
// every reader of the log learns how the run ended: the submitter and
// anyone who re-attached to it.
func (m *Mailbox) withdrawPending(ds ...Dispatch) {
	m.endPending(ds, func(*Dispatch) *Termination { return &Termination{Type: TermCancelled} })
}

// endPending closes the event logs of queued foreground runs whose
// dispatches ended without starting here, each with a run_finish carrying
// term(d) as its last event.
func (m *Mailbox) endPending(ds []Dispatch, term func(*Dispatch) *Termination) {
	now := m.cfg.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range ds {
		m.endPendingLocked(&ds[i], term, now)
	}
}

// endPendingOne is endPending of one dispatch, without a copy of it.
func (m *Mailbox) endPendingOne(d *Dispatch, term func(*Dispatch) *Termination) {
	now := m.cfg.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.endPendingLocked(d, term, now)
}

// endPendingLocked ends d's waiting log, if any; m.mu is held.
func (m *Mailbox) endPendingLocked(d *Dispatch, term func(*Dispatch) *Termination, now int64) {
	l := m.pending[d.DispatchID]
	if l == nil {
		return
	}
	delete(m.pending, d.DispatchID)
	// An attempt that never reached the agent (README, "Event ids"):
	// numbered apart from the ids of the run's started attempts — the
	// dispatch may continue a waiting run, whose first attempt numbered
	// from 1 — in the band of the run's last recorded start when Attach
	// read it (its floor), else the first band.
	l.number(unstartedBase(0), 0) // raised to the log's floor if Attach set one
	l.appendTyped("run_finish", finishEvent(d, d.InstanceID, term(d), 0, ""))
	l.Close(now)
}

// endedElsewhere is how a dispatch that ended without starting here (on
// another sidecar sharing the store) ended: its recorded termination when
// acked, an error when dead-lettered.
func endedElsewhere(d *Dispatch) *Termination {
	switch {
	case d.Status == StatusAcked && d.Termination != nil:
		return d.Termination
	case d.Status == StatusAcked:
		return &Termination{Type: TermNaturalEnd}
	case d.RunError != "":
		return ErrorTermination(d.RunError)
	default:
		return ErrorTermination(d.LastError)
	}
}

// WithdrawnFinishID is the id of the run_finish that ends the stream of a
// foreground run that never started here (withdrawn, or ended elsewhere):
// apart from every id a started attempt uses (README, "Event ids").
const WithdrawnFinishID = unstartedIDOffset + 1

// awaitStopping waits, at most CancelWait, for an attempt of thread that
// still executes here although the store shows the thread released (a
// cancel settles the claim before the agent has stopped): the new run
// must not start beside it. It reports the attempt's dispatch when it did
// not stop in time. A claim in flight here is left to the store's claim
// guard, and so is an attempt whose claim the store shows held at epoch
// (the interrupt's): it was claimed after the interrupt (a background
// submit that came after it, say), nothing superseded or cancelled it,
// and stopping it would end its run as cancelled (or retry it after the
// new run) although nobody cancelled it.
func (m *Mailbox) awaitStopping(ctx context.Context, thread string, epoch uint64) (string, bool) {
	m.mu.Lock()
	e := m.threads[thread]
	m.mu.Unlock()
	if e == nil || e.claiming {
		return "", true
	}
	if !e.cancelSettled.Load() {
		cur, err := m.store.LoadDispatch(ctx, e.dispatch.DispatchID)
		if err != nil {
			return e.dispatch.DispatchID, false
		}
		if cur != nil && cur.CheckOwner(e.dispatch.ClaimToken) == nil && cur.Epoch >= epoch {
			return "", true
		}
	}
	e.cancel(errInterrupted)
	t := time.NewTimer(m.cfg.CancelWait)
	defer t.Stop()
	select {
	case <-e.done:
		return "", true
	case <-t.C:
	case <-ctx.Done():
	}
	return e.dispatch.DispatchID, false
}

// cancelAndAwait cancels the thread's active attempt — here, or through
// the LiveRouter in another process — and waits (up to CancelWait) until
// the store no longer shows its dispatch claimed and, for an attempt
// here, until it has ended. It reports whether that happened in time.
func (m *Mailbox) cancelAndAwait(ctx context.Context, active *Dispatch) bool {
	deadline := time.Now().Add(m.cfg.CancelWait)
	released := func() (bool, error) {
		d, err := m.store.LoadDispatch(ctx, active.DispatchID)
		return err == nil && (d == nil || d.Status != StatusClaimed), err
	}
	var done <-chan struct{}
	routed := false
	for done == nil && !routed {
		m.mu.Lock()
		e := m.threads[active.ThreadID]
		m.mu.Unlock()
		switch {
		case e != nil && !e.claiming && e.dispatch.DispatchID == active.DispatchID:
			e.cancel(errInterrupted)
			done = e.done
			continue
		case e != nil && (e.claiming || e.handoff.Load() && e.dispatch.DispatchID != active.DispatchID):
			// A claim of this thread is completing here right now (or a
			// finishing attempt claimed the next dispatch with its
			// completion): wait for it to become an execution we can
			// cancel.
		default:
			// Not (or no longer) running here. An attempt leaves the
			// threads map only after it settled, so if it just finished on
			// its own the store shows it released now; otherwise it runs in
			// another process (or died there: only its lease frees it).
			ok, err := released()
			if err != nil {
				return false
			}
			if ok {
				return true
			}
			router, isRouter := m.raw.(LiveRouter)
			if !isRouter {
				return false
			}
			target := LiveTarget{ThreadID: active.ThreadID, RunID: active.RunID, DispatchID: active.DispatchID}
			delivered, err := router.DeliverLive(ctx, target, LiveCommand{Kind: LiveCancel})
			if err != nil || !delivered {
				// It may have finished (or been settled) meanwhile.
				ok, err := released()
				return err == nil && ok
			}
			routed = true
			continue
		}
		if time.Now().After(deadline) {
			return false // nobody here can stop it: only its lease frees it
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(2 * time.Millisecond):
		}
	}
	for {
		ok, err := released()
		if err != nil {
			return false
		}
		// An attempt executing here must also have ended: its dispatch may
		// show released while it still runs (a lease renewal of the
		// interrupted claim supersedes it), and an agent that ignores the
		// cancel would then run alongside the caller's new attempt. Once
		// it has ended it has also given its slot back, so the caller's
		// inline claim finds one.
		if ok && done == nil {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-done:
			done = nil
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// Reattach returns the event log of the thread's running run, or of its
// last run while that is retained (EventRetention after it ended); nil
// when there is none.
func (m *Mailbox) Reattach(thread string) *EventLog {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.logs[thread]
	if l == nil {
		return nil
	}
	if at, closed := l.ClosedAt(); closed && m.cfg.Now()-at > m.cfg.EventRetention.Milliseconds() {
		delete(m.logs, thread)
		return nil
	}
	return l
}

// depthTimeout bounds the dispatch count behind the depth gauges, so a
// scrape gets an answer (the last one) from a store that hangs.
const depthTimeout = 2 * time.Second

// Attach is Reattach for a client that follows a thread's run from
// position after (its Last-Event-ID; 0: none). When this process has no
// log of the thread, or has only the closed log of an attempt the client
// has read to its end, but the store shows the run active, it returns a
// log for that dispatch's next attempt here, as it does for a queued
// foreground run. The run is active when its dispatch is claimed (after a
// restart, by the process that died; or by another sidecar sharing the
// store) or, nothing being claimed, the thread's next queued dispatch
// already had an attempt (a lease reclaimed after a crash; a retry after
// a transient failure, whose run_finish names it with retry_at; an
// attempt a shutdown released). The log is numbered by the attempt that
// takes it; if the dispatch ends without running here, the log ends with
// how it ended: at once when this process withdraws it or its sweep
// dead-letters it; when it ended elsewhere, at the next sweep or GC, and
// on a shared store within a second (waitingInterval). nil: no run is active or
// retained (found by review: right after a restart a client re-attaching
// to a run that was still going was told there was none).
func (m *Mailbox) Attach(ctx context.Context, thread string, after uint64) (*EventLog, error) {
	have := m.Reattach(thread)
	if have != nil {
		if _, closed := have.ClosedAt(); !closed || after == 0 || after < have.LastSeq() {
			return have, nil
		}
	}
	active, run, err := m.activeDispatch(ctx, thread)
	if err != nil && have != nil {
		return have, nil // the closed log is still an answer
	}
	if err != nil || active == nil {
		return have, err
	}
	l, fresh := m.attachPending(thread, active, have, run)
	if fresh {
		m.settleFreshPending(ctx, active.DispatchID)
	}
	return l, nil
}

// settleFreshPending ends the waiting log just made for dispatch id if
// the dispatch ended between the read and the registration: its
// withdrawal or dead-lettering found no log to end (found by review).
func (m *Mailbox) settleFreshPending(ctx context.Context, id string) {
	d, err := m.store.LoadDispatch(ctx, id)
	if err == nil && d != nil && !d.Status.Terminal() {
		// The attempts counted from the record, not from a listing that
		// may lag another process's failure (found by review: such a
		// log was ended at once with the failure before it).
		m.mu.Lock()
		if l := m.pending[id]; l != nil && l.waitFrom < d.AttemptCount {
			l.waitFrom = d.AttemptCount
		}
		m.mu.Unlock()
	}
	switch {
	case err != nil:
	case d == nil:
		m.dropPending(id)
	case d.Status == StatusSuperseded || d.Status == StatusCancelled:
		m.withdrawPending(*d)
	case d.Status.Terminal():
		m.endPending([]Dispatch{*d}, endedElsewhere)
	}
}

// AttachRun is Attach for a client that names the run it followed. other
// reports that the log is another run's (the thread moved on from the
// named run): the client is to replay it whole. A named run still queued
// behind the thread's current one is followed through its own waiting
// log, from its first event (found by review: the client was served the
// run before it).
func (m *Mailbox) AttachRun(ctx context.Context, thread, runID string, after uint64) (l *EventLog, other bool, err error) {
	if l, err = m.Attach(ctx, thread, after); err != nil || l == nil {
		return l, false, err
	}
	if cur := m.AttachedRun(l); cur == "" || cur == runID {
		return l, false, nil
	}
	q, err := m.queuedRunLog(ctx, thread, runID)
	if err != nil || q != nil {
		return q, false, err
	}
	return l, true, nil
}

// queuedRunLog returns the waiting log of run's queued dispatch on
// thread, made if need be; nil when the run has none queued.
func (m *Mailbox) queuedRunLog(ctx context.Context, thread, runID string) (*EventLog, error) {
	return m.runWaitLog(ctx, thread, runID, false)
}

// runWaitLog is queuedRunLog; with elsewhere, also for the run's dispatch
// claimed by another process (its end closes the log).
func (m *Mailbox) runWaitLog(ctx context.Context, thread, runID string, elsewhere bool) (*EventLog, error) {
	run, err := m.store.LoadRun(ctx, runID)
	if err != nil {
		return nil, fmt.Errorf("attach to run %s: %w", runID, err)
	}
	if run == nil || run.ThreadID != thread || run.Status == RunDone || run.DispatchID == "" {
		return nil, nil
	}
	d, err := m.store.LoadDispatch(ctx, run.DispatchID)
	if err != nil {
		return nil, fmt.Errorf("attach to run %s: %w", runID, err)
	}
	if d == nil || d.RunID != runID || d.Status != StatusQueued && !(elsewhere && d.Status == StatusClaimed && d.ClaimedBy != m.cfg.ConsumerID) {
		return nil, nil
	}
	m.mu.Lock()
	l := m.pending[d.DispatchID]
	fresh := l == nil
	if fresh {
		l = m.newEventLog()
		l.pendingRun = runID
		l.waitFrom = d.AttemptCount
		if run.StartCount > 0 {
			l.floor = unstartedBase(run.StartCount)
		}
		m.pending[d.DispatchID] = l
	}
	m.mu.Unlock()
	if fresh {
		m.settleFreshPending(ctx, d.DispatchID)
	}
	return l, nil
}

// activeDispatch is the thread's dispatch whose run is active (Attach),
// with its run record when read: its claimed one, else its next queued
// one if that had an attempt — one was spent (a reclaim, a retry) or its
// run is running (an attempt released by a shutdown spends none); nil
// when there is none.
func (m *Mailbox) activeDispatch(ctx context.Context, thread string) (*Dispatch, *RunRecord, error) {
	for _, status := range []DispatchStatus{StatusClaimed, StatusQueued} {
		ds, err := m.store.ListDispatches(ctx, thread, StatusFilter{status}, 1, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("attach to %s: %w", thread, err)
		}
		if len(ds) == 0 {
			continue
		}
		d := &ds[0]
		r, err := m.store.LoadRun(ctx, d.RunID)
		if err != nil {
			return nil, nil, fmt.Errorf("attach to %s: %w", thread, err)
		}
		if d.Status == StatusClaimed || d.InstanceID != "" || d.AttemptCount > 0 ||
			r != nil && r.Status == RunRunning && r.StartCount > 0 {
			return d, r, nil
		}
		return nil, nil, nil
	}
	return nil, nil, nil
}

// attachPending makes the event log Attach returns for the active
// dispatch of thread: the thread's log if an attempt started here since
// have was read, have if it is another run's, else the dispatch's waiting
// log, made if need be (fresh) with its floor above the ids of the run's
// recorded starts. The waiting log becomes the thread's unless the
// thread's is the closed log of the run's previous attempt, which stays
// for its readers and for the next attempt to follow on from
// (startExecution).
func (m *Mailbox) attachPending(thread string, active *Dispatch, have *EventLog, run *RunRecord) (l *EventLog, fresh bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l := m.logs[thread]; l != nil && l != have {
		return l, false
	}
	if have != nil && have.run != active.RunID && (have.run != "" || have.pendingRun != active.RunID) {
		// The thread's next run is another: the client read this one to
		// its end. (A waiting log that never started is its dispatch's
		// run's: ended by a failure elsewhere, the retry is followed.)
		return have, false
	}
	id := active.DispatchID
	l = m.pending[id]
	if l == nil {
		l, fresh = m.newEventLog(), true
		l.pendingRun = active.RunID
		l.waitFrom = active.AttemptCount
		if run != nil && run.StartCount > 0 {
			l.floor = unstartedBase(run.StartCount)
		}
		m.pending[id] = l
	}
	if have == nil {
		m.logs[thread] = l
	}
	return l, fresh
}

// AttachedRun returns the run whose events l (an Attach answer) carries,
// or "" when not known.
func (m *Mailbox) AttachedRun(l *EventLog) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l.run != "" {
		return l.run
	}
	return l.pendingRun
}

// ListDispatches lists a thread's dispatches (a pass-through to the store).
func (m *Mailbox) ListDispatches(ctx context.Context, thread string, filter StatusFilter, limit, offset int) ([]Dispatch, error) {
	return m.store.ListDispatches(ctx, thread, filter, limit, offset)
}

// LoadDispatch returns a dispatch, or nil (a pass-through to the store).
func (m *Mailbox) LoadDispatch(ctx context.Context, id string) (*Dispatch, error) {
	return m.store.LoadDispatch(ctx, id)
}

// QueuedThreadIDs lists the threads with queued work (a pass-through).
func (m *Mailbox) QueuedThreadIDs(ctx context.Context) ([]string, error) {
	return m.store.QueuedThreadIDs(ctx)
}

// Requeue puts a dead-lettered dispatch back in the queue as a new
// dispatch of the same run with a fresh attempt budget, and wakes the
// dispatcher. It returns the new dispatch.
func (m *Mailbox) Requeue(ctx context.Context, dispatchID string) (Dispatch, error) {
	if err := m.accepting(); err != nil {
		return Dispatch{}, err
	}
	d, err := m.store.Requeue(ctx, dispatchID, newID(), m.cfg.Now())
	if err != nil {
		return Dispatch{}, err // the store's error names the operation and the dispatch
	}
	// New work in the thread's queue, as a submit (found by review: the
	// requeued run waited behind a hold for another agent's slot).
	m.releaseAgentHold(d.ThreadID)
	m.kick()
	return d, nil
}

// Store is the store the mailbox runs on, for read-only inspection
// (run records, message logs, dead letters).
func (m *Mailbox) Store() Store { return m.store }
