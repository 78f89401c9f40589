package engine

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// reconcilePage and reclaimPage size the recovery and sweep batches. A
// reclaim page is one walk of the lease index (the Badger store commits
// it in chunks, each walking on from the one before): 1 000 lapsed
// leases after a crash take one page, not ten walks past the deletion
// markers that completed runs leave at the index's low end.
const (
	reconcilePage = 100
	reclaimPage   = 1000
)

// Start recovers the store (reclaims lapsed leases, settles runs of
// terminal dispatches, wakes orphaned background-task runs) and then
// starts the dispatcher, the maintenance loop and, for stores that offer
// signals, the signal loop. Recovery is tried StartupRecoveryAttempts
// times; if it still fails the error is returned and nothing is started
// (fail closed). Start on a running mailbox does nothing; concurrent
// Starts recover once. Start after Stop is an error.
func (m *Mailbox) Start(ctx context.Context) error {
	return m.start(ctx, true)
}

// StartBackground starts the loops at once and recovers in the
// background (a recovery failure is logged). Idempotent like Start.
func (m *Mailbox) StartBackground(ctx context.Context) error {
	return m.start(ctx, false)
}

func (m *Mailbox) start(ctx context.Context, ready bool) error {
	m.startMu.Lock()
	defer m.startMu.Unlock()
	m.mu.Lock()
	started, closing := m.started, m.closing
	m.mu.Unlock()
	if closing {
		return fmt.Errorf("mailbox start: stopped: %w", ErrShuttingDown)
	}
	if started {
		return nil
	}
	if ready {
		if err := sleepCtx(ctx, m.cfg.StartupDelay); err != nil {
			return err
		}
		var err error
		for i := 0; i < m.cfg.StartupRecoveryAttempts; i++ {
			if i > 0 {
				if err := sleepCtx(ctx, m.cfg.StartupRetryDelay); err != nil {
					return err
				}
			}
			if _, err = m.Recover(ctx); err == nil {
				break
			}
			m.log.Warn("startup recovery failed", "attempt", i+1, "err", err)
		}
		if err != nil {
			return fmt.Errorf("mailbox start: recovery: %w", err)
		}
	}
	loopCtx, stop := context.WithCancel(context.Background())
	src, signals := m.raw.(SignalSource)
	loops := 2
	if signals {
		loops++
	}
	if !ready {
		loops++
	}
	m.mu.Lock()
	if m.closing {
		// Stop ran while this Start was recovering: it found no loops to
		// stop, so none may start now.
		m.mu.Unlock()
		stop()
		return fmt.Errorf("mailbox start: stopped: %w", ErrShuttingDown)
	}
	m.started, m.loopStop = true, stop
	m.loops.Add(loops) // before a Stop can take m.mu and wait for them
	m.mu.Unlock()
	go m.dispatchLoop(loopCtx)
	go m.maintenanceLoop(loopCtx)
	if signals {
		go m.signalLoop(loopCtx, src)
	}
	if !ready {
		go func() {
			defer m.loops.Done()
			if sleepCtx(loopCtx, m.cfg.StartupDelay) != nil {
				return
			}
			if _, err := m.Recover(loopCtx); err != nil && loopCtx.Err() == nil {
				m.log.Error("background recovery failed", "err", err)
			}
		}()
	}
	m.kick()
	return nil
}

// sleepCtx sleeps d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stop shuts the mailbox down in stages: no new submits, no new claims;
// running attempts get until ctx is done to finish; the rest are cancelled
// and their dispatches released without spending an attempt. It returns
// once every goroutine it owns has stopped. Safe before Start and twice.
func (m *Mailbox) Stop(ctx context.Context) error {
	m.mu.Lock()
	m.closing = true
	stop := m.loopStop
	if m.idle == nil {
		m.idle = make(chan struct{})
	}
	idle := m.idle
	m.signalIdleLocked()
	m.mu.Unlock()
	if stop != nil {
		stop()
	}
	m.loops.Wait()
	select {
	case <-idle:
		return nil
	default:
	}
	// The drain, logged (found by review: a SIGTERM said nothing for the
	// whole grace): what it waits for, and what it puts back.
	began := time.Now()
	putBack := m.metrics.count(metricRuns, "outcome", OutcomeAbandoned.String())
	before := putBack.Get()
	args := []any{"running", m.runningCount()}
	if dl, ok := ctx.Deadline(); ok {
		args = append(args, "grace", time.Until(dl).Round(time.Millisecond))
	}
	m.log.Info("stopping: waiting for the running attempts", args...)
	select {
	case <-idle:
		// Ended within the grace, an attempt may still have been put back
		// (its agent went away, say): counted here too (found by review).
		m.log.Info("stopped: every attempt ended within the grace", "put_back", putBack.Get()-before, "took", time.Since(began).Round(time.Millisecond))
		return nil
	case <-ctx.Done():
	}
	// The grace is over: cancel what still runs (and what is still being
	// claimed: startExecution cancels it as it starts, m.closing is set);
	// an executor that holds cancelled attempts its agent still runs
	// gives them up after their own grace (Drainer).
	if d, ok := m.exec.(Drainer); ok {
		d.Drain()
	}
	m.mu.Lock()
	running := make([]*execution, 0, len(m.threads))
	for _, e := range m.threads {
		if !e.claiming {
			running = append(running, e)
		}
	}
	m.mu.Unlock()
	m.log.Info("stopping: the grace is over; cancelling the attempts still running (they go back to the queue unless they complete)", "running", len(running))
	for _, e := range running {
		e.cancel(errShutdown)
	}
	<-idle
	// What the drain put back in the queue (without spending an attempt),
	// and how long it took (found by review: the log ended with "stopped").
	m.log.Info("stopped", "put_back", putBack.Get()-before, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// runningCount is the number of attempts executing here.
func (m *Mailbox) runningCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, e := range m.threads {
		if !e.claiming {
			n++
		}
	}
	return n
}

// suspendedCount is the number of attempts executing here whose run
// waits on a tool call (a decision), under the suspended lease.
func (m *Mailbox) suspendedCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, e := range m.threads {
		if !e.claiming && e.suspended.Load() > 0 {
			n++
		}
	}
	return n
}

