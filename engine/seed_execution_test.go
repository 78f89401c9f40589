package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Go counterparts of the seed's execution tests (engine.md §7, §8, §9,
// §14) and this project's own execution decisions. The seed-to-Go map is
// seedmap_execution.md.

func TestSeed_background_success_records_run_result_and_keeps_dispatch_id_separate_from_run_id(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "finished"}
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-run-result", AgentID: "agent", Messages: []engine.Message{userMsg("go")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "acked with a done run", func() bool {
		d := execLoad(t, r.store, res.DispatchID)
		return d.Status == engine.StatusAcked && d.RunStatus == engine.RunDone
	})
	d := execLoad(t, r.store, res.DispatchID)
	if d.RunID == d.DispatchID || d.RunID != res.RunID {
		t.Fatalf("run id %s must be the prepared run, not the dispatch id %s", d.RunID, d.DispatchID)
	}
	if d.InstanceID == "" || d.Termination == nil || d.Termination.Type != engine.TermNaturalEnd || d.RunResponse != "finished" || d.RunError != "" || d.CompletedAt == 0 {
		t.Fatalf("dispatch projection %+v", d)
	}
	run := execRun(t, r.store, res.RunID)
	if run.Status != engine.RunDone || run.DispatchID != d.DispatchID || run.SessionID != d.InstanceID || string(run.FinalOutput) != `"finished"` {
		t.Fatalf("run record %+v", run)
	}
	if req := r.exec.execRuns()[0]; req.RunID != res.RunID || req.DispatchID != res.DispatchID || req.SessionID != d.InstanceID {
		t.Fatalf("executor saw run %s dispatch %s session %s", req.RunID, req.DispatchID, req.SessionID)
	}
}

func TestSeed_background_permanent_error_records_run_result_before_dead_letter(t *testing.T) {
	script := func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "agent 'missing-agent' not found"}
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-missing-agent", AgentID: "missing-agent", Messages: []engine.Message{userMsg("go")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "dead letter with the run result", func() bool {
		d := execLoad(t, r.store, res.DispatchID)
		return d.Status == engine.StatusDeadLetter && d.RunStatus == engine.RunDone && d.RunError != ""
	})
	d := execLoad(t, r.store, res.DispatchID)
	if d.RunID == d.DispatchID || d.InstanceID == "" || d.CompletedAt == 0 || d.AttemptCount != 0 {
		t.Fatalf("dead letter %+v", d)
	}
	var term string
	if d.Termination == nil || d.Termination.Type != engine.TermError || json.Unmarshal(d.Termination.Value, &term) != nil || !strings.Contains(term, "missing-agent") {
		t.Fatalf("termination %+v", d.Termination)
	}
	if !strings.Contains(d.LastError, "missing-agent") || !strings.Contains(d.RunError, "missing-agent") {
		t.Fatalf("last_error %q run_error %q", d.LastError, d.RunError)
	}
	run := execRun(t, r.store, res.RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermError || !strings.Contains(string(run.ErrorPayload), "missing-agent") {
		t.Fatalf("run after permanent failure %+v", run)
	}
	// The synthetic run_finish names the canonical run, not the dispatch.
	evs := execReadAll(t, r.mb.Reattach("thread-missing-agent"))
	if len(evs) != 1 || evs[0].Type != "run_finish" {
		t.Fatalf("events %v", execTypes(evs))
	}
	var fin struct {
		RunID      string `json:"run_id"`
		DispatchID string `json:"dispatch_id"`
	}
	if err := json.Unmarshal(evs[0].Data, &fin); err != nil || fin.RunID != res.RunID || fin.DispatchID != res.DispatchID {
		t.Fatalf("synthetic run_finish %s", evs[0].Data)
	}
	if runs, _, _ := r.exec.stats(); runs != 1 {
		t.Fatalf("a permanent failure was retried: %d runs", runs)
	}
}

