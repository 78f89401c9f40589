package engine_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// stopping is a rig whose scripted agent takes its time to stop: the
// first run, once cancelled, returns (cancelled) only when release is
// called; later runs complete at once. It is the window in which a cancel
// or an interrupt has settled a claim while its attempt still executes.
type stopping struct {
	*rig
	exec    *fakeExecutor
	release func()
	res     engine.SubmitResult // the background run on thread "t", executing
}

// startStopping starts such a rig with capacity agent slots and submits
// the first run (thread "t"); it returns once the agent has it.
func startStopping(t *testing.T, capacity int, cfg engine.Config) *stopping {
	t.Helper()
	gate := make(chan struct{})
	started := make(chan struct{}, 1)
	var n atomic.Int32
	exec := newFake(capacity, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if n.Add(1) > 1 {
			return complete(ctx, req, sink)
		}
		started <- struct{}{}
		<-ctx.Done()
		<-gate
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	})
	r := newRig(t, exec, cfg)
	var once sync.Once
	s := &stopping{rig: r, exec: exec, release: func() { once.Do(func() { close(gate) }) }}
	t.Cleanup(s.release) // before the rig stops (cleanups run last-in first-out)
	r.start(t)
	var err error
	if s.res, err = r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("a")}}); err != nil {
		t.Fatal(err)
	}
	<-started
	return s
}
