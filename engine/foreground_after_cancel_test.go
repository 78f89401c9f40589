package engine_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A cancel settles the attempt's claim before the agent has stopped (the
// cancel is durable when it is answered). A foreground submit right after
// finds the thread released in the store, but the cancelled attempt still
// executes here: the new run must not start beside it. While the agent
// does not stop, the submit fails with the active-run conflict after
// CancelWait and nothing runs; once it has stopped, the next submit runs.
// (Found by the crash harness's review: the fast path started a second
// run of the thread, the slow path never looked.)
func TestForegroundAfterCancelWaitsForTheStoppingAttempt(t *testing.T) {
	s := startStopping(t, 2, engine.Config{CancelWait: 100 * time.Millisecond})
	ctx := context.Background()
	if ok, err := s.mb.Cancel(ctx, s.res.DispatchID); !ok || err != nil {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	if d := execLoad(t, s.store, s.res.DispatchID); !d.Status.Terminal() {
		t.Fatalf("cancelled dispatch %+v, want settled before the agent stopped", d)
	}
	_, _, err := s.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("b")}})
	if !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("foreground submit beside the stopping attempt: %v, want the active-run conflict", err)
	}
	if runs, _, overlap := s.exec.stats(); runs != 1 || overlap {
		t.Fatalf("the agent ran %d times (overlap %v), want the cancelled attempt alone", runs, overlap)
	}
	s.release()
	fg, log, err := s.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("c")}})
	if err != nil || fg.Status != engine.SubmitRunning {
		t.Fatalf("foreground submit after the attempt stopped: %+v %v", fg, err)
	}
	execReadAll(t, log)
	if runs, _, overlap := s.exec.stats(); runs != 2 || overlap {
		t.Fatalf("the agent ran %d times (overlap %v), want 2 one after the other", runs, overlap)
	}
}
