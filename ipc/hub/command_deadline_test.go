package hub_test

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// A live command's wait ends at the engine's deadline, however long it
// waited for the run's loop (here: behind a checkpoint's commit), and
// its ack_by falls before that deadline: an agent that honours ack_by
// never takes messages the engine has queued already (found by review:
// ack_by was counted from the pickup, after the engine's fallback).
func TestALiveCommandKeepsTheEnginesDeadline(t *testing.T) {
	r := newRig(t, hub.Config{CommandTimeout: time.Hour})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	inCommit, held := make(chan struct{}), make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(held) }) }
	t.Cleanup(release)
	cmds := make(chan engine.Command, 16)
	req := request("t1")
	req.Commands = cmds
	req.Checkpoint = func(context.Context, engine.RunCheckpoint) error { close(inCommit); <-held; return nil }
	rc := startRun(r.hub, context.Background(), req)
	a.expect(ipc.TypeRun, 1)
	a.send(ipc.TypeCheckpoint, 1, `{"seq":1,"messages":[{"role":"assistant","content":"x"}]}`)
	<-inCommit

	// Handed over while the loop commits: one whose deadline passes
	// before the loop picks it up, one with time left then.
	gone, later := make(chan error, 1), make(chan error, 1)
	start := time.Now()
	cmds <- engine.Command{Kind: engine.CommandMessages, Reply: gone, Deadline: start.Add(50 * time.Millisecond)}
	deadline := start.Add(400 * time.Millisecond)
	cmds <- engine.Command{Kind: engine.CommandMessages, Reply: later, Deadline: deadline}
	time.Sleep(150 * time.Millisecond)
	release()
	a.expect(ipc.TypeCheckpointAck, 1)
	if err := <-gone; !errors.Is(err, hub.ErrCommandTimeout) {
		t.Fatalf("a command past its deadline at pickup replied %v, want ErrCommandTimeout", err)
	}
	f := a.expect(ipc.TypeMessages, 1) // only the second one is sent
	var cmd ipc.Command
	json.Unmarshal(f.Payload, &cmd)
	if due := time.UnixMilli(cmd.AckBy); !due.Before(deadline) || due.Before(start.Add(150*time.Millisecond)) {
		t.Fatalf("ack_by %v after the hand-over, want between the pickup (150ms) and the deadline (400ms)", due.Sub(start))
	}
	// Unanswered: not delivered at the engine's deadline, not an hour on.
	select {
	case err := <-later:
		if !errors.Is(err, hub.ErrCommandTimeout) {
			t.Fatalf("unanswered command replied %v", err)
		}
		if took := time.Since(start); took < 350*time.Millisecond || took > 5*time.Second {
			t.Fatalf("timed out %v after the hand-over, want at its deadline (400ms)", took)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the command's wait outlived the engine's deadline")
	}
	a.send(ipc.TypeFinish, 1, finishDone(""))
	rc.wait(t)
}
