package badgerstore

import (
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// storeMetrics are the group commit's figures: how many commits, how many
// operations they carried, and how long each took from the hand-off to
// Badger until it was durable (on a loaded disk the figure that bounds
// every write's latency; its mean times the commits per second says how
// busy the commit pipeline is).
type storeMetrics struct {
	set           *metrics.Set
	commitsOK     *metrics.Counter
	commitsFailed *metrics.Counter
	operations    *metrics.Counter
	seconds       *metrics.PrometheusHistogram
	// applySeconds is the part of seconds until Badger had applied the
	// batch (its memtable and log writes), before the sync.
	applySeconds *metrics.PrometheusHistogram
	// writerReads counts the writer's point reads that no cache or
	// pending batch answered: each walks Badger's memtables and levels.
	writerReads *metrics.Counter
	// gcRewritten and gcFailed count value-log files GC rewrote, and GC
	// runs that failed (Badger's error, or the sync after it).
	gcRewritten, gcFailed *metrics.Counter
	// logCuts counts the memtable logs Open cut before a value pointer
	// whose value never reached the disk (repair.go): 0 or 1 per process.
	logCuts *metrics.Counter
	// logRewrites counts the times Open wrote the logs out again because
	// the last process's sync failed (syncfailed.go): 0 or 1 per process.
	logRewrites *metrics.Counter
	// refusedFull and refusedBroken count the operations the writer
	// answered without a commit: the disk below MinFreeBytes, or a log
	// sync that failed (found by review: with the disk full every submit
	// failed and no failure was counted).
	refusedFull, refusedBroken *metrics.Counter
}

func newStoreMetrics() storeMetrics {
	set := metrics.NewSet()
	return storeMetrics{
		set:           set,
		commitsOK:     set.NewCounter(`mailbox_store_commits_total{result="ok"}`),
		commitsFailed: set.NewCounter(`mailbox_store_commits_total{result="error"}`),
		operations:    set.NewCounter(`mailbox_store_committed_operations_total`),
		seconds:       set.NewPrometheusHistogramExt(`mailbox_store_commit_seconds`, engine.OperationBuckets),
		applySeconds:  set.NewPrometheusHistogramExt(`mailbox_store_commit_apply_seconds`, engine.OperationBuckets),
		writerReads:   set.NewCounter(`mailbox_store_writer_lsm_reads_total`),
		gcRewritten:   set.NewCounter(`mailbox_store_value_log_gc_total{result="rewritten"}`),
		gcFailed:      set.NewCounter(`mailbox_store_value_log_gc_total{result="error"}`),
		logCuts:       set.NewCounter(`mailbox_store_open_log_cuts_total`),
		logRewrites:   set.NewCounter(`mailbox_store_open_log_rewrites_total`),
		refusedFull:   set.NewCounter(`mailbox_store_refused_operations_total{reason="disk_full"}`),
		refusedBroken: set.NewCounter(`mailbox_store_refused_operations_total{reason="sync_failed"}`),
	}
}

// committed records one commit of ops operations that took d.
func (m *storeMetrics) committed(ops int, d time.Duration, err error) {
	if err != nil {
		m.commitsFailed.Inc()
		return
	}
	m.commitsOK.Inc()
	m.operations.Add(ops)
	m.seconds.Update(d.Seconds())
}

// Metrics returns the store's metrics (the sidecar serves them on
// /metrics): mailbox_store_commits_total{result},
// mailbox_store_committed_operations_total, the histograms
// mailbox_store_commit_seconds and mailbox_store_commit_apply_seconds (its
// part until Badger had applied the batch, before the sync) and
// mailbox_store_writer_lsm_reads_total (the writer's point reads that its
// record cache did not answer), mailbox_store_value_log_gc_total{result}
// (files value-log GC rewrote, GC runs that failed),
// mailbox_store_value_log_corrupt_files (value-log files that failed their
// check: GC stays off while one exists, vlogcheck.go) and
// mailbox_store_open_log_cuts_total (1 when this process's Open cut a
// memtable log's unacknowledged tail after a power loss: repair.go).
func (s *Store) Metrics() *metrics.Set { return s.metrics.set }
