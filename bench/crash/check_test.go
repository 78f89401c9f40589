package crash

import (
	"context"
	"fmt"
	"math"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// snapshot is the sidecar's state read through the API.
type snapshot struct {
	dispatches map[string]dispatch
	runs       map[string]runRecord
	logs       map[string][]messageRecord
	threads    []string
}

// drain waits until every dispatch of the touched threads — those the
// API accepted and any other the store holds — is terminal, and returns
// how long that took; on timeout it returns the ones still pending.
func (c *cluster) drain(rec *recorder, timeout time.Duration) (time.Duration, []string) {
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		var pending []string
		seen := map[string]bool{}
		for _, th := range rec.threadsTouched() {
			ds, err := c.api.threadDispatches(th)
			if err != nil {
				pending = append(pending, fmt.Sprintf("thread %s: %v", th, err))
				continue
			}
			for _, d := range ds {
				seen[d.DispatchID] = true
				if !terminal(d.Status) {
					pending = append(pending, fmt.Sprintf("%s on %s: %s, attempt %d, last error %q", d.DispatchID, d.ThreadID, d.Status, d.AttemptCount, d.LastError))
				}
			}
		}
		for _, a := range rec.all() {
			if !seen[a.ID] {
				pending = append(pending, fmt.Sprintf("accepted %s dispatch %s on %s (%q) is not in its thread's list", a.Kind, a.ID, a.Thread, a.Cmd))
			}
		}
		if len(pending) == 0 {
			return time.Since(start), nil
		}
		if time.Now().After(deadline) {
			return time.Since(start), pending
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// collect reads every dispatch, run record and message log of the
// touched threads.
func (c *cluster) collect(rec *recorder) (*snapshot, error) {
	s := &snapshot{dispatches: map[string]dispatch{}, runs: map[string]runRecord{}, logs: map[string][]messageRecord{}, threads: rec.threadsTouched()}
	for _, th := range s.threads {
		ds, err := c.api.threadDispatches(th)
		if err != nil {
			return nil, err
		}
		for _, d := range ds {
			s.dispatches[d.DispatchID] = d
		}
		if s.logs[th], err = c.api.threadMessages(th); err != nil {
			return nil, err
		}
	}
	for _, d := range s.dispatches {
		if _, ok := s.runs[d.RunID]; ok {
			continue
		}
		var r runRecord
		if err := c.api.get("/v1/runs/"+url.PathEscape(d.RunID), &r); err != nil {
			return nil, fmt.Errorf("run %s of dispatch %s: %w", d.RunID, d.DispatchID, err)
		}
		s.runs[d.RunID] = r
	}
	return s, nil
}

// session is one attempt as the agents' journals tell it.
type session struct {
	start  journalEntry
	end    *journalEntry
	cps    []journalEntry // acknowledged checkpoints
	inbox  []journalEntry // live messages, decisions and cancels received
	endNs  int64          // effective end: its end record, or the agent's death
	closed bool           // endNs comes from an end record or a kill
}

// journalIndex groups the journal by session, dispatch and thread.
type journalIndex struct {
	sessions   map[string]*session
	byDispatch map[string][]*session
	byThread   map[string][]*session
}

// indexJournal builds the index. A run without an end record ends at its
// agent's death (SIGKILL); with stallCut, a run in progress when its agent
// was SIGSTOPped ends at the stop (the sidecar fences the frozen attempt);
// a run of an agent that neither died nor has an end record is open.
func indexJournal(entries []journalEntry, stallCut bool) (*journalIndex, []string) {
	ix := &journalIndex{sessions: map[string]*session{}, byDispatch: map[string][]*session{}, byThread: map[string][]*session{}}
	var problems []string
	for _, e := range entries {
		if e.Event == EventStart {
			if ix.sessions[e.SessionID] != nil {
				problems = append(problems, fmt.Sprintf("session %s of dispatch %s started twice", e.SessionID, e.DispatchID))
				continue
			}
			s := &session{start: e}
			ix.sessions[e.SessionID] = s
			ix.byDispatch[e.DispatchID] = append(ix.byDispatch[e.DispatchID], s)
			ix.byThread[e.ThreadID] = append(ix.byThread[e.ThreadID], s)
		}
	}
	for _, e := range entries {
		s := ix.sessions[e.SessionID]
		switch {
		case e.Event == EventStart:
		case s == nil:
			problems = append(problems, fmt.Sprintf("journal %s record of session %s without its start", e.Event, e.SessionID))
		case e.Event == EventEnd:
			e := e
			s.end = &e
		case e.Event == EventCheckpoint:
			s.cps = append(s.cps, e)
		case e.Event == EventLive, e.Event == EventDecision, e.Event == EventCancel:
			s.inbox = append(s.inbox, e)
		}
	}
	for _, s := range ix.sessions {
		switch {
		case s.end != nil:
			s.endNs, s.closed = s.end.EndNs, true
		case s.start.agent.deathNs != 0:
			s.endNs, s.closed = s.start.agent.deathNs, true
		default:
			s.endNs = math.MaxInt64
		}
		if stallCut {
			for _, stop := range s.start.agent.stops {
				if stop > s.start.StartNs && stop < s.endNs {
					s.endNs, s.closed = stop, true
				}
			}
		}
	}
	for _, l := range ix.byThread {
		sort.Slice(l, func(i, j int) bool { return l[i].start.StartNs < l[j].start.StartNs })
	}
	for _, l := range ix.byDispatch {
		sort.Slice(l, func(i, j int) bool { return l[i].start.StartNs < l[j].start.StartNs })
	}
	return ix, problems
}

// findings is what the checks found.
type findings struct {
	problems          []string
	notes             []string // observations that are not failures
	lost              int      // accepted dispatches missing or not terminal
	suspects          []string // dispatches (id) a LOST or UNJUSTIFIED problem names, for the diagnosis
	suspectThreads    []string // threads whose log lost an accepted message or checkpoint
	overlaps          int      // pairs of runs of one thread that overlapped
	resurrected       int      // superseded or cancelled work that started afterwards
	runsExecuted      int      // journal starts
	reexecuted        int      // dispatches executed more than once
	checkpoints       int      // acknowledged checkpoints found in the logs
	lateRuns          int      // an interrupted or cancelled attempt reached the agent after the interrupt or cancel returned
	lateRunsCompleted int      // … and was not cancelled there
	undelivered       int      // live commands answered delivered that no attempt received
	uncancelled       int      // attempts a plain interrupt found active that were not cancelled
	liveReceived      int      // live messages and decisions answered delivered and found received
	liveExcused       int      // … not found, but an attempt of the run was killed
	activeCancelled   int      // attempts a plain interrupt found active, checked (not excused by a kill)
	runningCancelled  int      // attempts executing when a cancel of them answered cancelled:true, checked
	cancelBlind       int      // … of either, ended on their own by a path that never looks at the context
	crossLive         int      // live messages and decisions received by an attempt on another sidecar than the one that answered
	crossInterrupts   int      // attempts an interrupt through another sidecar found active, checked
	crossCancels      int      // attempts a cancel through another sidecar found executing, checked
	reordered         int      // requests whose messages are not in order in the log
	badEventIDs       int      // foreground streams whose event ids went back or reused an earlier attempt's band
	continuationIDs   int      // foreground streams of a run an earlier attempt of which had started, whose ids were checked
	requestsOrdered   int      // requests of several messages whose order was checked
}

func (f *findings) add(format string, args ...any) {
	f.problems = append(f.problems, fmt.Sprintf(format, args...))
}

// sidecarKill is a SIGKILL of a sidecar: when it died and the node it
// was (cluster.node). It cuts the attempts of that node's agents only.
type sidecarKill struct {
	ns   int64
	node string
}

// cuts reports whether the kill was of the sidecar s's agent served.
func (k sidecarKill) cuts(s *session) bool { return k.node == s.start.agent.node }

// checkOptions tune the checks for a fault.
type checkOptions struct {
	stallCut     bool          // see indexJournal
	sidecarKills []sidecarKill // claims of a dead process hold their threads
	// orphansReclaimed: the store is one process's alone (Badger), so a
	// restarted sidecar reclaims the dead process's claims at once
	// (engine.OrphanReclaimer) instead of letting them hold their threads
	// for the lease (NATS).
	orphansReclaimed bool
	// leasesJumped: the clock jumped forward at a restart, so the dead
	// process's leases lapsed at once (no dead-claim check).
	leasesJumped bool
}

// check runs every end-of-test invariant over the recorder, the snapshot
// and the journals.
func check(rec *recorder, snap *snapshot, entries []journalEntry, o checkOptions) *findings {
	f := &findings{}
	ix, jp := indexJournal(entries, o.stallCut)
	f.problems = append(f.problems, jp...)
	rec.mu.Lock()
	f.problems = append(f.problems, rec.problems...)
	rec.mu.Unlock()
	acc := rec.all()

	// Nothing lost: every accepted dispatch exists and is terminal; so is
	// every other dispatch of the touched threads.
	for _, a := range acc {
		d, ok := snap.dispatches[a.ID]
		switch {
		case !ok:
			f.lost++
			f.suspects = append(f.suspects, a.ID)
			f.add("LOST: accepted %s dispatch %s on %s (%q) does not exist", a.Kind, a.ID, a.Thread, a.Cmd)
		case !terminal(d.Status):
			f.lost++
			f.suspects = append(f.suspects, a.ID)
			f.add("LOST: accepted %s dispatch %s on %s (%q) is %s after the drain", a.Kind, a.ID, a.Thread, a.Cmd, d.Status)
		case d.ThreadID != a.Thread || d.RunID != a.RunID:
			f.add("dispatch %s is on thread %s run %s, accepted as thread %s run %s", a.ID, d.ThreadID, d.RunID, a.Thread, a.RunID)
		}
	}
	for _, d := range snap.dispatches {
		if !terminal(d.Status) {
			f.add("dispatch %s on %s is %s after the drain", d.DispatchID, d.ThreadID, d.Status)
		}
	}

	checkSettlement(f, rec, snap, acc)

	// Outcomes of acked dispatches come from an attempt that ended so.
	for _, d := range snap.dispatches {
		if d.Status != "acked" {
			continue
		}
		term := ""
		if d.Termination != nil {
			term = d.Termination.Type
		}
		if (d.RunStatus != "done" && d.RunStatus != "waiting") || term == "" {
			f.add("acked dispatch %s has run_status %q termination %q\n%s", d.DispatchID, d.RunStatus, term, history(d.DispatchID, rec, snap, ix))
			continue
		}
		if term == "cancelled" {
			continue // a user's cancel settles whatever the agent reported
		}
		s := ix.sessions[d.InstanceID]
		if s == nil || s.start.DispatchID != d.DispatchID {
			f.add("acked dispatch %s names attempt %q, which the agents never ran for it", d.DispatchID, d.InstanceID)
			continue
		}
		if s.end == nil {
			f.add("acked dispatch %s: its attempt %s has no end record (the agent never returned a result)", d.DispatchID, d.InstanceID)
			continue
		}
		switch out := s.end.Outcome; term {
		case "natural_end":
			if out != OutcomeDone && out != OutcomeResumed {
				f.add("acked dispatch %s ended natural_end, but its attempt %s ended %s", d.DispatchID, d.InstanceID, out)
			}
			if d.RunResponse != "ok "+d.InstanceID {
				f.add("acked dispatch %s: response %q is not its attempt's (%s)", d.DispatchID, d.RunResponse, d.InstanceID)
			}
			if s.start.Command != "" {
				if c, ok := ParseCommand(s.start.Command); ok && c.Verb == VerbCheckpoint && len(s.cps) != c.Arg {
					f.add("acked dispatch %s: attempt %s completed %q with %d acknowledged checkpoints", d.DispatchID, d.InstanceID, s.start.Command, len(s.cps))
				}
			}
		case "suspended":
			if out != OutcomeSuspended || d.RunStatus != "waiting" {
				f.add("acked dispatch %s suspended (%s), but its attempt %s ended %s", d.DispatchID, d.RunStatus, d.InstanceID, out)
			}
		default:
			f.add("acked dispatch %s has termination %q", d.DispatchID, term)
		}
	}

	// Run records agree with their dispatch; none is left created or
	// running.
	for id, r := range snap.runs {
		if r.Status != "done" && r.Status != "waiting" {
			f.add("run %s is %q after the drain (dispatch %s)", id, r.Status, r.DispatchID)
		}
		d, ok := snap.dispatches[r.DispatchID]
		if !ok {
			continue
		}
		switch {
		case d.Status == "acked":
			if r.Status != d.RunStatus {
				f.add("run %s is %s, its acked dispatch %s says %s", id, r.Status, d.DispatchID, d.RunStatus)
			}
			if r.TerminationReason == nil || d.Termination == nil || r.TerminationReason.Type != d.Termination.Type {
				f.add("run %s termination %v, its acked dispatch %s %v", id, r.TerminationReason, d.DispatchID, d.Termination)
			}
		case terminal(d.Status) && r.Status != "done":
			f.add("run %s is %s, its dispatch %s is %s", id, r.Status, d.DispatchID, d.Status)
		}
	}

	// Every attempt of a dispatch executed that dispatch's own request.
	for _, a := range acc {
		if a.Kind == kindResume {
			continue
		}
		for _, s := range ix.byDispatch[a.ID] {
			if s.start.Command != a.Cmd.String() {
				f.add("WRONG REQUEST: attempt %s of dispatch %s on %s executed %q; the dispatch was accepted with %q\n%s",
					s.start.SessionID, a.ID, a.Thread, s.start.Command, a.Cmd, history(a.ID, rec, snap, ix))
			}
		}
	}

	// Runs and re-executions.
	for _, l := range ix.byDispatch {
		f.runsExecuted += len(l)
		if len(l) > 1 {
			f.reexecuted++
		}
	}

	// One run per thread at a time.
	for th, l := range ix.byThread {
		var last *session
		for _, s := range l {
			if last != nil && s.start.StartNs < last.endNs {
				f.overlaps++
				f.add("OVERLAP on %s: attempt %s of %s (%q, pid %d) ran %v–%v; attempt %s of %s (%q, pid %d) started at %v, %v before",
					th, last.start.SessionID, last.start.DispatchID, last.start.Command, last.start.PID, ts(last.start.StartNs), ts(last.endNs),
					s.start.SessionID, s.start.DispatchID, s.start.Command, s.start.PID, ts(s.start.StartNs), time.Duration(last.endNs-s.start.StartNs))
			}
			if last == nil || s.endNs > last.endNs {
				last = s
			}
		}
	}

	checkDeadClaims(f, rec, snap, ix, o.sidecarKills, o.orphansReclaimed)
	checkDelivered(f, rec, ix)
	checkEventIDs(f, rec, ix)
	checkInterruptCancels(f, rec, ix, o.sidecarKills)
	checkCancelsReach(f, rec, ix, o.sidecarKills)

	// Checkpoints and messages in the logs.
	for _, th := range snap.threads {
		checkLog(f, th, snap.logs[th], ix)
	}
	rec.mu.Lock()
	texts := make(map[string]textRec, len(rec.texts))
	for k, v := range rec.texts {
		texts[k] = *v
	}
	interrupts := append([]interruptRec(nil), rec.interrupts...)
	cancels := append([]cancelRec(nil), rec.cancels...)
	rec.mu.Unlock()
	counts := map[string]int{}
	for _, th := range snap.threads {
		for _, m := range snap.logs[th] {
			if t, ok := texts[m.text()]; ok {
				if t.Thread != th {
					f.add("message %q of thread %s found in thread %s", m.text(), t.Thread, th)
				}
				counts[m.text()]++
			}
		}
	}
	for text, t := range texts {
		switch n := counts[text]; {
		case t.Accepted && n != 1:
			f.add("accepted message %q is %d times in the log of %s", text, n, t.Thread)
			if n == 0 {
				f.lost++
				f.suspectThreads = append(f.suspectThreads, t.Thread)
			}
		case n > 1:
			f.add("message %q (its request failed) is %d times in the log of %s", text, n, t.Thread)
		}
	}

	checkRequestOrder(f, rec, snap)

	// Superseded and cancelled work never starts afterwards.
	byThreadInt := map[string][]interruptRec{}
	for _, i := range interrupts {
		byThreadInt[i.Thread] = append(byThreadInt[i.Thread], i)
	}
	for _, a := range acc {
		// After the first interrupt sent once a was accepted returned,
		// no attempt of a may start — except the one attempt in flight
		// when a plain interrupt found a claimed.
		firstR := int64(math.MaxInt64)
		inFlight := ""
		for _, i := range byThreadInt[a.Thread] {
			if i.SentNs > a.AcceptedNs && i.Own != a.ID && i.ReturnedNs < firstR {
				firstR, inFlight = i.ReturnedNs, ""
				if i.Active == a.ID {
					inFlight = i.ActiveInstance
				}
			}
		}
		late := 0
		for _, s := range ix.byDispatch[a.ID] {
			if s.start.StartNs <= firstR {
				continue
			}
			if late++; inFlight != "" && s.start.SessionID == inFlight {
				f.lateRuns++
				if s.end == nil || s.end.Outcome != OutcomeCancelled {
					f.lateRunsCompleted++
				}
				f.notes = append(f.notes, fmt.Sprintf("dispatch %s on %s: active when an interrupt returned at %v, its attempt %s reached the agent at %v\n%s",
					a.ID, a.Thread, ts(firstR), s.start.SessionID, ts(s.start.StartNs), history(a.ID, rec, snap, ix)))
				continue
			}
			f.resurrected++
			f.add("RESURRECTED: dispatch %s on %s (%q, accepted %v) started attempt %s at %v, after an interrupt of the thread returned at %v\n%s",
				a.ID, a.Thread, a.Cmd, ts(a.AcceptedNs), s.start.SessionID, ts(s.start.StartNs), ts(firstR), history(a.ID, rec, snap, ix))
		}
	}
	// A cancel answered cancelled:true is final: no attempt of the
	// dispatch starts after it returned — except, when no attempt was
	// executing at the cancel, the one attempt already on its way (its
	// start recorded, its RUN not yet sent; it gets the CANCEL next).
	for _, c := range cancels {
		if !c.Cancelled {
			continue
		}
		st := snap.dispatches[c.Dispatch].Status
		executing := false
		for _, s := range ix.byDispatch[c.Dispatch] {
			executing = executing || (s.start.StartNs < c.ReturnedNs && s.endNs > c.SentNs)
		}
		late := 0
		for _, s := range ix.byDispatch[c.Dispatch] {
			if s.start.StartNs <= c.ReturnedNs {
				continue
			}
			if late++; late == 1 && !executing && st != "cancelled" {
				f.lateRuns++
				if s.end == nil || s.end.Outcome != OutcomeCancelled {
					f.lateRunsCompleted++
				}
				f.notes = append(f.notes, fmt.Sprintf("dispatch %s on %s: a cancel returned cancelled:true at %v before its attempt %s reached the agent at %v\n%s",
					c.Dispatch, c.Thread, ts(c.ReturnedNs), s.start.SessionID, ts(s.start.StartNs), history(c.Dispatch, rec, snap, ix)))
				continue
			}
			f.resurrected++
			f.add("RESURRECTED: dispatch %s on %s (now %s): a cancel returned cancelled:true at %v, yet attempt %d (%s) started at %v\n%s",
				c.Dispatch, c.Thread, st, ts(c.ReturnedNs), s.start.Attempt, s.start.SessionID, ts(s.start.StartNs), history(c.Dispatch, rec, snap, ix))
		}
	}
	return f
}

// history describes a dispatch for a report: its record, its attempts
// and the interrupts and cancels of its thread.
func history(id string, rec *recorder, snap *snapshot, ix *journalIndex) string {
	var b strings.Builder
	d := snap.dispatches[id]
	fmt.Fprintf(&b, "    dispatch: %+v\n", d)
	if r, ok := snap.runs[d.RunID]; ok {
		fmt.Fprintf(&b, "    run: %+v\n", r)
	}
	rec.mu.Lock()
	if a := rec.accepted[id]; a != nil {
		fmt.Fprintf(&b, "    accepted %v as %s %q\n", ts(a.AcceptedNs), a.Kind, a.Cmd)
	}
	for _, i := range rec.interrupts {
		if i.Thread == d.ThreadID {
			fmt.Fprintf(&b, "    interrupt of the thread sent %v returned %v (foreground %q, active %q)\n", ts(i.SentNs), ts(i.ReturnedNs), i.Own, i.Active)
		}
	}
	for _, c := range rec.cancels {
		if c.Dispatch == id {
			fmt.Fprintf(&b, "    cancel sent %v returned %v cancelled %v\n", ts(c.SentNs), ts(c.ReturnedNs), c.Cancelled)
		}
	}
	rec.mu.Unlock()
	for _, s := range ix.byDispatch[id] {
		out := "(no end)"
		if s.end != nil {
			out = s.end.Outcome
		}
		fmt.Fprintf(&b, "    attempt %d session %s pid %d %v–%v %s, %d checkpoints acked\n", s.start.Attempt, s.start.SessionID, s.start.PID, ts(s.start.StartNs), ts(s.endNs), out, len(s.cps))
	}
	return b.String()
}

// checkLog checks the checkpointed messages of one thread's log against
// the journal: present once per attempt, in order, as a prefix that holds
// every acknowledged one; attempts in the order they ran, never
// interleaved; nothing from an attempt no agent ran.
func checkLog(f *findings, thread string, log []messageRecord, ix *journalIndex) {
	count := map[string]int{} // checkpoints seen per session
	var order []string        // sessions in the order their checkpoints appear
	closed := map[string]bool{}
	for i, m := range log {
		if i > 0 && m.Seq != log[i-1].Seq+1 {
			f.add("log of %s: seq %d follows %d", thread, m.Seq, log[i-1].Seq)
		}
		mark, ok := ParseCheckpointText(m.text())
		if !ok {
			continue
		}
		s := ix.sessions[mark.SessionID]
		if s == nil {
			f.add("log of %s seq %d: checkpoint %q of an attempt no agent ran", thread, m.Seq, m.text())
			continue
		}
		if s.start.ThreadID != thread || s.start.DispatchID != mark.DispatchID || s.start.Attempt != mark.Attempt {
			f.add("log of %s seq %d: checkpoint %q does not match its attempt %+v", thread, m.Seq, m.text(), s.start.Record)
		}
		if m.ProducedByRunID != "" && m.ProducedByRunID != s.start.RunID {
			f.add("log of %s seq %d: checkpoint of run %s says produced by %s", thread, m.Seq, s.start.RunID, m.ProducedByRunID)
		}
		if mark.Index != count[mark.SessionID]+1 {
			f.add("log of %s seq %d: checkpoint m%d of attempt %s follows m%d (duplicate, gap or out of order)", thread, m.Seq, mark.Index, mark.SessionID, count[mark.SessionID])
		}
		count[mark.SessionID]++
		if n := len(order); n == 0 || order[n-1] != mark.SessionID {
			if closed[mark.SessionID] {
				f.add("log of %s seq %d: checkpoints of attempt %s interleave with another attempt's", thread, m.Seq, mark.SessionID)
			}
			if n > 0 {
				prev := ix.sessions[order[n-1]]
				closed[order[n-1]] = true
				if prev.start.StartNs > s.start.StartNs {
					f.add("log of %s seq %d: attempt %s checkpointed after attempt %s, which started later", thread, m.Seq, mark.SessionID, order[n-1])
				}
			}
			order = append(order, mark.SessionID)
		}
	}
	for _, s := range ix.byThread[thread] {
		acked := 0
		for _, cp := range s.cps {
			acked = max(acked, cp.Index)
		}
		n := count[s.start.SessionID]
		switch {
		case n < acked:
			f.lost++
			f.suspects = append(f.suspects, s.start.DispatchID)
			f.add("LOST: attempt %s of %s on %s had checkpoints up to m%d acknowledged; the log has %d", s.start.SessionID, s.start.DispatchID, thread, acked, n)
		case n > acked+1:
			f.add("attempt %s of %s on %s: %d checkpoints in the log, only %d acknowledged (at most one can be in flight)", s.start.SessionID, s.start.DispatchID, thread, n, acked)
		}
		f.checkpoints += min(n, acked)
	}
}

// checkRestart checks, right after a restart, what was acknowledged
// before killNs: every accepted dispatch still exists, every accepted
// message and every acknowledged checkpoint is in its thread's log. The
// workload keeps running meanwhile; only what was acknowledged before the
// logs were read is checked. The checkpoints are those of the agents of c
// and of its peers (other sidecars sharing its store).
func (c *cluster) checkRestart(rec *recorder, killNs int64, peers ...*cluster) []string {
	var problems []string
	rec.mu.Lock()
	var todo []*accepted
	for _, a := range rec.order {
		if !a.checked && a.AcceptedNs < killNs {
			todo = append(todo, a)
		}
	}
	rec.mu.Unlock()
	for _, a := range todo {
		var d dispatch
		var err error
		for try := 0; try < 5; try++ {
			if err = c.api.get("/v1/dispatches/"+url.PathEscape(a.ID), &d); err == nil || statusOf(err) == 404 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("LOST after restart: accepted %s dispatch %s on %s (%q): %v", a.Kind, a.ID, a.Thread, a.Cmd, err))
			continue
		}
		rec.mu.Lock()
		a.checked = true
		rec.mu.Unlock()
	}

	entries, err := journalsOf(append([]*cluster{c}, peers...)...)
	if err != nil {
		return append(problems, err.Error())
	}
	readAt := time.Now().UnixNano()
	logs := map[string]map[string]int{} // thread → text → count
	for _, th := range rec.threadsTouched() {
		msgs, err := c.api.threadMessages(th)
		if err != nil {
			problems = append(problems, fmt.Sprintf("log of %s after restart: %v", th, err))
			continue
		}
		m := map[string]int{}
		for _, msg := range msgs {
			m[msg.text()]++
		}
		logs[th] = m
	}
	rec.mu.Lock()
	for text, t := range rec.texts {
		// Only messages accepted before the logs were read: with the
		// sidecar alive (agent kills) a request sent before the kill may
		// be answered after the read, its message logged after it too.
		if !t.Accepted || t.checked || t.SentNs > killNs || t.AnsweredNs > readAt {
			continue
		}
		if m, ok := logs[t.Thread]; ok {
			if n := m[text]; n != 1 {
				problems = append(problems, fmt.Sprintf("after restart: accepted message %q is %d times in the log of %s", text, n, t.Thread))
			}
			t.checked = true
		}
	}
	rec.mu.Unlock()
	for _, e := range entries {
		if e.Event != EventCheckpoint || e.AckNs >= readAt {
			continue
		}
		// The text is known up to the total, which only the start knows.
		found := 0
		prefix := fmt.Sprintf("m%d of ", e.Index)
		suffix := fmt.Sprintf(" d=%s s=%s a=%d", e.DispatchID, e.SessionID, e.Attempt)
		for text, n := range logs[e.ThreadID] {
			if strings.HasPrefix(text, prefix) && strings.HasSuffix(text, suffix) {
				found += n
			}
		}
		if found != 1 {
			problems = append(problems, fmt.Sprintf("after restart: checkpoint m%d of attempt %s (acked %v) is %d times in the log of %s", e.Index, e.SessionID, ts(e.AckNs), found, e.ThreadID))
		}
	}
	return problems
}

// verifyStore opens the data directory (the sidecar stopped) and runs the
// store's consistency check; every dispatch read through the API must
// have the same status in the store.
func verifyStore(dir string, snap *snapshot) ([]string, error) {
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		return nil, fmt.Errorf("open the data directory: %w", err)
	}
	ctx := context.Background()
	rep, err := s.Verify(ctx)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("verify: %w", err)
	}
	problems := append([]string(nil), rep.Problems...)
	for id, d := range snap.dispatches {
		got, err := s.LoadDispatch(ctx, id)
		if err != nil || got == nil {
			problems = append(problems, fmt.Sprintf("dispatch %s: in the API, not in the store (%v)", id, err))
			continue
		}
		if got.Status.String() != d.Status {
			problems = append(problems, fmt.Sprintf("dispatch %s: %s in the store, %s through the API", id, got.Status, d.Status))
		}
	}
	if rep.Dispatches < len(snap.dispatches) {
		problems = append(problems, fmt.Sprintf("the store holds %d dispatches, the API showed %d", rep.Dispatches, len(snap.dispatches)))
	}
	return problems, s.Close()
}

