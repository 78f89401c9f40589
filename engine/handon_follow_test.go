package engine_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A client following a retry whose first claim no agent took (its agent
// was busy: the attempt's log is handed on to the next attempt here)
// follows the attempt that runs, without a reset: nothing was missed, the
// refused attempt had no events (found by review: its recorded start made
// the run's start counts differ by two, and the client got a reset).
func TestAClientFollowsARetryHandedOnPastABusyAgent(t *testing.T) {
	var attempt atomic.Int32
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		switch attempt.Add(1) {
		case 1:
			taggedEvents(sink, "first", 2)
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "flaky model"}
		case 2:
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentBusy, Error: "no free slot"}
		}
		taggedEvents(sink, "third", 3)
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{RetryDelay: 50 * time.Millisecond, MaxRetryDelay: 50 * time.Millisecond, MaxAttempts: 3})
	r.start(t)
	res, _, last, follow := followTheRetry(t, r)
	eventually(t, "the run done", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	if n := attempt.Load(); n != 3 {
		t.Fatalf("%d attempts reached the agent; want 3 (the second refused)", n)
	}
	eventually(t, "the followed log closed", func() bool { _, closed := follow.ClosedAt(); return closed })
	got, reset := readAll(follow, last.Seq)
	if reset || tagged(got, "third") != 3 || got[0].Seq <= last.Seq {
		t.Fatalf("followed from %d: reset=%v %s, want attempt 3 whole without a reset", last.Seq, reset, describe(got))
	}
}
