package engine_test

// Go counterparts of the seed's recovery, maintenance, lifecycle and
// dispatch-signal tests (engine.md §9–§13).
//
// Adaptations to the Go design:
//   - The store settles a run in the same commit as its terminal dispatch,
//     so "after a crash" tests build the crash state directly: the
//     dispatch becomes terminal while its run record does not exist yet,
//     then the run is written open (created). Recover/Sweep must settle it.
//   - The lifecycle is Mailbox.Start (ready: recovery first),
//     StartBackground (loops at once, recovery in the background) and Stop;
//     there are no handles: "dropping a handle" is cancelling the context
//     given to Start, and a restart is a new Mailbox on the same store.
//   - Go keeps no idle worker objects; the gc_idle_workers tests check what
//     GC collects instead: old terminal dispatches and expired event logs,
//     never queued or claimed dispatches or a running run's events.

import (
	"context"
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

var (
	errLiveInjected = errors.New("injected startup recovery failure")
	errLivePoison   = errors.New("injected wake failure")
	errSigInjected  = errors.New("injected claim failure")
)

// liveAgentScript is an agent that does not know "missing-agent" (a
// permanent failure, like the seed's runtime without that agent) and
// completes every other run.
func liveAgentScript(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	if req.AgentID == "missing-agent" {
		return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "agent 'missing-agent' not found"}
	}
	return complete(ctx, req, sink)
}

func liveMetrics(mb *engine.Mailbox) string {
	var b strings.Builder
	mb.Metrics().WritePrometheus(&b)
	return b.String()
}

// liveRecoverStore counts ReclaimExpired calls (each recovery makes one
// here), fails the first reclaimFailures of them, and, with a gate,
// blocks every call until the gate closes (entered closes at the first).
type liveRecoverStore struct {
	*badgerstore.Store
	reclaimFailures atomic.Int32
	reclaimCalls    atomic.Int32
	gate            chan struct{}
	entered         chan struct{}
}

