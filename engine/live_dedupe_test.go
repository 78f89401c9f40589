package engine_test

import (
	"context"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A live-then-queue submit repeated with its dedupe key (the HTTP API's
// Idempotency-Key) appends its messages once: a repeat of one the running
// attempt took live answers that attempt, and a repeat of one that was
// queued answers the queued dispatch (found by review: every repeat
// appended the messages again, and each later run saw them twice).
func TestARepeatedLiveSubmitWithADedupeKeyIsLoggedOnce(t *testing.T) {
	releaseFirst := make(chan struct{})
	releaseBlock := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		switch string(req.Messages[0].Content) {
		case `"first"`:
			for {
				select {
				case c := <-req.Commands:
					c.Reply <- nil // takes every message live
				case <-releaseFirst:
					return complete(ctx, req, sink)
				}
			}
		case `"block"`:
			<-releaseBlock
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	t.Cleanup(func() { // before the rig stops: a failed check must not leave a run blocked
		for _, ch := range []chan struct{}{releaseFirst, releaseBlock} {
			select {
			case <-ch:
			default:
				close(ch)
			}
		}
	})
	ctx := context.Background()
	count := func(thread string) int {
		t.Helper()
		msgs, err := r.store.LoadMessages(ctx, thread)
		if err != nil {
			t.Fatal(err)
		}
		return len(msgs)
	}

	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("first")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "first run claimed", func() bool { return dispatchStatus(t, r.store, first.DispatchID) == engine.StatusClaimed })
	live := engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("steer")}, DedupeKey: "k-live"}
	for i := range 3 {
		res, how, err := r.mb.SendMessages(ctx, live, "")
		if err != nil || how != engine.DeliveredLive || res.DispatchID != first.DispatchID || res.Status != engine.SubmitRunning {
			t.Fatalf("live send %d: %+v %s %v", i, res, how, err)
		}
	}
	if n := count("t1"); n != 2 {
		t.Fatalf("t1 has %d messages after three sends with one key, want 2", n)
	}
	close(releaseFirst)
	eventually(t, "first acked", func() bool { return dispatchStatus(t, r.store, first.DispatchID) == engine.StatusAcked })

	// The one slot busy with another thread: the messages are queued.
	block, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t2", Messages: []engine.Message{userMsg("block")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "block claimed", func() bool { return dispatchStatus(t, r.store, block.DispatchID) == engine.StatusClaimed })
	queued := engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("later")}, DedupeKey: "k-queued"}
	res, how, err := r.mb.SendMessages(ctx, queued, "")
	if err != nil || how != engine.DeliveredQueued {
		t.Fatalf("queued send: %+v %s %v", res, how, err)
	}
	again, how, err := r.mb.SendMessages(ctx, queued, "")
	if err != nil || how != engine.DeliveredQueued || again.DispatchID != res.DispatchID || again.RunID != res.RunID {
		t.Fatalf("repeat of a queued send: %+v %s %v, want dispatch %s", again, how, err, res.DispatchID)
	}
	if n := count("t1"); n != 3 {
		t.Fatalf("t1 has %d messages after two sends with one key, want 3", n)
	}
	close(releaseBlock)
	eventually(t, "queued run acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	last := r.exec.runs[len(r.exec.runs)-1]
	if len(last.Messages) != 1 || string(last.Messages[0].Content) != `"later"` {
		t.Fatalf("the queued run activated %+v, want the one message", last.Messages)
	}
}
