package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// awaitCommand is a script whose runs wait for one live command, accept
// it (it is passed to got) and complete; cancelled, they end cancelled.
func awaitCommand(got chan<- engine.Command) func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
	return func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case c := <-req.Commands:
			got <- c
			c.Reply <- nil
		case <-ctx.Done():
			return execCancelled()
		}
		return complete(ctx, req, sink)
	}
}

// heldClaim starts a rig whose thread has one background dispatch
// (dispatch-held of run-held) whose claim has committed but is held
// before the engine turns it into an execution, until release is called
// (at the latest before the rig stops).
func heldClaim(t *testing.T, thread string, script func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome) (r *rig, release func()) {
	t.Helper()
	var hold <-chan struct{}
	var once atomic.Bool
	claimed := make(chan struct{})
	r, _ = newExecRig(t, newFake(1, script), engine.Config{CancelWait: 5 * time.Second}, func(fs *execFaultStore) {
		fs.afterClaim = func(*engine.Dispatch) {
			if once.CompareAndSwap(false, true) {
				close(claimed)
				<-hold
			}
		}
	})
	hold, release = execRelease(t) // after the rig: released before its Stop
	r.start(t)
	submitted := make(chan error, 1)
	go func() {
		_, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{
			ThreadID: thread, RunIDHint: "run-held", DispatchIDHint: "dispatch-held", Messages: []engine.Message{userMsg("first")},
		})
		submitted <- err
	}()
	t.Cleanup(func() {
		release()
		if err := <-submitted; err != nil {
			t.Errorf("background submit: %v", err)
		}
	})
	select {
	case <-claimed:
	case <-time.After(5 * time.Second):
		t.Fatal("the dispatch was never claimed")
	}
	return r, release
}

// answeredWhileHeld waits for done's answer: at once if it comes while
// the claim or hand-over is still held (it cannot then have reached the
// run), else after releasing it.
func answeredWhileHeld[T any](done <-chan T, release func()) T {
	select {
	case got := <-done:
		release()
		return got
	case <-time.After(100 * time.Millisecond):
		release()
		return <-done
	}
}

type sendResult struct {
	res      engine.SubmitResult
	delivery engine.LiveDelivery
	err      error
}

// checkDeliveredLive checks that the live message reached the run being
// started, not a fallback run.
func checkDeliveredLive(t *testing.T, got sendResult, wantRun string, cmds <-chan engine.Command) {
	t.Helper()
	if got.err != nil || got.delivery != engine.DeliveredLive || got.res.RunID != wantRun || got.res.Status != engine.SubmitRunning {
		t.Fatalf("messages sent while the thread's run was being started: %+v %s %v; want delivered live to %s", got.res, got.delivery, got.err, wantRun)
	}
	select {
	case c := <-cmds:
		if c.Kind != engine.CommandMessages || len(c.Messages) != 1 || execText(c.Messages[0].Message) != "live" {
			t.Fatalf("the run received %+v, want the live message", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the run never received the live message")
	}
}

// Live messages sent while the thread's run is being claimed here wait
// for the claim and reach that run, instead of falling back to a queued
// run that would start only after it (they used to find only the claim
// placeholder and be queued).
func TestSendMessagesWaitsForAClaimInFlight(t *testing.T) {
	const thread = "claim-in-flight"
	cmds := make(chan engine.Command, 4)
	r, release := heldClaim(t, thread, awaitCommand(cmds))
	done := make(chan sendResult, 1)
	go func() {
		res, delivery, err := r.mb.SendMessages(context.Background(), engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("live")}}, "")
		done <- sendResult{res, delivery, err}
	}()
	eventually(t, "the live message logged", func() bool {
		n, _ := r.store.MessageCount(context.Background(), thread)
		return n == 2
	})
	got := answeredWhileHeld(done, release)
	checkDeliveredLive(t, got, "run-held", cmds)
	if ds, _ := r.store.ListDispatches(context.Background(), thread, nil, 0, 0); len(ds) != 1 {
		t.Fatalf("%d dispatches on the thread, want only the held one", len(ds))
	}
	eventually(t, "the held run acked", func() bool { return dispatchStatus(t, r.store, "dispatch-held") == engine.StatusAcked })
}

// Live messages sent while a finishing attempt hands the thread over to
// its next dispatch (claimed with its completion) reach the run that
// comes out of the hand-over (they used to be offered to the finished
// attempt, which never answers, and then queued).
func TestSendMessagesWaitsForAHandOff(t *testing.T) {
	const thread = "handoff-live"
	cmds := make(chan engine.Command, 4)
	second := awaitCommand(cmds)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if execText(req.Messages[0]) == "second" {
			return second(ctx, req, sink)
		}
		return complete(ctx, req, sink)
	}
	r, _, next, release := heldHandOff(t, thread, script)
	done := make(chan sendResult, 1)
	go func() {
		res, delivery, err := r.mb.SendMessages(context.Background(), engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("live")}}, "")
		done <- sendResult{res, delivery, err}
	}()
	eventually(t, "the live message logged", func() bool {
		n, _ := r.store.MessageCount(context.Background(), thread)
		return n == 3
	})
	got := answeredWhileHeld(done, release)
	checkDeliveredLive(t, got, next.RunID, cmds)
	if ds, _ := r.store.ListDispatches(context.Background(), thread, nil, 0, 0); len(ds) != 2 {
		t.Fatalf("%d dispatches on the thread, want the two submitted", len(ds))
	}
	eventually(t, "the handed-over run acked", func() bool { return dispatchStatus(t, r.store, next.DispatchID) == engine.StatusAcked })
}

