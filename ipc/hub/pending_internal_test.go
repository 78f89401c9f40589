package hub

import (
	"fmt"
	"testing"
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
