package engine

import "testing"

// A thread admitted from a hold for a full agent whose claim finds no
// slot left gets its hold back (notClaimed), unless what ends such holds
// came while it was in transit: a submit, a cancel or an interrupt of the
// thread (releaseAgentHold), or agents coming or going
// (releaseAgentHoldsLocked). Its new work, maybe for another agent, must
// not wait behind the old hold (found by review: the hold came back, up
// to a minute).
func TestAHoldReleasedInTransitDoesNotComeBack(t *testing.T) {
	const now = int64(1_000_000)
	for _, release := range []struct {
		name string
		do   func(m *Mailbox)
	}{
		{"none", func(*Mailbox) {}},
		{"a submit", func(m *Mailbox) { m.releaseAgentHold("t") }},
		{"agents came", func(m *Mailbox) {
			m.mu.Lock()
			m.releaseAgentHoldsLocked(nil)
			m.mu.Unlock()
		}},
	} {
		t.Run(release.name, func(t *testing.T) {
			m := &Mailbox{exec: oneSlot{}, slots: noSlots{}, threads: map[string]*execution{}}
			m.cfg.Now = func() int64 { return now }
			m.mu.Lock()
			m.holdForAgentLocked("t", "d1", CodeAgentBusy, "full", 0, 0, now)
			if !m.admitLocked("t", now, &slotBudget{agents: []AgentSlots{{Free: 1, AgentIDs: []string{"full"}}}}, true) {
				m.mu.Unlock()
				t.Fatal("the thread was not admitted to the free slot")
			}
			m.mu.Unlock()
			release.do(m)
			m.notClaimed("t") // its claim found no slot left
			m.mu.Lock()
			defer m.mu.Unlock()
			h, held := m.held["t"]
			if want := release.name == "none"; held != want || held && (!h.busy || h.until <= now) {
				t.Fatalf("held %v (%+v) after the claim found no slot, want held for the full agent: %v", held, h, want)
			}
			if len(m.busyInTransit) != 0 {
				t.Fatalf("still in transit: %v", m.busyInTransit)
			}
		})
	}
}

// noSlots is a SlotCounter with no free slot, serving every agent id.
type noSlots struct{}

func (noSlots) FreeSlots() []AgentSlots { return nil }
func (noSlots) Serves(string) bool      { return true }

// A submit ends its thread's hold for lack of an agent, unless that hold
// was set because no agent took the very dispatch it submitted: the
// dispatcher claimed it as soon as it was durable, and it was refused.
// Ending that hold made the submit's own claim try it again at once, only
// to be refused again.
func TestASubmitLeavesTheHoldItsOwnDispatchSet(t *testing.T) {
	const now = int64(1_000_000)
	m := &Mailbox{exec: oneSlot{}, slots: noSlots{}, threads: map[string]*execution{}}
	m.cfg.Now = func() int64 { return now }
	m.mu.Lock()
	m.holdForAgentLocked("t", "d1", CodeAgentBusy, "full", 0, 0, now)
	m.mu.Unlock()
	m.releaseAgentHoldAfter("t", "d1")
	if !m.heldForAgentLocked("t", now) {
		t.Fatal("the submit of d1 ended the hold its own refusal set")
	}
	m.releaseAgentHoldAfter("t", "d2")
	if m.heldForAgentLocked("t", now) {
		t.Fatal("the submit of d2 left the hold d1's refusal set")
	}
}

// A submit while a claim of its thread is in flight marks the claim: the
// attempt it starts sets no hold for lack of an agent, unless the claim
// took the very dispatch submitted (it saw the change). Another submit,
// a cancel or an interrupt marks it for any dispatch; so does any change
// of the queue while an attempt of another dispatch runs.
func TestAChangeOfTheQueueMarksTheAttemptInFlight(t *testing.T) {
	m := &Mailbox{exec: oneSlot{}, threads: map[string]*execution{}}
	m.cfg.Now = func() int64 { return 1 }
	claim := &execution{claiming: true}
	m.threads["t"] = claim
	m.releaseAgentHoldAfter("t", "d1")
	if claim.claimSawNot("d1") || !claim.claimSawNot("d0") {
		t.Fatalf("after the submit of d1: a claim of d1 saw no change %v, of d0 %v; want false, true", claim.claimSawNot("d1"), claim.claimSawNot("d0"))
	}
	m.releaseAgentHoldAfter("t", "d2")
	if !claim.claimSawNot("d1") || !claim.claimSawNot("d2") {
		t.Fatal("after the submits of d1 and d2, a claim of either saw both")
	}
	claim = &execution{claiming: true}
	m.threads["t"] = claim
	m.releaseAgentHold("t") // a cancel or an interrupt
	if !claim.claimSawNot("d1") {
		t.Fatal("a cancel while the claim was in flight left it unmarked")
	}
	run := &execution{dispatch: Dispatch{DispatchID: "d0"}}
	m.threads["t"] = run
	m.releaseAgentHoldAfter("t", "d0")
	if run.queueChanged {
		t.Fatal("the submit of the attempt's own dispatch marked it")
	}
	m.releaseAgentHoldAfter("t", "d1")
	if !run.queueChanged {
		t.Fatal("a submit of other work left the attempt of d0 unmarked")
	}
}