func (s *liveRecoverStore) ReclaimExpired(ctx context.Context, now int64, limit int) ([]engine.Dispatch, error) {
	if s.reclaimCalls.Add(1) == 1 && s.entered != nil {
		close(s.entered)
	}
	if s.gate != nil {
		select {
		case <-s.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if s.reclaimFailures.Add(-1) >= 0 {
		return nil, fmt.Errorf("reclaim: %w", errLiveInjected)
	}
	return s.Store.ReclaimExpired(ctx, now, limit)
}

// liveCountingStore counts ListTerminal calls and the dispatches they
// return.
type liveCountingStore struct {
	*badgerstore.Store
	calls, items atomic.Int32
}

func (s *liveCountingStore) ListTerminal(ctx context.Context, after engine.TerminalCursor, limit int) ([]engine.Dispatch, error) {
	ds, err := s.Store.ListTerminal(ctx, after, limit)
	s.calls.Add(1)
	s.items.Add(int32(len(ds)))
	return ds, err
}

// livePoisonStore fails every write to one thread while poisoned.
type livePoisonStore struct {
	*badgerstore.Store
	thread   string
	poisoned atomic.Bool
}

func (s *livePoisonStore) fail(thread string) error {
	if s.poisoned.Load() && thread == s.thread {
		return fmt.Errorf("write to %s: %w", thread, errLivePoison)
	}
	return nil
}

func (s *livePoisonStore) Enqueue(ctx context.Context, d engine.Dispatch) (engine.Dispatch, error) {
	if err := s.fail(d.ThreadID); err != nil {
		return engine.Dispatch{}, err
	}
	return s.Store.Enqueue(ctx, d)
}

func (s *livePoisonStore) Checkpoint(ctx context.Context, c engine.Checkpoint) ([]engine.MessageRecord, error) {
	if err := s.fail(c.ThreadID); err != nil {
		return nil, err
	}
	return s.Store.Checkpoint(ctx, c)
}

func (s *livePoisonStore) Submit(ctx context.Context, c engine.Checkpoint, d engine.Dispatch) ([]engine.MessageRecord, engine.Dispatch, error) {
	if err := s.fail(c.ThreadID); err != nil {
		return nil, engine.Dispatch{}, err
	}
	return s.Store.Submit(ctx, c, d)
}

// liveCrashedTerminal builds the state a crash leaves between a terminal
// dispatch and its run: the dispatch of run "run-<thread>" is cancelled,
// superseded or dead-lettered (kind) while the run is open (created).
func liveCrashedTerminal(t *testing.T, mb *engine.Mailbox, s *badgerstore.Store, thread, kind string, now int64) engine.Dispatch {
	t.Helper()
	ctx := context.Background()
	req := engine.SubmitRequest{ThreadID: thread, RunIDHint: "run-" + thread, DispatchIDHint: "dispatch-" + thread, Messages: []engine.Message{userMsg(kind)}}
	d, err := mb.BuildDispatch(&req, now)
	if err != nil {
		t.Fatal(err)
	}
	d.CreatedAt, d.UpdatedAt = now, now
	if _, err := s.Enqueue(ctx, d); err != nil {
		t.Fatal(err)
	}
	want := engine.StatusCancelled
	switch kind {
	case "cancel":
		if c, err := s.Cancel(ctx, d.DispatchID, now); err != nil || c == nil {
			t.Fatalf("cancel: %v %v", c, err)
		}
	case "supersede":
		if _, err := s.Interrupt(ctx, thread, now); err != nil {
			t.Fatal(err)
		}
		want = engine.StatusSuperseded
	case "dead_letter":
		c, err := s.ClaimDispatch(ctx, d.DispatchID, "stale-consumer", 100*time.Millisecond, now)
		if err != nil || c == nil {
			t.Fatalf("claim: %v %v", c, err)
		}
		if err := s.DeadLetter(ctx, d.DispatchID, c.ClaimToken, "crashed after dead_letter", now); err != nil {
			t.Fatal(err)
		}
		want = engine.StatusDeadLetter
	default:
		t.Fatalf("unknown kind %q", kind)
	}
	run := engine.RunRecord{RunID: d.RunID, ThreadID: thread, AgentID: "agent", Status: engine.RunCreated, CreatedAt: now / 1000, UpdatedAt: now / 1000}
	if err := s.CreateRun(ctx, run); err != nil {
		t.Fatal(err)
	}
	if st := dispatchStatus(t, s, d.DispatchID); st != want {
		t.Fatalf("crash state: dispatch is %s, want %s", st, want)
	}
	if r := liveRun(t, s, d.RunID); r.Status != engine.RunCreated || r.DispatchID != "" {
		t.Fatalf("crash state: run %+v, want created without dispatch", r)
	}
	return d
}

// --- §9 reconciliation, §10 recovery and sweep -------------------------------

func TestSeed_recover_reconciles_terminal_cancelled_and_superseded_dispatches_after_crash(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{ConsumerID: "reconcile-consumer"})
	now := time.Now().UnixMilli()
	cancelled := liveCrashedTerminal(t, mb, s, "thread-reconcile-cancel", "cancel", now)
	superseded := liveCrashedTerminal(t, mb, s, "thread-reconcile-supersede", "supersede", now)

	n, err := mb.Recover(ctx)
	if err != nil || n != 0 {
		t.Fatalf("recover: %d %v, want 0 (nothing reclaimed or woken)", n, err)
	}
	for _, d := range []engine.Dispatch{cancelled, superseded} {
		run := liveRun(t, s, d.RunID)
		if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled ||
			run.DispatchID != d.DispatchID || len(run.ErrorPayload) != 0 || run.FinishedAt == 0 {
			t.Fatalf("reconciled run %+v, want done/cancelled for dispatch %s", run, d.DispatchID)
		}
	}
	t.Run("metrics", func(t *testing.T) {
		out := liveMetrics(mb)
		for _, want := range []string{`operation="list_terminal_dispatches"`, `reconcile_terminal_dispatch`, `mark_run_cancelled`, `mark_run_superseded`} {
			if !strings.Contains(out, want) {
				t.Errorf("metrics lack %s (engine.md items 52, 54, 65)", want)
			}
		}
	})
}

func TestSeed_reclaim_dead_letter_marks_run_error(t *testing.T) {
	const thread = "thread-reclaim-dead"
	ctx := context.Background()
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{})
	d := livePrepared(t, mb, liveReq(thread, "expire"))
	d.MaxAttempts, d.AvailableAt = 1, 1000
	if _, err := s.Enqueue(ctx, d); err != nil {
		t.Fatal(err)
	}
	if c, err := s.Claim(ctx, thread, "stale-consumer", 100*time.Millisecond, 1000); err != nil || c == nil {
		t.Fatalf("claim: %v %v", c, err)
	}

	n, err := mb.Recover(ctx)
	if err != nil || n != 1 {
		t.Fatalf("recover: %d %v, want 1 reclaimed", n, err)
	}
	dead, _ := s.LoadDispatch(ctx, d.DispatchID)
	if dead.Status != engine.StatusDeadLetter || dead.LastError == "" {
		t.Fatalf("dispatch after reclaim %+v, want dead letter with a reason", dead)
	}
	run := liveRun(t, s, d.RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermError || run.DispatchID != d.DispatchID {
		t.Fatalf("run %+v, want done with an error termination for %s", run, d.DispatchID)
	}
	if want := `{"message":"` + dead.LastError + `"}`; string(run.ErrorPayload) != want {
		t.Fatalf("error payload %s, want %s", run.ErrorPayload, want)
	}
	t.Run("metrics", func(t *testing.T) {
		out := liveMetrics(mb)
		for _, want := range []string{`operation="reclaim",result="ok"`, `reclaim_dispatch`} {
			if !strings.Contains(out, want) {
				t.Errorf("metrics lack %s (engine.md items 55, 65)", want)
			}
		}
	})
}

func TestSeed_sweep_reconciles_dead_letter_dispatch_after_crash(t *testing.T) {
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{ConsumerID: "sweep-reconcile-consumer"})
	d := liveCrashedTerminal(t, mb, s, "thread-sweep-reconcile-dead", "dead_letter", time.Now().UnixMilli())

	mb.Sweep(context.Background())

	run := liveRun(t, s, d.RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermError ||
		string(run.TerminationReason.Value) != `"crashed after dead_letter"` || run.DispatchID != d.DispatchID {
		t.Fatalf("run after sweep %+v, want done with error(crashed after dead_letter)", run)
	}
	if string(run.ErrorPayload) != `{"message":"crashed after dead_letter"}` {
		t.Fatalf("error payload %s", run.ErrorPayload)
	}
	t.Run("metrics", func(t *testing.T) {
		if out := liveMetrics(mb); !strings.Contains(out, `mark_run_dead_letter`) {
			t.Errorf("metrics lack mark_run_dead_letter (engine.md items 53, 65)")
		}
	})
}

func TestSeed_recover_only_enqueues_orphaned_background_task_waiting_runs(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	liveRemoteRun(t, s, "run-bg", "thread-bg-recover", engine.RunWaiting, engine.WaitBackgroundTasks)
	liveRemoteRun(t, s, "run-user", "thread-user-recover", engine.RunWaiting, engine.WaitUserInput)
	liveRemoteRun(t, s, "run-bg-busy", "thread-bg-busy", engine.RunWaiting, engine.WaitBackgroundTasks)
	exec := newFake(1, complete)
	mb := liveMailbox(t, s, exec, engine.Config{})
	// thread-bg-busy already has queued work: its waiting run is not orphaned.
	busy := livePrepared(t, mb, engine.SubmitRequest{ThreadID: "thread-bg-busy", RunIDHint: "run-busy-next", Messages: []engine.Message{userMsg("queued")}})
	if _, err := s.Enqueue(ctx, busy); err != nil {
		t.Fatal(err)
	}

	n, err := mb.Recover(ctx)
	if err != nil || n != 1 {
		t.Fatalf("recover: %d %v, want exactly 1 wake", n, err)
	}
	eventually(t, "the wake to run", func() bool {
		return slices.ContainsFunc(liveRunsOf(exec), func(r engine.RunRequest) bool { return r.ThreadID == "thread-bg-recover" })
	})
	var wakes []engine.RunRequest
	for _, r := range liveRunsOf(exec) {
		if r.ThreadID == "thread-bg-recover" || r.ContinueRunID == "run-bg-busy" || r.ContinueRunID == "run-user" {
			wakes = append(wakes, r)
		}
	}
	if len(wakes) != 1 {
		t.Fatalf("wakes %+v, want one", wakes)
	}
	w := wakes[0]
	if w.ContinueRunID != "run-bg" || w.RunMode != engine.ModeInternalWake || w.Origin != engine.OriginInternal || w.AgentID != "agent" ||
		len(w.Messages) != 1 || liveText(w.Messages[0]) != "<background-tasks-updated />" || w.Messages[0].Visibility != "internal" {
		t.Fatalf("wake request %+v", w)
	}
	if run := liveRun(t, s, "run-bg"); run.Request == nil {
		t.Fatal("woken run has no request snapshot")
	} else if x, err := engine.ParseRequestExtras(run.Request.RequestExtras); err != nil || x.Adapter != engine.AdapterInternal || x.RunMode != engine.ModeInternalWake {
		t.Fatalf("wake extras %+v %v, want adapter internal, mode internal_wake", x, err)
	}
	if ds := liveDispatches(t, s, "thread-user-recover", nil); len(ds) != 0 {
		t.Fatalf("a user-input waiting run was woken: %+v", ds)
	}
	if run := liveRun(t, s, "run-user"); run.Status != engine.RunWaiting {
		t.Fatalf("user-input run is %s, want still waiting", run.Status)
	}
	if ds := liveDispatches(t, s, "thread-bg-busy", nil); len(ds) != 1 || ds[0].DispatchID != busy.DispatchID {
		t.Fatalf("a thread with queued work got a wake: %+v", ds)
	}
}

// lessons.md B8: recovery pages through every waiting background-task run.
func TestLive_recover_pages_through_all_background_waiting_runs(t *testing.T) {
	const n = engine.MaxRunPage + 30
	ctx := context.Background()
	s := liveStore(t)
	for i := range n {
		liveRemoteRun(t, s, fmt.Sprintf("run-bg-%03d", i), fmt.Sprintf("thread-bg-%03d", i), engine.RunWaiting, engine.WaitBackgroundTasks)
	}
	mb := liveMailbox(t, s, newFake(0, complete), engine.Config{})
	got, err := mb.Recover(ctx)
	if err != nil || got != n {
		t.Fatalf("recover: %d %v, want %d wakes", got, err, n)
	}
	for i := range n {
		thread, run := fmt.Sprintf("thread-bg-%03d", i), fmt.Sprintf("run-bg-%03d", i)
		ds := liveDispatches(t, s, thread, nil)
		if len(ds) != 1 || ds[0].RunID != run || ds[0].Status != engine.StatusQueued {
			t.Fatalf("%s: dispatches %+v, want one queued wake of %s", thread, ds, run)
		}
	}
	// A second recovery finds every thread busy: no duplicate wakes.
	if got, err := mb.Recover(ctx); err != nil || got != 0 {
		t.Fatalf("second recover: %d %v, want 0", got, err)
	}
}

// lessons.md B8: a failed wake fails recovery (and so a ready start).
func TestLive_recover_propagates_wake_submit_failure(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	ps := &livePoisonStore{Store: s, thread: "thread-bg-poison"}
	ps.poisoned.Store(true)
	liveRemoteRun(t, s, "run-bg-ok", "thread-bg-ok", engine.RunWaiting, engine.WaitBackgroundTasks)
	liveRemoteRun(t, s, "run-bg-poison", "thread-bg-poison", engine.RunWaiting, engine.WaitBackgroundTasks)
	mb := liveMailbox(t, ps, newFake(0, complete), engine.Config{StartupRecoveryAttempts: 2, StartupRetryDelay: time.Millisecond})

	if _, err := mb.Recover(ctx); !errors.Is(err, errLivePoison) {
		t.Fatalf("recover error %v, want the wake failure", err)
	}
	if err := mb.Start(ctx); !errors.Is(err, errLivePoison) {
		t.Fatalf("ready start error %v, want the wake failure", err)
	}
	if mb.Running() {
		t.Fatal("a start whose recovery failed is running")
	}
	ps.poisoned.Store(false)
	if err := mb.Start(ctx); err != nil {
		t.Fatalf("start after the store healed: %v", err)
	}
	for thread, run := range map[string]string{"thread-bg-ok": "run-bg-ok", "thread-bg-poison": "run-bg-poison"} {
		ds := liveDispatches(t, s, thread, nil)
		if len(ds) != 1 || ds[0].RunID != run {
			t.Fatalf("%s: dispatches %+v, want exactly one wake of %s", thread, ds, run)
		}
	}
}

// Reconciliation keeps a high-water mark: terminal dispatches already
// reconciled are not listed again.
func TestLive_reconcile_high_water_mark_does_not_rescan(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	cs := &liveCountingStore{Store: s}
	mb := liveMailbox(t, cs, newFake(0, complete), engine.Config{})
	// Old terminal dispatches lie far before the pass's overlap window
	// (engine reconcileOverlap, one minute); the crashed ones minutes apart.
	now := time.Now().UnixMilli()
	base := now - 10*60_000
	const old = 150
	for i := range old {
		d := engine.Dispatch{DispatchID: fmt.Sprintf("d-old-%03d", i), ThreadID: fmt.Sprintf("t-old-%03d", i), RunID: fmt.Sprintf("r-old-%03d", i),
			Status: engine.StatusQueued, AvailableAt: base, MaxAttempts: 5, CreatedAt: base, UpdatedAt: base}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
		if c, err := s.Cancel(ctx, d.DispatchID, base+int64(i)); err != nil || c == nil {
			t.Fatalf("cancel: %v %v", c, err)
		}
	}
	first := liveCrashedTerminal(t, mb, s, "thread-hwm-1", "cancel", now-5*60_000)

	if _, err := mb.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if items := cs.items.Load(); items != old+1 {
		t.Fatalf("first reconciliation listed %d terminal dispatches, want %d", items, old+1)
	}
	if run := liveRun(t, s, first.RunID); run.Status != engine.RunDone {
		t.Fatalf("crashed run not settled: %+v", run)
	}
	calls := cs.calls.Load()
	mb.Sweep(ctx)
	// Only the overlap window (the newest dispatch seen) is listed again.
	if items := cs.items.Load(); items != old+2 || cs.calls.Load() <= calls {
		t.Fatalf("sweep listed %d terminal dispatches in total (calls %d→%d), want %d: no rescan of the %d old ones", items, calls, cs.calls.Load(), old+2, old)
	}
	second := liveCrashedTerminal(t, mb, s, "thread-hwm-2", "supersede", now-60_000)
	mb.Sweep(ctx)
	if items := cs.items.Load(); items != old+4 {
		t.Fatalf("sweep after one new terminal dispatch listed %d in total, want %d (the overlap and the new one)", items, old+4)
	}
	if run := liveRun(t, s, second.RunID); run.Status != engine.RunDone {
		t.Fatalf("new crashed run not settled: %+v", run)
	}
}

// Recover, Sweep and GC are public: calling them while the mailbox runs
// its own maintenance must be safe (run with -race).
func TestLive_public_maintenance_is_safe_while_running(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{SweepInterval: time.Millisecond, GCInterval: time.Millisecond})
	var crashed []engine.Dispatch
	for i := range 3 {
		crashed = append(crashed, liveCrashedTerminal(t, mb, s, fmt.Sprintf("thread-public-%d", i), "dead_letter", time.Now().UnixMilli()))
	}
	if err := mb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 5 {
				// Finished runs keep adding terminal dispatches to reconcile.
				if _, err := mb.SubmitBackground(ctx, liveReq(fmt.Sprintf("thread-public-work-%d-%d", g, i), "x")); err != nil {
					t.Errorf("submit: %v", err)
				}
				mb.Sweep(ctx)
				if _, err := mb.Recover(ctx); err != nil {
					t.Errorf("recover: %v", err)
				}
				mb.GC(ctx)
			}
		})
	}
	wg.Wait()
	for _, d := range crashed {
		if run := liveRun(t, s, d.RunID); run.Status != engine.RunDone {
			t.Fatalf("run %s not settled: %+v", d.RunID, run)
		}
	}
}

