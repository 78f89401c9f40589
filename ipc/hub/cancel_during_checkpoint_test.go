package hub_test

import (
	"context"
	"sync"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// A cancel that arrives while the run's checkpoint is being stored (a
// slow store commit) reaches the agent at once, not after the commit: the
// agent gets CANCEL while the checkpoint is still held, and the
// checkpoint is answered when it is durable. (On a loaded NATS store the
// CANCEL came 115–270 ms late, after the commit.)
func TestCancelReachesTheAgentDuringACheckpointCommit(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	inCommit, held := make(chan struct{}), make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(held) }) }
	t.Cleanup(release) // before the rig closes, should the test fail holding it
	req := request("t1")
	req.Checkpoint = func(context.Context, engine.RunCheckpoint) error {
		close(inCommit)
		<-held // the store's commit takes its time
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	rc := startRun(r.hub, ctx, req)
	a.expect(ipc.TypeRun, 1)
	a.send(ipc.TypeCheckpoint, 1, `{"seq":1,"messages":[{"role":"assistant","content":"x"}]}`)
	<-inCommit
	cancel()
	a.expect(ipc.TypeCancel, 1) // while the checkpoint is still held
	release()
	a.expect(ipc.TypeCheckpointAck, 1)
	a.send(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"cancelled"}}`)
	if o := rc.wait(t); o.Kind != engine.OutcomeCompleted || o.Termination.Type != "cancelled" {
		t.Fatalf("outcome %+v", o)
	}
}
