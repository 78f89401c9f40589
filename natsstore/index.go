package natsstore

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The index is this process's in-memory view of the dispatches and runs,
// fed by an ordered consumer over the dispatch, thread-state and run
// subjects: it starts with the last message of every subject, then
// follows every new one. It answers the listings (ListDispatches,
// CountByStatus, ListTerminal, ListDeadLetters, QueuedThreadIDs,
// ReadyThreads, LatestRun, ListRuns) and picks candidates for Claim,
// Interrupt, ReclaimExpired and PurgeTerminal, which then validate every
// candidate against the records themselves.
//
// Consistency: applied is the stream sequence of the last message the
// index has taken in. A read that must see this process's writes first
// waits until applied reaches the highest sequence this process committed
// (read-your-writes); Claim and Interrupt wait until it reaches the
// sequence of the thread state they read (see records.go threadState).
// Writes of other processes become visible as the consumer delivers them.
//
// Entries hold only what ordering and filtering need, never payloads.
type index struct {
	mu         sync.RWMutex
	disp       map[string]*dEntry      // dispatch id → entry
	threads    map[string]*threadEntry // thread → its dispatches
	counts     engine.StatusCounts     // dispatches per status
	terminal   terminalList            // the terminal dispatches, in terminal order
	runs       map[string]*rEntry      // run id → entry
	runThreads map[string]map[string]*rEntry
	applied    atomic.Uint64 // written under mu; read without it

	waitMu  sync.Mutex    // guards waitCh and waiters
	waitCh  chan struct{} // closed (and replaced) when applied advances while waiters > 0
	waiters int

	sub subjects
	log func(msg string, args ...any)
}

// dEntry is what the index keeps of one dispatch.
type dEntry struct {
	seq       uint64
	id        string
	thread    string
	status    engine.DispatchStatus
	prio      uint8
	requeued  bool
	epoch     uint64
	created   int64
	updated   int64
	avail     int64
	completed int64
	lease     int64
	gone      bool // dropped from the index (terminalList)
}

type threadEntry struct {
	ds      map[string]*dEntry
	queued  int
	claimed int
	// first is the earliest avail of its queued dispatches (while queued
	// > 0), ended the latest update of its acked and dead-lettered ones
	// (0: none): its place in the ready order, kept as entries come and
	// go so that a listing does not walk every dispatch of every thread.
	first, ended int64
}

// endsRun reports whether a dispatch in status st ended its thread's run
// for the ready order (round-robin: acked or dead-lettered).
func endsRun(st engine.DispatchStatus) bool {
	return st == engine.StatusAcked || st == engine.StatusDeadLetter
}

// add counts e in te's place in the ready order.
func (te *threadEntry) add(e *dEntry) {
	switch {
	case e.status == engine.StatusQueued:
		if te.queued == 0 || e.avail < te.first {
			te.first = e.avail
		}
		te.queued++
	case e.status == engine.StatusClaimed:
		te.claimed++
	case endsRun(e.status):
		te.ended = max(te.ended, e.updated)
	}
}

// remove takes e (already out of te.ds) out of te's place in the ready
// order, walking te's dispatches only when e set it.
func (te *threadEntry) remove(e *dEntry) {
	switch {
	case e.status == engine.StatusQueued:
		te.queued--
		if te.queued > 0 && e.avail == te.first {
			first, found := int64(0), false
			for _, o := range te.ds {
				if o.status == engine.StatusQueued && (!found || o.avail < first) {
					first, found = o.avail, true
				}
			}
			te.first = first
		}
	case e.status == engine.StatusClaimed:
		te.claimed--
	case endsRun(e.status) && e.updated == te.ended:
		te.ended = 0
		for _, o := range te.ds {
			if endsRun(o.status) {
				te.ended = max(te.ended, o.updated)
			}
		}
	}
}

// rEntry is what the index keeps of one run.
type rEntry struct {
	seq     uint64
	id      string
	thread  string
	status  engine.RunStatus
	created int64
	updated int64
}

