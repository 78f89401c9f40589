package engine

// Threads set aside here (claimhold.go) keep their place in the store's
// ready order, and they are its oldest entries: nothing claims them, so
// nothing moves them on. Every dispatcher round listed them all to find
// the claimable threads behind them, so each round cost O(held): 10 000
// threads waiting for an agent id that no agent serves made every run of
// the others cost 1.6 times as much, 40 000 two to three times
// (BenchmarkBackgroundRunBesideHeld).
//
// The dispatcher now keeps the place in the ready order where the held
// threads at its head end (heldPrefix), and lists from there. Threads
// held for a full agent (busy) count too: the prefix keeps them in order
// by agent id, and a free slot of that agent admits the oldest of them
// without a listing (admitPrefixLocked). Before, they ended the prefix,
// and a backlog of 10 000 runs for one full agent made every run of the
// other agents cost 2.1 times as much, 40 000 3.6 times
// (BenchmarkBackgroundRunBesideBusy). A thread admitted so is claimed at
// once and leaves the prefix without dropping it: its work goes to the
// end of the order once it is done, or is put back (below). The
// prefix is dropped, and the next round lists from the start:
//   - when any hold here ends, or is shortened, before it lapsed: its
//     thread may be claimable now;
//   - when this process puts work back at its old place in the order (a
//     nack, a release, a supersede, a lapsed lease reclaimed, a call
//     refused for an outdated epoch): the thread may now sort before the
//     prefix's end (putBack);
//   - a second after the listing from the start that found it (the
//     dispatcher wakes for it): a hold in it may have lapsed (tried again
//     within that second; holds last a second or more), or another
//     process sharing the store may have put work back at its old place
//     (it waits at most that long).
//
// Work that ends (acked or dead-lettered) goes to the end of the order
// (round-robin) and new work is due now, both after the prefix.
const (
	heldPrefixMin      = 32   // a shorter prefix is listed as before
	heldPrefixMaxAgeMs = 1000 // the listing from the start is repeated after
)

// heldPrefix is the head of the ready order, as last listed, made of
// threads held here.
type heldPrefix struct {
	last     ReadyEntry // its last entry: rounds list after it
	n        int        // its threads (less those admitted since)
	listedAt int64      // the listing from the start that found it
	gen      uint64     // m.prefixGen then: a change drops the prefix
	id       uint64     // tells its threads' holds (claimHold.prefix)
	// busy are its threads held for a full agent, by the agent id they
	// wait for, oldest first.
	busy map[string]*busyQueue
}

// busyQueue is a prefix's threads waiting for one agent id's free slot,
// in ready order; those before head were admitted or are no longer
// held so (skipped as they are met).
type busyQueue struct {
	threads []ReadyEntry
	head    int
}

// prefixAgedLocked is when the kept prefix is to be listed again from
// the start (0: no prefix kept). The round that makes a prefix wakes the
// dispatcher for it: only later rounds did (they take it from
// heldPrefixLocked), and one that made it and started nothing slept until
// the first hold lapsed, a minute on, while work another process put
// before the prefix waited (found by a stress run of the suite). Called
// with m.mu held.
func (m *Mailbox) prefixAgedLocked() int64 {
	if m.prefix.n == 0 {
		return 0
	}
	return m.prefix.listedAt + heldPrefixMaxAgeMs
}

// heldPrefixLocked returns the prefix to list after at now, or one of no
// threads (list from the start) when there is none or it may be out of
// date. Either carries m.prefixGen as the round's listing begins: what
// drops a prefix while the listing runs keeps the listing's from being
// noted (notePrefixLocked). Called with m.mu held.
func (m *Mailbox) heldPrefixLocked(now int64) heldPrefix {
	p := m.prefix
	if p.n == 0 || now < p.listedAt || now-p.listedAt >= heldPrefixMaxAgeMs || p.gen != m.prefixGen {
		m.prefix = heldPrefix{}
		return heldPrefix{gen: m.prefixGen}
	}
	return p
}

