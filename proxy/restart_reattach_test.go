package proxy_test

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// tagAgent emits n text_delta events {"tag":tag,"n":i}, then waits for a
// live message (done) or a cancel.
type tagAgent struct {
	tag string
	n   int
}

func (a tagAgent) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	msgs := run.Messages()
	for i := 1; i <= a.n; i++ {
		run.EmitRaw([]byte(`{"type":"text_delta","tag":"` + a.tag + `","n":` + strconv.Itoa(i) + `}`))
	}
	select {
	case <-ctx.Done():
		return agent.Cancelled()
	case <-msgs:
		return agent.Done("ok")
	}
}

// spec/http.md, Events: a client that re-attaches with Last-Event-ID
// misses nothing still buffered, and an id it cannot be served from gets
// `event: reset`. Across a sidecar restart the run's event log is gone: the
// restarted sidecar runs the run again (Stop released the attempt without
// spending it) with a new log. Its ids used to restart at 1, so a client
// re-attaching with the last id it saw before the restart was served the
// new attempt from the middle, without a reset.
func TestReattachAfterARestartMissesNothing(t *testing.T) {
	dir := filepath.Join(shortDir(t), "data")
	one := newSidecar(t, options{diskPath: dir, handler: tagAgent{tag: "first", n: 2}})
	st := one.stream(req{method: "POST", path: "/v1/threads/rs/runs", body: submitBody("go")})
	sub := decode[submitResult](t, st.next().Data)
	seen := []sseEvent{st.next(), st.next()}
	one.stop(100 * time.Millisecond) // a restart: the attempt is released, not spent
	seen = append(seen, st.rest()...)
	last := uint64(0)
	for _, ev := range seen {
		if ev.HasID {
			last = max(last, uint64(mustAtoi(ev.ID)))
		}
	}
	if last < 2 {
		t.Fatalf("before the restart the client saw %+v", seen)
	}

	two := newSidecar(t, options{diskPath: dir, handler: tagAgent{tag: "second", n: 5}})
	eventually(t, "the restarted sidecar's attempt emitted its events", func() bool {
		l := two.mb.Reattach("rs")
		if l == nil {
			return false
		}
		evs, _, _, _ := l.Read(0, 100, nil)
		n := 0
		for _, e := range evs {
			if strings.Contains(string(e.Data), `"tag":"second"`) {
				n++
			}
		}
		return n == 5
	})
	if d := two.waitDispatch(sub.DispatchID, engine.StatusClaimed); d.AttemptCount != 0 {
		t.Fatalf("after the restart the dispatch is %+v, want attempt 1 again", d)
	}
	re := two.stream(req{method: "GET", path: "/v1/threads/rs/events", headers: []string{"Last-Event-ID", strconv.FormatUint(last, 10)}})
	head := re.next()
	// An id beyond the attempt (of another run, say): unknown_id, and the
	// replay from the attempt's first event, which the reset names.
	beyond := two.stream(req{method: "GET", path: "/v1/threads/rs/events", headers: []string{"Last-Event-ID", "99999999999999"}})
	bh, bf := beyond.next(), beyond.next()
	beyond.close()
	if bh.Event != "reset" || !strings.Contains(bh.Data, `"reason":"unknown_id"`) || !strings.Contains(bh.Data, `"oldest":`+bf.ID+`}`) || !strings.Contains(bf.Data, `"tag":"second","n":1}`) {
		t.Errorf("re-attached with an id beyond the attempt: %+v then %+v, want an unknown_id reset naming the first event, then that event", bh, bf)
	}
	two.call(req{method: "POST", path: "/v1/threads/rs/messages", body: `{"messages":[{"role":"user","content":"done"}]}`}, 200, nil)
	evs := append([]sseEvent{head}, re.rest()...)
	t.Logf("before the restart: %+v; re-attached with Last-Event-ID %d: %+v", seen, last, evs)
	var got []string
	prev := last
	for _, ev := range evs {
		if ev.Event == "reset" {
			continue
		}
		id, err := strconv.ParseUint(ev.ID, 10, 64)
		if err != nil || id <= prev {
			t.Errorf("event %+v: id not above %d (the previous one, or the last the client saw before the restart)", ev, prev)
		}
		prev = id
		if strings.Contains(ev.Data, `"tag":"second"`) {
			got = append(got, ev.Data[strings.Index(ev.Data, `"n":`):])
		}
	}
	if head.Event != "reset" && !strings.Contains(head.Data, `"tag":"second","n":1}`) {
		t.Errorf("re-attached with Last-Event-ID %d: first event %+v, neither a reset nor the new attempt's first event", last, head)
	}
	if head.Event == "reset" && (len(evs) < 2 || !strings.Contains(head.Data, `"oldest":`+evs[1].ID+`}`)) {
		t.Errorf("reset %s does not name the first event served (%+v)", head.Data, evs[1:])
	}
	if want := `"n":1} "n":2} "n":3} "n":4} "n":5}`; strings.Join(got, " ") != want {
		t.Fatalf("re-attached with Last-Event-ID %d: the new attempt's events %q, want %q — the skipped ones came with no reset", last, strings.Join(got, " "), want)
	}
	if evs[len(evs)-1].Event != "run_finish" {
		t.Fatalf("the stream did not end with run_finish: %+v", evs)
	}
}

