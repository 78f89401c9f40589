package badgerstore

import (
	"context"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A claim leaves the thread's due time unknown (no lookup while the
// thread is claimed); it is found again when the thread becomes claimable,
// and the ready index then carries the next queued entry's due time.
func TestDueTimeFoundWhenClaimable(t *testing.T) {
	s := openCacheTest(t, 0)
	ctx := context.Background()
	for i, avail := range []int64{100, 200, 300} {
		d := engine.Dispatch{DispatchID: "d" + string(rune('1'+i)), ThreadID: "t1", RunID: "r" + string(rune('1'+i)), Priority: engine.DefaultPriority,
			Status: engine.StatusQueued, AvailableAt: avail, CreatedAt: 50, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	c, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 100)
	if err != nil || c == nil || c.DispatchID != "d1" {
		t.Fatalf("claim: %+v %v", c, err)
	}
	raw, _, err := s.RawGet(stateKey("t1"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := decodeThreadState(stateKey("t1"), raw)
	if err != nil {
		t.Fatal(err)
	}
	if !st.dueStale || st.claimed != "d1" || st.queued != 2 {
		t.Fatalf("state after the claim: %+v (want the due time unknown while claimed)", st)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify while claimed: %v %v", rep.Problems, err)
	}
	if err := s.Ack(ctx, "d1", c.ClaimToken, 150); err != nil {
		t.Fatal(err)
	}
	threads, next, err := s.ReadyThreads(ctx, 150, 10)
	if err != nil || len(threads) != 0 || next != 200 {
		t.Fatalf("ready at 150: %v next %d %v; want none, next due 200", threads, next, err)
	}
	if threads, _, err := s.ReadyThreads(ctx, 200, 10); err != nil || len(threads) != 1 || threads[0] != "t1" {
		t.Fatalf("ready at 200: %v %v", threads, err)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify after the ack: %v %v", rep.Problems, err)
	}
}

// A thread whose run ended is keyed in the ready index by when it ended
// (round-robin); Verify takes that as consistent, and Repair on such a
// store changes nothing.
func TestARaisedDueIsConsistent(t *testing.T) {
	s := openCacheTest(t, 0)
	ctx := context.Background()
	for i, avail := range []int64{100, 110} {
		d := engine.Dispatch{DispatchID: "a" + string(rune('1'+i)), ThreadID: "ta", RunID: "ra" + string(rune('1'+i)), Priority: engine.DefaultPriority,
			Status: engine.StatusQueued, AvailableAt: avail, CreatedAt: 50, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	c, err := s.Claim(ctx, "ta", "c", engine.DefaultLease, 600)
	if err != nil || c == nil {
		t.Fatalf("claim: %+v %v", c, err)
	}
	if err := s.Ack(ctx, c.DispatchID, c.ClaimToken, 700); err != nil {
		t.Fatal(err)
	}
	if _, found, err := s.RawGet(readyKey("ta", 700)); err != nil || !found {
		t.Fatalf("the ready entry is not keyed by the run's end: %v %v", found, err)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify: %v %v", rep.Problems, err)
	}
	rep, err := s.Repair(ctx, 800)
	if err != nil || rep.Rewritten != 0 || len(rep.Replaced) != 0 || len(rep.Left) != 0 {
		t.Fatalf("repair of a consistent store: %+v %v", rep, err)
	}
}