// Running reports whether Start succeeded and Stop has not begun.
func (m *Mailbox) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.started && !m.closing
}

// TakesCommands reports whether cancels, interrupts and live decisions
// are taken: once startup recovery is done, and through the shutdown
// drain, when running attempts may still be stopped or answered (found
// by review: a drain of --shutdown-grace refused the cancel of a run it
// was waiting for).
func (m *Mailbox) TakesCommands() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.started
}

// Recover reclaims every lapsed lease, settles the runs of terminal
// dispatches, lets the dispatcher serve queued threads, and wakes every
// run waiting on background tasks whose thread has nothing queued. It
// returns the number of reclaimed dispatches plus wakes. Errors propagate
// (recovery pages through everything or fails).
func (m *Mailbox) Recover(ctx context.Context) (int, error) {
	total := 0
	if or, ok := m.raw.(OrphanReclaimer); ok && !m.cfg.KeepOrphanedClaims {
		// The claims of the process before this one, reclaimed now rather
		// than when their leases lapse (found by review: after a SIGKILL
		// the runs sat still for up to a lease, and a suspended run for
		// ten minutes, with nothing in the log to say why).
		for {
			got, err := observe(m.metrics, "reclaim_orphans", func() ([]Dispatch, error) {
				return or.ReclaimOrphans(ctx, m.cfg.Now(), reclaimPage)
			}, func(d []Dispatch) bool { return len(d) == 0 })
			// What a failed call committed before its error is reported
			// too: the store has taken it off its list (found by review).
			total += len(got)
			m.metrics.add("reclaim_dispatch", len(got))
			m.reclaimed(ctx, got, "claims of an earlier sidecar process reclaimed", deadLetterRestart)
			if len(got) > 0 {
				// Work went back to its old place in the ready order, as
				// a lapse's reclaim puts it (instrumentedStore.ReclaimExpired).
				m.putBack("")
			}
			if err != nil {
				return total, fmt.Errorf("reclaim the claims of an earlier process: %w", err)
			}
			if len(got) < reclaimPage {
				break
			}
		}
	}
	for {
		got, err := m.store.ReclaimExpired(ctx, m.cfg.Now(), reclaimPage)
		if err != nil {
			return total, fmt.Errorf("reclaim expired leases: %w", err)
		}
		total += len(got)
		m.metrics.add("reclaim_dispatch", len(got))
		m.reclaimed(ctx, got, "lapsed leases reclaimed", deadLetterLease)
		if len(got) < reclaimPage {
			break
		}
	}
	if err := m.reconcileTerminal(ctx); err != nil {
		return total, err
	}
	queued, err := m.store.QueuedThreadIDs(ctx)
	if err != nil {
		return total, fmt.Errorf("queued threads: %w", err)
	}
	busy := make(map[string]bool, len(queued))
	for _, t := range queued {
		busy[t] = true
	}
	// Collect first, then submit: submitting changes the listing.
	var wake []RunRecord
	for offset := 0; ; {
		page, err := m.store.ListRuns(ctx, RunQuery{Status: RunWaiting, Offset: offset, Limit: MaxRunPage})
		if err != nil {
			return total, fmt.Errorf("list waiting runs: %w", err)
		}
		for _, r := range page.Items {
			if r.IsBackgroundTaskWaiting() && !busy[r.ThreadID] {
				wake = append(wake, r)
			}
		}
		offset += len(page.Items)
		if !page.HasMore || len(page.Items) == 0 {
			break
		}
	}
	for _, r := range wake {
		content := []byte(`"<background-tasks-updated />"`)
		_, err := m.SubmitBackground(ctx, SubmitRequest{
			ThreadID: r.ThreadID, AgentID: r.AgentID, ContinueRunID: r.RunID,
			Origin: OriginInternal, RunMode: ModeInternalWake, Adapter: AdapterInternal,
			Messages: []Message{{Role: RoleUser, Content: content, Visibility: "internal"}},
		})
		if err != nil {
			return total, fmt.Errorf("wake background-task run %s: %w", r.RunID, err)
		}
		total++
	}
	m.kick()
	return total, nil
}

// reconcileTerminal settles the runs of terminal dispatches listed since
// the last call (a high-water mark, not a full rescan). The Badger store
// settles runs in the same commit already; this is the safety net for
// stores that cannot.
func (m *Mailbox) reconcileTerminal(ctx context.Context) error {
	m.reconcileMu.Lock()
	defer m.reconcileMu.Unlock()
	cursor := m.termAfter
	defer func() {
		// Next time start a little before the newest dispatch seen: a
		// terminal dispatch committed after this scan with an older
		// updated_at (another process's clock) is still found.
		if cursor.UpdatedAt-reconcileOverlap.Milliseconds() > m.termAfter.UpdatedAt {
			m.termAfter = TerminalCursor{UpdatedAt: cursor.UpdatedAt - reconcileOverlap.Milliseconds()}
		}
	}()
	for {
		page, err := m.store.ListTerminal(ctx, cursor, reconcilePage)
		if err != nil {
			return fmt.Errorf("list terminal dispatches: %w", err)
		}
		m.metrics.add("reconcile_terminal_dispatch", len(page))
		waiting := m.anyWaiting() // else no acked dispatch has a stream to end here
		// A page's runs are read (and settled) reconcileFanout at a time:
		// one after another, each a round trip to a shared store, they
		// were most of a restart's wait on NATS (found by measuring).
		var wg sync.WaitGroup
		slots := make(chan struct{}, reconcileFanout)
		for i := range page {
			d := &page[i]
			if d.Status == StatusAcked {
				if waiting {
					m.reconcileDispatch(ctx, d) // no read: ends a stream
				}
				continue
			}
			slots <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-slots }()
				m.reconcileDispatch(ctx, d)
			}()
		}
		wg.Wait()
		if len(page) > 0 {
			cursor = CursorAfter(&page[len(page)-1])
		}
		if len(page) < reconcilePage {
			return nil
		}
	}
}

