package proxy_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
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

	sc.shutdownPromptly()
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

// Write requests are refused with 503 while the mailbox is not running;
// cancels are still taken (the drain's runs may be stopped).
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
		{method: "POST", path: "/v1/threads/x/messages", body: submitBody("x")},
	} {
		resp, b := sc.do(r)
		if resp.StatusCode != 503 || !strings.Contains(string(b), `"unavailable"`) {
			t.Errorf("%s %s: %d %s", r.method, r.path, resp.StatusCode, b)
		}
	}
	if resp, _ := sc.do(req{method: "GET", path: "/v1/dead-letters"}); resp.StatusCode != 200 {
		t.Errorf("reads refused: %d", resp.StatusCode)
	}
	if resp, b := sc.do(req{method: "POST", path: "/v1/cancel/x"}); resp.StatusCode != 200 {
		t.Errorf("cancel refused: %d %s", resp.StatusCode, b)
	}
}

// A run the shutdown drain waits for can still be cancelled: the drain
// ends with it, not at its grace (found by review: every POST was 503
// while runs went on for --shutdown-grace).
func TestARunCanBeCancelledDuringTheShutdownDrain(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	st := sc.stream(req{method: "POST", path: "/v1/threads/drain/runs", body: submitBody("sleep:30s")})
	sub := decode[submitResult](t, st.next().Data)
	sc.waitDispatch(sub.DispatchID, engine.StatusClaimed)
	stopped := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		stopped <- sc.mb.Stop(ctx)
	}()
	eventually(t, "the drain began", func() bool { return !sc.mb.Running() })
	if resp, b := sc.do(req{method: "POST", path: "/v1/threads/drain/dispatches", body: submitBody("x")}); resp.StatusCode != 503 {
		t.Fatalf("a submit during the drain: %d %s, want 503", resp.StatusCode, b)
	}
	var got struct {
		Cancelled bool `json:"cancelled"`
	}
	start := time.Now()
	sc.call(req{method: "POST", path: "/v1/cancel/" + sub.DispatchID}, 200, &got)
	if !got.Cancelled {
		t.Fatal("the cancel during the drain cancelled nothing")
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Stop = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the drain still waits for the cancelled run")
	}
	t.Logf("the drain ended %v after the cancel", time.Since(start))
	if d := sc.waitDispatch(sub.DispatchID, engine.StatusAcked); d.Termination == nil || d.Termination.Type != engine.TermCancelled {
		t.Fatalf("dispatch %+v, want acked cancelled", d)
	}
}

// A stream that ended while its client read nothing leaves its last bytes
// stuck on the connection under the stall bound (10 s): Shutdown cuts that
// connection off after its grace instead of waiting on it until its
// deadline (fasthttp's Shutdown waits for every open connection).
func TestShutdownCutsAnEndedStreamsStuckConnection(t *testing.T) {
	t.Parallel()
	var ln *stuckListener
	sc := newSidecar(t, options{wrapAPI: func(l net.Listener) net.Listener {
		ln = &stuckListener{Listener: l}
		return ln
	}})
	st := openStream(t, unixClient(sc.apiPath), req{method: "POST", path: "/v1/threads/linger/runs", body: submitBody("wait")})
	sub := decode[submitResult](t, st.next().Data)
	st.next()
	st.next()
	ln.stickAll() // the stream's connection takes no more bytes; sc.client dials anew
	var res submitResult
	sc.call(req{method: "POST", path: "/v1/threads/linger/messages", body: `{"messages":[{"role":"user","content":"end"}]}`}, 200, &res)
	if res.RunID != sub.RunID {
		t.Fatalf("message: %+v", res)
	}
	sc.waitDispatch(sub.DispatchID, engine.StatusAcked)
	eventually(t, "the stream ended", func() bool {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		return metricLine(string(m), "mailbox_http_sse_subscribers ") == "mailbox_http_sse_subscribers 0"
	})

	sc.shutdownPromptly()
	if !st.ended(waitTimeout) {
		t.Fatal("the stuck connection is still open after Shutdown")
	}
}

// stuckListener hands out connections whose writes can be made to block
// (until their write deadline) on cue: a client that stopped reading,
// whatever the socket buffers hold.
type stuckListener struct {
	net.Listener
	mu    sync.Mutex
	conns []*stuckConn
}

func (l *stuckListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	sc := &stuckConn{Conn: c, changed: make(chan struct{})}
	l.mu.Lock()
	l.conns = append(l.conns, sc)
	l.mu.Unlock()
	return sc, nil
}

// stickAll makes every connection accepted so far block its writes.
func (l *stuckListener) stickAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		c.update(func() { c.stuck = true })
	}
}

type stuckConn struct {
	net.Conn
	mu       sync.Mutex
	stuck    bool
	closed   bool
	deadline time.Time
	changed  chan struct{} // closed and replaced on every change
}

func (c *stuckConn) update(f func()) {
	c.mu.Lock()
	f()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

func (c *stuckConn) Write(p []byte) (int, error) {
	for {
		c.mu.Lock()
		stuck, closed, deadline, changed := c.stuck, c.closed, c.deadline, c.changed
		c.mu.Unlock()
		switch {
		case closed:
			return 0, net.ErrClosed
		case !stuck:
			return c.Conn.Write(p)
		}
		var expired <-chan time.Time
		if !deadline.IsZero() {
			wait := time.Until(deadline)
			if wait <= 0 {
				return 0, os.ErrDeadlineExceeded
			}
			tm := time.NewTimer(wait)
			expired = tm.C
			defer tm.Stop()
		}
		select {
		case <-expired:
			return 0, os.ErrDeadlineExceeded
		case <-changed:
		}
	}
}

func (c *stuckConn) SetWriteDeadline(t time.Time) error {
	c.update(func() { c.deadline = t })
	return c.Conn.SetWriteDeadline(t)
}

func (c *stuckConn) SetDeadline(t time.Time) error {
	c.update(func() { c.deadline = t })
	return c.Conn.SetDeadline(t)
}

func (c *stuckConn) Close() error {
	c.update(func() { c.closed = true })
	return c.Conn.Close()
}

// Clients that leave in the middle of their streams leave nothing in the
// set of connections Shutdown cuts off: fasthttp closed them before the
// streams noticed (found by review: each stayed there for good, and every
// Shutdown then waited out the grace).
func TestStreamsOfClientsThatLeftDoNotLinger(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{proxy: proxyConfig(20 * time.Millisecond)})
	for i := range 5 {
		c, err := net.Dial("unix", sc.apiPath)
		if err != nil {
			t.Fatal(err)
		}
		body := submitBody("wait")
		fmt.Fprintf(c, "POST /v1/threads/left%d/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", i, len(body), body)
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || !strings.Contains(line, " 200 ") {
			t.Fatalf("status line %q %v", line, err)
		}
		c.Close()
	}
	eventually(t, "the streams of the clients that left ended", func() bool {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		return metricLine(string(m), "mailbox_http_sse_subscribers ") == "mailbox_http_sse_subscribers 0"
	})
	if n, err := sc.srv.Lingering(); n != 0 || err != nil {
		t.Fatalf("%d connections lingering (%v)", n, err)
	}
}
