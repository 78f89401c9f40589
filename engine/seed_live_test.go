package engine_test

// Go counterparts of the seed's live-control tests (engine.md §6, §7):
// live-then-queue steering, remote live delivery through a LiveRouter
// store, foreground cancel of a remote active run, live decisions, and
// re-attachment to a run's events (the seed's reconnect_sink).
//
// Remote delivery is simulated by liveRouterStore, a Badger store that
// also implements engine.LiveRouter: it records every delivery and answers
// as the test scripts it — or routes to a second Mailbox's HandleLive on
// the same store, which plays the other process.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// liveStore opens an in-memory Badger store; when the test ends (after
// every mailbox on it stopped) it is verified and closed.
func liveStore(t *testing.T) *badgerstore.Store {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		rep, err := s.Verify(context.Background())
		if err != nil || len(rep.Problems) > 0 {
			t.Errorf("verify after test: %v %v", err, rep.Problems)
		}
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}

// liveMailbox builds a Mailbox over store; it is stopped when the test
// ends, before the store closes.
func liveMailbox(t *testing.T, store engine.Store, exec *fakeExecutor, cfg engine.Config) *engine.Mailbox {
	t.Helper()
	if cfg.RetryDelay == 0 {
		cfg.RetryDelay = 20 * time.Millisecond
		cfg.MaxRetryDelay = 200 * time.Millisecond
	}
	mb, err := engine.New(store, exec, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := mb.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return mb
}

// liveCall is one DeliverLive call seen by liveRouterStore.
type liveCall struct {
	Target engine.LiveTarget
	Cmd    engine.LiveCommand
}

// liveRouterStore is a Badger store shared "between processes": its
// DeliverLive records the call and answers through deliver (nil: no
// subscriber for any target).
type liveRouterStore struct {
	*badgerstore.Store
	deliver func(ctx context.Context, target engine.LiveTarget, cmd engine.LiveCommand) (bool, error)

	mu    sync.Mutex
	calls []liveCall
}

func (s *liveRouterStore) DeliverLive(ctx context.Context, target engine.LiveTarget, cmd engine.LiveCommand) (bool, error) {
	s.mu.Lock()
	s.calls = append(s.calls, liveCall{Target: target, Cmd: cmd})
	s.mu.Unlock()
	if s.deliver == nil {
		return false, nil
	}
	return s.deliver(ctx, target, cmd)
}

func (s *liveRouterStore) recorded() []liveCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

// liveText decodes a message whose content is a JSON string.
func liveText(m engine.Message) string {
	var s string
	if err := json.Unmarshal(m.Content, &s); err != nil {
		return string(m.Content)
	}
	return s
}

func liveRecTexts(recs []engine.MessageRecord) []string {
	out := make([]string, len(recs))
	for i := range recs {
		out[i] = liveText(recs[i].Message)
	}
	return out
}

// liveLog returns the texts of a thread's message log.
func liveLog(t *testing.T, s engine.Store, thread string) []engine.MessageRecord {
	t.Helper()
	recs, err := s.LoadMessages(context.Background(), thread)
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

func liveCountText(t *testing.T, s engine.Store, thread, text string) int {
	t.Helper()
	n := 0
	for _, x := range liveRecTexts(liveLog(t, s, thread)) {
		if x == text {
			n++
		}
	}
	return n
}

func liveDispatches(t *testing.T, s engine.Store, thread string, filter engine.StatusFilter) []engine.Dispatch {
	t.Helper()
	ds, err := s.ListDispatches(context.Background(), thread, filter, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

func liveRun(t *testing.T, s engine.Store, id string) engine.RunRecord {
	t.Helper()
	r, err := s.LoadRun(context.Background(), id)
	if err != nil || r == nil {
		t.Fatalf("load run %s: %v %v", id, r, err)
	}
	return *r
}

func liveRunsOf(f *fakeExecutor) []engine.RunRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.runs)
}

// liveRecv waits (bounded) for a value on ch.
func liveRecv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// liveRelease returns a channel and an idempotent func closing it. The
// func also runs at cleanup; callers that create it before their mailbox
// defer it too, so it runs before the mailbox's Stop and a blocked script
// never holds the shutdown up.
func liveRelease(t *testing.T) (<-chan struct{}, func()) {
	ch := make(chan struct{})
	f := sync.OnceFunc(func() { close(ch) })
	t.Cleanup(f)
	return ch, f
}

func liveCancelled() engine.RunOutcome {
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
}

func liveReq(thread, text string) engine.SubmitRequest {
	return engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg(text)}}
}

// livePrepared prepares a run (durable run record and messages) and
// builds its dispatch without enqueueing it, like the seed's
// prepare_run_for_dispatch + build_dispatch.
func livePrepared(t *testing.T, mb *engine.Mailbox, req engine.SubmitRequest) engine.Dispatch {
	t.Helper()
	if err := engine.ValidateRunInputs(&req); err != nil {
		t.Fatal(err)
	}
	if _, err := mb.PrepareRun(context.Background(), &req); err != nil {
		t.Fatalf("prepare run: %v", err)
	}
	d, err := mb.BuildDispatch(&req, mb.Config().Now())
	if err != nil {
		t.Fatalf("build dispatch: %v", err)
	}
	return d
}

