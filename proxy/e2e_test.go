package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

type submitResult struct {
	DispatchID string `json:"dispatch_id"`
	RunID      string `json:"run_id"`
	ThreadID   string `json:"thread_id"`
	Status     string `json:"status"`
	Delivery   string `json:"delivery"`
}

func decode[T any](t testing.TB, s string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("decode %s: %v", s, err)
	}
	return v
}

// checkIDs checks that a stream's events after `submitted` are numbered
// from..from+n-1 without a gap.
func checkIDs(t testing.TB, evs []sseEvent, from int) {
	t.Helper()
	for i, e := range evs {
		if want := strconv.Itoa(from + i); e.ID != want {
			t.Fatalf("event %d (%s) has id %q, want %s: %+v", i, e.Event, e.ID, want, evs)
		}
	}
}

// A foreground submit streams `submitted` (id 0), every agent event in
// order, the run_finish, and ends; the run and its dispatch are settled.
func TestForegroundSubmitStreamsTheRun(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	st := sc.stream(req{method: "POST", path: "/v1/threads/fg-1/runs", body: submitBody("hello")})
	sub := st.next()
	if sub.Event != "submitted" || sub.ID != "0" {
		t.Fatalf("first event %+v", sub)
	}
	res := decode[submitResult](t, sub.Data)
	if res.ThreadID != "fg-1" || res.Status != "running" || res.DispatchID == "" || res.RunID == "" {
		t.Fatalf("submitted %+v", res)
	}
	evs := st.rest()
	if types(evs) != "run_start,text_delta,run_finish" {
		t.Fatalf("events %s: %+v", types(evs), evs)
	}
	checkIDs(t, evs, 1)
	if !strings.Contains(evs[1].Data, `"echo: hello"`) || !strings.Contains(evs[2].Data, `"natural_end"`) {
		t.Fatalf("event data %+v", evs)
	}
	var d map[string]any
	sc.call(req{method: "GET", path: "/v1/dispatches/" + res.DispatchID}, 200, &d)
	if d["status"] != "acked" || d["run_id"] != res.RunID {
		t.Fatalf("dispatch %v", d)
	}
	if _, leaked := d["claim_token"]; leaked {
		t.Fatalf("dispatch shows its claim token: %v", d)
	}
	var run engine.RunRecord
	sc.call(req{method: "GET", path: "/v1/runs/" + res.RunID}, 200, &run)
	if run.Status != engine.RunDone || run.ThreadID != "fg-1" || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermNaturalEnd {
		t.Fatalf("run %+v", run)
	}
}

// POST /v1/runs takes the thread from the body, or makes a new one.
func TestForegroundSubmitOnPostRuns(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/runs", body: submitBody("a"), headers: []string{"Accept", "application/json"}}, 200, &res)
	if len(res.ThreadID) != 36 || res.Status != "running" {
		t.Fatalf("new thread %+v", res)
	}
	st := sc.stream(req{method: "POST", path: "/v1/runs", body: submitBody("b", "thread_id", "named-thread")})
	sub := decode[submitResult](t, st.next().Data)
	if sub.ThreadID != "named-thread" {
		t.Fatalf("submitted %+v", sub)
	}
	if evs := st.rest(); types(evs) != "run_start,text_delta,run_finish" {
		t.Fatalf("events %s", types(evs))
	}
	sc.waitDispatch(res.DispatchID, engine.StatusAcked)
}

