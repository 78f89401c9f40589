package badgerstore

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// markNotQueued damages dispatch id as TestCompletionSurvivesADamagedNextDispatch
// does ("not queued"), with superseded for cancelled: its record says
// superseded, the queue index still lists it.
func markNotQueued(t *testing.T, s *Store, id string) {
	t.Helper()
	d, err := s.LoadDispatch(context.Background(), id)
	if err != nil || d == nil {
		t.Fatal(d, err)
	}
	bad := d.Clone()
	bad.Status, bad.CompletedAt = engine.StatusSuperseded, bad.UpdatedAt
	b, _ := encode(&bad)
	if err := s.RawSet(dispatchKey(id), b); err != nil {
		t.Fatal(err)
	}
}

// A claim past more than staleChunk stale queue entries whose records are
// not queued any more (damage: their index entries outlived them) ends:
// each commit goes on after the entries the one before walked. It spun:
// superseding such an entry leaves its queue key, and with a not-yet-due
// entry before them the floor stayed, so every commit walked the same
// entries again (found by review).
func TestAClaimPastDamagedStaleEntriesEnds(t *testing.T) {
	defer func(n int) { staleChunk = n }(staleChunk)
	staleChunk = 3
	s := openInMemory(t)
	ctx := context.Background()
	enqueueQueued(t, s, "t1", "old", 6, 1000)
	if _, _, _, err := s.interruptFirst(ctx, "t1", 2000, 1); err != nil { // cut short: 1 of 6
		t.Fatal(err)
	}
	for i := 1; i < 6; i++ {
		markNotQueued(t, s, fmt.Sprintf("old%05d", i))
	}
	// Work of the new epoch before them in claim order, not due yet
	// (a retry in backoff): the walk keeps it (keptSeen), so the floor
	// does not move past the damaged entries.
	fut := engine.Dispatch{DispatchID: "fut", ThreadID: "t1", RunID: "r-fut", Priority: engine.DefaultPriority,
		Status: engine.StatusQueued, AvailableAt: 1 << 50, CreatedAt: 900, MaxAttempts: 5}
	if _, err := s.Enqueue(ctx, fut); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	start := time.Now()
	d, err := s.Claim(cctx, "t1", "c", engine.DefaultLease, 3000)
	if err != nil || d != nil {
		t.Fatalf("claim after %v: %+v, %v; want none (the only dispatch of the new epoch is not due)", time.Since(start), d, err)
	}
}

// CompleteClaimer's contract says a failed claim half writes nothing (the
// engine then completes alone). Past a chunk of stale entries the
// completion is committed first: a later claim failure is no ErrNextClaim,
// and the completion stands (found by review: it was marked so, and the
// engine's Complete alone then found the dispatch acked).
func TestACompletionsClaimThatFailsPastStaleEntriesKeepsTheCompletion(t *testing.T) {
	defer func(n int) { staleChunk = n }(staleChunk)
	staleChunk = 3
	s := openInMemory(t)
	ctx := context.Background()
	enqueueQueued(t, s, "t1", "first", 1, 1000)
	c, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 1000)
	if err != nil || c == nil {
		t.Fatal(c, err)
	}
	// Of the old epoch: superseded so the new-epoch one can be claimed.
	enqueueQueued(t, s, "t1", "old", 10, 1100)
	if _, _, _, err := s.interruptFirst(ctx, "t1", 2000, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SupersedeClaimed(ctx, c.DispatchID, c.ClaimToken, engine.ReasonInterrupt, 2100); err != nil {
		t.Fatal(err)
	}
	enqueueQueued(t, s, "t1", "mid", 1, 900)
	m, err := s.Claim(ctx, "t1", "c", engine.DefaultLease, 2200)
	if err != nil || m == nil || m.DispatchID != "mid00000" {
		t.Fatal(m, err)
	}
	// A damaged record beyond the first chunk of stale entries.
	if err := s.RawDelete(dispatchKey("old00008")); err != nil {
		t.Fatal(err)
	}
	next, err := s.CompleteAndClaim(ctx, m.DispatchID, m.ClaimToken, engine.RunResult{RunID: m.RunID, Status: engine.RunDone}, 2400, "c", engine.DefaultLease)
	got, _ := s.LoadDispatch(ctx, m.DispatchID)
	if err != nil || next != nil || got.Status != engine.StatusAcked {
		t.Fatalf("CompleteAndClaim past a damaged stale entry: next %v, %v (ErrNextClaim %v); dispatch %s; want no error, nothing claimed, acked",
			next, err, errors.Is(err, engine.ErrNextClaim), got.Status)
	}
}