// liveRemoteRun writes a run record that "another process" is executing
// (or waiting in), like the seed's seeded_waiting_run.
func liveRemoteRun(t *testing.T, s engine.Store, runID, thread string, status engine.RunStatus, waiting string) engine.RunRecord {
	t.Helper()
	r := engine.RunRecord{RunID: runID, ThreadID: thread, AgentID: "agent", Status: status, CreatedAt: 1, UpdatedAt: 1, Steps: 2}
	if waiting != "" {
		r.Waiting = &engine.RunWaitingState{Reason: waiting}
	}
	if err := s.CreateRun(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	return r
}

// liveRouteTo delivers live commands to mb, the process executing the
// target run (its HandleLive).
func liveRouteTo(mb *engine.Mailbox) func(context.Context, engine.LiveTarget, engine.LiveCommand) (bool, error) {
	return func(ctx context.Context, target engine.LiveTarget, cmd engine.LiveCommand) (bool, error) {
		return mb.HandleLive(ctx, target, cmd), nil
	}
}

func liveIsConflict(err error) bool {
	return err != nil && errors.Is(err, engine.ErrVersionConflict) && strings.Contains(err.Error(), engine.ConflictActiveRun)
}

// --- §6 live-then-queue, local run ----------------------------------------

func TestSeed_live_then_queue_steers_active_run_without_new_dispatch(t *testing.T) {
	const thread = "thread-live-steer"
	started := make(chan struct{})
	steered := make(chan []engine.MessageRecord, 1)
	release, releaseFn := liveRelease(t)
	defer releaseFn()
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if liveText(req.Messages[0]) == "start" {
			close(started)
			select {
			case c := <-req.Commands:
				steered <- c.Messages
				c.Reply <- nil
			case <-ctx.Done():
				return liveCancelled()
			}
			select {
			case <-release:
			case <-ctx.Done():
				return liveCancelled()
			}
		}
		return complete(ctx, req, sink)
	}
	s := liveStore(t)
	exec := newFake(1, script)
	mb := liveMailbox(t, s, exec, engine.Config{})
	ctx := context.Background()

	first, err := mb.SubmitBackground(ctx, liveReq(thread, "start"))
	if err != nil || first.Status != engine.SubmitRunning {
		t.Fatalf("initial submit should start: %+v %v", first, err)
	}
	liveRecv(t, started, "the first run to start")

	res, how, err := mb.SendMessages(ctx, liveReq(thread, "live steer"), "")
	if err != nil {
		t.Fatalf("live steer: %v", err)
	}
	if how != engine.DeliveredLive || res.Status != engine.SubmitRunning || res.RunID != first.RunID || res.DispatchID != first.DispatchID {
		t.Fatalf("live steer result %+v %s, want the active run %+v delivered live", res, how, first)
	}
	got := liveRecv(t, steered, "the live command at the agent")
	if len(got) != 1 || liveText(got[0].Message) != "live steer" || got[0].Message.Role != engine.RoleUser || got[0].Message.Visibility != "" {
		t.Fatalf("the running agent received %+v, want the user message \"live steer\" visible to all", got)
	}

	releaseFn()
	eventually(t, "the steered run finished", func() bool { return dispatchStatus(t, s, first.DispatchID) == engine.StatusAcked })
	latest, err := s.LatestRun(ctx, thread)
	if err != nil || latest == nil || latest.RunID != first.RunID || latest.Status != engine.RunDone {
		t.Fatalf("latest run %+v %v, want %s done", latest, err, first.RunID)
	}
	if n := liveCountText(t, s, thread, "live steer"); n != 1 {
		t.Fatalf("live message persisted %d times, want exactly once", n)
	}
	ds := liveDispatches(t, s, thread, nil)
	if len(ds) != 1 || ds[0].DispatchID != first.DispatchID {
		t.Fatalf("live steering must not create a dispatch: %+v", ds)
	}
	if runs := liveRunsOf(exec); len(runs) != 1 {
		t.Fatalf("executor ran %d attempts, want 1", len(runs))
	}
}

