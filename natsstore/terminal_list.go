package natsstore

import (
	"cmp"
	"slices"
	"sort"
	"strings"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// terminalList keeps the index's terminal dispatches in terminal order
// (updated, created, id), so that a page of ListTerminal is a binary
// search and a copy, not a walk and sort of every dispatch (found by
// measuring a restart: the start's reconciliation pages through every
// terminal dispatch, and each page sorted them all; 10 000 finished
// dispatches took 1.5 s, most of it sorting).
//
// Entries come in almost in order (a dispatch finishes at the time of
// its last update): one is appended, or, when it sorts before the last
// (another process's commit arriving a little late, or its clock a little
// behind), inserted at its place, near the end. An entry the index drops
// is only marked gone; the next listing, or the gone outnumbering the
// kept, compacts the list. The index's mutex guards it; a listing needs
// it exclusively.
type terminalList struct {
	es   []*dEntry
	gone int
}

func terminalOrder(a, b *dEntry) int {
	return cmp.Or(cmp.Compare(a.updated, b.updated), cmp.Compare(a.created, b.created), strings.Compare(a.id, b.id))
}

// add takes in a terminal entry at its place in terminal order.
func (l *terminalList) add(e *dEntry) {
	n := len(l.es)
	if n == 0 || terminalOrder(l.es[n-1], e) <= 0 {
		l.es = append(l.es, e)
		return
	}
	i := sort.Search(n, func(i int) bool { return terminalOrder(l.es[i], e) > 0 })
	l.es = slices.Insert(l.es, i, e)
}

// remove marks an entry of the list gone.
func (l *terminalList) remove(e *dEntry) {
	e.gone = true
	l.gone++
	if l.gone > len(l.es)/2 {
		l.compact()
	}
}

// compact drops the entries marked gone.
func (l *terminalList) compact() {
	if l.gone == 0 {
		return
	}
	kept := l.es[:0]
	for _, e := range l.es {
		if !e.gone {
			kept = append(kept, e)
		}
	}
	clear(l.es[len(kept):])
	l.es, l.gone = kept, 0
}

// after lists, as cursors, up to limit entries strictly after c in
// terminal order (all of them with limit ≤ 0; from the first with the
// zero cursor).
func (l *terminalList) after(c engine.TerminalCursor, limit int) []engine.TerminalCursor {
	l.compact()
	i := 0
	if c != (engine.TerminalCursor{}) {
		i = sort.Search(len(l.es), func(i int) bool {
			e := l.es[i]
			return cmp.Or(cmp.Compare(e.updated, c.UpdatedAt), cmp.Compare(e.created, c.CreatedAt), strings.Compare(e.id, c.DispatchID)) > 0
		})
	}
	es := l.es[i:]
	if limit > 0 && len(es) > limit {
		es = es[:limit]
	}
	out := make([]engine.TerminalCursor, len(es))
	for i, e := range es {
		out[i] = engine.TerminalCursor{UpdatedAt: e.updated, CreatedAt: e.created, DispatchID: e.id}
	}
	return out
}
