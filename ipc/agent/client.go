package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	json "github.com/goccy/go-json"
	"github.com/google/uuid"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// Client connects an agent process to the sidecar and runs its handler for
// every RUN. Create it with New and start it with Serve; Submit may be
// called from any goroutine while Serve runs.
type Client struct {
	cfg Config
	log *slog.Logger

	serving atomic.Bool // Serve is running

	// handlersMu guards handlersN, the handler goroutines of every
	// connection (Serve waits for them before it returns), and
	// handlersIdle, closed when handlersN falls to 0. Not a WaitGroup: a
	// Serve that gave up on stuck handlers returns while they run, and a
	// later Serve starts new ones (found by review: a WaitGroup's Wait
	// left waiting raced with that Add).
	handlersMu   sync.Mutex
	handlersN    int
	handlersIdle chan struct{}
	// stopBy is when Serve stops waiting for handlers that ignore their
	// cancelled context (zero: not yet set). Serve's goroutine alone
	// uses it.
	stopBy time.Time
	// pool runs the handlers (made by Serve, stopped when it returns).
	pool *runPool

	mu      sync.Mutex    // guards cur and changed
	cur     *conn         // the established connection, nil between connections
	changed chan struct{} // closed (and replaced) whenever cur changes

	// threadsMu guards threads: for each thread whose handler is running,
	// a channel closed when it returns (holdThread).
	threadsMu sync.Mutex
	threads   map[string]chan struct{}
}

// New validates cfg, fills in its defaults and returns a Client. It does
// not connect: Serve does.
func New(cfg Config) (*Client, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return &Client{cfg: cfg, log: cfg.Logger, changed: make(chan struct{}), threads: map[string]chan struct{}{}}, nil
}

// holdThread waits until no handler of thread is running, then marks one
// running until release is called. A sidecar sends one run of a thread
// at a time on its connections, but after a dropped connection (a
// sidecar killed and restarted: it reclaims the dead process's claims at
// once) the thread's next run can come on the new connection while the
// handler of the dropped one still stops; the two never overlap here.
func (c *Client) holdThread(thread string, log *slog.Logger) (release func()) {
	warned := false
	for {
		c.threadsMu.Lock()
		prev, busy := c.threads[thread]
		if !busy {
			done := make(chan struct{})
			c.threads[thread] = done
			c.threadsMu.Unlock()
			return func() {
				c.threadsMu.Lock()
				delete(c.threads, thread)
				c.threadsMu.Unlock()
				close(done)
			}
		}
		c.threadsMu.Unlock()
		if !warned {
			warned = true
			log.Warn("waiting for the thread's earlier run, of a dropped connection, to return before this one starts")
		}
		<-prev
	}
}

// Serve connects to the sidecar, executes the runs it sends, and
// reconnects with jittered exponential backoff whenever the connection
// fails or the sidecar goes away (e.g. restarts), until ctx is done.
//
// When ctx is done Serve shuts down gracefully: it sends GOAWAY (so the
// sidecar sends no new run), lets running handlers finish within
// ShutdownGrace, cancels the rest, waits for every handler to return,
// closes the connection and returns nil. It returns an error when the
// sidecar refuses the handshake for good (a *HandshakeError with code
// unsupported_protocol), when Serve is already running (ErrServing), and
// when, with a StopTimeout set, handlers still ignore their cancelled
// context StopTimeout after they were cancelled (ErrHandlersStuck: they
// still run; exit the process).
func (c *Client) Serve(ctx context.Context) (err error) {
	if !c.serving.CompareAndSwap(false, true) {
		return ErrServing
	}
	defer c.serving.Store(false)
	c.pool = newRunPool()
	c.stopBy = time.Time{}
	defer func() {
		if n := c.waitHandlers(); n > 0 {
			c.pool.abandon()
			err = errors.Join(err, fmt.Errorf("%w: %d still running", ErrHandlersStuck, n))
			return
		}
		c.pool.stop() // every run has returned
	}()

	c.log.Info("agent client starting", "socket", c.cfg.Socket, "name", c.cfg.Name,
		"agent_ids", c.cfg.AgentIDs, "max_runs", c.cfg.MaxRuns)
	failures := 0
	for {
		began := time.Now()
		established, err := c.serveConn(ctx)
		if ctx.Err() != nil {
			c.log.Info("agent client stopped")
			return nil
		}
		if he := (*HandshakeError)(nil); errors.As(err, &he) && !he.Retryable() {
			c.log.Error("sidecar refused the handshake", "err", err)
			return err
		}
		if established && time.Since(began) >= c.cfg.MaxBackoff {
			// A connection that lasted is a new start; one that failed
			// soon after its handshake (the sidecar refusing what this
			// agent sends, say) counts as one more failure, or the agent
			// would reconnect at once, over and over.
			failures = 0
		}
		delay := c.backoff(failures)
		failures++
		c.log.Warn("sidecar connection failed; reconnecting", "err", err, "attempt", failures, "delay", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			c.log.Info("agent client stopped")
			return nil
		case <-t.C:
		}
	}
}

