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
	em := newEngineMetrics(func() (StatusCounts, error) { return StatusCounts{}, nil }, func() float64 { return 0 })
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