// With Accept: application/json a foreground submit answers the submit
// result only, and the run goes on.
func TestForegroundSubmitAcceptJSON(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	// Media types are matched without regard to case (RFC 9110 §8.3.1).
	resp, b := sc.do(req{method: "POST", path: "/v1/threads/fgj/runs", body: submitBody("x"), headers: []string{"Accept", "Application/JSON; charset=utf-8"}})
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("status %d %s: %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	res := decode[submitResult](t, string(b))
	if res.ThreadID != "fgj" || res.Status != "running" {
		t.Fatalf("result %+v", res)
	}
	sc.waitDispatch(res.DispatchID, engine.StatusAcked)
	if msgs := sc.messages("fgj"); len(msgs) != 1 || msgs[0].Message.Role != "user" {
		t.Fatalf("messages %+v", msgs)
	}
}

// A background submit answers 202 and the run completes without a client.
func TestBackgroundSubmit(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/bg/dispatches", body: submitBody("later")}, 202, &res)
	if res.ThreadID != "bg" || (res.Status != "running" && res.Status != "queued") {
		t.Fatalf("result %+v", res)
	}
	sc.waitDispatch(res.DispatchID, engine.StatusAcked)
	var run engine.RunRecord
	sc.call(req{method: "GET", path: "/v1/runs/" + res.RunID}, 200, &run)
	if run.Status != engine.RunDone || !strings.Contains(string(run.FinalOutput), "echo: later") {
		t.Fatalf("run %+v", run)
	}
}

// Messages sent while a run executes are delivered to it live; with no
// run they queue a background run; an expected_run_id that is not the
// running run queues them too.
func TestLiveMessages(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	st := sc.stream(req{method: "POST", path: "/v1/threads/live/runs", body: submitBody("wait")})
	sub := decode[submitResult](t, st.next().Data)
	if e := st.next(); e.Event != "run_start" {
		t.Fatalf("event %+v", e)
	}
	if e := st.next(); !strings.Contains(e.Data, "waiting") {
		t.Fatalf("event %+v", e)
	}
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/live/messages", body: `{"messages":[{"role":"user","content":"more"}],"expected_run_id":"someone-else"}`}, 200, &res)
	if res.Delivery != "queued" {
		t.Fatalf("a message for another run was delivered: %+v", res)
	}
	sc.call(req{method: "POST", path: "/v1/threads/live/messages", body: `{"messages":[{"role":"user","content":"now"}],"expected_run_id":"` + sub.RunID + `"}`}, 200, &res)
	if res.Delivery != "live" || res.RunID != sub.RunID || res.Status != "running" {
		t.Fatalf("live message %+v (run %s)", res, sub.RunID)
	}
	evs := st.rest()
	if types(evs) != "text_delta,run_finish" || !strings.Contains(evs[0].Data, "live: now") {
		t.Fatalf("after the live message: %+v", evs)
	}
	checkIDs(t, evs, 3)
	// The queued message ("more") became a background run of its own.
	eventually(t, "the queued message ran", func() bool {
		var ds struct{ Items []engine.Dispatch }
		sc.call(req{method: "GET", path: "/v1/threads/live/dispatches?status=acked"}, 200, &ds)
		return len(ds.Items) == 2
	})
	sc.call(req{method: "POST", path: "/v1/threads/live/messages", body: `{"messages":[{"role":"user","content":"idle"}]}`}, 200, &res)
	if res.Delivery != "queued" || res.DispatchID == "" {
		t.Fatalf("message to an idle thread %+v", res)
	}
	sc.waitDispatch(res.DispatchID, engine.StatusAcked)
}

// A decision reaches the run it is for.
func TestDecisions(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	st := sc.stream(req{method: "POST", path: "/v1/threads/dec/runs", body: submitBody("wait")})
	sub := decode[submitResult](t, st.next().Data)
	st.next()
	st.next()
	var out struct {
		Delivered bool `json:"delivered"`
	}
	sc.call(req{method: "POST", path: "/v1/runs/" + sub.RunID + "/decisions", body: `{"tool_call_id":"call-1","resume":{"approved":true}}`}, 200, &out)
	if !out.Delivered {
		t.Fatal("decision not delivered")
	}
	evs := st.rest()
	if types(evs) != "tool_call_resumed,run_finish" || !strings.Contains(evs[0].Data, `"call_id":"call-1"`) || !strings.Contains(evs[0].Data, "approved") {
		t.Fatalf("events %+v", evs)
	}
	sc.call(req{method: "POST", path: "/v1/runs/" + sub.RunID + "/decisions", body: `{"call_id":"call-2","resume":{}}`}, 200, &out)
	if out.Delivered {
		t.Fatal("decision delivered to a finished run")
	}
	// A decision needs its resume (found by review: one without reached
	// the agent as null).
	for _, body := range []string{`{"call_id":"call-3"}`, `{"call_id":"call-3","resume":null}`, `{"call_id":"call-3","resume": null }`} {
		sc.call(req{method: "POST", path: "/v1/runs/" + sub.RunID + "/decisions", body: body}, 400, nil)
	}
	sc.call(req{method: "POST", path: "/v1/threads/t-dec/dispatches", body: `{"decisions":[{"call_id":"c"}]}`}, 400, nil)
}

// Interrupt supersedes the thread's queued dispatches and cancels its
// active run.
func TestInterrupt(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	st := sc.stream(req{method: "POST", path: "/v1/threads/intr/runs", body: submitBody("wait")})
	sub := decode[submitResult](t, st.next().Data)
	st.next()
	st.next()
	var q1, q2 submitResult
	sc.call(req{method: "POST", path: "/v1/threads/intr/dispatches", body: submitBody("q1")}, 202, &q1)
	sc.call(req{method: "POST", path: "/v1/threads/intr/dispatches", body: submitBody("q2")}, 202, &q2)
	if q1.Status != "queued" || q2.Status != "queued" {
		t.Fatalf("behind a running run: %+v %+v", q1, q2)
	}
	var res struct {
		NewEpoch   uint64           `json:"new_dispatch_epoch"`
		Superseded int              `json:"superseded_count"`
		Active     *engine.Dispatch `json:"active_dispatch"`
	}
	sc.call(req{method: "POST", path: "/v1/threads/intr/interrupt"}, 200, &res)
	if res.NewEpoch == 0 || res.Superseded != 2 || res.Active == nil || res.Active.DispatchID != sub.DispatchID || res.Active.ClaimToken != "" {
		t.Fatalf("interrupt %+v", res)
	}
	evs := st.rest()
	if len(evs) == 0 || evs[len(evs)-1].Event != "run_finish" || !strings.Contains(evs[len(evs)-1].Data, "cancelled") {
		t.Fatalf("interrupted stream %+v", evs)
	}
	sc.waitDispatch(q1.DispatchID, engine.StatusSuperseded)
	sc.waitDispatch(q2.DispatchID, engine.StatusSuperseded)
	eventually(t, "run cancelled", func() bool {
		r, _ := sc.store.LoadRun(context.Background(), sub.RunID)
		return r != nil && r.Status == engine.RunDone && r.TerminationReason != nil && r.TerminationReason.Type == engine.TermCancelled
	})
}

// Cancel takes a dispatch id, a run id or a thread id.
func TestCancelByAnyID(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	for _, by := range []string{"dispatch", "run", "thread"} {
		t.Run(by, func(t *testing.T) {
			thread := "cancel-" + by
			st := sc.stream(req{method: "POST", path: "/v1/threads/" + thread + "/runs", body: submitBody("wait")})
			sub := decode[submitResult](t, st.next().Data)
			st.next()
			st.next()
			id := map[string]string{"dispatch": sub.DispatchID, "run": sub.RunID, "thread": thread}[by]
			var out struct {
				Cancelled bool `json:"cancelled"`
			}
			sc.call(req{method: "POST", path: "/v1/cancel/" + id}, 200, &out)
			if !out.Cancelled {
				t.Fatal("not cancelled")
			}
			evs := st.rest()
			if types(evs) != "run_finish" || !strings.Contains(evs[0].Data, "cancelled") {
				t.Fatalf("cancelled stream %+v", evs)
			}
			sc.waitDispatch(sub.DispatchID, engine.StatusAcked)
		})
	}
	// A queued dispatch is cancelled in the store.
	sc2 := newSidecar(t, options{noAgent: true})
	var q submitResult
	sc2.call(req{method: "POST", path: "/v1/threads/cq/dispatches", body: submitBody("x")}, 202, &q)
	var out struct {
		Cancelled bool `json:"cancelled"`
	}
	sc2.call(req{method: "POST", path: "/v1/cancel/" + q.DispatchID}, 200, &out)
	if !out.Cancelled {
		t.Fatal("queued dispatch not cancelled")
	}
	sc2.waitDispatch(q.DispatchID, engine.StatusCancelled)
	sc2.call(req{method: "POST", path: "/v1/cancel/nothing-here"}, 200, &out)
	if out.Cancelled {
		t.Fatal("cancelled an unknown id")
	}
}

// A client that re-attaches with Last-Event-ID misses no event: the
// buffered ones are replayed, then the live ones follow; a retained run
// replays and ends; an id beyond the run restarts the replay.
func TestReattachWithLastEventID(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	st := sc.stream(req{method: "POST", path: "/v1/threads/re/runs", body: submitBody("wait")})
	sub := decode[submitResult](t, st.next().Data)
	first := st.next()
	if first.ID != "1" {
		t.Fatalf("first agent event %+v", first)
	}
	st.close() // the client goes away after event 1; the run goes on

	re := sc.stream(req{method: "GET", path: "/v1/threads/re/events", headers: []string{"Last-Event-ID", "1"}})
	if e := re.next(); e.ID != "2" || !strings.Contains(e.Data, "waiting") {
		t.Fatalf("replayed %+v", e)
	}
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/re/messages", body: `{"messages":[{"role":"user","content":"go"}]}`}, 200, &res)
	if res.Delivery != "live" || res.RunID != sub.RunID {
		t.Fatalf("closing the stream cancelled the run? %+v", res)
	}
	evs := re.rest()
	if types(evs) != "text_delta,run_finish" {
		t.Fatalf("live after re-attach %+v", evs)
	}
	checkIDs(t, evs, 3)

	// The finished run is retained: ?after=0 replays it all and ends.
	all := sc.stream(req{method: "GET", path: "/v1/threads/re/events?after=0"}).rest()
	if types(all) != "run_start,text_delta,text_delta,run_finish" {
		t.Fatalf("retained replay %+v", all)
	}
	checkIDs(t, all, 1)
	// Last-Event-ID wins over ?after.
	tail := sc.stream(req{method: "GET", path: "/v1/threads/re/events?after=0", headers: []string{"Last-Event-ID", "3"}}).rest()
	if types(tail) != "run_finish" || tail[0].ID != "4" {
		t.Fatalf("tail %+v", tail)
	}
	// An id beyond this run (of an earlier run) gets a reset and the whole run.
	beyond := sc.stream(req{method: "GET", path: "/v1/threads/re/events", headers: []string{"Last-Event-ID", "99"}}).rest()
	if types(beyond) != "reset,run_start,text_delta,text_delta,run_finish" || beyond[0].HasID || !strings.Contains(beyond[0].Data, `"unknown_id"`) {
		t.Fatalf("beyond %+v", beyond)
	}
	resp, b := sc.do(req{method: "GET", path: "/v1/threads/never-ran/events"})
	if resp.StatusCode != 404 || !strings.Contains(string(b), `"not_found"`) {
		t.Fatalf("unknown thread: %d %s", resp.StatusCode, b)
	}
}

// A re-attachment older than the event buffer gets `event: reset` and
// the events still kept.
func TestReattachOlderThanBuffer(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{engine: engine.Config{EventBuffer: 8}})
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/old/runs", body: submitBody("events:20"), headers: []string{"Accept", "application/json"}}, 200, &res)
	sc.waitDispatch(res.DispatchID, engine.StatusAcked)
	evs := sc.stream(req{method: "GET", path: "/v1/threads/old/events", headers: []string{"Last-Event-ID", "2"}}).rest()
	if len(evs) != 9 || evs[0].Event != "reset" || !strings.Contains(evs[0].Data, `"reason":"expired","after":2,"oldest":14`) {
		t.Fatalf("events %+v", evs)
	}
	checkIDs(t, evs[1:], 14)
}

