package metrichelp

import (
	"bytes"
	"strings"
	"testing"

	"github.com/VictoriaMetrics/metrics"
)

func TestFillGivesKnownFamiliesTheirText(t *testing.T) {
	in := "# HELP mailbox_queue_depth\n# TYPE mailbox_queue_depth gauge\nmailbox_queue_depth 3\n" +
		"# HELP go_goroutines\ngo_goroutines 9\n" +
		"# HELP go_unknown_thing\n# TYPE process_io_read_bytes_total gauge\n# TYPE process_num_threads gauge\n" +
		"# HELP mailbox_active_runs has one\n" +
		"# HELP mailbox_runs_total"
	want := "# HELP mailbox_queue_depth " + Help["mailbox_queue_depth"] + "\n# TYPE mailbox_queue_depth gauge\nmailbox_queue_depth 3\n" +
		"# HELP go_goroutines " + Help["go_goroutines"] + "\ngo_goroutines 9\n" +
		"# HELP go_unknown_thing\n# TYPE process_io_read_bytes_total counter\n# TYPE process_num_threads gauge\n" +
		"# HELP mailbox_active_runs has one\n" +
		"# HELP mailbox_runs_total " + Help["mailbox_runs_total"] + "\n"
	if got := string(Fill(nil, []byte(in))); got != want {
		t.Fatalf("Fill:\n%s\nwant:\n%s", got, want)
	}
}

// TestEveryRuntimeFamilyHasHelp scrapes the metrics library's process
// metrics: a family a library upgrade adds shows up here.
func TestEveryRuntimeFamilyHasHelp(t *testing.T) {
	metrics.ExposeMetadata(true)
	var b bytes.Buffer
	metrics.WriteProcessMetrics(&b)
	out := Fill(nil, b.Bytes())
	helps := 0
	for _, l := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(l, "# HELP "); ok {
			helps++
			if !strings.Contains(rest, " ") {
				t.Errorf("%q has no HELP text", l)
			}
		}
		if rest, ok := strings.CutPrefix(l, "# TYPE "); ok && strings.HasSuffix(rest, "_total gauge") {
			t.Errorf("%q: a _total family typed gauge", l)
		}
	}
	if helps < 40 {
		t.Errorf("%d HELP lines, want the library's 40 or more", helps)
	}
}
