package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Past MaxQueued queued dispatches a background submit is answered 503
// unavailable with Retry-After, and nothing is queued; a repeat of an
// earlier submit by its dedupe key still answers that submit, and
// live-then-queue messages are still taken.
func TestBackgroundSubmitsPastTheQueueBoundAreRefused(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, engine: engine.Config{MaxQueued: 2}})
	submit := func(thread, key string) (int, string, string) {
		body := fmt.Sprintf(`{"messages":[{"role":"user","content":"hi"}],"dedupe_key":%q}`, key)
		resp, b := sc.do(req{method: "POST", path: "/v1/threads/" + thread + "/dispatches", body: body})
		return resp.StatusCode, resp.Header.Get("Retry-After"), string(b)
	}
	for i := range 2 {
		if status, _, b := submit(fmt.Sprint("t", i), fmt.Sprint("k", i)); status != 202 {
			t.Fatalf("submit %d within the bound: %d %s", i, status, b)
		}
	}
	// The queue's count is at most a second old.
	time.Sleep(1100 * time.Millisecond)
	status, retry, b := submit("t2", "k2")
	if status != 503 || retry != "1" || !strings.Contains(b, `"code":"unavailable"`) || !strings.Contains(b, "queue full") {
		t.Fatalf("a submit past the bound: %d, Retry-After %q, %s", status, retry, b)
	}
	if status, _, b := submit("t0", "k0"); status != 202 {
		t.Fatalf("a repeat by its dedupe key past the bound: %d %s", status, b)
	}
	if status, _, b := submit("t0", "k0"); status != 202 {
		t.Fatalf("a repeat by its dedupe key past the bound: %d %s", status, b)
	}
	resp, mb := sc.do(req{method: "POST", path: "/v1/threads/t3/messages", body: `{"messages":[{"role":"user","content":"hi"}]}`})
	if resp.StatusCode != 200 || !strings.Contains(string(mb), `"delivery":"queued"`) {
		t.Fatalf("a message past the bound: %d %s", resp.StatusCode, mb)
	}
	if got := metricLine(sc.metricsOf(), "mailbox_queue_full_total "); got != "mailbox_queue_full_total 1" {
		t.Fatalf("metric %q", got)
	}
	c, err := sc.store.CountByStatus(context.Background())
	if err != nil || c.Get(engine.StatusQueued) != 3 {
		t.Fatalf("queued %d (%v), want the two submits and the message's run", c.Get(engine.StatusQueued), err)
	}
}
