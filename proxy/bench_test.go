package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The benchmarks drive the API over its Unix socket with fasthttp's
// client (request/response) or net/http (streams), in the same process
// as the sidecar: allocations are the client's and the server's together.
// Stores are in-memory Badger unless the name says store=disk (a real
// directory, fsync on).

// fastClient is a fasthttp client over a Unix socket.
func fastClient(path string, conns int) *fasthttp.HostClient {
	return &fasthttp.HostClient{
		Addr:     "sidecar",
		Dial:     func(string) (net.Conn, error) { return net.Dial("unix", path) },
		MaxConns: conns,
	}
}

// parallel runs b.N requests on `clients` goroutines; do gets the
// request's 1-based number and a per-client scratch buffer.
func parallel(b *testing.B, clients int, do func(i int64, buf []byte) ([]byte, error)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Bool
	b.ResetTimer()
	for range clients {
		wg.Go(func() {
			var buf []byte
			for !failed.Load() {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				var err error
				if buf, err = do(i, buf[:0]); err != nil {
					if failed.CompareAndSwap(false, true) {
						b.Error(err)
					}
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
}

// postJSON sends one request and checks its status.
func postJSON(hc *fasthttp.HostClient, method string, uri []byte, body []byte, want int) error {
	req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.SetRequestURIBytes(uri)
	req.Header.SetMethod(method)
	if body != nil {
		req.SetBodyRaw(body)
		req.Header.SetContentType("application/json")
	}
	if err := hc.Do(req, resp); err != nil {
		return err
	}
	if resp.StatusCode() != want {
		return fmt.Errorf("%s %s: %d %s", method, uri, resp.StatusCode(), resp.Body())
	}
	return nil
}

// BenchmarkBackgroundSubmit: POST /v1/threads/{id}/dispatches, each on a
// new thread, with no agent connected (the dispatches stay queued), so
// the figure is the API plus one durable submit.
func BenchmarkBackgroundSubmit(b *testing.B) {
	for _, store := range []string{"memory", "disk"} {
		for _, clients := range []int{1, 64} {
			b.Run(fmt.Sprintf("store=%s/clients=%d", store, clients), func(b *testing.B) {
				o := options{noAgent: true}
				if store == "disk" {
					o.diskPath = filepath.Join(shortDir(b), "data")
				}
				sc := newSidecar(b, o)
				hc := fastClient(sc.apiPath, clients)
				defer hc.CloseIdleConnections()
				body := []byte(submitBody("benchmark message"))
				b.ReportAllocs()
				parallel(b, clients, func(i int64, uri []byte) ([]byte, error) {
					uri = append(uri, "http://sidecar/v1/threads/bt-"...)
					uri = strconv.AppendInt(uri, i, 10)
					uri = append(uri, "/dispatches"...)
					return uri, postJSON(hc, "POST", uri, body, 202)
				})
			})
		}
	}
}

// BenchmarkEngineSubmitBackground is the same submit as
// BenchmarkBackgroundSubmit (store=memory) called on the engine directly:
// the difference is the cost of the HTTP layer.
func BenchmarkEngineSubmitBackground(b *testing.B) {
	for _, clients := range []int{1, 64} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			sc := newSidecar(b, options{noAgent: true})
			content := []byte(`"benchmark message"`)
			b.ReportAllocs()
			parallel(b, clients, func(i int64, buf []byte) ([]byte, error) {
				buf = append(buf, "bt-"...)
				buf = strconv.AppendInt(buf, i, 10)
				_, err := sc.mb.SubmitBackground(context.Background(), engine.SubmitRequest{
					ThreadID: string(buf), Messages: []engine.Message{{Role: "user", Content: content}},
				})
				return buf, err
			})
		})
	}
}

// BenchmarkGetDispatch: GET /v1/dispatches/{id} — a store read, the
// sidecar's request path without a write.
func BenchmarkGetDispatch(b *testing.B) {
	for _, clients := range []int{1, 64} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			sc := newSidecar(b, options{noAgent: true})
			var res submitResult
			sc.call(req{method: "POST", path: "/v1/threads/get/dispatches", body: submitBody("x")}, 202, &res)
			hc := fastClient(sc.apiPath, clients)
			defer hc.CloseIdleConnections()
			uri := []byte("http://sidecar/v1/dispatches/" + res.DispatchID)
			b.ReportAllocs()
			parallel(b, clients, func(int64, []byte) ([]byte, error) {
				return nil, postJSON(hc, "GET", uri, nil, 200)
			})
		})
	}
}

