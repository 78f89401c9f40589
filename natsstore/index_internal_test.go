package natsstore

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// BenchmarkIndexReady: one listing of the ready order (the dispatcher's
// every round) over threads threads of ten dispatches each, nine acked
// and one queued, as a busy store holds them until GC.
func BenchmarkIndexReady(b *testing.B) {
	for _, threads := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("threads=%d", threads), func(b *testing.B) {
			ix := newIndex(subjects{}, func(string, ...any) {})
			ix.mu.Lock()
			for t := range threads {
				thread := fmt.Sprintf("t%05d", t)
				for i := range 10 {
					st := engine.StatusAcked
					if i == 9 {
						st = engine.StatusQueued
					}
					at := int64(1000 + t*10 + i)
					ix.addDispatchLocked(&dEntry{id: fmt.Sprintf("%s-d%d", thread, i), thread: thread, status: st, created: at, updated: at, avail: at})
				}
			}
			ix.mu.Unlock()
			b.ReportAllocs()
			for b.Loop() {
				got, _ := ix.ready(1<<40, engine.ReadyEntry{}, 65)
				if len(got) != 65 {
					b.Fatalf("listed %d", len(got))
				}
			}
		})
	}
}

// A thread's place in the ready order (first, ended) is kept as its
// dispatches come and go; it must always be what a walk of them gives.
func TestThreadPlaceIsKeptAsDispatchesComeAndGo(t *testing.T) {
	ix := newIndex(subjects{}, func(string, ...any) {})
	rng := rand.New(rand.NewPCG(1, 2))
	statuses := engine.AllStatuses
	live := map[string]*dEntry{}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	for step := range 20000 {
		thread := fmt.Sprintf("t%d", rng.IntN(5))
		id := fmt.Sprintf("d%d", rng.IntN(40))
		if old := live[id]; old != nil {
			ix.removeDispatchLocked(old)
			delete(live, id)
			thread = old.thread
		}
		if rng.IntN(4) > 0 {
			// Few distinct times, so that ties (the case a removal must
			// walk for) are common.
			e := &dEntry{id: id, thread: thread, status: statuses[rng.IntN(len(statuses))], avail: int64(rng.IntN(8)), updated: int64(rng.IntN(8))}
			ix.addDispatchLocked(e)
			live[id] = e
		}
		for name, te := range ix.threads {
			var queued, claimed int
			first, ended := int64(0), int64(0)
			for _, e := range te.ds {
				switch {
				case e.status == engine.StatusQueued:
					if queued == 0 || e.avail < first {
						first = e.avail
					}
					queued++
				case e.status == engine.StatusClaimed:
					claimed++
				case endsRun(e.status):
					ended = max(ended, e.updated)
				}
			}
			if te.queued != queued || te.claimed != claimed || (queued > 0 && te.first != first) || te.ended != ended {
				t.Fatalf("step %d, thread %s: kept queued %d claimed %d first %d ended %d; walked %d %d %d %d",
					step, name, te.queued, te.claimed, te.first, te.ended, queued, claimed, first, ended)
			}
		}
	}
}

// readySelect keeps exactly the first limit entries in ready order.
func TestReadySelectKeepsTheFirstInOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for round := range 2000 {
		n, limit := rng.IntN(60), 1+rng.IntN(20)
		all := make([]engine.ReadyEntry, n)
		sel := readySelect{limit: limit}
		for i := range all {
			all[i] = engine.ReadyEntry{ThreadID: fmt.Sprintf("t%d", i), Due: int64(rng.IntN(10))}
			sel.offer(all[i])
		}
		slices.SortFunc(all, func(a, b engine.ReadyEntry) int {
			return cmp.Or(cmp.Compare(a.Due, b.Due), strings.Compare(a.ThreadID, b.ThreadID))
		})
		want := all[:min(n, limit)]
		if got := sel.sorted(); !slices.Equal(got, want) {
			t.Fatalf("round %d (n %d, limit %d): kept %v, want %v", round, n, limit, got, want)
		}
	}
}

