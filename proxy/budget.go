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
	// unclaimed by a handler before its bytes are given back. A
	// request's head and body are read within the server's ReadTimeout
	// (30 s); past it fasthttp either called the handler or gave up on
	// the body, and on some of those paths it calls no hook of ours: a
	// chunked body whose client closed at a chunk boundary (a bare EOF,
	// which fasthttp takes for a client that left), an Expect:
	// 100-continue whose "100 Continue" could not be written.
	holdStale = 35 * time.Second
	// sweepEvery is how often take looks for stale holds while any are
	// held.
	sweepEvery = time.Second
)

// bodyBudget bounds the bytes of request bodies the server reads and
// handles at once. fasthttp reads a body whole before the handler runs,
// so without it every connection could bring MaxBody: a hundred clients
// each submitting 4 MiB took the sidecar to 1.06 GB of anonymous memory
// against a 512 MiB --memory-limit, three hundred to 2.8 GB
// (bench/README.md, the thirty-fourth session).
//
// A request announcing a body larger than bodyFree (a chunked one counts
// as MaxBody) is admitted in HeaderReceived, before fasthttp reads its
// body, when its bytes fit beside those admitted already (or nothing else
// is admitted: one body always fits); otherwise its connection waits for
// room up to the wait, reading nothing more meanwhile, and is then
// answered 503. Waiting requests are admitted in their order of arrival,
// and a new one waits behind them even when it would fit. The bytes are held from admission until the handler
// returns (the body, its decoded request and the store's commit all live
// within it); a body whose read failed gives them back in the error
// handler, and one that neither hook saw (see holdStale) when its header
// is reused or once it is older than holdStale (take and a waiter look).
//
// Holds are keyed by the request header, which fasthttp passes to
// HeaderReceived and keeps in the request context the handler gets: one
// request at a time per connection, so one hold per header. A hold also
// keeps what the error handler needs of the header, which fasthttp
// resets when a chunked body runs over (its length, so that the body is
// drained; and that the request was let in, so authorised).
type bodyBudget struct {
	limit int64
	wait  time.Duration
	stale time.Duration   // holdStale; shorter in tests
	done  <-chan struct{} // closed at shutdown: waiters give up

	mu        sync.Mutex
	used      int64
	holds     map[*fasthttp.RequestHeader]bodyHold
	nHolds    atomic.Int32  // len(holds), read without mu by every request
	nextSweep time.Time     // take's next look for stale holds
	queue     []*bodyWaiter // the waiting requests, in arrival order

	inUse   atomic.Int64 // used, for the gauge
	waits   *metrics.Counter
	refused *metrics.Counter
}

// bodyHold is the budget's record of one request.
type bodyHold struct {
	n       int64     // bytes held; 0 for a request refused
	length  int64     // the body's announced length (-1 if chunked: unknown)
	route   int       // the request's route (-1: none), for the metrics
	since   time.Time // admission
	refused bool      // waited in vain: the error handler answers 503
}

