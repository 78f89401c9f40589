package proxy_test

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

const msg = `"messages":[{"role":"user","content":"x"}]`

// Every bad request is answered with its status and error code in the
// one error shape, and leaves nothing behind in the store.
func TestBadRequests(t *testing.T) {
	t.Parallel()
	const maxBody = 16 << 10
	sc := newSidecar(t, options{tcp: true, proxy: proxy.Config{AuthToken: "tok", MaxBody: maxBody}})
	before := sc.counts()
	long := strings.Repeat("a", 257)
	big := `{` + msg + `,"overrides":{"pad":"` + strings.Repeat("x", maxBody) + `"}}`
	cases := []struct {
		name   string
		r      req
		status int
		code   string
		allow  string
	}{
		{"malformed JSON", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":[`}, 400, "validation", ""},
		{"empty body", req{method: "POST", path: "/v1/threads/t/runs"}, 400, "validation", ""},
		{"array body", req{method: "POST", path: "/v1/threads/t/dispatches", body: `[]`}, 400, "validation", ""},
		{"null body", req{method: "POST", path: "/v1/threads/t/dispatches", body: `null`}, 400, "validation", ""},
		{"trailing garbage", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{` + msg + `} x`}, 400, "validation", ""},
		{"messages not an array", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":"hi"}`}, 400, "validation", ""},
		{"message not an object", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":["hi"]}`}, 400, "validation", ""},
		{"priority a string", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{` + msg + `,"priority":"high"}`}, 400, "validation", ""},
		{"priority out of range", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{` + msg + `,"priority":300}`}, 400, "validation", ""},
		{"priority negative", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{` + msg + `,"priority":-1}`}, 400, "validation", ""},
		{"thread_id a number", req{method: "POST", path: "/v1/runs", body: `{` + msg + `,"thread_id":7}`}, 400, "validation", ""},
		{"no messages", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":[]}`}, 400, "validation", ""},
		{"no fields", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{}`}, 400, "validation", ""},
		{"message without role", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":[{"content":"x"}]}`}, 400, "validation", ""},
		{"unknown role", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":[{"role":"robot","content":"x"}]}`}, 400, "validation", ""},
		{"unknown visibility", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":[{"role":"user","visibility":"secret"}]}`}, 400, "validation", ""},
		{"duplicate message ids", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":[{"id":"m1","role":"user"},{"id":"m1","role":"user"}]}`}, 400, "validation", ""},
		{"message id with a control character", req{method: "POST", path: "/v1/threads/t/runs", body: `{"messages":[{"id":"m\u0001","role":"user"}]}`}, 400, "validation", ""},
		{"content not UTF-8", req{method: "POST", path: "/v1/threads/t/runs", body: "{\"messages\":[{\"role\":\"user\",\"content\":\"a\xffb\"}]}"}, 400, "validation", ""},
		{"overrides not UTF-8", req{method: "POST", path: "/v1/threads/t/dispatches", body: "{" + msg + ",\"overrides\":{\"k\":\"\xc3\"}}"}, 400, "validation", ""},
		{"unknown origin", req{method: "POST", path: "/v1/threads/t/runs", body: `{` + msg + `,"origin":"martian"}`}, 400, "validation", ""},
		{"unknown run_mode", req{method: "POST", path: "/v1/threads/t/runs", body: `{` + msg + `,"run_mode":"turbo"}`}, 400, "validation", ""},
		{"frontend_tools an object", req{method: "POST", path: "/v1/threads/t/runs", body: `{` + msg + `,"frontend_tools":{}}`}, 400, "validation", ""},
		{"overrides an array", req{method: "POST", path: "/v1/threads/t/runs", body: `{` + msg + `,"overrides":[]}`}, 400, "validation", ""},
		{"decision without call_id", req{method: "POST", path: "/v1/threads/t/runs", body: `{"decisions":[{"resume":1}]}`}, 400, "validation", ""},
		{"body thread differs from path", req{method: "POST", path: "/v1/threads/t/runs", body: `{` + msg + `,"thread_id":"other"}`}, 400, "validation", ""},
		{"body thread with a slash", req{method: "POST", path: "/v1/runs", body: `{` + msg + `,"thread_id":"a/b"}`}, 400, "validation", ""},
		{"run_id hint with a space", req{method: "POST", path: "/v1/threads/t/runs", body: `{` + msg + `,"run_id":"a b"}`}, 400, "validation", ""},
		{"continue_run_id too long", req{method: "POST", path: "/v1/threads/t/runs", body: `{` + msg + `,"continue_run_id":"` + long + `"}`}, 400, "validation", ""},
		{"bad id in path", req{method: "POST", path: "/v1/threads/a$b/runs", body: `{` + msg + `}`}, 400, "validation", ""},
		{"encoded slash in path id", req{method: "POST", path: "/v1/threads/a%2Fb/dispatches", body: `{` + msg + `}`}, 400, "validation", ""},
		{"dot-dot path id", req{method: "POST", path: "/v1/threads/%2e%2e/messages", body: `{` + msg + `}`}, 400, "validation", ""},
		{"dot body thread", req{method: "POST", path: "/v1/runs", body: `{` + msg + `,"thread_id":"."}`}, 400, "validation", ""},
		{"path id too long", req{method: "POST", path: "/v1/threads/" + long + "/runs", body: `{` + msg + `}`}, 400, "validation", ""},
		{"empty path id", req{method: "GET", path: "/v1/runs/"}, 400, "validation", ""},
		{"compressed body", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{` + msg + `}`, headers: []string{"Content-Encoding", "gzip"}}, 400, "validation", ""},
		{"lone surrogate escape", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{"messages":[{"role":"user","content":"a\ud800b"}]}`}, 400, "validation", ""},
		{"Idempotency-Key too long", req{method: "POST", path: "/v1/threads/t/dispatches", body: `{` + msg + `}`, headers: []string{"Idempotency-Key", long}}, 400, "validation", ""},
		{"body over the limit", req{method: "POST", path: "/v1/threads/t/dispatches", body: big}, 413, "too_large", ""},
		{"live message wrong type", req{method: "POST", path: "/v1/threads/t/messages", body: `{"messages":{}}`}, 400, "validation", ""},
		{"expected_run_id bad", req{method: "POST", path: "/v1/threads/t/messages", body: `{` + msg + `,"expected_run_id":"a b"}`}, 400, "validation", ""},
		{"decision without tool_call_id", req{method: "POST", path: "/v1/runs/r/decisions", body: `{"resume":true}`}, 400, "validation", ""},
		{"decision tool_call_id a number", req{method: "POST", path: "/v1/runs/r/decisions", body: `{"tool_call_id":5}`}, 400, "validation", ""},
		{"decision resume not UTF-8", req{method: "POST", path: "/v1/runs/r/decisions", body: "{\"tool_call_id\":\"c\",\"resume\":\"\xff\"}"}, 400, "validation", ""},
		{"unknown route", req{method: "GET", path: "/v1/nope"}, 404, "not_found", ""},
		{"unknown version", req{method: "POST", path: "/v2/runs", body: `{` + msg + `}`}, 404, "not_found", ""},
		{"too deep", req{method: "GET", path: "/v1/threads/t/events/x/y/z"}, 404, "not_found", ""},
		{"GET on a submit", req{method: "GET", path: "/v1/threads/t/runs"}, 405, "method_not_allowed", "POST"},
		{"DELETE a run", req{method: "DELETE", path: "/v1/runs/r1"}, 405, "method_not_allowed", "GET, HEAD"},
		{"PUT dispatches", req{method: "PUT", path: "/v1/threads/t/dispatches", body: `{}`}, 405, "method_not_allowed", "GET, HEAD, POST"},
		{"GET cancel", req{method: "GET", path: "/v1/cancel/x"}, 405, "method_not_allowed", "POST"},
		{"limit not a number", req{method: "GET", path: "/v1/threads/t/dispatches?limit=abc"}, 400, "validation", ""},
		{"limit zero", req{method: "GET", path: "/v1/threads/t/dispatches?limit=0"}, 400, "validation", ""},
		{"limit negative", req{method: "GET", path: "/v1/dead-letters?limit=-5"}, 400, "validation", ""},
		{"offset negative", req{method: "GET", path: "/v1/threads/t/dispatches?offset=-1"}, 400, "validation", ""},
		{"offset fractional", req{method: "GET", path: "/v1/dead-letters?offset=1.5"}, 400, "validation", ""},
		{"unknown status", req{method: "GET", path: "/v1/threads/t/dispatches?status=running"}, 400, "validation", ""},
		{"status with an empty item", req{method: "GET", path: "/v1/threads/t/dispatches?status=queued,"}, 400, "validation", ""},
		{"after_seq not a number", req{method: "GET", path: "/v1/threads/t/messages?after_seq=x"}, 400, "validation", ""},
		{"Last-Event-ID not a number", req{method: "GET", path: "/v1/threads/t/events", headers: []string{"Last-Event-ID", "abc"}}, 400, "validation", ""},
		{"after not a number", req{method: "GET", path: "/v1/threads/t/events?after=-1"}, 400, "validation", ""},
		{"events of an idle thread", req{method: "GET", path: "/v1/threads/t/events"}, 404, "not_found", ""},
		{"unknown run", req{method: "GET", path: "/v1/runs/nope"}, 404, "not_found", ""},
		{"headers over 4 KiB", req{method: "GET", path: "/livez", headers: []string{"X-Pad", strings.Repeat("p", 5000)}}, 431, "too_large", ""},
		{"unknown dispatch", req{method: "GET", path: "/v1/dispatches/nope"}, 404, "not_found", ""},
		{"requeue unknown dispatch", req{method: "POST", path: "/v1/dispatches/nope/requeue"}, 404, "not_found", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, b, err := tryDo(sc.client, base, c.r)
			for try := 1; err != nil && c.status == 413 && try < 3; try++ {
				// The server answers 413 as soon as it has read the
				// headers and closes; the client may still be writing the
				// body and see the close first. Another try reads the
				// answer.
				resp, b, err = tryDo(sc.client, base, c.r)
			}
			if err != nil {
				t.Fatal(err)
			}
			checkError(t, resp, b, c.status, c.code)
			if strings.Contains(string(b), "ppppp") || strings.Contains(string(b), "buffer") {
				t.Errorf("the answer quotes the request or fasthttp's options: %s", b)
			}
			if c.allow != "" && resp.Header.Get("Allow") != c.allow {
				t.Errorf("Allow %q, want %q", resp.Header.Get("Allow"), c.allow)
			}
		})
	}

	// TCP: every request needs the bearer token.
	tcp := "http://" + sc.tcpAddr
	for _, c := range []struct {
		name string
		auth []string
	}{
		{"no token", nil},
		{"wrong token", []string{"Authorization", "Bearer nope"}},
		{"token prefix", []string{"Authorization", "Bearer to"}},
		{"basic scheme", []string{"Authorization", "Basic dG9r"}},
		{"bare token", []string{"Authorization", "tok"}},
	} {
		t.Run("tcp "+c.name, func(t *testing.T) {
			resp, b := doWith(t, sc.tcpClient, tcp, req{method: "POST", path: "/v1/threads/t/dispatches", body: `{` + msg + `}`, headers: c.auth})
			checkError(t, resp, b, 401, "unauthorized")
		})
	}
	// Refused requests count under their route; an unknown path without
	// a token is refused too (a 404 would tell what exists).
	t.Run("tcp refusals counted under their route", func(t *testing.T) {
		resp, b := doWith(t, sc.tcpClient, tcp, req{method: "GET", path: "/v1/no/such/route"})
		checkError(t, resp, b, 401, "unauthorized")
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		want := `mailbox_http_requests_total{route="/v1/threads/{thread_id}/dispatches",code="401"} 5`
		if !strings.Contains(string(m), want+"\n") || !strings.Contains(string(m), `mailbox_http_requests_total{route="unmatched",code="401"} 1`+"\n") {
			t.Fatalf("want %s and one unmatched 401 in:\n%s", want, grep(string(m), "401"))
		}
	})

	// A body announced larger than the limit is refused before it is read.
	t.Run("announced body over the limit", func(t *testing.T) {
		conn, err := net.Dial("unix", sc.apiPath)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "POST /v1/threads/t/runs HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{", 1<<30)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		bufio.NewReader(resp.Body).WriteTo(&b)
		checkError(t, resp, []byte(b.String()), 413, "too_large")
	})

	after := sc.counts()
	if fmt.Sprint(after) != fmt.Sprint(before) || after.Dispatches != 0 || after.Runs != 0 || after.Messages != 0 || after.Threads != 0 {
		t.Fatalf("bad requests left state behind: before %+v, after %+v", before, after)
	}
	// Nothing was queued or claimed behind the store's back either.
	if _, b := sc.do(req{method: "GET", path: "/v1/dead-letters"}); string(b) != `{"items":[],"next_offset":null}` {
		t.Fatalf("dead letters %s", b)
	}
}

