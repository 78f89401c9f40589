package hub_test

import (
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// spec/ipc.md: a peer silent for 3 × heartbeat_ms is dead. The hub counts
// silent ticks of its heartbeat ticker, so an agent whose last frame came
// just after a tick is declared dead only after almost 4 heartbeats.
func TestSilentAgentDeadAfterThreeHeartbeats(t *testing.T) {
	const hb = 400 * time.Millisecond
	r := newRig(t, hub.Config{Heartbeat: hb})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	// The hub's first PING comes on a tick of its ticker; answer at once,
	// then stay silent.
	f, err := a.readErr(time.Second)
	if err != nil || f.Type != ipc.TypePing {
		t.Fatalf("first frame %v %v", f.Type, err)
	}
	a.send(ipc.TypePong, 0, f.Payload)
	lastFrame := time.Now()
	for {
		f, err := a.readErr(5 * time.Second)
		if err != nil {
			t.Fatalf("no heartbeat_timeout: %v", err)
		}
		if f.Type == ipc.TypeError {
			break
		}
	}
	silent := time.Since(lastFrame)
	t.Logf("declared dead after %v of silence (3 × heartbeat = %v)", silent, 3*hb)
	// The hub checks four times per heartbeat, so death comes by 3¼ ×
	// heartbeat; counting silent ticks it came near 4 ×. The bound sits
	// between the two with room for a loaded CI machine on each side.
	if silent > 3*hb+5*hb/8 {
		t.Fatalf("agent silent for %v was declared dead only then; spec: dead after 3 × %v = %v", silent, hb, 3*hb)
	}
}