// Dead letters are listed, newest first, and a requeue puts one back as
// a new dispatch of the same run.
func TestDeadLettersAndRequeue(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	var ids []string
	for i := 0; i < 3; i++ {
		var res submitResult
		sc.call(req{method: "POST", path: fmt.Sprintf("/v1/threads/dl-%d/dispatches", i), body: submitBody("fail")}, 202, &res)
		sc.waitDispatch(res.DispatchID, engine.StatusDeadLetter)
		ids = append(ids, res.DispatchID)
		time.Sleep(2 * time.Millisecond) // distinct completed_at
	}
	type dpage struct {
		Items      []engine.Dispatch `json:"items"`
		NextOffset *int              `json:"next_offset"`
	}
	var p dpage
	sc.call(req{method: "GET", path: "/v1/dead-letters?limit=2"}, 200, &p)
	if len(p.Items) != 2 || p.NextOffset == nil || *p.NextOffset != 2 || p.Items[0].DispatchID != ids[2] || p.Items[1].DispatchID != ids[1] {
		t.Fatalf("page 1 %+v", p)
	}
	sc.call(req{method: "GET", path: "/v1/dead-letters?limit=2&offset=2"}, 200, &p)
	if len(p.Items) != 1 || p.NextOffset != nil || p.Items[0].DispatchID != ids[0] {
		t.Fatalf("page 2 %+v", p)
	}
	var nd engine.Dispatch
	sc.call(req{method: "POST", path: "/v1/dispatches/" + ids[0] + "/requeue"}, 200, &nd)
	old := sc.waitDispatch(ids[0], engine.StatusDeadLetter)
	if nd.DispatchID == ids[0] || nd.RunID != old.RunID || nd.AttemptCount != 0 || old.RequeuedAs != nd.DispatchID {
		t.Fatalf("requeued %+v from %+v", nd, old)
	}
	sc.waitDispatch(nd.DispatchID, engine.StatusDeadLetter) // it fails again, for good
	sc.call(req{method: "GET", path: "/v1/dead-letters"}, 200, &p)
	if len(p.Items) != 3 || p.Items[0].DispatchID != nd.DispatchID {
		t.Fatalf("after requeue %+v", p)
	}
	resp, b := sc.do(req{method: "POST", path: "/v1/dispatches/" + ids[0] + "/requeue"})
	if resp.StatusCode != 409 || !strings.Contains(string(b), `"conflict"`) {
		t.Fatalf("second requeue: %d %s", resp.StatusCode, b)
	}
	// The message names the operation and the dispatch once (found by
	// review: "requeue X: requeue X: requeue dispatch X: …").
	if n := strings.Count(string(b), ids[0]); n != 1 || !strings.Contains(string(b), "already requeued as "+nd.DispatchID) {
		t.Fatalf("second requeue's message names %s %d times: %s", ids[0], n, b)
	}
	var ok submitResult
	sc.call(req{method: "POST", path: "/v1/threads/dl-ok/runs", body: submitBody("x"), headers: []string{"Accept", "application/json"}}, 200, &ok)
	sc.waitDispatch(ok.DispatchID, engine.StatusAcked)
	resp, b = sc.do(req{method: "POST", path: "/v1/dispatches/" + ok.DispatchID + "/requeue"})
	if resp.StatusCode != 400 || !strings.Contains(string(b), `"validation"`) {
		t.Fatalf("requeue of an acked dispatch: %d %s", resp.StatusCode, b)
	}
}

