package engine_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Seed reconstruct_run_request applies the stored request extras
// (RunRequestExtras::apply_to sets continue_run_id from the extras captured
// when prepare chose the waiting run), so every attempt of a continued
// waiting run — the retry after a transient failure included — carries
// continue_run_id (engine.md items 45.6, 45.7).
func TestRetryOfAContinuedWaitingRunKeepsContinueRunID(t *testing.T) {
	var calls atomic.Int32
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if calls.Add(1) == 1 {
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "inference failed"}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	ctx := context.Background()
	w := spWaitingRun("run-waiting", "thread-retry", engine.WaitUserInput)
	if err := r.store.CreateRun(ctx, w); err != nil {
		t.Fatal(err)
	}
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-retry", AgentID: "agent", Messages: []engine.Message{userMsg("poke")}})
	if err != nil || res.RunID != "run-waiting" {
		t.Fatalf("submit %+v %v", res, err)
	}
	r.start(t)
	eventually(t, "dispatch acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	runs := spRuns(r.exec)
	if len(runs) != 2 {
		t.Fatalf("%d attempts, want 2", len(runs))
	}
	for i, rq := range runs {
		if rq.ContinueRunID != "run-waiting" {
			t.Errorf("attempt %d: continue_run_id %q, want run-waiting (seed: extras.continue_run_id applied on every rebuild)", i+1, rq.ContinueRunID)
		}
	}
}

// Seed activation_messages_from_range: a snapshot without input ids takes
// the last input_message_count records of the run's input range.
func TestActivationFromTheSequenceRangeAfterTheCacheWarmed(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	spCheckpoint(t, r, "thread-range", nil, userMsg("one"), userMsg("two"), userMsg("three"), userMsg("four"))
	run := spRunRecord("run-range", "thread-range", engine.RunCreated)
	run.Request = &engine.RunRequestSnapshot{Origin: engine.OriginUser, InputMessageCount: 2}
	run.Input = &engine.RunMessageInput{ThreadID: "thread-range", Range: &engine.SeqRange{From: 1, To: 3}}
	spCheckpoint(t, r, "thread-range", &run)
	// warm the tail cache first, as a previous run would
	if _, err := r.mb.ThreadContextOf(context.Background(), "thread-range"); err != nil {
		t.Fatal(err)
	}
	rr, _, err := r.mb.Reconstruct(context.Background(), &engine.Dispatch{DispatchID: "d-range", ThreadID: "thread-range", RunID: "run-range"})
	if err != nil {
		t.Fatal(err)
	}
	if got := spMsgContents(rr.Messages); len(got) != 2 || got[0] != `"two"` || got[1] != `"three"` {
		t.Fatalf("activation %v, want two, three", got)
	}
}

// Seed submit → prepare_run_for_dispatch continues the thread's waiting
// run and reconstruct_run_request gives the executor continue_run_id
// (extras + resumable waiting). The foreground fast path records the start
// in the claim's commit, before reconstruction reads the run.
func TestForegroundSubmitContinuesTheWaitingRun(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	r.start(t)
	ctx := context.Background()
	w := spWaitingRun("run-waiting-fg", "thread-fg-wait", engine.WaitUserInput)
	if err := r.store.CreateRun(ctx, w); err != nil {
		t.Fatal(err)
	}
	res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-fg-wait", AgentID: "agent", Messages: []engine.Message{userMsg("answer")}})
	if err != nil || res.RunID != "run-waiting-fg" {
		t.Fatalf("submit %+v %v, want the waiting run continued", res, err)
	}
	eventually(t, "dispatch acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	runs := spRuns(r.exec)
	if len(runs) != 1 || runs[0].ContinueRunID != "run-waiting-fg" || runs[0].RunMode != engine.ModeResume {
		t.Fatalf("executor request continue_run_id=%q run_mode=%q, want run-waiting-fg / resume", runs[0].ContinueRunID, runs[0].RunMode)
	}
}

// A request whose run_id names a waiting run continues that run: the
// executor gets continue_run_id (seed reconstruct_run_request: the run
// is resumable waiting when its request is rebuilt). A claim that records
// the start in its own commit — ClaimStart for a background request,
// SubmitIdle for a foreground one — marks the run running before the
// request is rebuilt, which then used to find no waiting run and left
// continue_run_id out.
func TestRunIDHintOfAWaitingRunContinuesIt(t *testing.T) {
	for _, fg := range []bool{false, true} {
		name := map[bool]string{false: "background", true: "foreground"}[fg]
		t.Run(name, func(t *testing.T) {
			r := newRig(t, newFake(1, complete), engine.Config{})
			ctx := context.Background()
			thread := "thread-hint-" + name
			if err := r.store.CreateRun(ctx, spWaitingRun("run-hinted", thread, engine.WaitUserInput)); err != nil {
				t.Fatal(err)
			}
			res := submitAndAck(t, r, fg, engine.SubmitRequest{ThreadID: thread, RunIDHint: "run-hinted", Messages: []engine.Message{userMsg("answer")}})
			if res.RunID != "run-hinted" {
				t.Fatalf("submit %+v", res)
			}
			runs := spRuns(r.exec)
			if len(runs) != 1 || runs[0].ContinueRunID != "run-hinted" {
				t.Fatalf("executor requests %d, continue_run_id %q; want one continuing run-hinted", len(runs), runs[0].ContinueRunID)
			}
			if fg && runs[0].RunMode != engine.ModeResume {
				t.Fatalf("run_mode %q, want resume", runs[0].RunMode)
			}
		})
	}
}

// A continuation of a waiting run reaches the agent with the run as it
// waits — status waiting and its waiting state (the tickets of its
// suspended calls) in context.latest_run — as the two-step start gave it:
// neither the background claim (ClaimStart) nor the foreground fast path's
// commit (SubmitIdle; until the eighth session it started the run) records
// the start of a waiting run's dispatch; the start follows the rebuild.
func TestContinuationSeesTheRunWaiting(t *testing.T) {
	for _, fg := range []bool{false, true} {
		name := map[bool]string{false: "background", true: "foreground"}[fg]
		t.Run(name, func(t *testing.T) {
			r := newRig(t, newFake(1, complete), engine.Config{})
			ctx := context.Background()
			thread := "thread-waits-" + name
			w := spWaitingRun("run-waits", thread, engine.WaitUserInput)
			w.Waiting.TicketIDs = []string{"ticket-1"}
			if err := r.store.CreateRun(ctx, w); err != nil {
				t.Fatal(err)
			}
			res := submitAndAck(t, r, fg, engine.SubmitRequest{ThreadID: thread, RunIDHint: "run-waits", Messages: []engine.Message{userMsg("answer")}})
			runs := spRuns(r.exec)
			if len(runs) != 1 {
				t.Fatalf("%d runs, want 1", len(runs))
			}
			lr := runs[0].Context.LatestRun
			if lr == nil || lr.RunID != "run-waits" || lr.Status != engine.RunWaiting || lr.Waiting == nil || len(lr.Waiting.TicketIDs) != 1 {
				t.Fatalf("context.latest_run %+v; want run-waits waiting with its ticket", lr)
			}
			if runs[0].ContinueRunID != "run-waits" {
				t.Fatalf("continue_run_id %q", runs[0].ContinueRunID)
			}
			// The start was recorded after the rebuild: the run ran, once.
			run, _ := r.store.LoadRun(ctx, "run-waits")
			d, _ := r.store.LoadDispatch(ctx, res.DispatchID)
			if run == nil || d == nil || run.Status != engine.RunDone || run.StartCount != 1 || run.SessionID == "" || run.SessionID != d.InstanceID {
				t.Fatalf("run %+v, dispatch %+v: want done, started once, under the dispatch's instance", run, d)
			}
		})
	}
}

// A foreground continuation of a waiting run on a thread with queued
// work: the interrupt supersedes the work, then the fast path's commit
// submits and claims without starting the run, which the agent sees
// waiting; the start is recorded after the rebuild.
func TestForegroundContinuationAfterAnInterrupt(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	r.start(t)
	ctx := context.Background()
	thread := "thread-w"
	w := spWaitingRun("run-w", thread, engine.WaitUserInput)
	w.Waiting.TicketIDs = []string{"ticket-1"}
	if err := r.store.CreateRun(ctx, w); err != nil {
		t.Fatal(err)
	}
	delayed := time.Now().Add(time.Hour).UnixMilli()
	if _, err := r.store.Enqueue(ctx, engine.Dispatch{DispatchID: "later", ThreadID: thread, RunID: "run-other", Priority: engine.DefaultPriority, AvailableAt: delayed, CreatedAt: delayed, MaxAttempts: 3}); err != nil {
		t.Fatal(err)
	}
	res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: thread, RunIDHint: "run-w", Messages: []engine.Message{userMsg("answer")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	if st := dispatchStatus(t, r.store, "later"); st != engine.StatusSuperseded {
		t.Fatalf("queued work %s, want superseded", st)
	}
	runs := spRuns(r.exec)
	if len(runs) != 1 {
		t.Fatalf("%d runs, want 1", len(runs))
	}
	if lr := runs[0].Context.LatestRun; lr == nil || lr.RunID != "run-w" || lr.Status != engine.RunWaiting || lr.Waiting == nil || runs[0].ContinueRunID != "run-w" {
		t.Fatalf("latest_run %+v, continue_run_id %q; want run-w waiting, continued", lr, runs[0].ContinueRunID)
	}
	if i, s, c := opCount(t, r.mb, "submit_idle", "ok"), opCount(t, r.mb, "submit", "ok"), opCount(t, r.mb, "claim_dispatch", "ok"); i != 1 || s != 0 || c != 0 {
		t.Fatalf("submit_idle %d, submit %d, claim_dispatch %d: want the fast path after the interrupt", i, s, c)
	}
	if n := opCount(t, r.mb, "record_dispatch_start", "ok"); n != 1 {
		t.Fatalf("record_dispatch_start %d, want 1 (after the rebuild)", n)
	}
}

// submitAndAck submits req in the foreground (the rig started first, so
// the submit claims inline) or in the background (the rig started after,
// so the dispatcher claims it), and waits until its dispatch is acked.
func submitAndAck(t *testing.T, r *rig, fg bool, req engine.SubmitRequest) engine.SubmitResult {
	t.Helper()
	ctx := context.Background()
	var res engine.SubmitResult
	var err error
	if fg {
		r.start(t)
		res, _, err = r.mb.Submit(ctx, req)
	} else {
		res, err = r.mb.SubmitBackground(ctx, req)
		r.start(t)
	}
	if err != nil {
		t.Fatalf("submit %+v: %v", req, err)
	}
	eventually(t, "dispatch acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	return res
}
