package proxy_test

import (
	"encoding/json"
	"strings"
	"testing"
)

// Event ids are run-local: a client that followed a thread's run and
// re-attaches with that run's last id after the thread moved on to its
// next run would be served the new run after that id, its first events
// skipped. With ?run_id= (the run it followed) it gets a reset and the
// new run whole (found by review).
func TestReattachNamingTheRunFollowedReplaysTheThreadsNextRunWhole(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	runOf := func(submitted sseEvent) string {
		var v struct {
			RunID string `json:"run_id"`
		}
		if err := json.Unmarshal([]byte(submitted.Data), &v); err != nil || v.RunID == "" {
			t.Fatalf("submitted %q: no run_id", submitted.Data)
		}
		return v.RunID
	}
	first := sc.stream(req{method: "POST", path: "/v1/threads/moved/runs", body: submitBody("events:2")})
	runA := runOf(first.next())
	evsA := first.rest()
	lastA := evsA[len(evsA)-1].ID
	second := sc.stream(req{method: "POST", path: "/v1/threads/moved/runs", body: submitBody("events:6")})
	runB := runOf(second.next())
	evsB := second.rest()
	if len(evsB) <= len(evsA) {
		t.Fatalf("run B has %d events, want more than run A's %d", len(evsB), len(evsA))
	}

	re := sc.stream(req{method: "GET", path: "/v1/threads/moved/events?run_id=" + runA, headers: []string{"Last-Event-ID", lastA}})
	got := re.rest()
	if len(got) != len(evsB)+1 || got[0].Event != "reset" || !strings.Contains(got[0].Data, `"reason":"unknown_id"`) {
		t.Fatalf("re-attached naming run A (last id %s): %+v, want a reset and run B's %d events", lastA, got, len(evsB))
	}
	for i, ev := range got[1:] {
		if ev.ID != evsB[i].ID || ev.Data != evsB[i].Data {
			t.Fatalf("event %d: %+v, want run B's %+v", i, ev, evsB[i])
		}
	}
	// Naming the run the thread is on: an ordinary replay after the id.
	re = sc.stream(req{method: "GET", path: "/v1/threads/moved/events?run_id=" + runB, headers: []string{"Last-Event-ID", evsB[1].ID}})
	if got := re.rest(); len(got) != len(evsB)-2 || got[0].ID != evsB[2].ID {
		t.Fatalf("re-attached naming run B after %s: %+v, want its events from %s", evsB[1].ID, got, evsB[2].ID)
	}
	// A run id that is not one is refused.
	sc.call(req{method: "GET", path: "/v1/threads/moved/events?run_id=a%01b"}, 400, nil)
}

// A client naming a run still queued behind the thread's current one
// follows that run, from its first event, not the run before it (found
// by review: it was served the other run and its run_finish); one that
// saw only `submitted` (id 0) of a run the thread has moved on from is
// told so with a reset too.
func TestReattachNamingARunQueuedBehindFollowsIt(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	a := sc.stream(req{method: "POST", path: "/v1/threads/behind/runs", body: submitBody("wait")})
	runA := decode[submitResult](t, a.next().Data).RunID
	a.next() // run_start
	var b submitResult
	sc.call(req{method: "POST", path: "/v1/threads/behind/dispatches", body: submitBody("events:3")}, 202, &b)
	re := sc.stream(req{method: "GET", path: "/v1/threads/behind/events?run_id=" + b.RunID, headers: []string{"Last-Event-ID", "0"}})
	sc.call(req{method: "POST", path: "/v1/cancel/" + runA}, 200, nil) // A ends; B runs
	got := re.rest()
	if len(got) != 4 || got[0].Event != "text_delta" || got[3].Event != "run_finish" || !strings.Contains(got[3].Data, b.RunID) {
		t.Fatalf("re-attached naming run B (queued behind %s): %+v, want B's three events and its run_finish", runA, got)
	}

	// The thread has moved on from A: naming it after id 0 resets.
	re = sc.stream(req{method: "GET", path: "/v1/threads/behind/events?run_id=" + runA, headers: []string{"Last-Event-ID", "0"}})
	got = re.rest()
	if len(got) != 5 || got[0].Event != "reset" || !strings.Contains(got[0].Data, `"unknown_id"`) || !strings.Contains(got[4].Data, b.RunID) {
		t.Fatalf("re-attached naming run A after id 0: %+v, want a reset and run B whole", got)
	}
}

// The thread's log can be a foreground submit's that waits for an agent
// slot: it is known as that run's too, so a client naming another run
// is told with a reset (it was served the waiting run silently).
func TestReattachNamingAnotherRunThanTheWaitingSubmits(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true})
	waiting := sc.stream(req{method: "POST", path: "/v1/threads/slotless/runs", body: submitBody("x")})
	sub := decode[submitResult](t, waiting.next().Data)
	defer waiting.close()
	if sub.Status != "queued" {
		t.Fatalf("submitted %+v, want queued (no agent)", sub)
	}
	re := sc.stream(req{method: "GET", path: "/v1/threads/slotless/events?run_id=some-earlier-run", headers: []string{"Last-Event-ID", "0"}})
	defer re.close()
	if ev := re.next(); ev.Event != "reset" || !strings.Contains(ev.Data, `"unknown_id"`) {
		t.Fatalf("first event %+v, want an unknown_id reset", ev)
	}
}