// The inspection endpoints page with limit/offset (dispatches) and
// after_seq (messages) and filter by status.
func TestInspectionPaging(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true})
	var want []string
	for i := 0; i < 5; i++ {
		var res submitResult
		sc.call(req{method: "POST", path: "/v1/threads/pg/dispatches", body: submitBody(fmt.Sprint("m", i))}, 202, &res)
		if res.Status != "queued" {
			t.Fatalf("no agent, yet %+v", res)
		}
		want = append(want, res.DispatchID)
	}
	type dpage struct {
		Items      []engine.Dispatch `json:"items"`
		NextOffset *int              `json:"next_offset"`
	}
	var got []string
	next := 0
	for pages := 0; ; pages++ {
		var p dpage
		sc.call(req{method: "GET", path: fmt.Sprintf("/v1/threads/pg/dispatches?status=queued,claimed&limit=2&offset=%d", next)}, 200, &p)
		for _, d := range p.Items {
			got = append(got, d.DispatchID)
		}
		if p.NextOffset == nil {
			if pages != 2 {
				t.Fatalf("%d pages", pages+1)
			}
			break
		}
		next = *p.NextOffset
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("listed %v, want %v", got, want)
	}
	var p dpage
	sc.call(req{method: "GET", path: "/v1/threads/pg/dispatches?status=claimed"}, 200, &p)
	if len(p.Items) != 0 || p.NextOffset != nil {
		t.Fatalf("claimed %+v", p)
	}
	sc.call(req{method: "GET", path: "/v1/threads/pg/dispatches?limit=5000"}, 200, &p)
	if len(p.Items) != 5 {
		t.Fatalf("capped limit %+v", p)
	}
	sc.call(req{method: "GET", path: "/v1/threads/nobody/dispatches"}, 200, &p)
	if p.Items == nil || len(p.Items) != 0 {
		t.Fatalf("empty thread %+v", p)
	}
	type mpage struct {
		Items      []engine.MessageRecord `json:"items"`
		NextOffset *uint64                `json:"next_offset"`
	}
	var seqs []uint64
	after := uint64(0)
	for {
		var m mpage
		sc.call(req{method: "GET", path: fmt.Sprintf("/v1/threads/pg/messages?after_seq=%d&limit=2", after)}, 200, &m)
		for _, r := range m.Items {
			seqs = append(seqs, r.Seq)
		}
		if m.NextOffset == nil {
			break
		}
		after = *m.NextOffset
	}
	if fmt.Sprint(seqs) != "[1 2 3 4 5]" {
		t.Fatalf("message seqs %v", seqs)
	}
	var d engine.Dispatch
	sc.call(req{method: "GET", path: "/v1/dispatches/" + want[0]}, 200, &d)
	if d.Status != engine.StatusQueued || d.ThreadID != "pg" {
		t.Fatalf("dispatch %+v", d)
	}
}

