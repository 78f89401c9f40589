package proxy_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	json "github.com/goccy/go-json"
	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// fasthttp's process-wide Date-header refresher (started once).
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.updateServerDate.func1"),
		// fasthttp's worker-pool cleaner sleeps out its idle period after Stop.
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*workerPool).Start.func2"),
		// The benchmarks' fasthttp client sweeps idle connections on its own schedule.
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*HostClient).connsCleaner"),
	)
}

// waitTimeout bounds every wait for something that should happen soon.
const waitTimeout = 10 * time.Second

func testLogger() *slog.Logger {
	if os.Getenv("PROXY_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// shortDir returns a fresh directory with a path short enough for Unix
// socket names.
func shortDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "px")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// options shape a test sidecar.
type options struct {
	engine   engine.Config
	proxy    proxy.Config // MaxBody, AuthToken, PingInterval
	handler  agent.Handler
	maxRuns  int
	noAgent  bool
	tcp      bool // also serve the API on 127.0.0.1 behind AuthToken
	admin    bool // also serve the admin listener on 127.0.0.1
	diskPath string
	ready    func() proxy.Readiness
	wrapAPI  func(net.Listener) net.Listener // wraps the API socket's listener (fault injection)
}

// sidecar is the real stack: Badger, the engine, the hub on a Unix agent
// socket, a Go SDK agent, and the proxy on a Unix API socket.
type sidecar struct {
	t         testing.TB
	store     *badgerstore.Store
	hub       *hub.Hub
	mb        *engine.Mailbox
	srv       *proxy.Server
	agents    *agentSet
	apiPath   string
	agentPath string
	tcpAddr   string
	adminAddr string
	client    *http.Client // over the API socket
	tcpClient *http.Client

	shutdownOnce sync.Once
	served       sync.WaitGroup
	stopOnce     sync.Once
	teardown     func(grace time.Duration)
}

const base = "http://sidecar"

func newSidecar(t testing.TB, o options) *sidecar {
	t.Helper()
	dir := shortDir(t)
	sopts := badgerstore.Options{InMemory: true}
	if o.diskPath != "" {
		sopts = badgerstore.Options{Dir: o.diskPath}
	}
	store, err := badgerstore.Open(sopts)
	if err != nil {
		t.Fatal(err)
	}
	h, err := hub.New(hub.Config{Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	ecfg := o.engine
	ecfg.Logger = testLogger()
	if ecfg.RetryDelay == 0 {
		ecfg.RetryDelay, ecfg.MaxRetryDelay = 20*time.Millisecond, 100*time.Millisecond
	}
	mb, err := engine.New(store, h, ecfg)
	if err != nil {
		t.Fatal(err)
	}
	h.SetSubmitter(mb)
	sc := &sidecar{t: t, store: store, hub: h, mb: mb,
		apiPath: filepath.Join(dir, "api.sock"), agentPath: filepath.Join(dir, "agent.sock")}
	agentLn, err := net.Listen("unix", sc.agentPath)
	if err != nil {
		t.Fatal(err)
	}
	hubDone := make(chan struct{})
	go func() { defer close(hubDone); h.Serve(agentLn) }()
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}

	pcfg := o.proxy
	pcfg.Mailbox = mb
	pcfg.Metrics = append(pcfg.Metrics, mb.Metrics(), h.Metrics())
	if pcfg.Logger == nil {
		pcfg.Logger = testLogger()
	}
	pcfg.Ready = o.ready
	if pcfg.Ready == nil {
		pcfg.Ready = func() proxy.Readiness {
			return proxy.Readiness{Ready: mb.Running(), Checks: map[string]bool{"recovered": mb.Running()}, AgentConnected: h.Capacity() > 0}
		}
	}
	srv, err := proxy.New(pcfg)
	if err != nil {
		t.Fatal(err)
	}
	sc.srv = srv
	apiLn, err := net.Listen("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	if o.wrapAPI != nil {
		apiLn = o.wrapAPI(apiLn)
	}
	sc.serve(func() error { return srv.ServeAPI(apiLn) })
	sc.client = unixClient(sc.apiPath)
	if o.tcp {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		sc.tcpAddr = ln.Addr().String()
		sc.serve(func() error { return srv.ServeTCP(ln) })
		sc.tcpClient = &http.Client{Transport: &http.Transport{DisableCompression: true}}
	}
	if o.admin {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		sc.adminAddr = ln.Addr().String()
		sc.serve(func() error { return srv.ServeAdmin(ln) })
	}
	if !o.noAgent {
		sc.agents = startAgent(t, sc.agentPath, o.handler, o.maxRuns)
		eventually(t, "agent connected", func() bool { return h.Capacity() > 0 })
	}
	sc.teardown = func(grace time.Duration) {
		sc.shutdownProxy()
		ctx, cancel := context.WithTimeout(context.Background(), grace)
		defer cancel()
		h.GoAway("shutdown", "test over")
		if err := mb.Stop(ctx); err != nil {
			t.Errorf("mailbox stop: %v", err)
		}
		if sc.agents != nil {
			sc.agents.stop()
		}
		h.Close()
		<-hubDone
		if rep, err := store.Verify(context.Background()); err != nil || len(rep.Problems) > 0 {
			t.Errorf("verify: %v %v", err, rep.Problems)
		}
		store.Close()
	}
	t.Cleanup(func() { sc.stop(3 * time.Second) })
	return sc
}

// stop shuts the whole sidecar down once (the proxy, then the mailbox with
// grace for its running attempts, the agent, the hub, the store), as a
// restart does; a test that stops a sidecar early can open another on the
// same diskPath.
func (sc *sidecar) stop(grace time.Duration) {
	sc.stopOnce.Do(func() { sc.teardown(grace) })
}

func (sc *sidecar) serve(fn func() error) {
	sc.served.Add(1)
	go func() {
		defer sc.served.Done()
		if err := fn(); err != nil && !errors.Is(err, proxy.ErrServerClosed) {
			sc.t.Errorf("serve: %v", err)
		}
	}()
}

// shutdownPromptly is shutdownProxy that fails the test unless Shutdown
// returned within 3 s.
func (sc *sidecar) shutdownPromptly() {
	sc.t.Helper()
	start := time.Now()
	sc.shutdownProxy()
	if took := time.Since(start); took > 3*time.Second {
		sc.t.Fatalf("shutdown took %s", took)
	}
}

// shutdownProxy shuts the HTTP server down once and waits for the
// Serve calls to return.
func (sc *sidecar) shutdownProxy() {
	sc.shutdownOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := sc.srv.Shutdown(ctx); err != nil {
			sc.t.Errorf("proxy shutdown: %v", err)
		}
		sc.served.Wait()
		sc.client.CloseIdleConnections()
		if sc.tcpClient != nil {
			sc.tcpClient.CloseIdleConnections()
		}
	})
}

