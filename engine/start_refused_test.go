package engine_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// interruptBeforeStart bumps the thread's epoch (an interrupt landing
// between the claim and the start) just before the first start is
// recorded, so the store refuses it and supersedes the dispatch.
type interruptBeforeStart struct {
	*badgerstore.Store
	//lint:ignore U1000 embedded to hide the store's StartClaimer: the fault sits between the claim and the start
	hideStartClaim
	done atomic.Bool
}

func (s *interruptBeforeStart) RecordDispatchStart(ctx context.Context, id, token, instance string, now int64) error {
	if s.done.CompareAndSwap(false, true) {
		d, err := s.Store.LoadDispatch(ctx, id)
		if err != nil {
			return err
		}
		if _, err := s.Store.Interrupt(ctx, d.ThreadID, now); err != nil {
			return err
		}
	}
	return s.Store.RecordDispatchStart(ctx, id, token, instance, now)
}

// An attempt whose start the store refuses (superseded between its claim
// and its start) never reaches the agent; a client following its events
// still gets a closing run_finish (termination cancelled), as every run's
// stream ends with one — it used to end without any event (seen by the
// crash harness as a foreground stream ended without run_finish).
func TestAttemptRefusedAtStartClosesItsStreamWithRunFinish(t *testing.T) {
	r := newRigWith(t, newFake(1, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		return &interruptBeforeStart{Store: s}
	})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("hi")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "dispatch superseded", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusSuperseded })
	var l *engine.EventLog
	eventually(t, "the attempt's event log", func() bool { l = r.mb.Reattach("t1"); return l != nil })
	evs := execReadAll(t, l)
	if len(evs) == 0 || evs[len(evs)-1].Type != "run_finish" {
		t.Fatalf("events %v, want a closing run_finish", evs)
	}
	if n, _, _ := r.exec.stats(); n != 0 {
		t.Fatalf("the agent ran %d attempts, want none", n)
	}
}
