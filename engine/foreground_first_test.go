package engine_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A foreground submit that finds no free slot runs at the next free slot,
// before the background work of other threads queued before it (found
// by an overload review: it waited behind the whole backlog, 100 s
// behind 400 runs on a one-slot agent).
func TestAForegroundSubmitRunsBeforeTheBackgroundBacklog(t *testing.T) {
	_, exec, _ := foregroundBehindABacklog(t)
	eventually(t, "everything ran", func() bool { return len(exec.execRuns()) == backlog+1 })
	for i, run := range exec.execRuns() {
		if run.ThreadID == "fg" {
			// The run executing when it came, and at most one more whose
			// claim was already under way.
			if i > 2 {
				t.Fatalf("the foreground run was run %d of %d: it waited behind the background backlog", i+1, backlog+1)
			}
			return
		}
	}
	t.Fatal("the foreground run never ran")
}

// A foreground submit cancelled while it waited for a slot gives up its
// thread's priority: background work submitted to that thread afterwards
// waits its turn behind the older backlog (found by review: it went
// second of 21).
func TestACancelledForegroundSubmitLeavesNoPriorityBehind(t *testing.T) {
	r, exec, res := foregroundBehindABacklog(t)
	ctx := context.Background()
	if ok, err := r.mb.Cancel(ctx, res.DispatchID); err != nil || !ok {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	// Background work on that thread, after the whole backlog.
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "fg", Messages: []engine.Message{userMsg("later")}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "everything ran", func() bool { return len(exec.execRuns()) == backlog+1 })
	for i, run := range exec.execRuns() {
		if run.ThreadID == "fg" {
			if i < backlog/2 {
				t.Fatalf("the background run of the cancelled foreground submit's thread ran %d of %d: before the older backlog", i+1, backlog+1)
			}
			return
		}
	}
}

// backlog is how many background runs of other threads
// foregroundBehindABacklog queues.
const backlog = 20

// foregroundBehindABacklog starts a one-slot agent whose runs take 20 ms,
// queues backlog background runs on as many threads and, once the first
// runs, a foreground submit to thread fg, which finds no slot: the first
// run holds it until the submit is made (with 20 ms alone, a slow machine
// ended the first run before the submit, which then found the slot free).
func foregroundBehindABacklog(t *testing.T) (*rig, *fakeExecutor, engine.SubmitResult) {
	t.Helper()
	gate := make(chan struct{})
	var open sync.Once
	release := func() { open.Do(func() { close(gate) }) }
	t.Cleanup(release)
	exec := newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-gate:
		case <-ctx.Done():
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
		}
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	})
	r := newRig(t, exec, engine.Config{})
	r.start(t)
	ctx := context.Background()
	for i := range backlog {
		if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprint("bg", i), Messages: []engine.Message{userMsg("x")}}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the backlog started", func() bool { return len(exec.execRuns()) >= 1 })
	res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "fg", Messages: []engine.Message{userMsg("now")}})
	release()
	if err != nil || res.Status != engine.SubmitQueued {
		t.Fatalf("foreground submit: %+v %v, want queued (the one slot is taken)", res, err)
	}
	return r, exec, res
}
