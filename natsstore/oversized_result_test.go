package natsstore_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// outcomeAgent is the agent side of the test: every run ends with outcome.
type outcomeAgent struct {
	runs    atomic.Int32
	outcome engine.RunOutcome
}

func (a *outcomeAgent) Capacity() int                    { return 1 }
func (a *outcomeAgent) CapacityChanged() <-chan struct{} { return nil }
func (a *outcomeAgent) Run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	a.runs.Add(1)
	return a.outcome
}

// runOnce starts a mailbox on a NATS store whose server takes messages of
// at most maxPayload bytes, submits one run to agent and waits for its
// dispatch to end, or to execute again. A lease lapses after three
// seconds, so that a run whose settlement the store refused is soon
// reclaimed and executed again (one second was too short for a loaded
// machine: a completion in time lost its lease).
func runOnce(t *testing.T, maxPayload int32, agent *outcomeAgent) (*engine.Dispatch, *engine.RunRecord) {
	t.Helper()
	cfg := freshConfig()
	cfg.URL = natstest.StartWithMaxPayload(t, maxPayload).URL()
	st := openCfg(t, cfg)
	mb, err := engine.New(st, agent, engine.Config{ConsumerID: "big", Lease: 3 * time.Second, RenewInterval: 500 * time.Millisecond,
		SweepInterval: 100 * time.Millisecond, MaxAttempts: 2, RetryDelay: 10 * time.Millisecond, MaxRetryDelay: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = mb.Stop(ctx)
	})
	ctx := context.Background()
	sub, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "big", Messages: []engine.Message{userMsg("go")}})
	if err != nil {
		t.Fatal(err)
	}
	var d *engine.Dispatch
	eventually(t, "the dispatch ended", func() bool {
		d, err = st.LoadDispatch(ctx, sub.DispatchID)
		return err == nil && d != nil && d.Status.Terminal() || agent.runs.Load() > 1
	})
	r, err := st.LoadRun(ctx, sub.RunID)
	if err != nil || r == nil {
		t.Fatalf("load run: %v, %v", r, err)
	}
	if n := agent.runs.Load(); n != 1 {
		t.Fatalf("the run executed %d times; want once (dispatch %v, attempts %d, last error %q)", n, d.Status, d.AttemptCount, d.LastError)
	}
	return d, r
}

// A completed run whose response is over the server's max_payload is
// acked with the response cut, not left claimed: the refused completion
// let its lease lapse, and the run executed again at every attempt, then
// was dead-lettered (found by review).
func TestACompletedRunWhoseResultIsTooLargeIsRecordedCut(t *testing.T) {
	for _, tc := range []struct {
		name       string
		maxPayload int32
		kept       bool // a prefix of the response kept, not the note alone
	}{{"prefix", 1 << 20, true}, {"note", limitedMaxPayload, false}} {
		t.Run(tc.name, func(t *testing.T) {
			response := strings.Repeat("y", 1200<<10)
			agent := &outcomeAgent{outcome: engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone,
				Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: response}}
			d, r := runOnce(t, tc.maxPayload, agent)
			if d.Status != engine.StatusAcked || r.Status != engine.RunDone {
				t.Fatalf("dispatch %v, run %v; want acked and done", d.Status, r.Status)
			}
			var out string
			if err := json.Unmarshal(r.FinalOutput, &out); err != nil {
				t.Fatalf("final output %.80q: %v", r.FinalOutput, err)
			}
			if !strings.HasSuffix(out, "[mailbox-sidecar: the response of 1228800 bytes was cut, too large for the store]") || len(out) > 64<<10 {
				t.Fatalf("final output of %d bytes ends %q; want at most 64 KiB ending with the cut's note", len(out), out[max(len(out)-120, 0):])
			}
			if kept := strings.HasPrefix(out, "yyyy"); kept != tc.kept {
				t.Fatalf("final output starts %.20q; a prefix kept: %v, want %v", out, kept, tc.kept)
			}
			if d.RunResponse != out {
				t.Fatalf("the dispatch's copy of the response (%d bytes) differs from the run's (%d)", len(d.RunResponse), len(out))
			}
		})
	}
}

