package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// sidecar is a minimal scripted sidecar: one connection, frames from the
// agent on a channel (PINGs answered and dropped).
type sidecar struct {
	t      *testing.T
	nc     net.Conn
	w      *ipc.Writer
	frames chan ipc.Frame // payloads copied, not pooled
}

// startEcho serves the echo agent against a fresh sidecar and handshakes.
func startEcho(t *testing.T) *sidecar {
	dir, err := os.MkdirTemp("", "echo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	ln, err := net.Listen("unix", filepath.Join(dir, "a.sock"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	client, err := agent.New(agent.Config{Socket: ln.Addr().String(), MaxRuns: 8, Handler: &echoAgent{log: log}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- client.Serve(ctx) }()

	nc, err := ln.Accept()
	_ = ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	s := &sidecar{t: t, nc: nc, w: ipc.NewWriter(nc, ipc.WriterConfig{}), frames: make(chan ipc.Frame, 1024)}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer close(s.frames)
		r := ipc.NewReader(nc, ipc.ReaderConfig{})
		for {
			f, err := r.ReadFrame()
			if err != nil {
				return
			}
			f.Payload = bytes.Clone(f.Payload)
			if f.Type == ipc.TypePing {
				_ = s.w.WriteFrame(ipc.TypePong, 0, 0, f.Payload)
				continue
			}
			s.frames <- f
		}
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve = %v", err)
		}
		_ = nc.Close()
		<-readDone
	})
	s.expect(ipc.TypeHello, 0)
	s.send(ipc.TypeWelcome, 0, `{"protocol":1,"sidecar_id":"test","heartbeat_ms":5000,"max_frame":16777216}`)
	return s
}

func (s *sidecar) send(typ ipc.FrameType, stream uint64, payload string) {
	s.t.Helper()
	if err := s.w.WriteFrame(typ, 0, stream, []byte(payload)); err != nil {
		s.t.Fatal(err)
	}
}

func (s *sidecar) run(stream uint64, texts ...string) {
	s.t.Helper()
	msgs := make([]agent.Message, len(texts))
	for i, text := range texts {
		msgs[i] = agent.TextMessage(agent.RoleUser, text)
	}
	b, _ := json.Marshal(map[string]any{"dispatch_id": "d", "run_id": "r", "thread_id": "t", "agent_id": "default",
		"session_id": "s", "attempt": 1, "request": map[string]any{"messages": msgs}, "context": map[string]any{"messages": []any{}}})
	s.send(ipc.TypeRun, stream, string(b))
}

// expect returns the payload of the next frame, which must be typ on stream.
func (s *sidecar) expect(typ ipc.FrameType, stream uint64) string {
	s.t.Helper()
	select {
	case f, ok := <-s.frames:
		if !ok {
			s.t.Fatalf("connection closed, want %s", typ)
		}
		if f.Type != typ || f.Stream != stream {
			s.t.Fatalf("got %s[%d] %s, want %s on stream %d", f.Type, f.Stream, f.Payload, typ, stream)
		}
		return string(f.Payload)
	case <-time.After(5 * time.Second):
		s.t.Fatalf("no %s from the agent", typ)
		return ""
	}
}

// expectEvents checks the next frames are these EVENT payloads.
func (s *sidecar) expectEvents(stream uint64, events ...string) {
	s.t.Helper()
	for _, want := range events {
		if got := s.expect(ipc.TypeEvent, stream); got != want {
			s.t.Fatalf("event\n got %s\nwant %s", got, want)
		}
	}
}

const (
	runStart  = `{"type":"run_start","run_id":"r","thread_id":"t"}`
	runFinish = `{"type":"run_finish","termination":{"type":"natural_end"}}`
)

