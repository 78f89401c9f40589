package proxy

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
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