func TestSeed_live_then_queue_falls_back_to_durable_dispatch_when_receiver_unavailable(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer func(engine.Command) // nil: the agent never reads its commands
	}{
		{"agent gives no receipt", nil},
		{"agent refuses the command", func(c engine.Command) { c.Reply <- errors.New("agent busy") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const thread = "thread-live-fallback"
			started := make(chan struct{})
			release, releaseFn := liveRelease(t)
			defer releaseFn()
			script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
				if liveText(req.Messages[0]) != "active" {
					return complete(ctx, req, sink)
				}
				close(started)
				var cmds <-chan engine.Command
				if tc.answer != nil {
					cmds = req.Commands
				}
				for {
					select {
					case c := <-cmds:
						tc.answer(c)
					case <-release:
						return complete(ctx, req, sink)
					case <-ctx.Done():
						return liveCancelled()
					}
				}
			}
			s := liveStore(t)
			exec := newFake(1, script)
			mb := liveMailbox(t, s, exec, engine.Config{CommandTimeout: 50 * time.Millisecond})
			if err := mb.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			active, err := mb.SubmitBackground(ctx, liveReq(thread, "active"))
			if err != nil {
				t.Fatal(err)
			}
			liveRecv(t, started, "the active run to start")

			res, how, err := mb.SendMessages(ctx, liveReq(thread, "fallback"), "")
			if err != nil {
				t.Fatalf("fallback submit: %v", err)
			}
			if how != engine.DeliveredQueued || res.Status != engine.SubmitQueued || res.DispatchID == active.DispatchID || res.RunID == active.RunID {
				t.Fatalf("fallback result %+v %s, want a new queued dispatch (active %+v)", res, how, active)
			}
			if n := liveCountText(t, s, thread, "fallback"); n != 1 {
				t.Fatalf("fallback message persisted %d times, want once", n)
			}
			queued := liveDispatches(t, s, thread, engine.StatusFilter{engine.StatusQueued})
			if len(queued) != 1 || queued[0].DispatchID != res.DispatchID {
				t.Fatalf("queued dispatches %+v, want only %s", queued, res.DispatchID)
			}
			// The fallback activates the logged message by id.
			var loggedID string
			for _, r := range liveLog(t, s, thread) {
				if liveText(r.Message) == "fallback" {
					loggedID = r.MessageID
				}
			}
			if run := liveRun(t, s, res.RunID); run.Request == nil || !slices.Equal(run.Request.InputMessageIDs, []string{loggedID}) {
				t.Fatalf("fallback run snapshot %+v, want input message ids [%s]", run.Request, loggedID)
			}

			releaseFn()
			eventually(t, "the fallback run ran after the active one", func() bool {
				return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked
			})
			runs := liveRunsOf(exec)
			last := runs[len(runs)-1]
			if len(last.Messages) != 1 || liveText(last.Messages[0]) != "fallback" || last.Messages[0].ID != loggedID {
				t.Fatalf("fallback run activated %+v, want the logged message %s", last.Messages, loggedID)
			}
			if n := liveCountText(t, s, thread, "fallback"); n != 1 {
				t.Fatalf("after the fallback ran the message is logged %d times, want once", n)
			}
		})
	}
}

// --- §4 item 21 / §7 item 47: foreground submit vs a remote active run ----

func TestSeed_foreground_submit_sends_live_cancel_for_remote_active_dispatch(t *testing.T) {
	t.Run("remote subscriber releases the claim", func(t *testing.T) {
		const thread = "thread-remote-foreground"
		ctx := context.Background()
		s := liveStore(t)
		router := &liveRouterStore{Store: s}
		mb := liveMailbox(t, router, newFake(1, complete), engine.Config{})

		active := livePrepared(t, mb, liveReq(thread, "active"))
		if _, err := s.Enqueue(ctx, active); err != nil {
			t.Fatal(err)
		}
		claimed, err := s.ClaimDispatch(ctx, active.DispatchID, "remote-consumer", 30*time.Second, time.Now().UnixMilli())
		if err != nil || claimed == nil {
			t.Fatalf("claim active: %v %v", claimed, err)
		}
		router.deliver = func(ctx context.Context, _ engine.LiveTarget, cmd engine.LiveCommand) (bool, error) {
			if cmd.Kind != engine.LiveCancel {
				return false, nil
			}
			// The remote run stops and releases its claim: an ack, or a
			// supersede because the interrupt bumped the epoch.
			if err := s.Ack(ctx, active.DispatchID, claimed.ClaimToken, time.Now().UnixMilli()); err != nil && !errors.Is(err, engine.ErrVersionConflict) {
				return false, err
			}
			return true, nil
		}

		res, events, err := mb.Submit(ctx, liveReq(thread, "replacement"))
		if err != nil {
			t.Fatalf("foreground submit should cancel the remote run and claim the replacement: %v", err)
		}
		if res.Status != engine.SubmitRunning || res.DispatchID == active.DispatchID || events == nil {
			t.Fatalf("foreground result %+v", res)
		}
		want := engine.LiveTarget{ThreadID: thread, RunID: active.RunID, DispatchID: active.DispatchID}
		if !slices.ContainsFunc(router.recorded(), func(c liveCall) bool { return c.Cmd.Kind == engine.LiveCancel && c.Target == want }) {
			t.Fatalf("no live cancel to %+v; deliveries %+v", want, router.recorded())
		}
		if st := dispatchStatus(t, s, active.DispatchID); st != engine.StatusAcked && st != engine.StatusSuperseded {
			t.Fatalf("remote active dispatch is %s, want released (acked or superseded)", st)
		}
		eventually(t, "replacement acked", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	})

	t.Run("another mailbox executes the active run", func(t *testing.T) {
		const thread = "thread-remote-foreground-2"
		ctx := context.Background()
		s := liveStore(t)
		started := make(chan struct{})
		var sawCancel atomic.Bool
		remote := liveMailbox(t, s, newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			close(started)
			<-ctx.Done()
			sawCancel.Store(true)
			return liveCancelled()
		}), engine.Config{})
		router := &liveRouterStore{Store: s, deliver: liveRouteTo(remote)}
		local := liveMailbox(t, router, newFake(1, complete), engine.Config{})

		active, err := remote.SubmitBackground(ctx, liveReq(thread, "active"))
		if err != nil || active.Status != engine.SubmitRunning {
			t.Fatalf("remote submit: %+v %v", active, err)
		}
		liveRecv(t, started, "the remote run to start")

		res, _, err := local.Submit(ctx, liveReq(thread, "replacement"))
		if err != nil || res.Status != engine.SubmitRunning {
			t.Fatalf("foreground submit across processes: %+v %v", res, err)
		}
		// The remote settles the cancel and cancels the run's context
		// before it answers; the run's goroutine sees that a moment later
		// (a stress run of the suite read it too soon).
		eventually(t, "the remote run's context cancelled", sawCancel.Load)
		calls := router.recorded()
		want := engine.LiveTarget{ThreadID: thread, RunID: active.RunID, DispatchID: active.DispatchID}
		if len(calls) != 1 || calls[0].Cmd.Kind != engine.LiveCancel || calls[0].Target != want {
			t.Fatalf("deliveries %+v, want one cancel to %+v", calls, want)
		}
		if st := dispatchStatus(t, s, active.DispatchID); st == engine.StatusClaimed || st == engine.StatusQueued {
			t.Fatalf("remote active dispatch still %s", st)
		}
		if run := liveRun(t, s, active.RunID); run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
			t.Fatalf("remote run after cancel %+v", run)
		}
		eventually(t, "replacement acked", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	})
}

