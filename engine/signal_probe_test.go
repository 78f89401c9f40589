package engine_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// gatedSigStore is a sigStore whose claims of thread gated wait for gate
// and then find nothing, as a claim a probe of a signal makes while
// another process took the work.
type gatedSigStore struct {
	*sigStore
	gated   string
	gate    chan struct{}
	entered chan struct{}
	once    sync.Once
}

func (s *gatedSigStore) ClaimStart(ctx context.Context, thread, consumer string, lease time.Duration, instance string, now int64) (*engine.Dispatch, error) {
	if thread == s.gated {
		s.once.Do(func() { close(s.entered) })
		<-s.gate
		return nil, nil
	}
	return s.sigStore.ClaimStart(ctx, thread, consumer, lease, instance, now)
}

// listGatedSigStore is a gatedSigStore whose listing of ready threads
// waits for listGate once armed, and says when it entered.
type listGatedSigStore struct {
	*gatedSigStore
	armed       atomic.Bool
	listGate    chan struct{}
	listEntered chan struct{}
	listOnce    sync.Once
}

func (s *listGatedSigStore) ReadyThreads(ctx context.Context, now int64, after engine.ReadyEntry, limit int) ([]engine.ReadyEntry, int64, error) {
	if s.armed.Load() {
		s.listOnce.Do(func() { close(s.listEntered) })
		<-s.listGate
	}
	return s.gatedSigStore.ReadyThreads(ctx, now, after, limit)
}

// probeHoldsTheOnlySlot starts a mailbox with one slot on store (whose
// sigStore is gs's) with sweeps an hour apart, delivers a signal for
// thread "probed", whose claim then waits for gs.gate, and queues work on
// thread "waiting" without a signal, past the shared claim grace: only
// the dispatcher takes it. The gates are opened at cleanup.
func probeHoldsTheOnlySlot(t *testing.T, gs *gatedSigStore, store engine.Store, gates ...chan struct{}) (*engine.Mailbox, engine.Dispatch) {
	t.Helper()
	cfg := sigConfig()
	cfg.SweepInterval = time.Hour
	cfg.SharedClaimGrace = time.Millisecond
	mb := liveMailbox(t, store, newFake(1, complete), cfg)
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, c := range append(gates, gs.gate) {
		t.Cleanup(func() {
			select {
			case <-c:
			default:
				close(c)
			}
		})
	}
	gs.push(&sigSignal{thread: "probed", dispatch: "gone"})
	<-gs.entered // the probe holds the only slot
	d := livePrepared(t, mb, liveReq("waiting", "w"))
	if _, err := gs.Store.Enqueue(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond) // past the shared claim grace
	return mb, d
}

func newGatedSigStore(t *testing.T) *gatedSigStore {
	return &gatedSigStore{sigStore: newSigStore(t, false), gated: "probed", gate: make(chan struct{}), entered: make(chan struct{})}
}

// The same, when the probe lets its slot go while the dispatcher, which
// found no slot, lists the threads that wait: the probe reads that the
// dispatcher is not starved yet, and does not wake it; the dispatcher,
// having said it is, looks at the slots again (found by review: it
// slept with a free slot).
func TestASlotLetGoWhileTheDispatcherListsIsSeen(t *testing.T) {
	gs := &listGatedSigStore{gatedSigStore: newGatedSigStore(t), listGate: make(chan struct{}), listEntered: make(chan struct{})}
	mb, d := probeHoldsTheOnlySlot(t, gs.gatedSigStore, gs, gs.listGate)
	gs.armed.Store(true)
	mb.Sweep(context.Background()) // the dispatcher looks: no slot; it lists the waiting threads
	<-gs.listEntered
	close(gs.gate) // the probe finds nothing and lets the slot go meanwhile
	eventually(t, "the probe's slot let go", func() bool { return mb.InFlight() == 0 })
	gs.armed.Store(false)
	close(gs.listGate)
	eventually(t, "the waiting work run", func() bool {
		return dispatchStatus(t, gs.Store, d.DispatchID) == engine.StatusAcked
	})
}

// A signal's probe that held the only slot and found nothing wakes the
// dispatcher when it lets the slot go: the dispatcher looked meanwhile,
// found no slot for the work that waited, and slept (found by review:
// that work waited for the next sweep or some other wake). Nothing else
// wakes it here: the waiting work has no signal and sweeps are an hour
// apart.
func TestASignalProbeThatFindsNothingWakesTheDispatcher(t *testing.T) {
	gs := newGatedSigStore(t)
	mb, d := probeHoldsTheOnlySlot(t, gs, gs)
	mb.Sweep(context.Background()) // the dispatcher looks: no slot
	time.Sleep(100 * time.Millisecond)
	if st := dispatchStatus(t, gs.Store, d.DispatchID); st != engine.StatusQueued {
		t.Fatalf("the waiting work is %s while the probe holds the only slot; want queued", st)
	}
	close(gs.gate)
	eventually(t, "the waiting work run once the probe let the slot go", func() bool {
		return dispatchStatus(t, gs.Store, d.DispatchID) == engine.StatusAcked
	})
}
