package engine_test

import (
	"context"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A claim a killed predecessor left under the suspended lease (its run
// was waiting on a tool call) is served soon after that lease lapses, not
// a sweep interval later: the frequent sweep after a start lasts as long
// as the longer of the two leases (it used to stop one Lease after the
// start; found by review).
func TestSuspendedClaimOfAKilledPredecessorIsServedWhenItLapses(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	now := time.Now().UnixMilli()
	d := engine.Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Status: engine.StatusQueued,
		AvailableAt: now, MaxAttempts: 5, CreatedAt: now, UpdatedAt: now}
	if _, err := s.Enqueue(ctx, d); err != nil {
		t.Fatal(err)
	}
	const suspended = 1500 * time.Millisecond
	if c, err := s.Claim(ctx, "t1", "killed-sidecar", suspended, now); err != nil || c == nil {
		t.Fatalf("claim: %v %v", c, err)
	}
	cfg := engine.Config{Lease: 200 * time.Millisecond, RenewInterval: 50 * time.Millisecond, SuspendedLease: suspended, SweepInterval: time.Hour}
	mb := liveMailbox(t, s, newFake(1, complete), cfg)
	if err := mb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the lapsed claim reclaimed", func() bool {
		got, err := s.LoadDispatch(ctx, "d1")
		return err == nil && (got.Status != engine.StatusClaimed || got.ClaimedBy != "killed-sidecar")
	})
}
