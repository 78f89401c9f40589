package storetest

import (
	"cmp"
	"fmt"
	"slices"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Reads: store.md rules 80–84, ListDeadLetters and ReadyThreads.
func dispatchReadCases() []Case {
	return []Case{
		{"S80_load_dispatch_reads_current_state", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.absent("d1")
			q := h.add("d1", "t1", 1000)
			h.same(q)
			c := h.claimID("d1", "c1", 1000)
			h.same(c)
			h.absent("d")
			h.absent("d10")
		}},
		{"S81_A01_B01_enqueue_and_list", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			q := h.add("d1", "t1", 1000)
			got := h.list("t1", nil, 10, 0)
			if len(got) != 1 {
				t.Fatalf("list(t1) has %d entries, want 1", len(got))
			}
			dqEqual(t, "listed d1", got[0], q)
		}},
		{"S81_A06_C04_list_orders_by_priority_created_at_dispatch_id", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			add := func(id string, prio uint8, created int64) {
				d := dqQueued(id, "t1", prio, created)
				h.enqueue(d)
			}
			add("x200", 200, 10)
			add("x10b", 10, 30)
			add("x10a", 10, 20)
			add("y10a", 10, 20)
			add("z0", 0, 99)
			h.add("other", "t2", 1)
			dqWantIDs(t, "list(t1)", h.list("t1", nil, 10, 0), "z0", "x10a", "y10a", "x10b", "x200")
			// The order holds across statuses.
			c := h.claim("t1", "c1", 1000)
			h.ack(c.DispatchID, c.ClaimToken, 1001)
			h.cancel("x10b", 1002)
			dqWantIDs(t, "list(t1) after changes", h.list("t1", nil, 10, 0), "z0", "x10a", "y10a", "x10b", "x200")
		}},
		{"S81_C03_list_filters_then_offset_then_limit", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			for i, id := range []string{"a1", "a2", "a3", "a4"} {
				h.add(id, "thread-a", 1000+int64(i))
			}
			h.add("b1", "thread-b", 1000)
			dqWantIDs(t, "all", h.list("thread-a", nil, 10, 0), "a1", "a2", "a3", "a4")
			dqWantIDs(t, "empty filter", h.list("thread-a", engine.StatusFilter{}, 10, 0))
			dqWantIDs(t, "queued", h.list("thread-a", engine.StatusFilter{engine.StatusQueued}, 10, 0), "a1", "a2", "a3", "a4")
			dqWantIDs(t, "claimed", h.list("thread-a", engine.StatusFilter{engine.StatusClaimed}, 10, 0))
			dqWantIDs(t, "limit 2", h.list("thread-a", nil, 2, 0), "a1", "a2")
			dqWantIDs(t, "offset 2", h.list("thread-a", nil, 10, 2), "a3", "a4")
			dqWantIDs(t, "offset 1 limit 2", h.list("thread-a", nil, 2, 1), "a2", "a3")
			dqWantIDs(t, "offset past end", h.list("thread-a", nil, 10, 9))
			c := h.claim("thread-a", "c1", 2000)
			h.ack(c.DispatchID, c.ClaimToken, 2001)
			h.cancel("a3", 2002)
			dqWantIDs(t, "queued after changes", h.list("thread-a", engine.StatusFilter{engine.StatusQueued}, 10, 0), "a2", "a4")
			dqWantIDs(t, "acked+cancelled", h.list("thread-a", engine.StatusFilter{engine.StatusAcked, engine.StatusCancelled}, 10, 0), "a1", "a3")
			// Filter first, then offset, then limit.
			dqWantIDs(t, "queued offset 1 limit 1", h.list("thread-a", engine.StatusFilter{engine.StatusQueued}, 1, 1), "a4")
			dqWantIDs(t, "thread-b", h.list("thread-b", nil, 10, 0), "b1")
			dqWantIDs(t, "unknown thread", h.list("thread", nil, 10, 0))
		}},
		{"S81_list_open_dispatches_in_listing_order", func(t *testing.T, s engine.Store) {
			// The claimed dispatch sorts between queued ones (work of a
			// higher priority came after the claim); every filter, offset
			// and limit over queued and claimed must agree with the
			// unfiltered listing filtered afterwards.
			h := newDQ(t, s)
			h.enqueue(dqQueued("m", "t1", 100, 50))
			c := h.claim("t1", "c1", 1000)
			if c.DispatchID != "m" {
				t.Fatalf("claimed %s, want m", c.DispatchID)
			}
			h.enqueue(dqQueued("hi", "t1", 10, 60))
			h.enqueue(dqQueued("lo", "t1", 200, 40))
			h.enqueue(dqQueued("mid", "t1", 100, 70))
			h.add("done", "t1", 30)
			h.cancel("done", 1001)
			dqWantIDs(t, "all", h.list("t1", nil, 10, 0), "hi", "m", "mid", "done", "lo")
			all := h.list("t1", nil, 0, 0)
			for _, f := range []engine.StatusFilter{{engine.StatusQueued}, {engine.StatusClaimed}, {engine.StatusQueued, engine.StatusClaimed}, {engine.StatusClaimed, engine.StatusCancelled}} {
				var want []string
				for _, d := range all {
					if f.Match(d.Status) {
						want = append(want, d.DispatchID)
					}
				}
				for offset := 0; offset <= len(want); offset++ {
					for limit := 0; limit <= len(want)+1; limit++ {
						w := want[offset:]
						if limit > 0 && limit < len(w) {
							w = w[:limit]
						}
						dqWantIDs(t, fmt.Sprintf("%v offset %d limit %d", f, offset, limit), h.list("t1", f, limit, offset), w...)
					}
				}
			}
		}},
		{"S82_A27_count_by_status_tracks_lifecycle", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.wantCounts(nil)
			h.add("d1", "t1", 1000)
			h.add("d2", "t2", 1000)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusQueued: 2})
			c := h.claim("t1", "c1", 1000)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusQueued: 1, engine.StatusClaimed: 1})
			h.ack("d1", c.ClaimToken, 2000)
			h.cancel("d2", 2000)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusAcked: 1, engine.StatusCancelled: 1})
			h.add("d3", "t3", 1000)
			h.add("d4", "t3", 1000)
			c = h.claim("t3", "c1", 2000)
			h.nack("d3", c.ClaimToken, 2000, "e", 2001)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusAcked: 1, engine.StatusCancelled: 1, engine.StatusQueued: 2})
			c = h.claim("t3", "c1", 2002)
			h.deadLetter(c.DispatchID, c.ClaimToken, "fatal", 2003)
			h.interrupt("t3", 2004)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusAcked: 1, engine.StatusCancelled: 1, engine.StatusDeadLetter: 1, engine.StatusSuperseded: 1})
			h.add("d5", "t5", 2000)
			if n := h.purge(2500); n != 4 {
				t.Fatalf("purge = %d, want 4", n)
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusQueued: 1})
		}},
		{"S83_A28_list_terminal_returns_all_terminal", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("cancelled", "t1", 1000)
			h.cancel("cancelled", 2000)
			h.add("superseded", "t2", 1000)
			h.interrupt("t2", 2000)
			h.add("queued", "t3", 1000)
			h.addClaimed("claimed", "t4", 1000)
			all := h.terminal(engine.TerminalCursor{}, 10)
			dqWantIDSet(t, "ListTerminal", all, "cancelled", "superseded")
			for _, d := range all {
				dqEqual(t, "listed "+d.DispatchID, d, h.load(d.DispatchID))
			}
			one := h.terminal(engine.TerminalCursor{}, 1)
			if len(one) != 1 {
				t.Fatalf("ListTerminal(limit 1) = %d entries", len(one))
			}
			next := h.terminal(engine.CursorAfter(&one[0]), 1)
			if len(next) != 1 || next[0].DispatchID == one[0].DispatchID {
				t.Fatalf("second page = %q after %s", dqIDs(next), one[0].DispatchID)
			}
			dqWantIDs(t, "third page", h.terminal(engine.CursorAfter(&next[0]), 1))
		}},
		{"S83_list_terminal_cursor_paging_visits_each_once_in_order", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// Terminal dispatches with ties on updated_at and created_at.
			type spec struct {
				id      string
				created int64
				at      int64
				how     string
			}
			specs := []spec{
				{"k", 100, 5000, "cancel"}, {"b", 100, 5000, "cancel"}, {"a", 200, 5000, "cancel"},
				{"c", 50, 3000, "ack"}, {"d", 50, 3000, "dead"}, {"e", 300, 7000, "cancel"},
				{"f", 10, 4000, "cancel"}, {"g", 10, 4000, "ack"}, {"h", 400, 1000, "cancel"},
				{"i", 10, 6000, "supersede"}, {"j", 20, 6000, "supersede"},
			}
			for n, sp := range specs {
				thread := fmt.Sprintf("t%d", n)
				d := dqQueued(sp.id, thread, 128, sp.created)
				h.enqueue(d)
				switch sp.how {
				case "cancel":
					h.cancel(sp.id, sp.at)
				case "ack":
					c := h.claimID(sp.id, "c1", sp.created)
					h.ack(sp.id, c.ClaimToken, sp.at)
				case "dead":
					c := h.claimID(sp.id, "c1", sp.created)
					h.deadLetter(sp.id, c.ClaimToken, "fatal", sp.at)
				case "supersede":
					h.interrupt(thread, sp.at)
				}
			}
			h.add("live", "tq", 1)
			h.addClaimed("busy", "tc", 1)
			want := make([]engine.Dispatch, 0, len(specs))
			for _, sp := range specs {
				want = append(want, h.load(sp.id))
			}
			slices.SortFunc(want, func(a, b engine.Dispatch) int {
				return cmp.Or(cmp.Compare(a.UpdatedAt, b.UpdatedAt), cmp.Compare(a.CreatedAt, b.CreatedAt), cmp.Compare(a.DispatchID, b.DispatchID))
			})
			wantIDs := dqIDs(want)
			dqWantIDs(t, "one page", h.terminal(engine.TerminalCursor{}, 100), wantIDs...)
			for _, limit := range []int{1, 2, 3, 4, 10} {
				var got []string
				var cur engine.TerminalCursor
				for pages := 0; ; pages++ {
					if pages > len(specs)+1 {
						t.Fatalf("limit %d: paging does not end (so far %q)", limit, got)
					}
					page := h.terminal(cur, limit)
					if len(page) > limit {
						t.Fatalf("limit %d: page of %d", limit, len(page))
					}
					if len(page) == 0 {
						break
					}
					got = append(got, dqIDs(page)...)
					cur = engine.CursorAfter(&page[len(page)-1])
				}
				dqWantStrings(t, fmt.Sprintf("paged with limit %d", limit), got, wantIDs...)
			}
			// A cursor taken from the middle resumes strictly after it.
			mid := want[4]
			dqWantIDs(t, "after "+mid.DispatchID, h.terminal(engine.CursorAfter(&mid), 100), wantIDs[5:]...)
		}},
		{"S84_A26_B22_C20_queued_thread_ids", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			dqWantStrings(t, "empty store", h.queuedThreads())
			h.add("b1", "thread-b", 1000)
			h.add("a1", "thread-a", 1000)
			h.add("a2", "thread-a", 90_000) // delayed still counts
			h.add("c1", "thread-c", 1000)
			dqWantStrings(t, "three threads", h.queuedThreads(), "thread-a", "thread-b", "thread-c")
			h.cancel("a1", 2000)
			dqWantStrings(t, "a still has a delayed dispatch", h.queuedThreads(), "thread-a", "thread-b", "thread-c")
			h.cancel("a2", 2000)
			dqWantStrings(t, "a cancelled", h.queuedThreads(), "thread-b", "thread-c")
			// A claimed dispatch is not queued.
			h.claim("thread-c", "c1", 2000)
			dqWantStrings(t, "c claimed", h.queuedThreads(), "thread-b")
		}},
		{"ListDeadLetters_newest_first_with_offset_and_limit_without_requeued", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			dqWantIDs(t, "empty", h.deadLetters(10, 0))
			// Dead-lettered at 2000, 3000, 4000, 5000, alternately by
			// DeadLetter and by a nack at max attempts.
			for i, id := range []string{"d1", "d2", "d3", "d4"} {
				at := int64(2000 + 1000*i)
				d := dqQueued(id, "t-"+id, 128, at-500)
				d.MaxAttempts = 1
				h.enqueue(d)
				c := h.claimID(id, "c1", at-500)
				if i%2 == 0 {
					h.deadLetter(id, c.ClaimToken, "fatal", at)
				} else if got := h.nack(id, c.ClaimToken, at, "transient", at); got.Status != engine.StatusDeadLetter {
					t.Fatalf("%s: nack at max attempts left %s", id, got.Status)
				}
			}
			h.add("q", "tq", 1000)
			a := h.addClaimed("acked", "ta", 1000)
			h.ack("acked", a.ClaimToken, 9000)
			dqWantIDs(t, "all", h.deadLetters(10, 0), "d4", "d3", "d2", "d1")
			dqWantIDs(t, "limit 2", h.deadLetters(2, 0), "d4", "d3")
			dqWantIDs(t, "offset 1 limit 2", h.deadLetters(2, 1), "d3", "d2")
			dqWantIDs(t, "offset 3", h.deadLetters(10, 3), "d1")
			dqWantIDs(t, "offset past end", h.deadLetters(10, 4))
			for _, d := range h.deadLetters(10, 0) {
				dqEqual(t, "listed "+d.DispatchID, d, h.load(d.DispatchID))
			}
			h.requeue("d3", "d3-again", 10_000)
			dqWantIDs(t, "after requeue of d3", h.deadLetters(10, 0), "d4", "d2", "d1")
		}},
		{"ReadyThreads_lists_available_unclaimed_threads_longest_waiting_first", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			ids, next := h.ready(1000, 10)
			if len(ids) != 0 || next != 0 {
				t.Fatalf("empty store: ReadyThreads = %q, %d; want none, 0", ids, next)
			}
			h.add("a1", "ta", 100)
			h.add("a2", "ta", 900)
			h.add("b1", "tb", 300)
			h.add("c1", "tc", 200)
			h.add("e1", "te", 1000) // available exactly now
			h.add("d1", "td", 5000) // not yet
			h.add("d2", "td", 8000)
			h.add("busy1", "tbusy", 50)
			h.add("busy2", "tbusy", 60)
			h.claimID("busy1", "c1", 1000)
			h.add("gone", "tgone", 10)
			h.cancel("gone", 500)
			ids, next = h.ready(1000, 10)
			dqWantStrings(t, "ReadyThreads", ids, "ta", "tc", "tb", "te")
			if next != 5000 {
				t.Fatalf("nextDueAt = %d, want 5000", next)
			}
			ids, _ = h.ready(1000, 2)
			dqWantStrings(t, "ReadyThreads(limit 2)", ids, "ta", "tc")
			// Claiming ta removes it; at 5000 td is ready, and its later
			// dispatch (8000) does not count while td is listed by 5000.
			h.claim("ta", "c1", 1000)
			ids, next = h.ready(5000, 10)
			dqWantStrings(t, "ReadyThreads at 5000", ids, "tc", "tb", "te", "td")
			if next != 0 {
				t.Fatalf("nextDueAt at 5000 = %d, want 0 (every claimable thread is due)", next)
			}
			// Claiming td's first dispatch hides td; settling it shows td
			// again, due at 8000.
			c := h.claim("td", "c1", 5000)
			if ids, next = h.ready(5000, 10); next != 0 || len(ids) != 3 {
				t.Fatalf("with td claimed: %q, next %d", ids, next)
			}
			h.ack(c.DispatchID, c.ClaimToken, 5100)
			ids, next = h.ready(5000, 10)
			dqWantStrings(t, "ReadyThreads after td settled", ids, "tc", "tb", "te")
			if next != 8000 {
				t.Fatalf("nextDueAt after td settled = %d, want 8000", next)
			}
			ids, _ = h.ready(8000, 10)
			dqWantStrings(t, "ReadyThreads at 8000", ids, "tc", "tb", "te", "td")
		}},
		{"ReadyThreads_puts_a_thread_whose_run_ended_behind_the_threads_waiting", func(t *testing.T, s engine.Store) {
			// Round-robin: a thread whose run ended is ordered by when it
			// ended, if that is later than its oldest queued work, or a
			// thread with a backlog went before every thread with newer
			// work, run after run (found by review). A dispatch cut short
			// (reclaimed, released) keeps its place: S86.
			h := ranThreadA(t, s)
			ids, _ := h.ready(1000, 10)
			dqWantStrings(t, "ReadyThreads after ta's run ended", ids, "tb", "ta")
			c := h.claim("tb", "c1", 1000)
			h.ack(c.DispatchID, c.ClaimToken, 1100)
			ids, _ = h.ready(1200, 10)
			dqWantStrings(t, "ReadyThreads after tb's run ended", ids, "ta")
		}},
		{"ReadyThreads_lists_a_thread_whose_run_ended_from_that_end_on", func(t *testing.T, s engine.Store) {
			// Listed at a time before its run's end (the engine lists at
			// now minus a shared store's claim grace), a thread whose run
			// ended is not due yet, and that end is the next due time
			// (found by review: NATS listed it, Badger did not).
			h := newDQ(t, s)
			h.add("d1", "t1", 100)
			h.add("d2", "t1", 100)
			c := h.claimID("d1", "c1", 100)
			h.ack("d1", c.ClaimToken, 500)
			ids, next := h.ready(300, 10)
			if len(ids) != 0 || next != 500 {
				t.Fatalf("ReadyThreads(300) = %q, next %d; want none, next 500", ids, next)
			}
			ids, _ = h.ready(500, 10)
			dqWantStrings(t, "ReadyThreads(500)", ids, "t1")
		}},
		{"ReadyThreads_keeps_a_run_end_through_later_changes_of_the_thread", func(t *testing.T, s engine.Store) {
			// Every store orders alike (found by review: Badger lost the
			// run's end when the thread's earliest entry was found again).
			h := ranThreadA(t, s)
			h.cancel("a2", 750) // the thread's earliest queued entry goes
			ids, _ := h.ready(1000, 10)
			dqWantStrings(t, "after a queued dispatch of ta was cancelled", ids, "tb", "ta")
			c := h.claim("ta", "c1", 800)
			h.release(c.DispatchID, c.ClaimToken, 850) // cut short: not a run's end
			ids, _ = h.ready(1000, 10)
			dqWantStrings(t, "after ta's claim was released", ids, "tb", "ta")
			// A claim withdrawn (superseded) is not a run's end either.
			h.add("c1", "tc", 50)
			h.add("c2", "tc", 60)
			c = h.claim("tc", "c1", 900)
			if _, err := s.SupersedeClaimed(h.ctx, c.DispatchID, c.ClaimToken, "interrupted", 950); err != nil {
				t.Fatal(err)
			}
			ids, _ = h.ready(1000, 10)
			dqWantStrings(t, "after tc's claim was superseded", ids, "tc", "tb", "ta")
		}},
		{"ReadyThreads_next_due_at_does_not_depend_on_limit", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("a1", "ta", 100)
			h.add("b1", "tb", 200)
			h.add("c1", "tc", 300)
			h.add("later", "td", 5000)
			for _, limit := range []int{1, 2, 3, 10} {
				ids, next := h.ready(1000, limit)
				want := []string{"ta", "tb", "tc"}[:min(limit, 3)]
				dqWantStrings(t, fmt.Sprintf("ReadyThreads(limit %d)", limit), ids, want...)
				if next != 5000 {
					t.Fatalf("ReadyThreads(limit %d): nextDueAt = %d, want 5000 (0 only when no queued dispatch is due later)", limit, next)
				}
			}
		}},
	}
}