func TestSeed_reconstruct_failure_cleans_worker_and_dispatches_next_queued(t *testing.T) {
	for _, tc := range []struct {
		name    string
		seedRun func(t *testing.T, r *rig, thread string, now int64) string // returns the run id of the broken dispatch
		errText string
	}{
		{"input message missing", func(t *testing.T, r *rig, thread string, now int64) string {
			run := &engine.RunRecord{
				RunID: "run-broken", ThreadID: thread, AgentID: "agent", Status: engine.RunCreated, DispatchID: "dispatch-broken",
				Request:   &engine.RunRequestSnapshot{Origin: engine.OriginUser, InputMessageIDs: []string{"missing-message"}, InputMessageCount: 1},
				Input:     &engine.RunMessageInput{ThreadID: thread, TriggerMessageIDs: []string{"missing-message"}},
				CreatedAt: now / 1000, UpdatedAt: now / 1000,
			}
			if _, err := r.store.Checkpoint(context.Background(), engine.Checkpoint{ThreadID: thread, Run: run}); err != nil {
				t.Fatal(err)
			}
			return run.RunID
		}, "message 'missing-message' not found"},
		{"run missing", func(*testing.T, *rig, string, int64) string { return "missing-run" }, "run 'missing-run' not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, newFake(1, complete), engine.Config{})
			ctx := context.Background()
			const thread = "thread-reconstruct-next"
			now := time.Now().UnixMilli()
			runID := tc.seedRun(t, r, thread, now)
			broken := engine.Dispatch{
				DispatchID: "dispatch-broken", ThreadID: thread, RunID: runID, Priority: 10, Status: engine.StatusQueued,
				AvailableAt: now, MaxAttempts: 3, CreatedAt: now, UpdatedAt: now,
			}
			if _, err := r.store.Enqueue(ctx, broken); err != nil {
				t.Fatal(err)
			}
			next := execEnqueuePrepared(t, r, thread, "next", now, func(d *engine.Dispatch) {
				d.Priority = 20
				d.CreatedAt, d.UpdatedAt = now+1, now+1
			})
			// One slot, both queued before start: the broken dispatch is
			// claimed first and the next one can only run after it.
			r.start(t)
			eventually(t, "broken dispatch dead-lettered", func() bool { return dispatchStatus(t, r.store, broken.DispatchID) == engine.StatusDeadLetter })
			eventually(t, "next dispatch acked", func() bool { return dispatchStatus(t, r.store, next.DispatchID) == engine.StatusAcked })
			d := execLoad(t, r.store, broken.DispatchID)
			if !strings.Contains(d.LastError, tc.errText) || d.AttemptCount != 0 {
				t.Fatalf("dead letter %+v, want error %q without a spent attempt", d, tc.errText)
			}
			if runID == "run-broken" {
				run := execRun(t, r.store, runID)
				if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermError || !strings.Contains(string(run.ErrorPayload), tc.errText) {
					t.Fatalf("broken run %+v, want done with an error", run)
				}
			}
			runs := r.exec.execRuns()
			if len(runs) != 1 || runs[0].DispatchID != next.DispatchID {
				t.Fatalf("executor ran %d attempts; only the next dispatch may reach it", len(runs))
			}
			eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
		})
	}
}

func TestSeed_interrupt_bumps_dispatch_epoch(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-int", AgentID: "agent-1", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := r.store.CurrentEpoch(ctx, "thread-int")
	ir, err := r.mb.Interrupt(ctx, "thread-int")
	if err != nil {
		t.Fatal(err)
	}
	after, _ := r.store.CurrentEpoch(ctx, "thread-int")
	if ir.NewEpoch == 0 || ir.NewEpoch <= before || after != ir.NewEpoch {
		t.Fatalf("interrupt epoch %d (before %d, stored %d)", ir.NewEpoch, before, after)
	}
	if ir.SupersededN != 1 || len(ir.Superseded) != 1 || ir.Superseded[0].DispatchID != res.DispatchID || ir.Active != nil {
		t.Fatalf("interrupt result %+v", ir)
	}
	// A later submit is stamped with the new epoch and is not superseded.
	later, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-int", Messages: []engine.Message{userMsg("b")}})
	if err != nil {
		t.Fatal(err)
	}
	if d := execLoad(t, r.store, later.DispatchID); d.Epoch != ir.NewEpoch || d.Status != engine.StatusQueued {
		t.Fatalf("later dispatch %+v", d)
	}
}