// reconcileFanout is how many terminal dispatches of a page a
// reconciliation settles at once.
const reconcileFanout = 8

// reconcileOverlap is how far back each reconciliation pass starts
// before the newest terminal dispatch the previous pass saw.
const reconcileOverlap = time.Minute

// reclaimed settles what a reclaim returned (of lapsed leases, or of an
// earlier process's claims): a dispatch whose reclaim spent its last
// attempt is dead-lettered (counted under deadLetterCause), and its run
// is settled; the reclaims are logged, what with a summary.
func (m *Mailbox) reclaimed(ctx context.Context, got []Dispatch, what, deadLetterCause string) {
	if len(got) == 0 {
		return
	}
	dead := 0
	for i := range got {
		d := &got[i]
		if d.Status == StatusDeadLetter {
			dead++
			m.metrics.count(metricDeadLetter, "cause", deadLetterCause).Inc()
		}
		// One line per dispatch, with its ids, for the first few of a
		// page; the summary counts them all (found by review: reclaims
		// left no trace in the log).
		// A dead letter is a warning, as every other cause's is (found
		// by review: those of a restart were at info, missed by a
		// warn-level filter).
		level := slog.LevelInfo
		if d.Status == StatusDeadLetter {
			level = slog.LevelWarn
		}
		if i < reclaimLogLines {
			m.log.Log(ctx, level, "reclaimed", "thread_id", d.ThreadID, "run_id", d.RunID, "dispatch_id", d.DispatchID,
				"attempts", d.AttemptCount, "status", d.Status, "reason", d.LastError)
		}
		m.reconcileDispatch(ctx, d)
	}
	level := slog.LevelInfo
	if dead > 0 {
		level = slog.LevelWarn
	}
	m.log.Log(ctx, level, what, "count", len(got), "dead_lettered", dead, "requeued", len(got)-dead)
}

// reclaimLogLines bounds the per-dispatch lines of one page of reclaims.
const reclaimLogLines = 10

// reconcileDispatch settles the run of a cancelled, superseded or
// dead-lettered dispatch if it is still open. Its operation is counted
// "empty" when the run was settled already (the Badger store settles it
// in the dispatch's own commit; a sweep reads the last minute's terminal
// dispatches again), so that the count moves only on a real mark (found
// by review: it rose at every idle sweep).
func (m *Mailbox) reconcileDispatch(ctx context.Context, d *Dispatch) {
	var op string
	switch d.Status {
	case StatusAcked:
		// Acked elsewhere (another sidecar sharing the store ran it): a
		// submitter here still waiting for it learns how it ended now, not
		// at the next GC, up to a minute later (found by the crash test of
		// two sidecars on one NATS queue: a stream open 30 s). A run acked
		// here has no waiting log left.
		m.endPendingOne(d, endedElsewhere)
		return
	case StatusCancelled:
		op = "mark_run_cancelled"
	case StatusSuperseded:
		op = "mark_run_superseded"
	case StatusDeadLetter:
		op = "mark_run_dead_letter"
	default:
		return
	}
	_, err := observe(m.metrics, op, func() (bool, error) {
		marked := false
		err := m.updateRun(ctx, d.ThreadID, d.RunID, func(r *RunRecord) bool {
			if d.RequeuedAs != "" || r.DispatchID != "" && r.DispatchID != d.DispatchID {
				// An operator requeued this dead letter: the run is the
				// new dispatch's now, reopened, and must stay so.
				return false
			}
			marked = r.Settle(d, m.cfg.Now()/1000)
			return marked
		})
		if errors.Is(err, ErrNotFound) {
			return false, nil
		}
		return marked, err
	}, func(marked bool) bool { return !marked })
	if err != nil && !errors.Is(err, ErrNotFound) {
		m.log.Warn("settle run of terminal dispatch failed", "dispatch_id", d.DispatchID, "run_id", d.RunID, "err", err)
	}
	// A client following the run (Attach after a restart) learns how it
	// ended now, not at the next GC.
	if d.Status == StatusDeadLetter {
		m.endPending([]Dispatch{*d}, endedElsewhere)
	} else {
		m.withdrawPending(*d)
	}
}

// dispatchLoop claims due work whenever agent slots are free: after every
// submit and finished attempt, when agents come and go, and when the
// earliest delayed dispatch falls due.
func (m *Mailbox) dispatchLoop(ctx context.Context) {
	defer m.loops.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		m.watch.dispatch.busy()
		// Agents that came or went before this pass are taken in first:
		// its claims then see them (capSeen), and a refusal they answer
		// sets its hold. Left to the select below, a change already
		// signalled could be taken after a claim it preceded, and the
		// refused thread was claimed and refused again (found in CI).
		select {
		case <-m.exec.CapacityChanged():
			m.agentsChanged()
		default:
		}
		next := m.dispatchReady(ctx)
		m.watch.dispatch.idle()
		wait := time.Hour
		if next > 0 {
			wait = max(time.Duration(next-m.cfg.Now())*time.Millisecond, time.Millisecond)
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-m.wake:
		case <-m.exec.CapacityChanged():
			m.agentsChanged()
		case <-timer.C:
		}
	}
}

