package hub

import (
	"fmt"
	"testing"
	"time"
)

// A timed-out command leaves a marker so that its late ACK is known, and
// the marker goes after lateAckWindow (dropExpired): a run whose agent
// never answers does not keep one per command for its whole life (found
// by review).
func TestExpiredCommandsAreForgotten(t *testing.T) {
	st := &stream{pending: make(map[string]*pendingCmd)}
	for i := range 1000 {
		id := fmt.Sprint(i)
		st.addPending(id, &pendingCmd{})
		if st.expire(id) == nil {
			t.Fatalf("command %s did not wait", id)
		}
		if st.expire(id) != nil || st.takePending(id) != expiredCmd {
			t.Fatalf("command %s: expired twice, or its marker gone", id)
		}
		st.pending[id] = expiredCmd
		st.dropExpired(id)
	}
	if n := len(st.pending); n != 0 {
		t.Fatalf("%d markers left", n)
	}
	st.addPending("live", &pendingCmd{})
	st.dropExpired("live") // only markers go
	if st.takePending("live") == nil || st.takePending("live") != nil {
		t.Fatal("dropExpired took a command still waiting")
	}
}

// ack_by falls in a millisecond before the deadline's, whatever the time
// left, or the command is not sent: an agent accepts through ack_by's
// millisecond, so one reading the command at the engine's deadline would
// take messages the engine has queued (found by review: with under 2 ms
// left, ack_by fell in the deadline's own millisecond).
func TestCommandAckByFallsBeforeTheDeadlinesMillisecond(t *testing.T) {
	base := time.UnixMilli(1_800_000_000_000)
	sent := 0
	for now := base; now.Before(base.Add(5 * time.Millisecond)); now = now.Add(37 * time.Microsecond) {
		for left := time.Duration(0); left < 6*time.Millisecond; left += 13 * time.Microsecond {
			deadline := now.Add(left)
			ackBy, ok := commandAckBy(now, deadline)
			if !ok {
				if deadline.UnixMilli()-now.UnixMilli() > 1 {
					t.Fatalf("now %v, %v left: not sent, though a whole millisecond was left", now.Sub(base), left)
				}
				continue
			}
			sent++
			if ackBy >= deadline.UnixMilli() || ackBy < now.UnixMilli() {
				t.Fatalf("now %v, %v left: ack_by %d outside [%d, %d)", now.Sub(base), left, ackBy, now.UnixMilli(), deadline.UnixMilli())
			}
		}
	}
	if ackBy, _ := commandAckBy(base, base.Add(2*time.Second)); ackBy != base.Add(time.Second).UnixMilli() {
		t.Fatalf("ack_by %d with 2s left, want half of it", ackBy)
	}
	t.Logf("%d sent", sent)
}
