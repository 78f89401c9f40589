package metrichelp

import "testing"

func TestFillGivesKnownFamiliesTheirText(t *testing.T) {
	in := "# HELP mailbox_queue_depth\n# TYPE mailbox_queue_depth gauge\nmailbox_queue_depth 3\n" +
		"# HELP go_goroutines\ngo_goroutines 9\n" +
		"# HELP mailbox_active_runs has one\n" +
		"# HELP mailbox_runs_total"
	want := "# HELP mailbox_queue_depth " + Help["mailbox_queue_depth"] + "\n# TYPE mailbox_queue_depth gauge\nmailbox_queue_depth 3\n" +
		"# HELP go_goroutines\ngo_goroutines 9\n" +
		"# HELP mailbox_active_runs has one\n" +
		"# HELP mailbox_runs_total " + Help["mailbox_runs_total"] + "\n"
	if got := string(Fill(nil, []byte(in))); got != want {
		t.Fatalf("Fill:\n%s\nwant:\n%s", got, want)
	}
}
