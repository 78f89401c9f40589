package proxy_test

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// retryAgent: attempt 1 emits three events and fails transiently; attempt
// 2 emits six events, signals, and waits for a live message.
type retryAgent struct{ second chan struct{} }

func (a retryAgent) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	n := 3
	if run.Attempt > 1 {
		n = 6
	}
	for i := 1; i <= n; i++ {
		run.EmitRaw([]byte(`{"type":"text_delta","attempt":` + strconv.Itoa(run.Attempt) + `,"n":` + strconv.Itoa(i) + `}`))
	}
	if run.Attempt == 1 {
		return agent.Transient("flaky", "first attempt fails")
	}
	msgs := run.Messages()
	close(a.second)
	select {
	case <-ctx.Done():
		return agent.Cancelled()
	case <-msgs:
		return agent.Done("ok")
	}
}

// spec/http.md, Events: ids are the run-local sequence, and a client that
// reconnects with Last-Event-ID "misses nothing still buffered". A run
// that was retried used to restart its ids at 1 on the new attempt, so a
// client that re-attached with the last id it saw (from attempt 1) was
// silently served attempt 2 from the middle: its first events were
// skipped without a reset.
func TestReattachAfterRetryMissesNothing(t *testing.T) {
	t.Parallel()
	ra := retryAgent{second: make(chan struct{})}
	sc := newSidecar(t, options{handler: ra})
	st := sc.stream(req{method: "POST", path: "/v1/threads/retry/runs", body: submitBody("go")})
	st.next() // submitted
	evs := st.rest()
	last := evs[len(evs)-1]
	t.Logf("attempt 1 stream: %s, last id %s", types(evs), last.ID)
	<-ra.second // attempt 2 has emitted its six events and waits
	eventually(t, "attempt 2's six events reached the sidecar", func() bool {
		l := sc.mb.Reattach("retry")
		return l != nil && l.LastSeq() >= 6
	})
	re := sc.stream(req{method: "GET", path: "/v1/threads/retry/events", headers: []string{"Last-Event-ID", last.ID}})
	first := re.next()
	t.Logf("re-attached: first event id=%q event=%q data=%s", first.ID, first.Event, first.Data)
	sc.call(req{method: "POST", path: "/v1/threads/retry/messages", body: `{"messages":[{"role":"user","content":"done"}]}`}, 200, nil)
	rest := re.rest()
	// Attempt 2's ids are above attempt 1's (engine/README.md, "Event
	// ids"), and this sidecar saw attempt 1 end at last: no reset.
	if first.Event != "reset" && !(mustAtoi(first.ID) > mustAtoi(last.ID) && contains(first.Data, `"attempt":2,"n":1`)) {
		t.Fatalf("re-attached after the retry with Last-Event-ID %s: first event id %s %s (%s), no reset: attempt 2's earlier events were skipped; rest %s",
			last.ID, first.ID, first.Event, first.Data, types(rest))
	}
}

func mustAtoi(s string) int { n, _ := strconv.Atoi(s); return n }

func contains(s, sub string) bool {
	return len(sub) == 0 || len(s) >= len(sub) && (func() bool {
		for i := 0; i+len(sub) <= len(s); i++ {
			if s[i:i+len(sub)] == sub {
				return true
			}
		}
		return false
	})()
}

// flakyOnce fails its first run transiently after one event and runs the
// retry to its end.
type flakyOnce struct{ runs *atomic.Int32 }

func (a flakyOnce) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	if a.runs.Add(1) == 1 {
		run.EmitRaw([]byte(`{"type":"text_delta","tag":"first"}`))
		return agent.Transient("flaky", "the model timed out")
	}
	run.EmitRaw([]byte(`{"type":"text_delta","tag":"retry"}`))
	return agent.Done("ok")
}