// dispatchHead and runHead decode only the fields the index keeps.
type dispatchHead struct {
	DispatchID  string                `json:"dispatch_id"`
	ThreadID    string                `json:"thread_id"`
	Priority    uint8                 `json:"priority"`
	Epoch       uint64                `json:"dispatch_epoch"`
	Status      engine.DispatchStatus `json:"status"`
	AvailableAt int64                 `json:"available_at"`
	RequeuedAs  string                `json:"requeued_as"`
	LeaseUntil  int64                 `json:"lease_until"`
	CompletedAt int64                 `json:"completed_at"`
	CreatedAt   int64                 `json:"created_at"`
	UpdatedAt   int64                 `json:"updated_at"`
}

type runHead struct {
	RunID     string           `json:"run_id"`
	ThreadID  string           `json:"thread_id"`
	Status    engine.RunStatus `json:"status"`
	CreatedAt int64            `json:"created_at"`
	UpdatedAt int64            `json:"updated_at"`
}

func newIndex(sub subjects, log func(string, ...any)) *index {
	return &index{
		disp:       make(map[string]*dEntry),
		threads:    make(map[string]*threadEntry),
		runs:       make(map[string]*rEntry),
		runThreads: make(map[string]map[string]*rEntry),
		waitCh:     make(chan struct{}),
		sub:        sub,
		log:        log,
	}
}

// handle applies one delivered message.
func (ix *index) handle(m jetstream.Msg) {
	md, err := m.Metadata()
	if err != nil {
		ix.log("index: message without metadata", "subject", m.Subject(), "err", err)
		return
	}
	seq := md.Sequence.Stream
	del := m.Headers().Get(hdrOp) == opDelete || len(m.Data()) == 0
	ix.mu.Lock()
	if err := ix.applyLocked(m.Subject(), seq, m.Data(), del); err != nil {
		ix.log("index: skipping record", "subject", m.Subject(), "seq", seq, "err", err)
	}
	if seq > ix.applied.Load() {
		ix.applied.Store(seq)
	}
	ix.mu.Unlock()
	ix.waitMu.Lock()
	if ix.waiters > 0 {
		close(ix.waitCh)
		ix.waitCh = make(chan struct{})
	}
	ix.waitMu.Unlock()
}

func (ix *index) applyLocked(subj string, seq uint64, data []byte, del bool) error {
	fam, rest := ix.sub.family(subj)
	switch fam {
	case famDispatch:
		id, err := unseg(rest)
		if err != nil {
			return err
		}
		old := ix.disp[id]
		if old != nil && old.seq >= seq {
			return nil
		}
		if del {
			if old != nil {
				ix.removeDispatchLocked(old)
			}
			return nil
		}
		var h dispatchHead
		if err := unmarshal(data, &h); err != nil {
			return fmt.Errorf("decode: %w", err)
		}
		if h.DispatchID != id || !h.Status.Valid() {
			return fmt.Errorf("record names dispatch %q with status %d", h.DispatchID, h.Status)
		}
		if old != nil {
			ix.removeDispatchLocked(old)
		}
		ix.addDispatchLocked(&dEntry{
			seq: seq, id: id, status: h.Status, prio: h.Priority, requeued: h.RequeuedAs != "",
			epoch: h.Epoch, created: h.CreatedAt, updated: h.UpdatedAt, avail: h.AvailableAt,
			completed: h.CompletedAt, lease: h.LeaseUntil, thread: h.ThreadID,
		})
	case famRun:
		id, err := unseg(rest)
		if err != nil {
			return err
		}
		old := ix.runs[id]
		if old != nil && old.seq >= seq {
			return nil
		}
		if old != nil {
			ix.removeRunLocked(old)
		}
		if del {
			return nil
		}
		var h runHead
		if err := unmarshal(data, &h); err != nil {
			return fmt.Errorf("decode: %w", err)
		}
		if h.RunID != id {
			return fmt.Errorf("record names run %q", h.RunID)
		}
		ix.addRunLocked(&rEntry{seq: seq, id: id, thread: h.ThreadID, status: h.Status, created: h.CreatedAt, updated: h.UpdatedAt})
	}
	return nil
}