func TestSeed_interrupt_marks_superseded_queued_runs_cancelled(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{})
	ctx := context.Background()
	now := time.Now().UnixMilli()
	first := execEnqueuePrepared(t, r, "thread-int-runs", "first", now, nil)
	second := execEnqueuePrepared(t, r, "thread-int-runs", "second", now, nil)
	ir, err := r.mb.Interrupt(ctx, "thread-int-runs")
	if err != nil {
		t.Fatal(err)
	}
	if ir.SupersededN != 2 || len(ir.Superseded) != 2 {
		t.Fatalf("interrupt result %+v", ir)
	}
	for _, s := range []engine.SubmitResult{first, second} {
		if st := dispatchStatus(t, r.store, s.DispatchID); st != engine.StatusSuperseded {
			t.Fatalf("dispatch %s is %s", s.DispatchID, st)
		}
		run := execRun(t, r.store, s.RunID)
		if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled || run.DispatchID != s.DispatchID {
			t.Fatalf("superseded run %+v", run)
		}
	}
	out := execMetrics(r.mb)
	for _, want := range []string{
		`mailbox_operations_total{operation="interrupt",result="ok"} 1`,
		// engine.md item 65: the count-only supersede metric, by the number superseded.
		`mailbox_operations_total{operation="supersede",result="ok"} 2`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// An interrupt of a thread whose run executes here cancels that run.
func TestExec_interrupt_cancels_local_active_run(t *testing.T) {
	cause := make(chan error, 1)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		cause <- context.Cause(ctx)
		return execCancelled()
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-int-active", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatalf("submit %+v %v", res, err)
	}
	eventually(t, "executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
	ir, err := r.mb.Interrupt(ctx, "thread-int-active")
	if err != nil || ir.Active == nil || ir.Active.DispatchID != res.DispatchID {
		t.Fatalf("interrupt %+v %v", ir, err)
	}
	select {
	case c := <-cause:
		if c == nil {
			t.Fatal("run context ended without a cause")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("interrupt did not cancel the active run")
	}
	eventually(t, "active dispatch settled", func() bool { return dispatchStatus(t, r.store, res.DispatchID).Terminal() })
}

func TestSeed_interrupt_between_claim_and_execution_supersedes_without_runtime_start(t *testing.T) {
	r, fs := newExecRig(t, newFake(1, complete), engine.Config{Lease: 300 * time.Millisecond, RenewInterval: 50 * time.Millisecond},
		func(s *execFaultStore) { s.interruptAfterClaim.Store(true) })
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-epoch-race", AgentID: "agent", Messages: []engine.Message{userMsg("go")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "superseded", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusSuperseded })
	if fs.interruptAfterClaim.Load() {
		t.Fatal("the injected interrupt never happened")
	}
	eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
	if runs, _, _ := r.exec.stats(); runs != 0 {
		t.Fatalf("a stale dispatch entered the executor (%d runs)", runs)
	}
	d := execLoad(t, r.store, res.DispatchID)
	if d.ClaimToken != "" || d.LeaseUntil != 0 || d.InstanceID != "" {
		t.Fatalf("superseded dispatch %+v", d)
	}
	run := execRun(t, r.store, res.RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled || run.DispatchID != res.DispatchID || run.StartedAt != 0 {
		t.Fatalf("run %+v, want done/cancelled and never started", run)
	}
	// Never started: no start latency observed, no run outcome counted.
	out := execMetrics(r.mb)
	for _, never := range []string{`mailbox_dispatch_enqueue_to_start_seconds_count `, `mailbox_runs_total{`} {
		if countedIn(out, never) {
			t.Errorf("a stale dispatch was counted as started: %q", never)
		}
	}
}

func TestSeed_mailbox_execution_records_dispatch_latency_metrics(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "thread-metrics", Messages: []engine.Message{userMsg("go")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
	out := execMetrics(r.mb)
	for _, want := range []string{
		`mailbox_dispatch_enqueue_to_start_seconds_count 1`,
		`mailbox_dispatch_eligible_to_start_seconds_count 1`,
		`mailbox_dispatch_claim_to_start_seconds_count 1`,
		// engine.md item 67: completion latency and runtime by outcome.
		`mailbox_dispatch_enqueue_to_complete_seconds_count{outcome="completed"} 1`,
		`mailbox_dispatch_runtime_seconds_count{outcome="completed"} 1`,
		`mailbox_runs_total{outcome="completed"} 1`,
		`mailbox_run_duration_seconds_count{outcome="completed"} 1`,
		`mailbox_operations_total{operation="claim",result="ok"} 1`,
		`mailbox_operation_duration_seconds_count{operation="claim",result="ok"} 1`,
		`mailbox_operations_total{operation="complete",result="ok"} 1`, // result and ack in one commit
		`mailbox_dispatch_depth{status="queued"} `,
		`mailbox_dispatch_depth{status="acked"} `,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// The submit's write: a plain enqueue, or the store's combined submit.
	if !strings.Contains(out, `mailbox_operations_total{operation="enqueue",result="ok"} 1`) &&
		!strings.Contains(out, `mailbox_operations_total{operation="submit",result="ok"} 1`) {
		t.Error("the submit's enqueue is not counted")
	}
	if t.Failed() {
		t.Log(out)
	}
}

func TestSeed_mailbox_lease_renewal_is_wired_and_prevents_reclaim(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-time.After(time.Second): // a run three leases long
		case <-ctx.Done():
			return execCancelled()
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{Lease: 300 * time.Millisecond, RenewInterval: 50 * time.Millisecond})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-lease-renewal", Messages: []engine.Message{userMsg("go")}})
	if err != nil {
		t.Fatalf("submit %+v %v", res, err)
	}
	eventually(t, "claimed", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusClaimed })
	initial := execLoad(t, r.store, res.DispatchID).LeaseUntil
	if initial == 0 {
		t.Fatal("claimed dispatch has no lease")
	}
	renewed := false
	// Another process sweeping expired leases all along never takes it.
	for deadline := time.Now().Add(5 * time.Second); ; {
		got, err := r.store.ReclaimExpired(ctx, time.Now().UnixMilli(), 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) > 0 {
			t.Fatalf("a renewed lease was reclaimed: %+v", got[0])
		}
		d := execLoad(t, r.store, res.DispatchID)
		if d.LeaseUntil > initial {
			renewed = true
		}
		if d.Status == engine.StatusAcked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("run did not finish: %+v", d)
		}
		time.Sleep(10 * time.Millisecond) // polling interval of the sweeper
	}
	d := execLoad(t, r.store, res.DispatchID)
	if !renewed || d.AttemptCount != 0 || len(d.Errors) != 0 {
		t.Fatalf("renewed %v, dispatch %+v", renewed, d)
	}
	if runs, _, _ := r.exec.stats(); runs != 1 {
		t.Fatalf("%d runs", runs)
	}
	if n := execMetric(r.mb, `mailbox_lease_renewals_total{result="ok"}`); n < 2 {
		t.Fatalf("lease renewals ok = %v, want several", n)
	}
	if !strings.Contains(execMetrics(r.mb), `mailbox_operations_total{operation="extend_lease",result="ok"}`) {
		t.Error("extend_lease operations not counted")
	}
}

// ---- This project's own execution decisions (engine.md, "This project's
// own decisions", and §15 hazards).

// A transient failure with a 200 ms backoff is retried on its own, within
// 300 ms, and not before the backoff.
func TestExec_transient_failure_retried_within_backoff(t *testing.T) {
	var mu sync.Mutex
	var calls []time.Time
	var firstReturned time.Time
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		mu.Lock()
		calls = append(calls, time.Now())
		n := len(calls)
		mu.Unlock()
		if n == 1 {
			defer func() { mu.Lock(); firstReturned = time.Now(); mu.Unlock() }()
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "model overloaded"}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{RetryDelay: 200 * time.Millisecond, MaxRetryDelay: time.Second})
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t-retry", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "second attempt started", func() bool { mu.Lock(); defer mu.Unlock(); return len(calls) >= 2 })
	mu.Lock()
	gap := calls[1].Sub(firstReturned)
	mu.Unlock()
	if gap < 190*time.Millisecond || gap > 300*time.Millisecond {
		t.Fatalf("retry started %s after the failure, want within [200ms, 300ms]", gap)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	d := execLoad(t, r.store, res.DispatchID)
	if d.AttemptCount != 1 || d.RunStatus != engine.RunDone || d.RunError != "" {
		t.Fatalf("dispatch after the retry %+v", d)
	}
	runs := r.exec.execRuns()
	if len(runs) != 2 || runs[1].Attempt != 2 || runs[1].RunID != res.RunID {
		t.Fatalf("attempts %d", len(runs))
	}
	if run := execRun(t, r.store, res.RunID); run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermNaturalEnd {
		t.Fatalf("run after the successful retry %+v", run)
	}
}

// Without executor capacity, due work (a fresh submit and a retry whose
// backoff passed) is not claimed and spends no attempt for ten retry
// periods; it runs once capacity returns.
func TestExec_no_capacity_for_ten_retry_periods_spends_no_attempt(t *testing.T) {
	var mu sync.Mutex
	failed := false
	var exec *fakeExecutor
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		mu.Lock()
		defer mu.Unlock()
		if !failed {
			failed = true
			exec.setCapacity(0) // the agent leaves after failing
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "agent lost"}
		}
		return complete(ctx, req, sink)
	}
	exec = newFake(1, script)
	r := newRig(t, exec, engine.Config{})
	r.start(t)
	ctx := context.Background()
	retry, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-retry", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "nacked", func() bool {
		d := execLoad(t, r.store, retry.DispatchID)
		return d.Status == engine.StatusQueued && d.AttemptCount == 1 && r.mb.InFlight() == 0
	})
	fresh, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-fresh", Messages: []engine.Message{userMsg("y")}})
	if err != nil || fresh.Status != engine.SubmitQueued {
		t.Fatalf("submit without capacity %+v %v", fresh, err)
	}
	claimsBefore := execMetric(r.mb, `mailbox_operations_total{operation="claim",result="ok"}`) +
		execMetric(r.mb, `mailbox_operations_total{operation="claim",result="empty"}`) +
		execMetric(r.mb, `mailbox_operations_total{operation="claim",result="error"}`)
	time.Sleep(10 * r.mb.Config().RetryDelay) // ten retry periods with no agent
	for id, attempts := range map[string]uint32{retry.DispatchID: 1, fresh.DispatchID: 0} {
		if d := execLoad(t, r.store, id); d.Status != engine.StatusQueued || d.AttemptCount != attempts {
			t.Fatalf("without capacity dispatch became %+v (want queued, %d attempts)", d, attempts)
		}
	}
	claimsAfter := execMetric(r.mb, `mailbox_operations_total{operation="claim",result="ok"}`) +
		execMetric(r.mb, `mailbox_operations_total{operation="claim",result="empty"}`) +
		execMetric(r.mb, `mailbox_operations_total{operation="claim",result="error"}`)
	if claimsAfter != claimsBefore {
		t.Fatalf("claimed without a free slot: %v claims during the window", claimsAfter-claimsBefore)
	}
	exec.setCapacity(1)
	eventually(t, "both run once capacity returns", func() bool {
		return dispatchStatus(t, r.store, retry.DispatchID) == engine.StatusAcked && dispatchStatus(t, r.store, fresh.DispatchID) == engine.StatusAcked
	})
	if d := execLoad(t, r.store, retry.DispatchID); d.AttemptCount != 1 {
		t.Fatalf("retried dispatch spent %d attempts, want 1", d.AttemptCount)
	}
	if runs, _, _ := exec.stats(); runs != 3 {
		t.Fatalf("executor ran %d attempts, want 3", runs)
	}
}

