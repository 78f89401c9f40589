package agent

import (
	"context"
	"strings"
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
