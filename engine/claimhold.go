package engine

import (
	"errors"
	"strings"
	"time"
)

// Threads whose claims fail are set aside (held) by the dispatcher for a
// while, so that a thread the store cannot claim — its next dispatch or
// its state damaged on the disk (ErrCorrupt), a read that keeps failing —
// does not take an agent slot at every pass and starve the threads behind
// it (with one slot it took the only one, for good). A held thread is
// tried again once its delay has passed: one second, doubling up to a
// minute while its claims fail with ErrCorrupt (nothing will change until
// an operator acts); other errors, which a whole store shares (a full
// disk, a closed store), keep one second. The dispatcher looks again
// half a second after a failed claim, while the failed threads are still
// held, to serve the threads behind them. A claim of the thread that succeeds (or
// finds nothing) ends its hold; a hold that lapsed long ago without the
// thread being tried again (its work went away) is forgotten.
// mailbox_dispatch_held_threads counts the threads held or lapsed but not
// yet tried again.
const (
	claimHoldFirst    = time.Second
	claimHoldMax      = time.Minute
	claimHoldForgetMs = 2 * int64(claimHoldMax/time.Millisecond)
	// claimHoldAgentMax bounds a hold for an agent id that no connected
	// agent serves: it starts at claimHoldMax and doubles while the thread
	// is refused so (agents coming or going end it at once).
	claimHoldAgentMax = 16 * time.Minute
)

// claimHold is a held thread's state.
type claimHold struct {
	until   int64         // Unix ms: not tried before
	delay   time.Duration // the last delay; the next doubles it (ErrCorrupt)
	corrupt bool          // the last failure was ErrCorrupt
	agent   bool          // set aside because no agent took its run
	// unserved: no connected agent served its run's agent id
	// (CodeAgentUnavailable); its delay doubles while that lasts.
	unserved bool
	// busy: its agents were full (CodeAgentBusy). busyFor is the run's
	// agent id (of an unserved hold too). With a SlotCounter executor the thread is admitted again
	// when that agent has a free slot (admitLocked), until then at most.
	busy    bool
	busyFor string
	// prefix is the id of the held prefix that counts the thread
	// (heldprefix.go; 0: none).
	prefix uint64
	// dispatch is the dispatch whose attempt no agent took (an agent
	// hold): the submit that made it does not end the hold.
	dispatch string
}

// A thread whose attempt no agent took is set aside too (ipc.md: work
// waits in the queue for an agent, never nacked, never dead-lettered for
// lack of one): until agents come or go (the executor's
// CapacityChanged), when no connected agent serves the run's agent id
// (CodeAgentUnavailable): at most claimHoldMax, doubling up to
// claimHoldAgentMax while the thread is refused so. When the ones that serve it
// were full (CodeAgentBusy: the engine counts the slots of every agent id
// together) it waits for a free slot of theirs: with an executor that
// counts them (SlotCounter) the dispatcher admits no more such threads
// than that agent has free slots, as soon as it has them (at most
// claimHoldMax); otherwise claimHoldFirst. Without that count a backlog
// of runs for a full agent was claimed and refused again every second,
// thread by thread. A submit, a requeue, a cancel (of queued work or of
// the refused attempt itself) or an interrupt of the
// thread ends its hold too: its next dispatch may be for an agent that is
// here (a submit leaves a hold set for its own dispatch:
// releaseAgentHoldAfter). No hold is set when agents came or went while the attempt ran
// (the answer may be out of date, and the wake-up already passed).
// Without the hold the dispatcher claimed the thread again at once, and
// the hub refused it again: a thread for an agent id nobody served took a
// slot from the others at every pass.

// holdForAgentLocked sets thread aside after an attempt of dispatch no
// agent took (unserved: the hold it was claimed out of, for the same cause; 0: none),
// unless agents came or went since the attempt started (capSeen): the
// executor's answer may be out of date, and a hold would miss the wake-up
// that ends it. Called with m.mu held.
func (m *Mailbox) holdForAgentLocked(thread, dispatch, code, agentID string, capSeen uint64, unserved time.Duration, now int64) {
	if m.capChanges != capSeen {
		return
	}
	h := claimHold{delay: claimHoldFirst, agent: true, dispatch: dispatch}
	switch {
	case code == CodeAgentUnavailable:
		// Tried again now and then in case a wake-up was missed: every
		// minute cost each such thread a claim and a release, O(held)
		// store work a minute for a backlog nobody serves. The delay
		// doubles while the thread is refused so, up to claimHoldAgentMax.
		h.delay, h.unserved, h.busyFor = claimHoldMax, true, agentID
		if unserved > 0 {
			h.delay = min(2*unserved, claimHoldAgentMax)
		}
	case m.slots != nil:
		h.delay, h.busy, h.busyFor = claimHoldMax, true, agentID
	}
	h.until = now + h.delay.Milliseconds()
	m.setHoldLocked(thread, h, now)
}