// A foreground client whose run failed transiently reads a run_finish
// naming the retry (retry_at) and re-attaches with its id: it follows the
// retry without a reset, to the retry's own run_finish (found by review:
// the retry ran unseen, and a re-attachment replayed the failed end).
func TestAClientFollowsARetryAfterItsRunFinish(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{handler: flakyOnce{runs: new(atomic.Int32)}, engine: engine.Config{RetryDelay: 300 * time.Millisecond, MaxRetryDelay: 300 * time.Millisecond}})
	st := sc.stream(req{method: "POST", path: "/v1/threads/flaky/runs", body: submitBody("go")})
	first := st.rest()
	fin := first[len(first)-1]
	if fin.Event != "run_finish" || !strings.Contains(fin.Data, `"retry_at":`) {
		t.Fatalf("the failed attempt's stream: %s %+v", types(first), fin)
	}
	re := sc.stream(req{method: "GET", path: "/v1/threads/flaky/events", headers: []string{"Last-Event-ID", fin.ID}})
	rest := re.rest()
	if types(rest) != "text_delta,run_finish" || !strings.Contains(rest[0].Data, `"retry"`) || strings.Contains(rest[1].Data, "retry_at") {
		t.Fatalf("followed the retry: %+v", rest)
	}
	if mustAtoi(rest[0].ID) <= mustAtoi(fin.ID) {
		t.Fatalf("the retry's first id %s is not above %s", rest[0].ID, fin.ID)
	}
}

// flakyTwice fails its first two runs transiently after one event each.
type flakyTwice struct{ runs *atomic.Int32 }

func (a flakyTwice) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	if a.runs.Add(1) <= 2 {
		run.EmitRaw([]byte(`{"type":"text_delta","tag":"attempt"}`))
		return agent.Transient("flaky", "the model timed out")
	}
	return agent.Done("ok")
}

// A client following a run's retries, at the end of its second attempt
// (ids above 2³²), whose retry is then cancelled before it starts, is told
// how the run ended: its stream ends with the cancellation's run_finish
// (found by review: that run_finish was numbered in the first band, below
// the client's id, and the stream ended with nothing).
func TestACancelledRetryEndsTheStreamFollowingIt(t *testing.T) {
	t.Parallel()
	// The retry's delay leaves the test time to cancel it before it starts,
	// under load too.
	sc := newSidecar(t, options{handler: flakyTwice{runs: new(atomic.Int32)}, engine: engine.Config{RetryDelay: 2 * time.Second, MaxRetryDelay: 2 * time.Second}})
	st := sc.stream(req{method: "POST", path: "/v1/threads/flaky/runs", body: submitBody("go")})
	first := st.rest()
	re := sc.stream(req{method: "GET", path: "/v1/threads/flaky/events", headers: []string{"Last-Event-ID", first[len(first)-1].ID}})
	second := re.rest()
	fin2 := second[len(second)-1]
	if fin2.Event != "run_finish" || !strings.Contains(fin2.Data, "retry_at") || mustAtoi(fin2.ID) < 1<<32 {
		t.Fatalf("attempt 2: %+v", second)
	}
	re2 := sc.stream(req{method: "GET", path: "/v1/threads/flaky/events", headers: []string{"Last-Event-ID", fin2.ID}})
	ds, _ := sc.mb.ListDispatches(context.Background(), "flaky", engine.StatusFilter{engine.StatusQueued}, 0, 0)
	if len(ds) != 1 {
		t.Fatalf("queued: %+v", ds)
	}
	if ok, err := sc.mb.Cancel(context.Background(), ds[0].DispatchID); !ok || err != nil {
		t.Fatalf("cancel %v %v", ok, err)
	}
	rest := re2.rest()
	if len(rest) == 0 || rest[len(rest)-1].Event != "run_finish" || !strings.Contains(rest[len(rest)-1].Data, `"cancelled"`) {
		t.Fatalf("after the cancel the stream got %+v, want it to end with the cancellation's run_finish", rest)
	}
}
