package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	json "github.com/goccy/go-json"
	"github.com/valyala/fasthttp"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/loglimit"
)

// Defaults of Config.
const (
	DefaultMaxBody      = 4 << 20
	DefaultMaxConns     = 2048
	DefaultPingInterval = 15 * time.Second
)

// Readiness is the answer of /readyz and /healthz: whether the sidecar
// takes work, each check behind that verdict, and whether an agent is
// connected (informational: readiness never depends on the agent).
type Readiness struct {
	Ready          bool            `json:"ready"`
	Checks         map[string]bool `json:"checks"`
	AgentConnected bool            `json:"agent_connected"`
}

// Config configures a Server.
type Config struct {
	// Mailbox is the engine the API drives (required).
	Mailbox *engine.Mailbox
	// Ready reports readiness as the binary sees it: startup recovery
	// done, store writable, agent socket listening, not shutting down
	// (required). It is called for /readyz and /healthz only.
	Ready func() Readiness
	// Live reports whether the process still responds, for /livez: an
	// error (a loop or a store write stuck) answers 503 with it. Nil:
	// always live while the server answers.
	Live func() error
	// Metrics are further sets written on /metrics (the engine's, the
	// hub's), after the server's own set and before the process metrics.
	Metrics []*metrics.Set
	// MaxBody is the largest request body in bytes; larger bodies are
	// answered 413 too_large. Default 4 MiB.
	MaxBody int
	// MaxBodyTotal bounds the bytes of the request bodies larger than
	// 16 KiB that are read and handled at once (a chunked body counts as
	// MaxBody); a request past it waits for room up to BodyWait, then is
	// answered 503 unavailable. One body is always admitted. Default
	// 64 MiB, or MaxBody when that is larger; less than MaxBody is an
	// error.
	MaxBodyTotal int64
	// BodyWait is how long a request waits for room under MaxBodyTotal.
	// Default 10 s.
	BodyWait time.Duration
	// MaxConns is the most connections each API listener (the Unix
	// socket, TCP) keeps open at once, SSE streams and idle keep-alive
	// connections included; past it a new connection is answered 503
	// unavailable with Retry-After: 1 and closed (connRefusal). Default
	// 2048. The admin listener's cap is adminMaxConns.
	MaxConns int
	// AuthToken is the bearer token every request on the TCP listener must
	// carry; ServeTCP refuses to start without one.
	AuthToken string
	// PingInterval is how often an SSE stream sends a ": ping" comment.
	// Default 15 s.
	PingInterval time.Duration
	// StallTimeout is how long one write to a streaming client may stay
	// stuck before the stream is cut off (a large event is written in
	// pieces of 32 KiB, each bounded alone). Default max(4×PingInterval,
	// 10 s).
	StallTimeout time.Duration
	// Logger receives one debug line per request and a warning per 5xx
	// (at most one a second, with the count of those held back).
	// Default slog.Default().
	Logger *slog.Logger
}