func unixClient(path string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConnsPerHost: 128,
		DisableCompression:  true,
	}}
}

// agentSet is a Go SDK agent process (in-process) serving the agent socket.
type agentSet struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func startAgent(t testing.TB, path string, h agent.Handler, maxRuns int) *agentSet {
	t.Helper()
	if h == nil {
		h = scriptAgent{}
	}
	if maxRuns == 0 {
		maxRuns = 8
	}
	c, err := agent.New(agent.Config{Socket: path, MaxRuns: maxRuns, Handler: h, Logger: testLogger(),
		ShutdownGrace: -1, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &agentSet{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(a.done)
		c.Serve(ctx)
	}()
	return a
}

func (a *agentSet) stop() {
	a.cancel()
	<-a.done
}

// scriptAgent acts on the text of the run's first activation message:
//
//	"wait"      emits run_start and "waiting", then waits for a live message
//	            (emits "live: <text>") or a decision (emits tool_call_resumed)
//	            or a cancel
//	"events:N"  emits N text_delta events
//	"big:N"     emits N text_delta events of 1 KiB each
//	"trace"     emits the request's traceparent
//	"fail"      fails permanently (dead letter)
//	"sleep:D"   sleeps D (a Go duration) unless cancelled
//	"stubborn:D" sleeps D, ignoring a cancel
//	otherwise   emits run_start and "echo: <text>"
//
// It never emits run_finish: the engine adds it.
type scriptAgent struct{}

func (scriptAgent) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	text := ""
	if len(run.Request.Messages) > 0 {
		text, _ = run.Request.Messages[0].Text()
	}
	emit := func(typ string, kv ...string) {
		ev := map[string]string{"type": typ}
		for i := 0; i+1 < len(kv); i += 2 {
			ev[kv[i]] = kv[i+1]
		}
		run.Emit(ev)
	}
	switch {
	case text == "wait":
		msgs, decs := run.Messages(), run.Decisions()
		emit("run_start")
		emit("text_delta", "delta", "waiting")
		select {
		case <-ctx.Done():
			return agent.Cancelled()
		case recs := <-msgs:
			live := ""
			for _, r := range recs {
				t, _ := r.Message.Text()
				live += t
			}
			emit("text_delta", "delta", "live: "+live)
			return agent.Done("live: " + live)
		case ds := <-decs:
			emit("tool_call_resumed", "call_id", ds[0].CallID, "resume", string(ds[0].Resume))
			return agent.Done("resumed")
		}
	case strings.HasPrefix(text, "events:"):
		n, _ := strconv.Atoi(strings.TrimPrefix(text, "events:"))
		var b []byte
		for i := 1; i <= n; i++ {
			b = append(b[:0], `{"type":"text_delta","n":`...)
			b = strconv.AppendInt(b, int64(i), 10)
			b = append(b, '}')
			if err := run.EmitRaw(b); err != nil {
				return agent.Transient("emit", err.Error())
			}
		}
		return agent.Done("ok")
	case strings.HasPrefix(text, "big:"):
		n, _ := strconv.Atoi(strings.TrimPrefix(text, "big:"))
		pad := strings.Repeat("x", 1024)
		for i := 1; i <= n; i++ {
			if err := run.Emit(map[string]any{"type": "text_delta", "n": i, "pad": pad}); err != nil {
				return agent.Transient("emit", err.Error())
			}
		}
		return agent.Done("ok")
	case text == "trace":
		emit("custom", "traceparent", run.Request.Traceparent)
		return agent.Done("")
	case text == "fail":
		return agent.Permanent("bad_input", "this run cannot succeed")
	case strings.HasPrefix(text, "stubborn:"):
		d, _ := time.ParseDuration(strings.TrimPrefix(text, "stubborn:"))
		emit("run_start")
		time.Sleep(d) // ignores a cancel
		return agent.Done("stubborn")
	case strings.HasPrefix(text, "sleep:"):
		d, _ := time.ParseDuration(strings.TrimPrefix(text, "sleep:"))
		select {
		case <-ctx.Done():
			return agent.Cancelled()
		case <-time.After(d):
			return agent.Done("slept")
		}
	default:
		emit("run_start")
		emit("text_delta", "delta", "echo: "+text)
		return agent.Done("echo: " + text)
	}
}

// eventually polls cond until it holds or waitTimeout passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// --- HTTP helpers ---

// req is one request to the API socket.
type req struct {
	method, path, body string
	headers            []string // name, value, …
}

func (sc *sidecar) do(r req) (*http.Response, []byte) {
	sc.t.Helper()
	return doWith(sc.t, sc.client, base, r)
}

func doWith(t testing.TB, c *http.Client, baseURL string, r req) (*http.Response, []byte) {
	t.Helper()
	resp, b, err := tryDo(c, baseURL, r)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// tryDo is doWith that returns its error.
func tryDo(c *http.Client, baseURL string, r req) (*http.Response, []byte, error) {
	var body io.Reader
	if r.body != "" {
		body = strings.NewReader(r.body)
	}
	hr, err := http.NewRequest(r.method, baseURL+r.path, body)
	if err != nil {
		return nil, nil, err
	}
	for i := 0; i+1 < len(r.headers); i += 2 {
		hr.Header.Set(r.headers[i], r.headers[i+1])
	}
	resp, err := c.Do(hr)
	if err != nil {
		return nil, nil, fmt.Errorf("%s %s: %w", r.method, r.path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, nil, fmt.Errorf("%s %s: read body: %w", r.method, r.path, err)
	}
	return resp, b, nil
}

// call does r, checks the status and decodes the JSON answer into out.
func (sc *sidecar) call(r req, want int, out any) {
	sc.t.Helper()
	resp, b := sc.do(r)
	if resp.StatusCode != want {
		sc.t.Fatalf("%s %s: status %d, want %d: %s", r.method, r.path, resp.StatusCode, want, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			sc.t.Fatalf("%s %s: decode %s: %v", r.method, r.path, b, err)
		}
	}
}

// apiErr is the error body.
type apiErr struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// sseEvent is one event of a stream.
type sseEvent struct {
	ID    string
	HasID bool
	Event string
	Data  string
}

// sseStream reads an SSE response on a goroutine.
type sseStream struct {
	t      testing.TB
	resp   *http.Response
	events chan sseEvent
	pings  chan struct{}
	done   chan struct{} // closed when the body ends
	err    error
}

// stream opens an SSE request and checks the answer is a stream.
func (sc *sidecar) stream(r req) *sseStream {
	sc.t.Helper()
	return openStream(sc.t, sc.client, r)
}

func openStream(t testing.TB, c *http.Client, r req) *sseStream {
	t.Helper()
	var body io.Reader
	if r.body != "" {
		body = strings.NewReader(r.body)
	}
	hr, err := http.NewRequest(r.method, base+r.path, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(r.headers); i += 2 {
		hr.Header.Set(r.headers[i], r.headers[i+1])
	}
	resp, err := c.Do(hr)
	if err != nil {
		t.Fatalf("%s %s: %v", r.method, r.path, err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("%s %s: status %d %q: %s", r.method, r.path, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	for h, want := range map[string]string{"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("header %s = %q, want %q", h, got, want)
		}
	}
	s := &sseStream{t: t, resp: resp, events: make(chan sseEvent, 1<<16), pings: make(chan struct{}, 1<<10), done: make(chan struct{})}
	go s.read()
	t.Cleanup(s.close)
	return s
}

func (s *sseStream) read() {
	defer close(s.done)
	br := bufio.NewReader(s.resp.Body)
	var ev sseEvent
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			if !errors.Is(err, io.EOF) {
				s.err = err
			}
			return
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "":
			if ev.Data != "" || ev.Event != "" || ev.HasID {
				s.events <- ev
			}
			ev = sseEvent{}
		case strings.HasPrefix(line, ":"):
			select {
			case s.pings <- struct{}{}:
			default:
			}
		case strings.HasPrefix(line, "id: "):
			ev.ID, ev.HasID = strings.TrimPrefix(line, "id: "), true
		case strings.HasPrefix(line, "event: "):
			ev.Event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			ev.Data = strings.TrimPrefix(line, "data: ")
		default:
			s.err = errors.New("unexpected SSE line " + strconv.Quote(line))
		}
	}
}

// next returns the next event; it fails the test on timeout or end.
func (s *sseStream) next() sseEvent {
	s.t.Helper()
	select {
	case ev := <-s.events:
		return ev
	case <-s.done:
		select {
		case ev := <-s.events:
			return ev
		default:
		}
		s.t.Fatalf("stream ended (%v) while an event was expected", s.err)
	case <-time.After(waitTimeout):
		s.t.Fatal("no event in time")
	}
	return sseEvent{}
}

// rest reads every event until the stream ends.
func (s *sseStream) rest() []sseEvent {
	s.t.Helper()
	var out []sseEvent
	for {
		select {
		case ev := <-s.events:
			out = append(out, ev)
			continue
		case <-s.done:
		case <-time.After(waitTimeout):
			s.t.Fatalf("stream did not end; got %+v", out)
		}
		for {
			select {
			case ev := <-s.events:
				out = append(out, ev)
			default:
				if s.err != nil {
					s.t.Errorf("stream read: %v", s.err)
				}
				return out
			}
		}
	}
}

// ended reports whether the stream ended within d.
func (s *sseStream) ended(d time.Duration) bool {
	select {
	case <-s.done:
		return true
	case <-time.After(d):
		return false
	}
}

func (s *sseStream) close() {
	s.resp.Body.Close()
	<-s.done
}

func types(evs []sseEvent) string {
	var b []string
	for _, e := range evs {
		b = append(b, e.Event)
	}
	return strings.Join(b, ",")
}

func submitBody(text string, extra ...string) string {
	m, _ := json.Marshal(text)
	s := `{"messages":[{"role":"user","content":` + string(m) + `}]`
	for i := 0; i+1 < len(extra); i += 2 {
		v, _ := json.Marshal(extra[i+1])
		s += `,"` + extra[i] + `":` + string(v)
	}
	return s + "}"
}

// counts returns what the store holds.
func (sc *sidecar) counts() badgerstore.Report {
	sc.t.Helper()
	rep, err := sc.store.Verify(context.Background())
	if err != nil || len(rep.Problems) > 0 {
		sc.t.Fatalf("verify: %v %v", err, rep.Problems)
	}
	rep.Problems = nil
	return rep
}

// messages is GET /v1/threads/{thread}/messages: the first page.
func (sc *sidecar) messages(thread string) []engine.MessageRecord {
	sc.t.Helper()
	var page struct {
		Items []engine.MessageRecord `json:"items"`
	}
	sc.call(req{method: "GET", path: "/v1/threads/" + thread + "/messages"}, 200, &page)
	return page.Items
}

func (sc *sidecar) waitDispatch(id string, want engine.DispatchStatus) *engine.Dispatch {
	sc.t.Helper()
	var d *engine.Dispatch
	eventually(sc.t, "dispatch "+id+" "+want.String(), func() bool {
		var err error
		d, err = sc.store.LoadDispatch(context.Background(), id)
		return err == nil && d != nil && d.Status == want
	})
	return d
}

func proxyConfig(ping time.Duration) proxy.Config { return proxy.Config{PingInterval: ping} }
