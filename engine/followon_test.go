package engine_test

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A busy thread's next dispatch is claimed in the commit that completes
// the previous attempt (CompleteClaimer): one Claim for five runs, run in
// order, one at a time.
func TestCompletionClaimsTheThreadsNextDispatch(t *testing.T) {
	var gate <-chan struct{}
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if execText(req.Messages[0]) == "m0" {
			<-gate // the others queue behind the first
		}
		return complete(ctx, req, sink)
	}
	r, fs := newExecRig(t, newFake(1, script), engine.Config{}, nil)
	gate, open := execRelease(t) // after the rig: released before its Stop
	r.start(t)
	ctx := context.Background()
	const thread = "busy-thread"
	var ids []string
	for i := range 5 {
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("m" + string(rune('0'+i)))}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.DispatchID)
	}
	eventually(t, "the first run started", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
	// Wake the dispatcher while the only slot is taken (a submit arriving
	// while a claim is in flight does that too): it must find nobody
	// waiting — the thread's own work is not — or the finishing attempts
	// would leave their slot to it and claim nothing on completion.
	readyBefore := fs.readyCalls.Load()
	r.mb.Sweep(ctx)
	eventually(t, "the dispatcher looked with the slot taken", func() bool { return fs.readyCalls.Load() > readyBefore })
	open()
	eventually(t, "all five acked", func() bool {
		for _, id := range ids {
			if dispatchStatus(t, r.store, id) != engine.StatusAcked {
				return false
			}
		}
		return true
	})
	runs := r.exec.execRuns()
	if len(runs) != 5 {
		t.Fatalf("%d runs, want 5", len(runs))
	}
	for i, run := range runs {
		if run.DispatchID != ids[i] {
			t.Fatalf("run %d was dispatch %s, want %s (submit order)", i, run.DispatchID, ids[i])
		}
	}
	if _, maxActive, overlap := r.exec.stats(); maxActive != 1 || overlap {
		t.Fatalf("max active %d, overlap %v", maxActive, overlap)
	}
	if n := fs.claimHits.Load(); n != 1 {
		t.Fatalf("%d dispatches claimed by Claim, want 1 (the others with their predecessor's completion)", n)
	}
	eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
}

// A foreground submit that interrupts the thread between the commit that
// completed one attempt and claimed the next, and the start of that next
// attempt, waits for the hand-over and supersedes the next attempt instead
// of failing with an active-run conflict.
func TestForegroundSubmitDuringCompletionHandOff(t *testing.T) {
	const thread = "handoff-thread"
	r, fs, second, release := heldHandOff(t, thread, complete)
	foregroundDuringHandOff(t, r, thread, second.DispatchID, fs.interrupts.Load, release)
}

// foregroundDuringHandOff submits a foreground run to thread while a
// completion's hand-over to dispatch second is held, lets the hand-over go
// once the submit has interrupted the thread (interrupts counts store
// Interrupt calls), and checks the outcome: the foreground run completes,
// the handed-over dispatch is superseded and never reaches the agent, and
// every slot is given back.
func foregroundDuringHandOff(t *testing.T, r *rig, thread, second string, interrupts func() int32, release func()) {
	t.Helper()
	ctx := context.Background()
	type result struct {
		res engine.SubmitResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("foreground")}})
		done <- result{res, err}
	}()
	eventually(t, "the foreground submit interrupted the thread", func() bool { return interrupts() > 0 })
	release()
	got := <-done
	if got.err != nil {
		t.Fatalf("foreground submit during the hand-over: %v", got.err)
	}
	eventually(t, "the foreground run acked", func() bool { return dispatchStatus(t, r.store, got.res.DispatchID) == engine.StatusAcked })
	if st := dispatchStatus(t, r.store, second); st != engine.StatusSuperseded {
		t.Fatalf("the handed-over dispatch is %s, want superseded", st)
	}
	for _, run := range r.exec.execRuns() {
		if run.DispatchID == second {
			t.Fatal("the superseded dispatch reached the agent")
		}
	}
	eventually(t, "slots released", func() bool { return r.mb.InFlight() == 0 })
}

