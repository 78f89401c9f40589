package hub_test

import (
	"context"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// An agent with max_runs 1 that does not finish a cancelled run within
// CancelGrace is still executing it: its only slot is taken until its
// FINISH (or the connection ends). The hub gives up on the run, but must
// not hand that slot to another run meanwhile.
func TestCancelGraceKeepsSlotTaken(t *testing.T) {
	r := newRig(t, hub.Config{CancelGrace: 100 * time.Millisecond, AgentWait: 2 * time.Second})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 1})
	eventually(t, "capacity", func() bool { return r.hub.Capacity() == 1 })

	ctx, cancel := context.WithCancel(context.Background())
	first := startRun(r.hub, ctx, request("t1"))
	a.expect(ipc.TypeRun, 1)
	cancel()
	a.expect(ipc.TypeCancel, 1) // the agent acks nothing and keeps running stream 1
	if o := first.wait(t); o.ErrorCode != "cancel_timeout" {
		t.Fatalf("first run: %+v, want cancel_timeout", o)
	}

	frames := make(chan frame, 16)
	go func() {
		defer close(frames)
		for {
			f, err := a.readErr(3 * time.Second)
			if err != nil {
				return
			}
			frames <- f
		}
	}()
	second := startRun(r.hub, context.Background(), request("t2"))
	select {
	case f := <-frames:
		if f.Type == ipc.TypeRun {
			t.Fatalf("got RUN on stream %d while stream 1 (max_runs 1) has not finished: the agent now runs 2 at once", f.Stream)
		}
		t.Fatalf("unexpected %s", f.Type)
	case <-time.After(500 * time.Millisecond):
	}
	// Once the agent finishes stream 1, the slot is free for the next run.
	a.send(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"cancelled"}}`)
	if f := <-frames; f.Type != ipc.TypeRun || f.Stream != 2 {
		t.Fatalf("got %s on %d, want RUN on 2", f.Type, f.Stream)
	}
	a.send(ipc.TypeFinish, 2, finishDone("ok"))
	if o := second.wait(t); o.Kind != engine.OutcomeCompleted {
		t.Fatalf("second run: %+v", o)
	}
}
