package agent

import (
	"context"
	"net"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// rawSidecar is the sidecar end of one agent connection, driven frame by
// frame by the test (to stall, to break or to pipeline at will).
type rawSidecar struct {
	nc net.Conn
	r  *ipc.Reader
	w  *ipc.Writer
}

// serveRaw starts a client with cfg (its Socket set here) against a
// listener the test drives by hand, answers its HELLO with heartbeat hb,
// and stops the client when the test ends.
func serveRaw(t *testing.T, cfg Config, hb time.Duration) *rawSidecar {
	t.Helper()
	cfg.Socket = socketPath(t)
	ln, err := net.Listen("unix", cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- c.Serve(ctx) }()
	nc, err := ln.Accept()
	if err != nil {
		cancel()
		<-served
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); nc.Close(); <-served })
	s := &rawSidecar{nc: nc, r: ipc.NewReader(nc, ipc.ReaderConfig{}), w: ipc.NewWriter(nc, ipc.WriterConfig{})}
	if f, err := s.r.ReadFrame(); err != nil || f.Type != ipc.TypeHello {
		t.Fatalf("HELLO: %v %v", f.Type, err)
	}
	welcome, _ := json.Marshal(ipc.Welcome{Protocol: 1, SidecarID: "s", HeartbeatMs: hb.Milliseconds(), MaxFrame: ipc.DefaultMaxFrame})
	s.w.WriteFrame(ipc.TypeWelcome, 0, 0, welcome)
	return s
}

// rawRun is the payload of a RUN for run id (dispatch "d"+id, thread
// "t"+id) with no messages.
func rawRun(id string) []byte {
	b, _ := json.Marshal(map[string]any{"dispatch_id": "d" + id, "run_id": id, "thread_id": "t" + id, "agent_id": "default",
		"session_id": "s", "attempt": 1, "request": map[string]any{"messages": []any{}}, "context": map[string]any{"messages": []any{}}})
	return b
}