// An Idempotency-Key repeat returns the first dispatch while it is not
// terminal — on a background submit and on a foreground one, which then
// interrupts nothing.
func TestIdempotencyKey(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true})
	var a, b, c, f submitResult
	sc.call(req{method: "POST", path: "/v1/threads/idem/dispatches", body: submitBody("x"), headers: []string{"Idempotency-Key", "key-1"}}, 202, &a)
	sc.call(req{method: "POST", path: "/v1/threads/idem/dispatches", body: submitBody("x"), headers: []string{"Idempotency-Key", "key-1"}}, 202, &b)
	sc.call(req{method: "POST", path: "/v1/threads/idem/dispatches", body: submitBody("x", "dedupe_key", "key-2")}, 202, &c)
	if a.DispatchID != b.DispatchID || a.RunID != b.RunID || c.DispatchID == a.DispatchID {
		t.Fatalf("a %+v b %+v c %+v", a, b, c)
	}
	sc.call(req{method: "POST", path: "/v1/threads/idem/runs", body: submitBody("x"),
		headers: []string{"Idempotency-Key", "key-1", "Accept", "application/json"}}, 200, &f)
	if f.DispatchID != a.DispatchID || f.Status != "queued" {
		t.Fatalf("foreground repeat %+v, first %+v", f, a)
	}
	if d := sc.waitDispatch(a.DispatchID, engine.StatusQueued); d.DedupeKey != "key-1" {
		t.Fatalf("dispatch %+v", d)
	}
	sc.waitDispatch(c.DispatchID, engine.StatusQueued) // nothing was interrupted
	if n := sc.counts().Dispatches; n != 2 {
		t.Fatalf("%d dispatches, want 2", n)
	}
	// As a stream: `submitted` with the first dispatch, then the queued
	// run followed to its end, here a cancel (found by review: the stream
	// ended after `submitted`, and ctl exited 1).
	st := sc.stream(req{method: "POST", path: "/v1/threads/idem/runs", body: submitBody("x"), headers: []string{"Idempotency-Key", "key-1"}})
	if ev := st.next(); ev.Event != "submitted" || decode[submitResult](t, ev.Data).DispatchID != a.DispatchID {
		t.Fatalf("foreground stream repeat: %+v", ev)
	}
	sc.call(req{method: "POST", path: "/v1/cancel/" + a.DispatchID}, 200, nil)
	evs := st.rest()
	if len(evs) == 0 || evs[len(evs)-1].Event != "run_finish" || !strings.Contains(evs[len(evs)-1].Data, "cancelled") {
		t.Fatalf("the repeat's stream after the cancel: %+v; want the run's run_finish", evs)
	}
}