// --- §11 lifecycle -------------------------------------------------------------

// liveQueuedMissingAgent enqueues a prepared run for an agent the fake
// does not know; with expired set it is left claimed by a dead consumer
// whose lease lapsed.
func liveQueuedMissingAgent(t *testing.T, mb *engine.Mailbox, s *badgerstore.Store, thread string, expired bool) engine.Dispatch {
	t.Helper()
	ctx := context.Background()
	d := livePrepared(t, mb, engine.SubmitRequest{ThreadID: thread, AgentID: "missing-agent", Messages: []engine.Message{userMsg("recover")}})
	past := time.Now().UnixMilli() - 5000
	if expired {
		d.AvailableAt = past
	}
	if _, err := s.Enqueue(ctx, d); err != nil {
		t.Fatal(err)
	}
	if expired {
		c, err := s.Claim(ctx, thread, "dead-consumer", time.Millisecond, past)
		if err != nil || c == nil || c.Status != engine.StatusClaimed || c.LeaseUntil != past+1 {
			t.Fatalf("claim before the simulated crash: %+v %v", c, err)
		}
	}
	return d
}

func TestSeed_start_lifecycle_ready_fails_when_startup_recovery_fails(t *testing.T) {
	s := liveStore(t)
	rs := &liveRecoverStore{Store: s}
	rs.reclaimFailures.Store(1)
	mb := liveMailbox(t, rs, newFake(1, liveAgentScript), engine.Config{StartupRecoveryAttempts: 1, StartupRetryDelay: time.Millisecond})
	err := mb.Start(context.Background())
	if err == nil || !errors.Is(err, errLiveInjected) || !strings.Contains(err.Error(), "injected startup recovery failure") {
		t.Fatalf("ready start error %v, want the recovery failure", err)
	}
	if mb.Running() {
		t.Fatal("the lifecycle is running after a failed ready start")
	}
	if n := rs.reclaimCalls.Load(); n != 1 {
		t.Fatalf("recovery tried %d times, want 1", n)
	}
}

