package engine_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
)

// Dead letters are counted by cause, a user's cancel of a running run and
// an interrupt's as cancelled (not completed), with their durations, and
// a sweep that finds the runs of terminal dispatches settled already
// counts no mark (found by reviews: no dead letter could be counted, a
// cancel and then an interrupt counted as completed, a cancel's duration
// was never recorded, and the mark counters rose at every idle sweep).
func TestMetricsCountDeadLettersCancelsAndRealMarksOnly(t *testing.T) {
	running := map[string]chan struct{}{"cancel": make(chan struct{}), "interrupt": make(chan struct{}), "interrupt-fails": make(chan struct{})}
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		switch req.ThreadID {
		case "permanent":
			return engine.RunOutcome{Kind: engine.OutcomePermanent, Error: "bad input"}
		case "transient":
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "flaky"}
		}
		close(running[req.ThreadID])
		<-ctx.Done()                           // "cancel" and "interrupt…": run until cancelled
		if req.ThreadID == "interrupt-fails" { // an agent that reports its cancel as a failure
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "stopped"}
		}
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}
	r := newRig(t, newFake(4, script), engine.Config{MaxAttempts: 1})
	r.start(t)
	ctx := context.Background()
	ids := map[string]string{}
	for _, thread := range []string{"permanent", "transient", "cancel", "interrupt", "interrupt-fails"} {
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("x")}})
		if err != nil {
			t.Fatal(err)
		}
		ids[thread] = res.DispatchID
	}
	<-running["cancel"] // a cancel before the attempt reaches the agent counts no run
	if ok, err := r.mb.Cancel(ctx, ids["cancel"]); !ok || err != nil {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	for _, thread := range []string{"interrupt", "interrupt-fails"} {
		<-running[thread]
		if _, err := r.mb.Interrupt(ctx, thread); err != nil {
			t.Fatalf("interrupt: %v", err)
		}
	}
	// A killed process's claim whose lapse spends the last attempt.
	now := time.Now().UnixMilli()
	if _, err := r.store.Enqueue(ctx, engine.Dispatch{DispatchID: "lapsed", ThreadID: "lapsed", RunID: "run-lapsed", Priority: engine.DefaultPriority, AvailableAt: now + time.Hour.Milliseconds(), CreatedAt: now, MaxAttempts: 1}); err != nil {
		t.Fatal(err)
	}
	if d, err := r.store.ClaimDispatch(ctx, "lapsed", "killed-process", time.Millisecond, now); err != nil || d == nil {
		t.Fatalf("claim: %v %v", d, err)
	}
	time.Sleep(5 * time.Millisecond)
	r.mb.Sweep(ctx)
	for thread, want := range map[string]engine.DispatchStatus{"permanent": engine.StatusDeadLetter, "transient": engine.StatusDeadLetter, "cancel": engine.StatusAcked, "interrupt": engine.StatusSuperseded, "interrupt-fails": engine.StatusSuperseded} {
		eventually(t, thread+" settled", func() bool { return dispatchStatus(t, r.store, ids[thread]) == want })
	}
	eventually(t, "the cancelled attempt ended", func() bool { return r.mb.InFlight() == 0 })
	if st := dispatchStatus(t, r.store, "lapsed"); st != engine.StatusDeadLetter {
		t.Fatalf("lapsed: %s", st)
	}
	marks := execMetric(r.mb, `mailbox_operations_total{operation="mark_run_dead_letter",result="ok"}`)
	r.mb.Sweep(ctx)
	r.mb.Sweep(ctx)
	for series, want := range map[string]float64{
		`mailbox_dead_letters_total{cause="permanent"}`:                           1,
		`mailbox_dead_letters_total{cause="attempts_spent"}`:                      1,
		`mailbox_dead_letters_total{cause="lease_expired"}`:                       1,
		`mailbox_runs_total{outcome="cancelled"}`:                                 3,
		`mailbox_runs_total{outcome="transient_error"}`:                           1,
		`mailbox_runs_total{outcome="completed"}`:                                 0,
		`mailbox_run_duration_seconds_count{outcome="cancelled"}`:                 3,
		`mailbox_dispatch_runtime_seconds_count{outcome="cancelled"}`:             3,
		`mailbox_dispatch_enqueue_to_complete_seconds_count{outcome="cancelled"}`: 3,
		`mailbox_operations_total{operation="mark_run_dead_letter",result="ok"}`:  marks,
	} {
		if got := execMetric(r.mb, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
}

// A drain says what it waits for and what it puts back (found by review:
// a SIGTERM logged nothing for its whole grace).
func TestStopLogsItsDrain(t *testing.T) {
	var logs syncbuf.Buffer
	block := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "cancelled"}
	}
	r := newRig(t, newFake(1, block), engine.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "running", func() bool {
		return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusClaimed && r.mb.InFlight() == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := r.mb.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	out := logs.String()
	for _, want := range []string{
		`msg="stopping: waiting for the running attempts" running=1 grace=`,
		`msg="stopping: the grace is over; cancelling the attempts still running (they go back to the queue unless they complete)" running=1`,
		`msg=stopped put_back=1 took=`,
		// Which run went back: its own line, with its ids.
		`msg="run put back in the queue without spending an attempt" thread_id=t1 run_id=` + res.RunID + ` dispatch_id=` + res.DispatchID,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the log lacks %s:\n%s", want, out)
		}
	}
}