func checkError(t *testing.T, resp *http.Response, b []byte, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d: %s", resp.StatusCode, status, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	var e apiErr
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("error body %s: %v", b, err)
	}
	if e.Error.Code != code || e.Error.Message == "" {
		t.Fatalf("error %+v, want code %s", e, code)
	}
}

// HEAD is answered as GET without the body, except on an event stream
// (RFC 9110 §9.3.2; a review found 405 on every GET route).
func TestHeadIsGetWithoutTheBody(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	for _, c := range []struct {
		path   string
		status int
		allow  string
	}{
		{"/livez", 200, ""},
		{"/v1/runs/nope", 404, ""},
		{"/v1/threads/t/dispatches", 200, ""},
		{"/v1/threads/t/events", 405, "GET"},
	} {
		resp, b, err := tryDo(sc.client, base, req{method: "HEAD", path: c.path})
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != c.status || len(b) != 0 || resp.Header.Get("Allow") != c.allow {
			t.Errorf("HEAD %s: %d, %d body bytes, Allow %q; want %d, none, %q", c.path, resp.StatusCode, len(b), resp.Header.Get("Allow"), c.status, c.allow)
		}
		if c.status == 200 && resp.ContentLength <= 0 {
			t.Errorf("HEAD %s: Content-Length %d; want the GET's", c.path, resp.ContentLength)
		}
	}
}