// validate fills in defaults and checks the fields.
func (c *Config) validate() error {
	if c.Mailbox == nil {
		return errors.New("proxy: config: Mailbox is required")
	}
	if c.Ready == nil {
		return errors.New("proxy: config: Ready is required")
	}
	switch {
	case c.MaxBody == 0:
		c.MaxBody = DefaultMaxBody
	case c.MaxBody < 0:
		return fmt.Errorf("proxy: config: MaxBody %d is negative", c.MaxBody)
	}
	switch {
	case c.MaxBodyTotal == 0:
		c.MaxBodyTotal = max(DefaultMaxBodyTotal, int64(c.MaxBody))
	case c.MaxBodyTotal < int64(c.MaxBody):
		return fmt.Errorf("proxy: config: MaxBodyTotal %d is below MaxBody %d", c.MaxBodyTotal, c.MaxBody)
	}
	switch {
	case c.MaxConns == 0:
		c.MaxConns = DefaultMaxConns
	case c.MaxConns < 0:
		return fmt.Errorf("proxy: config: MaxConns %d is negative", c.MaxConns)
	}
	switch {
	case c.BodyWait == 0:
		c.BodyWait = DefaultBodyWait
	case c.BodyWait < 0:
		return fmt.Errorf("proxy: config: BodyWait %s is negative", c.BodyWait)
	}
	switch {
	case c.PingInterval == 0:
		c.PingInterval = DefaultPingInterval
	case c.PingInterval < 0:
		return fmt.Errorf("proxy: config: PingInterval %s is negative", c.PingInterval)
	}
	switch {
	case c.StallTimeout == 0:
		c.StallTimeout = max(4*c.PingInterval, minStall)
	case c.StallTimeout < 0:
		return fmt.Errorf("proxy: config: StallTimeout %s is negative", c.StallTimeout)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// listener kinds: what a fasthttp server behind a listener serves.
type listenerKind uint8

const (
	kindAPI   listenerKind = iota // the full API, no auth (Unix socket)
	kindTCP                       // the full API behind the bearer token
	kindAdmin                     // probes and /metrics only
)

// String names the listener in logs: api, tcp or admin.
func (k listenerKind) String() string {
	switch k {
	case kindAPI:
		return "api"
	case kindTCP:
		return "tcp"
	default:
		return "admin"
	}
}

// Server serves the client API. Create it with New; serve listeners with
// ServeAPI, ServeTCP and ServeAdmin; stop it with Shutdown.
//
// Locks: mu guards closing, streams, lingering, hijacked and lns. The
// server never holds it across I/O or engine calls.
type Server struct {
	cfg     Config
	mb      *engine.Mailbox
	log     *slog.Logger
	m       *httpMetrics
	token   [sha256.Size]byte // SHA-256 of AuthToken
	servers [3]*fasthttp.Server
	body    *bodyBudget   // bytes of the large request bodies in flight
	answers *answerBudget // bytes of the large answers being written
	// answerRate is answerReadRate; faster in tests.
	answerRate int64

	base     context.Context // context of engine calls; cancelled when Shutdown gives up
	stopBase context.CancelFunc
	done     chan struct{} // closed when Shutdown begins: streams end

	mu      sync.Mutex
	closing bool
	streams map[*sseStream]struct{}
	// lingering holds the connections of ended streams whose last bytes
	// fasthttp may still be writing, each with the end of the stream's
	// stall bound; a connection leaves it when its response is written
	// (idle) or it closes. One that closed before it was added (its
	// client left as the stream ended) is dropped once its bound is past
	// (lingerPrune). nLingering is its size, read without mu by the
	// ConnState hook on every request.
	lingering  map[net.Conn]time.Time
	nLingering atomic.Int32
	pruneAt    int // size of lingering at which linger drops the entries past their bound
	lns        []net.Listener
	failLog    loglimit.EverySecond // the warnings for 5xx answers (a failing store answers every request 503; the counters have each)
	streamWG   sync.WaitGroup       // stream goroutines; Add only under mu while !closing
	refusals   [3][]byte            // the answer to a connection past its listener's cap, by listenerKind
	refusing   chan struct{}        // refusals draining their request (refuseConn); send only under mu while !closing
	refuseWG   sync.WaitGroup       // their goroutines; Add only under mu while !closing
	// hijacked holds the connections of HTTP/1.0 streams (hijacked from
	// fasthttp) of which one of the two ends has been seen: fasthttp's
	// StateHijacked or the stream's end (hijackSeen).
	hijacked map[net.Conn]hijackMark
}

// New validates cfg and returns a Server. It registers the server's
// metrics (mailbox_http_…) in a set of its own and makes /metrics carry
// HELP and TYPE lines (metrics.ExposeMetadata).
func New(cfg Config) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	metrics.ExposeMetadata(true)
	s := &Server{
		cfg: cfg, mb: cfg.Mailbox, log: cfg.Logger, m: newHTTPMetrics(),
		done: make(chan struct{}), streams: map[*sseStream]struct{}{},
		lingering: map[net.Conn]time.Time{}, pruneAt: lingerPrune, answerRate: answerReadRate,
		hijacked: map[net.Conn]hijackMark{},
	}
	s.token = sha256.Sum256([]byte(cfg.AuthToken))
	s.refusing = make(chan struct{}, maxRefusing)
	for k := range s.refusals {
		s.refusals[k] = refusal(listenerKind(k), s.maxConns(listenerKind(k)))
	}
	s.base, s.stopBase = context.WithCancel(context.Background())
	s.body = newBodyBudget(cfg.MaxBodyTotal, cfg.BodyWait, s.done, s.m.set)
	s.answers = newAnswerBudget(cfg.MaxBodyTotal, s.m.set)
	for k := range s.servers {
		kind := listenerKind(k)
		srv := &fasthttp.Server{
			Handler:                      func(ctx *fasthttp.RequestCtx) { s.handle(ctx, kind) },
			ErrorHandler:                 func(ctx *fasthttp.RequestCtx, err error) { s.readError(ctx, err, kind) },
			ConnState:                    func(c net.Conn, st fasthttp.ConnState) { s.connState(c, st, kind) },
			Name:                         "mailbox-sidecar",
			MaxRequestBodySize:           cfg.MaxBody,
			ReadBufferSize:               readBufferSize,
			ReadTimeout:                  30 * time.Second,
			IdleTimeout:                  2 * time.Minute,
			CloseOnShutdown:              true,
			DisablePreParseMultipartForm: true,
			NoDefaultServerHeader:        true,
			Logger:                       fasthttpLogger{s.log},
		}
		if kind != kindAdmin {
			srv.HeaderReceived = func(h *fasthttp.RequestHeader) fasthttp.RequestConfig {
				// A request without the token has its body refused
				// unread, and a 100-continue is not invited (found by
				// review: 150 connections each uploading 4 MiB without a
				// token took the heap past --memory-limit, since fasthttp
				// reads a body whole before the handler, where the token
				// was first checked).
				if kind == kindTCP && !s.authorizedHeader(h) {
					return fasthttp.RequestConfig{MaxRequestBodySize: 1}
				}
				// A body the budget has no room for is refused unread
				// too, answered 503 by readError.
				if !s.body.admit(h, charge(h, s.cfg.MaxBody), func() int { return headerRoute(h) }) {
					return fasthttp.RequestConfig{MaxRequestBodySize: 1}
				}
				return fasthttp.RequestConfig{}
			}
		}
		if kind != kindAdmin {
			// A client that asks before sending its body is told no
			// before it sends it.
			srv.ExpectHandler = func(ctx *fasthttp.RequestCtx) int {
				if kind == kindTCP && !s.authorized(ctx) {
					s.unauthorized(ctx)
					return fasthttp.StatusUnauthorized
				}
				if hold, ok := s.body.takeRefused(&ctx.Request.Header); ok {
					// A client tired of waiting for "100 Continue"
					// (curl: 1 s) sends its body anyway.
					lingerFor(ctx, hold.length)
					s.bodyRefused(ctx)
					s.m.of(hold.route).observe(fasthttp.StatusServiceUnavailable, 0)
					return fasthttp.StatusServiceUnavailable
				}
				return fasthttp.StatusContinue
			}
		}
		if kind == kindAdmin {
			// No streams on the admin listener: a write timeout is safe.
			srv.WriteTimeout = 30 * time.Second
			srv.MaxRequestBodySize = 64 << 10
		}
		s.servers[k] = srv
	}
	return s, nil
}

// ServeAPI serves the full client API on ln without authentication (the
// Unix socket, whose file mode is the access control). It blocks until ln
// fails or Shutdown; then it returns ErrServerClosed.
func (s *Server) ServeAPI(ln net.Listener) error { return s.serve(ln, kindAPI) }

// ServeTCP serves the full client API on ln; every request must carry
// "Authorization: Bearer <AuthToken>" (401 unauthorized otherwise). It
// refuses to start without an AuthToken.
func (s *Server) ServeTCP(ln net.Listener) error {
	if s.cfg.AuthToken == "" {
		return errors.New("proxy: ServeTCP needs an AuthToken")
	}
	return s.serve(ln, kindTCP)
}

// ServeAdmin serves only /metrics, /livez, /readyz and /healthz on ln.
func (s *Server) ServeAdmin(ln net.Listener) error { return s.serve(ln, kindAdmin) }

func (s *Server) serve(ln net.Listener, kind listenerKind) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.lns = append(s.lns, ln)
	s.mu.Unlock()
	err := s.servers[kind].Serve(&retryListener{
		Listener: ln, name: kind.String(), log: s.log, retries: s.m.acceptRetries, linger: kind != kindAdmin,
		full:   func() bool { return s.m.conns[kind].Load() >= int64(s.maxConns(kind)) },
		refuse: func(c net.Conn) { s.refuseConn(c, kind) },
	})
	if s.isClosing() {
		return ErrServerClosed
	}
	return err
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// streamGrace is how long Shutdown lets streams notice it before it cuts
// off the ones stuck writing to a client that does not read.
const streamGrace = 250 * time.Millisecond

// Shutdown stops the server: the listeners close, requests arriving on
// open connections are answered 503, open SSE streams end (their runs go
// on), and Shutdown waits for the handlers in flight, bounded by ctx. If
// ctx ends first, engine calls still in flight are cancelled and ctx's
// error is returned. Safe to call twice.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if !s.closing {
		s.closing = true
		close(s.done)
	}
	lns := s.lns
	s.lns = nil
	s.mu.Unlock()
	defer s.stopBase()

	var wg sync.WaitGroup
	errs := make([]error, len(s.servers))
	for i, srv := range s.servers {
		wg.Go(func() { errs[i] = srv.ShutdownWithContext(ctx) })
	}
	for _, ln := range lns {
		ln.Close() // fasthttp closed those it had registered already
	}
	s.endStreams(ctx)
	wg.Wait()
	s.refuseWG.Wait() // none starts once closing; each ends within refusalDrain
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("proxy shutdown: %w", err)
	}
	for _, err := range errs {
		if err != nil && !errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("proxy shutdown: %w", err)
		}
	}
	return nil
}