func TestSeed_foreground_submit_does_not_prepare_replacement_when_remote_cancel_times_out(t *testing.T) {
	const cancelWait = 250 * time.Millisecond // REMOTE_CANCEL_WAIT in tests
	for _, tc := range []struct {
		name     string
		router   bool
		deliver  func(context.Context, engine.LiveTarget, engine.LiveCommand) (bool, error)
		waitsFor bool // the submit waits CancelWait for a release
	}{
		{name: "subscriber accepts cancel but the claim stays", router: true, waitsFor: true,
			deliver: func(context.Context, engine.LiveTarget, engine.LiveCommand) (bool, error) { return true, nil }},
		{name: "no subscriber", router: true},
		{name: "delivery error", router: true,
			deliver: func(context.Context, engine.LiveTarget, engine.LiveCommand) (bool, error) {
				return false, errors.New("bus down")
			}},
		{name: "store without live routing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const thread = "thread-remote-cancel-timeout"
			ctx := context.Background()
			s := liveStore(t)
			var store engine.Store = s
			router := &liveRouterStore{Store: s, deliver: tc.deliver}
			if tc.router {
				store = router
			}
			mb := liveMailbox(t, store, newFake(1, complete), engine.Config{CancelWait: cancelWait})
			active := livePrepared(t, mb, liveReq(thread, "active"))
			if _, err := s.Enqueue(ctx, active); err != nil {
				t.Fatal(err)
			}
			if c, err := s.ClaimDispatch(ctx, active.DispatchID, "remote-consumer", 30*time.Second, time.Now().UnixMilli()); err != nil || c == nil {
				t.Fatalf("claim active: %v %v", c, err)
			}

			began := time.Now()
			_, _, err := mb.Submit(ctx, liveReq(thread, "replacement"))
			took := time.Since(began)
			if !liveIsConflict(err) {
				t.Fatalf("submit error %v, want the active-run conflict %q", err, engine.ConflictActiveRun)
			}
			if tc.waitsFor && took < cancelWait {
				t.Fatalf("submit gave up after %s, before CancelWait %s", took, cancelWait)
			}
			if texts := liveRecTexts(liveLog(t, s, thread)); !slices.Equal(texts, []string{"active"}) {
				t.Fatalf("thread log %q, want only the active message", texts)
			}
			all := liveDispatches(t, s, thread, nil)
			if len(all) != 1 || all[0].DispatchID != active.DispatchID || all[0].Status != engine.StatusClaimed {
				t.Fatalf("dispatches %+v, want only the active one, still claimed", all)
			}
			page, err := s.ListRuns(ctx, engine.RunQuery{ThreadID: thread})
			if err != nil || page.Total != 1 {
				t.Fatalf("runs of the thread: %d %v, want only the active run", page.Total, err)
			}
			calls := router.recorded()
			want := engine.LiveTarget{ThreadID: thread, RunID: active.RunID, DispatchID: active.DispatchID}
			if tc.router && (len(calls) != 1 || calls[0].Cmd.Kind != engine.LiveCancel || calls[0].Target != want) {
				t.Fatalf("deliveries %+v, want one cancel to %+v", calls, want)
			}
		})
	}
}

// --- §6 live-then-queue, remote run -----------------------------------------

