package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	json "github.com/goccy/go-json"
	"github.com/valyala/fasthttp"

	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// budgetBody is a submit body of about n bytes.
func budgetBody(n int) string { return submitBody(strings.Repeat("b", n-64)) }

// partialUpload sends a background submit's head and the first half of
// its body on a raw connection, and returns the connection and the rest.
func partialUpload(t *testing.T, sc *sidecar, thread, body string) (net.Conn, string) {
	t.Helper()
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	half := len(body) / 2
	fmt.Fprintf(c, "POST /v1/threads/%s/dispatches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		thread, len(body), body[:half])
	return c, body[half:]
}

// waitAdmitted waits until the budget holds some bytes.
func waitAdmitted(t *testing.T, sc *sidecar) {
	t.Helper()
	eventually(t, "the first body admitted", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_budget_bytes ") != "mailbox_http_body_budget_bytes 0"
	})
}

// readAccepted reads the answer on c and checks it is 202.
func readAccepted(t *testing.T, c net.Conn) {
	t.Helper()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("status %d, want 202", resp.StatusCode)
	}
}

// metricsOf returns the server's /metrics text.
func (sc *sidecar) metricsOf() string {
	sc.t.Helper()
	_, b := sc.do(req{method: "GET", path: "/metrics"})
	return string(b)
}

// asyncDo runs r on a goroutine; the answer arrives on the channel.
func (sc *sidecar) asyncDo(r req) <-chan answer {
	ch := make(chan answer, 1)
	go func() {
		resp, b, err := tryDo(sc.client, base, r)
		a := answer{body: b, err: err}
		if resp != nil {
			a.status, a.header = resp.StatusCode, resp.Header
		}
		ch <- a
	}()
	return ch
}

type answer struct {
	status int
	header http.Header
	body   []byte
	err    error
}

func TestALargeBodyWaitsForRoomUnderTheBodyBudget(t *testing.T) {
	const size = 40 << 10
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10, MaxBodyTotal: 64 << 10}})
	first, rest := partialUpload(t, sc, "held", budgetBody(size))
	waitAdmitted(t, sc)

	// Small requests are not charged: they pass beside it.
	sc.call(req{method: "POST", path: "/v1/threads/small/dispatches", body: submitBody("hi")}, http.StatusAccepted, nil)

	second := sc.asyncDo(req{method: "POST", path: "/v1/threads/waiting/dispatches", body: budgetBody(size)})
	eventually(t, "the second body waiting", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_waits_total ") == "mailbox_http_body_waits_total 1"
	})
	select {
	case a := <-second:
		t.Fatalf("the second body was read beside the first past the budget: %d %s %v", a.status, a.body, a.err)
	case <-time.After(200 * time.Millisecond):
	}

	// The first body completes: both are taken, and the budget is empty.
	if _, err := io.WriteString(first, rest); err != nil {
		t.Fatal(err)
	}
	readAccepted(t, first)
	select {
	case a := <-second:
		if a.err != nil || a.status != http.StatusAccepted {
			t.Fatalf("second: %d %s %v", a.status, a.body, a.err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("the second body still waits after the first was handled")
	}
	m := sc.metricsOf()
	for _, want := range []string{"mailbox_http_body_budget_bytes 0", "mailbox_http_body_refused_total 0", "mailbox_http_body_waits_total 1"} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, grep(m, "mailbox_http_body"))
		}
	}
	if n := sc.counts().Dispatches; n != 3 {
		t.Fatalf("%d dispatches, want 3", n)
	}
}