// natsTarget names a NATS store: server, stream and prefix.
type natsTarget struct{ url, stream, prefix string }

// verifyNATS opens the NATS store the sidecars used (they stopped): every
// dispatch read through the API must have the same status there. (NATS has
// no counterpart of badgerstore.Verify: its records are checked through
// the API and the journals.)
func verifyNATS(n natsTarget, snap *snapshot) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := natsstore.Open(ctx, natsstore.Config{URL: n.url, Stream: n.stream, Prefix: n.prefix})
	if err != nil {
		return nil, fmt.Errorf("open the NATS store: %w", err)
	}
	var problems []string
	for id, d := range snap.dispatches {
		got, err := s.LoadDispatch(ctx, id)
		if err != nil || got == nil {
			problems = append(problems, fmt.Sprintf("dispatch %s: in the API, not in the store (%v)", id, err))
			continue
		}
		if got.Status.String() != d.Status {
			problems = append(problems, fmt.Sprintf("dispatch %s: %s in the store, %s through the API", id, got.Status, d.Status))
		}
	}
	return problems, s.Close()
}

// ts formats a Unix-ns time for reports.
func ts(ns int64) string {
	if ns == math.MaxInt64 {
		return "(still running)"
	}
	return time.Unix(0, ns).Format("15:04:05.000000")
}