func TestSeed_live_then_queue_publishes_for_remote_active_run(t *testing.T) {
	t.Run("seeded running run", func(t *testing.T) {
		const thread, remoteRun = "thread-remote", "run-remote"
		ctx := context.Background()
		s := liveStore(t)
		router := &liveRouterStore{Store: s, deliver: func(context.Context, engine.LiveTarget, engine.LiveCommand) (bool, error) { return true, nil }}
		liveRemoteRun(t, s, remoteRun, thread, engine.RunRunning, "")
		mb := liveMailbox(t, router, newFake(0, complete), engine.Config{})

		res, how, err := mb.SendMessages(ctx, liveReq(thread, "steer-remote"), "")
		if err != nil {
			t.Fatal(err)
		}
		if how != engine.DeliveredLive || res.Status != engine.SubmitRunning || res.RunID != remoteRun || res.DispatchID != remoteRun {
			t.Fatalf("result %+v %s, want the remote run (dispatch id falls back to the run id)", res, how)
		}
		calls := router.recorded()
		if len(calls) != 1 || calls[0].Cmd.Kind != engine.LiveMessages || calls[0].Target != (engine.LiveTarget{ThreadID: thread, RunID: remoteRun}) {
			t.Fatalf("deliveries %+v, want one Messages command to the run target", calls)
		}
		if texts := liveRecTexts(calls[0].Cmd.Messages); !slices.Equal(texts, []string{"steer-remote"}) {
			t.Fatalf("delivered %q", texts)
		}
		if ds := liveDispatches(t, s, thread, nil); len(ds) != 0 {
			t.Fatalf("cross-node live delivery must not create a dispatch: %+v", ds)
		}
		// Logged durably before the offer, exactly once.
		if n := liveCountText(t, s, thread, "steer-remote"); n != 1 {
			t.Fatalf("steer message logged %d times, want once", n)
		}
	})

	t.Run("run executing in another mailbox", func(t *testing.T) {
		const thread = "thread-remote-exec"
		ctx := context.Background()
		s := liveStore(t)
		started := make(chan struct{})
		got := make(chan []engine.MessageRecord, 1)
		remote := liveMailbox(t, s, newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			close(started)
			select {
			case c := <-req.Commands:
				got <- c.Messages
				c.Reply <- nil
			case <-ctx.Done():
				return liveCancelled()
			}
			return complete(ctx, req, sink)
		}), engine.Config{})
		router := &liveRouterStore{Store: s, deliver: liveRouteTo(remote)}
		local := liveMailbox(t, router, newFake(0, complete), engine.Config{})

		first, err := remote.SubmitBackground(ctx, liveReq(thread, "start"))
		if err != nil || first.Status != engine.SubmitRunning {
			t.Fatalf("remote submit %+v %v", first, err)
		}
		liveRecv(t, started, "the remote run to start")

		res, how, err := local.SendMessages(ctx, liveReq(thread, "steer-remote"), first.RunID)
		if err != nil || how != engine.DeliveredLive || res.RunID != first.RunID || res.DispatchID != first.DispatchID || res.Status != engine.SubmitRunning {
			latest, _ := s.LatestRun(ctx, thread)
			t.Fatalf("cross-process steer %+v %s %v, want live to %+v (router calls %+v, latest run %+v)", res, how, err, first, router.recorded(), latest)
		}
		recs := liveRecv(t, got, "the steer at the remote agent")
		if len(recs) != 1 || liveText(recs[0].Message) != "steer-remote" || recs[0].Seq != 2 {
			t.Fatalf("remote agent received %+v", recs)
		}
		calls := router.recorded()
		want := engine.LiveTarget{ThreadID: thread, RunID: first.RunID, DispatchID: first.DispatchID}
		if len(calls) != 1 || calls[0].Target != want {
			t.Fatalf("deliveries %+v, want one to %+v (with the dispatch id)", calls, want)
		}
		eventually(t, "remote run acked", func() bool { return dispatchStatus(t, s, first.DispatchID) == engine.StatusAcked })
		if ds := liveDispatches(t, s, thread, nil); len(ds) != 1 {
			t.Fatalf("live steering created dispatches: %+v", ds)
		}
		if n := liveCountText(t, s, thread, "steer-remote"); n != 1 {
			t.Fatalf("steer message logged %d times, want once", n)
		}
	})
}

// liveFallbackCase runs live-then-queue against a seeded remote running
// run whose delivery fails as deliver says, and checks the durable
// fallback.
func liveFallbackCase(t *testing.T, store func(*badgerstore.Store) engine.Store, thread, runID, text string) (engine.SubmitResult, *badgerstore.Store) {
	t.Helper()
	ctx := context.Background()
	s := liveStore(t)
	liveRemoteRun(t, s, runID, thread, engine.RunRunning, "")
	mb := liveMailbox(t, store(s), newFake(0, complete), engine.Config{})
	res, how, err := mb.SendMessages(ctx, liveReq(thread, text), "")
	if err != nil {
		t.Fatalf("submit should succeed via the queue fallback: %v", err)
	}
	if how != engine.DeliveredQueued || res.Status != engine.SubmitQueued || res.RunID == runID {
		t.Fatalf("result %+v %s, want a queued new run", res, how)
	}
	ds := liveDispatches(t, s, thread, nil)
	if len(ds) != 1 || ds[0].DispatchID != res.DispatchID || ds[0].Status != engine.StatusQueued {
		t.Fatalf("dispatches %+v, want exactly the fallback %s", ds, res.DispatchID)
	}
	if n := liveCountText(t, s, thread, text); n != 1 {
		t.Fatalf("message logged %d times, want once", n)
	}
	return res, s
}

func TestSeed_live_then_queue_falls_back_when_subscriber_drops_receipt(t *testing.T) {
	var router *liveRouterStore
	liveFallbackCase(t, func(s *badgerstore.Store) engine.Store {
		router = &liveRouterStore{Store: s, deliver: func(context.Context, engine.LiveTarget, engine.LiveCommand) (bool, error) {
			return false, nil // the subscriber got it but never acked
		}}
		return router
	}, "thread-dropped-receipt", "run-dropped", "hello?")
	if calls := router.recorded(); len(calls) != 1 || calls[0].Target.RunID != "run-dropped" {
		t.Fatalf("deliveries %+v, want one offer to run-dropped", calls)
	}
}

