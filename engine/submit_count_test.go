package engine_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// countStore counts message-count reads; with skew set, the thread
// projections it returns claim that many more messages than the log has
// (a projection gone stale behind another process's append).
type countStore struct {
	*badgerstore.Store
	countReads atomic.Int64
	skew       atomic.Uint64
}

func (s *countStore) MessageCount(ctx context.Context, thread string) (uint64, error) {
	s.countReads.Add(1)
	return s.Store.MessageCount(ctx, thread)
}

func (s *countStore) LoadThread(ctx context.Context, thread string) (*engine.Thread, error) {
	t, err := s.Store.LoadThread(ctx, thread)
	if t != nil {
		t.MessageCount += s.skew.Load()
	}
	return t, err
}

// A submit takes the thread's message count from the projection it reads
// anyway (no separate read); when that count is stale, the guarded append
// refuses it and the retry reads the count afresh.
func TestSubmitTakesTheMessageCountFromTheProjection(t *testing.T) {
	cs := &countStore{}
	// No agent slot: nothing executes, so only the submits read.
	r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		cs.Store = s
		return cs
	})
	ctx := context.Background()
	submit := func() {
		t.Helper()
		if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("x")}}); err != nil {
			t.Fatal(err)
		}
	}
	submit() // a new thread: no projection, no messages
	submit() // the projection says 1
	if n := cs.countReads.Load(); n != 0 {
		t.Fatalf("%d message-count reads for two submits, want 0", n)
	}
	cs.skew.Store(3)
	submit()
	if n := cs.countReads.Load(); n != 1 {
		t.Fatalf("%d message-count reads after a stale projection, want 1 (the retry)", n)
	}
	msgs, err := r.store.LoadMessages(ctx, "t")
	if err != nil || len(msgs) != 3 {
		t.Fatalf("log %v %v, want 3 messages", msgs, err)
	}
	for i, m := range msgs {
		if m.Seq != uint64(i+1) {
			t.Fatalf("message %d has seq %d", i, m.Seq)
		}
	}
}
