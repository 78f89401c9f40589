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
	countReads  atomic.Int64
	latestReads atomic.Int64
	skew        atomic.Uint64
}

func (s *countStore) LatestRun(ctx context.Context, thread string) (*engine.RunRecord, error) {
	s.latestReads.Add(1)
	return s.Store.LatestRun(ctx, thread)
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

// newCountRig is a mailbox on a countStore with no agent slot: nothing
// executes (an execution reads the thread's latest run and messages for
// the RUN), so only the submits read.
func newCountRig(t *testing.T) (*countStore, *rig) {
	cs := &countStore{}
	r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		cs.Store = s
		return cs
	})
	return cs, r
}

// A submit takes the thread's message count from the projection it reads
// anyway (no separate read); when that count is stale, the guarded append
// refuses it and the retry reads the count afresh.
func TestSubmitTakesTheMessageCountFromTheProjection(t *testing.T) {
	cs, r := newCountRig(t)
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

// A submit to a thread without a projection (a new thread) does not walk
// the run index for the thread's latest run: a thread with a run has a
// projection (Store.LoadThread). It read it twice: once to look for a
// waiting run, and again, having found none, to prepare the new one. A
// submit to a thread with runs reads it once, and the new run inherits
// from it (its agent).
func TestSubmitReadsTheLatestRunOnlyWhenTheThreadHasRuns(t *testing.T) {
	cs, r := newCountRig(t)
	ctx := context.Background()
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "new", Messages: []engine.Message{userMsg("x")}}); err != nil {
		t.Fatal(err)
	}
	if n := cs.latestReads.Load(); n != 0 {
		t.Fatalf("%d latest-run reads for a new thread's submit, want 0", n)
	}
	// A thread whose one run is done, on agent-x.
	done := engine.RunRecord{RunID: "r0", ThreadID: "t", AgentID: "agent-x", Status: engine.RunDone, CreatedAt: 1, UpdatedAt: 2}
	if _, err := cs.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t", CreatedAt: 1000, Run: &done}); err != nil {
		t.Fatal(err)
	}
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("y")}})
	if err != nil {
		t.Fatal(err)
	}
	if n := cs.latestReads.Load(); n != 1 {
		t.Fatalf("%d latest-run reads for a submit to a thread with a run, want 1", n)
	}
	run, err := cs.LoadRun(ctx, res.RunID)
	if err != nil || run == nil || run.AgentID != "agent-x" {
		t.Fatalf("new run %+v %v: want the agent of the thread's latest run", run, err)
	}
}
