package natsstore

import (
	"errors"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/nats-io/nats.go"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// storeMetrics are the store's figures, under the names badgerstore uses
// where they mean the same (a commit is one publish: a message alone, or
// an atomic batch of one or more merged transactions), so that one
// dashboard serves both stores, and the connection's state.
type storeMetrics struct {
	set                                       *metrics.Set
	commitsOK, commitsConflict, commitsFailed *metrics.Counter
	messages                                  *metrics.Counter
	seconds                                   *metrics.PrometheusHistogram
	disconnects, reconnects                   *metrics.Counter
}

func newStoreMetrics(nc *nats.Conn) storeMetrics {
	set := metrics.NewSet()
	set.NewGauge(`mailbox_store_nats_connected`, func() float64 {
		if nc.IsConnected() {
			return 1
		}
		return 0
	})
	return storeMetrics{
		set:             set,
		commitsOK:       set.NewCounter(`mailbox_store_commits_total{result="ok"}`),
		commitsConflict: set.NewCounter(`mailbox_store_commits_total{result="conflict"}`),
		commitsFailed:   set.NewCounter(`mailbox_store_commits_total{result="error"}`),
		messages:        set.NewCounter(`mailbox_store_committed_messages_total`),
		seconds:         set.NewPrometheusHistogramExt(`mailbox_store_commit_seconds`, engine.OperationBuckets),
		disconnects:     set.NewCounter(`mailbox_store_nats_disconnects_total`),
		reconnects:      set.NewCounter(`mailbox_store_nats_reconnects_total`),
	}
}

// published records one publish of n messages that took d and ended with
// err: a refusal because a record changed meanwhile is a conflict (the
// transaction retries from its reads, or merged ones publish alone), not
// a failure.
func (m *storeMetrics) published(n int, d time.Duration, err error) {
	switch {
	case err == nil:
		m.commitsOK.Inc()
		m.messages.Add(n)
		m.seconds.Update(d.Seconds())
	case errors.Is(err, errConflict) || errors.Is(err, errBusy):
		m.commitsConflict.Inc()
	default:
		m.commitsFailed.Inc()
	}
}

// watchConnection logs and counts the connection's losses and returns,
// calling the handlers Config.Options set as well. Until the connection
// is back every operation fails as unavailable; an operator saw nothing
// of it but 503s (the NATS store had no metrics and no such logs).
func (s *Store) watchConnection() {
	prevLost, prevBack := s.nc.Opts.DisconnectedErrCB, s.nc.Opts.ReconnectedCB
	s.nc.SetDisconnectErrHandler(func(c *nats.Conn, err error) {
		s.metrics.disconnects.Inc()
		if !s.closed.Load() {
			s.log.Warn("natsstore: connection to the server lost; reconnecting (operations fail as unavailable meanwhile)", "err", err)
		}
		if prevLost != nil {
			prevLost(c, err)
		}
	})
	s.nc.SetReconnectHandler(func(c *nats.Conn) {
		s.metrics.reconnects.Inc()
		s.log.Info("natsstore: connection to the server back", "server", c.ConnectedServerName())
		if prevBack != nil {
			prevBack(c)
		}
	})
}

// Metrics returns the store's metrics (the sidecar serves them on
// /metrics): mailbox_store_commits_total{result="ok"|"conflict"|"error"},
// mailbox_store_committed_messages_total, the histogram
// mailbox_store_commit_seconds (a publish until its acknowledgement),
// mailbox_store_nats_connected (1 or 0), and
// mailbox_store_nats_disconnects_total and
// mailbox_store_nats_reconnects_total.
func (s *Store) Metrics() *metrics.Set { return s.metrics.set }
