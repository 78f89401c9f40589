package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// openHTTP10 sends r as an HTTP/1.0 request on a new connection to the API
// socket and checks the answer is an SSE stream framed as HTTP/1.0 allows:
// no chunked coding, no length, the connection closed at its end.
func (sc *sidecar) openHTTP10(r req) *sseStream {
	sc.t.Helper()
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		sc.t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString(r.method + " " + r.path + " HTTP/1.0\r\nHost: sidecar\r\n")
	if r.body != "" {
		b.WriteString("Content-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(r.body)) + "\r\n")
	}
	b.WriteString("\r\n" + r.body)
	if _, err := c.Write([]byte(b.String())); err != nil {
		sc.t.Fatal(err)
	}
	hr, _ := http.NewRequest(r.method, base+r.path, nil)
	resp, err := http.ReadResponse(bufio.NewReader(c), hr)
	if err != nil {
		sc.t.Fatalf("%s %s over HTTP/1.0: %v", r.method, r.path, err)
	}
	resp.Body = bodyConn{resp.Body, c} // closing it closes the connection
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		sc.t.Fatalf("%s %s over HTTP/1.0: status %d %q", r.method, r.path, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if len(resp.TransferEncoding) != 0 || resp.ContentLength != -1 || !resp.Close {
		sc.t.Fatalf("%s %s over HTTP/1.0: Transfer-Encoding %q, Content-Length %d, close %v; want none, none, true",
			r.method, r.path, resp.TransferEncoding, resp.ContentLength, resp.Close)
	}
	s := &sseStream{t: sc.t, resp: resp, events: make(chan sseEvent, 1<<16), pings: make(chan struct{}, 1<<10), done: make(chan struct{})}
	go s.read()
	sc.t.Cleanup(s.close)
	return s
}

// An HTTP/1.0 client cannot read chunked coding, which fasthttp gives
// every streamed body: its streams — a foreground submit's, a
// re-attachment's — come unframed and end by closing the connection.
// Before the mend the chunk sizes reached the client as lines of the
// stream.
func TestAnHTTP10ClientGetsAStreamWithoutChunks(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})

	fg := sc.openHTTP10(req{method: "POST", path: "/v1/threads/h10/runs", body: submitBody("events:300")})
	evs := fg.rest()
	if len(evs) != 302 || evs[0].Event != "submitted" || evs[301].Event != "run_finish" {
		t.Fatalf("foreground stream: %d events (%s…)", len(evs), types(evs[:min(len(evs), 3)]))
	}
	for i, e := range evs {
		if e.ID != strconv.Itoa(i) {
			t.Fatalf("event %d has id %q", i, e.ID)
		}
	}

	// A re-attachment to a running run follows it live and ends with it.
	sub := sc.stream(req{method: "POST", path: "/v1/threads/h10w/runs", body: submitBody("wait")})
	sub.next()
	sub.next()
	sub.next()
	re := sc.openHTTP10(req{method: "GET", path: "/v1/threads/h10w/events"})
	if got := types([]sseEvent{re.next(), re.next()}); got != "run_start,text_delta" {
		t.Fatalf("re-attached stream began %s", got)
	}
	sc.call(req{method: "POST", path: "/v1/threads/h10w/messages", body: `{"messages":[{"role":"user","content":"go"}]}`}, 200, nil)
	if got := types(re.rest()); got != "text_delta,run_finish" {
		t.Fatalf("re-attached stream went on with %s", got)
	}

	// The connection is not kept for another request.
	if !re.ended(time.Second) {
		t.Fatal("the HTTP/1.0 connection stayed open")
	}
}

// Shutdown ends an HTTP/1.0 stream as it ends any other.
func TestShutdownEndsAnHTTP10Stream(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	st := sc.openHTTP10(req{method: "POST", path: "/v1/threads/h10s/runs", body: submitBody("wait")})
	if got := types([]sseEvent{st.next(), st.next(), st.next()}); got != "submitted,run_start,text_delta" {
		t.Fatalf("stream began %s", got)
	}
	sc.shutdownPromptly()
	if !st.ended(waitTimeout) {
		t.Fatal("the HTTP/1.0 stream is still open after Shutdown")
	}
}