// endStreams waits for the streams to end after done was closed. Streams
// blocked on a client that does not read are cut off after streamGrace
// (their connection's write deadline is moved to now), and so are the
// connections of streams that ended earlier whose last bytes are still
// stuck: fasthttp's Shutdown waits for every open connection.
func (s *Server) endStreams(ctx context.Context) {
	ended := make(chan struct{})
	go func() {
		s.streamWG.Wait()
		close(ended)
	}()
	t := time.NewTimer(streamGrace)
	defer t.Stop()
	select {
	case <-ended:
		// No stream can start now; a lingering connection gets the same
		// grace for its client to read what is left.
		if !s.anyLingering(time.Now()) {
			return
		}
		select {
		case <-t.C:
		case <-ctx.Done():
		}
	case <-t.C:
	case <-ctx.Done():
	}
	now := time.Now()
	s.mu.Lock()
	for st := range s.streams {
		st.cutOff()
	}
	for c, until := range s.lingering {
		if until.After(now) {
			c.SetWriteDeadline(now)
		}
	}
	s.mu.Unlock()
	<-ended // a cut-off stream's writes fail at once
}

// lingerPrune is the smallest size of the lingering set at which linger
// drops the entries past their bound; it then waits for twice the size
// left, so the walks cost O(1) per entry added.
const lingerPrune = 64

