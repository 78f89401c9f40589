package engine_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// recoveryGate holds the first ReclaimExpired (the start of a recovery)
// until released.
type recoveryGate struct {
	*badgerstore.Store
	entered, release chan struct{}
	held             bool
}

func (g *recoveryGate) ReclaimExpired(ctx context.Context, now int64, limit int) ([]engine.Dispatch, error) {
	if !g.held {
		g.held = true
		close(g.entered)
		<-g.release
	}
	return g.Store.ReclaimExpired(ctx, now, limit)
}

// A Stop that runs while Start is still recovering makes that Start fail
// with ErrShuttingDown instead of launching its loops after Stop returned
// (found by review: Stop found no loops to stop and returned, and Start
// then started the dispatcher and the maintenance loop anyway).
func TestStopDuringStartStopsIt(t *testing.T) {
	gate := &recoveryGate{entered: make(chan struct{}), release: make(chan struct{})}
	r := newRigWith(t, newFake(1, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		gate.Store = s
		return gate
	})
	started := make(chan error, 1)
	go func() { started <- r.mb.Start(context.Background()) }()
	<-gate.entered
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.mb.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	close(gate.release)
	if err := <-started; !errors.Is(err, engine.ErrShuttingDown) {
		t.Fatalf("Start during Stop returned %v, want ErrShuttingDown", err)
	}
}
