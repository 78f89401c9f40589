package engine_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Concurrent foreground submits to one thread behave as if they came one
// after another: each is taken (its message logged, its dispatch and run
// made) and either runs or is superseded by a later one, whose stream
// ends with run_finish cancelled. Found by review: one that lost the race
// for the thread's inline claim answered 409 conflict, the HTTP API's
// "nothing written", yet its message stayed in the thread's log (the next
// run saw text its client was told had failed) and its run and dispatch
// stayed as cancelled records; a retry then failed for good with
// "message already exists".
func TestConcurrentForegroundSubmitsAreEachTakenOrSuperseded(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-ctx.Done():
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
		case <-time.After(5 * time.Millisecond):
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(4, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	const rounds, callers = 20, 6
	superseded := 0
	defer func() {
		t.Logf("%d of %d submits lost the race for the thread and were superseded", superseded, rounds*callers)
	}()
	for round := range rounds {
		thread := fmt.Sprint("race-", round)
		type answer struct {
			res    engine.SubmitResult
			events *engine.EventLog
			err    error
		}
		answers := make([]answer, callers)
		var wg sync.WaitGroup
		for g := range callers {
			wg.Go(func() {
				res, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{{ID: fmt.Sprint("m-", g), Role: "user", Content: []byte(`"hi"`)}}})
				answers[g] = answer{res, events, err}
			})
		}
		wg.Wait()
		msgs, err := r.store.LoadMessages(ctx, thread)
		if err != nil {
			t.Fatal(err)
		}
		logged := map[string]bool{}
		for _, m := range msgs {
			logged[m.Message.ID] = true
		}
		for g, a := range answers {
			id := fmt.Sprint("m-", g)
			switch {
			case a.err != nil && logged[id]:
				t.Fatalf("round %d: submit %d failed (%v) but its message is in the log", round, g, a.err)
			case a.err != nil && !errors.Is(a.err, engine.ErrVersionConflict):
				t.Fatalf("round %d: submit %d: %v", round, g, a.err)
			case a.err == nil && !logged[id]:
				t.Fatalf("round %d: submit %d answered %+v but its message is not in the log", round, g, a.res)
			case a.err == nil:
				// Its stream ends: it ran, or was superseded.
				if a.events == nil {
					t.Fatalf("round %d: submit %d answered %+v without events", round, g, a.res)
				}
				last := waitClosed(t, a.events)
				if a.res.Status == engine.SubmitCancelled {
					superseded++
					d, err := r.store.LoadDispatch(ctx, a.res.DispatchID)
					if err != nil || d == nil || !d.Status.Terminal() || last != "run_finish" {
						t.Fatalf("round %d: submit %d answered cancelled; its dispatch %+v (%v), its stream's last event %q", round, g, d, err, last)
					}
				}
			}
		}
	}
}

// waitClosed reads an event log until it is closed and returns the type
// of its last event.
func waitClosed(t *testing.T, l *engine.EventLog) string {
	t.Helper()
	var after uint64
	last := ""
	eventually(t, "the stream ends", func() bool {
		evs, _, closed, _ := l.Read(after, 1<<20, nil)
		if len(evs) > 0 {
			after, last = evs[len(evs)-1].Seq, evs[len(evs)-1].Type
		}
		return closed
	})
	return last
}
