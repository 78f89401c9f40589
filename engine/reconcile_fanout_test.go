package engine_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// timedRunLoads makes every LoadRun take a few milliseconds, the last
// crashed run's longer, and records how many ran at once (fault
// injection: a store whose reads are round trips).
type timedRunLoads struct {
	*badgerstore.Store
	slowRun   string
	mu        sync.Mutex
	cur, peak int
}

func (s *timedRunLoads) LoadRun(ctx context.Context, id string) (*engine.RunRecord, error) {
	s.mu.Lock()
	s.cur++
	s.peak = max(s.peak, s.cur)
	s.mu.Unlock()
	d := 2 * time.Millisecond
	if id == s.slowRun {
		d = 100 * time.Millisecond
	}
	time.Sleep(d)
	s.mu.Lock()
	s.cur--
	s.mu.Unlock()
	return s.Store.LoadRun(ctx, id)
}

// Recover settles the run of every terminal dispatch left unsettled by a
// crash, over more than two pages of the reconciliation, each page's
// runs read several at once (no more than eight) and all settled before
// it returns, the slowest last: every one is settled with its own
// dispatch's outcome.
func TestRecoverSettlesEveryPageOfCrashedTerminalDispatches(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	timed := &timedRunLoads{Store: s}
	mb := liveMailbox(t, timed, newFake(1, complete), engine.Config{ConsumerID: "reconcile-pages"})
	now := time.Now().UnixMilli()
	kinds := []string{"cancel", "supersede", "dead_letter"}
	var crashed []engine.Dispatch
	for i := range 250 {
		crashed = append(crashed, liveCrashedTerminal(t, mb, s, fmt.Sprintf("thread-page-%03d", i), kinds[i%3], now+int64(i)))
	}
	timed.slowRun = crashed[len(crashed)-1].RunID
	if _, err := mb.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	timed.mu.Lock()
	peak := timed.peak
	timed.mu.Unlock()
	if peak < 2 || peak > 8 {
		t.Errorf("at most %d runs read at once, want 2 to 8", peak)
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
