package engine_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Regression tests for faults found in review; each failed before its fix.

// gateClaimStore blocks Claim of one thread until released, and can make
// the first claims fail.
type gateClaimStore struct {
	*badgerstore.Store
	thread   string
	entered  chan struct{}
	release  chan struct{}
	failures atomic.Int32
}

func (s *gateClaimStore) Claim(ctx context.Context, thread, consumer string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	if s.failures.Add(-1) >= 0 {
		return nil, errors.New("injected claim failure")
	}
	if thread == s.thread && s.entered != nil {
		close(s.entered)
		<-s.release
	}
	return s.Store.Claim(ctx, thread, consumer, lease, now)
}

// ClaimStart gates as Claim does (the engine claims with it on this store).
func (s *gateClaimStore) ClaimStart(ctx context.Context, thread, consumer string, lease time.Duration, instance string, now int64) (*engine.Dispatch, error) {
	if s.failures.Add(-1) >= 0 {
		return nil, errors.New("injected claim failure")
	}
	if thread == s.thread && s.entered != nil {
		close(s.entered)
		<-s.release
	}
	return s.Store.ClaimStart(ctx, thread, consumer, lease, instance, now)
}

func openMem(t *testing.T) *badgerstore.Store {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// A claim in flight when Stop begins is covered by Stop: it is released
// (not run) and Stop returns once it is.
func TestReview_StopCoversClaimsInFlight(t *testing.T) {
	bs := openMem(t)
	st := &gateClaimStore{Store: bs, thread: "B", entered: make(chan struct{}), release: make(chan struct{})}
	var ranB atomic.Int32
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.ThreadID == "B" {
			ranB.Add(1)
		}
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "stopped"}
	}
	mb, err := engine.New(st, newFake(4, script), engine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "A", Messages: []engine.Message{userMsg("a")}}); err != nil {
		t.Fatal(err)
	}
	submitted := make(chan engine.SubmitResult, 1)
	go func() {
		res, _ := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "B", Messages: []engine.Message{userMsg("b")}})
		submitted <- res
	}()
	<-st.entered
	stopped := make(chan struct{})
	grace, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	go func() {
		_ = mb.Stop(grace)
		close(stopped)
	}()
	// Stop has begun (a submit, even an invalid one, is refused as
	// shutting down before it is validated) and its grace has run out,
	// with B's claim still in flight.
	eventually(t, "Stop began", func() bool {
		_, err := mb.SubmitBackground(ctx, engine.SubmitRequest{})
		return errors.Is(err, engine.ErrShuttingDown)
	})
	<-grace.Done()
	close(st.release)
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop did not return: the claim in flight was never cancelled")
	}
	res := <-submitted
	d, err := bs.LoadDispatch(ctx, res.DispatchID)
	if err != nil || d == nil || d.Status != engine.StatusQueued || d.AttemptCount != 0 {
		t.Fatalf("B after Stop: %+v %v (want queued, no attempt spent)", d, err)
	}
	if ranB.Load() != 0 {
		t.Fatal("B reached the agent after Stop began")
	}
}

// A foreground submit that fails leaves the thread's re-attachable log
// alone.
func TestReview_FailedForegroundSubmitLeavesReattachAlone(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	before := r.mb.Reattach("t1")
	if before == nil {
		t.Fatal("no log to re-attach to")
	}
	// A run id that belongs to another thread fails preparation.
	if _, err := r.store.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t2", Run: &engine.RunRecord{RunID: "foreign", ThreadID: "t2", Status: engine.RunCreated}}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", RunIDHint: "foreign", Messages: []engine.Message{userMsg("y")}}); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("submit with a foreign run id: %v", err)
	}
	if after := r.mb.Reattach("t1"); after != before {
		t.Fatal("a failed submit replaced the thread's event log")
	}
}

// A queued foreground run superseded before it starts closes its stream,
// with a run_finish (termination cancelled) as its last event: every
// reader of the log — the submitter and anyone re-attached — learns how
// the run ended.
func TestReview_SupersededQueuedForegroundClosesItsStream(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{})
	r.start(t)
	ctx := context.Background()
	first, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("first")}})
	if err != nil || first.Status != engine.SubmitQueued {
		t.Fatalf("first foreground submit: %+v %v", first, err)
	}
	if _, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("second")}}); err != nil {
		t.Fatal(err)
	}
	if st := dispatchStatus(t, r.store, first.DispatchID); st != engine.StatusSuperseded {
		t.Fatalf("first dispatch is %s", st)
	}
	evs, _, _, _ := events.Read(0, 10, nil)
	if len(evs) != 1 || evs[0].Type != "run_finish" || !strings.Contains(string(evs[0].Data), `"cancelled"`) ||
		!strings.Contains(string(evs[0].Data), first.RunID) {
		t.Fatalf("the superseded run's events: %+v, want one run_finish, cancelled", evs)
	}
	if _, _, closed, _ := events.Read(evs[0].Seq, 10, nil); !closed {
		t.Fatal("the superseded run's stream stays open forever")
	}
}

