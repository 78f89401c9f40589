package proxy_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// Shutdown ends open streams — an idle one and one stuck on a client that
// does not read — and returns promptly; the runs go on; the API refuses
// new connections and Serve returns ErrServerClosed.
func TestShutdownEndsStreams(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{engine: engine.Config{EventBuffer: 64}})
	idle := sc.stream(req{method: "POST", path: "/v1/threads/sd/runs", body: submitBody("wait")})
	sub := decode[submitResult](t, idle.next().Data)
	idle.next()
	idle.next()
	// A client that never reads a stream of 3000 × 1 KiB events.
	hr, _ := http.NewRequest("POST", base+"/v1/threads/stuck/runs", strings.NewReader(submitBody("big:3000")))
	resp, err := sc.client.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	eventually(t, "the stuck run finished", func() bool {
		ds, err := sc.mb.ListDispatches(context.Background(), "stuck", engine.StatusFilter{engine.StatusAcked}, 0, 0)
		return err == nil && len(ds) == 1
	})

	start := time.Now()
	sc.shutdownProxy()
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("shutdown took %s", took)
	}
	if !idle.ended(waitTimeout) {
		t.Fatal("the idle stream is still open after Shutdown")
	}
	// Closing the stream did not cancel the run.
	if d := sc.waitDispatch(sub.DispatchID, engine.StatusClaimed); d.RunID != sub.RunID {
		t.Fatalf("dispatch %+v", d)
	}
	if _, err := net.Dial("unix", sc.apiPath); err == nil {
		t.Fatal("the API socket still accepts connections")
	}
	ln, err := net.Listen("unix", sc.apiPath+"2")
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.srv.ServeAPI(ln); !errors.Is(err, proxy.ErrServerClosed) {
		t.Fatalf("ServeAPI after Shutdown: %v", err)
	}
	if err := sc.srv.Shutdown(context.Background()); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
	// The engine (stopped by the test's cleanup) cancels the waiting run.
}

// Write requests are refused with 503 while the mailbox is not running.
func TestWritesRefusedWhenMailboxStopped(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := sc.mb.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	for _, r := range []req{
		{method: "POST", path: "/v1/threads/x/dispatches", body: submitBody("x")},
		{method: "POST", path: "/v1/threads/x/runs", body: submitBody("x")},
		{method: "POST", path: "/v1/cancel/x"},
	} {
		resp, b := sc.do(r)
		if resp.StatusCode != 503 || !strings.Contains(string(b), `"unavailable"`) {
			t.Errorf("%s %s: %d %s", r.method, r.path, resp.StatusCode, b)
		}
	}
	if resp, _ := sc.do(req{method: "GET", path: "/v1/dead-letters"}); resp.StatusCode != 200 {
		t.Errorf("reads refused: %d", resp.StatusCode)
	}
}
