package natsstore_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A sweep reclaims its leases in waves (their transactions merge into one
// atomic batch): with more lapsed leases than a wave, a limit in the
// middle of one, and superseded candidates among them, it still returns
// exactly limit reclaims, oldest lease first, skipping the superseded
// without counting them, and leaves the rest claimed for the next call.
func TestAReclaimInWavesKeepsItsLimitAndOrder(t *testing.T) {
	ctx := context.Background()
	s := openCfg(t, freshConfig())
	const n = 150
	base := time.Now().UnixMilli()
	for i := range n {
		thread, id := fmt.Sprintf("t%03d", i), fmt.Sprintf("d%03d", i)
		if _, err := s.Enqueue(ctx, queued(id, thread, base)); err != nil {
			t.Fatal(err)
		}
		// Lease i lapses at base+i+10: the index lists them in i's order.
		if c, err := s.Claim(ctx, thread, "crashed", 10*time.Millisecond, base+int64(i)); err != nil || c == nil {
			t.Fatalf("claim %s: %v %v", thread, c, err)
		}
	}
	stale := map[string]bool{}
	for _, i := range []int{0, 5, 63, 64, 70} { // superseded on reclaim: their epoch is behind
		thread := fmt.Sprintf("t%03d", i)
		if _, err := s.Interrupt(ctx, thread, base); err != nil {
			t.Fatal(err)
		}
		stale[fmt.Sprintf("d%03d", i)] = true
	}
	now := base + n + 100
	got, err := s.ReclaimExpired(ctx, now, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 100 {
		t.Fatalf("reclaimed %d, want the limit, 100", len(got))
	}
	next := 0
	for _, d := range got {
		for stale[fmt.Sprintf("d%03d", next)] {
			next++
		}
		if want := fmt.Sprintf("d%03d", next); d.DispatchID != want || d.Status != engine.StatusQueued {
			t.Fatalf("reclaim %s (%s), want %s queued: oldest lease first, superseded skipped", d.DispatchID, d.Status, want)
		}
		next++
	}
	for i := range n {
		id := fmt.Sprintf("d%03d", i)
		d, err := s.LoadDispatch(ctx, id)
		if err != nil || d == nil {
			t.Fatalf("load %s: %v %v", id, d, err)
		}
		var want engine.DispatchStatus
		switch {
		case stale[id]:
			want = engine.StatusSuperseded
		case i < next:
			want = engine.StatusQueued
		default:
			want = engine.StatusClaimed // left for the next sweep
		}
		if d.Status != want {
			t.Fatalf("%s is %s after the sweep, want %s", id, d.Status, want)
		}
	}
	rest, err := s.ReclaimExpired(ctx, now, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(rest) != n-len(stale)-100 {
		t.Fatalf("second sweep reclaimed %d, want %d", len(rest), n-len(stale)-100)
	}
}