// maxAttempts is the sidecar's --max-attempts.
const maxAttempts = 10

// checkSettlement: every terminal status has a cause the workload gave
// it, and a cancel answered cancelled:true is what settled its dispatch:
// cancelled, acked with termination cancelled or — when an interrupt or a
// foreground submit of its thread landed first — superseded. A cancel of
// an attempt whose claim an interrupt has just made stale (the interrupted
// attempt still stopping) answers cancelled:true as well (engine.md item
// 31: the executor had the run): the store supersedes the stale claim in
// the cancel's own commit and settles the run as cancelled.
func checkSettlement(f *findings, rec *recorder, snap *snapshot, acc []*accepted) {
	rec.mu.Lock()
	var tries []tryRec
	for _, t := range rec.tries {
		tries = append(tries, *t)
	}
	cancelled := map[string]bool{}
	cancelledBy := map[string]int64{} // dispatch → when the last cancel answered cancelled:true returned
	for _, c := range rec.cancels {
		cancelled[c.Dispatch] = cancelled[c.Dispatch] || c.Cancelled
		if c.Cancelled {
			cancelledBy[c.Dispatch] = max(cancelledBy[c.Dispatch], c.ReturnedNs)
		}
	}
	rec.mu.Unlock()
	// interruptedBefore: an interrupt or foreground submit of a's thread
	// (not a itself) sent before by and answered (or cut) after a was sent.
	interruptedBefore := func(a *accepted, by int64) bool {
		for _, t := range tries {
			if (t.Kind == "interrupt" || t.Kind == "foreground") && t.Thread == a.Thread && t.Dispatch != a.ID &&
				t.SentNs < by && t.EndNs > a.SentNs {
				return true
			}
		}
		return false
	}
	sentAfter := func(a *accepted, kinds ...string) bool {
		for _, t := range tries {
			for _, k := range kinds {
				if t.Kind == k && t.Thread == a.Thread && t.EndNs > a.SentNs && t.Dispatch != a.ID &&
					(k != "cancel" || t.Dispatch == a.ID) {
					return true
				}
			}
		}
		return false
	}
	for _, a := range acc {
		d, ok := snap.dispatches[a.ID]
		if !ok {
			continue
		}
		why := ""
		switch d.Status {
		case "superseded":
			if !sentAfter(a, "interrupt", "foreground") {
				why = "no interrupt or foreground submit of its thread could have superseded it"
			}
		case "cancelled":
			found := false
			for _, t := range tries {
				found = found || t.Kind == "cancel" && t.Dispatch == a.ID
			}
			if !found && !a.Superseded {
				why = "no cancel of it was sent, and its submit was not answered cancelled"
			}
		case "dead_letter":
			c := a.Cmd
			if !(c.Verb == VerbPermanent || c.Verb == VerbTransient && c.Arg >= maxAttempts || d.AttemptCount >= maxAttempts) {
				why = fmt.Sprintf("%q must succeed within %d attempts; %d spent", c, maxAttempts, d.AttemptCount)
			}
		}
		if cancelled[a.ID] && d.Status != "cancelled" && !(d.Status == "acked" && d.Termination != nil && d.Termination.Type == "cancelled") &&
			!(d.Status == "superseded" && interruptedBefore(a, cancelledBy[a.ID])) {
			why = fmt.Sprintf("a cancel answered cancelled:true, yet it ended %s %v", d.Status, d.Termination)
		}
		// Answered cancelled, it ends cancelled (the sidecar withdrew it)
		// or superseded: the concurrent submit's interrupt reached its
		// queued dispatch first (the case above asks that one was sent).
		if a.Superseded && d.Status != "cancelled" && d.Status != "superseded" {
			why = fmt.Sprintf("its foreground submit was answered cancelled, yet it ended %s", d.Status)
		}
		if why != "" {
			f.lost++
			f.suspects = append(f.suspects, a.ID)
			f.add("UNJUSTIFIED %s: %s dispatch %s on %s: %s (last error %q)", d.Status, a.Kind, a.ID, a.Thread, why, d.LastError)
		}
	}
}

