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
// threads at its head end (heldPrefix), and lists from there. A prefix
// counts only holds the dispatcher cannot end within a round: a hold for
// a full agent (busy) ends it, since a free slot admits that thread. The
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
	n        int        // its threads
	listedAt int64      // the listing from the start that found it
	gen      uint64     // m.prefixGen then: a change drops the prefix
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
// threads in ready order, p from heldPrefixLocked.
func (m *Mailbox) notePrefixLocked(threads []ReadyEntry, p heldPrefix, listedAt, now int64) {
	if p.gen != m.prefixGen {
		m.prefix = heldPrefix{} // dropped while the listing ran
		return
	}
	if p.n == 0 {
		p = heldPrefix{listedAt: listedAt, gen: p.gen}
	}
	for _, t := range threads {
		h, ok := m.held[t.ThreadID]
		if !ok || h.busy || h.until <= now || m.threads[t.ThreadID] != nil {
			break
		}
		p.last, p.n = t, p.n+1
	}
	if p.n < heldPrefixMin {
		p = heldPrefix{}
	}
	m.prefix = p
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
