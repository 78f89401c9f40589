package proxy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Past MaxQueued queued dispatches a background submit is answered 503
// unavailable with Retry-After, and nothing is queued; a repeat of an
// earlier submit by its dedupe key still answers that submit, one of its
// dispatch or run id is refused as a repeat (409), and
// live-then-queue messages are still taken.
func TestBackgroundSubmitsPastTheQueueBoundAreRefused(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, engine: engine.Config{MaxQueued: 2}})
	submit := func(thread, key string) (int, string, string) {
		body := fmt.Sprintf(`{"messages":[{"role":"user","content":"hi"}],"dedupe_key":%q}`, key)
		resp, b := sc.do(req{method: "POST", path: "/v1/threads/" + thread + "/dispatches", body: body})
		return resp.StatusCode, resp.Header.Get("Retry-After"), string(b)
	}
	var firstAnswer string
	for i := range 2 {
		status, _, b := submit(fmt.Sprint("t", i), fmt.Sprint("k", i))
		if status != 202 {
			t.Fatalf("submit %d within the bound: %d %s", i, status, b)
		}
		if i == 0 {
			firstAnswer = b
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
	// A repeat of a caller's dispatch or run id hint is answered as below
	// the bound, 409: a retry could never succeed.
	hinted := func(field, id string) (int, string) {
		resp, b := sc.do(req{method: "POST", path: "/v1/threads/t0/dispatches",
			body: fmt.Sprintf(`{"messages":[{"role":"user","content":"hi"}],%q:%q}`, field, id)})
		return resp.StatusCode, string(b)
	}
	var first struct {
		DispatchID string `json:"dispatch_id"`
		RunID      string `json:"run_id"`
	}
	if err := json.Unmarshal([]byte(firstAnswer), &first); err != nil || first.DispatchID == "" {
		t.Fatalf("first answer %s: %v", firstAnswer, err)
	}
	if status, b := hinted("dispatch_id", first.DispatchID); status != 409 || !strings.Contains(b, `"code":"conflict"`) {
		t.Fatalf("a repeated dispatch_id past the bound: %d %s", status, b)
	}
	if status, b := hinted("run_id", first.RunID); status != 409 || !strings.Contains(b, `"code":"conflict"`) {
		t.Fatalf("a repeated run_id past the bound: %d %s", status, b)
	}
	if status, b := hinted("dispatch_id", "0193aaaa-0000-7000-8000-000000000001"); status != 503 {
		t.Fatalf("a new dispatch_id past the bound: %d %s", status, b)
	}
	resp, mb := sc.do(req{method: "POST", path: "/v1/threads/t3/messages", body: `{"messages":[{"role":"user","content":"hi"}]}`})
	if resp.StatusCode != 200 || !strings.Contains(string(mb), `"delivery":"queued"`) {
		t.Fatalf("a message past the bound: %d %s", resp.StatusCode, mb)
	}
	if got := metricLine(sc.metricsOf(), "mailbox_queue_full_total "); got != "mailbox_queue_full_total 2" {
		t.Fatalf("metric %q", got)
	}
	c, err := sc.store.CountByStatus(context.Background())
	if err != nil || c.Get(engine.StatusQueued) != 3 {
		t.Fatalf("queued %d (%v), want the two submits and the message's run", c.Get(engine.StatusQueued), err)
	}
}