// claimHold is how long a claim of a SIGKILLed sidecar certainly outlives
// it: --lease 2s renewed every 500ms.
const claimHold = 1500 * time.Millisecond

// orphanReason starts the error the restarted sidecar records for a dead
// process's claim it reclaims (engine.ReasonOrphaned, …Max).
const orphanReason = "claimed by an earlier sidecar process (restarted)"

// checkDeadClaims: an attempt cut by a sidecar kill leaves its dispatch
// claimed in the store. On a shared store (orphansReclaimed false) the
// claim holds until the lease lapses, and until then no other dispatch of
// that thread may start on any sidecar (one claimed dispatch per thread).
// A kill cuts only the attempts of its own sidecar's agents. On a store of
// one process the restarted sidecar reclaims it at once: the dispatch's
// error history must then say so, after the kill (the one-run-per-thread
// check above still holds the agents to their own timestamps).
func checkDeadClaims(f *findings, rec *recorder, snap *snapshot, ix *journalIndex, kills []sidecarKill, orphansReclaimed bool) {
	rec.mu.Lock()
	settled := map[string]int64{} // dispatch → earliest cancel sent
	for _, t := range rec.tries {
		if t.Kind == "cancel" && (settled[t.Dispatch] == 0 || t.SentNs < settled[t.Dispatch]) {
			settled[t.Dispatch] = t.SentNs
		}
	}
	rec.mu.Unlock()
	for _, kill := range kills {
		k := kill.ns
		for th, l := range ix.byThread {
			for _, s := range l {
				// cut by this kill: its agent (of the killed sidecar) saw
				// the connection drop, or died after the sidecar without
				// an end record
				cut := s.end != nil && s.end.Outcome == OutcomeLost || s.end == nil && s.start.agent.deathNs >= k
				if !cut || !kill.cuts(s) || s.start.StartNs >= k || s.endNs < k {
					continue
				}
				if c, ok := settled[s.start.DispatchID]; ok && c < k {
					continue // a cancel may have settled it before the kill
				}
				if orphansReclaimed {
					d, ok := snap.dispatches[s.start.DispatchID]
					if !ok || d.Status == "superseded" || len(d.Errors) == 0 && s.end == nil {
						// Purged; or an interrupt made the claim stale
						// (superseded without an error); or its agent died
						// without an end record, maybe after a FINISH the
						// sidecar took before its kill.
						continue
					}
					// Reclaimed by the process started after this kill: at
					// or after it, before the next kill of that sidecar.
					next := int64(math.MaxInt64)
					for _, k2 := range kills {
						if k2.node == kill.node && k2.ns > k && k2.ns < next {
							next = k2.ns
						}
					}
					reclaimed := false
					for _, e := range d.Errors {
						at := e.At * int64(time.Millisecond)
						reclaimed = reclaimed || strings.HasPrefix(e.Error, orphanReason) && at >= k-int64(time.Millisecond) && at < next
					}
					if !reclaimed && len(d.Errors) < 32 { // a longer history may have lost the entry
						f.add("DEAD CLAIM NOT RECLAIMED on %s: attempt %s of %s was cut by the sidecar kill at %v; its errors %v name no reclaim by the next process",
							th, s.start.SessionID, s.start.DispatchID, ts(k), d.Errors)
					}
					continue
				}
				for _, o := range l {
					if o.start.DispatchID != s.start.DispatchID && o.start.StartNs > k && o.start.StartNs < k+int64(claimHold) {
						f.overlaps++
						f.add("DEAD CLAIM IGNORED on %s: attempt %s of %s was cut by the sidecar kill at %v, yet attempt %s of %s started %v later",
							th, s.start.SessionID, s.start.DispatchID, ts(k), o.start.SessionID, o.start.DispatchID, time.Duration(o.start.StartNs-k))
					}
				}
			}
		}
	}
}