// bodyConn reads a response's body and closes its connection.
type bodyConn struct {
	io.Reader
	c net.Conn
}

func (b bodyConn) Close() error { return b.c.Close() }

// An HTTP/1.0 client that stops reading is cut off at the stall bound and
// counted with the slow subscribers, as any other: its stream writes on
// the connection itself, not through fasthttp's pipe.
func TestAnHTTP10ClientThatStopsReadingIsCutOff(t *testing.T) {
	t.Parallel()
	pc := proxyConfig(50 * time.Millisecond)
	pc.StallTimeout = 200 * time.Millisecond
	sc := newSidecar(t, options{proxy: pc})
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	body := submitBody("big:3000") // 3 MiB of events, never read
	fmt.Fprintf(c, "POST /v1/threads/h10stall/runs HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	eventually(t, "the stuck stream cut off and counted", func() bool {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		return metricLine(string(m), "mailbox_http_sse_dropped_total ") == "mailbox_http_sse_dropped_total 1" &&
			metricLine(string(m), "mailbox_http_sse_subscribers ") == "mailbox_http_sse_subscribers 0"
	})
}

// fasthttp skips a hijack when the connection fails before it (here: the
// answer to a pipelined request before the stream could not be flushed
// to a client that had gone). A stream registered before its hijack was
// then never run: counted as a subscriber for good, and Shutdown waited
// for it until its deadline.
func TestAnHTTP10StreamWhoseClientLeftBeforeItBeganIsNotKept(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{})
	body := submitBody("hi")
	for i := range 20 {
		c, err := net.Dial("unix", sc.apiPath)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/threads/h10gone%d/runs HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s", i, len(body), body)
		c.Close()
	}
	eventually(t, "no stream left", func() bool {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		return metricLine(string(m), "mailbox_http_sse_subscribers ") == "mailbox_http_sse_subscribers 0"
	})
	sc.shutdownPromptly()
}

// An HTTP/1.0 stream's connection, which fasthttp gives up to the stream
// (hijacked), counts under --max-conns until the stream ends. It was
// uncounted as fasthttp gave it up: HTTP/1.0 streams passed the cap.
func TestHTTP10StreamsCountUnderTheConnectionCap(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{admin: true, proxy: proxy.Config{MaxConns: 2}})
	admin := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	conns := func() string {
		_, m := doWith(t, admin, "http://"+sc.adminAddr, req{method: "GET", path: "/metrics"})
		return metricLine(string(m), `mailbox_http_connections{listener="api"}`)
	}
	var streams []*sseStream
	var runs []string
	for i := range 2 {
		st := sc.openHTTP10(req{method: "POST", path: fmt.Sprintf("/v1/threads/h10cap%d/runs", i), body: submitBody("wait")})
		runs = append(runs, decode[submitResult](t, st.next().Data).RunID)
		st.next()
		st.next()
		streams = append(streams, st)
	}
	if got, want := conns(), `mailbox_http_connections{listener="api"} 2`; got != want {
		t.Fatalf("with two HTTP/1.0 streams open: %q, want %q", got, want)
	}
	refused := dialRaw(t, "unix", sc.apiPath)
	if status, _ := refused.roundTrip(t, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"); status != 503 {
		t.Fatalf("a third connection: %d, want 503", status)
	}
	// The streams end with their runs, and their connections with them.
	for _, id := range runs {
		if ok, err := sc.mb.Cancel(context.Background(), id); err != nil || !ok {
			t.Fatalf("cancel %s: %v %v", id, ok, err)
		}
	}
	for _, st := range streams {
		if got := types(st.rest()); got != "run_finish" {
			t.Fatalf("a stream ended with %s", got)
		}
	}
	eventually(t, "the streams' connections uncounted", func() bool {
		return conns() == `mailbox_http_connections{listener="api"} 0`
	})
	if resp, _ := sc.do(req{method: "GET", path: "/livez"}); resp.StatusCode != 200 {
		t.Fatalf("after the streams: %d", resp.StatusCode)
	}
}