func TestSeed_start_lifecycle_ready_retries_startup_recovery_until_ready(t *testing.T) {
	s := liveStore(t)
	rs := &liveRecoverStore{Store: s}
	rs.reclaimFailures.Store(1)
	mb := liveMailbox(t, rs, newFake(1, liveAgentScript), engine.Config{StartupRecoveryAttempts: 2, StartupRetryDelay: time.Millisecond})
	d := liveQueuedMissingAgent(t, mb, s, "thread-retry-recover", false)

	if err := mb.Start(context.Background()); err != nil {
		t.Fatalf("ready start should retry recovery: %v", err)
	}
	if !mb.Running() || rs.reclaimCalls.Load() != 2 {
		t.Fatalf("running=%v after %d recoveries, want running after 2", mb.Running(), rs.reclaimCalls.Load())
	}
	eventually(t, "the queued dispatch to run", func() bool { return dispatchStatus(t, s, d.DispatchID) == engine.StatusDeadLetter })
	if err := mb.Stop(context.Background()); err != nil || mb.Running() {
		t.Fatalf("stop: %v running=%v", err, mb.Running())
	}
}

func TestSeed_start_lifecycle_ready_serializes_concurrent_recovery(t *testing.T) {
	s := liveStore(t)
	rs := &liveRecoverStore{Store: s}
	mb := liveMailbox(t, rs, newFake(1, complete), engine.Config{})
	errs := make(chan error, 32)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() { errs <- mb.Start(context.Background()) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent ready start: %v", err)
		}
	}
	if n := rs.reclaimCalls.Load(); n != 1 {
		t.Fatalf("concurrent ready starts ran recovery %d times, want once", n)
	}
	if !mb.Running() {
		t.Fatal("not running")
	}
	if err := mb.Stop(context.Background()); err != nil || mb.Running() {
		t.Fatalf("stop: %v running=%v", err, mb.Running())
	}
}

func TestSeed_start_lifecycle_does_not_bypass_ready_transition(t *testing.T) {
	// Go: a background start during a ready start waits for it (instead of
	// failing with "transition already running") and never recovers again.
	ctx := context.Background()
	s := liveStore(t)
	rs := &liveRecoverStore{Store: s, gate: make(chan struct{}), entered: make(chan struct{})}
	openGate := sync.OnceFunc(func() { close(rs.gate) })
	defer openGate()
	mb := liveMailbox(t, rs, newFake(1, complete), engine.Config{})

	ready := make(chan error, 1)
	go func() { ready <- mb.Start(ctx) }()
	liveRecv(t, rs.entered, "the ready start to be recovering")
	background := make(chan error, 1)
	go func() { background <- mb.StartBackground(ctx) }()
	select {
	case err := <-background:
		t.Fatalf("background start returned (%v) while the ready start was still recovering", err)
	case <-time.After(50 * time.Millisecond): // absence check, not synchronisation
	}
	if mb.Running() {
		t.Fatal("running before startup recovery finished")
	}
	openGate()
	if err := liveRecv(t, ready, "the ready start"); err != nil {
		t.Fatalf("ready start: %v", err)
	}
	if err := liveRecv(t, background, "the background start"); err != nil {
		t.Fatalf("background start: %v", err)
	}
	if !mb.Running() {
		t.Fatal("not running")
	}
	if err := mb.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if n := rs.reclaimCalls.Load(); n != 1 {
		t.Fatalf("recovery ran %d times, want once (no duplicate from the background start)", n)
	}
}

func TestSeed_start_lifecycle_is_idempotent_and_drop_does_not_abort_recovery(t *testing.T) {
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, liveAgentScript), engine.Config{StartupDelay: 10 * time.Millisecond})
	// Only recovery can free this dispatch: its lapsed lease blocks the
	// thread until it is reclaimed (the sweep is 30s away).
	d := liveQueuedMissingAgent(t, mb, s, "thread-drop-recover", true)

	startCtx, drop := context.WithCancel(context.Background())
	if err := mb.StartBackground(startCtx); err != nil {
		t.Fatal(err)
	}
	if err := mb.StartBackground(context.Background()); err != nil {
		t.Fatalf("duplicate start should be a no-op: %v", err)
	}
	if !mb.Running() {
		t.Fatal("not running")
	}
	drop() // the starter goes away before the delayed recovery ran

	eventually(t, "background recovery to reclaim and run the dispatch", func() bool {
		return dispatchStatus(t, s, d.DispatchID) == engine.StatusDeadLetter
	})
	if got, _ := s.LoadDispatch(context.Background(), d.DispatchID); got.AttemptCount != 1 {
		t.Fatalf("dispatch %+v, want exactly one attempt spent by the reclaim", got)
	}
	if err := mb.StartBackground(context.Background()); err != nil || !mb.Running() {
		t.Fatalf("start on a running mailbox: %v running=%v", err, mb.Running())
	}
	if err := mb.Stop(context.Background()); err != nil || mb.Running() {
		t.Fatalf("stop: %v running=%v", err, mb.Running())
	}
}

