package natsstore_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

func queued(id, thread string, avail int64) engine.Dispatch {
	return engine.Dispatch{DispatchID: id, ThreadID: thread, RunID: "run-" + id, Priority: engine.DefaultPriority,
		Status: engine.StatusQueued, AvailableAt: avail, MaxAttempts: 5, CreatedAt: avail}
}

// eventually polls cond every 5ms until it holds or 10s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Two stores on two connections share one stream, as two sidecars would.
// Each round they race Claim (and ClaimDispatch) on one thread holding
// two dispatches: exactly one call wins, and the thread never holds two
// claimed dispatches.
func TestTwoStoresRaceClaimOneWinner(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	const rounds = 100
	for round := range rounds {
		thread := fmt.Sprintf("t%03d", round)
		ids := []string{fmt.Sprintf("r%03d-x", round), fmt.Sprintf("r%03d-y", round)}
		writer := a
		if round%2 == 1 {
			writer = b // the other store must find work it did not write
		}
		for _, id := range ids {
			if _, err := writer.Enqueue(ctx, queued(id, thread, 1000)); err != nil {
				t.Fatalf("round %d: enqueue: %v", round, err)
			}
		}
		var mu sync.Mutex
		var won []engine.Dispatch
		var errs []error
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range 6 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s := []*natsstore.Store{a, b}[i%2]
				<-start
				var d *engine.Dispatch
				var err error
				if i < 4 {
					d, err = s.Claim(ctx, thread, fmt.Sprintf("c%d", i), 30*time.Second, 2000)
				} else {
					d, err = s.ClaimDispatch(ctx, ids[i-4], fmt.Sprintf("c%d", i), 30*time.Second, 2000)
				}
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, err)
				} else if d != nil {
					won = append(won, *d)
				}
			}()
		}
		close(start)
		wg.Wait()
		if len(errs) > 0 {
			t.Fatalf("round %d: %d claim errors, first: %v", round, len(errs), errs[0])
		}
		if len(won) != 1 {
			t.Fatalf("round %d: %d claims won, want 1", round, len(won))
		}
		claimed := 0
		for _, id := range ids {
			d, err := a.LoadDispatch(ctx, id)
			if err != nil || d == nil {
				t.Fatalf("round %d: load %s: %v %v", round, id, d, err)
			}
			if d.Status == engine.StatusClaimed {
				claimed++
				if d.ClaimToken != won[0].ClaimToken {
					t.Fatalf("round %d: %s claimed under token %s, the winner got %s", round, id, d.ClaimToken, won[0].ClaimToken)
				}
			}
		}
		if claimed != 1 {
			t.Fatalf("round %d: %d claimed dispatches on one thread", round, claimed)
		}
		// The loser's store settles the claim: it must see it.
		other := []*natsstore.Store{b, a}[round%2]
		if err := other.Ack(ctx, won[0].DispatchID, won[0].ClaimToken, 3000); err != nil {
			t.Fatalf("round %d: ack: %v", round, err)
		}
	}
	for _, s := range []*natsstore.Store{a, b} {
		eventually(t, "both indexes agree", func() bool {
			c, err := s.CountByStatus(ctx)
			return err == nil && c.Get(engine.StatusAcked) == rounds && c.Get(engine.StatusQueued) == rounds
		})
	}
}

// Every read the index serves reflects the store's own writes at once,
// and another store's writes soon after.
func TestIndexReadYourWrites(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	for i := range 50 {
		id := fmt.Sprintf("d%02d", i)
		if _, err := a.Enqueue(ctx, queued(id, "t1", int64(1000+i))); err != nil {
			t.Fatal(err)
		}
		ds, err := a.ListDispatches(ctx, "t1", nil, 0, 0)
		if err != nil || len(ds) != i+1 || ds[i].DispatchID != id {
			t.Fatalf("after enqueue %d: ListDispatches = %d records, %v", i, len(ds), err)
		}
		c, err := a.CountByStatus(ctx)
		if err != nil || c.Get(engine.StatusQueued) != int64(i+1) {
			t.Fatalf("after enqueue %d: queued count %d, %v", i, c.Get(engine.StatusQueued), err)
		}
		got, err := a.Claim(ctx, "t1", "c1", time.Minute, 5000)
		if err != nil || got == nil || got.DispatchID != "d00" && i == 0 {
			t.Fatalf("claim after enqueue %d: %v %v", i, got, err)
		}
		if ready, _, err := a.ReadyThreads(ctx, 5000, engine.ReadyEntry{}, 10); err != nil || len(ready) != 0 {
			t.Fatalf("ReadyThreads with a claim held = %+v, %v", ready, err)
		}
		if _, err := a.Release(ctx, got.DispatchID, got.ClaimToken, 1000); err != nil {
			t.Fatal(err)
		}
		if ready, _, err := a.ReadyThreads(ctx, 5000, engine.ReadyEntry{}, 10); err != nil || len(ready) != 1 {
			t.Fatalf("ReadyThreads after release = %+v, %v", ready, err)
		}
	}
	eventually(t, "the other store's index", func() bool {
		ids, err := b.QueuedThreadIDs(ctx)
		c, cerr := b.CountByStatus(ctx)
		return err == nil && cerr == nil && len(ids) == 1 && c.Get(engine.StatusQueued) == 50
	})
}