func TestSeed_live_then_queue_is_at_least_once_when_ack_lost(t *testing.T) {
	const thread = "thread-ack-lost"
	ctx := context.Background()
	s := liveStore(t)
	liveRemoteRun(t, s, "run-ack-lost", thread, engine.RunRunning, "")
	var mu sync.Mutex
	var seen []engine.MessageRecord
	router := &liveRouterStore{Store: s, deliver: func(_ context.Context, _ engine.LiveTarget, cmd engine.LiveCommand) (bool, error) {
		mu.Lock()
		seen = append(seen, cmd.Messages...)
		mu.Unlock()
		return false, nil // accepted remotely, but the ack was lost
	}}
	exec := newFake(1, complete)
	mb := liveMailbox(t, router, exec, engine.Config{})

	res, how, err := mb.SendMessages(ctx, liveReq(thread, "steer-payload"), "")
	if err != nil || how != engine.DeliveredQueued {
		t.Fatalf("submit should succeed via the queue fallback: %+v %s %v", res, how, err)
	}
	mu.Lock()
	got := slices.Clone(seen)
	mu.Unlock()
	if texts := liveRecTexts(got); !slices.Equal(texts, []string{"steer-payload"}) {
		t.Fatalf("the subscriber observed %q, want the live command before the lost ack", texts)
	}
	ds := liveDispatches(t, s, thread, nil)
	if len(ds) != 1 || ds[0].DispatchID != res.DispatchID {
		t.Fatalf("dispatches %+v, want exactly the fallback", ds)
	}
	// At least once, never twice in the log: the fallback run activates
	// the very message the subscriber saw.
	log := liveLog(t, s, thread)
	if len(log) != 1 || log[0].MessageID != got[0].MessageID {
		t.Fatalf("thread log %+v, want only message %s", log, got[0].MessageID)
	}
	eventually(t, "fallback run executed", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	runs := liveRunsOf(exec)
	if len(runs) != 1 || len(runs[0].Messages) != 1 || runs[0].Messages[0].ID != got[0].MessageID {
		t.Fatalf("fallback run activated %+v, want message %s", runs, got[0].MessageID)
	}
}

func TestSeed_live_then_queue_rejects_remote_mismatched_expected_run_id(t *testing.T) {
	t.Run("seeded running run", func(t *testing.T) {
		const thread = "thread-mismatch"
		ctx := context.Background()
		s := liveStore(t)
		liveRemoteRun(t, s, "run-actual", thread, engine.RunRunning, "")
		router := &liveRouterStore{Store: s, deliver: func(context.Context, engine.LiveTarget, engine.LiveCommand) (bool, error) { return true, nil }}
		mb := liveMailbox(t, router, newFake(0, complete), engine.Config{})

		res, how, err := mb.SendMessages(ctx, liveReq(thread, "wrong-run"), "run-stale")
		if err != nil {
			t.Fatal(err)
		}
		if res.RunID == "run-actual" || how != engine.DeliveredQueued {
			t.Fatalf("mismatched expected_run_id steered the remote run: %+v %s", res, how)
		}
		if calls := router.recorded(); len(calls) != 0 {
			t.Fatalf("a mismatched run id must not be offered live: %+v", calls)
		}
		if ds := liveDispatches(t, s, thread, nil); len(ds) != 1 || ds[0].DispatchID != res.DispatchID {
			t.Fatalf("dispatches %+v, want the fallback only", ds)
		}
	})

	t.Run("local run with another id", func(t *testing.T) {
		const thread = "thread-mismatch-local"
		ctx := context.Background()
		started := make(chan struct{})
		leaked := make(chan engine.Command, 4)
		release, releaseFn := liveRelease(t)
		defer releaseFn()
		s := liveStore(t)
		mb := liveMailbox(t, s, newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			if liveText(req.Messages[0]) != "start" {
				return complete(ctx, req, sink)
			}
			close(started)
			for {
				select {
				case c := <-req.Commands:
					c.Reply <- nil
					leaked <- c
				case <-release:
					return complete(ctx, req, sink)
				case <-ctx.Done():
					return liveCancelled()
				}
			}
		}), engine.Config{})
		first, err := mb.SubmitBackground(ctx, liveReq(thread, "start"))
		if err != nil {
			t.Fatal(err)
		}
		liveRecv(t, started, "the local run")
		res, how, err := mb.SendMessages(ctx, liveReq(thread, "wrong-run"), "run-stale")
		if err != nil || how != engine.DeliveredQueued || res.RunID == first.RunID || res.DispatchID == first.DispatchID {
			t.Fatalf("mismatched expected_run_id steered the local run: %+v %s %v", res, how, err)
		}
		if len(leaked) != 0 {
			t.Fatalf("the running agent received %+v", <-leaked)
		}
	})

	t.Run("receiver refuses a stale target", func(t *testing.T) {
		const thread = "thread-mismatch-exec"
		ctx := context.Background()
		s := liveStore(t)
		started := make(chan struct{})
		leaked := make(chan engine.Command, 4)
		release, releaseFn := liveRelease(t)
		defer releaseFn()
		remote := liveMailbox(t, s, newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			close(started)
			for {
				select {
				case c := <-req.Commands:
					c.Reply <- nil
					leaked <- c
				case <-release:
					return liveCancelled()
				case <-ctx.Done():
					return liveCancelled()
				}
			}
		}), engine.Config{})
		first, err := remote.SubmitBackground(ctx, liveReq(thread, "start"))
		if err != nil {
			t.Fatal(err)
		}
		liveRecv(t, started, "the remote run")
		msgs := []engine.MessageRecord{{MessageID: "m1", ThreadID: thread, Seq: 1}}
		for _, target := range []engine.LiveTarget{
			{ThreadID: thread, RunID: "run-stale", DispatchID: first.DispatchID},
			{ThreadID: thread, RunID: first.RunID, DispatchID: "dispatch-stale"},
			{ThreadID: "other-thread", RunID: first.RunID, DispatchID: first.DispatchID},
		} {
			if remote.HandleLive(ctx, target, engine.LiveCommand{Kind: engine.LiveMessages, Messages: msgs}) {
				t.Fatalf("HandleLive accepted stale target %+v (running %+v)", target, first)
			}
		}
		if len(leaked) != 0 {
			t.Fatalf("a stale target reached the agent: %+v", <-leaked)
		}
		// The exact target is accepted.
		exact := engine.LiveTarget{ThreadID: thread, RunID: first.RunID, DispatchID: first.DispatchID}
		if !remote.HandleLive(ctx, exact, engine.LiveCommand{Kind: engine.LiveMessages, Messages: msgs}) {
			t.Fatalf("HandleLive refused the exact target %+v", exact)
		}
	})
}

