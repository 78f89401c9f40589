package engine_test

import (
	"context"
	"errors"
	"slices"
	"strings"
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
// one commit) and the execution's start reports the run as active; the
// run must not go on: either the attempt's pre-flight finds its epoch
// stale (the agent never gets it) or the agent is cancelled. It used to
// run to its end: the pre-started attempt skipped the epoch check of
// RecordDispatchStart.
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
	// The attempt's pre-flight may find its epoch stale first: then the
	// agent never gets the run. If it got it, it must be cancelled.
	if runs, _, _ := r.exec.stats(); runs > 0 && !cancelled.Load() {
		deadline := time.Now().Add(5 * time.Second)
		for !cancelled.Load() && time.Now().Before(deadline) {
			time.Sleep(2 * time.Millisecond)
		}
		if !cancelled.Load() {
			d, _ := r.store.LoadDispatch(ctx, id)
			t.Fatalf("the interrupted run was never cancelled: the agent ran to its end (dispatch %s, last_error %q)", d.Status, d.LastError)
		}
	}
}

// A cancel of a run that an interrupt already settled (superseded), while
// its agent is still stopping, fails with a version conflict (HTTP 409)
// instead of reporting that there was nothing left to cancel; the routed
// HandleLive path treats the same answer as settled.
func TestCancelAfterAnInterruptSettles(t *testing.T) {
	s := startStopping(t, 2, engine.Config{})
	ctx := context.Background()
	if _, err := s.mb.Interrupt(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	ok, err := s.mb.Cancel(ctx, s.res.RunID)
	if err != nil {
		t.Fatalf("cancel after interrupt: ok=%v err=%v (dispatch is %s)", ok, err, dispatchStatus(t, s.store, s.res.DispatchID))
	}
}

// A submit naming (continue_run_id or run_id hint) a run that is still
// created while its dispatch waits in the queue is refused with the
// seed's "not open for dispatch", and leaves nothing behind: no message
// logged, no dispatch, the run's request as it was, the thread not
// interrupted. It used to be accepted and to rewrite the run's request, so
// the queued dispatch executed the later request and the later dispatch
// found the run done: the earlier request never ran. The queued dispatch
// then runs its own request.
func TestHintNamingARunWhoseDispatchWaitsIsRefused(t *testing.T) {
	var ran sync.Map
	var release <-chan struct{}
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		text := execText(req.Messages[len(req.Messages)-1])
		ran.Store(text, true)
		if text == "block" {
			select {
			case <-release:
			case <-ctx.Done():
				return execCancelled()
			}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(4, script), engine.Config{})
	release, open := execRelease(t) // after the rig: released before its Stop
	r.start(t)
	ctx := context.Background()
	blocker, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("block")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "blocker runs", func() bool { _, ok := ran.Load("block"); return ok })
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	before := execRun(t, r.store, first.RunID)
	late := func(continues bool) engine.SubmitRequest {
		req := engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("y")}}
		if continues {
			req.ContinueRunID = first.RunID
		} else {
			req.RunIDHint = first.RunID
		}
		return req
	}
	for name, submit := range map[string]func() error{
		"background continue_run_id": func() error { _, err := r.mb.SubmitBackground(ctx, late(true)); return err },
		"background run_id hint":     func() error { _, err := r.mb.SubmitBackground(ctx, late(false)); return err },
		"foreground continue_run_id": func() error { _, _, err := r.mb.Submit(ctx, late(true)); return err },
		"live continue_run_id":       func() error { _, _, err := r.mb.SendMessages(ctx, late(true), ""); return err },
	} {
		if err := submit(); !errors.Is(err, engine.ErrValidation) || !strings.Contains(err.Error(), "run_id '"+first.RunID+"' is not open for dispatch") {
			t.Fatalf("%s naming a run whose dispatch is queued: %v, want the seed's validation error", name, err)
		}
	}
	if n, err := r.store.MessageCount(ctx, "t"); err != nil || n != 2 {
		t.Fatalf("%d messages (%v), want the two accepted", n, err)
	}
	if ds, _ := r.store.ListDispatches(ctx, "t", nil, 0, 0); len(ds) != 2 {
		t.Fatalf("%d dispatches, want the two accepted", len(ds))
	}
	after := execRun(t, r.store, first.RunID)
	if after.DispatchID != first.DispatchID || !slices.Equal(after.Request.InputMessageIDs, before.Request.InputMessageIDs) {
		t.Fatalf("the run was rewritten: %+v, was %+v", after, before)
	}
	if st := dispatchStatus(t, r.store, blocker.DispatchID); st != engine.StatusClaimed {
		t.Fatalf("the refused foreground submit interrupted the thread: the blocker is %s", st)
	}
	open()
	eventually(t, "the queued dispatch ran", func() bool { return dispatchStatus(t, r.store, first.DispatchID) == engine.StatusAcked })
	if _, ok := ran.Load("x"); !ok {
		t.Fatal("the queued dispatch did not run its own request")
	}
	if _, ok := ran.Load("y"); ok {
		t.Fatal("a refused request ran")
	}
}
