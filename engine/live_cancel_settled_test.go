package engine_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// holdSettle holds the attempt's own settlement (Complete or Nack) right
// after it committed, while the attempt is still the thread's execution
// here. It embeds the engine.Store interface, so the mailbox sees no
// CompleteClaimer or StartClaimer: the completion is a plain Complete.
type holdSettle struct {
	engine.Store
	once    atomic.Bool
	settled chan struct{} // closed once the held call committed
	gate    chan struct{}
}

func (h *holdSettle) hold(err error) {
	if err == nil && h.once.CompareAndSwap(false, true) {
		close(h.settled)
		<-h.gate
	}
}

func (h *holdSettle) Complete(ctx context.Context, id, token string, r engine.RunResult, now int64) error {
	err := h.Store.Complete(ctx, id, token, r, now)
	h.hold(err)
	return err
}

func (h *holdSettle) Nack(ctx context.Context, id, token string, retryAt int64, msg string, now int64) (engine.Dispatch, error) {
	d, err := h.Store.Nack(ctx, id, token, retryAt, msg, now)
	h.hold(err)
	return d, err
}

// A cancel routed to this process (HandleLive, LiveCancel: a shared store's
// sidecar delivering POST /v1/cancel to the process executing the run)
// that arrives after the attempt settled its own claim — the run finished
// and was acked, or it failed and was queued for a retry — cancelled
// nothing, and is refused, as the local Cancel answers false then. It used
// to be accepted (the receipt made the sender answer cancelled:true)
// although the dispatch ended acked natural_end, or ran again — the crash
// harness counts that as UNJUSTIFIED (lost).
func TestRoutedCancelAfterTheAttemptSettledIsRefused(t *testing.T) {
	for _, tc := range []struct {
		name    string
		outcome engine.RunOutcome
		want    engine.DispatchStatus // right after the held settlement
	}{
		{"finished", engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "ok"}, engine.StatusAcked},
		{"retried", engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "try again"}, engine.StatusQueued},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var runs atomic.Int32
			exec := newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
				if runs.Add(1) > 1 {
					return complete(ctx, req, sink) // the retry
				}
				return tc.outcome
			})
			h := &holdSettle{settled: make(chan struct{}), gate: make(chan struct{})}
			r := newRigWith(t, exec, engine.Config{CancelWait: 200 * time.Millisecond}, func(s *badgerstore.Store) engine.Store {
				h.Store = s
				return h
			})
			r.start(t)
			ctx := context.Background()
			res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("a")}})
			if err != nil {
				t.Fatal(err)
			}
			<-h.settled
			if got := dispatchStatus(t, r.store, res.DispatchID); got != tc.want {
				t.Fatalf("held settlement left the dispatch %s, want %s", got, tc.want)
			}
			target := engine.LiveTarget{ThreadID: "t", RunID: res.RunID, DispatchID: res.DispatchID}
			routed := r.mb.HandleLive(ctx, target, engine.LiveCommand{Kind: engine.LiveCancel})
			if tc.want == engine.StatusAcked {
				// The local cancel, for reference (a queued retry it would
				// cancel in the store, as it should).
				local, err := r.mb.Cancel(ctx, res.DispatchID)
				if err != nil || local {
					t.Errorf("the local cancel of a finished attempt answered %v, %v", local, err)
				}
			}
			close(h.gate)
			if routed {
				t.Errorf("the routed cancel of an attempt that settled its claim (dispatch %s) was accepted: its sender answers cancelled:true", tc.want)
			}
			if tc.want == engine.StatusQueued {
				eventually(t, "the retry acked", func() bool {
					d, err := r.store.LoadDispatch(ctx, res.DispatchID)
					return err == nil && d != nil && d.Status == engine.StatusAcked
				})
			}
		})
	}
}
