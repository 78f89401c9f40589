package pythonagent_test

import (
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// TestPythonAgentRefusesALiveDecisionWithoutASuspendedCall: a DECISION
// may be acked accepted:true only when the run has that suspended tool
// call (docs/protocol.md, "Live commands"). This agent calls no tools, so
// it refuses every live DECISION, with a reason, and its run goes on as if
// none had come.
func TestPythonAgentRefusesALiveDecisionWithoutASuspendedCall(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t)
	startAgent(t, nil, "--socket", sc.path)
	c := sc.accept(t)
	c.expect(ipc.TypeHello, 0)
	c.welcome(5000)

	c.run(1, "sleep 300")
	c.expectEvent(1, "run_start")
	c.expectDelta(1, "echo: sleep 300")
	c.sendJSON(ipc.TypeDecision, 1, ipc.Command{Cmd: "c-dec", Decisions: []byte(`[{"call_id":"call-1","resume":{"approved":true}}]`)})
	ack := decode[ipc.CommandAck](t, c.expect(ipc.TypeCommandAck, 1))
	if ack.Cmd != "c-dec" || ack.Accepted {
		t.Fatalf("COMMAND_ACK %+v, want cmd c-dec accepted:false", ack)
	}
	if !strings.Contains(ack.Reason, "call-1") {
		t.Errorf("COMMAND_ACK reason %q does not name the call", ack.Reason)
	}
	// The refused decision is not used: the reply is the echo alone.
	c.checkpoint(1, "echo: sleep 300", true)
	c.expectRunFinish(1, engine.TermNaturalEnd)
	c.expectFinish(1, engine.TermNaturalEnd, "echo: sleep 300", "")
}

// TestPythonAgentClosesOnAPingThatIsNot8Bytes: a PING payload of any
// other length is a protocol error (docs/protocol.md, "Errors"): ERROR
// protocol_error on stream 0, close, and connect again.
func TestPythonAgentClosesOnAPingThatIsNot8Bytes(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t)
	startAgent(t, nil, "--socket", sc.path)
	for _, size := range []int{7, 9, 0} {
		c := sc.accept(t)
		c.expect(ipc.TypeHello, 0)
		c.welcome(5000)
		c.send(ipc.TypePing, 0, make([]byte, size))
		st := decode[ipc.Status](t, c.expect(ipc.TypeError, 0))
		if st.Code != ipc.CodeProtocolError || !strings.Contains(st.Message, "PING") {
			t.Fatalf("PING of %d bytes: ERROR %+v, want code %q about the PING", size, st, ipc.CodeProtocolError)
		}
		c.expectEOF()
	}
	c := sc.accept(t)
	c.expect(ipc.TypeHello, 0)
}
