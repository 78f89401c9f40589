package engine

import "testing"

// oneAgent is a SlotCounter of one agent id, with a free slot.
type oneAgent struct{ id string }

func (a oneAgent) FreeSlots() []AgentSlots { return []AgentSlots{{AgentIDs: []string{a.id}, Free: 1}} }
func (a oneAgent) Serves(id string) bool   { return id == a.id }

// A request without an agent id is for agent "default", unless it
// continues a run (a run id or decisions), whose own agent id is not
// known here: that one is taken for served (found by review: a decision
// for agent "other" was queued for want of a "default" agent).
func TestServedWithSlotTakesTheRunsAgentID(t *testing.T) {
	m := &Mailbox{slots: oneAgent{"other"}}
	for _, c := range []struct {
		name string
		req  SubmitRequest
		want bool
	}{
		{"no agent id", SubmitRequest{}, false},
		{"the served agent", SubmitRequest{AgentID: "other"}, true},
		{"another agent", SubmitRequest{AgentID: "third"}, false},
		{"a continuation", SubmitRequest{ContinueRunID: "r1"}, true},
		{"decisions", SubmitRequest{Decisions: []Decision{{CallID: "c"}}}, true},
	} {
		if got := m.servedWithSlot(&c.req); got != c.want {
			t.Errorf("%s: servedWithSlot = %v, want %v", c.name, got, c.want)
		}
	}
	m.slots = oneAgent{DefaultAgentID}
	if !m.servedWithSlot(&SubmitRequest{}) {
		t.Errorf("no agent id, a %q agent with a free slot: not served", DefaultAgentID)
	}
}
