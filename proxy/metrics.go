package proxy

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// Metric names.
const (
	metricRequests     = "mailbox_http_requests_total"
	metricDuration     = "mailbox_http_request_duration_seconds"
	metricSubscribers  = "mailbox_http_sse_subscribers"
	metricDropped      = "mailbox_http_sse_dropped_total"
	metricRetries      = "mailbox_http_accept_retries_total"
	metricConns        = "mailbox_http_connections"
	metricConnsRefused = "mailbox_http_connections_refused_total"
	metricBodyBytes    = "mailbox_http_body_budget_bytes"
	metricBodyWaits    = "mailbox_http_body_waits_total"
	metricBodyRefused  = "mailbox_http_body_refused_total"

	metricAnswerBytes    = "mailbox_http_answer_budget_bytes"
	metricAnswersRefused = "mailbox_http_answers_refused_total"
)

// durationBuckets span a Unix-socket round trip (~100 µs) to a foreground
// submit that waits for the thread's active run to release (seconds).
var durationBuckets = []float64{
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
}

// httpMetrics is the server's metric set: per route a duration histogram
// and a counter per status code (looked up once, not formatted per
// request), the open streams and the streams dropped for slowness.
type httpMetrics struct {
	set           *metrics.Set
	routes        []routeMetrics // parallel to routeTable
	unmatched     routeMetrics
	subscribers   atomic.Int64
	dropped       *metrics.Counter
	acceptRetries *metrics.Counter
	conns         [3]atomic.Int64     // open connections by listenerKind
	connsRefused  [3]*metrics.Counter // connections refused past a listener's cap
}

type routeMetrics struct {
	set     *metrics.Set
	route   string
	seconds *metrics.PrometheusHistogram
	codes   sync.Map // int status → *metrics.Counter
}

func newHTTPMetrics() *httpMetrics {
	m := &httpMetrics{set: metrics.NewSet(), routes: make([]routeMetrics, len(routeTable))}
	for i := range routeTable {
		m.routes[i].init(m.set, routeTable[i].pattern)
	}
	m.unmatched.init(m.set, routeUnmatched)
	m.set.NewGauge(metricSubscribers, func() float64 { return float64(m.subscribers.Load()) })
	m.dropped = m.set.NewCounter(metricDropped)
	m.acceptRetries = m.set.NewCounter(metricRetries)
	for k := range m.conns {
		m.set.NewGauge(fmt.Sprintf(`%s{listener=%q}`, metricConns, listenerKind(k)), func() float64 { return float64(m.conns[k].Load()) })
		m.connsRefused[k] = m.set.NewCounter(fmt.Sprintf(`%s{listener=%q}`, metricConnsRefused, listenerKind(k)))
	}
	return m
}

func (rm *routeMetrics) init(set *metrics.Set, route string) {
	rm.set, rm.route = set, route
	rm.seconds = set.NewPrometheusHistogramExt(fmt.Sprintf(`%s{route=%q}`, metricDuration, route), durationBuckets)
}

func (rm *routeMetrics) counter(code int) *metrics.Counter {
	if c, ok := rm.codes.Load(code); ok {
		return c.(*metrics.Counter)
	}
	c := rm.set.GetOrCreateCounter(fmt.Sprintf(`%s{route=%q,code="%d"}`, metricRequests, rm.route, code))
	rm.codes.Store(code, c)
	return c
}

// observe records one request.
func (rm *routeMetrics) observe(code int, took time.Duration) {
	rm.counter(code).Inc()
	rm.seconds.Update(took.Seconds())
}

// of returns the metrics of route ri (-1: unmatched).
func (m *httpMetrics) of(ri int) *routeMetrics {
	if ri < 0 {
		return &m.unmatched
	}
	return &m.routes[ri]
}