// claimAsDeadProcess claims a queued dispatch and records its start under
// another consumer, as a sidecar killed while the run was going left it:
// the restarted sidecar has no event log of the run, and the claim holds
// until its lease lapses and a sweep reclaims it.
func claimAsDeadProcess(t *testing.T, sc *sidecar, dispatchID string, lease time.Duration) {
	t.Helper()
	ctx := context.Background()
	now := time.Now().UnixMilli()
	d, err := sc.store.ClaimDispatch(ctx, dispatchID, "killed-sidecar", lease, now)
	if err != nil || d == nil {
		t.Fatalf("claim: %v %v", d, err)
	}
	if err := sc.store.RecordDispatchStart(ctx, dispatchID, d.ClaimToken, "killed-attempt", now); err != nil {
		t.Fatal(err)
	}
}

// After a crash a client re-attaching to a run that was going follows its
// next attempt: the dispatch is claimed by the dead process until the
// sweep reclaims it, then runs here. It used to be told 404, no active
// run, as if the run had ended (found by review).
func TestReattachFollowsARunOfADeadProcess(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, engine: engine.Config{SweepInterval: 50 * time.Millisecond}})
	var q submitResult
	sc.call(req{method: "POST", path: "/v1/threads/dead/dispatches", body: submitBody("wait")}, 202, &q)
	claimAsDeadProcess(t, sc, q.DispatchID, time.Second)

	st := sc.stream(req{method: "GET", path: "/v1/threads/dead/events", headers: []string{"Last-Event-ID", "7"}})
	sc.agents = startAgent(t, sc.agentPath, nil, 0)
	if ev := st.next(); ev.Event != "reset" || !strings.Contains(ev.Data, `"expired"`) {
		t.Fatalf("first event %+v, want a reset (expired): the id is the dead attempt's, whose end this sidecar did not see", ev)
	}
	if ev := st.next(); ev.Event != "run_start" {
		t.Fatalf("the next attempt's first event: %+v", ev)
	}
	if ev := st.next(); !strings.Contains(ev.Data, "waiting") {
		t.Fatalf("the next attempt's second event: %+v", ev)
	}
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/dead/messages", body: `{"messages":[{"role":"user","content":"done"}]}`}, 200, &res)
	if res.RunID != q.RunID || res.Delivery != "live" {
		t.Fatalf("message: %+v", res)
	}
	rest := st.rest()
	if len(rest) == 0 || rest[len(rest)-1].Event != "run_finish" || !strings.Contains(rest[len(rest)-1].Data, "natural_end") {
		t.Fatalf("the stream ended with %s", types(rest))
	}
	if d := sc.waitDispatch(q.DispatchID, engine.StatusAcked); d.AttemptCount != 1 {
		t.Fatalf("dispatch %+v, want the dead attempt spent", d)
	}
}

// A run of a dead process that the sweep dead-letters (its last attempt
// spent) ends the stream of a client following it at once, with the
// error, not at the next GC (a minute by default).
func TestReattachToADeadLetteredRunOfADeadProcessEnds(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, engine: engine.Config{SweepInterval: 50 * time.Millisecond, MaxAttempts: 1}})
	var q submitResult
	sc.call(req{method: "POST", path: "/v1/threads/dl/dispatches", body: submitBody("wait")}, 202, &q)
	claimAsDeadProcess(t, sc, q.DispatchID, 500*time.Millisecond)
	st := sc.stream(req{method: "GET", path: "/v1/threads/dl/events"})
	if !st.ended(waitTimeout) {
		t.Fatal("the stream of a dead-lettered run is still open")
	}
	rest := st.rest()
	if len(rest) != 1 || rest[0].Event != "run_finish" || !strings.Contains(rest[0].Data, `"error"`) {
		t.Fatalf("the stream: %+v", rest)
	}
	sc.waitDispatch(q.DispatchID, engine.StatusDeadLetter)
}

// After a clean restart the run released by the shutdown (no attempt
// spent) is followed too, before an agent takes it again.
func TestReattachFollowsARunReleasedByARestart(t *testing.T) {
	dir := filepath.Join(shortDir(t), "data")
	one := newSidecar(t, options{diskPath: dir, handler: tagAgent{tag: "first", n: 1}})
	st := one.stream(req{method: "POST", path: "/v1/threads/rel/runs", body: submitBody("go")})
	sub := decode[submitResult](t, st.next().Data)
	st.next()
	one.stop(100 * time.Millisecond) // the attempt is released, not spent
	st.rest()

	two := newSidecar(t, options{diskPath: dir, noAgent: true})
	if d := two.waitDispatch(sub.DispatchID, engine.StatusQueued); d.AttemptCount != 0 {
		t.Fatalf("after the restart: %+v, want no attempt spent", d)
	}
	re := two.stream(req{method: "GET", path: "/v1/threads/rel/events"})
	two.agents = startAgent(t, two.agentPath, tagAgent{tag: "second", n: 1}, 0)
	if ev := re.next(); ev.Event != "text_delta" || !strings.Contains(ev.Data, `"second"`) {
		t.Fatalf("the next attempt's first event: %+v", ev)
	}
}