// A user's cancel of a running run is final even when the agent reports a
// transient failure on its way out.
func TestReview_UserCancelIsNotRetried(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "agent went away"}
	}
	exec := newFake(1, script)
	r := newRig(t, exec, engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "claimed", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusClaimed })
	eventually(t, "running here", func() bool { ok, _ := r.mb.Cancel(ctx, res.RunID); return ok })
	eventually(t, "settled", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	run, _ := r.store.LoadRun(ctx, res.RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
		t.Fatalf("cancelled run %+v", run)
	}
	// The cancel may land before the attempt reached the agent (then it
	// never runs) or while it runs; either way it never runs again.
	time.Sleep(100 * time.Millisecond)
	if runs, _, _ := exec.stats(); runs > 1 {
		t.Fatalf("executor ran %d times, want at most 1", runs)
	}
}

// A failing claim is retried soon, not only at the next sweep.
func TestReview_FailingClaimIsRetriedSoon(t *testing.T) {
	bs := openMem(t)
	st := &gateClaimStore{Store: bs}
	st.failures.Store(3)
	mb, err := engine.New(st, newFake(1, complete), engine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() { _ = mb.Stop(ctx) })
	if err := mb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "run despite failing claims (sweep is 30s away)", func() bool {
		d, _ := bs.LoadDispatch(ctx, res.DispatchID)
		return d != nil && d.Status == engine.StatusAcked
	})
}

// A completed run whose agent sent no run_finish event still closes its
// client stream with one, carrying the outcome's termination (ipc.md);
// an agent's own run_finish is not doubled.
func TestCompletedRunWithoutRunFinishGetsOne(t *testing.T) {
	script := func(_ context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		sink.Emit([]byte(`{"type":"text_delta","delta":"hi"}`))
		if req.ThreadID == "t-waiting" {
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunWaiting, Waiting: &engine.RunWaitingState{Reason: "tool"}}
		}
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone}
	}
	r := newRig(t, newFake(2, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	for thread, want := range map[string]string{"t-done": `"type":"natural_end"`, "t-waiting": `"type":"suspended"`} {
		_, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("x")}})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, thread+" stream closed", func() bool { _, closed := events.ClosedAt(); return closed })
		evs, _, _, _ := events.Read(0, 10, nil)
		if len(evs) != 2 || evs[0].Type != "text_delta" || evs[1].Type != "run_finish" || !strings.Contains(string(evs[1].Data), want) {
			t.Fatalf("%s: events %+v", thread, evs)
		}
	}
	r2 := newRig(t, newFake(1, complete), engine.Config{})
	r2.start(t)
	_, events, err := r2.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t-own", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "stream closed", func() bool { _, closed := events.ClosedAt(); return closed })
	if evs, _, _, _ := events.Read(0, 10, nil); len(evs) != 2 {
		t.Fatalf("agent's own run_finish doubled: %+v", evs)
	}
}

// An operator's requeue of a dead letter runs the same run again with a
// fresh attempt budget, at once.
func TestMailboxRequeueRunsTheDeadLetterAgain(t *testing.T) {
	var fail atomic.Bool
	fail.Store(true)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if fail.Load() {
			return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "no such agent"}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-dl", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "dead letter", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
	if _, err := r.mb.Requeue(ctx, "no-such-dispatch"); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("requeue of an unknown dispatch: %v", err)
	}
	fail.Store(false)
	d, err := r.mb.Requeue(ctx, res.DispatchID)
	if err != nil || d.DispatchID == res.DispatchID || d.RunID != res.RunID || d.AttemptCount != 0 {
		t.Fatalf("requeue %+v %v", d, err)
	}
	eventually(t, "requeued run done", func() bool { return dispatchStatus(t, r.store, d.DispatchID) == engine.StatusAcked })
	if run := execRun(t, r.store, res.RunID); run.Status != engine.RunDone || len(run.ErrorPayload) != 0 {
		t.Fatalf("run after requeue %+v", run)
	}
	if _, err := r.mb.Requeue(ctx, d.DispatchID); !errors.Is(err, engine.ErrValidation) && !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("requeue of an acked dispatch: %v", err)
	}
}

