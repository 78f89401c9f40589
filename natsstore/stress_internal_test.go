package natsstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// Several stores hammer a few threads with random operations; afterwards
// the records must satisfy the invariants: at most one claimed dispatch
// per thread and the claim guard naming it, dedupe keys held by at most one
// live dispatch each and every live keyed dispatch holding its lock, runs
// of cancelled/superseded/dead-lettered dispatches settled.
func TestStressInvariants(t *testing.T) {
	srv := natstest.Start(t)
	cfg := Config{URL: srv.URL(), Stream: "STRESS", Prefix: "st", MaxConflictRetries: 64}
	ctx := context.Background()
	var stores []*Store
	for range 3 {
		s, err := Open(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		stores = append(stores, s)
	}
	threads := []string{"ta", "tb", "tc"}
	var clock atomic.Int64
	clock.Store(1_000_000)
	var idSeq atomic.Int64
	type held struct{ id, token string }
	var mu sync.Mutex
	var claims []held
	var allIDs []string
	addID := func(id string) { mu.Lock(); allIDs = append(allIDs, id); mu.Unlock() }
	takeClaim := func(r *rand.Rand) (held, bool) {
		mu.Lock()
		defer mu.Unlock()
		if len(claims) == 0 {
			return held{}, false
		}
		i := r.IntN(len(claims))
		h := claims[i]
		if r.IntN(4) != 0 { // sometimes keep it (stale tokens are used too)
			claims = append(claims[:i], claims[i+1:]...)
		}
		return h, true
	}
	putClaim := func(d *engine.Dispatch) {
		if d != nil {
			mu.Lock()
			claims = append(claims, held{d.DispatchID, d.ClaimToken})
			mu.Unlock()
		}
	}
	var unexpected []error
	note := func(op string, err error) {
		if err == nil || errors.Is(err, engine.ErrStaleClaim) || errors.Is(err, engine.ErrVersionConflict) ||
			errors.Is(err, engine.ErrAlreadyExists) || errors.Is(err, engine.ErrNotFound) || errors.Is(err, engine.ErrValidation) || errors.Is(err, engine.ErrNextClaim) || errors.Is(err, engine.ErrUnavailable) {
			return
		}
		mu.Lock()
		unexpected = append(unexpected, fmt.Errorf("%s: %w", op, err))
		mu.Unlock()
	}
	var wg sync.WaitGroup
	deadline := time.Now().Add(5 * time.Second)
	for w := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			s := stores[w%len(stores)]
			for time.Now().Before(deadline) {
				now := clock.Add(int64(r.IntN(50)))
				th := threads[r.IntN(len(threads))]
				switch op := r.IntN(16); op {
				case 0, 1, 2:
					id := fmt.Sprintf("d%d", idSeq.Add(1))
					d := engine.Dispatch{DispatchID: id, ThreadID: th, RunID: "run-" + id, Priority: uint8(r.IntN(3)),
						Status: engine.StatusQueued, AvailableAt: now - 10, MaxAttempts: 3, CreatedAt: now}
					if r.IntN(2) == 0 {
						d.DedupeKey = fmt.Sprintf("k%d", r.IntN(3))
					}
					if r.IntN(2) == 0 {
						run := engine.RunRecord{RunID: d.RunID, ThreadID: th, AgentID: "a", Status: engine.RunCreated, CreatedAt: now / 1000, UpdatedAt: now / 1000}
						c := engine.Checkpoint{ThreadID: th, CreatedAt: now, Run: &run}
						n, err := s.MessageCount(ctx, th)
						if err != nil {
							note("count", err)
							continue
						}
						c.ExpectedCount = n
						c.Messages = []engine.Message{{ID: "m" + id, Role: engine.RoleUser}}
						if r.IntN(3) == 0 {
							_, got, err := s.SubmitIdle(ctx, c, d, "c", time.Duration(20+r.IntN(200))*time.Millisecond, "inst", now)
							note("submit idle", err)
							if err == nil {
								addID(id)
							}
							putClaim(got)
							continue
						}
						_, _, err = s.Submit(ctx, c, d)
						if err == nil {
							addID(id)
						}
						var ce *engine.ConflictError
						if !errors.As(err, &ce) {
							note("submit", err)
						}
						continue
					}
					_, err := s.Enqueue(ctx, d)
					note("enqueue", err)
					if err == nil {
						addID(id)
					}
				case 3, 4:
					d, err := s.Claim(ctx, th, "c", time.Duration(20+r.IntN(200))*time.Millisecond, now)
					note("claim", err)
					putClaim(d)
				case 5:
					mu.Lock()
					var id string
					if len(allIDs) > 0 {
						id = allIDs[r.IntN(len(allIDs))]
					}
					mu.Unlock()
					if id == "" {
						continue
					}
					if r.IntN(2) == 0 {
						d, err := s.ClaimDispatch(ctx, id, "c", time.Duration(20+r.IntN(200))*time.Millisecond, now)
						note("claim dispatch", err)
						putClaim(d)
					} else {
						_, err := s.Cancel(ctx, id, now)
						note("cancel", err)
					}
				case 6, 7, 8, 9, 10:
					h, ok := takeClaim(r)
					if !ok {
						continue
					}
					var err error
					switch r.IntN(8) {
					case 0:
						err = s.Ack(ctx, h.id, h.token, now)
					case 1:
						err = s.Complete(ctx, h.id, h.token, engine.RunResult{RunID: "run-" + h.id, InstanceID: "i", Status: engine.RunDone}, now)
					case 2:
						var next *engine.Dispatch
						next, err = s.CompleteAndClaim(ctx, h.id, h.token, engine.RunResult{RunID: "run-" + h.id, InstanceID: "i", Status: engine.RunDone}, now, "c", time.Duration(20+r.IntN(200))*time.Millisecond)
						putClaim(next)
					case 3:
						_, err = s.Nack(ctx, h.id, h.token, now+int64(r.IntN(30)), "boom", now)
					case 4:
						_, err = s.Release(ctx, h.id, h.token, now)
					case 5:
						err = s.DeadLetter(ctx, h.id, h.token, "dead", now)
					case 6:
						_, err = s.ExtendLease(ctx, h.id, h.token, time.Duration(20+r.IntN(200))*time.Millisecond, now)
						mu.Lock()
						claims = append(claims, h)
						mu.Unlock()
					case 7:
						err = s.RecordDispatchStart(ctx, h.id, h.token, "i", now)
						if err == nil {
							mu.Lock()
							claims = append(claims, h)
							mu.Unlock()
						}
					}
					note("owned op", err)
				case 11:
					_, err := s.Interrupt(ctx, th, now)
					note("interrupt", err)
				case 12:
					_, err := s.ReclaimExpired(ctx, now, 5)
					note("reclaim", err)
				case 13:
					_, err := s.PurgeTerminal(ctx, now-200)
					note("purge", err)
				case 14:
					ds, err := s.ListDeadLetters(ctx, 3, 0)
					note("list dl", err)
					if len(ds) > 0 {
						id := fmt.Sprintf("d%d", idSeq.Add(1))
						_, err := s.Requeue(ctx, ds[0].DispatchID, id, now)
						note("requeue", err)
						if err == nil {
							addID(id)
						}
					}
				case 15:
					h, ok := takeClaim(r)
					if ok {
						_, err := s.SupersedeClaimed(ctx, h.id, h.token, "sup", now)
						note("supersede", err)
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, err := range unexpected {
		t.Errorf("unexpected error: %v", err)
	}
	// Invariants, from the records.
	s := stores[0]
	claimed := map[string][]string{}
	liveKeys := map[string][]string{}
	for _, id := range allIDs {
		d, err := s.LoadDispatch(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if d == nil {
			continue
		}
		if d.Status == engine.StatusClaimed {
			claimed[d.ThreadID] = append(claimed[d.ThreadID], id)
		}
		if !d.Status.Terminal() && d.DedupeKey != "" {
			k := d.ThreadID + "/" + d.DedupeKey
			liveKeys[k] = append(liveKeys[k], id)
			r, err := s.getLast(ctx, s.sub.dedupe(d.ThreadID, d.DedupeKey))
			if err != nil {
				t.Fatal(err)
			}
			if string(r.data) != id {
				t.Errorf("live dispatch %s with key %s: lock names %q", id, k, r.data)
			}
		}
		switch d.Status {
		case engine.StatusCancelled, engine.StatusSuperseded, engine.StatusDeadLetter:
			if d.RequeuedAs != "" {
				continue
			}
			run, err := s.LoadRun(ctx, d.RunID)
			if err != nil {
				t.Fatal(err)
			}
			if run != nil && run.Status != engine.RunDone && run.DispatchID == d.DispatchID {
				t.Errorf("dispatch %s is %s but its run %s is %s", id, d.Status, run.RunID, run.Status)
			}
		}
	}
	for th, ids := range claimed {
		if len(ids) > 1 {
			t.Errorf("thread %s has %d claimed dispatches: %v", th, len(ids), ids)
		}
	}
	for _, th := range threads {
		r, err := s.getLast(ctx, s.sub.state(th))
		if err != nil {
			t.Fatal(err)
		}
		st, _ := decodeState("", r.data)
		want := ""
		if len(claimed[th]) == 1 {
			want = claimed[th][0]
		}
		if st.Claimed != want {
			t.Errorf("thread %s: claim guard %q, claimed dispatches %v", th, st.Claimed, claimed[th])
		}
	}
	for k, ids := range liveKeys {
		if len(ids) > 1 {
			t.Errorf("dedupe key %s held by %d live dispatches: %v", k, len(ids), ids)
		}
	}
	// Every store's index agrees with the records, eventually.
	for i, st := range stores {
		ok := false
		for range 200 {
			c, _ := st.CountByStatus(ctx)
			c0 := engine.StatusCounts{}
			for _, id := range allIDs {
				if d, _ := s.LoadDispatch(ctx, id); d != nil {
					c0[d.Status]++
				}
			}
			if c == c0 {
				ok = true
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if !ok {
			t.Errorf("store %d: index counts never matched the records", i)
		}
	}
	t.Logf("%d dispatches", len(allIDs))
}
