package engine_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A thread with new work does not wait for another thread's whole
// backlog: once a run ends, its thread goes behind the threads already
// waiting (round-robin), not ahead of them by the age of its oldest
// queued work (found by review: with one slot a lone thread ran after all
// 200 runs queued on a busy thread before it).
func TestALoneThreadDoesNotWaitForAnotherThreadsBacklog(t *testing.T) {
	var mu sync.Mutex
	var order []string
	gate := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-gate
		mu.Lock()
		order = append(order, req.ThreadID)
		mu.Unlock()
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	const backlog = 40
	for i := range backlog {
		if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "busy", Messages: []engine.Message{userMsg(fmt.Sprint(i))}}); err != nil {
			t.Fatal(err)
		}
	}
	lone, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "lone", Messages: []engine.Message{userMsg("me too")}})
	if err != nil {
		t.Fatal(err)
	}
	close(gate)
	eventually(t, "the lone thread ran", func() bool { return dispatchStatus(t, r.store, lone.DispatchID) == engine.StatusAcked })
	mu.Lock()
	defer mu.Unlock()
	at := -1
	for i, th := range order {
		if th == "lone" {
			at = i
			break
		}
	}
	// Once the dispatcher has seen the lone thread waiting (a moment after
	// its submit: until then finishing runs claim their own thread's
	// next), it is next; not after the whole backlog.
	if at < 0 || at >= backlog/2 {
		t.Fatalf("the lone thread ran as run %d of %v, want well before the backlog's end", at+1, order)
	}
}