func (ix *index) addDispatchLocked(e *dEntry) {
	te := ix.threads[e.thread]
	if te == nil {
		te = &threadEntry{ds: make(map[string]*dEntry)}
		ix.threads[e.thread] = te
	} else {
		for _, other := range te.ds { // share one copy of the thread id
			e.thread = other.thread
			break
		}
	}
	te.ds[e.id] = e
	te.add(e)
	ix.disp[e.id] = e
	ix.counts[e.status]++
	if e.status.Terminal() {
		ix.terminal.add(e)
	}
}

func (ix *index) removeDispatchLocked(e *dEntry) {
	delete(ix.disp, e.id)
	ix.counts[e.status]--
	if e.status.Terminal() {
		ix.terminal.remove(e)
	}
	te := ix.threads[e.thread]
	if te == nil {
		return
	}
	delete(te.ds, e.id)
	te.remove(e)
	if len(te.ds) == 0 {
		delete(ix.threads, e.thread)
	}
}

func (ix *index) addRunLocked(e *rEntry) {
	ix.runs[e.id] = e
	m := ix.runThreads[e.thread]
	if m == nil {
		m = make(map[string]*rEntry)
		ix.runThreads[e.thread] = m
	}
	m[e.id] = e
}

func (ix *index) removeRunLocked(e *rEntry) {
	delete(ix.runs, e.id)
	if m := ix.runThreads[e.thread]; m != nil {
		delete(m, e.id)
		if len(m) == 0 {
			delete(ix.runThreads, e.thread)
		}
	}
}

// wait returns once the index has applied seq, or ctx ends, or the store
// closes (done).
func (ix *index) wait(ctx context.Context, seq uint64, done <-chan struct{}) error {
	for {
		if ix.applied.Load() >= seq {
			return nil
		}
		ix.waitMu.Lock()
		if ix.applied.Load() >= seq {
			ix.waitMu.Unlock()
			return nil
		}
		ch := ix.waitCh
		ix.waiters++
		ix.waitMu.Unlock()
		var err error
		select {
		case <-ch:
		case <-ctx.Done():
			err = fmt.Errorf("waiting for the index to reach sequence %d (at %d): %w", seq, ix.applied.Load(), ctx.Err())
		case <-done:
			err = fmt.Errorf("store closed: %w", engine.ErrUnavailable)
		}
		ix.waitMu.Lock()
		ix.waiters--
		ix.waitMu.Unlock()
		if err != nil {
			return err
		}
	}
}

// caughtUp polls the consumer until it has delivered, and the index
// applied, everything the stream held when it was asked.
func (ix *index) caughtUp(ctx context.Context, cons jetstream.Consumer) error {
	for {
		info, err := cons.Info(ctx)
		if err == nil && info.NumPending == 0 && ix.applied.Load() >= info.Delivered.Stream {
			return nil
		}
		t := time.NewTimer(5 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			if err == nil {
				err = ctx.Err()
			}
			return fmt.Errorf("index catch-up: %w", err)
		case <-t.C:
		}
	}
}

// Queries. Each takes the read lock and returns copies.

func (ix *index) threadOf(id string) string {
	ix.mu.RLock()
	defer ix.mu.RUnlock()
	if e := ix.disp[id]; e != nil {
		return e.thread
	}
	return ""
}

// claimOrder is (priority, created_at, dispatch_id).
func claimOrder(a, b *dEntry) int {
	return cmp.Or(cmp.Compare(a.prio, b.prio), cmp.Compare(a.created, b.created), strings.Compare(a.id, b.id))
}

// threadDispatches returns copies of the thread's dispatches that pass
// keep, in claim order.
func (ix *index) threadDispatches(thread string, keep func(*dEntry) bool) []dEntry {
	ix.mu.RLock()
	te := ix.threads[thread]
	var ps []*dEntry
	if te != nil {
		ps = make([]*dEntry, 0, len(te.ds))
		for _, e := range te.ds {
			if keep(e) {
				ps = append(ps, e)
			}
		}
	}
	slices.SortFunc(ps, claimOrder)
	out := make([]dEntry, len(ps))
	for i, p := range ps {
		out[i] = *p
	}
	ix.mu.RUnlock()
	return out
}

