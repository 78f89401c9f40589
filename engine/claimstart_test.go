package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
)

// A queued dispatch whose run is already done (an earlier attempt finished
// it and its ack was lost, lessons.md B5) is acked without reaching the
// agent, and — claimed through StartClaimer — is not recorded as started:
// its runtime projection and the run's session stay as they were.
func TestDispatchOfADoneRunIsAckedUnstarted(t *testing.T) {
	var logs syncbuf.Buffer
	r := newRig(t, newFake(1, complete), engine.Config{Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	ctx := context.Background()
	run := engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunDone, SessionID: "earlier",
		Request: &engine.RunRequestSnapshot{}, CreatedAt: 1, UpdatedAt: 1}
	if err := r.store.CreateRun(ctx, run); err != nil {
		t.Fatal(err)
	}
	if _, err := r.store.Enqueue(ctx, engine.Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Priority: engine.DefaultPriority, MaxAttempts: 3, CreatedAt: 1, AvailableAt: 1}); err != nil {
		t.Fatal(err)
	}
	r.start(t)
	eventually(t, "d1 acked", func() bool { return dispatchStatus(t, r.store, "d1") == engine.StatusAcked })
	if runs, _, _ := r.exec.stats(); runs != 0 {
		t.Fatalf("the agent ran %d times, want 0", runs)
	}
	d, _ := r.store.LoadDispatch(ctx, "d1")
	if d.InstanceID != "" || d.RunStatus != "" {
		t.Fatalf("acked %+v: recorded as started", d)
	}
	if got, _ := r.store.LoadRun(ctx, "r1"); got.Status != engine.RunDone || got.SessionID != "earlier" {
		t.Fatalf("run %+v changed", got)
	}
	// The attempt's log line carries the attempt (its logger is made
	// only when it logs).
	out := logs.String()
	for _, want := range []string{`"msg":"run already done; acking its dispatch"`, `"thread_id":"t1"`, `"run_id":"r1"`, `"dispatch_id":"d1"`, `"attempt":1`} {
		if !strings.Contains(out, want) {
			t.Fatalf("logs lack %s:\n%s", want, out)
		}
	}
}

// An agent checkpoint that carries only messages appends them and still
// advances the run's updated_at, so the running run stays the thread's
// latest (latest_run goes by updated_at); one with run fields updates them.
func TestMessageOnlyCheckpointKeepsTheRunLatest(t *testing.T) {
	var clock atomic.Int64 // Unix ms, advanced by the script
	clock.Store(time.Now().UnixMilli())
	var before, afterMsgs, afterRun engine.RunRecord
	var r *rig
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		load := func() engine.RunRecord {
			run, err := r.store.LoadRun(ctx, req.RunID)
			if err != nil || run == nil {
				t.Errorf("load run: %v %v", run, err)
				return engine.RunRecord{}
			}
			return *run
		}
		before = load()
		clock.Add(5000)
		if err := req.Checkpoint(ctx, engine.RunCheckpoint{Messages: []engine.Message{{Role: engine.RoleAssistant, Content: json.RawMessage(`"a"`)}}}); err != nil {
			t.Error(err)
		}
		afterMsgs = load()
		steps := int64(3)
		clock.Add(5000)
		if err := req.Checkpoint(ctx, engine.RunCheckpoint{Run: &engine.RunPatch{Steps: &steps}}); err != nil {
			t.Error(err)
		}
		afterRun = load()
		return complete(ctx, req, sink)
	}
	r = newRig(t, newFake(1, script), engine.Config{Now: clock.Load})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	if afterMsgs.UpdatedAt != before.UpdatedAt+5 || afterMsgs.Steps != before.Steps {
		t.Fatalf("after a message-only checkpoint: updated_at %d → %d (want +5), steps %d", before.UpdatedAt, afterMsgs.UpdatedAt, afterMsgs.Steps)
	}
	if afterRun.Steps != 3 || afterRun.UpdatedAt != before.UpdatedAt+10 {
		t.Fatalf("run after a checkpoint with run fields: steps %d, updated_at %d (want 3, %d)", afterRun.Steps, afterRun.UpdatedAt, before.UpdatedAt+10)
	}
	if n, _ := r.store.MessageCount(ctx, "t1"); n != 2 {
		t.Fatalf("%d messages, want 2", n)
	}
}