// backoff returns the delay before reconnect attempt n (from 0): a random
// duration in [0, min(MaxBackoff, MinBackoff·2ⁿ)].
func (c *Client) backoff(n int) time.Duration {
	ceil := c.cfg.MaxBackoff
	if n < 62 {
		if d := c.cfg.MinBackoff << n; d > 0 && d < ceil {
			ceil = d
		}
	}
	if ceil <= 0 {
		return 0
	}
	return rand.N(ceil + 1)
}

// waitHandlers waits for every handler goroutine, logging while some
// ignore their cancelled context, until stopBy (or StopTimeout from now
// when no drain set it). It returns how many still run then (0: all
// returned).
func (c *Client) waitHandlers() int {
	n, done := c.handlersRunning()
	if n == 0 {
		return 0
	}
	var expire <-chan time.Time
	if c.cfg.StopTimeout > 0 {
		by := c.stopBy
		if by.IsZero() {
			by = time.Now().Add(c.cfg.StopTimeout)
		}
		t := time.NewTimer(time.Until(by))
		defer t.Stop()
		expire = t.C
	}
	t := time.NewTicker(max(c.cfg.ShutdownGrace, time.Second))
	defer t.Stop()
	for {
		select {
		case <-done:
			return 0
		case <-t.C:
			n, _ := c.handlersRunning()
			c.log.Warn("still waiting for run handlers that ignore their cancelled context", "handlers", n)
		case <-expire:
			n, _ := c.handlersRunning()
			if n == 0 {
				return 0
			}
			c.log.Error("run handlers ignore their cancelled context: returning without them; they still run",
				"handlers", n, "stop_timeout", c.cfg.StopTimeout)
			return n
		}
	}
}

// handlerStarted counts a handler goroutine in; handlerDone out.
func (c *Client) handlerStarted() {
	c.handlersMu.Lock()
	defer c.handlersMu.Unlock()
	if c.handlersN == 0 {
		c.handlersIdle = make(chan struct{})
	}
	c.handlersN++
}

func (c *Client) handlerDone() {
	c.handlersMu.Lock()
	defer c.handlersMu.Unlock()
	c.handlersN--
	if c.handlersN == 0 {
		close(c.handlersIdle)
	}
}

// handlersRunning returns how many handler goroutines run and a channel
// closed once none does.
func (c *Client) handlersRunning() (int, <-chan struct{}) {
	c.handlersMu.Lock()
	defer c.handlersMu.Unlock()
	if c.handlersN == 0 {
		return 0, closedChan
	}
	return c.handlersN, c.handlersIdle
}

// setConn publishes the current connection (nil between connections).
func (c *Client) setConn(cn *conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur = cn
	close(c.changed)
	c.changed = make(chan struct{})
}

// Submit asks the sidecar to queue a background run (SUBMIT) and returns
// the queued dispatch. It waits for an established connection until ctx is
// done; Serve must be running for one to come. A refusal is a
// *SubmitError. If the connection is lost after the request was sent,
// Submit returns an error wrapping ErrConnectionLost and the run may or
// may not have been queued: set SubmitRequest.DedupeKey to retry safely.
func (c *Client) Submit(ctx context.Context, req SubmitRequest) (SubmitResult, error) {
	if req.Messages == nil {
		req.Messages = []Message{}
	}
	id := uuid.Must(uuid.NewV7()).String()
	payload, err := json.Marshal(submitPayload{Req: id, SubmitRequest: req})
	if err == nil {
		// Raw JSON fields are not checked by the encoder: bytes that are
		// not UTF-8 would make the sidecar close the connection (every
		// run on it failed), and a retry would do it again.
		err = ipc.CheckPayload(ipc.TypeSubmit, payload)
	}
	if err != nil {
		return SubmitResult{}, fmt.Errorf("agent: submit: encode request: %w", err)
	}
	for {
		c.mu.Lock()
		cn, changed := c.cur, c.changed
		c.mu.Unlock()
		if cn != nil {
			res, err := cn.submit(ctx, id, payload)
			if !errors.Is(err, errNotSent) {
				return res, err
			}
			// The connection died before the request went out: wait
			// for the next one.
		}
		select {
		case <-ctx.Done():
			return SubmitResult{}, fmt.Errorf("agent: submit: waiting for a sidecar connection: %w", context.Cause(ctx))
		case <-changed:
		}
	}
}

// submitPayload is the SUBMIT payload: the request and its id.
type submitPayload struct {
	Req string `json:"req"`
	SubmitRequest
}

// submitResultPayload is the SUBMIT_RESULT payload.
type submitResultPayload struct {
	Req string `json:"req"`
	SubmitResult
	Error *ipc.Status `json:"error,omitempty"`
}