// checkDelivered: every live message answered `delivery: live` and every
// decision answered `delivered:true` is in the journal of an attempt of
// its run that started before the answer, received after it was sent
// (the SDK acknowledges a command only once it is in the run's buffer,
// and the agent journals the buffer before its end record). Each receipt
// matches one answer. Excused when no attempt of the run was running at
// the answer (the command raced with the attempt's end: the SDK can
// still take it after the end record; it logs "run returned with live
// commands unread"), or one running then has no end record (its agent
// was killed or frozen: what it received may be lost with it).
func checkDelivered(f *findings, rec *recorder, ix *journalIndex) {
	rec.mu.Lock()
	delivered := append([]liveRec(nil), rec.delivered...)
	rec.mu.Unlock()
	sort.Slice(delivered, func(i, j int) bool { return delivered[i].AnsweredNs < delivered[j].AnsweredNs })
	byRun := map[string][]*session{}
	for _, s := range ix.sessions {
		byRun[s.start.RunID] = append(byRun[s.start.RunID], s)
	}
	used := map[*journalEntry]bool{}
	for _, c := range delivered {
		want := c.Texts
		if c.Kind == EventDecision {
			want = []string{c.CallID}
		}
		for _, w := range want {
			found, running, killed := false, false, false
			for _, s := range byRun[c.RunID] {
				if s.start.StartNs > c.AnsweredNs {
					continue
				}
				if s.endNs > c.AnsweredNs {
					running, killed = true, killed || s.end == nil
				}
				for i := range s.inbox {
					r := &s.inbox[i]
					if found || used[r] || r.Event != c.Kind || r.AtNs < c.SentNs || (r.Text != w && r.CallID != w) {
						continue
					}
					found, used[r] = true, true
					if s.start.agent.node != c.Via {
						f.crossLive++
					}
				}
			}
			switch {
			case found:
				f.liveReceived++
			case !running || killed:
				f.liveExcused++
			default:
				f.undelivered++
				f.add("NOT RECEIVED: %s %q for run %s on %s, answered delivered at %v (sent %v), is in no journal of an attempt of that run",
					c.Kind, w, c.RunID, c.Thread, ts(c.AnsweredNs), ts(c.SentNs))
			}
		}
	}
}