// A foreground submit the store would refuse is refused before it
// interrupts the thread: the queued dispatch and the active run survive
// (found by the proxy's review). An idempotent repeat interrupts nothing.
func TestForegroundSubmitRefusedBeforeInterrupting(t *testing.T) {
	release := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return complete(ctx, req, sink)
	}
	exec := newFake(1, script)
	r := newRig(t, exec, engine.Config{})
	r.start(t)
	defer close(release)
	ctx := context.Background()
	active, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{{ID: "m-taken", Role: "user", Content: []byte(`"a"`)}}})
	if err != nil {
		t.Fatal(err)
	}
	// Running at the agent (its run record says running), not only claimed.
	eventually(t, "running", func() bool { runs, _, _ := exec.stats(); return runs == 1 })
	queued, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", DedupeKey: "k1", Messages: []engine.Message{userMsg("b")}})
	if err != nil {
		t.Fatal(err)
	}
	other, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-other", Messages: []engine.Message{userMsg("c")}})
	if err != nil {
		t.Fatal(err)
	}
	bad := []engine.SubmitRequest{
		{ThreadID: "t", Messages: []engine.Message{{ID: "m-taken", Role: "user", Content: []byte(`"again"`)}}},
		{ThreadID: "t", RunIDHint: other.RunID, Messages: []engine.Message{userMsg("x")}},
		{ThreadID: "t", RunIDHint: active.RunID, Messages: []engine.Message{userMsg("x")}},
		{ThreadID: "t", DispatchIDHint: queued.DispatchID, Messages: []engine.Message{userMsg("x")}},
	}
	for i, req := range bad {
		if _, _, err := r.mb.Submit(ctx, req); !errors.Is(err, engine.ErrValidation) && !errors.Is(err, engine.ErrAlreadyExists) {
			t.Fatalf("bad request %d: %v", i, err)
		}
	}
	res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", DedupeKey: "k1", Messages: []engine.Message{userMsg("b")}})
	if err != nil || res.DispatchID != queued.DispatchID {
		t.Fatalf("idempotent repeat %+v %v", res, err)
	}
	if st := dispatchStatus(t, r.store, active.DispatchID); st != engine.StatusClaimed {
		t.Fatalf("active dispatch after refused submits: %s", st)
	}
	if st := dispatchStatus(t, r.store, queued.DispatchID); st != engine.StatusQueued {
		t.Fatalf("queued dispatch after refused submits: %s", st)
	}
}

// Two messages for a waiting run while no agent slot is free: the first
// continues the waiting run, the second gets a run of its own; each
// dispatch executes its own message once (found by the crash harness:
// both continued the same run, the first dispatch executed the second
// message and the second dispatch was acked without running).
func TestWaitingRunContinuedOnceWhileQueued(t *testing.T) {
	script := func(_ context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if string(req.Messages[0].Content) == `"wait"` {
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunWaiting, Termination: &engine.Termination{Type: engine.TermSuspended}, Waiting: &engine.RunWaitingState{Reason: "tool_permission"}}
		}
		return complete(context.Background(), req, sink)
	}
	exec := newFake(1, script)
	r := newRig(t, exec, engine.Config{})
	r.start(t)
	ctx := context.Background()
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("wait")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "waiting", func() bool { return execRun(t, r.store, first.RunID).Status == engine.RunWaiting })
	exec.setCapacity(0)
	a, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("one")}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("two")}})
	if err != nil {
		t.Fatal(err)
	}
	if a.RunID != first.RunID || b.RunID == first.RunID {
		t.Fatalf("runs: waiting %s, first continuation %s, second %s", first.RunID, a.RunID, b.RunID)
	}
	exec.setCapacity(1)
	eventually(t, "both done", func() bool {
		return dispatchStatus(t, r.store, a.DispatchID) == engine.StatusAcked && dispatchStatus(t, r.store, b.DispatchID) == engine.StatusAcked
	})
	var got []string
	for _, run := range exec.execRuns()[1:] {
		got = append(got, run.RunID+":"+string(run.Messages[0].Content))
	}
	want := []string{a.RunID + `:"one"`, b.RunID + `:"two"`}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("executed %v, want %v", got, want)
	}
}

// A cancel of a running run is durable when it is reported: the dispatch
// is acked as cancelled at once, before the agent has stopped, so a crash
// (here: a new mailbox on the same store while the old agent ignores the
// cancel) does not run it again (found by the crash harness).
func TestCancelOfRunningRunIsDurableAtOnce(t *testing.T) {
	stop := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-stop // an agent that does not react to the cancel
		return complete(ctx, req, sink)
	}
	exec := newFake(1, script)
	r := newRig(t, exec, engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "running", func() bool { runs, _, _ := exec.stats(); return runs == 1 })
	ok, err := r.mb.Cancel(ctx, res.DispatchID)
	if err != nil || !ok {
		t.Fatalf("cancel %v %v", ok, err)
	}
	// Durable before the agent reacted.
	d := execLoad(t, r.store, res.DispatchID)
	if d.Status != engine.StatusAcked || d.Termination == nil || d.Termination.Type != engine.TermCancelled {
		t.Fatalf("dispatch right after the cancel %+v", d)
	}
	if run := execRun(t, r.store, res.RunID); run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
		t.Fatalf("run right after the cancel %+v", run)
	}
	close(stop)
	// The late natural finish changes nothing.
	time.Sleep(100 * time.Millisecond)
	if run := execRun(t, r.store, res.RunID); run.TerminationReason.Type != engine.TermCancelled {
		t.Fatalf("run after the agent finished anyway %+v", run)
	}
	// A second cancel finds nothing to cancel.
	if ok, err := r.mb.Cancel(ctx, res.DispatchID); err != nil || ok {
		t.Fatalf("second cancel %v %v", ok, err)
	}
}