// A traceparent header reaches the agent's RUN request; an invalid one is
// dropped.
func TestTraceparentReachesTheAgent(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	const tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	evs := sc.stream(req{method: "POST", path: "/v1/threads/tr/runs", body: submitBody("trace"), headers: []string{"traceparent", tp}}).rest()
	if len(evs) < 2 || evs[1].Event != "custom" || !strings.Contains(evs[1].Data, tp) {
		t.Fatalf("events %+v", evs)
	}
	evs = sc.stream(req{method: "POST", path: "/v1/threads/tr/runs", body: submitBody("trace"), headers: []string{"traceparent", "not-a-trace"}}).rest()
	if len(evs) < 2 || !strings.Contains(evs[1].Data, `"traceparent":""`) {
		t.Fatalf("events %+v", evs)
	}
}

// A foreground run that finds no free slot waits at the head of its
// thread with its stream open (pinged); a foreground run withdrawn before
// it starts ends its stream with a cancelled run_finish.
func TestQueuedForegroundStream(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{maxRuns: 1, proxy: proxyConfig(20 * time.Millisecond)})
	busy := sc.stream(req{method: "POST", path: "/v1/threads/busy/runs", body: submitBody("wait")})
	busy.next()
	busy.next()
	busy.next()

	q := sc.stream(req{method: "POST", path: "/v1/threads/q/runs", body: submitBody("hello")})
	if sub := decode[submitResult](t, q.next().Data); sub.Status != "queued" {
		t.Fatalf("submitted %+v", sub)
	}
	for i := 0; i < 2; i++ {
		select {
		case <-q.pings:
		case <-time.After(waitTimeout):
			t.Fatal("no ping on a waiting stream")
		}
	}
	w := sc.stream(req{method: "POST", path: "/v1/threads/w/runs", body: submitBody("never")})
	wsub := decode[submitResult](t, w.next().Data)
	var ir struct {
		Superseded int `json:"superseded_count"`
	}
	sc.call(req{method: "POST", path: "/v1/threads/w/interrupt"}, 200, &ir)
	wevs := w.rest()
	if ir.Superseded != 1 || types(wevs) != "run_finish" || wevs[0].ID != "2147483649" || !strings.Contains(wevs[0].Data, `"cancelled"`) || !strings.Contains(wevs[0].Data, wsub.RunID) {
		t.Fatalf("withdrawn run: %+v %+v", ir, wevs)
	}

	sc.call(req{method: "POST", path: "/v1/threads/busy/messages", body: `{"messages":[{"role":"user","content":"done"}]}`}, 200, nil)
	busy.rest()
	if evs := q.rest(); types(evs) != "run_start,text_delta,run_finish" {
		t.Fatalf("queued run %+v", evs)
	}
}

