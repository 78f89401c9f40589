package natsstore_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// handOffHolder holds the hand-over after the first CompleteAndClaim
// commit that claimed a next dispatch, until released.
type handOffHolder struct {
	*natsstore.Store
	held    chan struct{}
	release chan struct{}
	once    sync.Once
}

func (h *handOffHolder) CompleteAndClaim(ctx context.Context, id, token string, r engine.RunResult, now int64, consumer string, lease time.Duration) (*engine.Dispatch, error) {
	next, err := h.Store.CompleteAndClaim(ctx, id, token, r, now, consumer, lease)
	if err == nil && next != nil {
		h.once.Do(func() { close(h.held) })
		<-h.release
	}
	return next, err
}

// CompleteAndClaimStart holds as CompleteAndClaim does (the engine
// completes with it: the store offers engine.StartClaimer).
func (h *handOffHolder) CompleteAndClaimStart(ctx context.Context, id, token string, r engine.RunResult, now int64, consumer string, lease time.Duration, instance string) (*engine.Dispatch, error) {
	next, err := h.Store.CompleteAndClaimStart(ctx, id, token, r, now, consumer, lease, instance)
	if err == nil && next != nil {
		h.once.Do(func() { close(h.held) })
		<-h.release
	}
	return next, err
}

// A cancel or a foreground submit that another sidecar routes while this
// one hands its thread over to the next dispatch (claimed with the
// completion) waits for the hand-over and reaches the attempt that comes
// out of it — the cross-process twin of the engine's
// TestCancelDuringCompletionHandOff. HandleLive used to refuse it: the
// cancel was lost (reported false, and the dispatch ran) and the submit
// failed with a false conflict after the live timeout.
func TestRemoteCommandDuringHandOff(t *testing.T) {
	for _, op := range []string{"cancel", "submit"} {
		t.Run(op, func(t *testing.T) { remoteDuringHandOff(t, op) })
	}
}

func remoteDuringHandOff(t *testing.T, op string) {
	w := newWorld()
	cfg := freshConfig()
	hs := &handOffHolder{Store: openCfg(t, cfg), held: make(chan struct{}), release: make(chan struct{})}
	var relOnce sync.Once
	release := func() { relOnce.Do(func() { close(hs.release) }) }
	ag := &fakeAgent{name: "A", w: w, capacity: 1, capCh: make(chan struct{}, 1)}
	mbA, err := engine.New(hs, ag, engineConfig("A"))
	if err != nil {
		t.Fatal(err)
	}
	if err := hs.ServeLive(mbA.HandleLive); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = mbA.Stop(ctx)
	})
	t.Cleanup(release)
	if err := mbA.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	b := startSidecar(t, w, cfg, "B", 1)
	ctx := context.Background()
	if _, err := mbA.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "th", Messages: []engine.Message{userMsg("work 300000")}}); err != nil {
		t.Fatal(err)
	}
	second, err := mbA.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "th", Messages: []engine.Message{userMsg("hold")}})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-hs.held:
	case <-time.After(10 * time.Second):
		t.Fatal("no hand-over")
	}
	type res struct {
		ok  bool
		err error
	}
	done := make(chan res, 1)
	start := time.Now()
	go func() {
		if op == "submit" {
			_, _, err := b.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "th", Messages: []engine.Message{userMsg("now")}})
			done <- res{err == nil, err}
			return
		}
		ok, err := b.mb.Cancel(ctx, second.DispatchID)
		done <- res{ok, err}
	}()
	var got res
	select {
	case got = <-done:
		release()
	case <-time.After(2 * time.Second):
		release()
		got = <-done
	}
	t.Logf("%s through B during A's hand-over: ok=%v err=%v after %s", op, got.ok, got.err, time.Since(start))
	if op == "submit" {
		if got.err != nil {
			t.Fatalf("foreground submit through B during A's hand-over: %v", got.err)
		}
		return
	}
	if got.ok {
		// As a local cancel of an executing attempt: acked, its run
		// cancelled.
		w.waitFor(t, "the cancelled dispatch settled", func() bool {
			d, err := b.store.LoadDispatch(ctx, second.DispatchID)
			return err == nil && d != nil && d.Status == engine.StatusAcked
		})
		run, err := b.store.LoadRun(ctx, second.RunID)
		if err != nil || run == nil || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
			t.Fatalf("the cancelled run: %+v %v; want cancelled", run, err)
		}
		return
	}
	{
		// Show the consequence: the dispatch the user cancelled runs.
		w.waitFor(t, "the second dispatch reached the agent", func() bool { return len(w.runsOfLocked(second.DispatchID)) == 1 })
		d, _ := b.store.LoadDispatch(ctx, second.DispatchID)
		t.Fatalf("cancel lost: reported %v, and dispatch %s is %s and running on A", got.ok, second.DispatchID, d.Status)
	}
}