// A completion whose claim of the next dispatch fails (a damaged record of
// that dispatch, say) still completes its own attempt: the engine
// completes alone, and the next dispatch is claimed the ordinary way. The
// failure is a stale claim, which Complete itself could answer too: the
// engine tells the halves apart by ErrNextClaim.
func TestFailedNextClaimDoesNotCostTheCompletion(t *testing.T) {
	r, fs := newExecRig(t, newFake(2, complete), engine.Config{}, func(fs *execFaultStore) { fs.completeClaimErr.Store(1) })
	ctx := context.Background()
	const thread = "claim-half-fails"
	var ids []string
	for _, text := range []string{"a", "b"} {
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg(text)}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.DispatchID)
	}
	r.start(t)
	eventually(t, "both acked", func() bool {
		return dispatchStatus(t, r.store, ids[0]) == engine.StatusAcked && dispatchStatus(t, r.store, ids[1]) == engine.StatusAcked
	})
	if n := fs.completeClaimErr.Load(); n != 0 {
		t.Fatalf("the injected failure was not reached (%d left)", n)
	}
	if d := loadDispatch(t, r, ids[0]); d.AttemptCount != 0 {
		t.Fatalf("the first dispatch spent %d attempts", d.AttemptCount)
	}
}

// A cancel of the dispatch a finishing attempt has just claimed with its
// completion, arriving before that dispatch's attempt starts, waits for
// the hand-over and cancels it (it used to find only the finished attempt
// and report nothing cancelled, and the dispatch ran).
func TestCancelDuringCompletionHandOff(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if execText(req.Messages[0]) == "second" {
			<-ctx.Done() // runs until cancelled
			return execCancelled()
		}
		return complete(ctx, req, sink)
	}
	r, fs, second, release := heldHandOff(t, "cancel-handoff", script)
	ctx := context.Background()
	type result struct {
		ok  bool
		err error
	}
	done := make(chan result, 1)
	go func() {
		ok, err := r.mb.Cancel(ctx, second.DispatchID)
		done <- result{ok, err}
	}()
	eventually(t, "the cancel reached the store", func() bool { return fs.storeCancels.Load() > 0 })
	var got result
	select {
	case got = <-done:
		// Answered while the hand-over is still held: it cannot have
		// found the attempt it is meant to cancel.
		release()
	case <-time.After(100 * time.Millisecond):
		release()
		got = <-done
	}
	if got.err != nil || !got.ok {
		t.Fatalf("cancel during the hand-over: %v, %v; want true", got.ok, got.err)
	}
	eventually(t, "the second dispatch settled", func() bool { return dispatchStatus(t, r.store, second.DispatchID) == engine.StatusAcked })
	run, err := r.store.LoadRun(ctx, second.RunID)
	if err != nil || run == nil || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
		t.Fatalf("the second run: %+v %v; want cancelled", run, err)
	}
	eventually(t, "slots released", func() bool { return r.mb.InFlight() == 0 })
}

func loadDispatch(t *testing.T, r *rig, id string) engine.Dispatch {
	t.Helper()
	d, err := r.store.LoadDispatch(context.Background(), id)
	if err != nil || d == nil {
		t.Fatalf("load %s: %v %v", id, d, err)
	}
	return *d
}

// heldHandOff starts a rig whose thread has two queued dispatches: the
// first runs, and the commit that completes it claims the second, whose
// hand-over then waits until release is called (at the latest before the
// rig stops).
func heldHandOff(t *testing.T, thread string, script func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome) (r *rig, fs *execFaultStore, second engine.SubmitResult, release func()) {
	t.Helper()
	var hold, queued <-chan struct{}
	var held atomic.Bool
	wrapped := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if execText(req.Messages[0]) == "first" {
			<-queued // the second dispatch is queued before the first finishes
		}
		return script(ctx, req, sink)
	}
	r, fs = newExecRig(t, newFake(2, wrapped), engine.Config{CancelWait: 5 * time.Second}, func(fs *execFaultStore) {
		fs.afterCompleteClaim = func(*engine.Dispatch) { held.Store(true); <-hold }
	})
	// Both released before the rig stops (cleanups run in reverse order).
	hold, release = execRelease(t)
	queued, bothQueued := execRelease(t)
	ctx := context.Background()
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("first")}})
	if err != nil {
		t.Fatal(err)
	}
	if second, err = r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("second")}}); err != nil {
		t.Fatal(err)
	}
	bothQueued()
	r.start(t)
	eventually(t, "the second dispatch claimed with the first's completion", func() bool {
		return held.Load() && dispatchStatus(t, r.store, first.DispatchID) == engine.StatusAcked && dispatchStatus(t, r.store, second.DispatchID) == engine.StatusClaimed
	})
	return r, fs, second, release
}

