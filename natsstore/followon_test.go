package natsstore_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// countingStore is a natsstore.Store (every optional interface promoted)
// that counts the dispatches claimed by Claim or ClaimStart and by
// CompleteAndClaim or CompleteAndClaimStart.
type countingStore struct {
	*natsstore.Store
	claimed, followOns atomic.Int64
}

func (c *countingStore) Claim(ctx context.Context, threadID, consumerID string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	d, err := c.Store.Claim(ctx, threadID, consumerID, lease, now)
	if d != nil {
		c.claimed.Add(1)
	}
	return d, err
}

func (c *countingStore) CompleteAndClaim(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64, consumerID string, lease time.Duration) (*engine.Dispatch, error) {
	next, err := c.Store.CompleteAndClaim(ctx, dispatchID, claimToken, result, now, consumerID, lease)
	if next != nil {
		c.followOns.Add(1)
	}
	return next, err
}

// ClaimStart counts as Claim does (the engine claims with it: the store
// offers engine.StartClaimer).
func (c *countingStore) ClaimStart(ctx context.Context, threadID, consumerID string, lease time.Duration, instanceID string, now int64) (*engine.Dispatch, error) {
	d, err := c.Store.ClaimStart(ctx, threadID, consumerID, lease, instanceID, now)
	if d != nil {
		c.claimed.Add(1)
	}
	return d, err
}

// CompleteAndClaimStart counts as CompleteAndClaim does.
func (c *countingStore) CompleteAndClaimStart(ctx context.Context, dispatchID, claimToken string, result engine.RunResult, now int64, consumerID string, lease time.Duration, instanceID string) (*engine.Dispatch, error) {
	next, err := c.Store.CompleteAndClaimStart(ctx, dispatchID, claimToken, result, now, consumerID, lease, instanceID)
	if next != nil {
		c.followOns.Add(1)
	}
	return next, err
}

// gateAgent holds the run whose first message is "gate" until gate is
// closed and finishes every other run at once; it journals the order of
// the runs and how many ran at once.
type gateAgent struct {
	gate chan struct{}

	mu        sync.Mutex
	order     []string // dispatch ids in start order
	active    int
	maxActive int
}

func (a *gateAgent) Capacity() int                    { return 1 }
func (a *gateAgent) CapacityChanged() <-chan struct{} { return nil }

func (a *gateAgent) Run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	a.mu.Lock()
	a.order = append(a.order, req.DispatchID)
	a.active++
	a.maxActive = max(a.maxActive, a.active)
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.active--
		a.mu.Unlock()
	}()
	sink.Emit([]byte(`{"type":"run_start"}`))
	if firstText(req.Messages) == "gate" {
		select {
		case <-a.gate:
		case <-ctx.Done():
		}
	}
	sink.Emit([]byte(`{"type":"run_finish"}`))
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
}

// On natsstore too, a busy thread's next dispatch is claimed in the batch
// that completes the previous attempt (engine.CompleteClaimer): the first
// of five runs is claimed by Claim, the other four each by its
// predecessor's completion, in submit order, one at a time.
func TestCompletionClaimsTheThreadsNextDispatchOnNATS(t *testing.T) {
	t.Parallel()
	st := &countingStore{Store: openCfg(t, freshConfig())}
	ag := &gateAgent{gate: make(chan struct{})}
	mb, err := engine.New(st, ag, engineConfig("sc1"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := mb.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const thread = "busy"
	var ids []string
	for i, text := range []string{"gate", "m1", "m2", "m3", "m4"} {
		res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg(text)}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.DispatchID)
		if i == 0 {
			eventually(t, "the first run started", func() bool {
				ag.mu.Lock()
				defer ag.mu.Unlock()
				return len(ag.order) == 1
			})
		}
	}
	close(ag.gate)
	eventually(t, "all five acked", func() bool {
		for _, id := range ids {
			d, err := st.LoadDispatch(ctx, id)
			if err != nil || d == nil || d.Status != engine.StatusAcked {
				return false
			}
		}
		return true
	})
	ag.mu.Lock()
	order, maxActive := append([]string(nil), ag.order...), ag.maxActive
	ag.mu.Unlock()
	if len(order) != len(ids) || maxActive != 1 {
		t.Fatalf("runs %v (max %d at once), want %v one at a time", order, maxActive, ids)
	}
	for i := range ids {
		if order[i] != ids[i] {
			t.Fatalf("runs %v, want submit order %v", order, ids)
		}
	}
	if c, f := st.claimed.Load(), st.followOns.Load(); c != 1 || f != 4 {
		t.Fatalf("%d dispatches claimed by Claim and %d by CompleteAndClaim, want 1 and 4", c, f)
	}
}