// notePrefixLocked records the threads held at now at the head of a
// listing: a listing from the start (p of no threads, listed at
// listedAt) makes a new prefix; one after p extends it. Neither is kept
// if the prefix was dropped since the listing began (work put back may
// sort before its end, and the listing may not show it: found by
// review), nor one shorter than heldPrefixMin. Called with m.mu held,
// threads in ready order, p from heldPrefixLocked. It returns how many
// of threads, from the first, the prefix kept counts: the round leaves
// them to it (admitPrefixLocked).
func (m *Mailbox) notePrefixLocked(threads []ReadyEntry, p heldPrefix, listedAt, now int64) int {
	if p.gen != m.prefixGen {
		m.prefix = heldPrefix{} // dropped while the listing ran
		return 0
	}
	counted := p.n
	if p.n == 0 {
		m.prefixIDs++
		p = heldPrefix{listedAt: listedAt, gen: p.gen, id: m.prefixIDs}
	}
	for _, t := range threads {
		h, ok := m.held[t.ThreadID]
		if !ok || h.until <= now || m.threads[t.ThreadID] != nil {
			break
		}
		// A prefix not kept leaves its id on the holds: ids are not
		// reused, so none of them counts as a prefix's (inPrefixLocked).
		h.prefix = p.id
		m.held[t.ThreadID] = h
		if h.busy {
			if p.busy == nil {
				p.busy = map[string]*busyQueue{}
			}
			q := p.busy[h.busyFor]
			if q == nil {
				q = &busyQueue{}
				p.busy[h.busyFor] = q
			}
			q.threads = append(q.threads, t)
		}
		p.last, p.n = t, p.n+1
	}
	if p.n < heldPrefixMin {
		m.prefix = heldPrefix{}
		return 0
	}
	m.prefix = p
	return p.n - counted
}

// inPrefixLocked reports whether hold h is one of the held prefix's
// threads. Called with m.mu held.
func (m *Mailbox) inPrefixLocked(h claimHold) bool {
	return m.prefix.n > 0 && h.prefix == m.prefix.id
}

// prefixHeadLocked returns the first of q's threads still held at now
// for a full agent as one of the prefix's, skipping (for good) those
// that are not. Called with m.mu held.
func (m *Mailbox) prefixHeadLocked(q *busyQueue, now int64) (ReadyEntry, bool) {
	for ; q.head < len(q.threads); q.head++ {
		t := q.threads[q.head]
		if h, ok := m.held[t.ThreadID]; ok && h.busy && h.until > now && m.inPrefixLocked(h) {
			return t, true
		}
	}
	return ReadyEntry{}, false
}

// admitPrefixLocked admits, oldest first, the held prefix's threads
// waiting for a full agent that the budget has a free slot of, at most
// room of them, and appends them to out. Called with m.mu held.
func (m *Mailbox) admitPrefixLocked(now int64, b *slotBudget, room int, out []ReadyEntry) []ReadyEntry {
	for added := 0; added < room; added++ {
		var first *busyQueue
		var firstID string
		for id, q := range m.prefix.busy {
			if t, ok := m.prefixHeadLocked(q, now); ok && b.has(id) && (first == nil || t.Before(first.threads[first.head])) {
				first, firstID = q, id
			}
		}
		if first == nil {
			break
		}
		t := first.threads[first.head]
		first.head++
		b.take(firstID)
		m.admitHeldLocked(t.ThreadID, now)
		out = append(out, t)
	}
	return out
}

// prefixBusyLocked adds to ids (made if nil) the agent ids the held
// prefix has threads waiting for at now, and returns it. Called with
// m.mu held.
func (m *Mailbox) prefixBusyLocked(now int64, ids map[string]struct{}) map[string]struct{} {
	for id, q := range m.prefix.busy {
		if _, ok := m.prefixHeadLocked(q, now); ok {
			if ids == nil {
				ids = map[string]struct{}{}
			}
			ids[id] = struct{}{}
		}
	}
	return ids
}

// putBack learns that work of thread ("": unknown) may be back at its
// old place in the ready order (a nack, a release, a supersede, a lapsed
// lease reclaimed, a call refused for an outdated epoch): the next round
// lists from the start, unless thread is
// held here (not for a full agent), which no round claims wherever it
// sorts (an attempt no agent took is held before its release).
func (m *Mailbox) putBack(thread string) {
	now := m.cfg.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if h, ok := m.held[thread]; thread != "" && ok && !h.busy && h.until > now {
		return
	}
	m.prefix = heldPrefix{}
	m.prefixGen++ // a round listing now does not keep the prefix either
}