// agentsChanged takes in that agents came or went (the executor's
// CapacityChanged): the holds of threads set aside for lack of an agent
// end, but those for agent ids still served by none.
func (m *Mailbox) agentsChanged() {
	unserved := m.stillUnserved()
	m.mu.Lock()
	m.capChanges++
	m.releaseAgentHoldsLocked(unserved)
	m.mu.Unlock()
}

// dispatchReady starts due work on free slots, oldest waiting thread
// first, and returns when the next delayed dispatch falls due (0: none
// known).
func (m *Mailbox) dispatchReady(ctx context.Context) int64 {
	listedAgain := false // a round whose claims all came back empty was listed once more
	for round := 0; round < 64; round++ {
		// Read before anything is listed: a submit's mark after it is not
		// cleared by this round, whose listing may not show its work.
		gen := m.starved.generation()
		now := m.cfg.Now()
		m.mu.Lock()
		free := m.exec.Capacity() - m.inFlight
		here := len(m.threads)
		closing := m.closing
		nHeld, heldUntil := m.holdsLocked(now)
		// The threads held at the head of the ready order are not listed
		// again while they stay held (heldprefix.go).
		prefix := m.heldPrefixLocked(now)
		unlisted := max(nHeld-prefix.n, 0)
		if prefix.n > 0 {
			// A hold in it that lapses is tried at the next listing from
			// the start: the dispatcher wakes for it.
			heldUntil = earliest(heldUntil, prefix.listedAt+heldPrefixMaxAgeMs)
		}
		m.mu.Unlock()
		if closing {
			m.starved.clearAlways()
			return 0
		}
		if free <= 0 {
			// Woken while every slot is taken: a thread is waiting if the
			// ready index lists one (it lists no thread holding a claim,
			// so none of those executing here). If not, finishing
			// attempts go on claiming their own thread's next dispatch.
			// Nor is one yet when the earliest delayed dispatch is still
			// to fall due: the dispatcher looks again then (it would
			// otherwise sleep until the next kick, and a finishing attempt
			// would hand its slot to its own thread's newer work).
			grace := m.sharedClaimGrace()
			threads, next, err := m.store.ReadyThreads(ctx, m.cfg.Now()-grace, prefix.last, 1+unlisted)
			m.mu.Lock()
			if err == nil {
				m.notePrefixLocked(threads, prefix, now, now)
				heldUntil = earliest(heldUntil, m.prefixAgedLocked())
			}
			// A thread held for a full agent waits for that agent's slot.
			busy := m.prefixBusyLocked(now, nil)
			for _, t := range threads {
				if h, ok := m.held[t.ThreadID]; ok && h.busy && h.until > now {
					if busy == nil {
						busy = map[string]struct{}{}
					}
					busy[h.busyFor] = struct{}{}
				}
			}
			m.noteBusyWaitingLocked(busy)
			threads = m.notHeldLocked(threads, now)
			m.mu.Unlock()
			starved := err != nil || len(threads) > 0
			m.starved.setTo(starved, gen)
			if starved && m.slotFree() {
				// A slot was let go while the store listed (a signal's
				// probe that found nothing): it read starved as false and
				// did not wake the dispatcher (found by review).
				continue
			}
			if err != nil {
				return m.cfg.Now() + 1000
			}
			if next > 0 {
				next += grace
			}
			return earliest(next, heldUntil)
		}
		// Threads still held here are skipped (their attempt claims
		// their next dispatch as it finishes); one more than fits tells
		// whether a thread is left waiting for a slot.
		// On a shared store, work that fell due a moment ago is left to
		// its submitter and its signal (SharedClaimGrace); it comes back
		// here once the grace has passed.
		grace := m.sharedClaimGrace()
		threads, next, err := m.store.ReadyThreads(ctx, m.cfg.Now()-grace, prefix.last, free+here+unlisted+1)
		if err != nil {
			m.starved.set()
			m.log.Warn("list ready threads failed", "err", err)
			return m.cfg.Now() + 1000
		}
		if next > 0 {
			next += grace
		}
		next = earliest(next, heldUntil)
		m.mu.Lock()
		// The threads the held prefix counts are its to admit.
		threads = threads[m.notePrefixLocked(threads, prefix, now, now):]
		// Foreground submits waiting for a slot go first (foreground.go).
		threads = m.foregroundFirstLocked(threads)
		next = earliest(next, m.prefixAgedLocked())
		var budget slotBudget
		if m.busyHeldLocked(threads, now) {
			m.mu.Unlock()
			budget = m.countFreeSlots()
			m.mu.Lock()
		}
		free = m.exec.Capacity() - m.inFlight
		// The held prefix's threads waiting for a full agent are the
		// oldest: they are admitted first, as that agent has free slots.
		fromPrefix := m.admitPrefixLocked(now, &budget, free, nil)
		waiting := threads[:0]
		var busyLeft map[string]struct{} // agents whose held threads stay held
		for _, t := range threads {
			if m.threads[t.ThreadID] != nil || slices.ContainsFunc(fromPrefix, func(e ReadyEntry) bool { return e.ThreadID == t.ThreadID }) {
				continue // running here, or admitted from the held prefix already
			}
			if !m.admitLocked(t.ThreadID, now, &budget, len(fromPrefix)+len(waiting) < free) {
				if h := m.held[t.ThreadID]; h.busy && h.until > now {
					if busyLeft == nil {
						busyLeft = map[string]struct{}{}
					}
					busyLeft[h.busyFor] = struct{}{}
				}
				continue
			}
			waiting = append(waiting, t)
		}
		m.noteBusyWaitingLocked(m.prefixBusyLocked(now, busyLeft))
		m.mu.Unlock()
		m.starved.setTo(len(fromPrefix)+len(waiting) > free, gen)
		threads = waiting[:min(len(waiting), max(free-len(fromPrefix), 0))]
		if len(fromPrefix) > 0 {
			threads = append(fromPrefix, threads...)
		}
		// Claim concurrently: the claims share the store's group commits.
		var wg sync.WaitGroup
		var started, failed, corrupt, empty atomic.Bool
		for _, e := range threads {
			t := e.ThreadID
			wg.Go(func() {
				r := m.tryDispatch(ctx, t)
				if r != attemptClaimed {
					m.notClaimed(t) // admitted from a hold, it does not run
				}
				switch r {
				case attemptClaimed:
					started.Store(true)
				case attemptError:
					failed.Store(true)
				case attemptCorrupt:
					corrupt.Store(true)
				case attemptNoSlot:
					m.starved.set()
				case attemptNone:
					empty.Store(true)
					m.foregroundTried(t)
				}
			})
		}
		wg.Wait()
		if failed.Load() || corrupt.Load() {
			// Due work is waiting on a failing store: try again soon, not
			// only at the next sweep. The failed threads are held
			// (claimhold.go), and still are then: half their hold, so
			// that the look serves the threads behind them. At a second,
			// as their holds lapsed, it tried the failed thread again
			// first, and with one free slot the threads behind it waited
			// for a wake from elsewhere (a stress run of the suite found
			// it).
			next = earliest(next, m.cfg.Now()+claimHoldFirst.Milliseconds()/2)
		}
		// A thread whose record is damaged fails alone: the next round
		// serves the threads behind it at once. Other failures may be the
		// whole store's (a full disk): the dispatcher waits, as it does
		// when nothing started.
		if !started.Load() && !corrupt.Load() {
			// A listed thread with nothing to claim (work claimed
			// elsewhere a moment ago, or stale entries an interrupt cut
			// short left, which the claim superseded) took a slot's turn
			// from the threads behind it: list once more, not only at
			// the next wake (found by review: with one free slot the
			// next thread waited for the sweep).
			if empty.Load() && !listedAgain {
				listedAgain = true
				continue
			}
			return next
		}
	}
	return m.cfg.Now() + 1
}

