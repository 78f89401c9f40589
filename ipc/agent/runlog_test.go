package agent

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// A run logs nothing at info level when it goes well (the run's logger is
// built only when used); what it does log carries the run's attributes.
func TestRunLogsCarryTheRunAndOnlyWhenNeeded(t *testing.T) {
	path := socketPath(t)
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var logs syncbuf.Buffer
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "bad" {
			return Transient("flaky", "try again")
		}
		return Done("ok")
	})
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	c, err := New(Config{Socket: path, Handler: handler, Logger: logger, ShutdownGrace: -1, MinBackoff: time.Hour, MaxBackoff: time.Hour})
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
	for i, id := range []string{"good", "bad"} {
		b, _ := json.Marshal(map[string]any{"dispatch_id": "d-" + id, "run_id": id, "thread_id": "t-" + id, "agent_id": "default",
			"session_id": "s", "attempt": 1, "request": map[string]any{"messages": []any{}}, "context": map[string]any{"messages": []any{}}})
		w.WriteFrame(ipc.TypeRun, 0, uint64(i+1), b)
		for {
			f, err := r.ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			if f.Type == ipc.TypeFinish {
				break
			}
		}
	}
	// The run logs its failure after its FINISH is written: wait for it.
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), `"msg":"run failed"`) && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
	out := logs.String()
	if strings.Contains(out, `"run_id":"good"`) {
		t.Fatalf("a run that went well logged at info level:\n%s", out)
	}
	for _, want := range []string{`"msg":"run failed"`, `"run_id":"bad"`, `"thread_id":"t-bad"`, `"dispatch_id":"d-bad"`, `"stream":2`} {
		if !strings.Contains(out, want) {
			t.Fatalf("logs lack %s:\n%s", want, out)
		}
	}
}
