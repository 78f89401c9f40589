package engine_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// refuseFull is a slottedFake script: a run for agent "full" is refused
// (its agent has no free slot), any other completes, except that fail
// (when set) decides first whether to fail it permanently.
func refuseFull(refused *atomic.Int32, fail func(*engine.RunRequest) bool) func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
	return func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		switch {
		case req.AgentID == "full":
			refused.Add(1)
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentBusy, Error: "full"}
		case fail != nil && fail(req):
			return engine.RunOutcome{Kind: engine.OutcomePermanent, Error: "bad request"}
		}
		return complete(ctx, req, sink)
	}
}

// A requeued dead letter is new work in its thread's queue, ahead of the
// dispatch the thread is held for (a higher priority) and for an agent
// that is here: the requeue ends the hold, as a submit does. It waited
// for the full agent's slot, up to a minute (found by review).
func TestARequeueEndsItsThreadsHold(t *testing.T) {
	var refused atomic.Int32
	var failed atomic.Bool
	exec := slottedFake{newFake(3, refuseFull(&refused, func(*engine.RunRequest) bool { return !failed.Swap(true) }))}
	s, mb := startedOn(t, exec, engine.Config{}, nil, 5*time.Second)
	ctx := context.Background()
	x := submitFor(t, mb, "t", "writer", true, "x")
	eventually(t, "the writer's run dead-lettered", func() bool { return dispatchStatus(t, s, x.DispatchID) == engine.StatusDeadLetter })
	a := submitFor(t, mb, "t", "full", false, "a")
	eventually(t, "the full agent's run refused and released", func() bool {
		return refused.Load() >= 1 && dispatchStatus(t, s, a.DispatchID) == engine.StatusQueued
	})
	again, err := mb.Requeue(ctx, x.DispatchID)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the requeued run done", func() bool { return dispatchStatus(t, s, again.DispatchID) == engine.StatusAcked })
	// Once the hold is ended, the full agent's run is tried once more after
	// the requeued one, and is held again: not a spin.
	if n := refused.Load(); n > 2 {
		t.Fatalf("the full agent's run was refused %d times; want at most 2", n)
	}
}

// submitFor submits text to thread for agent, at priority first when
// first is set, and fails the test if the submit does.
func submitFor(t *testing.T, mb *engine.Mailbox, thread, agent string, first bool, text string) engine.SubmitResult {
	t.Helper()
	req := engine.SubmitRequest{ThreadID: thread, AgentID: agent, Messages: []engine.Message{userMsg(text)}}
	if first {
		req.Priority = new(uint8)
	}
	res, err := mb.SubmitBackground(context.Background(), req)
	if err != nil {
		t.Fatalf("submit to %s: %v", thread, err)
	}
	return res
}

// releaseGate is a store whose Release of one dispatch waits for the test.
type releaseGate struct {
	*badgerstore.Store
	id        atomic.Value // string: the dispatch whose release waits
	releasing chan struct{}
	proceed   chan struct{}
	once      sync.Once
}

func (g *releaseGate) Release(ctx context.Context, id, token string, now int64) (engine.Dispatch, error) {
	if want, _ := g.id.Load().(string); want == id {
		g.once.Do(func() { close(g.releasing); <-g.proceed })
	}
	return g.Store.Release(ctx, id, token, now)
}

// A cancel of a refused attempt whose claim is not yet released (the
// hold it set is) ends that hold: the thread's queue changed, and the
// work behind the cancelled dispatch, for an agent that is here, waited
// for the full agent's slot, up to a minute (found by review).
func TestACancelOfARefusedAttemptEndsItsHold(t *testing.T) {
	var refused atomic.Int32
	blocker, unblock := make(chan struct{}), make(chan struct{})
	exec := slottedFake{newFake(1, refuseFull(&refused, nil))}
	inner := exec.script
	exec.script = func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.ThreadID == "other" {
			close(blocker)
			<-unblock // holds the engine's one slot while t's queue fills
		}
		return inner(ctx, req, sink)
	}
	gate := &releaseGate{releasing: make(chan struct{}), proceed: make(chan struct{})}
	gate.id.Store("")
	s, mb := startedOn(t, exec, engine.Config{}, func(s *badgerstore.Store) engine.Store { gate.Store = s; return gate }, 5*time.Second)
	submitFor(t, mb, "other", "writer", false, "o")
	<-blocker
	a := submitFor(t, mb, "t", "full", true, "a")
	gate.id.Store(a.DispatchID)
	b := submitFor(t, mb, "t", "writer", false, "b")
	close(unblock)
	<-gate.releasing // a refused, its hold set, its claim not yet released
	ok, err := mb.Cancel(context.Background(), a.DispatchID)
	if err != nil || !ok {
		t.Fatalf("cancel of the refused attempt: %v, %v; want true", ok, err)
	}
	close(gate.proceed)
	eventually(t, "the writer's run behind it done", func() bool { return dispatchStatus(t, s, b.DispatchID) == engine.StatusAcked })
	if st := dispatchStatus(t, s, a.DispatchID); st == engine.StatusQueued || st == engine.StatusClaimed {
		t.Fatalf("the cancelled dispatch is %v; want it finished", st)
	}
}

// A submit for an agent whose slots are all taken, while another agent
// has free ones, is answered queued, not running: its inline claim was
// refused at once (found by review; http.md: a run that finds no free
// agent slot stays queued, and the submitted event says so). It runs
// once the dispatcher finds that agent a slot.
func TestASubmitForAFullAgentIsAnsweredQueued(t *testing.T) {
	var refused atomic.Int32
	exec := slottedFake{newFake(3, refuseFull(&refused, nil))}
	s, mb := startedOn(t, exec, engine.Config{}, nil, 5*time.Second)
	ctx := context.Background()
	bg := submitFor(t, mb, "bg", "full", false, "a")
	if bg.Status != engine.SubmitQueued {
		t.Fatalf("background submit for a full agent answered %q, want queued", bg.Status)
	}
	fg, events, err := mb.Submit(ctx, engine.SubmitRequest{ThreadID: "fg", AgentID: "full", Messages: []engine.Message{userMsg("b")}})
	if err != nil || events == nil {
		t.Fatalf("foreground submit: %v", err)
	}
	if fg.Status != engine.SubmitQueued {
		t.Fatalf("foreground submit for a full agent answered %q, want queued", fg.Status)
	}
	// Work for an agent with a free slot still runs at once (its answer
	// may say queued when the dispatcher claimed it first).
	w := submitFor(t, mb, "w", "writer", false, "c")
	eventually(t, "the writer's run done", func() bool { return dispatchStatus(t, s, w.DispatchID) == engine.StatusAcked })
}