func TestABodyThatFindsNoRoomIsAnswered503AndLosesNothing(t *testing.T) {
	const size = 40 << 10
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10, MaxBodyTotal: 64 << 10, BodyWait: 100 * time.Millisecond}})
	first, rest := partialUpload(t, sc, "held", budgetBody(size))
	waitAdmitted(t, sc)

	// Sent whole, and asked first (Expect: 100-continue): both refused,
	// the second before it sends its body.
	checkRefused(t, rawSubmit(t, sc, "refused", budgetBody(size), false))
	checkRefused(t, rawSubmit(t, sc, "asked", budgetBody(size), true))
	if got := metricLine(sc.metricsOf(), "mailbox_http_body_refused_total "); got != "mailbox_http_body_refused_total 2" {
		t.Fatalf("refused counter: %q", got)
	}
	if got := metricLine(sc.metricsOf(), `mailbox_http_requests_total{route="/v1/threads/{thread_id}/dispatches",code="503"} `); !strings.HasSuffix(got, " 2") {
		t.Fatalf("503s counted: %q", got)
	}

	// The admitted body is unharmed by the refusal.
	if _, err := io.WriteString(first, rest); err != nil {
		t.Fatal(err)
	}
	readAccepted(t, first)
	// The retry finds room.
	sc.call(req{method: "POST", path: "/v1/threads/refused/dispatches", body: budgetBody(size)}, http.StatusAccepted, nil)
	if n := sc.counts().Dispatches; n != 2 {
		t.Fatalf("%d dispatches, want 2: the refused request left something behind", n)
	}
}

// rawSubmit sends a background submit on a connection of its own and
// returns the answer. With ask, it sends Expect: 100-continue and no
// body, and returns the first answer (a refusal, or 100 Continue).
func rawSubmit(t *testing.T, sc *sidecar, thread, body string, ask bool) *http.Response {
	t.Helper()
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	head := fmt.Sprintf("POST /v1/threads/%s/dispatches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", thread, len(body))
	br := bufio.NewReader(c)
	if ask {
		fmt.Fprintf(c, "%sExpect: 100-continue\r\n\r\n", head)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	// The server may close before it has read the body: the write's
	// error is not the answer.
	go io.WriteString(c, head+"\r\n"+body)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// checkRefused checks a 503 for want of room in the body budget.
func checkRefused(t *testing.T, resp *http.Response) {
	t.Helper()
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var e apiErr
	if resp.StatusCode != http.StatusServiceUnavailable || json.Unmarshal(b, &e) != nil || e.Error.Code != proxy.CodeUnavailable ||
		!strings.Contains(e.Error.Message, "--max-body-total") || resp.Header.Get("Retry-After") != "1" {
		t.Fatalf("refused body: %d %v %s", resp.StatusCode, resp.Header, b)
	}
}

func TestABodyAbandonedMidwayGivesItsRoomBack(t *testing.T) {
	const size = 40 << 10
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10, MaxBodyTotal: 64 << 10, BodyWait: 5 * time.Second}})
	first, _ := partialUpload(t, sc, "abandoned", budgetBody(size))
	waitAdmitted(t, sc)
	first.Close()
	eventually(t, "the abandoned body's room given back", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_budget_bytes ") == "mailbox_http_body_budget_bytes 0"
	})
	sc.call(req{method: "POST", path: "/v1/threads/next/dispatches", body: budgetBody(size)}, http.StatusAccepted, nil)
	if got := metricLine(sc.metricsOf(), "mailbox_http_body_waits_total "); got != "mailbox_http_body_waits_total 0" {
		t.Fatalf("the next body waited: %q", got)
	}
}

func TestAChunkedBodyIsChargedTheLargestBody(t *testing.T) {
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10, MaxBodyTotal: 64 << 10, BodyWait: 100 * time.Millisecond}})
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	body := submitBody("chunked")
	fmt.Fprintf(c, "POST /v1/threads/chunked/dispatches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n", 10, body[:10])
	eventually(t, "the chunked body admitted", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_budget_bytes ") == fmt.Sprintf("mailbox_http_body_budget_bytes %d", 64<<10)
	})
	// Nothing else large fits beside it.
	checkRefused(t, rawSubmit(t, sc, "big", budgetBody(32<<10), false))
	fmt.Fprintf(c, "%x\r\n%s\r\n0\r\n\r\n", len(body)-10, body[10:])
	readAccepted(t, c)
	if got := metricLine(sc.metricsOf(), "mailbox_http_body_budget_bytes "); got != "mailbox_http_body_budget_bytes 0" {
		t.Fatalf("after the chunked body: %q", got)
	}
}