func TestSeed_start_lifecycle_explicit_abort_allows_restart(t *testing.T) {
	// Go: Start after Stop is an error; a restart is a new Mailbox on the
	// same store.
	ctx := context.Background()
	s := liveStore(t)
	first := liveMailbox(t, s, newFake(1, complete), engine.Config{})
	if err := first.Start(ctx); err != nil || !first.Running() {
		t.Fatalf("first start: %v running=%v", err, first.Running())
	}
	if err := first.Stop(ctx); err != nil || first.Running() {
		t.Fatalf("first stop: %v running=%v", err, first.Running())
	}
	if err := first.Start(ctx); !errors.Is(err, engine.ErrShuttingDown) {
		t.Fatalf("start after stop: %v, want ErrShuttingDown", err)
	}
	if _, err := first.SubmitBackground(ctx, liveReq("thread-restart", "x")); !errors.Is(err, engine.ErrShuttingDown) {
		t.Fatalf("submit after stop: %v, want ErrShuttingDown", err)
	}

	second := liveMailbox(t, s, newFake(1, complete), engine.Config{})
	if err := second.Start(ctx); err != nil || !second.Running() {
		t.Fatalf("restart on the same store: %v running=%v", err, second.Running())
	}
	res, err := second.SubmitBackground(ctx, liveReq("thread-restart", "y"))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the restarted mailbox runs work", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	if err := second.Stop(ctx); err != nil || second.Running() {
		t.Fatalf("second stop: %v running=%v", err, second.Running())
	}
}

func TestSeed_maintenance_callback_runs_on_gc_tick(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	var calls atomic.Int32
	var purgedFirst atomic.Int32 // 1: the first callback saw the GC's purge, 2: it did not
	var oldID atomic.Value
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{
		GCInterval: 10 * time.Millisecond, SweepInterval: time.Minute, GCTTL: time.Millisecond,
		MaintenanceCallback: func() {
			if calls.Add(1) == 1 {
				d, err := s.LoadDispatch(context.Background(), oldID.Load().(string))
				if err == nil && d == nil {
					purgedFirst.Store(1)
				} else {
					purgedFirst.Store(2)
				}
			}
		},
	})
	res, err := mb.SubmitBackground(ctx, liveReq("thread-gc-tick", "x"))
	if err != nil {
		t.Fatal(err)
	}
	oldID.Store(res.DispatchID)
	eventually(t, "acked", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	if err := mb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// Wait for the callback's verdict, not just for it to begin.
	eventually(t, "the maintenance callback", func() bool { return purgedFirst.Load() != 0 })
	if purgedFirst.Load() != 1 {
		t.Fatal("the maintenance callback ran before the GC pass it follows")
	}
	if err := mb.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestSeed_start_lifecycle_handle_drop_keeps_lifecycle_running(t *testing.T) {
	var calls atomic.Int32
	s := liveStore(t)
	exec := newFake(0, complete)
	mb := liveMailbox(t, s, exec, engine.Config{GCInterval: 5 * time.Millisecond, SweepInterval: time.Minute,
		MaintenanceCallback: func() { calls.Add(1) }})
	startCtx, drop := context.WithCancel(context.Background())
	if err := mb.Start(startCtx); err != nil {
		t.Fatal(err)
	}
	drop()
	if !mb.Running() {
		t.Fatal("cancelling the start context stopped the lifecycle")
	}
	after := calls.Load()
	eventually(t, "maintenance to keep ticking", func() bool { return calls.Load() >= after+2 })
	res, err := mb.SubmitBackground(context.Background(), liveReq("thread-after-drop", "x"))
	if err != nil || res.Status != engine.SubmitQueued {
		t.Fatalf("submit without an agent: %+v %v", res, err)
	}
	exec.setCapacity(1) // only the running dispatcher can pick it up now
	eventually(t, "the dispatcher to keep running", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	if err := mb.StartBackground(context.Background()); err != nil || !mb.Running() {
		t.Fatalf("start again: %v running=%v", err, mb.Running())
	}
}

func TestSeed_lifecycle_shutdown_waits_for_maintenance_to_quiesce(t *testing.T) {
	var calls atomic.Int32
	var stopped, lateCall atomic.Bool
	inCallback := make(chan struct{})
	blockCallback := make(chan struct{})
	unblock := sync.OnceFunc(func() { close(blockCallback) })
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{GCInterval: 10 * time.Millisecond, SweepInterval: time.Minute,
		MaintenanceCallback: func() {
			if stopped.Load() {
				lateCall.Store(true)
			}
			if calls.Add(1) == 2 {
				close(inCallback)
				<-blockCallback
			}
		}})
	defer unblock()
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	liveRecv(t, inCallback, "the second maintenance callback")

	stopErr := make(chan error, 1)
	go func() {
		err := mb.Stop(context.Background())
		stopped.Store(true)
		stopErr <- err
	}()
	select {
	case err := <-stopErr:
		t.Fatalf("Stop returned (%v) while a maintenance callback was still running", err)
	case <-time.After(50 * time.Millisecond): // absence check, not synchronisation
	}
	eventually(t, "Stop to refuse new work at once", func() bool { return !mb.Running() })
	unblock()
	if err := liveRecv(t, stopErr, "Stop to return"); err != nil {
		t.Fatal(err)
	}
	n := calls.Load()
	deadline := time.Now().Add(5 * 10 * time.Millisecond) // five GC intervals
	for time.Now().Before(deadline) {
		if calls.Load() != n || lateCall.Load() {
			t.Fatalf("a maintenance callback ran after Stop returned (%d → %d)", n, calls.Load())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestSeed_concurrent_start_lifecycle_is_idempotent(t *testing.T) {
	s := liveStore(t)
	rs := &liveRecoverStore{Store: s}
	mb := liveMailbox(t, rs, newFake(1, complete), engine.Config{})
	errs := make(chan error, 32)
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			if i%2 == 0 {
				errs <- mb.StartBackground(context.Background())
			} else {
				errs <- mb.Start(context.Background())
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("idempotent start failed: %v", err)
		}
	}
	if !mb.Running() {
		t.Fatal("not running")
	}
	eventually(t, "startup recovery", func() bool { return rs.reclaimCalls.Load() >= 1 })
	if err := mb.Stop(context.Background()); err != nil || mb.Running() {
		t.Fatalf("stop: %v running=%v", err, mb.Running())
	}
	if n := rs.reclaimCalls.Load(); n != 1 {
		t.Fatalf("32 concurrent starts recovered %d times, want once", n)
	}
}

func TestSeed_start_lifecycle_runs_startup_recovery_for_existing_queued_dispatches(t *testing.T) {
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, liveAgentScript), engine.Config{})
	d := liveQueuedMissingAgent(t, mb, s, "thread-recover", false)
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the queued dispatch to run", func() bool { return dispatchStatus(t, s, d.DispatchID) == engine.StatusDeadLetter })
	got, _ := s.LoadDispatch(context.Background(), d.DispatchID)
	if !strings.Contains(got.LastError, "missing-agent") {
		t.Fatalf("dead letter %+v should keep the runtime failure", got)
	}
}

func TestSeed_start_lifecycle_reclaims_expired_claimed_dispatches_and_executes_them(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, liveAgentScript), engine.Config{})
	d := liveQueuedMissingAgent(t, mb, s, "thread-stale", true)
	if err := mb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if cur, _ := s.LoadDispatch(ctx, d.DispatchID); cur.Status == engine.StatusClaimed && cur.ClaimedBy == "dead-consumer" {
		t.Fatal("Start returned before recovery reclaimed the lapsed lease")
	}
	eventually(t, "the reclaimed dispatch to run", func() bool {
		cur, _ := s.LoadDispatch(ctx, d.DispatchID)
		return cur.Status == engine.StatusDeadLetter && cur.RunStatus == engine.RunDone
	})
	got, _ := s.LoadDispatch(ctx, d.DispatchID)
	if got.AttemptCount != 1 || got.RunID == got.DispatchID || got.InstanceID == "" {
		t.Fatalf("recovered dispatch %+v", got)
	}
	if got.Termination == nil || got.Termination.Type != engine.TermError || !strings.Contains(string(got.Termination.Value), "missing-agent") ||
		!strings.Contains(got.RunError, "missing-agent") {
		t.Fatalf("recovered dispatch projection %+v, want the runtime error", got)
	}
	if run := liveRun(t, s, d.RunID); run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermError {
		t.Fatalf("run %+v", run)
	}
}

