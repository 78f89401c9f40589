package engine_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// sweepGate holds the maintenance loop's first sweep (a ReclaimExpired
// after Start's recovery) until released, as a hung disk would.
type sweepGate struct {
	*badgerstore.Store
	calls            atomic.Int32
	entered, release chan struct{}
}

func (g *sweepGate) ReclaimExpired(ctx context.Context, now int64, limit int) ([]engine.Dispatch, error) {
	if g.calls.Add(1) == 2 { // the first is Start's recovery
		close(g.entered)
		<-g.release
	}
	return g.Store.ReclaimExpired(ctx, now, limit)
}

// Alive names a loop stuck in one round (here the maintenance loop, in a
// store call that does not return) once it has been stuck for longer
// than the limit, and only then; loops waiting for work are alive however
// long they wait.
func TestAliveReportsALoopStuckInOneRound(t *testing.T) {
	gate := &sweepGate{entered: make(chan struct{}), release: make(chan struct{})}
	r := newRigWith(t, newFake(1, complete), engine.Config{SweepInterval: 20 * time.Millisecond}, func(s *badgerstore.Store) engine.Store {
		gate.Store = s
		return gate
	})
	var once sync.Once
	release := func() { once.Do(func() { close(gate.release) }) }
	t.Cleanup(release) // runs before the rig's Stop, which waits for the loop
	if err := r.mb.Alive(time.Now().Add(time.Hour), time.Minute); err != nil {
		t.Fatalf("before start: %v", err)
	}
	r.start(t)
	<-gate.entered
	if err := r.mb.Alive(time.Now(), time.Minute); err != nil {
		t.Fatalf("stuck for less than the limit: %v", err)
	}
	err := r.mb.Alive(time.Now().Add(2*time.Minute), time.Minute)
	if err == nil || !strings.Contains(err.Error(), "maintenance") {
		t.Fatalf("stuck for longer than the limit: %v, want the maintenance loop named", err)
	}
	release()
	eventually(t, "the loop idle again", func() bool {
		return r.mb.Alive(time.Now().Add(time.Hour), time.Minute) == nil
	})
}
