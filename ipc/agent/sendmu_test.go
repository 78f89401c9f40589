package agent

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// A run's sendMu orders its frames; it is released once the frame's place
// in the stream is fixed, not held while the frame waits for its write.
// The connection's reader takes it to ack a command: held across a write
// (a sidecar slow to read) or a yield, it would stall the reader, and so
// every run on the connection, behind one run's CHECKPOINT.
func TestSendMuIsNotHeldWhileACheckpointWaitsForItsWrite(t *testing.T) {
	runs := make(chan *Run, 1)
	done := make(chan error, 1)
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		runs <- run
		// Far more than the socket buffer: the write blocks while the
		// sidecar does not read.
		text := strings.Repeat("x", 4<<20)
		done <- run.Checkpoint(ctx, Checkpoint{Messages: []Message{TextMessage(RoleAssistant, text)}})
		return Cancelled()
	})
	sc := serveRaw(t, Config{Handler: handler, Logger: testLogger(), ShutdownGrace: -1, MaxBackoff: time.Hour, MinBackoff: time.Hour}, time.Hour)
	sc.w.WriteFrame(ipc.TypeRun, 0, 1, rawRun("r"))
	run := <-runs
	// The CHECKPOINT is numbered (under sendMu) before it is sent.
	deadline := time.Now().Add(10 * time.Second)
	for {
		run.mu.Lock()
		n := len(run.pending)
		run.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the checkpoint was never numbered")
		}
		time.Sleep(time.Millisecond)
	}
	for !run.sendMu.TryLock() {
		if time.Now().After(deadline) {
			t.Fatal("sendMu still held 10 s after the CHECKPOINT began: it is held while the frame waits for its write")
		}
		time.Sleep(time.Millisecond)
	}
	run.sendMu.Unlock()
	select {
	case err := <-done:
		t.Fatalf("the checkpoint returned (%v) although the sidecar read nothing", err)
	default:
	}

	// The sidecar reads the CHECKPOINT and acks it; the run ends.
	for {
		f, err := sc.r.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		typ := f.Type
		f.Release()
		if typ == ipc.TypeCheckpoint {
			break
		}
	}
	sc.w.WriteFrame(ipc.TypeCheckpointAck, 0, 1, []byte(`{"seq":1}`))
	if err := <-done; err != nil {
		t.Fatalf("checkpoint: %v", err)
	}
}

// A CANCEL acts as soon as the agent reads it, even while the sidecar
// reads nothing and the run's writes, the CANCEL's ack among them, are
// blocked: the ack has its place in the stream (after the run's frames),
// and the command acts then, not once the ack is written.
func TestCancelActsWhileTheSidecarIsNotReading(t *testing.T) {
	cancelled := make(chan error, 1)
	var emitted atomic.Int64
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		stop := context.AfterFunc(ctx, func() { cancelled <- context.Cause(ctx) })
		defer stop()
		big := map[string]string{"type": "text_delta", "delta": strings.Repeat("x", 32<<10)}
		for run.Emit(big) == nil && ctx.Err() == nil {
			emitted.Add(1)
		}
		return Cancelled()
	})
	sc := serveRaw(t, Config{Handler: handler, Logger: testLogger(), ShutdownGrace: -1, MaxBackoff: time.Hour, MinBackoff: time.Hour}, time.Hour)
	sc.w.WriteFrame(ipc.TypeRun, 0, 1, rawRun("r"))
	// The run's events fill the socket: wait until its writes block (no
	// event emitted for 200 ms).
	deadline := time.Now().Add(10 * time.Second)
	for last := int64(-1); ; {
		time.Sleep(200 * time.Millisecond)
		n := emitted.Load()
		if n == last && n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the run's writes never blocked (%d events)", n)
		}
		last = n
	}
	sc.w.WriteFrame(ipc.TypeCancel, 0, 1, []byte(`{"cmd":"c1"}`))
	select {
	case cause := <-cancelled:
		if !errors.Is(cause, ErrCancelled) {
			t.Fatalf("run cancelled with %v, want ErrCancelled", cause)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the CANCEL did not act within 10 s while the sidecar read nothing")
	}
}