// The terminal list answers every page as a walk and sort of all the
// index's dispatches would, as dispatches come, go and change status in
// and out of order.
func TestTerminalListPagesAsASortOfEveryDispatch(t *testing.T) {
	ix := newIndex(subjects{}, func(string, ...any) {})
	rng := rand.New(rand.NewPCG(5, 6))
	statuses := engine.AllStatuses
	live := map[string]*dEntry{}
	for step := range 5000 {
		ix.mu.Lock()
		for range 1 + rng.IntN(4) {
			id := fmt.Sprintf("d%d", rng.IntN(200))
			if old := live[id]; old != nil {
				ix.removeDispatchLocked(old)
				delete(live, id)
			}
			if rng.IntN(5) > 0 {
				// Mostly later times, sometimes earlier ones (another
				// process's clock), often equal ones.
				at := int64(step/4 + rng.IntN(3))
				if rng.IntN(10) == 0 {
					at -= int64(rng.IntN(50))
				}
				e := &dEntry{id: id, thread: "t" + id, status: statuses[rng.IntN(len(statuses))], created: int64(rng.IntN(3)), updated: at}
				ix.addDispatchLocked(e)
				live[id] = e
			}
		}
		var want []*dEntry
		for _, e := range ix.disp {
			if e.status.Terminal() {
				want = append(want, e)
			}
		}
		ix.mu.Unlock()
		slices.SortFunc(want, terminalOrder)
		var c engine.TerminalCursor
		if len(want) > 0 && rng.IntN(4) > 0 {
			e := want[rng.IntN(len(want))]
			c = engine.TerminalCursor{UpdatedAt: e.updated, CreatedAt: e.created, DispatchID: e.id}
			if rng.IntN(2) == 0 { // a cursor between entries
				c.DispatchID += "~"
			}
		}
		limit := rng.IntN(30) - 5
		var exp []engine.TerminalCursor
		for _, e := range want {
			if c != (engine.TerminalCursor{}) && cmp.Or(cmp.Compare(e.updated, c.UpdatedAt), cmp.Compare(e.created, c.CreatedAt), strings.Compare(e.id, c.DispatchID)) <= 0 {
				continue
			}
			if limit > 0 && len(exp) == limit {
				break
			}
			exp = append(exp, engine.TerminalCursor{UpdatedAt: e.updated, CreatedAt: e.created, DispatchID: e.id})
		}
		got := ix.terminalCursorsAfter(c, limit)
		if !slices.Equal(got, exp) && !(len(got) == 0 && len(exp) == 0) {
			t.Fatalf("step %d, after %+v limit %d: listed %v, want %v", step, c, limit, got, exp)
		}
		if ix.terminal.gone > len(ix.terminal.es)/2 {
			t.Fatalf("step %d: %d of %d entries gone, not compacted", step, ix.terminal.gone, len(ix.terminal.es))
		}
	}
}

// BenchmarkTerminalPages: the start's reconciliation's listing, every
// page of 100 from the first, over terminal finished dispatches.
func BenchmarkTerminalPages(b *testing.B) {
	for _, terminal := range []int{10000, 100000} {
		b.Run(fmt.Sprintf("terminal=%d", terminal), func(b *testing.B) {
			ix := newIndex(subjects{}, func(string, ...any) {})
			ix.mu.Lock()
			for i := range terminal {
				at := int64(1000 + i)
				ix.addDispatchLocked(&dEntry{id: fmt.Sprintf("d%06d", i), thread: fmt.Sprintf("t%05d", i/10), status: engine.StatusAcked, created: at, updated: at})
			}
			ix.mu.Unlock()
			b.ReportAllocs()
			for b.Loop() {
				n := 0
				for c := (engine.TerminalCursor{}); ; {
					page := ix.terminalCursorsAfter(c, 100)
					n += len(page)
					if len(page) < 100 {
						break
					}
					c = page[len(page)-1]
				}
				if n != terminal {
					b.Fatalf("listed %d", n)
				}
			}
		})
	}
}