// --- §13 dispatch signal loop --------------------------------------------------

// sigSignal is one "thread has dispatch" hint in sigStore's queue.
type sigSignal struct {
	thread, dispatch string
	deliveries       int
	visibleAt        time.Time
}

// sigStore is a work-queue store: every enqueue publishes a signal; a
// nacked signal is redelivered after its delay. claimFailures makes the
// next Claim calls fail. signalOnly hides ready threads from the polling
// dispatcher so every claim in the test is signal-driven.
type sigStore struct {
	*badgerstore.Store
	signalOnly    bool
	claimFailures atomic.Int32
	claimErr      error // what the failing claims return (default errSigInjected)

	mu     sync.Mutex
	queue  []*sigSignal
	delays []time.Duration // nack delays, in order
	wake   chan struct{}

	acks, nacks, doubles atomic.Int32
}

func newSigStore(t *testing.T, signalOnly bool) *sigStore {
	return &sigStore{Store: liveStore(t), signalOnly: signalOnly, wake: make(chan struct{}, 1)}
}

func (s *sigStore) push(sg *sigSignal) {
	s.mu.Lock()
	s.queue = append(s.queue, sg)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *sigStore) Enqueue(ctx context.Context, d engine.Dispatch) (engine.Dispatch, error) {
	out, err := s.Store.Enqueue(ctx, d)
	if err == nil {
		s.push(&sigSignal{thread: out.ThreadID, dispatch: out.DispatchID})
	}
	return out, err
}

func (s *sigStore) Submit(ctx context.Context, c engine.Checkpoint, d engine.Dispatch) ([]engine.MessageRecord, engine.Dispatch, error) {
	recs, out, err := s.Store.Submit(ctx, c, d)
	if err == nil {
		s.push(&sigSignal{thread: out.ThreadID, dispatch: out.DispatchID})
	}
	return recs, out, err
}

func (s *sigStore) Claim(ctx context.Context, thread, consumer string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	if s.claimFailures.Add(-1) >= 0 {
		return nil, fmt.Errorf("claim %s: %w", thread, errSigInjected)
	}
	return s.Store.Claim(ctx, thread, consumer, lease, now)
}

// ClaimStart fails as Claim does (the engine claims with it on this store).
func (s *sigStore) ClaimStart(ctx context.Context, thread, consumer string, lease time.Duration, instance string, now int64) (*engine.Dispatch, error) {
	if s.claimFailures.Add(-1) >= 0 {
		err := s.claimErr
		if err == nil {
			err = errSigInjected
		}
		return nil, fmt.Errorf("claim %s: %w", thread, err)
	}
	return s.Store.ClaimStart(ctx, thread, consumer, lease, instance, now)
}

func (s *sigStore) ReadyThreads(ctx context.Context, now int64, after engine.ReadyEntry, limit int) ([]engine.ReadyEntry, int64, error) {
	if s.signalOnly {
		return nil, 0, nil
	}
	return s.Store.ReadyThreads(ctx, now, after, limit)
}

func (s *sigStore) PullDispatchSignals(ctx context.Context, limit int, wait time.Duration) ([]engine.DispatchSignal, error) {
	deadline := time.Now().Add(wait)
	for {
		now := time.Now()
		next := deadline
		var out []engine.DispatchSignal
		s.mu.Lock()
		rest := make([]*sigSignal, 0, len(s.queue))
		for _, sg := range s.queue {
			if len(out) < limit && !sg.visibleAt.After(now) {
				sg.deliveries++
				out = append(out, engine.DispatchSignal{ThreadID: sg.thread, DispatchID: sg.dispatch, Receipt: &sigReceipt{s: s, sig: sg, n: sg.deliveries}})
				continue
			}
			rest = append(rest, sg)
			if sg.visibleAt.Before(next) {
				next = sg.visibleAt
			}
		}
		s.queue = rest
		s.mu.Unlock()
		if len(out) > 0 {
			return out, nil
		}
		if !now.Before(deadline) {
			return nil, nil
		}
		timer := time.NewTimer(max(time.Until(next), 0))
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		case <-s.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

func (s *sigStore) nackDelays() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.delays)
}

// sigReceipt settles one delivery of a signal.
type sigReceipt struct {
	s    *sigStore
	sig  *sigSignal
	n    int
	done atomic.Bool
}

func (r *sigReceipt) Deliveries() (int, bool) { return r.n, true }

func (r *sigReceipt) Ack() error {
	if r.done.Swap(true) {
		r.s.doubles.Add(1)
		return errors.New("signal settled twice")
	}
	r.s.acks.Add(1)
	return nil
}

func (r *sigReceipt) Nack(delay time.Duration) error {
	if r.done.Swap(true) {
		r.s.doubles.Add(1)
		return errors.New("signal settled twice")
	}
	r.s.nacks.Add(1)
	r.s.mu.Lock()
	r.s.delays = append(r.s.delays, delay)
	r.sig.visibleAt = time.Now().Add(delay)
	r.s.mu.Unlock()
	r.s.push(r.sig)
	return nil
}

func sigConfig() engine.Config {
	return engine.Config{ConsumerID: "signal-consumer", SignalWait: 20 * time.Millisecond, SignalNackBase: 5 * time.Millisecond, SignalNackMax: 40 * time.Millisecond}
}