// linger records the connection of a stream that ended with bytes maybe
// still on their way, until the stream's stall bound (see lingering).
func (s *Server) linger(c net.Conn, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.lingering[c]; !ok {
		s.nLingering.Add(1)
	}
	s.lingering[c] = until
	if len(s.lingering) < s.pruneAt {
		return
	}
	now := time.Now()
	for c, until := range s.lingering {
		if !until.After(now) {
			delete(s.lingering, c)
			s.nLingering.Add(-1)
		}
	}
	s.pruneAt = max(lingerPrune, 2*len(s.lingering))
}

// hijackMark is what has been seen of a hijacked connection's two ends.
type hijackMark struct {
	kind         listenerKind
	given, ended bool // fasthttp gave it up (StateHijacked); its stream ended
}

// hijackSeen records one end of a hijacked connection: fasthttp's
// StateHijacked (given, with the listener's kind) or its stream's end.
// The second of the two uncounts the connection: fasthttp starts the
// stream before it reports the state, and no ConnState follows it.
func (s *Server) hijackSeen(c net.Conn, kind listenerKind, ended bool) {
	s.mu.Lock()
	m := s.hijacked[c]
	if ended {
		m.ended = true
	} else {
		m.given, m.kind = true, kind
	}
	if !m.given || !m.ended {
		s.hijacked[c] = m
		s.mu.Unlock()
		return
	}
	delete(s.hijacked, c)
	s.mu.Unlock()
	s.m.conns[m.kind].Add(-1)
}

// anyLingering reports whether a lingering connection is within its bound.
func (s *Server) anyLingering(now time.Time) bool {
	if s.nLingering.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, until := range s.lingering {
		if until.After(now) {
			return true
		}
	}
	return false
}

