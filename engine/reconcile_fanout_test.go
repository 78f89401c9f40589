package engine_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Recover settles the run of every terminal dispatch left unsettled by a
// crash, over more than two pages of the reconciliation, each page's
// runs settled several at once: every one is settled with its own
// dispatch's outcome.
func TestRecoverSettlesEveryPageOfCrashedTerminalDispatches(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{ConsumerID: "reconcile-pages"})
	now := time.Now().UnixMilli()
	kinds := []string{"cancel", "supersede", "dead_letter"}
	var crashed []engine.Dispatch
	for i := range 250 {
		crashed = append(crashed, liveCrashedTerminal(t, mb, s, fmt.Sprintf("thread-page-%03d", i), kinds[i%3], now+int64(i)))
	}
	if _, err := mb.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	for i := len(crashed) - 1; i >= 0; i-- { // the last page's first: settled last
		d := crashed[i]
		run := liveRun(t, s, d.RunID)
		want := engine.TermCancelled
		if kinds[i%3] == "dead_letter" {
			want = engine.TermError
		}
		if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != want || run.DispatchID != d.DispatchID {
			t.Fatalf("run of %s dispatch %d: %+v, want done (%s) for %s", kinds[i%3], i, run, want, d.DispatchID)
		}
	}
}