// unservedWarnLocked reports whether a refusal for agent id agent (no
// connected agent serves it) is to be logged at now: once a minute per
// agent id (a backlog of such work would log every thread's refusal, and
// again at each retry). The ids remembered are bounded: past
// unservedWarnIDs the memory starts afresh. Called with m.mu held.
func (m *Mailbox) unservedWarnLocked(agent string, now int64) bool {
	if last, ok := m.unservedWarned[agent]; ok && now >= last && now-last < int64(time.Minute/time.Millisecond) {
		return false
	}
	if m.unservedWarned == nil || len(m.unservedWarned) >= unservedWarnIDs {
		m.unservedWarned = map[string]int64{}
	}
	m.unservedWarned[agent] = now
	return true
}

// unservedWarnIDs bounds the agent ids unservedWarnLocked remembers.
const unservedWarnIDs = 1024

// slotBudget is what one dispatcher round may admit of the threads held
// for full agents (CodeAgentBusy): the agents' free slots as the executor
// counts them (SlotCounter), each given to the oldest held thread whose
// agent id it serves. A slot of an agent serving several ids is one slot,
// not one per id (found by review: a thread of each id was claimed, and
// all but one refused again).
type slotBudget struct{ agents []AgentSlots }

// has reports whether the budget has a free slot that serves agent id id.
func (b *slotBudget) has(id string) bool {
	for i := range b.agents {
		if a := &b.agents[i]; a.Free > 0 && a.serves(id) {
			return true
		}
	}
	return false
}

// take gives one free slot that serves agent id id, if there is one.
func (b *slotBudget) take(id string) bool {
	for i := range b.agents {
		if a := &b.agents[i]; a.Free > 0 && a.serves(id) {
			a.Free--
			return true
		}
	}
	return false
}

// busyHeldLocked reports whether threads among ready, or of the held
// prefix, are held at now for a full agent. Called with m.mu held.
func (m *Mailbox) busyHeldLocked(ready []ReadyEntry, now int64) bool {
	if len(m.held) == 0 {
		return false
	}
	for _, q := range m.prefix.busy {
		if _, ok := m.prefixHeadLocked(q, now); ok {
			return true
		}
	}
	for _, t := range ready {
		if h, ok := m.held[t.ThreadID]; ok && h.busy && h.until > now {
			return true
		}
	}
	return false
}

// countFreeSlots makes the round's budget. It is empty while threads
// admitted from a hold have not reached the executor yet (busyInTransit):
// the executor's count would not show their slots taken, and they would
// be given out twice; the dispatcher looks again when they arrive
// (arrived). Called without m.mu held: the executor has locks of its own.
func (m *Mailbox) countFreeSlots() slotBudget {
	now := m.cfg.Now()
	m.mu.Lock()
	inTransit := false
	for t, tr := range m.busyInTransit {
		if now-tr.at > transitLimitMs {
			delete(m.busyInTransit, t) // a guard: every path ends a transit
			continue
		}
		inTransit = true
	}
	m.inTransit.Store(int32(len(m.busyInTransit)))
	m.mu.Unlock()
	if inTransit {
		return slotBudget{}
	}
	return slotBudget{agents: m.slots.FreeSlots()}
}

// transitLimitMs bounds a transit (admitLocked) that no path ended.
const transitLimitMs = 10_000

// admitLocked reports whether thread may be claimed at now, the room
// left (room) counted: a thread not held, or one whose hold lapsed, may;
// one held for a full agent may if the budget has a free slot of that
// agent left (taken, its hold ended; the thread is in transit to the
// executor until its attempt reaches it). Called with m.mu held.
func (m *Mailbox) admitLocked(thread string, now int64, b *slotBudget, room bool) bool {
	h, ok := m.held[thread]
	if !ok || h.until <= now {
		return true
	}
	if !h.busy || !room || !b.take(h.busyFor) {
		return false
	}
	m.admitHeldLocked(thread, now)
	return true
}