// cancelMargin is how long after a plain interrupt returned the attempt
// it found active may still end on its own or see its cancel (the CANCEL
// is sent asynchronously: under 2 ms on the unmutated product; an
// interrupt that leaves the attempt to its next lease renewal, every
// 500 ms here, takes 250 ms or more). Under the race detector it is 250
// ms: a CI run of make test on two cores, beside the other packages'
// tests, saw a race-built agent journal a promptly sent CANCEL 118 ms
// after the interrupt returned. A mutant that waits for the renewal
// still exceeds it in about half its attempts, and a run checks dozens.
var cancelMargin = map[bool]time.Duration{false: 100 * time.Millisecond, true: 250 * time.Millisecond}[raceEnabled]

// checkInterruptCancels: the attempt a plain interrupt found active
// (ActiveInstance) is cancelled: it journals the cancel and ends
// cancelled, or it ended on its own within cancelMargin of the
// interrupt's return (of its own start, when it reached the agent only
// after the interrupt: see the late runs). Excused: no end record (its
// agent was killed or frozen), a lost connection or shutdown, a sidecar
// kill between the interrupt and its end, or an attempt that ended on
// its own, without a cancel, by a path that never looks at its context
// (a permanent or transient failure, returned right after run_start):
// whether it ends before or after the CANCEL is the agent's scheduling,
// and an agent process starved for a few hundred milliseconds on a
// loaded machine (a CI run with the race detector) ends it late without
// any fault of the sidecar's. A late CANCEL is still checked for them.
func checkInterruptCancels(f *findings, rec *recorder, ix *journalIndex, kills []sidecarKill) {
	rec.mu.Lock()
	interrupts := append([]interruptRec(nil), rec.interrupts...)
	rec.mu.Unlock()
	for _, i := range interrupts {
		s := ix.sessions[i.ActiveInstance]
		if i.Own != "" || s == nil {
			continue
		}
		v, cancelNs := judgeCancel(s, i.SentNs, max(i.ReturnedNs, s.start.StartNs)+int64(cancelMargin), kills)
		if v == cancelUnjudged {
			continue
		}
		f.activeCancelled++
		if i.Via != s.start.agent.node {
			f.crossInterrupts++
		}
		switch v {
		case cancelBlind:
			f.cancelBlind++
		case cancelMissing:
			f.uncancelled++
			f.add("NOT CANCELLED: attempt %s of %s on %s was active at an interrupt that returned at %v; it ended %s at %v",
				s.start.SessionID, s.start.DispatchID, i.Thread, ts(i.ReturnedNs), s.end.Outcome, ts(s.end.EndNs))
		case cancelLate:
			f.uncancelled++
			f.add("NOT CANCELLED: attempt %s of %s on %s was active at an interrupt that returned at %v; its cancel came only at %v\n%s",
				s.start.SessionID, s.start.DispatchID, i.Thread, ts(i.ReturnedNs), ts(cancelNs), sessionTrace(s, i.SentNs, i.ReturnedNs))
		}
	}
}