// slotFree reports whether a slot is free now and Stop has not begun.
func (m *Mailbox) slotFree() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.closing && m.exec.Capacity()-m.inFlight > 0
}

// earliest is the earlier of two wake times (0: none).
func earliest(a, b int64) int64 {
	if a == 0 || (b != 0 && b < a) {
		return b
	}
	return a
}

// sharedClaimGrace is SharedClaimGrace in ms on a store shared between
// processes (one that offers signals), else 0.
func (m *Mailbox) sharedClaimGrace() int64 {
	if _, shared := m.raw.(SignalSource); !shared || m.cfg.SharedClaimGrace <= 0 {
		return 0
	}
	return m.cfg.SharedClaimGrace.Milliseconds()
}

// maintenanceLoop reclaims lapsed leases and reconciles on every sweep,
// and purges old terminal dispatches and retained event logs on every GC.
func (m *Mailbox) maintenanceLoop(ctx context.Context) {
	defer m.loops.Done()
	sweep := time.NewTicker(m.cfg.SweepInterval)
	defer sweep.Stop()
	gc := time.NewTicker(m.cfg.GCInterval)
	defer gc.Stop()
	// Claims a previous process left behind (it was killed mid-run) lapse
	// within one lease of this start — the suspended lease for a run that
	// waited on a tool call; while any remain, sweep often, so their
	// threads are served when the lease lapses, not up to a sweep interval
	// later. On a store of this process alone only while it holds claims
	// this process did not make; on a shared store, where the other claims
	// are other sidecars' live work and cannot be told apart, for the
	// whole window (found by review: README promised it on NATS too, and a
	// restarted sidecar's runs waited up to a sweep interval past their
	// lease).
	_, shared := m.raw.(SignalSource)
	orphansUntil := time.Now().Add(max(m.cfg.Lease, m.cfg.SuspendedLease) + time.Second)
	orphanTicker := time.NewTicker(min(m.cfg.SweepInterval, max(m.cfg.Lease/10, 100*time.Millisecond)))
	defer orphanTicker.Stop()
	orphans := orphanTicker.C
	// On a shared store a queued foreground run may run and end on another
	// sidecar; its submitter here learns it within waitingInterval.
	var waiting <-chan time.Time
	if shared {
		t := time.NewTicker(waitingInterval)
		defer t.Stop()
		waiting = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-orphans:
			if time.Now().After(orphansUntil) {
				orphans = nil
				continue
			}
			m.watch.maintenance.busy()
			if shared || m.foreignClaims(ctx) {
				m.reclaimLapsed(ctx)
				m.kick()
			}
		case <-waiting:
			if !m.anyWaiting() {
				continue
			}
			m.watch.maintenance.busy()
			m.endWaiting(ctx, waitingPerPoll)
		case <-sweep.C:
			m.watch.maintenance.busy()
			m.Sweep(ctx)
		case <-gc.C:
			m.watch.maintenance.busy()
			m.GC(ctx)
			m.watch.maintenance.idle() // the callback is the caller's (value-log GC may take long)
			if m.cfg.MaintenanceCallback != nil {
				m.cfg.MaintenanceCallback()
			}
		}
		m.watch.maintenance.idle()
	}
}

// waitingInterval is how often, on a shared store, the dispatches of
// queued foreground runs waiting here are read for an end elsewhere.
const waitingInterval = time.Second

// waitingPerPoll bounds the dispatches one such poll reads (each a round
// trip to a shared store, on the maintenance loop): with more streams
// waiting, each is read every len/waitingPerPoll seconds on average (the
// map's random order), and GC reads them all.
const waitingPerPoll = 64