// admitHeldLocked ends the hold of thread, held for a full agent, as it
// is admitted to a free slot of that agent at now: it is claimed at once,
// so the held prefix is kept (it leaves it), and it is in transit to the
// executor until its attempt reaches it. Called with m.mu held.
func (m *Mailbox) admitHeldLocked(thread string, now int64) {
	h := m.held[thread]
	if m.inPrefixLocked(h) {
		m.prefix.n--
	}
	delete(m.held, thread)
	if m.busyInTransit == nil {
		m.busyInTransit = map[string]transit{}
	}
	h.prefix = 0
	m.busyInTransit[thread] = transit{at: now, hold: h}
	m.inTransit.Store(int32(len(m.busyInTransit)))
}

// transit is a thread admitted from a hold for a full agent on its way to
// the executor: when, and the hold it left.
type transit struct {
	at   int64
	hold claimHold
}

// arrived ends thread's transit to the executor (admitLocked): its attempt
// reached the executor, which counts its slot from now on, or it never
// will. The dispatcher looks again at once for the other held threads.
func (m *Mailbox) arrived(thread string) { m.endTransit(thread, true) }

// notClaimed ends thread's transit to the executor (admitLocked) when the
// dispatcher's claim of it did not claim: no slot was left (another
// claimer took it meanwhile), or the thread runs here already. Unless it
// runs, or was held again meanwhile, its hold is back as it was: its
// work waits at its place in the ready order for its agent's next free
// slot. Before, it waited there unheld, and the next round claimed it
// besides the thread that slot was given to, one of them refused again.
// The held prefix is dropped: rounds listing after it would pass the
// thread by, and give its agent's free slots to younger threads (found
// by review).
func (m *Mailbox) notClaimed(thread string) { m.endTransit(thread, false) }

// endTransit ends thread's transit to the executor, arrived there or not
// (notClaimed).
func (m *Mailbox) endTransit(thread string, arrived bool) {
	if m.inTransit.Load() == 0 {
		return // the common case: no lock for every attempt
	}
	m.mu.Lock()
	tr, ok := m.busyInTransit[thread]
	delete(m.busyInTransit, thread)
	m.inTransit.Store(int32(len(m.busyInTransit)))
	if ok && !arrived {
		if _, held := m.held[thread]; !held && m.threads[thread] == nil && tr.hold.until > m.cfg.Now() {
			m.setHoldLocked(thread, tr.hold, m.cfg.Now())
		}
		m.prefix = heldPrefix{}
		m.prefixGen++
	}
	m.mu.Unlock()
	if ok {
		m.kick()
	}
}

// noteBusyWaitingLocked records the agent ids for which threads stay
// held after a round (ids; nil: none): a finishing attempt of such an
// agent hands its slot to the dispatcher, which gives it to the oldest of
// them, instead of claiming its own thread's next run (followOnFor).
// Called with m.mu held.
func (m *Mailbox) noteBusyWaitingLocked(ids map[string]struct{}) {
	m.busyWaiting = ids
	m.anyBusyWaiting.Store(len(ids) > 0)
}

// followOnFor reports whether a finishing attempt of agent id agent may
// claim its own thread's next run at once: not while threads wait for a
// free slot of that agent id, nor while an agent with a free slot (the
// finishing attempt's own, say) serves an agent id threads wait for.
// The slot is the dispatcher's to give then, to the oldest of them.
// Found by review: an agent serving ids x and y kept its one slot for a
// thread of y, claimed anew at each completion, and a thread of x
// waited as long as that thread had work.
func (m *Mailbox) followOnFor(agent string) bool {
	if !m.anyBusyWaiting.Load() {
		return true // the common case: no lock on every completion
	}
	m.mu.Lock()
	_, waiting := m.busyWaiting[agent]
	ids := make([]string, 0, len(m.busyWaiting))
	for id := range m.busyWaiting {
		ids = append(ids, id)
	}
	m.mu.Unlock()
	if waiting || m.slots == nil {
		return !waiting
	}
	for _, a := range m.slots.FreeSlots() { // without m.mu: the executor has locks of its own
		for _, id := range ids {
			if a.serves(id) {
				return false
			}
		}
	}
	return true
}