func TestTheConnectionsGaugeCountsOpenConnections(t *testing.T) {
	sc := newSidecar(t, options{})
	var conns []net.Conn
	for range 3 {
		c, err := net.Dial("unix", sc.apiPath)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// Three raw connections, and the client's own for /metrics.
	eventually(t, "four connections counted", func() bool {
		return metricLine(sc.metricsOf(), `mailbox_http_connections{listener="api"} `) == `mailbox_http_connections{listener="api"} 4`
	})
	for _, c := range conns {
		c.Close()
	}
	eventually(t, "closed connections uncounted", func() bool {
		return metricLine(sc.metricsOf(), `mailbox_http_connections{listener="api"} `) == `mailbox_http_connections{listener="api"} 1`
	})
}

func TestABodyBudgetBelowTheLargestBodyIsRefused(t *testing.T) {
	sc := newSidecar(t, options{noAgent: true})
	_, err := proxy.New(proxy.Config{Mailbox: sc.mb, Ready: func() proxy.Readiness { return proxy.Readiness{} }, MaxBody: 1 << 20, MaxBodyTotal: 1 << 19})
	if err == nil || !strings.Contains(err.Error(), "MaxBodyTotal") {
		t.Fatalf("MaxBodyTotal below MaxBody: %v", err)
	}
}

func TestAClientSendingARefusedBodyReadsTheAnswer(t *testing.T) {
	// A body larger than the socket's buffers: refused unread and closed
	// at once, the client's write failed before it read the answer.
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 2 << 20, MaxBodyTotal: 2 << 20, BodyWait: 20 * time.Millisecond}})
	first, rest := partialUpload(t, sc, "held", budgetBody(40<<10))
	waitAdmitted(t, sc)
	for i := range 5 {
		resp, b, err := tryDo(sc.client, base, req{method: "POST", path: "/v1/threads/refused/dispatches", body: budgetBody(2<<20 - 1024)})
		if err != nil {
			t.Fatalf("refusal %d: %v", i, err)
		}
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("refusal %d: %d %s", i, resp.StatusCode, b)
		}
		resp, b, err = tryDo(sc.client, base, req{method: "POST", path: "/v1/threads/toolarge/dispatches", body: budgetBody(4 << 20)})
		if err != nil {
			t.Fatalf("too large %d: %v", i, err)
		}
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("too large %d: %d %s", i, resp.StatusCode, b)
		}
	}
	io.WriteString(first, rest)
	readAccepted(t, first)
	if n := sc.counts().Dispatches; n != 1 {
		t.Fatalf("%d dispatches, want 1", n)
	}
}

// chunkedReader hides its length, so that the client sends it chunked.
type chunkedReader struct{ io.Reader }

func TestARefusedChunkedBodyIsDrainedAndCountedUnderItsRoute(t *testing.T) {
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 2 << 20, MaxBodyTotal: 2 << 20, BodyWait: 20 * time.Millisecond}})
	first, rest := partialUpload(t, sc, "held", budgetBody(40<<10))
	waitAdmitted(t, sc)
	for i := range 3 {
		hr, _ := http.NewRequest("POST", base+"/v1/threads/chunked/dispatches", chunkedReader{strings.NewReader(budgetBody(2<<20 - 1024))})
		resp, err := sc.client.Do(hr)
		if err != nil {
			t.Fatalf("refusal %d: %v", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || hr.ContentLength != 0 {
			t.Fatalf("refusal %d: %d, length %d", i, resp.StatusCode, hr.ContentLength)
		}
	}
	if got := metricLine(sc.metricsOf(), `mailbox_http_requests_total{route="/v1/threads/{thread_id}/dispatches",code="503"} `); !strings.HasSuffix(got, " 3") {
		t.Fatalf("503s under the route: %q", got)
	}
	io.WriteString(first, rest)
	readAccepted(t, first)
}

func TestAChunkedBodyOverTheLimitWithTheTokenIs413(t *testing.T) {
	// fasthttp resets the header of a chunked body that runs over: the
	// token was read from it, and the answer was 401. The body is far
	// over the limit, more than the sockets' buffers hold: the drain
	// read only MaxBody of a chunked body, and the client still sending
	// the rest got a broken pipe instead of the answer.
	sc := newSidecar(t, options{tcp: true, proxy: proxy.Config{AuthToken: "0123456789abcdef", MaxBody: 64 << 10}})
	hr, _ := http.NewRequest("POST", "http://"+sc.tcpAddr+"/v1/threads/big/dispatches", chunkedReader{strings.NewReader(budgetBody(8 << 20))})
	hr.Header.Set("Authorization", "Bearer 0123456789abcdef")
	resp, err := sc.tcpClient.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunked body over the limit with the token: %d %s", resp.StatusCode, b)
	}
}

