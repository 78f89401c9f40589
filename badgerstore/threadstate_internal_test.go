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
	threads, next, err := s.ReadyThreads(ctx, 150, engine.ReadyEntry{}, 10)
	if err != nil || len(threads) != 0 || next != 200 {
		t.Fatalf("ready at 150: %v next %d %v; want none, next due 200", threads, next, err)
	}
	if threads, _, err := s.ReadyThreads(ctx, 200, engine.ReadyEntry{}, 10); err != nil || len(threads) != 1 || threads[0].ThreadID != "t1" {
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

// A due raised past both the thread's last recorded run end and now is
// damage: Verify names it, and Repair puts the thread back at its earliest
// work (found by review: Repair moved the ready entry to the wrong time
// and hid the thread's due work). A raised thread whose state Repair
// rebuilds for another reason gets a ready entry that agrees with it.
func TestRepairOfARaisedDue(t *testing.T) {
	ctx := context.Background()
	enqueue := func(s *Store, id, thread string, avail int64) {
		d := engine.Dispatch{DispatchID: id, ThreadID: thread, RunID: "r" + id, Priority: engine.DefaultPriority,
			Status: engine.StatusQueued, AvailableAt: avail, CreatedAt: 50, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	setState := func(s *Store, thread string, f func(*threadState)) {
		b, _, err := s.RawGet(stateKey(thread))
		if err != nil {
			t.Fatal(err)
		}
		st, err := decodeThreadState(stateKey(thread), b)
		if err != nil {
			t.Fatal(err)
		}
		f(&st)
		if err := s.RawSet(stateKey(thread), encodeThreadState(st)); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("far ahead", func(t *testing.T) {
		s := openCacheTest(t, 0)
		enqueue(s, "a1", "ta", 100)
		setState(s, "ta", func(st *threadState) { st.due = 1 << 50 })
		if v, err := s.Verify(ctx); err != nil || len(v.Problems) == 0 {
			t.Fatalf("verify of a due far ahead: %v %v", v.Problems, err)
		}
		if _, err := s.Repair(ctx, 900); err != nil {
			t.Fatal(err)
		}
		if v, err := s.Verify(ctx); err != nil || len(v.Problems) != 0 {
			t.Fatalf("verify after the repair: %v %v", v.Problems, err)
		}
		if ids, _, err := s.ReadyThreads(ctx, 1000, engine.ReadyEntry{}, 10); err != nil || len(ids) != 1 {
			t.Fatalf("ready after the repair: %v %v", ids, err)
		}
	})
	t.Run("rebuilt", func(t *testing.T) {
		s := openCacheTest(t, 0)
		enqueue(s, "a1", "ta", 100)
		enqueue(s, "a2", "ta", 110)
		c, err := s.Claim(ctx, "ta", "c", engine.DefaultLease, 600)
		if err != nil || c == nil {
			t.Fatal(c, err)
		}
		if err := s.Ack(ctx, c.DispatchID, c.ClaimToken, 700); err != nil {
			t.Fatal(err)
		}
		setState(s, "ta", func(st *threadState) { st.floor = []byte{0xff, 0xff, 0xff, 0xff} })
		if _, err := s.Repair(ctx, 900); err != nil {
			t.Fatal(err)
		}
		if v, err := s.Verify(ctx); err != nil || len(v.Problems) != 0 {
			t.Fatalf("verify after the repair: %v %v", v.Problems, err)
		}
		c, err = s.Claim(ctx, "ta", "c", engine.DefaultLease, 1000)
		if err != nil || c == nil {
			t.Fatal(c, err)
		}
		if ids, _, err := s.ReadyThreads(ctx, 3000, engine.ReadyEntry{}, 10); err != nil || len(ids) != 0 {
			t.Fatalf("ready while ta is claimed: %v %v (a stray entry)", ids, err)
		}
	})
}