func (ix *index) statusCounts() engine.StatusCounts {
	ix.mu.RLock()
	defer ix.mu.RUnlock()
	return ix.counts
}

// collect returns copies of every dispatch that passes keep, sorted.
func (ix *index) collect(keep func(*dEntry) bool, order func(a, b *dEntry) int) []dEntry {
	ix.mu.RLock()
	var ps []*dEntry
	for _, e := range ix.disp {
		if keep(e) {
			ps = append(ps, e)
		}
	}
	slices.SortFunc(ps, order)
	out := make([]dEntry, len(ps))
	for i, p := range ps {
		out[i] = *p
	}
	ix.mu.RUnlock()
	return out
}

// terminalCursorsAfter lists, as cursors, up to limit terminal
// dispatches strictly after c in terminal order.
func (ix *index) terminalCursorsAfter(c engine.TerminalCursor, limit int) []engine.TerminalCursor {
	ix.mu.Lock() // the listing may compact the list
	defer ix.mu.Unlock()
	return ix.terminal.after(c, limit)
}

func (ix *index) deadLetters(limit, offset int) []string {
	es := ix.collect(func(e *dEntry) bool {
		return e.status == engine.StatusDeadLetter && !e.requeued
	}, func(a, b *dEntry) int {
		return cmp.Or(cmp.Compare(b.completed, a.completed), strings.Compare(b.id, a.id))
	})
	return ids(es, offset, limit)
}

func (ix *index) expired(now int64) []dEntry {
	return ix.collect(func(e *dEntry) bool {
		return e.status == engine.StatusClaimed && e.lease < now
	}, func(a, b *dEntry) int {
		return cmp.Or(cmp.Compare(a.lease, b.lease), strings.Compare(a.id, b.id))
	})
}

func (ix *index) purgeable(olderThan int64) []dEntry {
	return ix.collect(func(e *dEntry) bool {
		return e.status.Terminal() && e.updated < olderThan
	}, terminalOrder)
}

// ids returns the ids of es[offset:], at most limit (≤ 0: all).
func ids(es []dEntry, offset, limit int) []string {
	offset = max(offset, 0)
	if offset >= len(es) {
		return nil
	}
	es = es[offset:]
	if limit > 0 && len(es) > limit {
		es = es[:limit]
	}
	out := make([]string, len(es))
	for i := range es {
		out[i] = es[i].id
	}
	return out
}

func (ix *index) queuedThreads() []string {
	ix.mu.RLock()
	out := []string{}
	for t, te := range ix.threads {
		if te.queued > 0 {
			out = append(out, t)
		}
	}
	ix.mu.RUnlock()
	slices.Sort(out)
	return out
}

// ready lists claimable threads (queued work, no claimed dispatch) due by
// now and strictly after after, the one waiting longest first (then by
// thread id): due since its oldest queued work, or since its last run
// ended if that is later; and the earliest due time after now.
func (ix *index) ready(now int64, after engine.ReadyEntry, limit int) ([]engine.ReadyEntry, int64) {
	var next int64
	sel := readySelect{limit: limit}
	ix.mu.RLock()
	for t, te := range ix.threads {
		if te.queued == 0 || te.claimed > 0 {
			continue
		}
		// A thread whose run just ended goes behind the threads that were
		// waiting already (round-robin, as the Badger store's ready
		// index): it is due since its last run ended if that is later
		// than its oldest queued work, and not listed before then (a
		// caller may list at a time before it: the engine's shared-claim
		// grace; found by review).
		due := max(te.first, te.ended)
		if due > now {
			if next == 0 || due < next {
				next = due
			}
			continue
		}
		if e := (engine.ReadyEntry{ThreadID: t, Due: due}); after.IsZero() || after.Before(e) {
			sel.offer(e)
		}
	}
	ix.mu.RUnlock()
	return sel.sorted(), next
}

