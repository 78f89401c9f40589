package hub_test

import (
	"context"
	"strings"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// A RUN whose payload exceeds max_frame cannot be sent. That is the run's
// problem, not the connection's: the other run on the connection must go
// on, and the oversized run must not be reported as "no agent connected"
// (Abandoned, requeued forever without spending an attempt).
func TestOversizedRunDoesNotKillConnection(t *testing.T) {
	r := newRig(t, hub.Config{MaxFrame: 1 << 10, AgentWait: 300 * time.Millisecond})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 4})
	eventually(t, "capacity", func() bool { return r.hub.Capacity() == 4 })

	ctx := context.Background()
	small := startRun(r.hub, ctx, request("small"))
	a.expect(ipc.TypeRun, 1)

	big := request("big")
	big.Messages = []engine.Message{{ID: "m1", Role: "user", Content: json.RawMessage(`"` + strings.Repeat("x", 2<<10) + `"`)}}
	bigCall := startRun(r.hub, ctx, big)
	o := bigCall.wait(t)
	t.Logf("oversized run: %+v", o)
	if o.Kind == engine.OutcomeAbandoned {
		t.Errorf("oversized RUN reported as %v (%s): it is requeued without spending an attempt and fails the same way forever", o.Kind, o.Error)
	}

	// The small run is still alive on the same connection.
	a.send(ipc.TypeFinish, 1, finishDone("ok"))
	if o := small.wait(t); o.Kind != engine.OutcomeCompleted {
		t.Fatalf("the other run on the connection ended %v (%s %s), want completed", o.Kind, o.ErrorCode, o.Error)
	}
}

// A live MESSAGES command larger than max_frame cannot be sent; the
// command fails, but the connection (and every run on it) must survive.
func TestOversizedCommandDoesNotKillConnection(t *testing.T) {
	r := newRig(t, hub.Config{MaxFrame: 1 << 10})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 4})
	eventually(t, "capacity", func() bool { return r.hub.Capacity() == 4 })

	cmds := make(chan engine.Command, 1)
	req := request("t1")
	req.Commands = cmds
	rc := startRun(r.hub, context.Background(), req)
	a.expect(ipc.TypeRun, 1)

	reply := make(chan error, 1)
	cmds <- engine.Command{Kind: engine.CommandMessages, Reply: reply,
		Messages: []engine.MessageRecord{{MessageID: "m2", ThreadID: "t1", Seq: 2,
			Message: engine.Message{ID: "m2", Role: "user", Content: json.RawMessage(`"` + strings.Repeat("y", 2<<10) + `"`)}}}}
	select {
	case err := <-reply:
		t.Logf("command reply: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no reply")
	}
	a.send(ipc.TypeFinish, 1, finishDone("ok"))
	if o := rc.wait(t); o.Kind != engine.OutcomeCompleted {
		t.Fatalf("run ended %v (%s %s) after an oversized command, want completed", o.Kind, o.ErrorCode, o.Error)
	}
}
