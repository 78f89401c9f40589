package engine

import (
	"cmp"
	"slices"
	"strings"
)

// Foreground first. A foreground submit that finds no free agent slot
// waits at the head of its own thread; the dispatcher then serves the
// threads the ready index lists, oldest due first, so behind a backlog
// of background work over many threads "run this now" ran after all of
// it (found by an overload review: 100 s behind 400 runs on a one-slot
// agent, and 177 s during a flood). The dispatcher now tries the threads
// of waiting foreground submits first, oldest submit first, before the
// threads the index lists. A thread leaves the set when an attempt of it
// starts here, when its foreground dispatch no longer waits here
// (cancelled, superseded, its stream ended), or when the dispatcher's
// claim of it finds nothing (taken elsewhere).
// The set is this process's: a foreground submit through another
// sidecar of a shared store is not known here.

// fgWait is a foreground submit waiting for a slot: since when, and its
// dispatch, whose waiting event log (Mailbox.pending) says it still waits.
type fgWait struct {
	since      int64
	dispatchID string
}

// foregroundFirstLocked returns threads with the threads of waiting
// foreground submits in front, oldest first, each once. A submit whose
// dispatch no longer waits here (cancelled, superseded, its stream ended)
// is forgotten: its thread's later work has no priority (found by
// review). Caller holds m.mu.
func (m *Mailbox) foregroundFirstLocked(threads []ReadyEntry) []ReadyEntry {
	if len(m.fgWaiting) == 0 {
		return threads
	}
	fg := make([]ReadyEntry, 0, len(m.fgWaiting)+len(threads))
	for t, w := range m.fgWaiting {
		if _, waiting := m.pending[w.dispatchID]; !waiting {
			delete(m.fgWaiting, t)
			continue
		}
		if m.threads[t] == nil {
			fg = append(fg, ReadyEntry{ThreadID: t, Due: w.since})
		}
	}
	if len(fg) == 0 {
		return threads
	}
	slices.SortFunc(fg, func(a, b ReadyEntry) int {
		return cmp.Or(cmp.Compare(a.Due, b.Due), strings.Compare(a.ThreadID, b.ThreadID))
	})
	for _, e := range threads {
		if _, waiting := m.fgWaiting[e.ThreadID]; !waiting {
			fg = append(fg, e)
		}
	}
	return fg
}

// foregroundTried ends a waiting foreground submit's priority when the
// dispatcher's claim of its thread found nothing to claim.
func (m *Mailbox) foregroundTried(thread string) {
	m.mu.Lock()
	delete(m.fgWaiting, thread)
	m.mu.Unlock()
}