// A foreground submit that interrupts the run holding the only agent slot
// runs at once: it waits until the cancelled attempt has given its slot
// back, not only until the store shows the dispatch released (it used to
// come back queued most of the time, to start a moment later).
func TestForegroundSubmitTakesTheSlotItFreed(t *testing.T) {
	var release <-chan struct{}
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-ctx.Done():
			return execCancelled()
		case <-release:
			return complete(ctx, req, sink)
		}
	}
	r, _ := newExecRig(t, newFake(1, script), engine.Config{}, nil)
	release, _ = execRelease(t) // after the rig: released before its Stop
	r.start(t)
	ctx := context.Background()
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "one-slot", Messages: []engine.Message{userMsg("hold")}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first run executing", func() bool { n, _, _ := r.exec.stats(); return n == 1 })
	for i := range 10 {
		res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "one-slot", Messages: []engine.Message{userMsg("hold")}})
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != engine.SubmitRunning {
			t.Fatalf("submit %d came back %s, want running", i, res.Status)
		}
	}
}

// A foreground submit does not start its run while the interrupted
// attempt still executes here, even when the store already shows that
// attempt's dispatch released (a lease renewal of the interrupted claim
// supersedes it): with an agent that ignores the cancel, the two runs of
// the thread would overlap. The submit reports the conflict instead.
func TestForegroundSubmitWaitsForTheInterruptedAttemptToEnd(t *testing.T) {
	var release <-chan struct{}
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if execText(req.Messages[0]) == "stubborn" {
			<-release // ignores the cancel
		}
		return complete(ctx, req, sink)
	}
	r, _ := newExecRig(t, newFake(2, script), engine.Config{RenewInterval: 5 * time.Millisecond, CancelWait: 300 * time.Millisecond}, nil)
	release, _ = execRelease(t)
	r.start(t)
	ctx := context.Background()
	bg, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "stubborn", Messages: []engine.Message{userMsg("stubborn")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the stubborn run executing", func() bool { n, _, _ := r.exec.stats(); return n == 1 })
	_, _, err = r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "stubborn", Messages: []engine.Message{userMsg("now")}})
	if !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("foreground submit while the interrupted run still executes: %v, want a conflict", err)
	}
	if st := dispatchStatus(t, r.store, bg.DispatchID); st == engine.StatusClaimed {
		t.Fatalf("the stubborn dispatch is still claimed: the renewal did not supersede it, so this test proves nothing")
	}
	if n, _, overlap := r.exec.stats(); n != 1 || overlap {
		t.Fatalf("%d runs reached the agent (overlap %v), want only the stubborn one", n, overlap)
	}
}

// With every slot taken, the dispatcher looks again when a delayed
// dispatch of another thread falls due, and marks it as waiting, so the
// next finishing attempt leaves its slot to it (the dispatcher used to
// sleep until the next wake-up, and the finishing attempt handed its slot
// to its own thread's newer dispatch; found by review).
func TestDelayedWorkFallingDueWhileSlotsAreTakenIsNoticed(t *testing.T) {
	gate := make(chan struct{})
	var mu sync.Mutex
	var order []string
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		text := execText(req.Messages[len(req.Messages)-1])
		mu.Lock()
		order = append(order, text)
		mu.Unlock()
		if text == "a1" {
			select {
			case <-ctx.Done():
			case <-gate:
			}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "A", Messages: []engine.Message{userMsg("a1")}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a1 running", func() bool { n, _, _ := r.exec.stats(); return n == 1 })
	due := time.Now().UnixMilli() + 100
	execEnqueuePrepared(t, r, "B", "b1", due, nil)
	r.mb.Sweep(ctx) // wakes the dispatcher, as a delayed submit or a nack does
	eventually(t, "the dispatcher seeing b1 due", r.mb.Starved)
	// Times are in milliseconds, and ready threads that fell due in the
	// same one are listed by thread id: a2 must come due in a later
	// millisecond than b1 for b1 to have waited longer (within one, A
	// went first in 4 % of runs).
	for time.Now().UnixMilli() <= due {
		runtime.Gosched()
	}
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "A", Messages: []engine.Message{userMsg("a2")}}); err != nil {
		t.Fatal(err)
	}
	close(gate)
	eventually(t, "three runs", func() bool { n, _, _ := r.exec.stats(); return n == 3 })
	mu.Lock()
	defer mu.Unlock()
	// The slot a1 frees goes to the thread that waited longest (B), not
	// to a1's own thread's newer work.
	if !slices.Equal(order, []string{"a1", "b1", "a2"}) {
		t.Fatalf("runs %v, want [a1 b1 a2]", order)
	}
}