// heldForAgentLocked reports whether thread is set aside at now for lack
// of an agent: no claim takes it then, not even its own attempt's
// follow-on claim or a submit's. Called with m.mu held.
func (m *Mailbox) heldForAgentLocked(thread string, now int64) bool {
	h, ok := m.held[thread]
	return ok && h.agent && h.until > now
}

// releaseAgentHold ends thread's hold for lack of an agent: what the
// thread's queue holds changed (a submit, a cancel, an interrupt), and its
// next dispatch may be for an agent that is here.
func (m *Mailbox) releaseAgentHold(thread string) { m.releaseAgentHoldAfter(thread, "") }

// releaseAgentHoldAfter is releaseAgentHold after a submit of dispatch
// submitted: a hold set because no agent took that very dispatch stays.
// The dispatcher may claim new work as soon as it is durable, before its
// submitter goes on; ending the hold that refusal set made the submit's
// own claim try it again at once, only to be refused again.
func (m *Mailbox) releaseAgentHoldAfter(thread, submitted string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if h, ok := m.held[thread]; ok && h.agent && (submitted == "" || h.dispatch != submitted) {
		m.dropHoldLocked(thread, m.cfg.Now())
		if submitted == "" {
			// The dispatcher slept until the hold's end (up to minutes):
			// the thread's work is to be tried now (found by review: the
			// work behind a cancelled held dispatch waited for the next
			// sweep). A submit claims it, or kicks, itself: a kick here
			// let the dispatcher claim first, and a submit that ran was
			// answered queued.
			m.kick()
		}
	}
	m.forgetTransitHoldLocked(thread, nil)
	switch e := m.threads[thread]; {
	case e == nil:
	case e.claiming:
		// A claim in flight: if it takes the submitted dispatch itself,
		// it saw the change (startExecution).
		if !e.queueChanged {
			e.changedBy = submitted
		} else if e.changedBy != submitted {
			e.changedBy = ""
		}
		e.queueChanged = true
	case e.dispatch.DispatchID != submitted:
		// An attempt in flight: the hold its refusal would set is ended
		// before it is set.
		e.queueChanged = true
	}
}

// forgetTransitHoldLocked ends the hold thread left when it was admitted
// (it is in transit to the executor), as releaseAgentHold and
// releaseAgentHoldsLocked (unserved) end held threads' holds: a claim of
// it that then finds no slot must not give it back (notClaimed; found by
// review: a foreground submit's new work waited behind the old hold).
// Called with m.mu held.
func (m *Mailbox) forgetTransitHoldLocked(thread string, unserved map[string]bool) {
	if tr, ok := m.busyInTransit[thread]; ok && tr.hold.agent && !(tr.hold.unserved && unserved[tr.hold.busyFor]) {
		tr.hold = claimHold{}
		m.busyInTransit[thread] = tr
	}
}

// releaseAgentHoldsLocked ends the holds of threads set aside for lack
// of an agent: agents came or went. A hold for an agent id in unserved,
// which the agents now connected still do not serve, stays: every agent
// that came or went tried again every thread of a backlog nobody serves
// (a claim and a release each). Called with m.mu held.
func (m *Mailbox) releaseAgentHoldsLocked(unserved map[string]bool) {
	now := m.cfg.Now()
	for t, h := range m.held {
		if h.agent && !(h.unserved && unserved[h.busyFor]) {
			m.dropHoldLocked(t, now)
		}
	}
	for t := range m.busyInTransit {
		m.forgetTransitHoldLocked(t, unserved)
	}
}

// stillUnserved returns the agent ids of unserved holds that no agent
// connected now serves (nil without a SlotCounter executor: every hold
// ends). Called without m.mu held: the executor has locks of its own. An
// agent that comes for one of them after the executor answered signals
// CapacityChanged again, and the next pass ends its holds.
func (m *Mailbox) stillUnserved() map[string]bool {
	if m.slots == nil {
		return nil
	}
	m.mu.Lock()
	ids := map[string]bool{}
	for _, h := range m.held {
		if h.unserved && strings.TrimSpace(h.busyFor) != "" {
			ids[h.busyFor] = true
		}
	}
	m.mu.Unlock()
	for id := range ids {
		if m.slots.Serves(id) {
			delete(ids, id)
		}
	}
	return ids
}

