package engine

import (
	"context"
	"sync"
	"testing"
	"time"
)

type oneSlot struct{}

func (oneSlot) Run(context.Context, *RunRequest, EventSink) RunOutcome { return RunOutcome{} }
func (oneSlot) Capacity() int                                          { return 1 }
func (oneSlot) CapacityChanged() <-chan struct{}                       { return nil }

// A foreground submit that finds every slot taken, one only by a claim
// probing for due work, waits for that probe: when the probe finds
// nothing and gives its slot back, the submit takes it (it used to come
// back queued). With no probe in flight it does not wait.
func TestReserveSlotWaitsForAProbe(t *testing.T) {
	m := &Mailbox{exec: oneSlot{}}
	m.probeDone = sync.NewCond(&m.mu)
	m.inFlight, m.probes = 1, 1 // the only slot, held by a probe
	got := make(chan bool, 1)
	go func() { got <- m.reserveSlotAfterProbes("t") }()
	select {
	case ok := <-got:
		t.Fatalf("reserve returned %v while the probe held the only slot", ok)
	case <-time.After(20 * time.Millisecond):
	}
	// The probe found nothing: it gives the slot back (as tryDispatch does).
	m.mu.Lock()
	m.probes--
	m.inFlight--
	m.probeDone.Broadcast()
	m.mu.Unlock()
	if !<-got {
		t.Fatal("the slot the probe gave back was not taken")
	}
	if m.inFlight != 1 {
		t.Fatalf("inFlight %d, want 1", m.inFlight)
	}
	// No probe: a taken slot is taken, at once.
	if m.reserveSlotAfterProbes("t") {
		t.Fatal("reserved a slot that an attempt holds")
	}
}
