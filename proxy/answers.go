package proxy

import (
	"net"
	"sync"
	"sync/atomic"

	"github.com/VictoriaMetrics/metrics"
)

// answerFree is the size of an answer the answer budget does not count.
const answerFree = 64 << 10

// answerBudget bounds the bytes of large answers (over answerFree) that
// fasthttp is writing at once, as bodyBudget bounds request bodies. An
// answer is written after the handler returns, as fast as its client
// reads it: a hundred clients that each asked for an 8 MiB page and read
// slowly held 800 MB for minutes even within their write bound (found by
// review). The bytes are charged to the connection in the handler and
// given back when fasthttp reports the connection idle (the answer is
// written) or closed. A GET or HEAD answer that does not fit is replaced
// by 503 unavailable with Retry-After; another method's is charged
// anyway, as its effect has taken place. One answer always fits.
type answerBudget struct {
	limit int64

	mu   sync.Mutex
	used int64
	held map[net.Conn]int64
	n    atomic.Int32 // len(held), read without mu by every connection state change

	inUse   atomic.Int64 // used, for the gauge
	refused *metrics.Counter
}

func newAnswerBudget(limit int64, set *metrics.Set) *answerBudget {
	a := &answerBudget{limit: limit, held: map[net.Conn]int64{}, refused: set.NewCounter(metricAnswersRefused)}
	set.NewGauge(metricAnswerBytes, func() float64 { return float64(a.inUse.Load()) })
	return a
}

// reserve charges n bytes more of an answer being built to connection c
// when they fit (one answer always fits), and reports whether they did.
// Pages reserve as they read, so that a page finds out there is no room
// before it holds its items, not after it has encoded them (100 clients
// asking at once for a 9 MB page took the heap to 1.48 GB before the
// answers were charged).
func (a *answerBudget) reserve(c net.Conn, n int64) bool {
	if c == nil {
		return true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.fitsLocked(c, n) {
		return false
	}
	a.chargeLocked(c, n)
	return true
}

// topUp charges connection c up to n bytes for its answer, beyond what
// the answer's building reserved; with force it always does, otherwise
// it reports false, charging nothing, when the rest does not fit.
func (a *answerBudget) topUp(c net.Conn, n int64, force bool) bool {
	if c == nil {
		return true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	more := n - a.held[c]
	if more <= 0 {
		return true
	}
	if !force && !a.fitsLocked(c, more) {
		a.refused.Inc()
		return false
	}
	a.chargeLocked(c, more)
	return true
}

// fitsLocked reports whether n bytes more for c fit: under the limit, or
// c's answer is the only one (one answer always fits).
func (a *answerBudget) fitsLocked(c net.Conn, n int64) bool {
	return a.used == a.held[c] || a.used+n <= a.limit
}

func (a *answerBudget) chargeLocked(c net.Conn, n int64) {
	a.used += n
	a.inUse.Store(a.used)
	a.held[c] += n
	a.n.Store(int32(len(a.held)))
}

// release gives back what c's answers hold: they are written, or c closed.
func (a *answerBudget) release(c net.Conn) {
	if a.n.Load() == 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if n, ok := a.held[c]; ok {
		delete(a.held, c)
		a.n.Store(int32(len(a.held)))
		a.used -= n
		a.inUse.Store(a.used)
	}
}