// A dispatch whose available_at lies in the future is claimed when it
// falls due, with no other trigger (no submit, sweep or restart).
func TestExec_delayed_dispatch_claimed_when_due(t *testing.T) {
	started := make(chan time.Time, 1)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		started <- time.Now()
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	due := time.Now().Add(300 * time.Millisecond)
	res := execEnqueuePrepared(t, r, "t-delayed", "later", due.UnixMilli(), nil)
	r.start(t)
	select {
	case at := <-started:
		if at.Before(due.Add(-5 * time.Millisecond)) {
			t.Fatalf("claimed %s before it was due", due.Sub(at))
		}
		if late := at.Sub(due); late > 300*time.Millisecond {
			t.Fatalf("claimed %s after it fell due", late)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a delayed dispatch was never claimed")
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
}

// A renewal that finds the lease lost (ExtendLease false) cancels the run
// at once, long before the lease would lapse.
func TestExec_lost_lease_cancels_run(t *testing.T) {
	type end struct {
		at    time.Time
		cause error
	}
	ended := make(chan end, 1)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-ctx.Done():
			ended <- end{time.Now(), context.Cause(ctx)}
			return execCancelled()
		case <-time.After(5 * time.Second):
			ended <- end{}
			return complete(ctx, req, sink)
		}
	}
	r, fs := newExecRig(t, newFake(1, script), engine.Config{Lease: 2 * time.Second, RenewInterval: 50 * time.Millisecond},
		func(s *execFaultStore) {
			s.extendLease = func(int32) (bool, error, bool) { return false, nil, false }
		})
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t-lost", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatalf("submit %+v %v", res, err)
	}
	eventually(t, "claimed", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusClaimed })
	leaseUntil := execLoad(t, r.store, res.DispatchID).LeaseUntil
	e := <-ended
	if e.at.IsZero() {
		t.Fatal("a lost lease did not cancel the run")
	}
	if e.at.UnixMilli() >= leaseUntil {
		t.Fatalf("cancelled %dms after the lease lapsed", e.at.UnixMilli()-leaseUntil)
	}
	if e.cause == nil || !strings.Contains(e.cause.Error(), "lease") {
		t.Fatalf("cancel cause %v", e.cause)
	}
	if fs.extendCalls.Load() != 1 {
		t.Fatalf("renewal kept going after the lease was lost: %d calls", fs.extendCalls.Load())
	}
	if n := execMetric(r.mb, `mailbox_lease_renewals_total{result="lost"}`); n != 1 {
		t.Fatalf("lost renewals %v", n)
	}
	eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
}

