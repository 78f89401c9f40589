package proxy_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// gatedRetryAgent: attempt 1 emits three events and fails transiently;
// attempt 2 signals started, then emits nothing until release, then three
// events, and finishes.
type gatedRetryAgent struct{ started, release chan struct{} }

func (a gatedRetryAgent) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	if run.Attempt == 1 {
		for i := 1; i <= 3; i++ {
			run.EmitRaw([]byte(`{"type":"text_delta","attempt":1,"n":` + strconv.Itoa(i) + `}`))
		}
		return agent.Transient("flaky", "first attempt fails")
	}
	close(a.started)
	select {
	case <-ctx.Done():
		return agent.Cancelled()
	case <-a.release:
	}
	for i := 1; i <= 3; i++ {
		run.EmitRaw([]byte(`{"type":"text_delta","attempt":2,"n":` + strconv.Itoa(i) + `}`))
	}
	return agent.Done("ok")
}

// spec/http.md, Events: a client re-attaching with a Last-Event-ID it
// cannot be served from gets one `event: reset` and the events from the
// oldest held; slow_subscriber is for a stream that fell behind while
// live. A client that saw only the first event of attempt 1 re-attaches
// while attempt 2 has started but not emitted yet. Its id is from before
// attempt 2's log (an earlier attempt's), so EventLog.Read reported a
// reset on every read while the log was empty: the stream sent an
// `expired` reset naming an event that does not exist (oldest = its own
// id + 1), then, at attempt 2's first event, a second reset —
// slow_subscriber — and cut the stream off (counted as a dropped slow
// subscriber) without sending a single event.
func TestReattachWithAnEarlierAttemptsIDBeforeTheNextAttemptEmits(t *testing.T) {
	t.Parallel()
	a := gatedRetryAgent{started: make(chan struct{}), release: make(chan struct{})}
	sc := newSidecar(t, options{handler: a, proxy: proxyConfig(20 * time.Millisecond)})
	st := sc.stream(req{method: "POST", path: "/v1/threads/gated/runs", body: submitBody("go")})
	st.next() // submitted
	first := st.next()
	if !strings.Contains(first.Data, `"attempt":1,"n":1`) {
		t.Fatalf("attempt 1's first event: %+v", first)
	}
	st.rest() // the client keeps only the id of the first event it saw
	<-a.started
	re := sc.stream(req{method: "GET", path: "/v1/threads/gated/events", headers: []string{"Last-Event-ID", first.ID}})
	// A ping is written only while the stream waits for the log: it has
	// read attempt 2's log while it was still empty.
	select {
	case <-re.pings:
	case <-time.After(waitTimeout):
		t.Fatal("no ping on the re-attached stream")
	}
	close(a.release)
	evs := re.rest()
	t.Logf("re-attached with Last-Event-ID %s: %+v", first.ID, evs)
	if len(evs) == 0 {
		t.Fatal("the re-attached stream ended without an event")
	}
	resets, got := 0, 0
	for i, ev := range evs {
		switch {
		case ev.Event == "reset":
			resets++
			if !strings.Contains(ev.Data, `"reason":"expired"`) || i+1 >= len(evs) || !strings.Contains(ev.Data, `"oldest":`+evs[i+1].ID+`}`) {
				t.Errorf("reset %s: want an expired reset naming the next event served (%+v)", ev.Data, evs[i+1:])
			}
		case strings.Contains(ev.Data, `"attempt":2`):
			got++
		}
	}
	if resets != 1 || got != 3 || evs[len(evs)-1].Event != "run_finish" {
		t.Fatalf("re-attached with attempt 1's id %s before attempt 2 emitted: %d resets, %d of attempt 2's 3 events; want one reset, all three, then run_finish: %s",
			first.ID, resets, got, types(evs))
	}
}