func TestEchoAgent(t *testing.T) {
	t.Parallel()
	s := startEcho(t)

	// Plain echo: event, checkpoint (acknowledged), finish.
	s.run(1, "hello")
	s.expectEvents(1, runStart, `{"type":"text_delta","delta":"echo: hello"}`)
	if got := s.expect(ipc.TypeCheckpoint, 1); got != `{"seq":1,"messages":[{"role":"assistant","content":"echo: hello"}]}` {
		t.Fatalf("checkpoint %s", got)
	}
	s.send(ipc.TypeCheckpointAck, 1, `{"seq":1}`)
	s.expectEvents(1, runFinish)
	if got := s.expect(ipc.TypeFinish, 1); got != `{"status":"done","termination":{"type":"natural_end"},"response":"echo: hello"}` {
		t.Fatalf("finish %s", got)
	}

	// Failures.
	s.run(2, "fail transient")
	s.expectEvents(2, runStart)
	if got := s.expect(ipc.TypeFinish, 2); !strings.Contains(got, `"kind":"transient","code":"echo_failure"`) {
		t.Fatalf("finish %s", got)
	}
	s.run(3, "fail permanent")
	s.expectEvents(3, runStart)
	if got := s.expect(ipc.TypeFinish, 3); !strings.Contains(got, `"kind":"permanent","code":"echo_failure"`) {
		t.Fatalf("finish %s", got)
	}

	// events <n>.
	s.run(4, "events 2")
	s.expectEvents(4, runStart, `{"type":"text_delta","delta":"event 1"}`, `{"type":"text_delta","delta":"event 2"}`,
		`{"type":"text_delta","delta":"echo: events 2"}`)
	s.expect(ipc.TypeCheckpoint, 4)
	s.send(ipc.TypeCheckpointAck, 4, `{"seq":1}`)
	s.expectEvents(4, runFinish)
	s.expect(ipc.TypeFinish, 4)

	// suspend: the decision resumes the call.
	s.run(5, "suspend")
	s.expectEvents(5, runStart, `{"type":"tool_call_start","call_id":"call-1","name":"echo_approval"}`,
		`{"type":"tool_call_done","call_id":"call-1","outcome":"suspended"}`)
	s.send(ipc.TypeDecision, 5, `{"cmd":"d1","decisions":[{"call_id":"call-1","resume":{"ok":true}}]}`)
	s.expect(ipc.TypeCommandAck, 5)
	s.expectEvents(5, `{"type":"tool_call_resumed","call_id":"call-1","resume":{"ok":true}}`,
		`{"type":"text_delta","delta":"echo: suspend"}`)
	s.expect(ipc.TypeCheckpoint, 5)
	s.send(ipc.TypeCheckpointAck, 5, `{"seq":1}`)
	s.expectEvents(5, runFinish)
	s.expect(ipc.TypeFinish, 5)

	// sleep: live messages are echoed; a cancel ends it at once.
	s.run(6, "sleep 60000")
	s.expectEvents(6, runStart)
	var ack ipc.CommandAck
	for range 50 { // until the run subscribed to live messages
		s.send(ipc.TypeMessages, 6, `{"cmd":"m1","messages":[{"message_id":"m","thread_id":"t","seq":2,"message":{"role":"user","content":"hi"}}]}`)
		if err := json.Unmarshal([]byte(s.expect(ipc.TypeCommandAck, 6)), &ack); err != nil || ack.Accepted {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !ack.Accepted {
		t.Fatalf("live message not accepted: %+v", ack)
	}
	s.expectEvents(6, `{"type":"text_delta","delta":"live: hi"}`)
	start := time.Now()
	s.send(ipc.TypeCancel, 6, `{"cmd":"c1"}`)
	s.expect(ipc.TypeCommandAck, 6)
	s.expectEvents(6, `{"type":"run_finish","termination":{"type":"cancelled"}}`)
	if got := s.expect(ipc.TypeFinish, 6); got != `{"status":"done","termination":{"type":"cancelled"}}` {
		t.Fatalf("finish %s", got)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("cancel took %v", d)
	}
}

func TestFlags(t *testing.T) {
	t.Parallel()
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == "MAILBOX_AGENT_SOCKET" {
				return v
			}
			return ""
		}
	}
	o, err := parseFlags(nil, env(""), io.Discard)
	if err != nil || o != (options{socket: "./run/agent.sock", name: "echo-agent", maxRuns: 4, logFormat: "text"}) {
		t.Fatalf("defaults: %+v %v", o, err)
	}
	o, err = parseFlags(nil, env("/e.sock"), io.Discard)
	if err != nil || o.socket != "/e.sock" {
		t.Fatalf("env: %+v %v", o, err)
	}
	o, err = parseFlags([]string{"--socket", "/f.sock", "--max-runs", "2", "--log-format", "json", "--name", "n", "--log-level", "debug"}, env("/e.sock"), io.Discard)
	if err != nil || o != (options{socket: "/f.sock", name: "n", maxRuns: 2, logFormat: "json", logLevel: slog.LevelDebug}) {
		t.Fatalf("flags: %+v %v", o, err)
	}
	if _, err := parseFlags([]string{"--log-format", "xml"}, env(""), io.Discard); err == nil {
		t.Fatal("--log-format xml accepted")
	}
	if _, err := parseFlags([]string{"--log-level", "loud"}, env(""), io.Discard); err == nil {
		t.Fatal("--log-level loud accepted")
	}
	// -h names the control words, and each is one the agent acts on.
	var help strings.Builder
	if _, err := parseFlags([]string{"-h"}, env(""), &help); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	for _, word := range []string{"sleep <ms>", "fail transient", "fail permanent", "suspend", "events <n>", "-socket"} {
		if !strings.Contains(help.String(), word) {
			t.Errorf("-h lacks %q:\n%s", word, help.String())
		}
	}
}

// --log-level debug writes the SDK's per-run lines ("run started", "run
// finished"), which the scale benchmark reads; the default leaves them out.
func TestLogLevel(t *testing.T) {
	for _, level := range []string{"debug", "info"} {
		o, err := parseFlags([]string{"--log-format", "json", "--log-level", level}, func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		newLogger(o, &b).Debug("run started", "dispatch_id", "d")
		if got, want := strings.Contains(b.String(), `"msg":"run started"`), level == "debug"; got != want {
			t.Errorf("--log-level %s: debug line written %v, want %v (%q)", level, got, want, b.String())
		}
	}
}