// connState is fasthttp's ConnState hook: a connection whose response is
// written (idle) or that closed no longer lingers, and its answer gives
// back its share of the answer budget.
func (s *Server) connState(c net.Conn, state fasthttp.ConnState, kind listenerKind) {
	switch state {
	case fasthttp.StateNew:
		s.m.conns[kind].Add(1)
	case fasthttp.StateClosed:
		s.m.conns[kind].Add(-1)
	case fasthttp.StateHijacked:
		// Counted (and so under --max-conns) until its stream ends.
		s.hijackSeen(c, kind, false)
	}
	if state != fasthttp.StateNew && state != fasthttp.StateActive {
		s.answers.release(c)
	}
	if (state != fasthttp.StateIdle && state != fasthttp.StateClosed) || s.nLingering.Load() == 0 {
		return
	}
	s.mu.Lock()
	if _, ok := s.lingering[c]; ok {
		delete(s.lingering, c)
		s.nLingering.Add(-1)
	}
	s.mu.Unlock()
}

// chargeAnswer charges a large answer to the answer budget, replacing a
// GET's or HEAD's that does not fit with 503 (answerBudget).
func (s *Server) chargeAnswer(ctx *fasthttp.RequestCtx) {
	if ctx.Response.IsBodyStream() {
		return
	}
	n := int64(len(ctx.Response.Body()))
	if n <= answerFree {
		return
	}
	retryable := ctx.IsGet() || ctx.IsHead()
	if !s.answers.topUp(ctx.Conn(), n, !retryable) {
		s.answerRefused(ctx)
	}
}

// answerRefused answers 503: the answers being written leave no room.
func (s *Server) answerRefused(ctx *fasthttp.RequestCtx) {
	ctx.Response.Header.Set("Retry-After", "1")
	writeError(ctx, fasthttp.StatusServiceUnavailable, CodeUnavailable,
		fmt.Sprintf("the answers being written fill the server's budget (--max-body-total, %d bytes): retry", s.cfg.MaxBodyTotal))
}

// answerRoom is the room callback of the pages read for ctx: it reserves
// an item's bytes of the answer budget for ctx's connection.
func (s *Server) answerRoom(ctx *fasthttp.RequestCtx) func(n int) bool {
	c := ctx.Conn()
	return func(n int) bool { return s.answers.reserve(c, int64(n)) }
}

// errNoAnswerRoom is a page's error when not even its first item found
// room in the answer budget.
var errNoAnswerRoom = errors.New("no room for the answer")

// pageError answers a page's error: 503 with Retry-After when it found
// no room (answerBudget), else err for the caller to answer.
func (s *Server) pageError(ctx *fasthttp.RequestCtx, err error) error {
	if errors.Is(err, errNoAnswerRoom) {
		s.answers.refused.Inc()
		s.answerRefused(ctx)
		return nil
	}
	return err
}

// answerReadRate is the slowest a client may read an answer on average:
// an answer's write is bounded by the stall timeout plus its size at
// this rate.
const answerReadRate = 64 << 10 // bytes a second

// boundAnswerWrite bounds how long fasthttp may take to write the answer
// the handler left in ctx, as a stream's writes are bounded: a client
// that asked for a page of 8 MiB and did not read it held the page on
// the server until it closed its connection (found by review: 100 such
// clients held 914 MiB of heap for as long as they stayed). A stream's
// own writes extend the bound as they go.
func (s *Server) boundAnswerWrite(ctx *fasthttp.RequestCtx) {
	c := ctx.Conn()
	if c == nil {
		return
	}
	d := s.stall()
	if !ctx.Response.IsBodyStream() {
		d += time.Duration(int64(len(ctx.Response.Body())) * int64(time.Second) / s.answerRate)
	}
	c.SetWriteDeadline(time.Now().Add(d))
}