// A failing renewal (ExtendLease errors) is retried; once the lease is
// about to lapse the run is cancelled, before the lease runs out (engine.md
// hazard 69: the seed stopped renewing and let the run continue).
func TestExec_failing_renewal_retried_then_cancels_before_lapse(t *testing.T) {
	type end struct {
		at    time.Time
		cause error
		calls int32
	}
	ended := make(chan end, 1)
	var fs *execFaultStore
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-ctx.Done():
			ended <- end{time.Now(), context.Cause(ctx), fs.extendCalls.Load()}
			return execCancelled()
		case <-time.After(5 * time.Second):
			ended <- end{}
			return complete(ctx, req, sink)
		}
	}
	const lease, interval = 1500 * time.Millisecond, 150 * time.Millisecond
	r, fs0 := newExecRig(t, newFake(1, script), engine.Config{Lease: lease, RenewInterval: interval},
		func(s *execFaultStore) {
			s.extendLease = func(int32) (bool, error, bool) { return false, errExecInjected, false }
		})
	fs = fs0
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t-renew-fail", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatalf("submit %+v %v", res, err)
	}
	eventually(t, "claimed", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusClaimed })
	d := execLoad(t, r.store, res.DispatchID)
	claimedAt := d.UpdatedAt
	e := <-ended
	if e.at.IsZero() {
		t.Fatal("a failing renewal never cancelled the run")
	}
	if e.calls < 3 {
		t.Fatalf("cancelled after %d renewal attempts: failures must be retried", e.calls)
	}
	if ms := e.at.UnixMilli(); ms >= d.LeaseUntil || ms < claimedAt+lease.Milliseconds()/2 {
		t.Fatalf("cancelled %dms after the claim, want before the lease lapses (%dms) and not at the first failure", ms-claimedAt, d.LeaseUntil-claimedAt)
	}
	if e.cause == nil || !strings.Contains(e.cause.Error(), "lease") {
		t.Fatalf("cancel cause %v", e.cause)
	}
	if n := execMetric(r.mb, `mailbox_lease_renewals_total{result="error"}`); n < 3 {
		t.Fatalf("failed renewals counted %v", n)
	}
	eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
}