// Reclaim and purge: store.md rules 85–91.
func dispatchReclaimPurgeCases() []Case {
	return []Case{
		{"S85_reclaim_lease_boundary_is_strict", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000) // lease_until 31000
			dqWantIDs(t, "reclaim(500)", h.reclaim(500, 10))
			dqWantIDs(t, "reclaim(30999)", h.reclaim(30_999, 10))
			dqWantIDs(t, "reclaim(31000)", h.reclaim(31_000, 10))
			h.same(c)
			dqWantIDs(t, "reclaim(31001)", h.reclaim(31_001, 10), "d1")
		}},
		{"S85_reclaim_processes_oldest_leases_first_up_to_limit", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.addClaimed("late", "t1", 3000)
			h.addClaimed("early", "t2", 1000)
			h.addClaimed("mid", "t3", 2000)
			fresh := h.addClaimed("fresh", "t4", 90_000)
			dqWantIDs(t, "reclaim(limit 2)", h.reclaim(100_000, 2), "early", "mid")
			h.status("late", engine.StatusClaimed)
			dqWantIDs(t, "reclaim again", h.reclaim(100_000, 2), "late")
			dqWantIDs(t, "nothing left", h.reclaim(100_000, 2))
			h.same(fresh)
		}},
		{"S86_A23_B20_reclaim_requeues_and_spends_attempt", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			got := h.reclaim(40_000, 10)
			if len(got) != 1 {
				t.Fatalf("reclaimed %d, want 1", len(got))
			}
			want := c
			want.Status = engine.StatusQueued
			want.ClaimToken, want.ClaimedBy, want.LeaseUntil = "", "", 0
			want.AttemptCount = 1
			want.LastError = engine.ReasonLeaseExpired
			want.Errors = []engine.AttemptError{{Attempt: 1, Error: engine.ReasonLeaseExpired, At: 40_000}}
			want.UpdatedAt = 40_000 // available_at kept (1000): it is in the past
			dqEqual(t, "returned record", got[0], want)
			dqEqual(t, "stored record", h.load("d1"), want)
		}},
		{"S86_reclaimed_work_is_ready_before_work_queued_after_it", func(t *testing.T, s engine.Store) {
			// A run cut short by a crash is not sent behind the whole
			// backlog: its thread is due when the dispatch first was.
			h := newDQ(t, s)
			h.addClaimed("d1", "t1", 1000)
			h.add("d2", "t2", 2000)
			h.reclaim(40_000, 10)
			ids, _ := h.ready(40_000, 10)
			dqWantStrings(t, "ReadyThreads", ids, "t1", "t2")
		}},
		{"S86_reclaim_of_an_inline_claim_is_available_at_once", func(t *testing.T, s engine.Store) {
			// An inline claim's dispatch is enqueued with a guard ahead
			// of now; reclaimed before the guard passes, it is available
			// at the reclaim, not at the guard.
			h := newDQ(t, s)
			h.add("d1", "t1", 100_000)
			h.claimID("d1", "c1", 1000) // ClaimDispatch ignores available_at (store.md item 46)
			got := h.reclaim(40_000, 10)
			if len(got) != 1 || got[0].AvailableAt != 40_000 {
				t.Fatalf("reclaimed %+v, want available at 40000", got)
			}
		}},
		{"S86_reclaim_dead_letters_at_max_attempts", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 1
			h.enqueue(d)
			c := h.claimID("d1", "c1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			got := h.reclaim(40_000, 10)
			if len(got) != 1 {
				t.Fatalf("reclaimed %d, want 1", len(got))
			}
			want := c
			want.Status = engine.StatusDeadLetter
			want.ClaimToken, want.ClaimedBy, want.LeaseUntil = "", "", 0
			want.AttemptCount = 1
			want.LastError = engine.ReasonLeaseExpiredMax
			want.Errors = []engine.AttemptError{{Attempt: 1, Error: engine.ReasonLeaseExpiredMax, At: 40_000}}
			want.CompletedAt, want.UpdatedAt = 40_000, 40_000
			dqEqual(t, "returned record", got[0], want)
			dqEqual(t, "stored record", h.load("d1"), want)
		}},
		{"S86_reclaim_does_not_reset_max_attempts", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 3
			h.enqueue(d)
			now := int64(1000)
			for i := 1; i <= 3; i++ {
				c := h.claim("t1", "c1", now)
				now = c.LeaseUntil + 1
				got := h.reclaim(now, 10)
				if len(got) != 1 || got[0].AttemptCount != uint32(i) || got[0].MaxAttempts != 3 {
					t.Fatalf("reclaim #%d = %+v", i, got)
				}
				wantStatus := engine.StatusQueued
				if i == 3 {
					wantStatus = engine.StatusDeadLetter
				}
				if got[0].Status != wantStatus {
					t.Fatalf("reclaim #%d status %s, want %s", i, got[0].Status, wantStatus)
				}
			}
		}},
		{"S86_reclaim_limit_counts_returned_dispatches_not_superseded_ones", func(t *testing.T, s engine.Store) {
			// Recovery pages until a call returns fewer than its limit:
			// a stale lease that comes first must not use up the limit
			// and hide the lapsed leases behind it.
			h := newDQ(t, s)
			for i, th := range []string{"t1", "t2"} {
				id := fmt.Sprintf("s%d", i+1)
				c := h.addClaimed(id, th, 1000+int64(i))
				h.start(id, c.ClaimToken, "inst-"+id, 1100)
				h.interrupt(th, 2000)
			}
			h.addClaimed("o1", "t3", 1010)
			h.addClaimed("o2", "t4", 1020)
			dqWantIDs(t, "first page", h.reclaim(40_000, 1), "o1")
			dqWantIDs(t, "second page", h.reclaim(40_000, 1), "o2")
			dqWantIDs(t, "nothing left", h.reclaim(40_000, 1))
			for _, id := range []string{"s1", "s2"} {
				if d := h.load(id); d.Status != engine.StatusSuperseded {
					t.Fatalf("%s: %s, want superseded", id, d.Status)
				}
			}
		}},
		{"S86_reclaim_stale_epoch_supersedes_and_is_not_returned", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			started := h.load("d1")
			h.interrupt("t1", 2000)
			other := h.addClaimed("o1", "t2", 1000)
			got := h.reclaim(40_000, 10)
			dqWantIDs(t, "reclaimed", got, "o1")
			dqEqual(t, "stale d1", h.load("d1"), dqSuperseded(started, 1, engine.ReasonLeaseExpiredStale, 40_000))
			if o := h.load("o1"); o.Status != engine.StatusQueued || o.AttemptCount != other.AttemptCount+1 {
				t.Fatalf("o1 %s attempt %d", o.Status, o.AttemptCount)
			}
		}},
		{"S87_S88_reclaim_returns_both_outcomes_and_clears_projection", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			one := dqQueued("dies", "t1", 128, 1000)
			one.MaxAttempts = 1
			h.enqueue(one)
			c1 := h.claimID("dies", "c1", 1000)
			h.result("dies", c1.ClaimToken, engine.RunResult{RunID: "run-dies", InstanceID: "i1", Status: engine.RunDone, Response: "ok"}, 1100)
			c2 := h.addClaimed("retries", "t2", 1000)
			h.start("retries", c2.ClaimToken, "i2", 1100)
			got := h.reclaim(40_000, 10)
			dqWantIDSet(t, "reclaimed", got, "dies", "retries")
			for _, d := range got {
				dqNoProjection(t, d)
				dqNoClaim(t, d)
				dqEqual(t, "stored "+d.DispatchID, h.load(d.DispatchID), d)
			}
			if d := h.load("dies"); d.Status != engine.StatusDeadLetter || d.CompletedAt != 40_000 {
				t.Fatalf("dies: %s completed_at %d", d.Status, d.CompletedAt)
			}
			if d := h.load("retries"); d.Status != engine.StatusQueued || d.CompletedAt != 0 {
				t.Fatalf("retries: %s completed_at %d", d.Status, d.CompletedAt)
			}
			dqWantIDs(t, "later sweep", h.reclaim(50_000, 10))
		}},
		{"S90_A25_B21_C19_purge_terminal_removes_old_terminal_only", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("cancelled", "t1", 1000)
			h.cancel("cancelled", 1500)
			a := h.addClaimed("acked", "t2", 1000)
			h.ack("acked", a.ClaimToken, 1500)
			dl := h.addClaimed("dead", "t3", 1000)
			h.deadLetter("dead", dl.ClaimToken, "fatal", 1999)
			h.add("superseded", "t4", 1000)
			h.interrupt("t4", 1000)
			h.add("boundary", "t5", 1000)
			h.cancel("boundary", 2000) // updated_at == olderThan is kept
			q := h.add("queued", "t6", 100)
			c := h.addClaimed("claimed", "t7", 100)
			if n := h.purge(2000); n != 4 {
				t.Fatalf("purge(2000) = %d, want 4", n)
			}
			for _, id := range []string{"cancelled", "acked", "dead", "superseded"} {
				h.absent(id)
			}
			h.status("boundary", engine.StatusCancelled)
			h.same(q)
			h.same(c)
			dqWantIDs(t, "ListTerminal", h.terminal(engine.TerminalCursor{}, 10), "boundary")
			dqWantIDs(t, "ListDeadLetters", h.deadLetters(10, 0))
			dqWantIDs(t, "list(t2)", h.list("t2", nil, 10, 0))
			if n := h.purge(2000); n != 0 {
				t.Fatalf("second purge(2000) = %d, want 0", n)
			}
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusQueued: 1, engine.StatusClaimed: 1, engine.StatusCancelled: 1})
		}},
		{"S91_B46_B47_purge_keeps_thread_epochs_monotonic", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("a1", "thread-a", 1000)
			h.interrupt("thread-a", 1500)
			h.interrupt("thread-a", 1600)
			h.add("b1", "thread-b", 1000)
			if n := h.purge(10_000); n != 1 {
				t.Fatalf("purge = %d, want 1", n)
			}
			if e := h.epoch("thread-a"); e != 2 {
				t.Fatalf("epoch of drained thread after purge = %d, want 2", e)
			}
			q := h.add("a2", "thread-a", 11_000)
			if q.Epoch != 2 {
				t.Fatalf("re-enqueue epoch = %d, want 2", q.Epoch)
			}
			c := h.claim("thread-a", "c1", 11_000)
			h.ack(c.DispatchID, c.ClaimToken, 11_001)
			h.status("b1", engine.StatusQueued)
		}},
	}
}

// ranThreadA queues three dispatches on thread ta (due 100–120) and one on
// tb (due 500), then runs ta's first to its end at 700: ta has waited
// since 700, tb since 500.
func ranThreadA(t *testing.T, s engine.Store) *dq {
	h := newDQ(t, s)
	h.add("a1", "ta", 100)
	h.add("a2", "ta", 110)
	h.add("a3", "ta", 120)
	h.add("b1", "tb", 500)
	c := h.claim("ta", "c1", 600)
	h.ack(c.DispatchID, c.ClaimToken, 700)
	return h
}