// anyWaiting reports whether a queued foreground run's stream waits here.
func (m *Mailbox) anyWaiting() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pending) > len(m.unwritten)
}

// foreignClaims reports whether the store holds claims this process did
// not make (more claimed dispatches than attempts here).
func (m *Mailbox) foreignClaims(ctx context.Context) bool {
	c, err := m.store.CountByStatus(ctx)
	if err != nil {
		return false
	}
	m.mu.Lock()
	ours := len(m.threads)
	m.mu.Unlock()
	return c.Get(StatusClaimed) > int64(ours)
}

// Sweep reclaims lapsed leases (re-queued ones are dispatched again) and
// reconciles terminal dispatches.
func (m *Mailbox) Sweep(ctx context.Context) {
	m.reclaimLapsed(ctx)
	if err := m.reconcileTerminal(ctx); err != nil {
		m.log.Warn("sweep: reconcile failed", "err", err)
	}
	m.kick()
}

// reclaimLapsed is Sweep's reclaim of lapsed leases, without its
// reconciliation.
func (m *Mailbox) reclaimLapsed(ctx context.Context) {
	for {
		got, err := m.store.ReclaimExpired(ctx, m.cfg.Now(), reclaimPage)
		if err != nil {
			// Once a minute: a store that refuses writes (a full disk)
			// fails every sweep, every --lease/10 after a start (found by
			// review: a line every 3 s; the store logs the cause once).
			if now := time.Now().UnixMilli(); now-m.reclaimWarnAt.Load() >= time.Minute.Milliseconds() {
				m.reclaimWarnAt.Store(now)
				m.log.Warn("sweep: reclaim failed (said at most once a minute)", "err", err)
			}
			break
		}
		m.metrics.add("reclaim_dispatch", len(got))
		m.reclaimed(ctx, got, "lapsed leases reclaimed", deadLetterLease)
		if len(got) < reclaimPage {
			break
		}
	}
}

// GC purges terminal dispatches older than GCTTL and forgets event logs
// retained longer than EventRetention.
func (m *Mailbox) GC(ctx context.Context) {
	now := m.cfg.Now()
	if n, err := m.store.PurgeTerminal(ctx, now-m.cfg.GCTTL.Milliseconds()); err != nil {
		m.log.Warn("gc: purge failed", "err", err)
	} else if n > 0 {
		m.metrics.add("purged", n)
		m.log.Info("gc: purged terminal dispatches", "count", n)
	}
	m.mu.Lock()
	for t, l := range m.logs {
		if at, closed := l.ClosedAt(); closed && now-at > m.cfg.EventRetention.Milliseconds() {
			delete(m.logs, t)
		}
	}
	m.mu.Unlock()
	m.endWaiting(ctx, math.MaxInt)
}

// endWaiting ends the streams of queued foreground runs here whose
// dispatches ended without starting here (on another sidecar sharing the
// store, withdrawn, or purged): every GC, and on a shared store every
// second while any wait (waitingInterval).
func (m *Mailbox) endWaiting(ctx context.Context, limit int) {
	type wait struct {
		id   string
		from uint32
	}
	m.mu.Lock()
	waiting := make([]wait, 0, min(len(m.pending), limit))
	for id, l := range m.pending { // in random order: a limited pass reads others next time
		if len(waiting) == limit {
			break
		}
		if _, ok := m.unwritten[id]; !ok { // its dispatch may not exist yet
			waiting = append(waiting, wait{id, l.waitFrom})
		}
	}
	m.mu.Unlock()
	var purged []string
	var withdrawn, elsewhere, failed []Dispatch
	for _, w := range waiting {
		d, err := m.store.LoadDispatch(ctx, w.id)
		switch {
		case err != nil:
		case d == nil:
			purged = append(purged, w.id)
		case d.Status == StatusSuperseded || d.Status == StatusCancelled:
			withdrawn = append(withdrawn, *d)
		case d.Status.Terminal():
			elsewhere = append(elsewhere, *d) // it ran elsewhere: its stream says how it ended
		case d.AttemptCount > w.from:
			failed = append(failed, *d) // an attempt failed elsewhere: retried
		}
	}
	m.withdrawPending(withdrawn...)
	m.endPending(elsewhere, endedElsewhere)
	m.endPendingRetried(failed)
	m.dropPending(purged...)
}

// endPendingRetried ends the waiting logs of dispatches whose attempt
// failed elsewhere and is retried as a local attempt's failure ends its
// stream: a run_finish with the error and retry_at, after which the
// client re-attaches to follow the retry (found by review: a submitter on
// a sidecar that did not run the attempt waited out every retry, and
// learned of none).
func (m *Mailbox) endPendingRetried(ds []Dispatch) {
	now := m.cfg.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range ds {
		d := &ds[i]
		l := m.pending[d.DispatchID]
		if l == nil || d.AttemptCount <= l.waitFrom {
			continue // taken by an attempt here, or waiting anew
		}
		delete(m.pending, d.DispatchID)
		msg := d.LastError
		if msg == "" {
			msg = "attempt failed"
		}
		l.number(unstartedBase(0), 0)
		l.appendTyped("run_finish", finishEvent(d, d.InstanceID, ErrorTermination(msg), max(d.AvailableAt, 1), ""))
		l.Close(now)
	}
}

// retainClosed counts a log just closed against EventRetentionBytes;
// once half of it was closed since the last look, the finished runs'
// logs are looked over (trimRetained).
func (m *Mailbox) retainClosed(l *EventLog) {
	b, _, _ := l.retained()
	if m.closedSince.Add(b) > m.cfg.EventRetentionBytes/2 {
		m.trimRetained()
	}
}