// handle serves one request of a listener.
func (s *Server) handle(ctx *fasthttp.RequestCtx, kind listenerKind) {
	start := time.Now()
	ri := -1
	defer func() {
		// fasthttp does not recover handler panics: one request must not
		// take the sidecar down.
		if p := recover(); p != nil {
			s.log.Error("http handler panicked", "method", string(ctx.Method()),
				"path", string(ctx.URI().PathOriginal()), "panic", p, "stack", string(debug.Stack()))
			writeError(ctx, fasthttp.StatusInternalServerError, CodeInternal, "internal error")
			s.m.of(ri).observe(fasthttp.StatusInternalServerError, time.Since(start))
		}
	}()
	if kind != kindAdmin {
		// The body's bytes are held until the request is handled; then
		// a large body's buffer is dropped. fasthttp keeps a
		// connection's body buffer for its next request (unless
		// ReduceMemoryUsage, which costs every request): a client that
		// sent 4 MiB once kept 4 MiB on the server for as long as its
		// connection stayed open, a stream's or an idle one's, outside
		// the budget (found measuring it: 100 foreground streams held
		// 348 MB of request bodies).
		if hold, _ := s.body.take(&ctx.Request.Header); hold.n > 0 {
			defer func() {
				ctx.Request.SwapBody(nil)
				s.body.release(hold.n)
			}()
		}
		// A stream that ended on this connection left its stall bound on
		// it (the stream's last bytes are written after the handler
		// returned); the response before this request was written whole,
		// so the bound is spent. The admin listener has fasthttp's own
		// write timeout and no streams.
		if c := ctx.Conn(); c != nil {
			c.SetWriteDeadline(time.Time{})
		}
	}
	err := s.route(ctx, kind, &ri)
	if err != nil {
		s.fail(ctx, err)
	}
	if kind != kindAdmin {
		s.chargeAnswer(ctx)
		s.boundAnswerWrite(ctx)
	}
	status := ctx.Response.StatusCode()
	took := time.Since(start)
	s.m.of(ri).observe(status, took)
	if s.log.Enabled(context.Background(), slog.LevelDebug) {
		pattern := routeUnmatched
		if ri >= 0 {
			pattern = routeTable[ri].pattern
		}
		s.log.LogAttrs(context.Background(), slog.LevelDebug, "http request",
			slog.String("method", string(ctx.Method())), slog.String("route", pattern),
			slog.Int("status", status), slog.Duration("duration", took))
	}
}

// route authenticates, matches and dispatches a request; *ri is set to
// the matched route.
func (s *Server) route(ctx *fasthttp.RequestCtx, kind listenerKind, ri *int) error {
	// Matched first, so that a refused request counts under its route;
	// refused before a 404, which would tell who has no token what exists.
	i, rawID := match(ctx.URI().PathOriginal())
	if i >= 0 && (kind != kindAdmin || routeTable[i].probe) {
		*ri = i
	}
	if kind == kindTCP && !s.authorized(ctx) {
		ctx.Response.Header.Set("WWW-Authenticate", `Bearer realm="mailbox-sidecar"`)
		return errUnauthorized
	}
	if *ri < 0 {
		return errNotFound("no route %s", ctx.URI().PathOriginal())
	}
	if enc := ctx.Request.Header.Peek(fasthttp.HeaderContentEncoding); len(enc) > 0 && !bytes.EqualFold(enc, []byte("identity")) {
		// A compressed body read as JSON was "not a JSON object" (found
		// by review).
		return engine.Validationf("Content-Encoding %q is not supported: send the body uncompressed", enc)
	}
	r := &routeTable[i]
	var h handler
	switch {
	case ctx.IsGet():
		h = r.get
	case ctx.IsHead() && r.head():
		h = r.get // fasthttp sends no body in answer to HEAD
	case ctx.IsPost():
		h = r.post
	}
	if h == nil {
		ctx.Response.Header.Set("Allow", r.allow)
		return &httpError{fasthttp.StatusMethodNotAllowed, CodeMethodNotAllowed,
			fmt.Sprintf("%s %s: method not allowed (allowed: %s)", ctx.Method(), r.pattern, r.allow)}
	}
	if !r.probe && s.isClosing() {
		ctx.SetConnectionClose()
		return errUnavailable("the sidecar is shutting down")
	}
	id := ""
	if r.idName != "" {
		if bytes.IndexByte(rawID, '%') >= 0 {
			// A client that escapes its path segments (encodeURIComponent
			// escapes ':') names the same id. Only the segment is
			// decoded: an escaped '/' is part of no id.
			dec, err := url.PathUnescape(string(rawID))
			if err != nil {
				return badID(r.idName, string(rawID))
			}
			rawID = []byte(dec)
		}
		if !validPathID(rawID) {
			return badID(r.idName, string(rawID))
		}
		id = string(rawID)
	}
	return h(s, ctx, id)
}