// A store closed and opened again on the same stream finds the same state.
func TestReopenKeepsState(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	ctx := context.Background()
	s, err := natsstore.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		d := queued(fmt.Sprintf("d%d", i), fmt.Sprintf("t%d", i%3), 1000)
		d.DedupeKey = fmt.Sprintf("k%d", i)
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	c, err := s.Claim(ctx, "t0", "c1", time.Minute, 2000)
	if err != nil || c == nil {
		t.Fatalf("claim: %v %v", c, err)
	}
	if _, err := s.Interrupt(ctx, "t1", 2000); err != nil {
		t.Fatal(err)
	}
	run := engine.RunRecord{RunID: "run-1", ThreadID: "t2", AgentID: "a", Status: engine.RunRunning, CreatedAt: 1, UpdatedAt: 1}
	msgs := []engine.Message{{ID: "m1", Role: engine.RoleUser}, {ID: "m2", Role: engine.RoleAssistant}}
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t2", Messages: msgs, Run: &run, CreatedAt: 5}); err != nil {
		t.Fatal(err)
	}
	type snapshot struct {
		counts  engine.StatusCounts
		queued  []string
		epoch   uint64
		list    []engine.Dispatch
		claimed *engine.Dispatch
		msgs    []engine.MessageRecord
		latest  *engine.RunRecord
		thread  *engine.Thread
		ready   []engine.ReadyEntry
	}
	take := func(s engine.Store) snapshot {
		t.Helper()
		var sn snapshot
		var errs []error
		var err error
		sn.counts, err = s.CountByStatus(ctx)
		errs = append(errs, err)
		sn.queued, err = s.QueuedThreadIDs(ctx)
		errs = append(errs, err)
		sn.epoch, err = s.CurrentEpoch(ctx, "t1")
		errs = append(errs, err)
		sn.list, err = s.ListDispatches(ctx, "t0", nil, 0, 0)
		errs = append(errs, err)
		sn.claimed, err = s.LoadDispatch(ctx, c.DispatchID)
		errs = append(errs, err)
		sn.msgs, err = s.LoadMessages(ctx, "t2")
		errs = append(errs, err)
		sn.latest, err = s.LatestRun(ctx, "t2")
		errs = append(errs, err)
		sn.thread, err = s.LoadThread(ctx, "t2")
		errs = append(errs, err)
		sn.ready, _, err = s.ReadyThreads(ctx, 5000, engine.ReadyEntry{}, 10)
		errs = append(errs, err)
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		return sn
	}
	before := take(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.LoadDispatch(ctx, "d0"); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("load on a closed store = %v, want ErrUnavailable", err)
	}
	s2 := openCfg(t, cfg)
	after := take(s2)
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("state after reopen differs:\nbefore %+v\nafter  %+v", before, after)
	}
	if before.epoch != 1 || before.claimed.Status != engine.StatusClaimed || len(before.msgs) != 2 || before.counts.Get(engine.StatusSuperseded) != 3 {
		t.Fatalf("unexpected state %+v", before)
	}
	// The dedupe locks and the claim guard survived too.
	d := queued("dx", "t0", 1000)
	d.DedupeKey = "k3" // held by queued d3 on t0
	if _, err := s2.Enqueue(ctx, d); !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("enqueue with a held dedupe key after reopen = %v", err)
	}
	if got, err := s2.Claim(ctx, "t0", "c2", time.Minute, 2000); err != nil || got != nil {
		t.Fatalf("second claim on t0 after reopen = %v, %v; want nil", got, err)
	}
}

// A store whose server is gone fails with ErrUnavailable within the
// caller's deadline instead of hanging; so does opening one.
func TestServerDownIsUnavailable(t *testing.T) {
	t.Parallel()
	dead := natstest.Start(t)
	ctx := context.Background()
	s := openCfg(t, natsstore.Config{URL: dead.URL(), Stream: "DOWN", Prefix: "down"})
	if _, err := s.Enqueue(ctx, queued("d1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	dead.Shutdown()
	calls := map[string]func(ctx context.Context) error{
		"enqueue": func(ctx context.Context) error { _, err := s.Enqueue(ctx, queued("d2", "t1", 1000)); return err },
		"claim":   func(ctx context.Context) error { _, err := s.Claim(ctx, "t1", "c", time.Minute, 2000); return err },
		"load":    func(ctx context.Context) error { _, err := s.LoadDispatch(ctx, "d1"); return err },
		"list":    func(ctx context.Context) error { _, err := s.ListDispatches(ctx, "t1", nil, 0, 0); return err },
	}
	for name, call := range calls {
		ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		start := time.Now()
		err := call(ctx)
		cancel()
		if !errors.Is(err, engine.ErrUnavailable) {
			t.Fatalf("%s with the server down = %v, want ErrUnavailable", name, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("%s took %s with a 500ms deadline", name, d)
		}
	}
	octx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := natsstore.Open(octx, natsstore.Config{URL: dead.URL(), Stream: "DOWN"}); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("open with the server down = %v, want ErrUnavailable", err)
	}
}
