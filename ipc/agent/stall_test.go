package agent

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// A sidecar that stalls (stops reading and sends nothing more, its socket
// still open: a hung or SIGSTOPped process) is silent: after 3 heartbeats
// the SDK must treat it as dead and cancel the run (ErrConnectionLost).
// Here the run is emitting when the stall happens, so the socket buffer
// fills and a write blocks.
func TestStalledSidecarIsDetected(t *testing.T) {
	path := socketPath(t)
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	const hb = 100 * time.Millisecond
	ended := make(chan error, 1)
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		big := map[string]string{"type": "text_delta", "delta": strings.Repeat("x", 32<<10)}
		for {
			if err := run.Emit(big); err != nil {
				ended <- err
				return Transient("emit", err.Error())
			}
			if ctx.Err() != nil {
				ended <- context.Cause(ctx)
				return Cancelled()
			}
		}
	})
	c, err := New(Config{Socket: path, Handler: handler, Logger: testLogger(), ShutdownGrace: -1, MaxBackoff: time.Hour, MinBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- c.Serve(ctx) }()

	nc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); nc.Close(); <-served }()
	r := ipc.NewReader(nc, ipc.ReaderConfig{})
	w := ipc.NewWriter(nc, ipc.WriterConfig{})
	if f, err := r.ReadFrame(); err != nil || f.Type != ipc.TypeHello {
		t.Fatalf("HELLO: %v %v", f.Type, err)
	}
	welcome, _ := json.Marshal(ipc.Welcome{Protocol: 1, SidecarID: "s", HeartbeatMs: hb.Milliseconds(), MaxFrame: ipc.DefaultMaxFrame})
	w.WriteFrame(ipc.TypeWelcome, 0, 0, welcome)
	run, _ := json.Marshal(map[string]any{"dispatch_id": "d", "run_id": "r", "thread_id": "t", "agent_id": "default",
		"session_id": "s", "attempt": 1, "request": map[string]any{"messages": []any{}}, "context": map[string]any{"messages": []any{}}})
	w.WriteFrame(ipc.TypeRun, 0, 1, run)
	// The sidecar stalls now: it reads nothing and sends nothing.

	start := time.Now()
	select {
	case err := <-ended:
		if !errors.Is(err, ErrConnectionLost) {
			t.Fatalf("run ended with %v, want ErrConnectionLost", err)
		}
		t.Logf("stall detected after %v", time.Since(start))
	case <-time.After(20 * hb):
		t.Fatalf("sidecar silent for %v (heartbeat %v): the run is still blocked, the connection not declared dead", 20*hb, hb)
	}
	_ = bytes.MinRead
}