// codeRecordsCorrupt is the error code of an attempt put back because
// its run's records do not decode (ErrCorrupt): its thread is set aside.
const codeRecordsCorrupt = "records_corrupt"

// holdLocked sets thread aside after a failed claim and returns the delay.
// Called with m.mu held.
func (m *Mailbox) holdLocked(thread string, err error, now int64) time.Duration {
	corrupt := errors.Is(err, ErrCorrupt)
	delay := claimHoldFirst
	if h, ok := m.held[thread]; ok && corrupt {
		delay = min(2*h.delay, claimHoldMax)
	}
	m.setHoldLocked(thread, claimHold{until: now + delay.Milliseconds(), delay: delay, corrupt: corrupt}, now)
	return delay
}

// corruptHold is how long thread stays set aside after its claims failed
// with ErrCorrupt (0: it is not). The signal loop redelivers a signal for
// it no sooner: a redelivery at once would only fail again.
func (m *Mailbox) corruptHold(thread string) time.Duration {
	now := m.cfg.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if h, ok := m.held[thread]; ok && h.corrupt && h.until > now {
		return time.Duration(h.until-now) * time.Millisecond
	}
	return 0
}

// releaseHoldLocked ends thread's hold after a claim that did not fail.
// Called with m.mu held.
func (m *Mailbox) releaseHoldLocked(thread string) {
	if _, ok := m.held[thread]; ok {
		m.dropHoldLocked(thread, m.cfg.Now())
	}
}

// notHeldLocked removes the threads held at now from threads (in place).
// Called with m.mu held.
func (m *Mailbox) notHeldLocked(threads []ReadyEntry, now int64) []ReadyEntry {
	if len(m.held) == 0 {
		return threads
	}
	out := threads[:0]
	for _, t := range threads {
		if h, ok := m.held[t.ThreadID]; !ok || h.until <= now {
			out = append(out, t)
		}
	}
	return out
}

// setHoldLocked sets thread aside as h at now. Called with m.mu held.
func (m *Mailbox) setHoldLocked(thread string, h claimHold, now int64) {
	if m.held == nil {
		m.held = map[string]claimHold{}
	}
	if old, ok := m.held[thread]; ok && old.until > now && h.until < old.until {
		m.prefixGen++ // held still, it may now be tried sooner
	}
	m.held[thread] = h
	if c := &m.holdCount; c.valid {
		c.next = earliest(c.next, h.until)
	}
}

// dropHoldLocked ends thread's hold at now. Called with m.mu held.
func (m *Mailbox) dropHoldLocked(thread string, now int64) {
	if h, ok := m.held[thread]; ok && h.until > now {
		m.prefixGen++ // held still, it may be tried now
	}
	delete(m.held, thread)
}

// holdsLocked returns how many threads are held (an upper bound: holds
// lapsed within the last claimHoldForgetMs count too) and when the first
// of them may be tried again (0: none). The holds are walked, and long
// lapsed ones forgotten, at most once a second: a walk at every round
// cost O(held). A hold that lapsed since is acted on within that second.
// Called with m.mu held.
func (m *Mailbox) holdsLocked(now int64) (n int, next int64) {
	c := &m.holdCount
	if !c.valid || now < c.at || now-c.at >= holdWalkMs {
		*c = holdCount{valid: true, at: now}
		for t, h := range m.held {
			switch {
			case h.until > now:
				c.next = earliest(c.next, h.until)
			case now-h.until > claimHoldForgetMs:
				m.dropHoldLocked(t, now)
			}
		}
	}
	next = c.next
	if next != 0 && next <= now {
		next = c.at + holdWalkMs // the next walk finds the holds lapsed
	}
	return len(m.held), next
}

// holdWalkMs is how often holdsLocked walks the holds.
const holdWalkMs = 1000

// holdCount is holdsLocked's last walk, at at: the first hold to lapse
// after it (or set since) lapses at next.
type holdCount struct {
	valid bool
	at    int64
	next  int64
}

// heldThreads is mailbox_dispatch_held_threads.
func (m *Mailbox) heldThreads() float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return float64(len(m.held))
}