// A permanent failure whose error text is over the server's max_payload
// is dead-lettered at once, its text cut: the run's record took it whole,
// the dead letter was refused, and the run executed again after its
// lease (found by review).
func TestAFailureWithAnErrorTooLargeIsDeadLetteredOnce(t *testing.T) {
	agent := &outcomeAgent{outcome: engine.RunOutcome{Kind: engine.OutcomePermanent, Error: strings.Repeat("e", 2<<20)}}
	d, r := runOnce(t, 1<<20, agent)
	if d.Status != engine.StatusDeadLetter || r.Status != engine.RunDone {
		t.Fatalf("dispatch %v, run %v; want a dead letter and its run done", d.Status, r.Status)
	}
	if len(d.LastError) > engine.MaxErrorLen || !strings.HasPrefix(d.LastError, "eeee") {
		t.Fatalf("last error of %d bytes starts %.20q; want the text cut to at most %d", len(d.LastError), d.LastError, engine.MaxErrorLen)
	}
}

// A run that ends waiting with a waiting state over the server's
// max_payload (a suspended run's tickets), which no cut of its response
// makes fit, is dead-lettered at once, saying why: the refused
// completion was left to its lease, and the run executed again at every
// attempt before it was dead-lettered.
func TestARunWhoseWaitingStateIsTooLargeIsDeadLetteredOnce(t *testing.T) {
	tickets, _ := json.Marshal([]string{strings.Repeat("t", 1200<<10)})
	agent := &outcomeAgent{outcome: engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunWaiting,
		Termination: &engine.Termination{Type: engine.TermSuspended},
		Waiting:     &engine.RunWaitingState{Reason: "tool_approval", TicketIDs: []string{"c1"}, Tickets: tickets}}}
	d, r := runOnce(t, 1<<20, agent)
	if d.Status != engine.StatusDeadLetter || r.Status != engine.RunDone {
		t.Fatalf("dispatch %v, run %v; want a dead letter and its run done", d.Status, r.Status)
	}
	if !strings.Contains(d.LastError, "too large") || len(d.LastError) > engine.MaxErrorLen {
		t.Fatalf("last error %.200q; want it to say the result was too large", d.LastError)
	}
}

// Messages that fit the server's max_payload one by one but not together
// in one live command to the sidecar that runs the thread are queued for
// a run of their own, once: the send failed as unavailable (503) with the
// messages logged, and each retry logged them again (found by review).
func TestMessagesTooLargeForOneLiveCommandAreQueued(t *testing.T) {
	cfg := freshConfig()
	cfg.URL = natstest.StartWithMaxPayload(t, 1<<20).URL()
	w := newWorld()
	scs := startSidecars(t, w, cfg, 1, 1)
	ctx := context.Background()
	sub, err := scs[0].mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "big", Messages: []engine.Message{userMsg("hold")}})
	if err != nil {
		t.Fatal(err)
	}
	running := w.activeRun(t, "big")
	b := other(scs, running.sidecar)
	eventually(t, "the other sidecar sees the run", func() bool {
		r, err := b.store.LatestRun(ctx, "big")
		return err == nil && r != nil && r.RunID == sub.RunID && r.Status == engine.RunRunning
	})
	before, err := b.store.MessageCount(ctx, "big")
	if err != nil {
		t.Fatal(err)
	}
	pad := strings.Repeat("x", 600<<10)
	res, how, err := b.mb.SendMessages(ctx, engine.SubmitRequest{ThreadID: "big", Messages: []engine.Message{userMsg("p1 " + pad), userMsg("p2 " + pad)}}, "")
	if err != nil {
		t.Fatalf("send through the sidecar not running the thread: %v (unavailable: %v)", err, errors.Is(err, engine.ErrUnavailable))
	}
	if how != engine.DeliveredQueued || res.RunID == sub.RunID {
		t.Fatalf("delivered %q to run %s; want queued for a run of its own (the held run is %s)", how, res.RunID, sub.RunID)
	}
	if after, err := b.store.MessageCount(ctx, "big"); err != nil || after != before+2 {
		t.Fatalf("the log holds %d messages after the send (%v); want %d", after, err, before+2)
	}
	d, err := b.store.LoadDispatch(ctx, res.DispatchID)
	if err != nil || d == nil || d.Status != engine.StatusQueued {
		t.Fatalf("the messages' dispatch: %+v, %v; want it queued behind the held run", d, err)
	}
}