// authorized checks the bearer token in constant time (both sides hashed
// to the same length first).
func (s *Server) authorized(ctx *fasthttp.RequestCtx) bool {
	return s.authorizedHeader(&ctx.Request.Header)
}

// errUnauthorized answers a TCP request without the right token.
var errUnauthorized = &httpError{fasthttp.StatusUnauthorized, CodeUnauthorized, "missing or wrong bearer token"}

// unauthorized answers ctx 401 with the scheme to use.
func (s *Server) unauthorized(ctx *fasthttp.RequestCtx) {
	ctx.Response.Header.Set("WWW-Authenticate", `Bearer realm="mailbox-sidecar"`)
	writeError(ctx, errUnauthorized.status, errUnauthorized.code, errUnauthorized.msg)
}

// bodyRefused answers a request whose body found no room under
// MaxBodyTotal: 503, retry after a second. Its body is not kept: the
// connection drains it as it closes (lingerConn), or, for a client that
// asked first (Expect: 100-continue), is never sent it.
func (s *Server) bodyRefused(ctx *fasthttp.RequestCtx) {
	ctx.Response.Header.Set("Retry-After", "1")
	writeError(ctx, fasthttp.StatusServiceUnavailable, CodeUnavailable,
		fmt.Sprintf("the request bodies in flight fill the server's budget (--max-body-total, %d bytes): retry", s.cfg.MaxBodyTotal))
}

// authorizedHeader is authorized for a request of which only the
// headers are read.
func (s *Server) authorizedHeader(rh *fasthttp.RequestHeader) bool {
	h := rh.Peek(fasthttp.HeaderAuthorization)
	const scheme = "bearer "
	if len(h) <= len(scheme) || !bytes.EqualFold(h[:len(scheme)], []byte(scheme)) {
		return false
	}
	got := sha256.Sum256(h[len(scheme):])
	return subtle.ConstantTimeCompare(got[:], s.token[:]) == 1
}

// writable refuses writes while the mailbox does not take work.
func (s *Server) writable() error {
	if !s.mb.Running() {
		return errUnavailable("the mailbox is not running (starting up or shutting down)")
	}
	return nil
}

// commandable refuses cancels, interrupts and decisions until the
// mailbox has started; its shutdown drain still takes them.
func (s *Server) commandable() error {
	if !s.mb.TakesCommands() {
		return errUnavailable("the mailbox is not running (starting up)")
	}
	return nil
}

// fail answers err in the API's error shape.
func (s *Server) fail(ctx *fasthttp.RequestCtx, err error) {
	status, code := classify(err)
	msg := err.Error()
	if errors.Is(err, engine.ErrQueueFull) {
		ctx.Response.Header.Set("Retry-After", "1")
	}
	if status >= 500 {
		if n, ok := s.failLog.Allow(time.Now()); ok {
			s.log.Warn("http request failed", "method", string(ctx.Method()), "path", string(ctx.URI().PathOriginal()),
				"status", status, "err", err, "suppressed_before", n)
		}
		if status == fasthttp.StatusInternalServerError {
			msg = "internal error"
		}
	}
	writeError(ctx, status, code, msg)
}

func writeError(ctx *fasthttp.RequestCtx, status int, code, msg string) {
	b, _ := json.Marshal(errorBody{Error: errorDetail{Code: code, Message: msg}}) // strings always marshal
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	ctx.Response.SetBodyRaw(b)
}

// writeJSON answers v as JSON with status.
//
// The encoding is the body as it is (SetBodyRaw), not copied into the
// response's buffer: fasthttp keeps that buffer for the connection's
// next request, and a page of 8 MiB kept its size on the server for as
// long as its connection stayed open.
func (s *Server) writeJSON(ctx *fasthttp.RequestCtx, status int, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode response: %w", err)
	}
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	ctx.Response.SetBodyRaw(b)
	return nil
}

// readBufferSize bounds a request's line and headers (fasthttp's
// default): a larger one is answered 431.
const readBufferSize = 4096

