package engine

import (
	"strings"
	"testing"
	"time"
)

// count and seconds name their series as Prometheus does, with up to two
// label pairs, and hand back the same series for the same name and
// labels (looked up once, not formatted per call).
func TestSeriesAreNamedOnceAndReused(t *testing.T) {
	em := newEngineMetrics(func() (StatusCounts, error) { return StatusCounts{}, nil }, func() (float64, error) { return 0, nil }, func() float64 { return 0 })
	em.count(metricLive, "kind", "message", "result", "live").Inc()
	if a, b := em.count(metricRuns, "outcome", "completed"), em.count(metricRuns, "outcome", "completed"); a != b {
		t.Error("count made a second counter for the same series")
	}
	em.count(metricSigAck).Add(2)
	em.seconds(metricRunSeconds, 3*time.Second, "outcome", "completed")
	em.seconds(metricRunSeconds, time.Second, "outcome", "completed")
	em.seconds(metricClaimStart, time.Millisecond)
	var b strings.Builder
	em.set.WritePrometheus(&b)
	for _, want := range []string{
		`mailbox_live_commands_total{kind="message",result="live"} 1`,
		`mailbox_runs_total{outcome="completed"} 0`,
		`mailbox_dispatch_signal_ack_total 2`,
		`mailbox_run_duration_seconds_count{outcome="completed"} 2`,
		`mailbox_run_duration_seconds_sum{outcome="completed"} 4`,
		`mailbox_dispatch_claim_to_start_seconds_count 1`,
	} {
		if !strings.Contains(b.String(), want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, b.String())
		}
	}
	for _, labels := range [][]string{{"a", "1", "b"}, {"a", "1", "b", "2", "c", "3"}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("labels %q were taken: a half pair, or more pairs than a series holds", labels)
				}
			}()
			em.count(metricLive, labels...)
		}()
	}
}

// A failing count behind the depth gauges is tried once per second, not
// once per gauge of a scrape, and is counted; the gauges keep the last
// values (found by review: seven counts per scrape, each waiting its
// timeout on a lagging store).
func TestADepthCountThatFailsIsTriedOncePerScrape(t *testing.T) {
	calls := 0
	fail := false
	em := newEngineMetrics(func() (StatusCounts, error) {
		calls++
		if fail {
			return StatusCounts{}, ErrUnavailable
		}
		var c StatusCounts
		c[StatusQueued] = 3
		return c, nil
	}, func() (float64, error) { return 0, nil }, func() float64 { return 0 })
	scrape := func() string {
		var b strings.Builder
		em.set.WritePrometheus(&b)
		return b.String()
	}
	if out := scrape(); !strings.Contains(out, "mailbox_queue_depth 3") || calls != 1 {
		t.Fatalf("%d counts for a scrape:\n%s", calls, out)
	}
	fail = true
	em.depth.at = time.Time{} // the second passed
	out := scrape()
	if calls != 2 || !strings.Contains(out, "mailbox_queue_depth 3") || !strings.Contains(out, "mailbox_dispatch_depth_errors_total 1") {
		t.Fatalf("%d counts after a failing scrape:\n%s", calls, out)
	}
}

// observe counts a store call refused because a cancel, an interrupt or
// a reclaim settled the dispatch first as a conflict, not an error (found
// by review: every interrupt counted an error).
func TestARaceLostIsNotAStoreError(t *testing.T) {
	em := newEngineMetrics(func() (StatusCounts, error) { return StatusCounts{}, nil }, func() (float64, error) { return 0, nil }, func() float64 { return 0 })
	for _, err := range []error{ErrStaleClaim, ErrVersionConflict, ErrNotFound, ErrUnavailable} {
		observeErr(em, "complete", func() error { return err })
	}
	var b strings.Builder
	em.set.WritePrometheus(&b)
	for _, want := range []string{
		`mailbox_operations_total{operation="complete",result="conflict"} 3`,
		`mailbox_operations_total{operation="complete",result="error"} 1`,
	} {
		if !strings.Contains(b.String(), want+"\n") {
			t.Errorf("missing %s", want)
		}
	}
}
