package engine_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// partialInterruptStore runs the real interrupt and then reports an error
// with its result, as a store does whose later commits of a long queue
// failed after the first took effect (engine.DispatchStore.Interrupt).
type partialInterruptStore struct {
	*badgerstore.Store
}

var errLaterCommit = fmt.Errorf("injected: a later commit of the interrupt failed: %w", engine.ErrUnavailable)

func (s partialInterruptStore) Interrupt(ctx context.Context, threadID string, now int64) (engine.InterruptResult, error) {
	res, err := s.Store.Interrupt(ctx, threadID, now)
	if err != nil {
		return res, err
	}
	return res, errLaterCommit
}

// An interrupt whose first commit took effect and whose later commits
// failed is answered with the error, but the engine acts on what took
// effect: the running run is cancelled, as after a whole interrupt.
func TestAnInterruptThatTookEffectCancelsTheRunningRunDespiteItsError(t *testing.T) {
	started, stopped := make(chan struct{}), make(chan struct{})
	exec := newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		close(started)
		<-ctx.Done()
		close(stopped)
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	})
	r := newRigWith(t, exec, engine.Config{}, func(s *badgerstore.Store) engine.Store { return partialInterruptStore{s} })
	r.start(t)
	ctx := context.Background()
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("x")}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the run did not start")
	}
	res, err := r.mb.Interrupt(ctx, "t")
	if !errors.Is(err, errLaterCommit) || res.NewEpoch != 1 || res.Active == nil {
		t.Fatalf("interrupt = %+v, %v; want the store's error with epoch 1 and the active dispatch", res, err)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the running run was not cancelled by an interrupt that took effect")
	}
}
