package proxy_test

import "testing"

// proxy/doc.go: "List pages: limit 1..∞ (capped at 1000, default 50) …
// limit=0, a negative or non-numeric value is a validation error". A
// positive limit beyond int64 is capped like any other, not refused.
func TestHugeLimitIsCapped(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true})
	for _, p := range []string{"/v1/dead-letters?limit=99999999999999999999", "/v1/threads/t/dispatches?limit=99999999999999999999"} {
		resp, b := sc.do(req{method: "GET", path: p})
		if resp.StatusCode != 200 {
			t.Errorf("GET %s: %d %s, want 200 (capped at 1000)", p, resp.StatusCode, b)
		}
	}
}