// trimRetained forgets the logs of the runs that finished first until
// the finished runs' logs keep at most half of EventRetentionBytes, when
// they keep more than all of it: a pass over the thread's logs once per
// half of the budget closed.
func (m *Mailbox) trimRetained() {
	type kept struct {
		thread    string
		at, bytes int64
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closedSince.Store(0)
	var closed []kept
	total := int64(0)
	for t, l := range m.logs {
		if b, at, ok := l.retained(); ok {
			closed = append(closed, kept{t, at, b})
			total += b
		}
	}
	if total <= m.cfg.EventRetentionBytes {
		return
	}
	slices.SortFunc(closed, func(a, b kept) int { return cmp.Compare(a.at, b.at) })
	dropped := 0
	for _, k := range closed {
		if total <= m.cfg.EventRetentionBytes/2 {
			break
		}
		delete(m.logs, k.thread)
		total -= k.bytes
		dropped++
	}
	m.log.Info("finished runs' events forgotten before their retention: past the bytes kept for re-attachment",
		"runs", dropped, "kept_bytes", total, "budget_bytes", m.cfg.EventRetentionBytes)
}

// LiveDelivery says how a live submit was handled.
type LiveDelivery string

// Deliveries of SendMessages.
const (
	DeliveredLive   LiveDelivery = "live"
	DeliveredQueued LiveDelivery = "queued"
)

// SendMessages is live-then-queue (seed submit_live_then_queue): the
// messages are appended to the thread log durably first; then they are
// offered to the run executing on the thread (if expectedRunID is set it
// must be that run), once a claim or hand-over of the thread in flight
// here has settled (waiting at most CancelWait). If the run accepts them
// in time they are delivered live; otherwise a background run activates
// those same logged messages.
//
// With a dedupe key, a repeat appends nothing: while the dispatch the
// first request queued is not terminal it answers that dispatch, and
// while the attempt that took the first request's messages live runs
// here it answers that attempt as delivered. Repeats are serialised per
// (thread, key) in this process; between sidecars sharing a store a
// concurrent repeat can still append twice (engine/README.md).
func (m *Mailbox) SendMessages(ctx context.Context, req SubmitRequest, expectedRunID string) (SubmitResult, LiveDelivery, error) {
	if err := m.accepting(); err != nil {
		return SubmitResult{}, "", err
	}
	if err := validateRunInputs(&req); err != nil {
		return SubmitResult{}, "", err
	}
	if len(req.Messages) == 0 {
		res, err := m.SubmitBackground(ctx, req)
		return res, DeliveredQueued, err
	}
	if key := req.DedupeKey; key != "" {
		unlock := m.keyLocks.lock(req.ThreadID + "\x00" + key)
		defer unlock()
		res, ok, err := m.existingByDedupe(ctx, req.ThreadID, key)
		if err != nil {
			return SubmitResult{}, "", fmt.Errorf("submit to %s: %w", req.ThreadID, err)
		}
		if ok {
			return res, DeliveredQueued, nil
		}
		if res, ok := m.deliveredLiveBefore(req.ThreadID, key); ok {
			return res, DeliveredLive, nil
		}
	}
	// What the queued half would refuse is refused before the messages
	// are logged: a failed request leaves nothing behind.
	if err := m.precheckSubmit(ctx, &req); err != nil {
		return SubmitResult{}, "", fmt.Errorf("submit to %s: %w", req.ThreadID, err)
	}
	req.Messages = normalizeMessageIDs(req.Messages)
	recs, err := m.appendMessages(ctx, req.ThreadID, req.Messages)
	if err != nil {
		return SubmitResult{}, "", err
	}
	// A request that carries decisions is not offered live: the live
	// offer carries messages only, and its decisions were dropped with a
	// "live" answer (found by review). The queued run carries both.
	if len(req.Decisions) > 0 {
		return m.queueLogged(ctx, req)
	}
	// A claim or hand-over of the thread in flight here is waited for, as
	// a cancel waits: the messages are for the run that comes out of it.
	e := m.settledEntry(ctx, req.ThreadID)
	if e != nil && !e.claiming {
		if (expectedRunID == "" || expectedRunID == e.dispatch.RunID) && m.command(ctx, e, Command{Kind: CommandMessages, Messages: recs}) {
			if req.DedupeKey != "" {
				m.mu.Lock()
				e.rememberLiveKey(req.DedupeKey)
				m.mu.Unlock()
			}
			return SubmitResult{DispatchID: e.dispatch.DispatchID, RunID: e.dispatch.RunID, ThreadID: req.ThreadID, Status: SubmitRunning}, DeliveredLive, nil
		}
	} else if router, ok := m.raw.(LiveRouter); ok {
		// The thread may be running in another process.
		target, ok, err := m.threadTarget(ctx, req.ThreadID, false)
		if err != nil {
			return SubmitResult{}, "", err
		}
		if ok && (expectedRunID == "" || expectedRunID == target.RunID) {
			delivered, err := router.DeliverLive(ctx, target, LiveCommand{Kind: LiveMessages, Messages: recs})
			if err != nil {
				// The messages are logged: a delivery that fails falls
				// back to the queue (store.md rule 16), as one not taken
				// does. An error answered after they were logged left them
				// there with no run for them, and the client's retry logged
				// them again (found by review: a command over the NATS
				// server's max_payload).
				m.log.Warn("live delivery to another process failed; the messages are queued", "thread_id", req.ThreadID, "run_id", target.RunID, "err", err)
			}
			if delivered {
				did := target.DispatchID
				if did == "" {
					did = target.RunID
				}
				return SubmitResult{DispatchID: did, RunID: target.RunID, ThreadID: req.ThreadID, Status: SubmitRunning}, DeliveredLive, nil
			}
		}
	}
	return m.queueLogged(ctx, req)
}

// queueLogged is live-then-queue's fallback: a background run that
// activates the messages SendMessages logged already, by id.
func (m *Mailbox) queueLogged(ctx context.Context, req SubmitRequest) (SubmitResult, LiveDelivery, error) {
	req.messagesLogged = true
	res, err := m.SubmitBackground(ctx, req)
	return res, DeliveredQueued, err
}

// maxLiveKeys is how many dedupe keys of messages taken live an attempt
// remembers: the newest. A repeat of an older one appends its messages
// again. Unbounded, a client that sent a long-running run 100 000 live
// messages, each with its own key, held 36 MiB of keys until the run
// ended (bench/README.md, the thirty-sixth session's review).
const maxLiveKeys = 4096

// rememberLiveKey records key as taken live by e's attempt, forgetting
// the oldest past maxLiveKeys. Mailbox.mu held.
func (e *execution) rememberLiveKey(key string) {
	if _, ok := e.liveKeys[key]; ok {
		return
	}
	if e.liveKeys == nil {
		e.liveKeys = make(map[string]struct{})
	}
	e.liveKeys[key] = struct{}{}
	if len(e.liveKeyRing) < maxLiveKeys {
		e.liveKeyRing = append(e.liveKeyRing, key)
		return
	}
	delete(e.liveKeys, e.liveKeyRing[e.liveKeyNext])
	e.liveKeyRing[e.liveKeyNext] = key
	e.liveKeyNext = (e.liveKeyNext + 1) % maxLiveKeys
}

// deliveredLiveBefore answers a repeat of a live-then-queue submit whose
// messages the attempt executing on the thread here took live.
func (m *Mailbox) deliveredLiveBefore(thread, key string) (SubmitResult, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.threads[thread]
	if e == nil || e.claiming {
		return SubmitResult{}, false
	}
	if _, ok := e.liveKeys[key]; !ok {
		return SubmitResult{}, false
	}
	return SubmitResult{DispatchID: e.dispatch.DispatchID, RunID: e.dispatch.RunID, ThreadID: thread, Status: SubmitRunning}, true
}

// appendMessages appends messages to a thread log (guarded, retried).
func (m *Mailbox) appendMessages(ctx context.Context, thread string, msgs []Message) ([]MessageRecord, error) {
	unlock := m.locks.lock(thread)
	defer unlock()
	for attempt := 0; ; attempt++ {
		count, err := m.store.MessageCount(ctx, thread)
		if err != nil {
			return nil, err
		}
		recs, err := m.store.Checkpoint(ctx, Checkpoint{ThreadID: thread, ExpectedCount: count, Messages: msgs, CreatedAt: m.cfg.Now()})
		var conflict *ConflictError
		if errors.As(err, &conflict) && attempt < maxAppendRetries {
			continue
		}
		return recs, err
	}
}

// SendDecision delivers a tool-call decision to the run whose run,
// dispatch or thread id is id: the attempt executing here — once a claim
// or hand-over of its thread in flight here has settled (waiting at most
// CancelWait) — or, on a store that routes live commands, the one
// executing in another process. It reports whether the agent accepted it
// in time; false when no run took it (seed send_decision_live).
func (m *Mailbox) SendDecision(ctx context.Context, id string, d Decision) (bool, error) {
	if err := ValidateID("id", id); err != nil {
		return false, err
	}
	if err := ValidateID("call_id", d.CallID); err != nil {
		return false, err
	}
	if err := ValidateRawJSON(d.Resume); err != nil {
		return false, Validationf("decision %s: resume %v", d.CallID, err)
	}
	// A claim or hand-over of the target's thread in flight here is waited
	// for, as a cancel waits: the decision may be for the run that comes
	// out of it.
	if e := m.executingSettled(ctx, id); e != nil {
		return m.command(ctx, e, Command{Kind: CommandDecision, Decisions: []Decision{d}}), nil
	}
	return m.deliverElsewhere(ctx, id, LiveCommand{Kind: LiveDecision, Decisions: []Decision{d}})
}

// command hands a live command to an executing attempt and waits up to
// CommandTimeout for the agent's receipt. No receipt means not delivered.
func (m *Mailbox) command(ctx context.Context, e *execution, c Command) bool {
	ok := m.sendCommand(ctx, e, c)
	kind := "messages"
	if c.Kind == CommandDecision {
		kind = "decision"
	}
	result := "delivered"
	if !ok {
		result = "not_delivered"
	}
	m.metrics.count(metricLive, "kind", kind, "result", result).Inc()
	return ok
}

// commandAnswerSlack is how long past a command's deadline the engine
// still waits for the executor's answer, which comes by the deadline.
const commandAnswerSlack = 50 * time.Millisecond

func (m *Mailbox) sendCommand(ctx context.Context, e *execution, c Command) bool {
	reply := make(chan error, 1)
	c.Reply = reply
	c.Deadline = time.Now().Add(m.cfg.CommandTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(c.Deadline) {
		c.Deadline = d
	}
	t := time.NewTimer(time.Until(c.Deadline))
	defer t.Stop()
	select {
	case e.commands <- c:
	case <-e.done:
		return false
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
	// Handed over, the executor answers by the deadline (the hub's own
	// timer ends its wait then): a little slack more lets its answer,
	// not a tie of two timers, decide (found by review: an ACK between
	// the two counted delivered at the hub while the engine fell back).
	t.Reset(time.Until(c.Deadline) + commandAnswerSlack)
	select {
	case err := <-reply:
		return err == nil
	case <-e.done:
		// The run may have ended right after it accepted the command:
		// an answer already given wins over the end (select picks at
		// random among ready cases).
		select {
		case err := <-reply:
			return err == nil
		default:
			return false
		}
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}
