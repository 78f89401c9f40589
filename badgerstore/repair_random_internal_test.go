package badgerstore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// countingExec runs each run at once, once opened, and counts the runs
// of each run id.
type countingExec struct {
	oneSlotExec
	mu   sync.Mutex
	runs map[string]int
}

func (e *countingExec) Run(ctx context.Context, r *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	e.mu.Lock()
	e.runs[r.RunID]++
	e.mu.Unlock()
	return e.oneSlotExec.Run(ctx, r, sink)
}

func (e *countingExec) count(runID string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.runs[runID]
}

// leftByDesign are the problems Repair lists and leaves (docs/store.md,
// Repair): two claimed dispatches on a thread, a gap in a message log.
func leftByDesign(p string) bool {
	for _, s := range []string{"claimed dispatches", "message log has seq", "log holds", "up to seq"} {
		if strings.Contains(p, s) {
			return true
		}
	}
	return false
}

// Random damage to a store the engine worked on — every family's keys,
// records filled with junk, index entries deleted or garbled — is mended:
// after Repair, Verify finds nothing but what Repair leaves by design, a
// second Repair writes nothing, a mailbox started on the store drains
// every queue, and no run that had finished runs again.
func TestRepairMendsRandomDamage(t *testing.T) {
	seeds := 40
	if testing.Short() {
		seeds = 10
	}
	for seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { repairRandomDamage(t, uint64(seed)) })
	}
}

func repairRandomDamage(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	ctx := context.Background()
	s := memStore(t)
	mb, err := engine.New(s, &oneSlotExec{changed: make(chan struct{}, 1)}, engine.Config{ConsumerID: "c1"}) // never started
	if err != nil {
		t.Fatal(err)
	}
	var runs []string
	for i := range 12 {
		req := engine.SubmitRequest{ThreadID: fmt.Sprintf("T%d", rng.IntN(4)), Messages: []engine.Message{userText(fmt.Sprint(i))}}
		if rng.IntN(3) == 0 {
			req.DedupeKey = fmt.Sprintf("k%d", i)
		}
		res, err := mb.SubmitBackground(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		runs = append(runs, res.RunID)
	}
	// Claims by a consumer that goes away: completed, dead-lettered (and
	// requeued), interrupted, or left claimed with a short lease.
	for th := range 4 {
		thread := fmt.Sprintf("T%d", th)
		for range rng.IntN(3) {
			now := time.Now().UnixMilli()
			d, err := s.ClaimStart(ctx, thread, "gone", 300*time.Millisecond, "i", now)
			if err != nil || d == nil {
				break
			}
			switch rng.IntN(4) {
			case 0:
				err = s.Complete(ctx, d.DispatchID, d.ClaimToken, engine.RunResult{RunID: d.RunID, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}, now+1)
			case 1:
				err = s.DeadLetter(ctx, d.DispatchID, d.ClaimToken, "x", now+1)
				if err == nil && rng.IntN(2) == 0 {
					_, err = s.Requeue(ctx, d.DispatchID, "rq-"+d.DispatchID, now+2)
				}
			case 2:
				_, err = s.Interrupt(ctx, thread, now+1)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	finished := map[string]bool{}
	for _, id := range runs {
		if r, _ := s.LoadRun(ctx, id); r != nil && r.Status == engine.RunDone {
			finished[id] = true
		}
	}
	var keys [][]byte
	if err := s.view(ctx, func(r *reader) error {
		return r.iterate(nil, nil, false, true, func(k, _ []byte) (bool, error) {
			if k[0] != pOption && k[0] != '!' {
				keys = append(keys, k)
			}
			return true, nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	var damage []string
	for _, k := range keys {
		if rng.IntN(100) >= 12 {
			continue
		}
		switch {
		case strings.ContainsRune("deRHM", rune(k[0])):
			err = s.RawSet(k, []byte{binaryV1, 0xff, 0xff})
			damage = append(damage, fmt.Sprintf("junk %q", k))
		case rng.IntN(2) == 0:
			err = s.RawDelete(k)
			damage = append(damage, fmt.Sprintf("deleted %q", k))
		default:
			err = s.RawSet(k, []byte{1, 2, 3})
			damage = append(damage, fmt.Sprintf("garbled %q", k))
		}
		if err != nil {
			t.Fatal(err)
		}
	}

	rep, err := s.Repair(ctx, time.Now().UnixMilli())
	if err != nil {
		t.Fatalf("repair after %v: %v", damage, err)
	}
	v, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range v.Problems {
		if !leftByDesign(p) {
			t.Fatalf("after %v, repaired (%v, left %v), Verify: %s", damage, rep.Replaced, rep.Left, p)
		}
	}
	again, err := s.Repair(ctx, time.Now().UnixMilli())
	if err != nil || again.Rewritten != 0 || len(again.Replaced) != 0 {
		t.Fatalf("after %v, a second repair: %v, %v, %v", damage, again.Replaced, again.Changes, err)
	}

	ex := &countingExec{oneSlotExec: oneSlotExec{changed: make(chan struct{}, 1)}, runs: map[string]int{}}
	mb2, err := engine.New(s, ex, engine.Config{ConsumerID: "c2", Lease: time.Second, SweepInterval: 100 * time.Millisecond, RenewInterval: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	startMailbox(t, mb2)
	ex.open.Store(true)
	ex.changed <- struct{}{}
	waitFor(t, fmt.Sprintf("every queue to drain after %v", damage), func() bool {
		q, err := s.QueuedThreadIDs(ctx)
		return err == nil && len(q) == 0
	})
	for id := range finished {
		if n := ex.count(id); n > 0 {
			t.Fatalf("after %v, run %s, finished before, ran again %d times", damage, id, n)
		}
	}
}
