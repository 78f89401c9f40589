package engine_test

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// gatedIdle holds the first SubmitIdle after its commit, before the
// mailbox has turned the claim into an execution.
type gatedIdle struct {
	*badgerstore.Store
	once      atomic.Bool
	committed chan string
	gate      chan struct{}
}

func (g *gatedIdle) SubmitIdle(ctx context.Context, c engine.Checkpoint, d engine.Dispatch, consumerID string, lease time.Duration, instanceID string, now int64) ([]engine.MessageRecord, *engine.Dispatch, error) {
	recs, out, err := g.Store.SubmitIdle(ctx, c, d, consumerID, lease, instanceID, now)
	if out != nil && g.once.CompareAndSwap(false, true) {
		g.committed <- out.DispatchID
		<-g.gate
	}
	return recs, out, err
}

// An Interrupt that lands between the fast-path commit (claim + start in
// one commit) and the execution's start reports the run as active, but the
// run is never stopped: the pre-started attempt skips the epoch check of
// RecordDispatchStart and runs to its end.
func TestInterruptDuringTheFastPathStartCancelsTheRun(t *testing.T) {
	var cancelled atomic.Bool
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-ctx.Done():
			cancelled.Store(true)
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
		case <-time.After(1500 * time.Millisecond):
		}
		return complete(ctx, req, sink)
	}
	g := &gatedIdle{committed: make(chan string, 1), gate: make(chan struct{})}
	r := newRigWith(t, newFake(2, script), engine.Config{}, func(s *badgerstore.Store) engine.Store { g.Store = s; return g })
	r.start(t)
	ctx := context.Background()
	type sub struct {
		res engine.SubmitResult
		err error
	}
	done := make(chan sub, 1)
	go func() {
		res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("a")}})
		done <- sub{res, err}
	}()
	id := <-g.committed
	type intr struct {
		ir  engine.InterruptResult
		err error
	}
	ich := make(chan intr, 1)
	go func() {
		ir, err := r.mb.Interrupt(ctx, "t")
		ich <- intr{ir, err}
	}()
	// The interrupt's commit lands while the submit is still held.
	eventually(t, "interrupt committed", func() bool { ep, _ := r.store.CurrentEpoch(ctx, "t"); return ep == 2 })
	time.Sleep(20 * time.Millisecond)
	close(g.gate)
	ir := <-ich
	if ir.err != nil || ir.ir.Active == nil || ir.ir.Active.DispatchID != id {
		t.Fatalf("interrupt: %+v %v", ir.ir, ir.err)
	}
	s := <-done
	if s.err != nil {
		t.Fatal(s.err)
	}
	eventually(t, "dispatch settled", func() bool { return dispatchStatus(t, r.store, id).Terminal() })
	if !cancelled.Load() {
		d, _ := r.store.LoadDispatch(ctx, id)
		t.Fatalf("the interrupted run was never cancelled: the agent ran to its end (dispatch %s, last_error %q)", d.Status, d.LastError)
	}
}

// A cancel of a run that an interrupt already settled (superseded), while
// its agent is still stopping, fails with a version conflict (HTTP 409)
// instead of reporting that there was nothing left to cancel; the routed
// HandleLive path treats the same answer as settled.
func TestCancelAfterAnInterruptSettles(t *testing.T) {
	started := make(chan struct{}, 1)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		started <- struct{}{}
		<-ctx.Done()
		time.Sleep(300 * time.Millisecond) // the agent takes a moment to stop
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}
	r := newRig(t, newFake(2, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	if _, err := r.mb.Interrupt(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	ok, err := r.mb.Cancel(ctx, res.RunID)
	if err != nil {
		t.Fatalf("cancel after interrupt: ok=%v err=%v (dispatch is %s)", ok, err, dispatchStatus(t, r.store, res.DispatchID))
	}
}

// Two queued dispatches of one run (the second submitted with
// continue_run_id while the run is still created): cancelling the first
// settles the run, so the second — never cancelled, its submit reported
// success — is acked without running.
func TestCancelOfOneDispatchLeavesAnotherOfTheSameRun(t *testing.T) {
	release := make(chan struct{})
	var ran sync.Map
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		var text string
		_ = json.Unmarshal(req.Messages[len(req.Messages)-1].Content, &text)
		ran.Store(text, true)
		if text == "block" {
			<-release
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(4, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("block")}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "blocker runs", func() bool { _, ok := ran.Load("block"); return ok })
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	second, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", ContinueRunID: first.RunID, Messages: []engine.Message{userMsg("y")}})
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := r.mb.Cancel(ctx, first.DispatchID); !ok || err != nil {
		t.Fatalf("cancel first: %v %v", ok, err)
	}
	close(release)
	eventually(t, "second settled", func() bool { return dispatchStatus(t, r.store, second.DispatchID).Terminal() })
	if _, ok := ran.Load("y"); !ok {
		d, _ := r.store.LoadDispatch(ctx, second.DispatchID)
		t.Fatalf("dispatch %s (never cancelled) ended %s without running its request", second.DispatchID, d.Status)
	}
}