// A renewal that fails a few times and then succeeds keeps the run alive
// and its lease unreclaimable.
func TestExec_failing_renewal_recovers(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return execCancelled()
		}
		return complete(ctx, req, sink)
	}
	r, fs := newExecRig(t, newFake(1, script), engine.Config{Lease: 600 * time.Millisecond, RenewInterval: 100 * time.Millisecond},
		func(s *execFaultStore) {
			s.extendLease = func(n int32) (bool, error, bool) {
				if n <= 2 {
					return false, errExecInjected, false
				}
				return false, nil, true
			}
		})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-renew-recover", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatalf("submit %+v %v", res, err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; {
		got, err := r.store.ReclaimExpired(ctx, time.Now().UnixMilli(), 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) > 0 {
			t.Fatalf("renewal stopped after failures: the lease lapsed and was reclaimed: %+v", got[0])
		}
		if dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("run did not finish")
		}
		time.Sleep(10 * time.Millisecond) // polling interval of the sweeper
	}
	if run := execRun(t, r.store, res.RunID); run.TerminationReason == nil || run.TerminationReason.Type != engine.TermNaturalEnd {
		t.Fatalf("run was cut short: %+v", run)
	}
	if fs.extendCalls.Load() < 4 || execLoad(t, r.store, res.DispatchID).AttemptCount != 0 {
		t.Fatalf("renewal calls %d", fs.extendCalls.Load())
	}
}