func sigEnqueue(t *testing.T, mb *engine.Mailbox, ss *sigStore, thread, text string) engine.Dispatch {
	t.Helper()
	d := livePrepared(t, mb, liveReq(thread, text))
	if _, err := ss.Enqueue(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestSeed_dispatch_signal_loop_claims_and_executes_queued_dispatch(t *testing.T) {
	ss := newSigStore(t, true)
	mb := liveMailbox(t, ss, newFake(1, complete), sigConfig())
	d := sigEnqueue(t, mb, ss, "thread-signal-loop", "wake")
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the signalled dispatch to run", func() bool { return dispatchStatus(t, ss.Store, d.DispatchID) == engine.StatusAcked })
	eventually(t, "the signal ack", func() bool { return ss.acks.Load() == 1 })
	if ss.nacks.Load() != 0 || ss.doubles.Load() != 0 {
		t.Fatalf("nacks %d, double settlements %d", ss.nacks.Load(), ss.doubles.Load())
	}
	out := liveMetrics(mb)
	for _, want := range []string{"mailbox_dispatch_signal_pulled_total 1", "mailbox_dispatch_signal_ack_total 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestSeed_dispatch_signal_loop_nacks_and_redelivers_after_claim_error(t *testing.T) {
	ss := newSigStore(t, true)
	ss.claimFailures.Store(1)
	mb := liveMailbox(t, ss, newFake(1, complete), sigConfig())
	d := sigEnqueue(t, mb, ss, "thread-signal-redeliver", "wake")
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the redelivered signal to run the dispatch", func() bool { return dispatchStatus(t, ss.Store, d.DispatchID) == engine.StatusAcked })
	eventually(t, "the signal ack", func() bool { return ss.acks.Load() == 1 })
	if n := ss.nacks.Load(); n != 1 {
		t.Fatalf("nacks %d, want 1", n)
	}
	if delays := ss.nackDelays(); !slices.Equal(delays, []time.Duration{0}) {
		t.Fatalf("nack delays %v, want one immediate nack", delays)
	}
	out := liveMetrics(mb)
	for _, want := range []string{`mailbox_dispatch_signal_nack_total{delayed="false"} 1`, "mailbox_dispatch_signal_redelivery_total 1", "mailbox_dispatch_signal_ack_total 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestSeed_dispatch_signal_loop_nacks_when_signal_is_blocked_by_active_claim(t *testing.T) {
	const thread = "thread-signal-blocked"
	ctx := context.Background()
	ss := newSigStore(t, true)
	cfg := sigConfig()
	cfg.SignalHandlers = 1
	mb := liveMailbox(t, ss, newFake(1, complete), cfg)
	active := sigEnqueue(t, mb, ss, thread, "active")
	claimed, err := ss.Store.Claim(ctx, thread, "remote-owner", 30*time.Second, time.Now().UnixMilli())
	if err != nil || claimed == nil || claimed.DispatchID != active.DispatchID {
		t.Fatalf("claim active: %+v %v", claimed, err)
	}
	queued := sigEnqueue(t, mb, ss, thread, "queued")
	if err := mb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the blocked signal to be nacked", func() bool { return ss.nacks.Load() >= 2 })
	if st := dispatchStatus(t, ss.Store, queued.DispatchID); st != engine.StatusQueued {
		t.Fatalf("blocked dispatch is %s before the active claim is released", st)
	}
	if err := ss.Store.Ack(ctx, active.DispatchID, claimed.ClaimToken, time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the redelivered signal to claim after the release", func() bool {
		return dispatchStatus(t, ss.Store, queued.DispatchID) == engine.StatusAcked
	})
	delays := ss.nackDelays()
	for i, d := range delays {
		if want := engine.SignalNackDelay(i+1, cfg.SignalNackBase, cfg.SignalNackMax); d != want {
			t.Fatalf("nack %d delayed %s, want %s (backoff by delivery count): %v", i+1, d, want, delays)
		}
	}
	if ss.doubles.Load() != 0 {
		t.Fatal("a signal was settled twice")
	}
	if out := liveMetrics(mb); !strings.Contains(out, `mailbox_dispatch_signal_nack_total{delayed="true"}`) || strings.Contains(out, `mailbox_dispatch_signal_nack_total{delayed="false"}`) {
		t.Errorf("blocked nacks must be delayed:\n%s", out)
	}
}

func TestSeed_dispatch_signal_busy_ack_still_runs_queued_dispatch_after_current_finishes(t *testing.T) {
	const thread = "thread-signal-busy"
	started := make(chan string, 4)
	var ordinal atomic.Int32
	ss := newSigStore(t, false)
	release, releaseFn := liveRelease(t)
	defer releaseFn()
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		n := ordinal.Add(1)
		started <- req.DispatchID
		if n == 1 {
			select {
			case <-release:
			case <-ctx.Done():
				return liveCancelled()
			}
		}
		return complete(ctx, req, sink)
	}
	mb := liveMailbox(t, ss, newFake(2, script), sigConfig())
	first := sigEnqueue(t, mb, ss, thread, "first")
	second := sigEnqueue(t, mb, ss, thread, "second")
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	blocked := liveRecv(t, started, "the first dispatch to start")
	queued := second.DispatchID
	if blocked == second.DispatchID {
		queued = first.DispatchID
	} else if blocked != first.DispatchID {
		t.Fatalf("started %s, want one of the two queued dispatches", blocked)
	}
	eventually(t, "both signals acked (claimed, busy)", func() bool { return ss.acks.Load() == 2 })
	if n := ss.nacks.Load(); n != 0 {
		t.Fatalf("nacks %d, want 0: a busy thread acks", n)
	}
	if st := dispatchStatus(t, ss.Store, queued); st != engine.StatusQueued {
		t.Fatalf("the other dispatch is %s before the first finished, want queued", st)
	}
	releaseFn()
	if next := liveRecv(t, started, "the queued dispatch to start after the first finished"); next != queued {
		t.Fatalf("second start was %s, want %s", next, queued)
	}
	eventually(t, "both acked", func() bool {
		return dispatchStatus(t, ss.Store, first.DispatchID) == engine.StatusAcked && dispatchStatus(t, ss.Store, second.DispatchID) == engine.StatusAcked
	})
	if ss.acks.Load() != 2 || ss.nacks.Load() != 0 || ss.doubles.Load() != 0 {
		t.Fatalf("acks %d nacks %d doubles %d, want 2/0/0", ss.acks.Load(), ss.nacks.Load(), ss.doubles.Load())
	}
}

// engine.md item 64: a signal for a dispatch that is not due yet is acked
// (the dispatcher wakes it on time), not nacked.
func TestLive_dispatch_signal_for_not_yet_due_dispatch_is_acked(t *testing.T) {
	ss := newSigStore(t, true)
	mb := liveMailbox(t, ss, newFake(1, complete), sigConfig())
	d := livePrepared(t, mb, liveReq("thread-signal-later", "later"))
	d.AvailableAt = time.Now().Add(time.Hour).UnixMilli()
	if _, err := ss.Enqueue(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the signal to be settled", func() bool { return ss.acks.Load()+ss.nacks.Load() > 0 })
	if ss.acks.Load() != 1 || ss.nacks.Load() != 0 {
		t.Fatalf("acks %d nacks %d, want the early signal acked", ss.acks.Load(), ss.nacks.Load())
	}
	if st := dispatchStatus(t, ss.Store, d.DispatchID); st != engine.StatusQueued {
		t.Fatalf("not-yet-due dispatch is %s", st)
	}
}

func TestSeed_dispatch_signal_blocked_nack_delay_backs_off_and_caps(t *testing.T) {
	cfg, err := liveDefaults(t)
	if err != nil {
		t.Fatal(err)
	}
	base, maxDelay := cfg.SignalNackBase, cfg.SignalNackMax
	if base != 500*time.Millisecond || maxDelay != 30*time.Second {
		t.Fatalf("signal nack defaults %s/%s, want 500ms/30s", base, maxDelay)
	}
	for _, tc := range []struct {
		deliveries int
		want       time.Duration
	}{
		{0, 500 * time.Millisecond}, // unknown count counts as the first delivery
		{1, 500 * time.Millisecond},
		{2, time.Second},
		{3, 2 * time.Second},
		{7, 30 * time.Second},
		{17, 30 * time.Second},
		{100, 30 * time.Second},
	} {
		if got := engine.SignalNackDelay(tc.deliveries, base, maxDelay); got != tc.want {
			t.Errorf("SignalNackDelay(%d) = %s, want %s", tc.deliveries, got, tc.want)
		}
	}
}

// liveDefaults returns the effective default Config.
func liveDefaults(t *testing.T) (engine.Config, error) {
	mb, err := engine.New(liveStore(t), newFake(0, complete), engine.Config{})
	if err != nil {
		return engine.Config{}, err
	}
	return mb.Config(), nil
}

// --- §10 item 57: GC (Go keeps no idle workers: see the file comment) ------------

func TestSeed_gc_idle_workers_removes_idle_with_no_dispatches(t *testing.T) {
	ctx := context.Background()
	clock := &liveClock{}
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{Now: clock.Now, GCTTL: time.Hour})
	old, err := mb.SubmitBackground(ctx, liveReq("thread-gc", "old"))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "old run acked", func() bool { return dispatchStatus(t, s, old.DispatchID) == engine.StatusAcked })
	// The attempt closes its event log just after the ack: wait for it, or
	// the log would be closed at the advanced time.
	eventually(t, "old attempt finished", func() bool { return mb.InFlight() == 0 })
	clock.Advance(2 * time.Hour)
	fresh, err := mb.SubmitBackground(ctx, liveReq("thread-gc-fresh", "fresh"))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "fresh run acked", func() bool { return dispatchStatus(t, s, fresh.DispatchID) == engine.StatusAcked })
	eventually(t, "fresh attempt finished", func() bool { return mb.InFlight() == 0 })
	eventually(t, "fresh event log closed", func() bool {
		l := mb.Reattach("thread-gc-fresh")
		if l == nil {
			return false
		}
		_, closed := l.ClosedAt()
		return closed
	})

	mb.GC(ctx)

	if d, err := s.LoadDispatch(ctx, old.DispatchID); err != nil || d != nil {
		t.Fatalf("terminal dispatch older than GCTTL kept: %+v %v", d, err)
	}
	if st := dispatchStatus(t, s, fresh.DispatchID); st != engine.StatusAcked {
		t.Fatalf("recent terminal dispatch is %s, want kept", st)
	}
	if run := liveRun(t, s, old.RunID); run.Status != engine.RunDone {
		t.Fatalf("GC touched the run record: %+v", run)
	}
	if mb.Reattach("thread-gc") != nil {
		t.Fatal("the event log of a run that ended long ago is still held")
	}
	if mb.Reattach("thread-gc-fresh") == nil {
		t.Fatal("GC dropped an event log still within EventRetention")
	}
	if out := liveMetrics(mb); !strings.Contains(out, `operation="purge_terminal",result="ok"`) {
		t.Error("metrics lack the purge_terminal operation")
	}
}