// --- §7 item 34: live decisions ---------------------------------------------

func TestSeed_send_decision_live_delivers_to_remote_waiting_run(t *testing.T) {
	const thread, runID = "thread-remote-decision", "run-remote-decision"
	ctx := context.Background()
	s := liveStore(t)
	liveRemoteRun(t, s, runID, thread, engine.RunWaiting, engine.WaitBackgroundTasks)
	router := &liveRouterStore{Store: s, deliver: func(_ context.Context, _ engine.LiveTarget, cmd engine.LiveCommand) (bool, error) {
		return cmd.Kind == engine.LiveDecision, nil
	}}
	mb := liveMailbox(t, router, newFake(0, complete), engine.Config{})
	resume := json.RawMessage(`{"action":"resume","payload":{"ok":true}}`)

	for i, id := range []string{thread, runID} {
		ok, err := mb.SendDecision(ctx, id, engine.Decision{CallID: "tool-1", Resume: resume})
		if err != nil || !ok {
			t.Fatalf("live decision by %q: %v %v, want delivered", id, ok, err)
		}
		calls := router.recorded()
		if len(calls) != i+1 {
			t.Fatalf("deliveries %+v", calls)
		}
		c := calls[i]
		if c.Target != (engine.LiveTarget{ThreadID: thread, RunID: runID}) || c.Cmd.Kind != engine.LiveDecision ||
			len(c.Cmd.Decisions) != 1 || c.Cmd.Decisions[0].CallID != "tool-1" || string(c.Cmd.Decisions[0].Resume) != string(resume) {
			t.Fatalf("delivery %+v, want decision tool-1 to the waiting run", c)
		}
	}
	// A run that is done is not offered anything.
	liveRemoteRun(t, s, "run-done", "thread-done", engine.RunDone, "")
	if ok, err := mb.SendDecision(ctx, "run-done", engine.Decision{CallID: "tool-1", Resume: resume}); err != nil || ok {
		t.Fatalf("decision to a done run: %v %v, want false", ok, err)
	}
	if n := len(router.recorded()); n != 2 {
		t.Fatalf("a done run was offered a decision (%d deliveries)", n)
	}
}

func TestSeed_live_then_queue_falls_back_to_queue_when_no_remote_subscriber(t *testing.T) {
	t.Run("live routing without a subscriber", func(t *testing.T) {
		var router *liveRouterStore
		liveFallbackCase(t, func(s *badgerstore.Store) engine.Store {
			router = &liveRouterStore{Store: s} // no subscriber for any target
			return router
		}, "thread-no-subscriber", "run-no-listener", "hello?")
		if calls := router.recorded(); len(calls) != 1 || calls[0].Target != (engine.LiveTarget{ThreadID: "thread-no-subscriber", RunID: "run-no-listener"}) {
			t.Fatalf("deliveries %+v, want one offer to the remote run", calls)
		}
	})
	t.Run("store without live routing", func(t *testing.T) {
		liveFallbackCase(t, func(s *badgerstore.Store) engine.Store { return s }, "thread-no-router", "run-no-router", "hello?")
	})
}

// --- §7 item 35: re-attachment (the seed's reconnect_sink) -------------------

func TestSeed_reconnect_sink_returns_false_for_idle_worker(t *testing.T) {
	// Idle: the thread has work queued (no agent slot) but nothing runs
	// here, so there is no live stream to re-attach to.
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(0, complete), engine.Config{})
	res, err := mb.SubmitBackground(context.Background(), liveReq("thread-idle", "hi"))
	if err != nil || res.Status != engine.SubmitQueued {
		t.Fatalf("submit %+v %v", res, err)
	}
	if l := mb.Reattach("thread-idle"); l != nil {
		t.Fatalf("re-attach to an idle thread returned a log (last seq %d)", l.LastSeq())
	}
}

func TestSeed_reconnect_sink_returns_false_for_unknown_thread(t *testing.T) {
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{})
	if l := mb.Reattach("nonexistent"); l != nil {
		t.Fatal("re-attach to an unknown thread returned a log")
	}
}

