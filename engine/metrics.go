package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// Metric names (Prometheus style; labels are bounded: operation, result,
// status, outcome — never ids).
const (
	metricOps        = "mailbox_operations_total"
	metricOpSeconds  = "mailbox_operation_duration_seconds"
	metricDepth      = "mailbox_dispatch_depth"
	metricQueueDepth = "mailbox_queue_depth"
	metricActiveRuns = "mailbox_active_runs"
	// metricEventBufferBytes is the event data the running runs' buffers
	// hold (EventBufferTotalBytes bounds it).
	metricEventBufferBytes = "mailbox_event_buffer_bytes"
	// metricSuspendedRuns counts the attempts here waiting on a tool call:
	// part of mailbox_active_runs, and not stuck.
	metricSuspendedRuns = "mailbox_suspended_runs"
	metricHeld          = "mailbox_dispatch_held_threads"
	metricReadyWait     = "mailbox_dispatch_ready_wait_seconds"
	metricEnqToStart    = "mailbox_dispatch_enqueue_to_start_seconds"
	metricEligStart     = "mailbox_dispatch_eligible_to_start_seconds"
	metricClaimStart    = "mailbox_dispatch_claim_to_start_seconds"
	metricRunSeconds    = "mailbox_run_duration_seconds"
	metricEnqToDone     = "mailbox_dispatch_enqueue_to_complete_seconds"
	metricRuntime       = "mailbox_dispatch_runtime_seconds"
	metricRuns          = "mailbox_runs_total"
	metricDeadLetter    = "mailbox_dead_letters_total"
	metricDepthErrs     = "mailbox_dispatch_depth_errors_total"
	metricQueueFull     = "mailbox_queue_full_total"
	metricRenewals      = "mailbox_lease_renewals_total"
	metricLive          = "mailbox_live_commands_total"
	metricSigPulled     = "mailbox_dispatch_signal_pulled_total"
	metricSigAck        = "mailbox_dispatch_signal_ack_total"
	metricSigNack       = "mailbox_dispatch_signal_nack_total"
	metricSigRedeliv    = "mailbox_dispatch_signal_redelivery_total"
)

// Histogram buckets (upper bounds in seconds). The Prometheus defaults
// (5 ms to 10 s) put nearly every store operation in the first bucket and
// a long agent run past the last; these resolve what each figure measures.
var (
	// OperationBuckets span a store operation or commit: tens of
	// microseconds in memory, a few fsyncs on a slow disk, seconds on a
	// failing one. The Badger store uses them for its commit histograms.
	OperationBuckets = []float64{
		0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
		0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
	}
	// waitBuckets span a dispatch's waits and a run's duration: a
	// millisecond from claim to start, up to an hour in a backlog or in a
	// long agent run.
	waitBuckets = []float64{
		0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
		10, 30, 60, 120, 300, 600, 1800, 3600,
	}
)

// engineMetrics is a Mailbox's metric set.
type engineMetrics struct {
	set *metrics.Set

	depth scrapeRead[StatusCounts] // the dispatch counts
	wait  scrapeRead[float64]      // mailbox_dispatch_ready_wait_seconds

	ops sync.Map // opKey → *opMetrics: the per-call path formats no names
	// series holds the counters and histograms of count and seconds by
	// seriesKey, so that a run's path formats no names either.
	series sync.Map
}

// seriesKey names one series: a metric and at most two label pairs.
type seriesKey struct {
	name   string
	labels [4]string
	n      int // labels used
}

func newSeriesKey(name string, labels []string) seriesKey {
	k := seriesKey{name: name, n: len(labels)}
	if len(labels) > len(k.labels) || len(labels)%2 != 0 {
		// A bug in the caller. The labels are not in the message: they
		// would escape, and every call's variadic slice with them.
		panic(fmt.Sprintf("metric %s: %d label strings, want pairs, at most 2", name, len(labels)))
	}
	copy(k.labels[:], labels)
	return k
}

// String is the series' name as exposed: name{k1="v1",k2="v2"}.
func (k seriesKey) String() string {
	if k.n == 0 {
		return k.name
	}
	s := k.name + "{"
	for i := 0; i < k.n; i += 2 {
		if i > 0 {
			s += ","
		}
		s += fmt.Sprintf("%s=%q", k.labels[i], k.labels[i+1])
	}
	return s + "}"
}

type opKey struct{ name, result string }

type opMetrics struct {
	count   *metrics.Counter
	seconds *metrics.PrometheusHistogram
}

