package crash

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// result is one test's row of the results table.
type result struct {
	name        string
	cycles      int
	accepted    int // dispatches the API accepted
	runs        int // attempts the agents started
	reexecuted  int // dispatches executed more than once
	checkpoints int // acknowledged checkpoints found in the logs
	lost        int
	overlaps    int
	resurrected int
	recoveries  []time.Duration // sidecar process start → /readyz 200, restarts only
	drain       time.Duration   // workload stopped → everything terminal
	// With several sidecars (not in the table): commands answered by one
	// sidecar that reached the attempt on another (findings.crossLive, …).
	crossLive, crossInterrupts, crossCancels int
}

var (
	resultsMu sync.Mutex
	results   []result
)

const tableHeader = "| test | cycles | dispatches accepted | runs executed | runs re-executed | checkpoints checked | lost | overlaps | resurrected | recovery mean | recovery max | drain |\n" +
	"| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"

func (r result) row() string {
	mean, most := "n/a", "n/a"
	if n := len(r.recoveries); n > 0 {
		var sum, m time.Duration
		for _, d := range r.recoveries {
			sum += d
			m = max(m, d)
		}
		mean, most = (sum / time.Duration(n)).Round(time.Millisecond).String(), m.Round(time.Millisecond).String()
	}
	return fmt.Sprintf("| %s | %d | %d | %d | %d | %d | %d | %d | %d | %s | %s | %s |\n", r.name, r.cycles, r.accepted, r.runs,
		r.reexecuted, r.checkpoints, r.lost, r.overlaps, r.resurrected, mean, most, r.drain.Round(time.Millisecond))
}

// record logs a test's row and keeps it for the report file.
func record(t *testing.T, r result) {
	t.Logf("results:\n%s%s", tableHeader, r.row())
	resultsMu.Lock()
	results = append(results, r)
	resultsMu.Unlock()
}

// writeReport writes the table of every test that ran to
// MAILBOX_CRASH_REPORT, when set.
func writeReport() {
	path := os.Getenv("MAILBOX_CRASH_REPORT")
	resultsMu.Lock()
	defer resultsMu.Unlock()
	if path == "" || len(results) == 0 {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "crash harness, %s, race detector %v\n\n", time.Now().Format(time.RFC3339), raceEnabled)
	b.WriteString(tableHeader)
	for _, r := range results {
		b.WriteString(r.row())
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "MAILBOX_CRASH_REPORT:", err)
	}
}