// checkCancelsReach: a cancel answered cancelled:true while an attempt of
// its dispatch was executing (started before the cancel returned, no end
// by then) reaches that attempt, on whichever sidecar it executes (a
// local cancel, or one routed by the live router): judged as an attempt
// an interrupt found active (checkInterruptCancels), within cancelMargin
// of the cancel's return. `NOT CANCELLED`.
func checkCancelsReach(f *findings, rec *recorder, ix *journalIndex, kills []sidecarKill) {
	rec.mu.Lock()
	cancels := append([]cancelRec(nil), rec.cancels...)
	rec.mu.Unlock()
	for _, c := range cancels {
		if !c.Cancelled {
			continue
		}
		for _, s := range ix.byDispatch[c.Dispatch] {
			if s.start.StartNs >= c.ReturnedNs || s.endNs <= c.ReturnedNs {
				continue
			}
			v, cancelNs := judgeCancel(s, c.SentNs, c.ReturnedNs+int64(cancelMargin), kills)
			if v == cancelUnjudged {
				continue
			}
			f.runningCancelled++
			if c.Via != s.start.agent.node {
				f.crossCancels++
			}
			switch v {
			case cancelBlind:
				f.cancelBlind++
			case cancelMissing:
				f.uncancelled++
				f.add("NOT CANCELLED: attempt %s of %s on %s was executing when a cancel of it returned cancelled:true at %v; it ended %s at %v\n%s",
					s.start.SessionID, s.start.DispatchID, c.Thread, ts(c.ReturnedNs), s.end.Outcome, ts(s.end.EndNs), sessionTrace(s, c.SentNs, c.ReturnedNs))
			case cancelLate:
				f.uncancelled++
				f.add("NOT CANCELLED: attempt %s of %s on %s was executing when a cancel of it returned cancelled:true at %v; its cancel came only at %v\n%s",
					s.start.SessionID, s.start.DispatchID, c.Thread, ts(c.ReturnedNs), ts(cancelNs), sessionTrace(s, c.SentNs, c.ReturnedNs))
			}
		}
	}
}

// cancelVerdict is how an attempt a command meant to cancel ended.
type cancelVerdict int

const (
	cancelUnjudged cancelVerdict = iota // no end record (its agent was killed or frozen), or lost or shut down
	cancelExcused                       // a kill of its sidecar came between the command and its end
	cancelInTime                        // ended by the deadline, or its cancel was journaled by then
	cancelBlind                         // ended late on its own, no cancel journaled, by a path blind to its context
	cancelMissing                       // ended late otherwise, or not cancelled
	cancelLate                          // its cancel was journaled only after the deadline
)