// A decision sent (by run id, dispatch id or thread id) while the run's
// dispatch is being claimed here waits for the claim and reaches the run
// (it used to find only the claim placeholder and report not delivered).
func TestSendDecisionWaitsForAClaimInFlight(t *testing.T) {
	for _, by := range []string{"run", "dispatch", "thread"} {
		t.Run(by, func(t *testing.T) {
			thread := "decision-in-flight-" + by
			id := map[string]string{"run": "run-held", "dispatch": "dispatch-held", "thread": thread}[by]
			cmds := make(chan engine.Command, 4)
			r, release := heldClaim(t, thread, awaitCommand(cmds))
			dec := engine.Decision{CallID: "call-1", Resume: json.RawMessage(`{"action":"resume"}`)}
			type result struct {
				ok  bool
				err error
			}
			done := make(chan result, 1)
			go func() {
				ok, err := r.mb.SendDecision(context.Background(), id, dec)
				done <- result{ok, err}
			}()
			got := answeredWhileHeld(done, release)
			if got.err != nil || !got.ok {
				t.Fatalf("decision sent while the run was being claimed: %v %v, want delivered", got.ok, got.err)
			}
			select {
			case c := <-cmds:
				if c.Kind != engine.CommandDecision || len(c.Decisions) != 1 || c.Decisions[0].CallID != "call-1" {
					t.Fatalf("the run received %+v, want the decision", c)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the run never received the decision")
			}
			eventually(t, "the held run acked", func() bool { return dispatchStatus(t, r.store, "dispatch-held") == engine.StatusAcked })
		})
	}
}

// A submit naming a run whose dispatch is claimed but has not started
// (the claim is in flight here) is refused as for a queued one: the
// attempt about to start would otherwise rebuild its request from the
// rewritten run and execute the later request instead of its own.
func TestHintNamingARunBeingClaimedIsRefused(t *testing.T) {
	const thread = "hint-claimed"
	var ran sync.Map
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		ran.Store(execText(req.Messages[len(req.Messages)-1]), true)
		return complete(ctx, req, sink)
	}
	r, release := heldClaim(t, thread, script)
	_, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: thread, ContinueRunID: "run-held", Messages: []engine.Message{userMsg("late")}})
	if !errors.Is(err, engine.ErrValidation) || !strings.Contains(err.Error(), "run_id 'run-held' is not open for dispatch") {
		t.Fatalf("continue_run_id naming a run being claimed: %v, want the seed's validation error", err)
	}
	release()
	eventually(t, "the held run acked", func() bool { return dispatchStatus(t, r.store, "dispatch-held") == engine.StatusAcked })
	if _, ok := ran.Load("first"); !ok {
		t.Fatal("the held dispatch did not run its own request")
	}
	if _, ok := ran.Load("late"); ok {
		t.Fatal("the refused request ran")
	}
}

// Messages sent live-then-queue with decisions are not offered to the
// running attempt, whose live offer carries messages only: they queue a
// run that carries both (found by review: answered "live", the decisions
// were dropped).
func TestSendMessagesWithDecisionsQueuesThem(t *testing.T) {
	const thread = "with-decisions"
	release := make(chan struct{})
	cmds := make(chan engine.Command, 4)
	second := make(chan []engine.Decision, 1)
	var runs atomic.Int32
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if runs.Add(1) == 1 {
			for {
				select {
				case c := <-req.Commands: // taken: it would be answered live
					cmds <- c
					c.Reply <- nil
					continue
				case <-release:
				case <-ctx.Done():
				}
				break
			}
		} else {
			second <- req.Decisions
		}
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone}
	}
	r := newRig(t, newFake(2, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("first")}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first run executing", func() bool { return runs.Load() == 1 })
	resume := json.RawMessage(`{"approved":true}`)
	res, delivery, err := r.mb.SendMessages(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("and this")},
		Decisions: []engine.Decision{{CallID: "c9", Resume: resume}}}, "")
	if err != nil || delivery != engine.DeliveredQueued || res.Status != engine.SubmitQueued {
		t.Fatalf("send: %+v %s %v, want queued", res, delivery, err)
	}
	select {
	case c := <-cmds:
		t.Fatalf("the running attempt was offered %+v", c)
	default:
	}
	close(release)
	select {
	case ds := <-second:
		if len(ds) != 1 || ds[0].CallID != "c9" || string(ds[0].Resume) != string(resume) {
			t.Fatalf("the queued run got decisions %+v", ds)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the queued run never ran")
	}
}