// readySelect keeps the first limit entries offered, in ready order,
// without sorting every claimable thread: a max-heap of the kept ones.
type readySelect struct {
	limit int
	h     []engine.ReadyEntry
}

func (s *readySelect) offer(e engine.ReadyEntry) {
	if len(s.h) < s.limit {
		s.h = append(s.h, e)
		for i := len(s.h) - 1; i > 0; { // up
			p := (i - 1) / 2
			if !s.h[p].Before(s.h[i]) {
				break
			}
			s.h[p], s.h[i] = s.h[i], s.h[p]
			i = p
		}
		return
	}
	if len(s.h) == 0 || !e.Before(s.h[0]) {
		return
	}
	s.h[0] = e
	for i := 0; ; { // down
		c := 2*i + 1
		if c >= len(s.h) {
			break
		}
		if c+1 < len(s.h) && s.h[c].Before(s.h[c+1]) {
			c++
		}
		if !s.h[i].Before(s.h[c]) {
			break
		}
		s.h[i], s.h[c] = s.h[c], s.h[i]
		i = c
	}
}

// sorted returns the kept entries in ready order.
func (s *readySelect) sorted() []engine.ReadyEntry {
	out := s.h
	if out == nil {
		out = []engine.ReadyEntry{}
	}
	slices.SortFunc(out, func(a, b engine.ReadyEntry) int {
		return cmp.Or(cmp.Compare(a.Due, b.Due), strings.Compare(a.ThreadID, b.ThreadID))
	})
	return out
}

// latestRun returns the thread's run with the greatest (updated_at,
// created_at, run_id), or "".
func (ix *index) latestRun(thread string) string {
	ix.mu.RLock()
	defer ix.mu.RUnlock()
	var best *rEntry
	for _, e := range ix.runThreads[thread] {
		if best == nil || cmp.Or(cmp.Compare(e.updated, best.updated), cmp.Compare(e.created, best.created), strings.Compare(e.id, best.id)) > 0 {
			best = e
		}
	}
	if best == nil {
		return ""
	}
	return best.id
}

// listRuns returns the ids of one page of runs in (created_at, run_id)
// order and the total that match.
func (ix *index) listRuns(status engine.RunStatus, thread string, offset, limit int) ([]string, int) {
	ix.mu.RLock()
	var ps []*rEntry
	add := func(e *rEntry) {
		if status == "" || e.status == status {
			ps = append(ps, e)
		}
	}
	if thread != "" {
		for _, e := range ix.runThreads[thread] {
			add(e)
		}
	} else {
		for _, e := range ix.runs {
			add(e)
		}
	}
	slices.SortFunc(ps, func(a, b *rEntry) int { return cmp.Or(cmp.Compare(a.created, b.created), strings.Compare(a.id, b.id)) })
	total := len(ps)
	var out []string
	for i := offset; i < len(ps) && len(out) < limit; i++ {
		out = append(out, ps[i].id)
	}
	ix.mu.RUnlock()
	return out, total
}

// readyHeads returns, for every claimable thread (queued work, no claimed
// dispatch), its first due queued dispatch in claim order (the one Claim
// would take), unordered across threads.
func (ix *index) readyHeads(now int64) []dEntry {
	var out []dEntry
	ix.mu.RLock()
	for _, te := range ix.threads {
		if te.queued == 0 || te.claimed > 0 {
			continue
		}
		var best *dEntry
		for _, e := range te.ds {
			if e.status == engine.StatusQueued && e.avail <= now && (best == nil || claimOrder(e, best) < 0) {
				best = e
			}
		}
		if best != nil {
			out = append(out, *best)
		}
	}
	ix.mu.RUnlock()
	return out
}

// isQueued reports whether the index holds dispatch id as queued.
func (ix *index) isQueued(id string) bool {
	ix.mu.RLock()
	defer ix.mu.RUnlock()
	e := ix.disp[id]
	return e != nil && e.status == engine.StatusQueued
}