func newEngineMetrics(countFn func() (StatusCounts, error), waitFn func() (float64, error), active func() float64) *engineMetrics {
	em := &engineMetrics{set: metrics.NewSet()}
	em.depth.read, em.wait.read = countFn, waitFn
	for _, st := range AllStatuses {
		em.set.NewGauge(fmt.Sprintf(`%s{status=%q}`, metricDepth, st.String()), func() float64 {
			return float64(em.counts().Get(st))
		})
	}
	em.set.NewGauge(metricQueueDepth, func() float64 { return float64(em.counts().Get(StatusQueued)) })
	em.set.NewGauge(metricReadyWait, func() float64 { return em.wait.get(em) })
	em.set.NewGauge(metricActiveRuns, active)
	// Counters an operator alerts on are there from the first scrape, at
	// zero (found by review: absent until first used, so a rate over them
	// was no data, not zero).
	for _, r := range []string{"ok", "lost", "error"} {
		em.count(metricRenewals, "result", r)
	}
	for _, c := range []string{deadLetterPermanent, deadLetterAttempts, deadLetterLease, deadLetterRestart} {
		em.count(metricDeadLetter, "cause", c)
	}
	for _, o := range []OutcomeKind{OutcomeCompleted, OutcomeTransient, OutcomePermanent, OutcomeAbandoned} {
		em.count(metricRuns, "outcome", o.String())
	}
	em.count(metricRuns, "outcome", outcomeCancelled)
	em.count(metricDepthErrs)
	for _, k := range []string{"messages", "decision"} {
		for _, r := range []string{"delivered", "not_delivered"} {
			em.count(metricLive, "kind", k, "result", r)
		}
	}
	return em
}

// counts returns dispatch counts at most one second old (gauges read them
// at scrape time).
func (em *engineMetrics) counts() StatusCounts { return em.depth.get(em) }

// scrapeRead is a value the gauges read from the store at scrape time: at
// most once a second. A read that fails keeps the last value, is counted
// (mailbox_dispatch_depth_errors_total) and is not tried again within the
// second: every gauge of a scrape asked the store again, each waiting its
// timeout (found by review: seven counts per scrape, past a scrape's
// deadline on a lagging NATS index).
type scrapeRead[T any] struct {
	mu   sync.Mutex
	at   time.Time // the last read (zero: none yet)
	v    T
	read func() (T, error)
}

// get returns the value, read again if the last read is a second old.
func (r *scrapeRead[T]) get(em *engineMetrics) T {
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.at) > time.Second {
		v, err := r.read()
		if err == nil {
			r.v = v
		} else {
			em.count(metricDepthErrs).Inc()
		}
		r.at = time.Now()
	}
	return r.v
}

// Dead-letter causes (mailbox_dead_letters_total{cause}) and the outcome
// of an attempt a user's cancel settled (mailbox_runs_total{outcome}).
const (
	deadLetterPermanent = "permanent"      // the agent failed the run for good
	deadLetterAttempts  = "attempts_spent" // a failed attempt spent the last one
	deadLetterLease     = "lease_expired"  // a lapsed lease spent the last one
	deadLetterRestart   = "restart"        // an earlier process's claim, reclaimed at start, spent the last one
	outcomeCancelled    = OutcomeCancelledLabel
)

func (em *engineMetrics) op(name, result string, took time.Duration) {
	k := opKey{name, result}
	v, ok := em.ops.Load(k)
	if !ok {
		v, _ = em.ops.LoadOrStore(k, &opMetrics{
			count:   em.set.GetOrCreateCounter(fmt.Sprintf(`%s{operation=%q,result=%q}`, metricOps, name, result)),
			seconds: em.set.GetOrCreatePrometheusHistogramExt(fmt.Sprintf(`%s{operation=%q,result=%q}`, metricOpSeconds, name, result), OperationBuckets),
		})
	}
	m := v.(*opMetrics)
	m.count.Inc()
	m.seconds.Update(took.Seconds())
}

// add counts n items of a count-only operation (skipped when n is 0):
// supersede, reclaim_dispatch, purged, reconcile_terminal_dispatch.
func (em *engineMetrics) add(operation string, n int) {
	if n > 0 {
		em.set.GetOrCreateCounter(fmt.Sprintf(`%s{operation=%q,result="ok"}`, metricOps, operation)).Add(n)
	}
}

// count is the counter name{labels} (label, value, …; two pairs at most).
func (em *engineMetrics) count(name string, labels ...string) *metrics.Counter {
	k := newSeriesKey(name, labels)
	if c, ok := em.series.Load(k); ok {
		return c.(*metrics.Counter)
	}
	c, _ := em.series.LoadOrStore(k, em.set.GetOrCreateCounter(k.String()))
	return c.(*metrics.Counter)
}