// judgeCancel judges attempt s, which a command sent at sentNs meant to
// cancel by the deadline by: it journals the cancel and ends cancelled,
// or it ends on its own by then. It returns the verdict and when the
// cancel was journaled (0: never). The excuses are checkInterruptCancels's.
func judgeCancel(s *session, sentNs, by int64, kills []sidecarKill) (cancelVerdict, int64) {
	if s.end == nil || s.end.Outcome == OutcomeLost || s.end.Outcome == OutcomeShutdown {
		return cancelUnjudged, 0
	}
	for _, k := range kills {
		if k.cuts(s) && k.ns > sentNs && k.ns < s.endNs {
			return cancelExcused, 0
		}
	}
	if s.end.EndNs <= by {
		return cancelInTime, 0
	}
	var cancelNs int64
	for _, r := range s.inbox {
		if r.Event == EventCancel && cancelNs == 0 {
			cancelNs = r.AtNs
		}
	}
	switch out := s.end.Outcome; {
	case cancelNs == 0 && (out == OutcomePermanent || out == OutcomeTransient):
		return cancelBlind, 0
	case out != OutcomeCancelled || cancelNs == 0:
		return cancelMissing, cancelNs
	case cancelNs > by:
		return cancelLate, cancelNs
	}
	return cancelInTime, cancelNs
}

// sessionTrace describes an attempt an interrupt or a cancel (sent and
// returned at those times) found active: when it started, on which
// sidecar, what it executed, what it received and when it ended.
func sessionTrace(s *session, sentNs, returnedNs int64) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\tinterrupt or cancel sent %v returned %v\n", ts(sentNs), ts(returnedNs))
	fmt.Fprintf(&b, "\tattempt %d (pid %d, sidecar %q) started %v executing %q\n", s.start.Attempt, s.start.PID, s.start.agent.node, ts(s.start.StartNs), s.start.Command)
	for _, r := range s.inbox {
		fmt.Fprintf(&b, "\treceived %s %q at %v\n", r.Event, r.Text, ts(r.AtNs))
	}
	for _, c := range s.cps {
		fmt.Fprintf(&b, "\tcheckpoint m%d acked at %v\n", c.Index, ts(c.AckNs))
	}
	if s.end != nil {
		fmt.Fprintf(&b, "\tended %s at %v", s.end.Outcome, ts(s.end.EndNs))
	}
	return b.String()
}

// checkRequestOrder: the messages of each request answered 2xx sit at
// consecutive seqs of its thread's log, in the request's order; and a
// request answered before another of its thread was sent has its
// messages before the other's. Messages lost or duplicated are reported
// above and skipped here.
func checkRequestOrder(f *findings, rec *recorder, snap *snapshot) {
	rec.mu.Lock()
	var reqs []requestRec
	for _, q := range rec.requests {
		if q.AnsweredNs != 0 {
			reqs = append(reqs, *q)
		}
	}
	rec.mu.Unlock()
	type span struct {
		q           requestRec
		first, last uint64
	}
	byThread := map[string][]span{}
	for th, l := range snap.logs {
		seq := map[string]uint64{} // text → seq, for texts once in the log
		dup := map[string]bool{}
		for _, m := range l {
			if _, ok := seq[m.text()]; ok {
				dup[m.text()] = true
			}
			seq[m.text()] = m.Seq
		}
	requests:
		for _, q := range reqs {
			if q.Thread != th {
				continue
			}
			var got []uint64
			for _, text := range q.Texts {
				s, ok := seq[text]
				if !ok || dup[text] {
					continue requests
				}
				got = append(got, s)
			}
			if len(got) > 1 {
				f.requestsOrdered++
			}
			for i := 1; i < len(got); i++ {
				if got[i] != got[i-1]+1 {
					f.reordered++
					f.add("REORDERED: the %d messages of a request on %s (%q, answered %v) are at seqs %v of its log", len(got), th, q.Texts[0], ts(q.AnsweredNs), got)
					break
				}
			}
			byThread[th] = append(byThread[th], span{q, slices.Min(got), slices.Max(got)})
		}
	}
	for th, l := range byThread {
		for _, b := range l {
			for _, a := range l {
				if a.q.AnsweredNs < b.q.SentNs && a.last >= b.first {
					f.reordered++
					f.add("OUT OF ORDER on %s: %q (answered %v) is at seq %d, after %q (sent later, %v) at seq %d",
						th, a.q.Texts[0], ts(a.q.AnsweredNs), a.last, b.q.Texts[0], ts(b.q.SentNs), b.first)
				}
			}
		}
	}
}

// checkEventIDs checks the SSE event ids of the foreground streams
// (engine/README.md, "Event ids"): they grow within a stream, and an
// attempt's ids are above those of its run's earlier started attempts —
// the run's s-th recorded start numbers from (s−1)·2³²+1. A stream follows
// one attempt of its run, which started after the stream's request was
// sent; every journal start of the run before that is an earlier attempt
// whose start was recorded (an agent is sent a run only after its start
// is), so with j of them each agent event of the stream has an id of at
// least j·2³²+1. The sidecar's run_finish is left out: an attempt that
// never reached the agent numbers its run_finish apart. `EVENT IDS`.
func checkEventIDs(f *findings, rec *recorder, ix *journalIndex) {
	rec.mu.Lock()
	streams := append([]streamRec(nil), rec.fgStreams...)
	rec.mu.Unlock()
	for _, st := range streams {
		for i := 1; i < len(st.Events); i++ {
			if st.Events[i].ID <= st.Events[i-1].ID {
				f.badEventIDs++
				f.add("EVENT IDS: foreground stream of dispatch %s (run %s on %s): %s id %d after %s id %d",
					st.Dispatch, st.RunID, st.Thread, st.Events[i].Type, st.Events[i].ID, st.Events[i-1].Type, st.Events[i-1].ID)
				break
			}
		}
		earlier := map[string]bool{}
		for _, s := range ix.byThread[st.Thread] {
			if s.start.RunID == st.RunID && s.start.StartNs < st.SentNs {
				earlier[s.start.SessionID] = true
			}
		}
		if len(earlier) == 0 {
			continue
		}
		f.continuationIDs++
		floor := uint64(len(earlier))<<32 + 1
		for _, e := range st.Events {
			if e.Type != "run_finish" && e.ID < floor {
				f.badEventIDs++
				f.add("EVENT IDS: foreground stream of dispatch %s (run %s on %s) sent at %v: %s id %d, below %d though %d attempts of the run had started before (journal): ids of an earlier attempt's band",
					st.Dispatch, st.RunID, st.Thread, ts(st.SentNs), e.Type, e.ID, floor, len(earlier))
				break
			}
		}
	}
}
