package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
)

// Defaults of the request-body budget.
const (
	// DefaultMaxBodyTotal is the default of Config.MaxBodyTotal.
	DefaultMaxBodyTotal = 64 << 20
	// DefaultBodyWait is the default of Config.BodyWait.
	DefaultBodyWait = 10 * time.Second
	// bodyFree is the largest body not charged to the budget: the hot
	// path's submits are far smaller, and a body this small costs less
	// than the connection that carries it.
	bodyFree = 16 << 10
	// holdStale is how long a body admitted by HeaderReceived may stay
	// unclaimed by a handler before a waiter gives its bytes back. A
	// request's head and body are read within the server's ReadTimeout
	// (30 s); past it fasthttp either called the handler or gave up on
	// the body, and on some of those paths (a client that closed
	// mid-body) it calls no hook of ours.
	holdStale = 35 * time.Second
)

// bodyBudget bounds the bytes of request bodies the server reads and
// handles at once. fasthttp reads a body whole before the handler runs,
// so without it every connection could bring MaxBody: a hundred clients
// each submitting 4 MiB took the sidecar to 1.28 GB of resident memory
// against a 512 MiB --memory-limit (bench/README.md, the thirty-fourth
// session).
//
// A request announcing a body larger than bodyFree (a chunked one counts
// as MaxBody) is admitted in HeaderReceived, before fasthttp reads its
// body, when its bytes fit beside those admitted already (or nothing else
// is admitted: one body always fits); otherwise its connection waits for
// room up to the wait, reading nothing more meanwhile, and is then
// answered 503. The bytes are held from admission until the handler
// returns (the body, its decoded request and the store's commit all live
// within it); a body whose read failed gives them back in the error
// handler, and one that neither hook saw (fasthttp drops a request whose
// client closed mid-body silently) when its header is reused or when a
// waiter finds it older than holdStale.
//
// Holds are keyed by the request header, which fasthttp passes to
// HeaderReceived and keeps in the request context the handler gets: one
// request at a time per connection, so one hold per header.
type bodyBudget struct {
	limit int64
	wait  time.Duration
	done  <-chan struct{} // closed at shutdown: waiters give up

	mu      sync.Mutex
	used    int64
	changed chan struct{} // closed and replaced when bytes are given back
	holds   map[*fasthttp.RequestHeader]bodyHold
	nHolds  atomic.Int32 // len(holds), read without mu by every request

	inUse   atomic.Int64 // used, for the gauge
	waits   *metrics.Counter
	refused *metrics.Counter
}

// bodyHold is the budget's record of one request.
type bodyHold struct {
	n       int64     // bytes held; 0 for a request refused
	since   time.Time // admission
	refused bool      // waited in vain: the error handler answers 503
}

func newBodyBudget(limit int64, wait time.Duration, done <-chan struct{}, set *metrics.Set) *bodyBudget {
	b := &bodyBudget{
		limit: limit, wait: wait, done: done,
		changed: make(chan struct{}), holds: map[*fasthttp.RequestHeader]bodyHold{},
		waits:   set.NewCounter(metricBodyWaits),
		refused: set.NewCounter(metricBodyRefused),
	}
	set.NewGauge(metricBodyBytes, func() float64 { return float64(b.inUse.Load()) })
	return b
}

// charge is what a request with header h costs the budget: 0 for a small
// or absent body and for one over maxBody (fasthttp refuses it unread).
func charge(h *fasthttp.RequestHeader, maxBody int) int64 {
	switch n := h.ContentLength(); {
	case n == -1: // chunked: its length shows only as it is read
		return int64(maxBody)
	case n <= bodyFree || n > maxBody:
		return 0
	default:
		return int64(n)
	}
}

// admit charges n bytes for the request of header h, waiting for room up
// to the budget's wait. It reports false when the wait ran out or the
// server is shutting down; the request is then recorded as refused, for
// the error handler. A hold h still has (its last request was dropped
// unseen) is given back first.
func (b *bodyBudget) admit(h *fasthttp.RequestHeader, n int64) bool {
	if n == 0 && b.nHolds.Load() == 0 {
		return true // the hot path: a small body, nothing held
	}
	b.mu.Lock()
	b.dropLocked(h)
	if n == 0 {
		b.mu.Unlock()
		return true
	}
	var deadline *time.Timer
	waited := false
	for b.used > 0 && b.used+n > b.limit {
		if !waited {
			waited = true
			b.waits.Inc()
			b.sweepLocked(time.Now())
			if b.used == 0 || b.used+n <= b.limit {
				break
			}
			deadline = time.NewTimer(b.wait)
			defer deadline.Stop()
		}
		changed := b.changed
		b.mu.Unlock()
		select {
		case <-changed:
			b.mu.Lock()
		case <-deadline.C:
			b.mu.Lock()
			if b.used == 0 || b.used+n <= b.limit {
				continue // freed at the last moment
			}
			b.refuseLocked(h)
			b.mu.Unlock()
			return false
		case <-b.done:
			b.mu.Lock()
			b.refuseLocked(h)
			b.mu.Unlock()
			return false
		}
	}
	b.used += n
	b.inUse.Store(b.used)
	b.holds[h] = bodyHold{n: n, since: time.Now()}
	b.nHolds.Store(int32(len(b.holds)))
	b.mu.Unlock()
	return true
}

// refuseLocked records that the request of h waited in vain.
func (b *bodyBudget) refuseLocked(h *fasthttp.RequestHeader) {
	b.refused.Inc()
	b.holds[h] = bodyHold{refused: true, since: time.Now()}
	b.nHolds.Store(int32(len(b.holds)))
}

// take removes the hold of h and returns its bytes, which the caller
// gives back with release when done with the body, and whether the
// request was refused. Without holds it costs one atomic load.
func (b *bodyBudget) take(h *fasthttp.RequestHeader) (n int64, refused bool) {
	if b.nHolds.Load() == 0 {
		return 0, false
	}
	b.mu.Lock()
	hold, ok := b.holds[h]
	if ok {
		delete(b.holds, h)
		b.nHolds.Store(int32(len(b.holds)))
	}
	b.mu.Unlock()
	return hold.n, hold.refused
}

// takeRefused removes the hold of h if it records a refusal, and reports
// whether it did; an admitted request's hold stays for its handler.
func (b *bodyBudget) takeRefused(h *fasthttp.RequestHeader) bool {
	if b.nHolds.Load() == 0 {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if hold, ok := b.holds[h]; ok && hold.refused {
		delete(b.holds, h)
		b.nHolds.Store(int32(len(b.holds)))
		return true
	}
	return false
}

// release gives back n bytes taken with take.
func (b *bodyBudget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.releaseLocked(n)
	b.mu.Unlock()
}

func (b *bodyBudget) releaseLocked(n int64) {
	b.used -= n
	b.inUse.Store(b.used)
	close(b.changed)
	b.changed = make(chan struct{})
}

// dropLocked gives back the hold of h, if any.
func (b *bodyBudget) dropLocked(h *fasthttp.RequestHeader) {
	if hold, ok := b.holds[h]; ok {
		delete(b.holds, h)
		b.nHolds.Store(int32(len(b.holds)))
		if hold.n > 0 {
			b.releaseLocked(hold.n)
		}
	}
}

// sweepLocked gives back the holds no handler claimed within holdStale.
func (b *bodyBudget) sweepLocked(now time.Time) {
	for h, hold := range b.holds {
		if now.Sub(hold.since) > holdStale {
			b.dropLocked(h)
		}
	}
}