// A subscriber that falls behind the event buffer while live is sent
// `event: reset` and disconnected (and counted, and logged with its
// thread); the run is never held up.
func TestSlowSubscriberIsDropped(t *testing.T) {
	t.Parallel()
	var logs syncbuf.Buffer
	sc := newSidecar(t, options{engine: engine.Config{EventBuffer: 16}, proxy: proxy.Config{Logger: slog.New(slog.NewJSONHandler(&logs, nil))}})
	hr, _ := http.NewRequest("POST", base+"/v1/threads/slow/runs", strings.NewReader(submitBody("big:3000")))
	resp, err := sc.client.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// Do not read: the run must finish anyway.
	eventually(t, "run finished while its subscriber did not read", func() bool {
		ds, err := sc.mb.ListDispatches(context.Background(), "slow", engine.StatusFilter{engine.StatusAcked}, 0, 0)
		return err == nil && len(ds) == 1
	})
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	body := string(b)
	tail := body[max(0, len(body)-300):]
	if !strings.Contains(body, "event: reset\ndata: {\"type\":\"reset\",\"reason\":\"slow_subscriber\"") || !strings.HasSuffix(body, "}\n\n") ||
		strings.Contains(body, "event: run_finish") {
		t.Fatalf("stream tail %q", tail)
	}
	_, m := sc.do(req{method: "GET", path: "/metrics"})
	if !strings.Contains(string(m), "mailbox_http_sse_dropped_total 1\n") {
		t.Fatalf("dropped not counted:\n%s", grep(string(m), "sse"))
	}
	if line := grep(logs.String(), "fell behind"); !strings.Contains(line, `"thread_id":"slow"`) {
		t.Fatalf("the drop's log line %q does not name the thread", line)
	}
	// The client re-attaches from its last event: reset (expired), then the rest.
	last := strings.LastIndex(body, "\nid: ")
	id := body[last+5 : last+5+strings.Index(body[last+5:], "\n")]
	evs := sc.stream(req{method: "GET", path: "/v1/threads/slow/events", headers: []string{"Last-Event-ID", id}}).rest()
	if evs[0].Event != "reset" || evs[len(evs)-1].Event != "run_finish" {
		t.Fatalf("re-attached %s", types(evs))
	}
}

// metricLine returns the first line of a metrics text that starts with prefix.
func metricLine(text, prefix string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A client that leaves is noticed at the next ping (a failed flush): its
// stream ends and the run goes on.
func TestClientDisconnectEndsStream(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{proxy: proxyConfig(20 * time.Millisecond)})
	st := sc.stream(req{method: "POST", path: "/v1/threads/gone/runs", body: submitBody("wait")})
	sub := decode[submitResult](t, st.next().Data)
	st.next()
	st.next()
	subscribers := func() string {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		return metricLine(string(m), "mailbox_http_sse_subscribers ")
	}
	if got := subscribers(); got != "mailbox_http_sse_subscribers 1" {
		t.Fatalf("open stream: %q", got)
	}
	st.close()
	eventually(t, "the stream of a gone client ended", func() bool { return subscribers() == "mailbox_http_sse_subscribers 0" })
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/gone/messages", body: `{"messages":[{"role":"user","content":"still there?"}]}`}, 200, &res)
	if res.Delivery != "live" || res.RunID != sub.RunID {
		t.Fatalf("the run did not survive its client: %+v", res)
	}
	sc.waitDispatch(sub.DispatchID, engine.StatusAcked)
}

