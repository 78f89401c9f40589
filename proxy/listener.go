package proxy

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/mailbox-sidecar/mailbox-sidecar/internal/drain"
)

// retryListener retries an accept that failed for want of a resource —
// file descriptors (EMFILE, ENFILE), socket buffers (ENOBUFS) or kernel
// memory (ENOMEM) — after a backoff of 5 ms doubling to 1 s, instead of
// returning the error: fasthttp takes any accept error that is not a
// timeout as permanent and stops serving, and the sidecar then shut down
// (found by review: 20 000 idle connections to the admin port, no token
// needed, stopped the whole process). Connections already open go on;
// new ones wait in the kernel's backlog until a descriptor frees. A
// failure is logged at warn at most once a minute per listener; retries
// counts each.
type retryListener struct {
	net.Listener
	name    string
	log     *slog.Logger
	retries *metrics.Counter
	linger  bool // wrap connections in lingerConn (the API listeners)
	// full reports whether the listener serves its most connections;
	// a connection accepted then goes to refuse instead of fasthttp.
	// Both nil: no cap.
	full   func() bool
	refuse func(net.Conn)

	mu       sync.Mutex
	loggedAt time.Time // the last warning
}

// retryAccept is the backoff's ceiling.
const retryAccept = time.Second

// Accept implements net.Listener.
func (l *retryListener) Accept() (net.Conn, error) {
	var backoff time.Duration
	for {
		c, err := l.Listener.Accept()
		if err == nil && l.full != nil && l.full() {
			l.refuse(c)
			continue
		}
		if err == nil && l.linger {
			return &lingerConn{Conn: c}, nil
		}
		if err == nil || !resourceExhausted(err) {
			return c, err
		}
		l.retries.Inc()
		backoff = min(max(2*backoff, 5*time.Millisecond), retryAccept)
		l.warn(err, backoff)
		time.Sleep(backoff)
	}
}

func (l *retryListener) warn(err error, backoff time.Duration) {
	l.mu.Lock()
	now := time.Now()
	due := now.Sub(l.loggedAt) >= time.Minute
	if due {
		l.loggedAt = now
	}
	l.mu.Unlock()
	if due {
		l.log.Warn("accept failed for want of a resource; retrying (open connections go on, new ones wait)",
			"listener", l.name, "err", err, "backoff", backoff)
	}
}

// resourceExhausted reports an accept error that a freed resource cures.
func resourceExhausted(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// lingerDrain bounds how long a closing connection reads what its client
// is still sending (lingerConn), and lingerMax how much.
const (
	lingerDrain = time.Second
	lingerMax   = 16 << 20
)

// lingerConn is an accepted connection that can be told to drain, when
// it closes, the request body the server refused unread (413 too large,
// 503 for want of room under MaxBodyTotal): it closes its sending side,
// so that the client reads the answer to its end, then reads and drops
// what the client still sends, up to the body's announced length (a
// chunked body's is unknown: lingerMax) and lingerDrain, before it
// closes. Closed at once, a client still writing its body got
// a broken pipe instead of the answer (Go's client, over the Unix socket:
// 103 of 187 refusals in the thirty-fourth session's measurement), as
// the kernel refuses writes to a socket whose reader is gone.
//
// The cost: fasthttp writes a response larger than its 4 KiB buffer with
// one writev only to a *net.UnixConn or *net.TCPConn, so through the
// wrapper such a response is copied and written in two calls. The admin
// listener, whose bodies are small and whose /metrics answers are large,
// is not wrapped.
type lingerConn struct {
	net.Conn
	drain atomic.Int64 // bytes to drain on Close; 0: close at once
}

// lingerFor makes Close drain up to n bytes (at most lingerMax).
func (c *lingerConn) lingerFor(n int64) { c.drain.Store(min(max(n, 0), lingerMax)) }

// Close implements net.Conn.
func (c *lingerConn) Close() error {
	return drain.Close(c.Conn, c.drain.Swap(0), time.Now().Add(lingerDrain))
}