func TestSeed_gc_idle_workers_keeps_worker_with_queued_dispatches(t *testing.T) {
	ctx := context.Background()
	clock := &liveClock{}
	started := make(chan struct{})
	release, releaseFn := liveRelease(t)
	defer releaseFn()
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if liveText(req.Messages[0]) == "long" {
			sink.Emit([]byte(`{"type":"text_delta","delta":"working"}`))
			close(started)
			select {
			case <-release:
			case <-ctx.Done():
				return liveCancelled()
			}
		}
		return complete(ctx, req, sink)
	}
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, script), engine.Config{Now: clock.Now, GCTTL: time.Hour})
	running, err := mb.SubmitBackground(ctx, liveReq("thread-gc-run", "long"))
	if err != nil || running.Status != engine.SubmitRunning {
		t.Fatalf("running submit %+v %v", running, err)
	}
	liveRecv(t, started, "the long run")
	queued, err := mb.SubmitBackground(ctx, liveReq("thread-gc-keep", "hi"))
	if err != nil || queued.Status != engine.SubmitQueued {
		t.Fatalf("queued submit %+v %v", queued, err)
	}
	remote := livePrepared(t, mb, liveReq("thread-gc-claimed", "remote"))
	if _, err := s.Enqueue(ctx, remote); err != nil {
		t.Fatal(err)
	}
	if c, err := s.ClaimDispatch(ctx, remote.DispatchID, "remote-consumer", 30*time.Second, clock.Now()); err != nil || c == nil {
		t.Fatalf("remote claim %v %v", c, err)
	}

	clock.Advance(2 * time.Hour)
	mb.GC(ctx)

	for id, want := range map[string]engine.DispatchStatus{running.DispatchID: engine.StatusClaimed, queued.DispatchID: engine.StatusQueued, remote.DispatchID: engine.StatusClaimed} {
		if st := dispatchStatus(t, s, id); st != want {
			t.Fatalf("GC changed dispatch %s to %s, want %s", id, st, want)
		}
	}
	l := mb.Reattach("thread-gc-run")
	if l == nil || l.LastSeq() != 1 {
		t.Fatal("GC dropped the event log of a running run")
	}
}

func TestSeed_gc_idle_workers_noop_when_empty(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	mb := liveMailbox(t, s, newFake(1, complete), engine.Config{})
	mb.GC(ctx)
	counts, err := s.CountByStatus(ctx)
	if err != nil || counts != (engine.StatusCounts{}) {
		t.Fatalf("counts after GC of an empty store: %v %v", counts, err)
	}
	if mb.Reattach("any") != nil {
		t.Fatal("GC of an empty mailbox produced an event log")
	}
	if out := liveMetrics(mb); !strings.Contains(out, `mailbox_operations_total{operation="purge_terminal",result="ok"} 1`) {
		t.Errorf("GC did not run its purge:\n%s", out)
	}
}