// A foreground submit whose thread's active run does not release in
// time is a 409 conflict, and writes no dispatch, run or message.
func TestForegroundConflict(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{engine: engine.Config{CancelWait: 100 * time.Millisecond}})
	var bg submitResult
	sc.call(req{method: "POST", path: "/v1/threads/busy/dispatches", body: submitBody("stubborn:1500ms")}, 202, &bg)
	sc.waitDispatch(bg.DispatchID, engine.StatusClaimed)
	// The agent has the run (its run_start came back): a run recorded as
	// started but not yet sent is abandoned at once by an interrupt, and
	// the submit then rightly succeeds.
	eventually(t, "the agent running the stubborn run", func() bool {
		l := sc.mb.Reattach("busy")
		if l == nil {
			return false
		}
		evs, _, _, _ := l.Read(0, 16, nil)
		for _, e := range evs {
			if e.Type == "run_start" {
				return true
			}
		}
		return false
	})
	before := sc.counts()
	resp, b := sc.do(req{method: "POST", path: "/v1/threads/busy/runs", body: submitBody("now")})
	if resp.StatusCode != 409 || !strings.Contains(string(b), `"conflict"`) || !strings.Contains(string(b), engine.ConflictActiveRun) {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	if after := sc.counts(); after.Dispatches != before.Dispatches || after.Runs != before.Runs || after.Messages != before.Messages {
		t.Fatalf("a refused submit wrote: %+v → %+v", before, after)
	}
	// The interrupt it began stays (the seed's order: interrupt, then
	// submit): the stubborn run, once it ends, is superseded.
	sc.waitDispatch(bg.DispatchID, engine.StatusSuperseded)
}

// A connection that carried a finished stream serves the client's next
// requests (keep-alive), also after the stream's stall bound has passed:
// the stream's write deadline does not outlive it.
func TestStreamConnectionIsReused(t *testing.T) {
	t.Parallel()
	pc := proxyConfig(20 * time.Millisecond)
	pc.StallTimeout = 100 * time.Millisecond
	sc := newSidecar(t, options{proxy: pc})
	conn, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	roundTrip := func(method, path, body string) (*http.Response, string) {
		t.Helper()
		fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", method, path, len(body), body)
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("%s %s on the reused connection: %v", method, path, err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("%s %s body: %v", method, path, err)
		}
		return resp, string(b)
	}
	for i, thread := range []string{"reuse-1", "reuse-2"} {
		resp, b := roundTrip("POST", "/v1/threads/"+thread+"/runs", submitBody("hello"))
		if resp.StatusCode != 200 || resp.Close || !strings.Contains(b, "event: run_finish") {
			t.Fatalf("stream %d: status %d, close %v: %s", i, resp.StatusCode, resp.Close, b)
		}
	}
	time.Sleep(3 * pc.StallTimeout) // past the last stream's stall bound
	if resp, b := roundTrip("GET", "/v1/threads/reuse-1/dispatches", ""); resp.StatusCode != 200 || !strings.Contains(b, `"acked"`) {
		t.Fatalf("request after the streams: %d %s", resp.StatusCode, b)
	}
}

// A path id may come percent-encoded (JavaScript's encodeURIComponent
// escapes ':'): it names the same id (found by review: "a%3Ab" was
// refused while "a:b" was taken).
func TestAPercentEncodedPathIDNamesTheSameID(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/enc%3Aone/dispatches", body: submitBody("x")}, 202, &res)
	if res.ThreadID != "enc:one" {
		t.Fatalf("thread %q, want enc:one", res.ThreadID)
	}
	sc.waitDispatch(res.DispatchID, engine.StatusAcked)
	if msgs := sc.messages("enc:one"); len(msgs) != 1 || msgs[0].Message.Role != "user" {
		t.Fatalf("messages of enc:one: %+v", msgs)
	}
	var d engine.Dispatch
	sc.call(req{method: "GET", path: "/v1/dispatches/" + strings.ReplaceAll(res.DispatchID, "-", "%2D")}, 200, &d)
	if d.DispatchID != res.DispatchID {
		t.Fatalf("dispatch %+v", d)
	}
}

// A client's interrupt, cancel and requeue each leave a line with their
// ids: an operator's trail (found by review: none left any).
func TestCommandsThatEndWorkAreLogged(t *testing.T) {
	t.Parallel()
	var logs syncbuf.Buffer
	sc := newSidecar(t, options{proxy: proxy.Config{Logger: slog.New(slog.NewJSONHandler(&logs, nil))}})
	if resp, body := sc.do(req{method: "POST", path: "/v1/threads/audit/interrupt"}); resp.StatusCode != 200 {
		t.Fatalf("interrupt: %d %s", resp.StatusCode, body)
	}
	if resp, body := sc.do(req{method: "POST", path: "/v1/cancel/audit-nothing"}); resp.StatusCode != 200 {
		t.Fatalf("cancel: %d %s", resp.StatusCode, body)
	}
	for _, want := range []string{`"msg":"interrupt","thread_id":"audit"`, `"msg":"cancel","id":"audit-nothing","cancelled":false`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %s:\n%s", want, logs.String())
		}
	}
}
