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

// charge charges an answer of n bytes to connection c. With force it
// always does; otherwise it reports false, charging nothing, when the
// answer does not fit beside those being written.
func (a *answerBudget) charge(c net.Conn, n int64, force bool) bool {
	if n <= answerFree || c == nil {
		return true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !force && a.used > 0 && a.used+n > a.limit {
		a.refused.Inc()
		return false
	}
	a.used += n
	a.inUse.Store(a.used)
	a.held[c] += n
	a.n.Store(int32(len(a.held)))
	return true
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