// readError answers a request fasthttp could not read (malformed, body
// over MaxBody, read timeout) in the API's error shape.
func (s *Server) readError(ctx *fasthttp.RequestCtx, err error, kind listenerKind) {
	status, code, msg := fasthttp.StatusBadRequest, CodeValidation, "malformed HTTP request: "+scrubReadError(err.Error())
	var ne net.Error
	var small *fasthttp.ErrSmallBuffer
	// A hold is the budget's record of a large body: fasthttp resets the
	// header when a chunked one runs over MaxBody, so its length, route
	// and authorisation (it was let in) come from the hold.
	hold, held := s.body.take(&ctx.Request.Header)
	if hold.n > 0 {
		// Admitted, then its read failed: fasthttp may have grown the
		// buffer to the whole announced length, and would keep it for
		// the connection's next request (see handle).
		ctx.Request.SwapBody(nil)
		s.body.release(hold.n)
	}
	ri, _ := match(ctx.URI().PathOriginal())
	if held {
		ri = hold.route
	}
	tooLarge := errors.Is(err, fasthttp.ErrBodyTooLarge)
	if tooLarge && (held || kind != kindTCP || s.authorized(ctx)) {
		// A body refused unread is drained as the connection closes, so
		// that a client still sending it reads the answer. Not for one
		// without the token: who has none gets no more of our time.
		length := int64(ctx.Request.Header.ContentLength())
		if held {
			length = hold.length
		}
		lingerFor(ctx, length)
	}
	switch {
	case hold.refused && tooLarge:
		// Refused unread for want of room (HeaderReceived).
		s.bodyRefused(ctx)
		s.m.of(ri).observe(fasthttp.StatusServiceUnavailable, 0)
		return
	case kind == kindTCP && tooLarge && !held && !s.authorized(ctx):
		// Its body was refused unread (HeaderReceived).
		s.unauthorized(ctx)
		s.m.of(ri).observe(fasthttp.StatusUnauthorized, 0)
		return
	case errors.As(err, &small):
		// fasthttp's own message names its option and quotes the
		// headers; the client needs neither.
		status, code, msg = fasthttp.StatusRequestHeaderFieldsTooLarge, CodeTooLarge,
			fmt.Sprintf("request line and headers are larger than %d bytes", readBufferSize)
	case tooLarge:
		status, code, msg = fasthttp.StatusRequestEntityTooLarge, CodeTooLarge,
			fmt.Sprintf("request body is larger than %d bytes", s.cfg.MaxBody)
	case errors.As(err, &ne) && ne.Timeout():
		status, code, msg = fasthttp.StatusRequestTimeout, CodeValidation, "timed out reading the request"
	}
	writeError(ctx, status, code, msg)
	s.m.of(ri).observe(status, 0)
}

// headerRoute is the route of a request of which only the header is read
// (-1: none).
func headerRoute(h *fasthttp.RequestHeader) int {
	uri := h.RequestURI()
	if i := bytes.IndexByte(uri, '?'); i >= 0 {
		uri = uri[:i]
	}
	ri, _ := match(uri)
	return ri
}

// lingerFor makes the request's connection drain up to n bytes of its
// body as it closes (lingerConn; chunked, n < 0: up to lingerMax).
func lingerFor(ctx *fasthttp.RequestCtx, n int64) {
	if lc, ok := ctx.Conn().(*lingerConn); ok {
		if n < 0 {
			n = lingerMax
		}
		lc.lingerFor(n)
	}
}

// scrubReadError is fasthttp's message for a request it could not read,
// cut before the request bytes it quotes: they hold the client's headers,
// its bearer token among them, which an error body must not echo to
// whatever logs it (found by review).
func scrubReadError(msg string) string {
	for _, mark := range []string{`"`, "contents", "Buffer size", "buffer size", "\n", "\r"} {
		if i := strings.Index(msg, mark); i >= 0 {
			msg = msg[:i]
		}
	}
	msg = strings.TrimRight(msg, " .,:;")
	if len(msg) > 200 {
		msg = msg[:200]
	}
	if msg == "" {
		return "unreadable request"
	}
	return msg
}

// fasthttpLogger sends fasthttp's own messages to slog at debug level
// (they are about misbehaving connections, not about the sidecar).
type fasthttpLogger struct{ log *slog.Logger }

func (l fasthttpLogger) Printf(format string, args ...any) {
	l.log.Debug("fasthttp", "msg", fmt.Sprintf(format, args...))
}