// The run_finish that closes the stream of a dispatch whose run is
// already done (lessons.md B5: a previous attempt finished it, the ack was
// lost) tells how the run really ended: the run record's termination
// (natural_end when it recorded none, as a completion without one is
// reported) and its session, the attempt that finished it. It used to say
// cancelled, without a session_id.
func TestDispatchOfADoneRunFinishesItsStreamWithTheRunsOutcome(t *testing.T) {
	r := newRig(t, newFake(2, complete), engine.Config{})
	ctx := context.Background()
	errTerm := engine.ErrorTermination("agent exploded")
	for i, term := range []*engine.Termination{errTerm, nil} {
		id := fmt.Sprint(i + 1)
		run := engine.RunRecord{RunID: "r" + id, ThreadID: "t" + id, AgentID: "a", Status: engine.RunDone, SessionID: "earlier-" + id,
			TerminationReason: term, Request: &engine.RunRequestSnapshot{}, CreatedAt: 1, UpdatedAt: 1}
		if err := r.store.CreateRun(ctx, run); err != nil {
			t.Fatal(err)
		}
		if _, err := r.store.Enqueue(ctx, engine.Dispatch{DispatchID: "d" + id, ThreadID: "t" + id, RunID: "r" + id, Priority: engine.DefaultPriority, MaxAttempts: 3, CreatedAt: 1, AvailableAt: 1}); err != nil {
			t.Fatal(err)
		}
	}
	r.start(t)
	for i, want := range []*engine.Termination{errTerm, {Type: engine.TermNaturalEnd}} {
		id := fmt.Sprint(i + 1)
		eventually(t, "d"+id+" acked", func() bool { return dispatchStatus(t, r.store, "d"+id) == engine.StatusAcked })
		evs := execReadAll(t, r.mb.Reattach("t"+id))
		if len(evs) != 1 || evs[0].Type != "run_finish" {
			t.Fatalf("t%s events %v, want the synthetic run_finish alone", id, execTypes(evs))
		}
		var fin struct {
			RunID       string              `json:"run_id"`
			DispatchID  string              `json:"dispatch_id"`
			SessionID   *string             `json:"session_id"`
			Termination *engine.Termination `json:"termination"`
		}
		if err := json.Unmarshal(evs[0].Data, &fin); err != nil {
			t.Fatal(err)
		}
		gotTerm, _ := json.Marshal(fin.Termination)
		wantTerm, _ := json.Marshal(want)
		if fin.RunID != "r"+id || fin.DispatchID != "d"+id || fin.SessionID == nil || *fin.SessionID != "earlier-"+id || string(gotTerm) != string(wantTerm) {
			t.Fatalf("synthetic run_finish %s, want run r%s, dispatch d%s, session_id earlier-%s, termination %s", evs[0].Data, id, id, id, wantTerm)
		}
	}
	if runs, _, _ := r.exec.stats(); runs != 0 {
		t.Fatalf("the agent ran %d times, want 0", runs)
	}
}

// gatedLatestRun is the Badger store, StartClaimer included, whose
// LatestRun of one thread waits, once armed, until resume is closed: an
// attempt that ClaimStart claimed and started is held while it rebuilds
// its request (after it read its run record).
type gatedLatestRun struct {
	*badgerstore.Store
	thread       string
	armed        chan struct{} // closed to arm
	held, resume chan struct{}
	once         sync.Once
}

func (g *gatedLatestRun) LatestRun(ctx context.Context, thread string) (*engine.RunRecord, error) {
	select {
	case <-g.armed:
		if thread == g.thread {
			g.once.Do(func() { close(g.held); <-g.resume })
		}
	default:
	}
	return g.Store.LatestRun(ctx, thread)
}