func newBodyBudget(limit int64, wait time.Duration, done <-chan struct{}, set *metrics.Set) *bodyBudget {
	b := &bodyBudget{
		limit: limit, wait: wait, stale: holdStale, done: done,
		holds:   map[*fasthttp.RequestHeader]bodyHold{},
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
// the error handler. route gives the request's route, for the hold. A
// hold h still has (its last request was dropped
// unseen) is given back first.
func (b *bodyBudget) admit(h *fasthttp.RequestHeader, n int64, route func() int) bool {
	if n == 0 && b.nHolds.Load() == 0 {
		return true // the hot path: a small body, nothing held
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.dropLocked(h)
	if n == 0 {
		return true
	}
	fits := func() bool { return b.used == 0 || b.used+n <= b.limit }
	if len(b.queue) > 0 || !fits() {
		b.waits.Inc()
		b.sweepLocked(time.Now())
	}
	if len(b.queue) > 0 || !fits() {
		// Wait in turn: a body that fits does not pass one that waits
		// (a chunked body, charged MaxBody, would starve behind smaller
		// ones). Only the first is woken when bytes are given back.
		me := &bodyWaiter{wake: make(chan struct{}, 1)}
		b.queue = append(b.queue, me)
		first := func() bool { return b.queue[0] == me }
		deadline := time.NewTimer(b.wait)
		defer deadline.Stop()
		for !first() || !fits() {
			b.mu.Unlock()
			select {
			case <-me.wake:
				b.mu.Lock()
			case <-deadline.C:
				b.mu.Lock()
				b.sweepLocked(time.Now())
				if !first() || !fits() {
					b.leaveLocked(me)
					b.refuseLocked(h, route())
					return false
				}
			case <-b.done:
				b.mu.Lock()
				b.leaveLocked(me)
				b.refuseLocked(h, route())
				return false
			}
		}
		b.leaveLocked(me)
	}
	b.used += n
	b.inUse.Store(b.used)
	b.holds[h] = bodyHold{n: n, length: int64(h.ContentLength()), route: route(), since: time.Now()}
	b.nHolds.Store(int32(len(b.holds)))
	return true
}

// refuseLocked records that the request of h waited in vain.
func (b *bodyBudget) refuseLocked(h *fasthttp.RequestHeader, route int) {
	b.refused.Inc()
	b.holds[h] = bodyHold{length: int64(h.ContentLength()), route: route, refused: true, since: time.Now()}
	b.nHolds.Store(int32(len(b.holds)))
}

// take removes the hold of h and returns it, and whether there was one;
// the caller gives its bytes back with release when done with the body.
// Without holds it costs one atomic load.
func (b *bodyBudget) take(h *fasthttp.RequestHeader) (bodyHold, bool) {
	if b.nHolds.Load() == 0 {
		return bodyHold{}, false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	hold, ok := b.holds[h]
	if ok {
		delete(b.holds, h)
		b.nHolds.Store(int32(len(b.holds)))
	}
	if now := time.Now(); now.After(b.nextSweep) {
		b.nextSweep = now.Add(sweepEvery)
		b.sweepLocked(now)
	}
	return hold, ok
}

// takeRefused removes the hold of h if it records a refusal and returns
// it; an admitted request's hold stays for its handler.
func (b *bodyBudget) takeRefused(h *fasthttp.RequestHeader) (bodyHold, bool) {
	if b.nHolds.Load() == 0 {
		return bodyHold{}, false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if hold, ok := b.holds[h]; ok && hold.refused {
		delete(b.holds, h)
		b.nHolds.Store(int32(len(b.holds)))
		return hold, true
	}
	return bodyHold{}, false
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
	b.wakeFirstLocked()
}

// bodyWaiter is a request waiting for room, woken through wake (one
// slot: a wake-up is never lost, never blocks the waker).
type bodyWaiter struct{ wake chan struct{} }

// wakeFirstLocked wakes the first waiting request, the one that may fit.
// Waking every waiter at every change cost a crowd of N waiters N
// wake-ups per change, all but one of them to wait again.
func (b *bodyBudget) wakeFirstLocked() {
	if len(b.queue) > 0 {
		select {
		case b.queue[0].wake <- struct{}{}:
		default:
		}
	}
}

// leaveLocked takes me out of the queue and wakes the first: if me was
// first, the next in turn may fit.
func (b *bodyBudget) leaveLocked(me *bodyWaiter) {
	for i, w := range b.queue {
		if w == me {
			b.queue = append(b.queue[:i], b.queue[i+1:]...)
			break
		}
	}
	b.wakeFirstLocked()
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

// sweepLocked gives back the holds no hook claimed within the stale bound.
func (b *bodyBudget) sweepLocked(now time.Time) {
	for h, hold := range b.holds {
		if now.Sub(hold.since) > b.stale {
			b.dropLocked(h)
		}
	}
}
