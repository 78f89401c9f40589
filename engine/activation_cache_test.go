package engine_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// countLoadMessage counts the store's point reads of messages by id.
type countLoadMessage struct {
	*badgerstore.Store
	n atomic.Int32
}

func (c *countLoadMessage) LoadMessage(ctx context.Context, thread, id string) (*engine.MessageRecord, error) {
	c.n.Add(1)
	return c.Store.LoadMessage(ctx, thread, id)
}

// A backlog of background runs on one thread, longer than the context
// window: each run's activation message is older than the thread's cached
// tail when it runs, yet none is read back from the store (the engine
// kept what the submits appended), and every run got its own message.
func TestBacklogActivationsAreNotReadBack(t *testing.T) {
	w := &countLoadMessage{}
	var got []string
	exec := newFake(0, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		for _, m := range req.Messages {
			got = append(got, string(m.Content))
		}
		return complete(ctx, req, sink)
	})
	r := newRigWith(t, exec, engine.Config{ContextMessages: 5}, func(s *badgerstore.Store) engine.Store { w.Store = s; return w })
	r.start(t)
	ctx := context.Background()
	var want []string
	var last string
	for i := range 30 {
		msg := userMsg(string(rune('a'+i%26)) + string(rune('0'+i/26)))
		want = append(want, string(msg.Content))
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{msg}})
		if err != nil {
			t.Fatal(err)
		}
		last = res.DispatchID
	}
	r.exec.setCapacity(1)
	eventually(t, "backlog done", func() bool { return execLoad(t, r.store, last).Status == engine.StatusAcked })
	if n := w.n.Load(); n != 0 {
		t.Fatalf("%d activation messages read back from the store, want 0", n)
	}
	if len(got) != len(want) {
		t.Fatalf("runs got %d activation messages, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("run %d got %s, want %s", i, got[i], want[i])
		}
	}
}
