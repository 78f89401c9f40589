package engine_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A run that shutdown cancels goes back to the queue and runs again after
// the restart. Its stream ends with the sidecar's "interrupted"
// run_finish, not the agent's "cancelled" one, which told the client the
// run was over (found by review); an agent that completes the run on its
// own at shutdown keeps its word.
func TestAShutdownCancelsNoStreamAsCancelled(t *testing.T) {
	for _, finishes := range []bool{false, true} {
		name := map[bool]string{false: "obeys the cancel", true: "completes on its own"}[finishes]
		t.Run(name, func(t *testing.T) {
			script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
				sink.Emit([]byte(`{"type":"text_delta","delta":"working"}`))
				<-ctx.Done()
				if finishes {
					sink.Emit([]byte(`{"type":"run_finish","termination":{"type":"natural_end"},"by":"the agent"}`))
					return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
				}
				sink.Emit([]byte(`{"type":"run_finish","termination":{"type":"cancelled"}}`))
				return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
			}
			r := newRig(t, newFake(1, script), engine.Config{})
			r.start(t)
			ctx := context.Background()
			res, log, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "the agent's first event", func() bool { evs, _ := readAll(log, 0); return len(evs) > 0 })
			grace, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			defer cancel()
			if err := r.mb.Stop(grace); err != nil {
				t.Fatal(err)
			}
			evs, _ := readAll(log, 0)
			var seen []string
			for _, e := range evs {
				if e.Type == "run_finish" {
					seen = append(seen, string(e.Data))
				}
			}
			d, _ := r.store.LoadDispatch(ctx, res.DispatchID)
			if finishes {
				if len(seen) != 1 || !strings.Contains(seen[0], `"by":"the agent"`) || d.Status != engine.StatusAcked {
					t.Fatalf("run_finish events %v, dispatch %v: want the agent's own, byte for byte, acked", seen, d.Status)
				}
				return
			}
			if len(seen) != 1 || strings.Contains(seen[0], "cancelled") || !strings.Contains(seen[0], "interrupted") {
				t.Fatalf("run_finish events %v: want one, the sidecar's interrupted, not the agent's cancelled", seen)
			}
			if d.Status != engine.StatusQueued || d.AttemptCount != 0 {
				t.Fatalf("after shutdown the dispatch is %v (attempts %d), want queued again", d.Status, d.AttemptCount)
			}
		})
	}
}