// seconds records d in the histogram name{labels} (waitBuckets).
func (em *engineMetrics) seconds(name string, d time.Duration, labels ...string) {
	k := newSeriesKey(name, labels)
	h, ok := em.series.Load(k)
	if !ok {
		h, _ = em.series.LoadOrStore(k, em.set.GetOrCreatePrometheusHistogramExt(k.String(), waitBuckets))
	}
	h.(*metrics.PrometheusHistogram).Update(max(d, 0).Seconds())
}

// Metrics returns the mailbox's metric set (Prometheus text with
// WritePrometheus; the sidecar serves it on /metrics).
func (m *Mailbox) Metrics() *metrics.Set { return m.metrics.set }

// observe times one store call and counts it by result.
func observe[T any](em *engineMetrics, name string, f func() (T, error), empty func(T) bool) (T, error) {
	start := time.Now()
	v, err := f()
	result := "ok"
	switch {
	case errors.Is(err, ErrNextClaim):
		result = "error" // the completion half committed; the claim failed
	case errors.Is(err, ErrVersionConflict), errors.Is(err, ErrNotFound):
		// Settled meanwhile by a cancel, an interrupt or a reclaim: a race
		// the engine expects, not a failing store (found by review: every
		// interrupt counted an error, and an alert on them fired).
		result = "conflict"
	case err != nil:
		result = "error"
	case empty != nil && empty(v):
		result = "empty"
	}
	em.op(name, result, time.Since(start))
	return v, err
}

func observeErr(em *engineMetrics, name string, f func() error) error {
	_, err := observe(em, name, func() (struct{}, error) { return struct{}{}, f() }, nil)
	return err
}

func nilDispatch(d *Dispatch) bool { return d == nil }

// instrumentedStore records latency and result of every store call.
type instrumentedStore struct {
	Store
	em *engineMetrics
	// tails learns of the messages checkpoints and submits append, keeping
	// keep of each thread's newest (nil: off).
	tails *tailCache
	keep  int
	// putBack learns of the threads whose work a call may have put back
	// at its old place in the ready order ("": unknown; nil: off).
	putBack func(thread string)
}

// staleBack passes err on, telling putBack first when it is a version
// conflict: a call on a claim whose epoch an interrupt outdated
// supersedes it, and the thread's queued work is back in the ready order
// at its due time.
func (s instrumentedStore) staleBack(err error) error {
	if s.putBack != nil && errors.Is(err, ErrVersionConflict) {
		s.putBack("")
	}
	return err
}

// wentBack tells putBack of thread ("" when the call failed: unknown).
func (s instrumentedStore) wentBack(thread string, err error) {
	if s.putBack == nil {
		return
	}
	if err != nil {
		thread = ""
	}
	s.putBack(thread)
}

func (s instrumentedStore) Enqueue(ctx context.Context, d Dispatch) (Dispatch, error) {
	return observe(s.em, "enqueue", func() (Dispatch, error) { return s.Store.Enqueue(ctx, d) }, nil)
}

func (s instrumentedStore) Claim(ctx context.Context, thread, consumer string, lease time.Duration, now int64) (*Dispatch, error) {
	return observe(s.em, "claim", func() (*Dispatch, error) { return s.Store.Claim(ctx, thread, consumer, lease, now) }, nilDispatch)
}

func (s instrumentedStore) ClaimDispatch(ctx context.Context, id, consumer string, lease time.Duration, now int64) (*Dispatch, error) {
	return observe(s.em, "claim_dispatch", func() (*Dispatch, error) { return s.Store.ClaimDispatch(ctx, id, consumer, lease, now) }, nilDispatch)
}

func (s instrumentedStore) Ack(ctx context.Context, id, token string, now int64) error {
	return s.staleBack(observeErr(s.em, "ack", func() error { return s.Store.Ack(ctx, id, token, now) }))
}

func (s instrumentedStore) RecordDispatchStart(ctx context.Context, id, token, instance string, now int64) error {
	return s.staleBack(observeErr(s.em, "record_dispatch_start", func() error { return s.Store.RecordDispatchStart(ctx, id, token, instance, now) }))
}

func (s instrumentedStore) RecordRunResult(ctx context.Context, id, token string, r RunResult, now int64) error {
	return s.staleBack(observeErr(s.em, "record_run_result", func() error { return s.Store.RecordRunResult(ctx, id, token, r, now) }))
}

func (s instrumentedStore) Nack(ctx context.Context, id, token string, retryAt int64, msg string, now int64) (Dispatch, error) {
	d, err := observe(s.em, "nack", func() (Dispatch, error) { return s.Store.Nack(ctx, id, token, retryAt, msg, now) }, nil)
	s.wentBack(d.ThreadID, err)
	return d, err
}

