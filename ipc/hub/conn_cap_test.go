package hub_test

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// Past MaxConns a new agent connection is answered ERROR busy on stream
// 0 and closed; the connections open go on, and one closing makes room.
func TestAgentConnectionsPastTheCapAreRefused(t *testing.T) {
	t.Parallel()
	r := newRig(t, hub.Config{MaxConns: 2})
	a1, _ := connect(t, r.path, ipc.Hello{AgentIDs: []string{"default"}, MaxRuns: 1})
	a2, _ := connect(t, r.path, ipc.Hello{AgentIDs: []string{"default"}, MaxRuns: 1})
	// A connection counts from its accept; the check on the last one
	// waits for both to be registered, past their handshakes.
	eventually(t, "two connections", func() bool { return r.hub.Connections() == 2 })
	a3 := dial(t, r.path)
	a3.send(ipc.TypeHello, 0, ipc.Hello{Protocol: ipc.ProtocolVersion, AgentIDs: []string{"default"}, MaxRuns: 1})
	st := findError(t, a3.expectClosed())
	if st.Code != ipc.CodeBusy || !strings.Contains(st.Message, "--max-agent-conns") {
		t.Fatalf("a third connection: %+v", st)
	}
	if n := refusedConns(t, r.hub); n != 1 {
		t.Fatalf("mailbox_agent_connections_refused_total %d, want 1", n)
	}
	// The connections open go on.
	a1.send(ipc.TypePing, 0, []byte("12345678"))
	if f, err := a1.readErr(5 * time.Second); err != nil || f.Type != ipc.TypePong || string(f.Payload) != "12345678" {
		t.Fatalf("the answer to a PING: %s %q %v", f.Type, f.Payload, err)
	}
	a2.nc.Close()
	eventually(t, "the closed connection gone", func() bool { return r.hub.Connections() == 1 })
	connect(t, r.path, ipc.Hello{AgentIDs: []string{"default"}, MaxRuns: 1})
	eventually(t, "two connections again", func() bool { return r.hub.Connections() == 2 })
}

// The Go SDK refused for want of room retries after its backoff and
// connects once a connection closes.
func TestAnSDKAgentRefusedForRoomConnectsWhenRoomFrees(t *testing.T) {
	t.Parallel()
	st := newStack(t, hub.Config{MaxConns: 1})
	held, _ := connect(t, st.path, ipc.Hello{AgentIDs: []string{"other"}, MaxRuns: 1})
	eventually(t, "the raw agent registered", func() bool { return st.hub.Connections() == 1 })
	st.serveSDK(t, agent.Config{MaxRuns: 3, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		Handler: agent.HandlerFunc(func(context.Context, *agent.Run) agent.Result { return agent.Done("") })})
	eventually(t, "the SDK refused twice", func() bool { return refusedConns(t, st.hub) >= 2 })
	if c := st.hub.Capacity(); c != 1 {
		t.Fatalf("capacity %d while the SDK is refused, want the raw agent's 1", c)
	}
	held.nc.Close()
	eventually(t, "the SDK connected", func() bool { return st.hub.Capacity() == 3 })
}

// refusedConns reads mailbox_agent_connections_refused_total.
func refusedConns(t *testing.T, h *hub.Hub) int {
	t.Helper()
	var m bytes.Buffer
	h.Metrics().WritePrometheus(&m)
	const name = "mailbox_agent_connections_refused_total "
	for _, l := range strings.Split(m.String(), "\n") {
		if v, ok := strings.CutPrefix(l, name); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("%s%s: %v", name, v, err)
			}
			return n
		}
	}
	t.Fatalf("no %s in the hub's metrics", name)
	return 0
}