// BenchmarkBareFasthttp is the baseline: a bare fasthttp handler on the
// same kind of socket, with the same client, returning a small JSON.
func BenchmarkBareFasthttp(b *testing.B) {
	for _, clients := range []int{1, 64} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			path := filepath.Join(shortDir(b), "bare.sock")
			ln, err := net.Listen("unix", path)
			if err != nil {
				b.Fatal(err)
			}
			body := []byte(`{"dispatch_id":"019a0000-0000-7000-8000-000000000000","status":"queued"}`)
			srv := &fasthttp.Server{NoDefaultServerHeader: true, Handler: func(ctx *fasthttp.RequestCtx) {
				ctx.SetStatusCode(202)
				ctx.SetContentType("application/json")
				ctx.SetBody(body)
			}}
			done := make(chan struct{})
			go func() { defer close(done); srv.Serve(ln) }()
			defer func() {
				srv.Shutdown()
				<-done
			}()
			hc := fastClient(path, clients)
			defer hc.CloseIdleConnections()
			req := []byte(submitBody("benchmark message"))
			b.ReportAllocs()
			parallel(b, clients, func(i int64, uri []byte) ([]byte, error) {
				uri = append(uri, "http://sidecar/v1/threads/bt-"...)
				uri = strconv.AppendInt(uri, i, 10)
				uri = append(uri, "/dispatches"...)
				return uri, postJSON(hc, "POST", uri, req, 202)
			})
		})
	}
}

// BenchmarkForegroundFirstEvent: a foreground submit (SSE) until the
// first agent event arrives (reported as p50/p99), on a new thread each;
// the Go SDK agent answers at once. The stream is read to its end.
func BenchmarkForegroundFirstEvent(b *testing.B) {
	sc := newSidecar(b, options{maxRuns: 4})
	body := submitBody("hi")
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		hr, _ := http.NewRequest("POST", base+"/v1/threads/fe-"+strconv.Itoa(i)+"/runs", strings.NewReader(body))
		resp, err := sc.client.Do(hr)
		if err != nil {
			b.Fatal(err)
		}
		br := bufio.NewReader(resp.Body)
		first := time.Duration(0)
		for {
			line, err := br.ReadSlice('\n')
			if err != nil {
				if !errors.Is(err, io.EOF) {
					b.Fatal(err)
				}
				break
			}
			if first == 0 && bytes.Equal(line, []byte("id: 1\n")) {
				first = time.Since(start)
			}
		}
		resp.Body.Close()
		if first == 0 {
			b.Fatal("no agent event")
		}
		lat = append(lat, first)
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkSSEEvents: one run emits b.N small events (the Go SDK agent
// over the agent socket) and one client reads them all over SSE; the
// figure is events/s end to end (agent → hub → ring → stream).
func BenchmarkSSEEvents(b *testing.B) {
	sc := newSidecar(b, options{engine: engine.Config{EventBuffer: b.N + 16}})
	b.ReportAllocs()
	b.ResetTimer()
	hr, _ := http.NewRequest("POST", base+"/v1/threads/sse/runs", strings.NewReader(submitBody(fmt.Sprint("events:", b.N))))
	resp, err := sc.client.Do(hr)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	var last []byte
	n := 0
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if !errors.Is(err, io.EOF) {
				b.Fatal(err)
			}
			break
		}
		if bytes.HasPrefix(line, []byte("id: ")) {
			n++
			last = append(last[:0], line...)
		}
	}
	b.StopTimer()
	// submitted + b.N events + run_finish.
	if n != b.N+2 || string(last) != fmt.Sprintf("id: %d\n", b.N+1) {
		b.Fatalf("read %d events, last %q", n, last)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	eventually(b, "run settled", func() bool {
		ds, err := sc.mb.ListDispatches(context.Background(), "sse", engine.StatusFilter{engine.StatusAcked}, 0, 0)
		return err == nil && len(ds) == 1
	})
}