func (s instrumentedStore) DeadLetter(ctx context.Context, id, token, msg string, now int64) error {
	return s.staleBack(observeErr(s.em, "dead_letter", func() error { return s.Store.DeadLetter(ctx, id, token, msg, now) }))
}

func (s instrumentedStore) Cancel(ctx context.Context, id string, now int64) (*Dispatch, error) {
	return observe(s.em, "cancel", func() (*Dispatch, error) { return s.Store.Cancel(ctx, id, now) }, nil)
}

func (s instrumentedStore) Release(ctx context.Context, id, token string, now int64) (Dispatch, error) {
	d, err := observe(s.em, "release", func() (Dispatch, error) { return s.Store.Release(ctx, id, token, now) }, nil)
	s.wentBack(d.ThreadID, err)
	return d, err
}

func (s instrumentedStore) ExtendLease(ctx context.Context, id, token string, lease time.Duration, now int64) (bool, error) {
	ok, err := observe(s.em, "extend_lease", func() (bool, error) { return s.Store.ExtendLease(ctx, id, token, lease, now) }, nil)
	return ok, s.staleBack(err)
}

func (s instrumentedStore) Interrupt(ctx context.Context, thread string, now int64) (InterruptResult, error) {
	return observe(s.em, "interrupt", func() (InterruptResult, error) { return s.Store.Interrupt(ctx, thread, now) }, nil)
}

func (s instrumentedStore) CurrentEpoch(ctx context.Context, thread string) (uint64, error) {
	return observe(s.em, "current_dispatch_epoch", func() (uint64, error) { return s.Store.CurrentEpoch(ctx, thread) }, nil)
}

func (s instrumentedStore) SupersedeClaimed(ctx context.Context, id, token, reason string, now int64) (*Dispatch, error) {
	d, err := observe(s.em, "supersede_claimed", func() (*Dispatch, error) { return s.Store.SupersedeClaimed(ctx, id, token, reason, now) }, nil)
	thread := ""
	if d != nil {
		thread = d.ThreadID
	}
	s.wentBack(thread, err)
	return d, err
}

func (s instrumentedStore) ReclaimExpired(ctx context.Context, now int64, limit int) ([]Dispatch, error) {
	got, err := observe(s.em, "reclaim", func() ([]Dispatch, error) { return s.Store.ReclaimExpired(ctx, now, limit) }, nil)
	if err != nil {
		s.wentBack("", err)
	}
	for i := range got {
		s.wentBack(got[i].ThreadID, nil)
	}
	return got, err
}

func (s instrumentedStore) PurgeTerminal(ctx context.Context, olderThan int64) (int, error) {
	return observe(s.em, "purge_terminal", func() (int, error) { return s.Store.PurgeTerminal(ctx, olderThan) }, nil)
}

func (s instrumentedStore) LoadDispatch(ctx context.Context, id string) (*Dispatch, error) {
	return observe(s.em, "load_dispatch", func() (*Dispatch, error) { return s.Store.LoadDispatch(ctx, id) }, nil)
}

func (s instrumentedStore) ListTerminal(ctx context.Context, after TerminalCursor, limit int) ([]Dispatch, error) {
	return observe(s.em, "list_terminal_dispatches", func() ([]Dispatch, error) { return s.Store.ListTerminal(ctx, after, limit) }, nil)
}

func (s instrumentedStore) Checkpoint(ctx context.Context, c Checkpoint) ([]MessageRecord, error) {
	recs, err := observe(s.em, "checkpoint", func() ([]MessageRecord, error) { return s.Store.Checkpoint(ctx, c) }, nil)
	if err == nil {
		s.tails.appended(c.ThreadID, recs, s.keep)
	}
	return recs, err
}

func (s instrumentedStore) Submit(ctx context.Context, c Checkpoint, d Dispatch) ([]MessageRecord, Dispatch, error) {
	var recs []MessageRecord
	stored, err := observe(s.em, "submit", func() (Dispatch, error) {
		var err error
		var out Dispatch
		recs, out, err = s.Store.Submit(ctx, c, d)
		return out, err
	}, nil)
	if err == nil {
		s.tails.appended(c.ThreadID, recs, s.keep)
		s.tails.submitted(c.ThreadID, recs)
	}
	return recs, stored, err
}

func (s instrumentedStore) Complete(ctx context.Context, id, token string, r RunResult, now int64) error {
	return s.staleBack(observeErr(s.em, "complete", func() error { return s.Store.Complete(ctx, id, token, r, now) }))
}
