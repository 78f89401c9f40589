package badgerstore_test

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

func opsDispatch(id, thread string, at int64) engine.Dispatch {
	return engine.Dispatch{DispatchID: id, ThreadID: thread, RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: at, CreatedAt: at, MaxAttempts: 3}
}

// Verify claims to report undecodable counters; a status counter of the
// wrong length is read as 0 and passes whenever no dispatch has that
// status, yet the next write that moves a dispatch into it fails.
func TestVerifyReportsAnUndecodableStatusCounter(t *testing.T) {
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if _, err := s.Enqueue(ctx, opsDispatch("d1", "t", 1000)); err != nil {
		t.Fatal(err)
	}
	if err := s.RawSet([]byte{'n', byte(engine.StatusCancelled)}, []byte{0, 0, 1}); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, cerr := s.Cancel(ctx, "d1", 2000)
	if len(rep.Problems) == 0 {
		t.Fatalf("Verify reports nothing for a 3-byte cancelled counter; the next cancel fails: %v", cerr)
	}
}

func TestRandomOperationsKeepVerifyClean(t *testing.T) {
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	rnd := uint64(12345 + time.Now().UnixNano()%1000)
	next := func(n int) int { rnd ^= rnd << 13; rnd ^= rnd >> 7; rnd ^= rnd << 17; return int(rnd % uint64(n)) }
	now := int64(1_000_000)
	threads := []string{"a", "b", "c"}
	ids := []string{}
	claimed := map[string]string{}
	for i := 0; i < 3000; i++ {
		now += int64(next(50))
		th := threads[next(len(threads))]
		var err error
		op := next(14)
		switch op {
		case 0, 1:
			id := "d" + itoa(i)
			d := opsDispatch(id, th, now+int64(next(3))*100)
			if next(3) == 0 {
				d.DedupeKey = "k" + itoa(next(4))
			}
			d.CreatedAt = now
			if err := s.CreateRun(ctx, engine.RunRecord{RunID: d.RunID, ThreadID: th, AgentID: "x", Status: engine.RunCreated, DispatchID: id, CreatedAt: now / 1000, UpdatedAt: now / 1000}); err != nil {
				t.Fatal(err)
			}
			_, err = s.Enqueue(ctx, d)
			if err == nil {
				ids = append(ids, id)
			}
		case 2:
			var d *engine.Dispatch
			d, err = s.Claim(ctx, th, "c1", 200*time.Millisecond, now)
			if d != nil {
				claimed[d.DispatchID] = d.ClaimToken
			}
		case 3, 4, 5, 6, 7:
			for id, tok := range claimed {
				cur, _ := s.LoadDispatch(ctx, id)
				runID := "run-" + id
				if cur != nil {
					runID = cur.RunID
				}
				switch op {
				case 3:
					_, err = s.Nack(ctx, id, tok, now+int64(next(500)), "boom", now)
				case 4:
					err = s.DeadLetter(ctx, id, tok, "dead", now)
				case 5:
					_, err = s.Release(ctx, id, tok, now)
				case 6:
					err = s.Complete(ctx, id, tok, engine.RunResult{RunID: runID, Status: engine.RunDone}, now)
				case 7:
					_, err = s.CompleteAndClaim(ctx, id, tok, engine.RunResult{RunID: runID, Status: engine.RunDone}, now, "c1", 200*time.Millisecond)
				}
				delete(claimed, id)
				break
			}
		case 8:
			if len(ids) > 0 {
				_, err = s.Cancel(ctx, ids[next(len(ids))], now)
			}
		case 9:
			_, err = s.Interrupt(ctx, th, now)
		case 10:
			dl, _ := s.ListDeadLetters(ctx, 1, next(3))
			if len(dl) > 0 {
				id := "r" + itoa(i)
				_, err = s.Requeue(ctx, dl[0].DispatchID, id, now)
				if err == nil {
					ids = append(ids, id)
				}
			}
		case 12, 13:
			// Start a claimed run (running: the thread's active run), or
			// complete it waiting (open), so Verify sees every run status
			// in the thread projections.
			for id, tok := range claimed {
				if op == 12 {
					err = s.RecordDispatchStart(ctx, id, tok, "inst-"+itoa(i), now)
					break
				}
				cur, _ := s.LoadDispatch(ctx, id)
				runID := "run-" + id
				if cur != nil {
					runID = cur.RunID
				}
				err = s.Complete(ctx, id, tok, engine.RunResult{RunID: runID, Status: engine.RunWaiting}, now)
				delete(claimed, id)
				break
			}
		case 11:
			if next(2) == 0 {
				_, err = s.ReclaimExpired(ctx, now, 1+next(3))
			} else {
				_, err = s.PurgeTerminal(ctx, now-int64(next(2000)))
			}
		}
		if err != nil && !errors.Is(err, engine.ErrStaleClaim) && !errors.Is(err, engine.ErrAlreadyExists) && !errors.Is(err, engine.ErrVersionConflict) && !errors.Is(err, engine.ErrNotFound) {
			t.Fatalf("op %d step %d: %v", op, i, err)
		}
		if i%50 == 0 {
			rep, err := s.Verify(ctx)
			if err != nil || len(rep.Problems) > 0 {
				t.Fatalf("step %d op %d: %v %v", i, op, err, rep.Problems)
			}
			c, _ := s.CountByStatus(ctx)
			var total int64
			for _, th := range threads {
				l, _ := s.ListDispatches(ctx, th, nil, 0, 0)
				total += int64(len(l))
			}
			var sum int64
			for _, n := range c {
				sum += n
			}
			if sum != total {
				t.Fatalf("step %d counts %v sum %d, listed %d", i, c, sum, total)
			}
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