// An interrupt or a cancel that arrives after a claim that recorded the
// start (ClaimStart) and before the agent got the run stops the attempt
// there — also an interrupt whose cancel has not reached the attempt
// (interrupt_unseen: the pre-flight finds the epoch stale) — as
// RecordDispatchStart refused such a dispatch on the two-step path
// (TestSeed_interrupt_between_claim_and_execution_supersedes_without_runtime_start):
// the executor never sees it, nothing counts it as a run, its run settles
// as cancelled and its stream ends with a cancelled run_finish. The
// attempt used to be handed to the executor with a cancelled context.
func TestStopBetweenClaimStartAndTheRun(t *testing.T) {
	for _, how := range []string{"interrupt", "cancel", "interrupt_unseen"} {
		t.Run(how, func(t *testing.T) {
			g := &gatedLatestRun{thread: "thread-gated", armed: make(chan struct{}), held: make(chan struct{}), resume: make(chan struct{})}
			// No agent slot until the gate is armed: a submit with a free
			// slot claims inline, and its attempt could rebuild its
			// request before the gate is armed.
			r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store { g.Store = s; return g })
			if _, ok := any(g).(engine.StartClaimer); !ok {
				t.Fatal("the wrapper hides StartClaimer")
			}
			var resumeOnce sync.Once
			resume := func() { resumeOnce.Do(func() { close(g.resume) }) }
			t.Cleanup(resume) // before the rig stops, should the test fail holding it
			ctx := context.Background()
			res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-gated", Messages: []engine.Message{userMsg("go")}})
			if err != nil {
				t.Fatal(err)
			}
			close(g.armed)
			r.exec.setCapacity(1)
			r.start(t)
			<-g.held // claimed and started, rebuilding its request
			if d := execLoad(t, r.store, res.DispatchID); d.Status != engine.StatusClaimed || d.InstanceID == "" {
				t.Fatalf("held dispatch %+v, want claimed and started", d)
			}
			want := engine.StatusSuperseded
			switch how {
			case "interrupt":
				if ir, err := r.mb.Interrupt(ctx, "thread-gated"); err != nil || ir.Active == nil || ir.Active.DispatchID != res.DispatchID {
					t.Fatalf("interrupt %+v %v", ir, err)
				}
			case "interrupt_unseen":
				// Committed, its cancel not (yet) delivered to the attempt:
				// only the epoch tells.
				if ir, err := r.store.Interrupt(ctx, "thread-gated", time.Now().UnixMilli()); err != nil || ir.Active == nil || ir.Active.DispatchID != res.DispatchID {
					t.Fatalf("interrupt %+v %v", ir, err)
				}
			default:
				want = engine.StatusAcked
				if ok, err := r.mb.Cancel(ctx, res.DispatchID); err != nil || !ok {
					t.Fatalf("cancel %v %v", ok, err)
				}
			}
			log := r.mb.Reattach("thread-gated")
			resume()
			eventually(t, "dispatch settled", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == want })
			eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
			evs := execReadAll(t, log)
			if runs, _, _ := r.exec.stats(); runs != 0 {
				t.Fatalf("the %s dispatch entered the executor (%d runs)", how, runs)
			}
			if run := execRun(t, r.store, res.RunID); run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled {
				t.Fatalf("run %+v, want done/cancelled", run)
			}
			var fin struct {
				Termination *engine.Termination `json:"termination"`
			}
			if len(evs) != 1 || evs[0].Type != "run_finish" || json.Unmarshal(evs[0].Data, &fin) != nil || fin.Termination == nil || fin.Termination.Type != engine.TermCancelled {
				t.Fatalf("events %v (%s), want one run_finish, termination cancelled", execTypes(evs), describe(evs))
			}
			out := execMetrics(r.mb)
			for _, never := range []string{`mailbox_dispatch_enqueue_to_start_seconds_count `, `mailbox_runs_total{`} {
				if countedIn(out, never) {
					t.Errorf("the %s dispatch was counted as run: %q", how, never)
				}
			}
		})
	}
}

// handOffGate is the Badger store, StartClaimer included, whose
// CompleteAndClaimStart runs after, when set, once the commit claimed and
// started the thread's next dispatch, before the engine learns of it.
type handOffGate struct {
	*badgerstore.Store
	after      func(*engine.Dispatch)
	interrupts atomic.Int32
}

func (g *handOffGate) CompleteAndClaimStart(ctx context.Context, id, token string, res engine.RunResult, now int64, consumer string, lease time.Duration, instance string) (*engine.Dispatch, error) {
	next, err := g.Store.CompleteAndClaimStart(ctx, id, token, res, now, consumer, lease, instance)
	if err == nil && next != nil && g.after != nil {
		g.after(next)
	}
	return next, err
}

