package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// A stream whose last bytes are still on their way to a client that does
// not read when the run ends keeps its stall bound: the connection is
// closed once the bound passes, and Shutdown is not held up by it. The
// stream used to clear the bound as it ended, and the write stayed stuck
// for good (found by review).
func TestStallBoundOutlivesTheStreamsEnd(t *testing.T) {
	big := strings.Repeat("x", 2<<20)
	h := agent.HandlerFunc(func(ctx context.Context, run *agent.Run) agent.Result {
		for i := range 2 {
			if err := run.Emit(map[string]any{"type": "text_delta", "n": i, "pad": big}); err != nil {
				return agent.Transient("emit", err.Error())
			}
		}
		return agent.Done("ok")
	})
	pc := proxyConfig(50 * time.Millisecond)
	pc.StallTimeout = 200 * time.Millisecond
	sc := newSidecar(t, options{proxy: pc, handler: h})
	postRunRaw(t, sc, "stuck")
	// The client never reads.
	eventually(t, "the run acked", func() bool {
		ds, err := sc.mb.ListDispatches(context.Background(), "stuck", engine.StatusFilter{engine.StatusAcked}, 0, 0)
		return err == nil && len(ds) == 1
	})
	eventually(t, "the stream ended", func() bool {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		return metricLine(string(m), "mailbox_http_sse_subscribers ") == "mailbox_http_sse_subscribers 0"
	})
	time.Sleep(3 * pc.StallTimeout) // the bound passes
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := sc.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v: the write stuck on a client that does not read outlived the stall bound", err)
	}
}

// A client that stops reading a stream of large events is cut off once a
// write has been stuck for the stall bound, while the run goes on, and
// the cut-off is counted with the slow subscribers. A re-attached stream
// whose first read found events wrote them straight to the connection
// before any bound was set, and a stream of 1 MiB events stayed open
// until the client left (found by review).
func TestAClientThatStopsReadingLargeEventsIsCutOff(t *testing.T) {
	big := strings.Repeat("x", 1<<20)
	emitted := make(chan struct{})
	h := agent.HandlerFunc(func(ctx context.Context, run *agent.Run) agent.Result {
		for i := range 10 {
			if err := run.Emit(map[string]any{"type": "text_delta", "n": i, "pad": big}); err != nil {
				return agent.Transient("emit", err.Error())
			}
		}
		close(emitted)
		<-ctx.Done() // the run goes on
		return agent.Done("cancelled")
	})
	pc := proxyConfig(50 * time.Millisecond)
	pc.StallTimeout = 200 * time.Millisecond
	sc := newSidecar(t, options{proxy: pc, handler: h})
	if resp, b := sc.do(req{method: "POST", path: "/v1/threads/stuck/dispatches", body: submitBody("hi")}); resp.StatusCode != 202 {
		t.Fatalf("background submit: %d %s", resp.StatusCode, b)
	}
	<-emitted
	eventually(t, "the events in the run's buffer", func() bool {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		v := metricLine(string(m), "mailbox_event_buffer_bytes ")
		return v != "" && v != "mailbox_event_buffer_bytes 0"
	})
	conn, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /v1/threads/stuck/events HTTP/1.1\r\nHost: x\r\n\r\n")
	// The client never reads.
	eventually(t, "the stream cut off", func() bool {
		_, m := sc.do(req{method: "GET", path: "/metrics"})
		return metricLine(string(m), "mailbox_http_sse_subscribers ") == "mailbox_http_sse_subscribers 0" &&
			metricLine(string(m), "mailbox_http_sse_dropped_total ") == "mailbox_http_sse_dropped_total 1"
	})
	ds, err := sc.mb.ListDispatches(context.Background(), "stuck", engine.StatusFilter{engine.StatusClaimed}, 0, 0)
	if err != nil || len(ds) != 1 {
		t.Fatalf("the run did not go on after its stream was cut off: %v %v", ds, err)
	}
}

// A client that reads a large event slowly but steadily is not cut off:
// the stall bound is on each piece of the event (32 KiB), not on the
// whole of it. Written whole, a 4 MiB event to a client reading 1.6 MB/s
// under a stall bound of 1 s was cut off after 1 s.
func TestAClientReadingALargeEventSlowlyIsNotCutOff(t *testing.T) {
	t.Parallel()
	big := strings.Repeat("x", 4<<20)
	h := agent.HandlerFunc(func(ctx context.Context, run *agent.Run) agent.Result {
		if err := run.Emit(map[string]any{"type": "text_delta", "pad": big}); err != nil {
			return agent.Transient("emit", err.Error())
		}
		return agent.Done("ok")
	})
	pc := proxyConfig(time.Minute)
	pc.StallTimeout = time.Second
	sc := newSidecar(t, options{proxy: pc, handler: h})
	conn := postRunRaw(t, sc, "slow")
	// 32 KiB every 20 ms: 4 MiB in about 2.6 s.
	resp, err := http.ReadResponse(bufio.NewReaderSize(slowReader{conn}, 32<<10), nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("after %d bytes: %v (cut off)", len(got), err)
	}
	if !strings.Contains(string(got), `"pad":"`+big+`"`) || !strings.Contains(string(got), "event: run_finish") {
		t.Fatalf("the large event or the run's end did not arrive (%d bytes read)", len(got))
	}
	_, m := sc.do(req{method: "GET", path: "/metrics"})
	if v := metricLine(string(m), "mailbox_http_sse_dropped_total "); v != "mailbox_http_sse_dropped_total 0" {
		t.Fatalf("%s", v)
	}
}

// slowReader reads at most 32 KiB every 20 ms.
type slowReader struct{ c net.Conn }

func (r slowReader) Read(p []byte) (int, error) {
	time.Sleep(20 * time.Millisecond)
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	return r.c.Read(p[:min(len(p), 32<<10)])
}

// postRunRaw sends a foreground submit of "hi" to thread on a raw
// connection to the API socket, which it returns unread.
func postRunRaw(t *testing.T, sc *sidecar, thread string) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	body := submitBody("hi")
	fmt.Fprintf(conn, "POST /v1/threads/%s/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", thread, len(body), body)
	return conn
}
