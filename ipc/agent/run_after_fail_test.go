package agent

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// "A lost connection cancels every run on it (context cause
// ErrConnectionLost)." A RUN that the reader had already buffered when the
// connection failed is still started afterwards, with a context nobody
// cancels: the handler runs to the end on a dead connection while the
// sidecar retries the run elsewhere.
func TestRunBufferedAtFailureIsCancelled(t *testing.T) {
	path := socketPath(t)
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	second := make(chan error, 1)
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "r1" { // emits until the connection breaks
			big := map[string]string{"type": "text_delta", "delta": strings.Repeat("x", 32<<10)}
			for run.Emit(big) == nil && ctx.Err() == nil {
			}
			return Cancelled()
		}
		select {
		case <-ctx.Done():
			second <- context.Cause(ctx)
		case <-time.After(2 * time.Second):
			second <- nil
		}
		return Cancelled()
	})
	c, err := New(Config{Socket: path, Handler: handler, MaxRuns: 2, Logger: testLogger(), ShutdownGrace: -1, MinBackoff: time.Hour, MaxBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- c.Serve(ctx) }()
	defer func() { cancel(); <-served }()

	nc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	r := ipc.NewReader(nc, ipc.ReaderConfig{})
	w := ipc.NewWriter(nc, ipc.WriterConfig{})
	if f, err := r.ReadFrame(); err != nil || f.Type != ipc.TypeHello {
		t.Fatalf("HELLO: %v %v", f.Type, err)
	}
	welcome, _ := json.Marshal(ipc.Welcome{Protocol: 1, SidecarID: "s", HeartbeatMs: 10_000, MaxFrame: ipc.DefaultMaxFrame})
	w.WriteFrame(ipc.TypeWelcome, 0, 0, welcome)
	runPayload := func(id string) []byte {
		b, _ := json.Marshal(map[string]any{"dispatch_id": "d" + id, "run_id": id, "thread_id": "t" + id, "agent_id": "default",
			"session_id": "s", "attempt": 1, "request": map[string]any{"messages": []any{}}, "context": map[string]any{"messages": []any{}}})
		return b
	}
	w.WriteFrame(ipc.TypeRun, 0, 1, runPayload("r1"))
	time.Sleep(200 * time.Millisecond) // r1 fills the socket; its Emit blocks (we do not read)

	// PING and RUN 2 in one write: the SDK's reader buffers both, then
	// blocks answering the PING (the writer is busy with r1's Emit).
	var buf []byte
	buf = ipc.AppendFrame(buf, ipc.TypePing, 0, 0, make([]byte, 8))
	buf = ipc.AppendFrame(buf, ipc.TypeRun, 0, 2, runPayload("r2"))
	if _, err := nc.Write(buf); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	nc.Close() // the connection is lost

	select {
	case cause := <-second:
		if cause == nil {
			t.Fatal("run r2 arrived on a connection that was lost; its context was never cancelled (it ran to the end)")
		}
		t.Logf("r2 cancelled with %v", cause)
	case <-time.After(5 * time.Second):
		t.Log("r2 never started (fine)")
	}
}