// A transient failure that uses up max_attempts dead-letters the dispatch
// and errors the run record in the same step, with no sweep (engine.md
// hazard 71).
func TestExec_transient_failure_at_max_attempts_errors_run_at_once(t *testing.T) {
	script := func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "model overloaded"}
	}
	// Sweeps far away: only the settle path can mark the run.
	r := newRig(t, newFake(1, script), engine.Config{MaxAttempts: 2, SweepInterval: time.Hour})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-max", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "dead-lettered", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
	run := execRun(t, r.store, res.RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermError || !strings.Contains(string(run.ErrorPayload), "model overloaded") {
		t.Fatalf("run when its dispatch dead-lettered: %+v", run)
	}
	d := execLoad(t, r.store, res.DispatchID)
	if d.AttemptCount != 2 || len(d.Errors) != 2 {
		t.Fatalf("dead letter %+v", d)
	}
	if runs, _, _ := r.exec.stats(); runs != 2 {
		t.Fatalf("executor ran %d attempts, want max_attempts = 2", runs)
	}
}

// Stop with a run still executing and a short grace puts the dispatch
// back to queued without spending an attempt, and another mailbox over the
// same store then runs it as the same run (extends
// TestStopReleasesUnfinishedRunsWithoutSpendingAttempts).
func TestExec_stop_releases_running_run_which_resumes_later(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "cancelled"}
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-stop", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatalf("submit %+v %v", res, err)
	}
	eventually(t, "executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
	grace, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := r.mb.Stop(grace); err != nil {
		t.Fatal(err)
	}
	d := execLoad(t, r.store, res.DispatchID)
	if d.Status != engine.StatusQueued || d.AttemptCount != 0 || len(d.Errors) != 0 {
		t.Fatalf("after shutdown the dispatch is %+v", d)
	}
	if run := execRun(t, r.store, res.RunID); run.Status == engine.RunDone {
		t.Fatalf("shutdown finished the run: %+v", run)
	}
	next := newFake(1, complete)
	mb2, err := engine.New(r.store, next, engine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := mb2.Stop(ctx); err != nil && !errors.Is(err, context.Canceled) {
			t.Error(err)
		}
	}()
	if err := mb2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "run resumed by the next mailbox", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	if d := execLoad(t, r.store, res.DispatchID); d.AttemptCount != 0 {
		t.Fatalf("attempts after the resumed run: %d", d.AttemptCount)
	}
	if runs := next.execRuns(); len(runs) != 1 || runs[0].RunID != res.RunID || runs[0].Attempt != 1 {
		t.Fatalf("resumed attempts %+v", runs)
	}
	if run := execRun(t, r.store, res.RunID); run.Status != engine.RunDone {
		t.Fatalf("resumed run %+v", run)
	}
}

// An agent that obeys the shutdown's cancel and reports a cancelled
// completion does not get its run acked: shutdown is not the user's
// cancel, so the dispatch goes back to the queue without spending an
// attempt. A run that completes on its own during the grace is acked.
func TestExec_stop_with_obedient_agent_requeues_not_acks(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if strings.Contains(string(req.Messages[0].Content), "quick") {
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
		}
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}
	r := newRig(t, newFake(2, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	slow, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-slow", Messages: []engine.Message{userMsg("slow")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
	quick, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-quick", Messages: []engine.Message{userMsg("quick")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "quick run acked", func() bool { return dispatchStatus(t, r.store, quick.DispatchID) == engine.StatusAcked })
	grace, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := r.mb.Stop(grace); err != nil {
		t.Fatal(err)
	}
	if d := execLoad(t, r.store, slow.DispatchID); d.Status != engine.StatusQueued || d.AttemptCount != 0 {
		t.Fatalf("after shutdown the cancelled-by-shutdown dispatch is %+v", d)
	}
	if run := execRun(t, r.store, slow.RunID); run.Status == engine.RunDone {
		t.Fatalf("shutdown finished the run: %+v", run)
	}
}