func (g *handOffGate) Interrupt(ctx context.Context, thread string, now int64) (engine.InterruptResult, error) {
	defer g.interrupts.Add(1)
	return g.Store.Interrupt(ctx, thread, now)
}

// A foreground submit that interrupts the thread while a completion hands
// it over to the next dispatch — claimed and started in the completing
// commit (CompleteAndClaimStart) — supersedes that dispatch, which never
// reaches the agent (TestForegroundSubmitDuringCompletionHandOff, on the
// path where the next start is recorded with the completion). The handed
// over attempt used to run whenever it reached the executor before the
// submit's cancel reached it.
func TestForegroundSubmitDuringAStartedHandOff(t *testing.T) {
	const thread = "started-handoff"
	hold, release := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	letGo := func() { releaseOnce.Do(func() { close(release) }) }
	queued := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if execText(req.Messages[0]) == "first" {
			<-queued
		}
		return complete(ctx, req, sink)
	}
	g := &handOffGate{}
	r := newRigWith(t, newFake(2, script), engine.Config{CancelWait: 5 * time.Second}, func(s *badgerstore.Store) engine.Store { g.Store = s; return g })
	t.Cleanup(letGo)
	var held atomic.Bool
	g.after = func(*engine.Dispatch) {
		if held.CompareAndSwap(false, true) {
			close(hold)
			<-release
		}
	}
	ctx := context.Background()
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("first")}}); err != nil {
		t.Fatal(err)
	}
	second, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("second")}})
	if err != nil {
		t.Fatal(err)
	}
	close(queued)
	r.start(t)
	<-hold // the second dispatch claimed and started with the first's completion
	if d := execLoad(t, r.store, second.DispatchID); d.Status != engine.StatusClaimed || d.InstanceID == "" {
		t.Fatalf("handed-over dispatch %+v, want claimed and started", d)
	}
	foregroundDuringHandOff(t, r, thread, second.DispatchID, g.interrupts.Load, letGo)
}

// A cancel that settles the claim of an attempt its claim did not start
// (a continuation of a waiting run: claimed only, the start follows the
// rebuild) records no instance id: the attempt never started, so the
// dispatch and the run name none of its own — the run keeps the session
// of its last real attempt. The attempt used to pick its instance id
// before the start and the cancel recorded it.
func TestCancelBeforeTheStartRecordsNoInstance(t *testing.T) {
	g := &gatedLatestRun{thread: "thread-waits-gated", armed: make(chan struct{}), held: make(chan struct{}), resume: make(chan struct{})}
	r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store { g.Store = s; return g })
	var resumeOnce sync.Once
	resume := func() { resumeOnce.Do(func() { close(g.resume) }) }
	t.Cleanup(resume)
	ctx := context.Background()
	w := spWaitingRun("run-waits-gated", "thread-waits-gated", engine.WaitUserInput)
	w.SessionID = "session-of-the-last-attempt"
	if err := r.store.CreateRun(ctx, w); err != nil {
		t.Fatal(err)
	}
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-waits-gated", RunIDHint: "run-waits-gated", Messages: []engine.Message{userMsg("answer")}})
	if err != nil {
		t.Fatal(err)
	}
	close(g.armed)
	r.exec.setCapacity(1)
	r.start(t)
	<-g.held // claimed, not started, rebuilding its request
	if d := execLoad(t, r.store, res.DispatchID); d.Status != engine.StatusClaimed || d.InstanceID != "" {
		t.Fatalf("held dispatch %+v, want claimed and not started", d)
	}
	if ok, err := r.mb.Cancel(ctx, res.DispatchID); err != nil || !ok {
		t.Fatalf("cancel %v %v", ok, err)
	}
	resume()
	eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
	if runs, _, _ := r.exec.stats(); runs != 0 {
		t.Fatalf("the cancelled attempt entered the executor (%d runs)", runs)
	}
	d := execLoad(t, r.store, res.DispatchID)
	run := execRun(t, r.store, res.RunID)
	if d.Status != engine.StatusAcked || d.InstanceID != "" || run.Status != engine.RunDone || run.SessionID != "session-of-the-last-attempt" {
		t.Fatalf("after the cancel: dispatch %s instance %q, run %s session %q; want acked with no instance, the run done keeping its session",
			d.Status, d.InstanceID, run.Status, run.SessionID)
	}
}
