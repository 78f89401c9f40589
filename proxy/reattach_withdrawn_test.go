package proxy_test

import (
	"strings"
	"testing"
	"time"
)

// A client re-attached to a queued foreground run (GET …/events) whose
// dispatch is then withdrawn gets the run_finish the submitter gets (the
// stream used to just end, empty; found by review).
func TestReattachToAWithdrawnQueuedRun(t *testing.T) {
	sc := newSidecar(t, options{maxRuns: 1, proxy: proxyConfig(20 * time.Millisecond)})
	busy := sc.stream(req{method: "POST", path: "/v1/threads/busy/runs", body: submitBody("wait")})
	busy.next()
	busy.next()
	busy.next()
	q := sc.stream(req{method: "POST", path: "/v1/threads/q/runs", body: submitBody("never")})
	if sub := decode[submitResult](t, q.next().Data); sub.Status != "queued" {
		t.Fatalf("submitted %+v", sub)
	}
	r := sc.stream(req{method: "GET", path: "/v1/threads/q/events"})
	sc.call(req{method: "POST", path: "/v1/threads/q/interrupt"}, 200, nil)
	qevs := q.rest()
	revs := r.rest()
	sc.call(req{method: "POST", path: "/v1/threads/busy/messages", body: `{"messages":[{"role":"user","content":"done"}]}`}, 200, nil)
	busy.rest()
	if types(qevs) != "run_finish" || types(revs) != "run_finish" {
		t.Fatalf("submitter's stream: %q; re-attached stream: %q (%+v) — want run_finish on both", types(qevs), types(revs), revs)
	}
	if qevs[0].Data != revs[0].Data || !strings.Contains(revs[0].Data, `"cancelled"`) {
		t.Fatalf("run_finish: submitter %s, re-attached %s; want the same, cancelled", qevs[0].Data, revs[0].Data)
	}
}
