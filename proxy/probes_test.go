package proxy_test

import (
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// /livez, /readyz (alias /healthz) and /metrics on the API socket, the
// admin listener (which serves nothing else) and the TCP listener (which
// needs the bearer token).
func TestProbesAndMetrics(t *testing.T) {
	t.Parallel()
	var ready atomic.Bool
	ready.Store(true)
	var sc *sidecar
	sc = newSidecar(t, options{tcp: true, admin: true, proxy: proxy.Config{AuthToken: "s3cret"}, ready: func() proxy.Readiness {
		return proxy.Readiness{Ready: ready.Load(), Checks: map[string]bool{"recovered": true, "store_writable": ready.Load()}, AgentConnected: sc.hub.Capacity() > 0}
	}})
	resp, b := sc.do(req{method: "GET", path: "/livez"})
	if resp.StatusCode != 200 || string(b) != `{"live":true}` {
		t.Fatalf("livez %d %s", resp.StatusCode, b)
	}
	for _, p := range []string{"/readyz", "/healthz"} {
		resp, b = sc.do(req{method: "GET", path: p})
		if resp.StatusCode != 200 || string(b) != `{"ready":true,"checks":{"recovered":true,"store_writable":true},"agent_connected":true}` {
			t.Fatalf("%s %d %s", p, resp.StatusCode, b)
		}
	}
	ready.Store(false)
	resp, b = sc.do(req{method: "GET", path: "/readyz"})
	if resp.StatusCode != 503 || !strings.Contains(string(b), `"ready":false`) || !strings.Contains(string(b), `"store_writable":false`) {
		t.Fatalf("not ready: %d %s", resp.StatusCode, b)
	}
	if resp, _ = sc.do(req{method: "GET", path: "/livez"}); resp.StatusCode != 200 {
		t.Fatalf("livez depends on readiness: %d", resp.StatusCode)
	}
	ready.Store(true)

	sc.call(req{method: "POST", path: "/v1/threads/m/runs", body: submitBody("hi"), headers: []string{"Accept", "application/json"}}, 200, nil)
	sc.stream(req{method: "POST", path: "/v1/threads/m/runs", body: submitBody("hi")}).rest()
	sc.do(req{method: "GET", path: "/v1/nowhere"})
	resp, b = sc.do(req{method: "GET", path: "/metrics"})
	m := string(b)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("metrics %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	for _, want := range []string{
		"# HELP mailbox_http_requests_total", "# TYPE mailbox_http_requests_total counter",
		`mailbox_http_requests_total{route="/v1/threads/{thread_id}/runs",code="200"} 2`,
		`mailbox_http_requests_total{route="unmatched",code="404"} 1`,
		"# TYPE mailbox_http_request_duration_seconds histogram",
		`mailbox_http_request_duration_seconds_bucket{route="/v1/threads/{thread_id}/runs",le="0.001"}`,
		`mailbox_http_request_duration_seconds_count{route="/v1/threads/{thread_id}/runs"} 2`,
		"mailbox_http_sse_subscribers 0", "mailbox_http_sse_dropped_total 0",
		"mailbox_dispatch_depth{", // the engine's set
		"go_goroutines",           // process metrics
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	// The admin listener: probes and metrics only.
	admin := &http.Client{}
	defer admin.CloseIdleConnections()
	for path, want := range map[string]int{"/livez": 200, "/readyz": 200, "/healthz": 200, "/metrics": 200, "/v1/dead-letters": 404, "/v1/runs/x": 404} {
		resp, b := doWith(t, admin, "http://"+sc.adminAddr, req{method: "GET", path: path})
		if resp.StatusCode != want {
			t.Errorf("admin %s: %d %s", path, resp.StatusCode, b)
		}
	}

	// The TCP listener: everything, behind the token.
	tcp := "http://" + sc.tcpAddr
	resp, b = doWith(t, sc.tcpClient, tcp, req{method: "GET", path: "/v1/dead-letters", headers: []string{"Authorization", "Bearer s3cret"}})
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"items"`) {
		t.Fatalf("tcp with token %d %s", resp.StatusCode, b)
	}
	resp, b = doWith(t, sc.tcpClient, tcp, req{method: "POST", path: "/v1/threads/tcp/runs", body: submitBody("x"),
		headers: []string{"Authorization", "bearer s3cret", "Accept", "application/json"}})
	if resp.StatusCode != 200 {
		t.Fatalf("tcp submit %d %s", resp.StatusCode, b)
	}
	resp, _ = doWith(t, sc.tcpClient, tcp, req{method: "GET", path: "/livez"})
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Fatalf("tcp without token %d", resp.StatusCode)
	}
}

// ServeTCP refuses to start without a token; New refuses a config
// without a mailbox or readiness.
func TestConfigRefusals(t *testing.T) {
	t.Parallel()
	if _, err := proxy.New(proxy.Config{}); err == nil {
		t.Fatal("New without Mailbox")
	}
	sc := newSidecar(t, options{noAgent: true})
	if _, err := proxy.New(proxy.Config{Mailbox: sc.mb}); err == nil {
		t.Fatal("New without Ready")
	}
	srv, err := proxy.New(proxy.Config{Mailbox: sc.mb, Ready: func() proxy.Readiness { return proxy.Readiness{} }, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.ServeTCP(nil); err == nil || !strings.Contains(err.Error(), "AuthToken") {
		t.Fatalf("ServeTCP without a token: %v", err)
	}
	if _, err := proxy.New(proxy.Config{Mailbox: sc.mb, Ready: func() proxy.Readiness { return proxy.Readiness{} }, MaxBody: -1}); err == nil {
		t.Fatal("negative MaxBody accepted")
	}
}

// /livez answers 503 with the reason while Config.Live reports the
// process stuck (a loop or a store write), and 200 again once it is not.
func TestLivezReportsAStuckProcess(t *testing.T) {
	t.Parallel()
	var stuck atomic.Bool
	sc := newSidecar(t, options{proxy: proxy.Config{Live: func() error {
		if stuck.Load() {
			return errors.New("the maintenance loop has been busy with one round for 3m0s (limit 2m0s)")
		}
		return nil
	}}})
	if resp, b := sc.do(req{method: "GET", path: "/livez"}); resp.StatusCode != 200 || string(b) != `{"live":true}` {
		t.Fatalf("live: %d %s", resp.StatusCode, b)
	}
	stuck.Store(true)
	resp, b := sc.do(req{method: "GET", path: "/livez"})
	if resp.StatusCode != 503 || !strings.Contains(string(b), `"live":false`) || !strings.Contains(string(b), "maintenance loop") {
		t.Fatalf("stuck: %d %s", resp.StatusCode, b)
	}
	stuck.Store(false)
	if resp, _ := sc.do(req{method: "GET", path: "/livez"}); resp.StatusCode != 200 {
		t.Fatalf("recovered: %d", resp.StatusCode)
	}
}
