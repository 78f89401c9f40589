package proxy_test

import (
	"fmt"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// spec/http.md, Errors: "A request that fails leaves no partial state
// behind: nothing half-written". POST /v1/threads/{t}/messages whose
// run_id / dispatch_id hint is refused (400 / 409) must not leave its
// messages in the thread log.
func TestFailedLiveMessagesLeaveNothingBehind(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	var first submitResult
	sc.call(req{method: "POST", path: "/v1/threads/owner/dispatches",
		body: `{"messages":[{"role":"user","content":"x"}],"run_id":"r-taken","dispatch_id":"d-taken"}`}, 202, &first)
	sc.waitDispatch(first.DispatchID, engine.StatusAcked)
	for _, c := range []struct {
		name, body string
		status     int
	}{
		{"run_id of another thread", `{"messages":[{"role":"user","content":"hi"}],"run_id":"r-taken"}`, 400},
		{"dispatch_id taken", `{"messages":[{"role":"user","content":"hi"}],"dispatch_id":"d-taken"}`, 409},
	} {
		before := sc.counts()
		resp, b := sc.do(req{method: "POST", path: "/v1/threads/other/messages", body: c.body})
		if resp.StatusCode != c.status {
			t.Fatalf("%s: status %d %s, want %d", c.name, resp.StatusCode, b, c.status)
		}
		after := sc.counts()
		_, log := sc.do(req{method: "GET", path: "/v1/threads/other/messages"})
		if fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("%s: failed request (%d) left state behind: before %+v, after %+v; thread log %s",
				c.name, resp.StatusCode, before, after, log)
		}
	}
}
