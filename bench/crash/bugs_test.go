package crash

import (
	"context"
	"net/http"
	"net/url"
	"testing"
	"time"
)

// Deterministic reproductions of faults the crash harness found, each
// asserting the behaviour the sidecar promises (README.md of this
// directory has the analysis).

// TestWaitingRunContinuedByTwoSubmits: a run waits (its tool call got no
// decision); while no agent slot is free, two messages arrive on the
// thread. Each dispatch must execute its own message and, when acked,
// carry the outcome of an attempt that ran it. Found by TestCrashKillAgent
// (its kills leave continuations queued): both submits continued the same
// waiting run, the second overwriting the run's request, so the first
// dispatch executed the second message and the second dispatch, finding
// the run done, was acked without any attempt or outcome. Fixed in
// engine (02a9cf4): a waiting run with a continuation pending is not
// reused; the second message gets a run of its own.
func TestWaitingRunContinuedByTwoSubmits(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startSidecar()
	a := c.startAgent()
	c.waitAgentConnected(20 * time.Second)
	rec := newRecorder()
	w := newWorkload(rec, smallWorkload("wait2"), c.api)
	const th = "wait2-t"
	if err := w.background(th, Command{Nonce: w.newNonce(), Verb: VerbSuspend, Arg: 10}); err != nil {
		t.Fatal(err)
	}
	first := rec.all()[0]
	var d dispatch
	if !waitFor(10*time.Second, func() bool {
		d = dispatch{}
		return c.api.get("/v1/dispatches/"+url.PathEscape(first.ID), &d) == nil && d.Status == "acked"
	}) || d.RunStatus != "waiting" {
		t.Fatalf("the suspend run did not end waiting: %+v", d)
	}
	a.terminate(t, 20*time.Second) // no agent: the continuations stay queued
	c.waitAgentDisconnected(10 * time.Second)

	for _, cmd := range []Command{{Nonce: w.newNonce(), Verb: VerbDone}, {Nonce: w.newNonce(), Verb: VerbSleep, Arg: 10}} {
		if err := w.background(th, cmd); err != nil {
			t.Fatal(err)
		}
	}
	c.startAgent()
	all := rec.all()
	final := map[string]dispatch{}
	for _, x := range all[1:] {
		if !waitFor(20*time.Second, func() bool {
			d = dispatch{}
			return c.api.get("/v1/dispatches/"+url.PathEscape(x.ID), &d) == nil && terminal(d.Status)
		}) {
			t.Fatalf("dispatch %s not terminal: %+v", x.ID, d)
		}
		final[x.ID] = d
	}
	c.stopAll()
	entries, err := c.journals()
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range all[1:] {
		d := final[x.ID]
		if d.Status == "acked" && (d.RunStatus == "" || d.Termination == nil) {
			t.Errorf("dispatch %s (run %s, %q) is acked without a run outcome: %+v", x.ID, x.RunID, x.Cmd, d)
		}
		ran := 0
		for _, e := range entries {
			if e.Event == EventStart && e.DispatchID == x.ID {
				ran++
				if e.Command != x.Cmd.String() {
					t.Errorf("dispatch %s (run %s, accepted with %q) executed %q", x.ID, x.RunID, x.Cmd, e.Command)
				}
			}
		}
		if ran == 0 && d.Status == "acked" {
			t.Errorf("dispatch %s (run %s, %q) is acked, yet it never reached the agent", x.ID, x.RunID, x.Cmd)
		}
	}
}

// TestCancelOfRunningRunSurvivesCrash: a cancel answered cancelled:true
// for a running dispatch is final ("a cancel must not resurrect the
// run", engine/README.md) — also when the sidecar dies before the agent
// acknowledged it. The agent is frozen so that the cancel cannot be
// settled before the kill; after the restart the dispatch must not run
// again.
func TestCancelOfRunningRunSurvivesCrash(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startSidecar()
	a := c.startAgent()
	c.waitAgentConnected(20 * time.Second)
	rec := newRecorder()
	w := newWorkload(rec, smallWorkload("cxl"), c.api)
	d := submitLong(t, c, w, 1, func() Command { return Command{Nonce: w.newNonce(), Verb: VerbSleep, Arg: 3000} })[0]

	c.stopAgent(a) // it cannot answer the CANCEL before the kill
	var res struct {
		Cancelled bool `json:"cancelled"`
	}
	if err := c.api.do(context.Background(), http.MethodPost, "/v1/cancel/"+url.PathEscape(d.ID), nil, &res); err != nil || !res.Cancelled {
		t.Fatalf("cancel of the running dispatch: %+v %v", res, err)
	}
	cancelled := time.Now().UnixNano()
	rec.sidecarKilled(c.api)
	c.killSidecar()
	c.contAgent(a)
	c.startSidecar()

	var got dispatch
	if !waitFor(20*time.Second, func() bool {
		got = dispatch{}
		return c.api.get("/v1/dispatches/"+url.PathEscape(d.ID), &got) == nil && terminal(got.Status)
	}) {
		t.Fatalf("dispatch %s not terminal after the restart: %+v", d.ID, got)
	}
	c.stopAll()
	for _, s := range c.startsOf(d.ID) {
		if s.StartNs > cancelled {
			t.Errorf("dispatch %s, cancelled (cancelled:true) at %v, ran again after the restart: attempt %d started %v", d.ID, ts(cancelled), s.Attempt, ts(s.StartNs))
		}
	}
	if got.Status != "cancelled" && (got.Termination == nil || got.Termination.Type != "cancelled") {
		t.Errorf("cancelled dispatch %s ended %s with termination %v, not cancelled", d.ID, got.Status, got.Termination)
	}
}