func TestAWaitingBodyIsRefusedAtShutdown(t *testing.T) {
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10, MaxBodyTotal: 64 << 10, BodyWait: time.Minute}})
	first, _ := partialUpload(t, sc, "held", budgetBody(40<<10))
	waitAdmitted(t, sc)
	waiting := sc.asyncDo(req{method: "POST", path: "/v1/threads/waiting/dispatches", body: budgetBody(40 << 10)})
	eventually(t, "the second body waiting", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_waits_total ") == "mailbox_http_body_waits_total 1"
	})
	stopped := make(chan struct{})
	go func() { defer close(stopped); sc.shutdownProxy() }()
	select {
	case a := <-waiting:
		if a.err == nil && a.status != http.StatusServiceUnavailable {
			t.Fatalf("a waiting body at shutdown: %d %s", a.status, a.body)
		}
	case <-time.After(waitTimeout):
		t.Fatal("a waiting body still waits after shutdown began")
	}
	first.Close()
	<-stopped
}

func TestABodyNoHookSawGivesItsRoomBackOnceStale(t *testing.T) {
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10, MaxBodyTotal: 64 << 10}})
	sc.srv.SetBodyHoldStale(100 * time.Millisecond)
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	// A chunked body whose client leaves at a chunk boundary: fasthttp
	// takes the bare EOF for a client gone and calls no hook.
	fmt.Fprintf(c, "POST /v1/threads/gone/dispatches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
	eventually(t, "the chunked body admitted", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_budget_bytes ") == fmt.Sprintf("mailbox_http_body_budget_bytes %d", 64<<10)
	})
	c.Close()
	eventually(t, "its room given back", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_budget_bytes ") == "mailbox_http_body_budget_bytes 0"
	})
	sc.call(req{method: "POST", path: "/v1/threads/next/dispatches", body: budgetBody(40 << 10)}, http.StatusAccepted, nil)
}