func TestSeed_reconnect_sink_succeeds_for_running_worker(t *testing.T) {
	const thread = "thread-reconnect"
	started := make(chan struct{})
	next, nextFn := liveRelease(t)
	defer nextFn()
	release, releaseFn := liveRelease(t)
	defer releaseFn()
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		sink.Emit([]byte(`{"type":"text_delta","delta":"one"}`))
		close(started)
		select {
		case <-next:
		case <-ctx.Done():
			return liveCancelled()
		}
		sink.Emit([]byte(`{"type":"text_delta","delta":"two"}`))
		select {
		case <-release:
		case <-ctx.Done():
			return liveCancelled()
		}
		return complete(ctx, req, sink)
	}
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, script), engine.Config{})
	res, err := mb.SubmitBackground(context.Background(), liveReq(thread, "go"))
	if err != nil {
		t.Fatal(err)
	}
	liveRecv(t, started, "the run to start")

	l := mb.Reattach(thread)
	if l == nil {
		t.Fatal("re-attach to a running run returned nil")
	}
	evs, reset, closed, _ := l.Read(0, 10, nil)
	if len(evs) != 1 || evs[0].Seq != 1 || !strings.Contains(string(evs[0].Data), `"one"`) || reset || closed {
		t.Fatalf("first read %+v reset=%v closed=%v", evs, reset, closed)
	}
	evs, _, _, wait := l.Read(1, 10, nil)
	if len(evs) != 0 || wait == nil {
		t.Fatalf("read past the end %+v, want a wait channel", evs)
	}
	nextFn()
	liveRecv(t, wait, "the next event to wake the re-attached reader")
	evs, _, _, _ = l.Read(1, 10, nil)
	if len(evs) != 1 || evs[0].Seq != 2 || !strings.Contains(string(evs[0].Data), `"two"`) {
		t.Fatalf("event after re-attach %+v, want the new event on the re-attached stream", evs)
	}
	releaseFn()
	eventually(t, "run acked", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	all := liveReadAll(t, l)
	if len(all) != 4 || all[3].Type != "run_finish" {
		t.Fatalf("whole stream %+v", all)
	}
}

// liveReadAll drains a closed log from the start.
func liveReadAll(t *testing.T, l *engine.EventLog) []engine.Event {
	t.Helper()
	var out []engine.Event
	after := uint64(0)
	for {
		evs, _, closed, wait := l.Read(after, 100, nil)
		out = append(out, evs...)
		if len(evs) > 0 {
			after = evs[len(evs)-1].Seq
			continue
		}
		if closed {
			return out
		}
		liveRecv(t, wait, "more events")
	}
}

// A re-attached reader resuming after event N gets every event after N
// that is still buffered, and reset=true once N fell out of the buffer.
func TestLive_reattach_resumes_after_last_event_id(t *testing.T) {
	const thread, buffer, emitted = "thread-resume", 4, 10
	emittedAll := make(chan struct{})
	release, releaseFn := liveRelease(t)
	defer releaseFn()
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		for i := 1; i <= emitted; i++ {
			sink.Emit(fmt.Appendf(nil, `{"type":"text_delta","delta":"%d"}`, i))
		}
		close(emittedAll)
		select {
		case <-release:
		case <-ctx.Done():
		}
		return liveCancelled()
	}
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, script), engine.Config{EventBuffer: buffer})
	if _, err := mb.SubmitBackground(context.Background(), liveReq(thread, "go")); err != nil {
		t.Fatal(err)
	}
	liveRecv(t, emittedAll, "the events")
	l := mb.Reattach(thread)
	if l == nil || l.LastSeq() != emitted {
		t.Fatalf("re-attached log %v", l)
	}
	oldest := uint64(emitted - buffer + 1)
	for after := uint64(0); after <= emitted; after++ {
		evs, reset, closed, _ := l.Read(after, 100, nil)
		wantReset := after+1 < oldest
		from := max(after+1, oldest)
		if reset != wantReset || closed {
			t.Fatalf("resume after %d: reset=%v closed=%v, want reset=%v", after, reset, closed, wantReset)
		}
		if want := int(emitted - from + 1); len(evs) != want {
			t.Fatalf("resume after %d: %d events, want %d (from %d)", after, len(evs), want, from)
		}
		for i, e := range evs {
			if e.Seq != from+uint64(i) || !strings.Contains(string(e.Data), fmt.Sprintf(`"%d"`, e.Seq)) {
				t.Fatalf("resume after %d: event %d is %+v", after, i, e)
			}
		}
	}
	releaseFn()
}

// liveClock is an injectable Config.Now: the wall clock plus an offset.
type liveClock struct{ offset atomic.Int64 }

func (c *liveClock) Now() int64              { return time.Now().UnixMilli() + c.offset.Load() }
func (c *liveClock) Advance(d time.Duration) { c.offset.Add(d.Milliseconds()) }

// A finished run stays re-attachable for EventRetention, then is gone.
func TestLive_reattach_finished_run_within_event_retention(t *testing.T) {
	const thread = "thread-retained"
	clock := &liveClock{}
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{Now: clock.Now, EventRetention: time.Minute})
	res, err := mb.SubmitBackground(context.Background(), liveReq(thread, "go"))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "run acked", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	eventually(t, "event log closed", func() bool {
		l := mb.Reattach(thread)
		if l == nil {
			return false
		}
		_, closed := l.ClosedAt()
		return closed
	})
	clock.Advance(59 * time.Second)
	l := mb.Reattach(thread)
	if l == nil {
		t.Fatal("a finished run is not re-attachable within EventRetention")
	}
	if evs := liveReadAll(t, l); len(evs) != 2 || evs[1].Type != "run_finish" {
		t.Fatalf("retained events %+v", evs)
	}
	clock.Advance(2 * time.Second)
	if l := mb.Reattach(thread); l != nil {
		t.Fatal("a finished run is still re-attachable after EventRetention")
	}
}