func TestWaitingBodiesAreAdmittedInTurn(t *testing.T) {
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10, MaxBodyTotal: 64 << 10}})
	first, rest := partialUpload(t, sc, "held", budgetBody(40<<10))
	waitAdmitted(t, sc)
	// A chunked body, charged the largest, waits for the budget to empty.
	chunked, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	defer chunked.Close()
	body := submitBody("chunked")
	fmt.Fprintf(chunked, "POST /v1/threads/chunked/dispatches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(body), body)
	eventually(t, "the chunked body waiting", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_waits_total ") == "mailbox_http_body_waits_total 1"
	})
	// A smaller body would fit beside the first, but waits its turn.
	small := sc.asyncDo(req{method: "POST", path: "/v1/threads/small/dispatches", body: budgetBody(20 << 10)})
	eventually(t, "the smaller body waiting", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_body_waits_total ") == "mailbox_http_body_waits_total 2"
	})
	select {
	case a := <-small:
		t.Fatalf("the smaller body passed the chunked one: %d %s %v", a.status, a.body, a.err)
	case <-time.After(200 * time.Millisecond):
	}

	io.WriteString(first, rest)
	readAccepted(t, first)
	readAccepted(t, chunked)
	select {
	case a := <-small:
		if a.err != nil || a.status != http.StatusAccepted {
			t.Fatalf("the smaller body: %d %s %v", a.status, a.body, a.err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("the smaller body still waits")
	}
}

func TestALargeBodysBufferIsNotKeptForTheConnectionsNextRequest(t *testing.T) {
	sc := newSidecar(t, options{proxy: proxy.Config{MaxBody: 64 << 10}})
	for _, c := range []struct {
		size int
		kept bool
	}{{40 << 10, false}, {1 << 10, true}} {
		var r fasthttp.Request
		r.Header.SetMethod("POST")
		r.SetRequestURI("/v1/threads/t/dispatches")
		body := budgetBody(c.size)
		r.SetBodyString(body)
		r.Header.SetContentLength(len(body)) // as a parsed request's
		var ctx fasthttp.RequestCtx
		c1, c2 := net.Pipe()
		ctx.Init2(c1, nil, false)
		r.CopyTo(&ctx.Request)
		sc.srv.ServeRequest(&ctx)
		c1.Close()
		c2.Close()
		if ctx.Response.StatusCode() != http.StatusAccepted {
			t.Fatalf("%d bytes: %d %s", c.size, ctx.Response.StatusCode(), ctx.Response.Body())
		}
		if kept := cap(ctx.Request.Body()) > 0; kept != c.kept {
			t.Errorf("a body of %d bytes: buffer of %d bytes kept after its request", c.size, cap(ctx.Request.Body()))
		}
	}
}

func TestALargeAnswersBufferIsNotKeptForTheConnectionsNextRequest(t *testing.T) {
	// fasthttp keeps a connection's response body buffer for its next
	// request too: a page of messages (up to 8 MiB and more) kept its
	// size on the server for as long as the connection stayed open.
	sc := newSidecar(t, options{noAgent: true, proxy: proxy.Config{MaxBody: 64 << 10}})
	if resp, b := sc.do(req{method: "POST", path: "/v1/threads/t/dispatches", body: budgetBody(40 << 10)}); resp.StatusCode != http.StatusAccepted {
		t.Fatalf("submit: %d %s", resp.StatusCode, b)
	}
	var ctx fasthttp.RequestCtx
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	ctx.Init2(c1, nil, false)
	ctx.Request.Header.SetMethod("GET")
	ctx.Request.SetRequestURI("/v1/threads/t/messages")
	sc.srv.ServeRequest(&ctx)
	if ctx.Response.StatusCode() != http.StatusOK || len(ctx.Response.Body()) < 40<<10 {
		t.Fatalf("the page: %d, %d bytes", ctx.Response.StatusCode(), len(ctx.Response.Body()))
	}
	ctx.Response.Reset() // as fasthttp does before the connection's next request
	if n := cap(ctx.Response.Body()); n != 0 {
		t.Errorf("an answer's buffer of %d bytes kept after its request", n)
	}
}

func TestALargeBodyWhoseReadFailedDoesNotKeepItsBuffer(t *testing.T) {
	sc := newSidecar(t, options{noAgent: true, proxy: proxy.Config{MaxBody: 64 << 10}})
	var ctx fasthttp.RequestCtx
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	ctx.Init2(c1, nil, false)
	ctx.Request.Header.SetMethod("POST")
	ctx.Request.SetRequestURI("/v1/threads/t/dispatches")
	ctx.Request.Header.SetContentLength(40 << 10)
	if !sc.srv.Admit(&ctx.Request.Header) {
		t.Fatal("no room")
	}
	// What fasthttp leaves of a body whose read failed half-way.
	ctx.Request.SetBody(make([]byte, 20<<10))
	ctx.Request.ResetBody()
	if cap(ctx.Request.Body()) == 0 {
		t.Fatal("the rig: a reset body lost its buffer")
	}
	sc.srv.ReadError(&ctx, io.ErrUnexpectedEOF)
	if n := cap(ctx.Request.Body()); n != 0 {
		t.Errorf("a failed read kept a buffer of %d bytes", n)
	}
	if got := metricLine(sc.metricsOf(), "mailbox_http_body_budget_bytes "); got != "mailbox_http_body_budget_bytes 0" {
		t.Fatalf("budget after the failed read: %q", got)
	}
}
