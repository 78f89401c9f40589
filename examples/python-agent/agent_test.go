package pythonagent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// wait is how long the fake sidecar waits for any one frame from the agent.
const wait = 5 * time.Second

// TestPythonAgent drives one agent process through a scripted session:
// handshake, PING, a run with a checkpoint, CANCEL, live MESSAGES, failures,
// a failed checkpoint, the sidecar's GOAWAY and reconnect, and SIGTERM
// during a run.
func TestPythonAgent(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t)
	agent := startAgent(t, nil, "--socket", sc.path)

	c := sc.accept(t)
	hello := decode[ipc.Hello](t, c.expect(ipc.TypeHello, 0))
	if hello.Protocol != 1 || hello.Name != "python-agent" || len(hello.AgentIDs) != 1 || hello.AgentIDs[0] != "*" || hello.MaxRuns != 2 {
		t.Fatalf("HELLO = %+v, want protocol 1, name python-agent, agent_ids [*], max_runs 2", hello)
	}
	c.welcome(5000)

	// PING is answered with the same 8 bytes.
	ping := []byte{0, 1, 2, 0xfe, 0xff, '{', '"', 7}
	c.send(ipc.TypePing, 0, ping)
	if pong := c.expect(ipc.TypePong, 0); !bytes.Equal(pong.payload, ping) {
		t.Fatalf("PONG payload = %x, want %x", pong.payload, ping)
	}

	// A run: run_start, text_delta, CHECKPOINT (acked), run_finish, FINISH.
	c.run(1, []any{map[string]any{"type": "text", "text": "hi"}})
	c.expectEvent(1, "run_start")
	c.expectDelta(1, "echo: hi")
	c.checkpoint(1, "echo: hi", true)
	c.expectRunFinish(1, engine.TermNaturalEnd)
	c.expectFinish(1, engine.TermNaturalEnd, "echo: hi", "")

	// CANCEL during "sleep 2000": acked, and FINISH cancelled long before 2 s.
	c.run(2, "sleep 2000")
	c.expectEvent(2, "run_start")
	c.expectDelta(2, "echo: sleep 2000")
	cancelled := time.Now()
	c.sendJSON(ipc.TypeCancel, 2, ipc.Command{Cmd: "c-cancel"})
	c.expectAck(2, "c-cancel", true)
	c.expectRunFinish(2, engine.TermCancelled)
	c.expectFinish(2, engine.TermCancelled, "", "")
	if d := time.Since(cancelled); d > time.Second {
		t.Fatalf("FINISH came %v after CANCEL, want well under the 2 s sleep", d)
	}

	// MESSAGES during "sleep 300": acked, echoed live, part of the reply.
	c.run(3, "sleep 300")
	c.expectEvent(3, "run_start")
	c.expectDelta(3, "echo: sleep 300")
	records, _ := json.Marshal([]engine.MessageRecord{{
		MessageID: "m-live", ThreadID: "t1", Seq: 7,
		Message: engine.Message{ID: "m-live", Role: engine.RoleUser, Content: json.RawMessage(`[{"type":"text","text":"more"}]`)},
	}})
	// Read after its ack_by: refused (the sidecar may have queued them).
	c.sendJSON(ipc.TypeMessages, 3, ipc.Command{Cmd: "c-late", Messages: records, AckBy: 1})
	c.expectAck(3, "c-late", false)
	c.sendJSON(ipc.TypeMessages, 3, ipc.Command{Cmd: "c-msg", Messages: records, AckBy: time.Now().Add(time.Minute).UnixMilli()})
	c.expectAck(3, "c-msg", true)
	c.expectDelta(3, "live: more")
	c.checkpoint(3, "echo: sleep 300\nlive: more", true)
	c.expectRunFinish(3, engine.TermNaturalEnd)
	c.expectFinish(3, engine.TermNaturalEnd, "echo: sleep 300\nlive: more", "")

	// Control words that fail the run: FINISH with the error kind, no
	// checkpoint, no run_finish event (the sidecar closes client streams).
	for i, kind := range []string{ipc.KindTransient, ipc.KindPermanent} {
		stream := uint64(4 + i)
		c.run(stream, "fail "+kind)
		c.expectEvent(stream, "run_start")
		c.expectDelta(stream, "echo: fail "+kind)
		c.expectFinish(stream, engine.TermError, "", kind)
	}

	// A checkpoint the sidecar could not make durable fails the run as
	// transient.
	c.run(6, "again")
	c.expectEvent(6, "run_start")
	c.expectDelta(6, "echo: again")
	c.checkpoint(6, "echo: again", false)
	if fin := c.expectFinish(6, engine.TermError, "", ipc.KindTransient); fin.Error.Code != ipc.CodeCheckpointFailed ||
		!strings.Contains(fin.Error.Message, "disk full (reason unavailable)") {
		t.Fatalf("FINISH error %+v, want code %q naming the message and the reason", fin.Error, ipc.CodeCheckpointFailed)
	}

	// GOAWAY from the sidecar: the running run finishes, then the agent
	// closes the connection and connects again.
	c.run(7, "sleep 300")
	c.expectEvent(7, "run_start")
	c.expectDelta(7, "echo: sleep 300")
	c.sendJSON(ipc.TypeGoAway, 0, ipc.Status{Code: ipc.CodeShutdown, Message: "test"})
	c.checkpoint(7, "echo: sleep 300", true)
	c.expectRunFinish(7, engine.TermNaturalEnd)
	c.expectFinish(7, engine.TermNaturalEnd, "echo: sleep 300", "")
	c.expectEOF()

	c = sc.accept(t)
	c.expect(ipc.TypeHello, 0)
	c.welcome(5000)

	// SIGTERM during a run: the agent says GOAWAY, lets the run finish,
	// closes, and exits 0. The GOAWAY and the run's frames come from
	// different tasks: on a loaded machine the run's checkpoint (after its
	// one-second sleep) can come first, so the GOAWAY is taken wherever it
	// comes before the connection ends.
	c.run(8, "sleep 1000")
	c.expectEvent(8, "run_start")
	c.expectDelta(8, "echo: sleep 1000")
	c.goAway = &ipc.Status{}
	if err := agent.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	c.checkpoint(8, "echo: sleep 1000", true)
	c.expectRunFinish(8, engine.TermNaturalEnd)
	c.expectFinish(8, engine.TermNaturalEnd, "echo: sleep 1000", "")
	if c.goAway.Code == "" {
		*c.goAway = decode[ipc.Status](t, c.expect(ipc.TypeGoAway, 0))
	}
	if c.goAway.Code != ipc.CodeShutdown {
		t.Fatalf("agent GOAWAY code = %q, want %q", c.goAway.Code, ipc.CodeShutdown)
	}
	c.expectEOF()
	if err := agent.wait(t); err != nil {
		t.Fatalf("agent exit after SIGTERM: %v, want status 0", err)
	}
}

// TestPythonAgentOnce checks --once and --max-runs: one run, then GOAWAY,
// close, exit 0.
func TestPythonAgentOnce(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t)
	agent := startAgent(t, nil, "--socket", sc.path, "--once", "--max-runs", "1")

	c := sc.accept(t)
	if hello := decode[ipc.Hello](t, c.expect(ipc.TypeHello, 0)); hello.MaxRuns != 1 {
		t.Fatalf("HELLO max_runs = %d, want 1", hello.MaxRuns)
	}
	c.welcome(5000)
	c.run(1, "hello")
	c.expectEvent(1, "run_start")
	c.expectDelta(1, "echo: hello")
	c.checkpoint(1, "echo: hello", true)
	c.expectRunFinish(1, engine.TermNaturalEnd)
	c.expectFinish(1, engine.TermNaturalEnd, "echo: hello", "")
	c.expect(ipc.TypeGoAway, 0)
	c.expectEOF()
	if err := agent.wait(t); err != nil {
		t.Fatalf("agent exit after --once: %v, want status 0", err)
	}
}

// TestPythonAgentReconnects checks the socket path from the environment, the
// agent's own PINGs, a silent sidecar (closed after 3 heartbeats), a
// protocol violation (ERROR, close), and reconnecting after each.
func TestPythonAgentReconnects(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t)
	startAgent(t, []string{"MAILBOX_AGENT_SOCKET=" + sc.path})

	// A sidecar that never answers: PINGs, then heartbeat_timeout.
	c := sc.accept(t)
	c.answerPings = false
	c.expect(ipc.TypeHello, 0)
	welcomed := time.Now()
	c.welcome(100)
	if ping := c.expect(ipc.TypePing, 0); len(ping.payload) != ipc.PingSize {
		t.Fatalf("agent PING payload is %d bytes, want %d", len(ping.payload), ipc.PingSize)
	}
	if st := decode[ipc.Status](t, c.expect(ipc.TypeError, 0)); st.Code != ipc.CodeHeartbeatTimeout {
		t.Fatalf("ERROR code = %q, want %q", st.Code, ipc.CodeHeartbeatTimeout)
	}
	c.expectEOF()
	if d := time.Since(welcomed); d < 300*time.Millisecond {
		t.Fatalf("agent gave up after %v, want at least 3 heartbeats (300ms)", d)
	}

	// A frame of an unknown type: ERROR protocol_error, close.
	c = sc.accept(t)
	c.expect(ipc.TypeHello, 0)
	c.welcome(5000)
	bad := ipc.AppendFrame(nil, ipc.TypePing, 0, 0, nil)
	bad[4] = 0x7f
	if _, err := c.conn.Write(bad); err != nil {
		t.Fatalf("write bad frame: %v", err)
	}
	if st := decode[ipc.Status](t, c.expect(ipc.TypeError, 0)); st.Code != ipc.CodeProtocolError {
		t.Fatalf("ERROR code = %q, want %q", st.Code, ipc.CodeProtocolError)
	}
	c.expectEOF()

	c = sc.accept(t)
	c.expect(ipc.TypeHello, 0)
}

// TestPythonAgentGivesUpOnASidecarThatStopsReading checks that a sidecar
// that stops reading and falls silent is detected as dead even while a run
// is blocked writing a frame the sidecar does not take: the agent closes
// the connection after 3 heartbeats and connects again, instead of hanging
// with its heartbeat thread stuck behind the run's write.
func TestPythonAgentGivesUpOnASidecarThatStopsReading(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t)
	startAgent(t, nil, "--socket", sc.path)

	if err := sc.ln.SetDeadline(time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	nc, err := sc.ln.Accept()
	if err != nil {
		t.Fatalf("accept the agent's connection: %v", err)
	}
	t.Cleanup(func() { nc.Close() })
	r := ipc.NewReader(nc, ipc.ReaderConfig{})
	f, err := r.ReadFrame()
	if err != nil || f.Type != ipc.TypeHello {
		t.Fatalf("want HELLO, got %v %v", f.Type, err)
	}
	f.Release()
	w := ipc.NewWriter(nc, ipc.WriterConfig{})
	write := func(typ ipc.FrameType, stream uint64, v any) {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.WriteFrame(typ, 0, stream, b); err != nil {
			t.Fatalf("send %s: %v", typ, err)
		}
	}
	// Heartbeats of 400 ms: receiving the large RUN below must not itself
	// look like silence on a loaded machine (with 100 ms the agent gave up
	// while the RUN was still being written, and the write failed).
	write(ipc.TypeWelcome, 0, ipc.Welcome{Protocol: ipc.ProtocolVersion, SidecarID: "test", HeartbeatMs: 400, MaxFrame: ipc.DefaultMaxFrame})
	// A run whose echo (2 MiB) is far more than the socket buffers hold:
	// the run's EVENT write blocks, since this sidecar reads nothing more.
	write(ipc.TypeRun, 1, map[string]any{
		"dispatch_id": "d1", "run_id": "r1", "thread_id": "t1", "agent_id": "default", "session_id": "s1", "attempt": 1,
		"request": map[string]any{
			"messages": []any{map[string]any{"id": "m1", "role": "user", "content": strings.Repeat("x", 2<<20)}},
			"run_mode": "foreground", "origin": "user",
		},
		"context": map[string]any{"messages": []any{}, "first_seq": 0, "total_messages": 0},
	})
	// Silent and not reading: the agent must give up on this connection
	// (3 heartbeats, 1.2 s) and connect again.
	c := sc.accept(t)
	c.expect(ipc.TypeHello, 0)
}

// ---------------------------------------------------------------------------
// The fake sidecar
// ---------------------------------------------------------------------------

type sidecar struct {
	path string
	ln   *net.UnixListener
}

func newSidecar(t *testing.T) *sidecar {
	t.Helper()
	dir, err := os.MkdirTemp("", "py") // short: socket paths are limited to ~108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "a.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &sidecar{path: path, ln: ln}
}

// accept waits for the agent's next connection.
func (s *sidecar) accept(t *testing.T) *conn {
	t.Helper()
	if err := s.ln.SetDeadline(time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	nc, err := s.ln.Accept()
	if err != nil {
		t.Fatalf("accept the agent's connection: %v", err)
	}
	c := &conn{
		t:           t,
		conn:        nc,
		w:           ipc.NewWriter(nc, ipc.WriterConfig{}),
		frames:      make(chan frame, 64),
		done:        make(chan struct{}),
		answerPings: true,
	}
	c.wg.Add(1)
	go c.readLoop()
	t.Cleanup(c.close)
	return c
}

// frame is a received frame with its payload copied.
type frame struct {
	typ     ipc.FrameType
	stream  uint64
	payload []byte
}

// conn is one agent connection as the fake sidecar sees it. Only the test
// goroutine writes; readLoop reads.
type conn struct {
	t           *testing.T
	conn        net.Conn
	w           *ipc.Writer
	frames      chan frame // closed when the agent's side ends
	done        chan struct{}
	wg          sync.WaitGroup
	readErr     error // set before frames is closed
	answerPings bool  // expect answers the agent's PINGs (else ignores them)
	// goAway, once set, takes the agent's GOAWAY wherever expect meets
	// it (its order against a run's frames is not fixed) and keeps it.
	goAway *ipc.Status
}

func (c *conn) readLoop() {
	defer c.wg.Done()
	r := ipc.NewReader(c.conn, ipc.ReaderConfig{})
	for {
		f, err := r.ReadFrame()
		if err != nil {
			c.readErr = err
			close(c.frames)
			return
		}
		fr := frame{typ: f.Type, stream: f.Stream, payload: bytes.Clone(f.Payload)}
		f.Release()
		select {
		case c.frames <- fr:
		case <-c.done:
			return
		}
	}
}

func (c *conn) close() {
	close(c.done)
	c.conn.Close()
	c.wg.Wait()
}

func (c *conn) send(typ ipc.FrameType, stream uint64, payload []byte) {
	c.t.Helper()
	if err := c.w.WriteFrame(typ, 0, stream, payload); err != nil {
		c.t.Fatalf("send %s: %v", typ, err)
	}
}

func (c *conn) sendJSON(typ ipc.FrameType, stream uint64, v any) {
	c.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		c.t.Fatal(err)
	}
	c.send(typ, stream, b)
}

func (c *conn) welcome(heartbeatMs int64) {
	c.t.Helper()
	c.sendJSON(ipc.TypeWelcome, 0, ipc.Welcome{Protocol: ipc.ProtocolVersion, SidecarID: "test", HeartbeatMs: heartbeatMs, MaxFrame: ipc.DefaultMaxFrame})
}

// run sends RUN on stream with one user message of the given content.
func (c *conn) run(stream uint64, content any) {
	c.t.Helper()
	c.sendJSON(ipc.TypeRun, stream, map[string]any{
		"dispatch_id": fmt.Sprintf("d%d", stream), "run_id": fmt.Sprintf("r%d", stream),
		"thread_id": "t1", "agent_id": "default", "session_id": fmt.Sprintf("s%d", stream), "attempt": 1,
		"request": map[string]any{
			"messages": []any{map[string]any{"id": fmt.Sprintf("m%d", stream), "role": "user", "content": content}},
			"run_mode": "foreground", "origin": "user",
		},
		"context": map[string]any{"messages": []any{}, "first_seq": 0, "total_messages": 0},
	})
}

// next returns the next frame; ok is false once the agent closed.
func (c *conn) next() (frame, bool) {
	c.t.Helper()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case f, ok := <-c.frames:
		return f, ok
	case <-timer.C:
		c.t.Fatalf("no frame from the agent within %v", wait)
		return frame{}, false
	}
}

// expect returns the next frame, which must be of type typ on stream. The
// agent's PINGs in between are answered (or ignored) unless typ is PING.
func (c *conn) expect(typ ipc.FrameType, stream uint64) frame {
	c.t.Helper()
	for {
		f, ok := c.next()
		if !ok {
			c.t.Fatalf("want %s on stream %d, the agent closed the connection (%v)", typ, stream, c.readErr)
		}
		if f.typ == ipc.TypePing && typ != ipc.TypePing {
			if c.answerPings {
				c.send(ipc.TypePong, 0, f.payload)
			}
			continue
		}
		if c.goAway != nil && f.typ == ipc.TypeGoAway && f.stream == 0 && typ != ipc.TypeGoAway {
			if err := json.Unmarshal(f.payload, c.goAway); err != nil {
				c.t.Fatalf("GOAWAY %s: %v", f.payload, err)
			}
			continue
		}
		if f.typ != typ || f.stream != stream {
			c.t.Fatalf("want %s on stream %d, got %s on stream %d: %s", typ, stream, f.typ, f.stream, f.payload)
		}
		return f
	}
}

// expectEOF waits for the agent to close the connection.
func (c *conn) expectEOF() {
	c.t.Helper()
	for {
		f, ok := c.next()
		if !ok {
			return
		}
		if f.typ != ipc.TypePing {
			c.t.Fatalf("want the connection closed, got %s on stream %d: %s", f.typ, f.stream, f.payload)
		}
	}
}

func (c *conn) expectEvent(stream uint64, typ string) map[string]any {
	c.t.Helper()
	ev := decode[map[string]any](c.t, c.expect(ipc.TypeEvent, stream))
	if ev["type"] != typ {
		c.t.Fatalf("stream %d: event %v, want type %q", stream, ev, typ)
	}
	if typ == "run_start" && ev["run_id"] != fmt.Sprintf("r%d", stream) {
		c.t.Fatalf("stream %d: run_start %v, want run_id r%d", stream, ev, stream)
	}
	return ev
}

func (c *conn) expectDelta(stream uint64, text string) {
	c.t.Helper()
	if ev := c.expectEvent(stream, "text_delta"); ev["delta"] != text {
		c.t.Fatalf("stream %d: text_delta %v, want delta %q", stream, ev, text)
	}
}

func (c *conn) expectRunFinish(stream uint64, termination string) {
	c.t.Helper()
	ev := c.expectEvent(stream, "run_finish")
	if term, _ := ev["termination"].(map[string]any); term["type"] != termination {
		c.t.Fatalf("stream %d: run_finish %v, want termination %q", stream, ev, termination)
	}
}

// checkpoint expects a CHECKPOINT with one assistant message of text reply
// and answers CHECKPOINT_ACK, or ERROR checkpoint_failed when !ok.
func (c *conn) checkpoint(stream uint64, reply string, ok bool) {
	c.t.Helper()
	f := c.expect(ipc.TypeCheckpoint, stream)
	var cp struct {
		Seq uint64 `json:"seq"`
		engine.RunCheckpoint
	}
	if err := json.Unmarshal(f.payload, &cp); err != nil {
		c.t.Fatalf("CHECKPOINT %s: %v", f.payload, err)
	}
	if cp.Seq == 0 || len(cp.Messages) != 1 || cp.Messages[0].Role != engine.RoleAssistant {
		c.t.Fatalf("CHECKPOINT %s: want seq > 0 and one assistant message", f.payload)
	}
	var parts []struct{ Type, Text string }
	if err := json.Unmarshal(cp.Messages[0].Content, &parts); err != nil || len(parts) != 1 || parts[0].Type != "text" || parts[0].Text != reply {
		c.t.Fatalf("CHECKPOINT message content %s, want one text part %q", cp.Messages[0].Content, reply)
	}
	if ok {
		c.sendJSON(ipc.TypeCheckpointAck, stream, ipc.CheckpointAck{Seq: cp.Seq})
	} else {
		c.sendJSON(ipc.TypeError, stream, ipc.Status{Code: ipc.CodeCheckpointFailed, Message: "disk full", Seq: &cp.Seq, Reason: ipc.ReasonUnavailable})
	}
}

type finish struct {
	Status      string              `json:"status"`
	Termination *engine.Termination `json:"termination"`
	Response    string              `json:"response"`
	Error       *ipc.FinishError    `json:"error"`
}

// expectFinish expects FINISH with the given termination, response and
// error kind ("" = no error).
func (c *conn) expectFinish(stream uint64, termination, response, errKind string) finish {
	c.t.Helper()
	f := c.expect(ipc.TypeFinish, stream)
	fin := decode[finish](c.t, f)
	gotKind := ""
	if fin.Error != nil {
		gotKind = fin.Error.Kind
	}
	if fin.Status != "done" || fin.Termination == nil || fin.Termination.Type != termination || fin.Response != response || gotKind != errKind {
		c.t.Fatalf("stream %d: FINISH %s, want status done, termination %q, response %q, error kind %q", stream, f.payload, termination, response, errKind)
	}
	return fin
}

func (c *conn) expectAck(stream uint64, cmd string, accepted bool) {
	c.t.Helper()
	if ack := decode[ipc.CommandAck](c.t, c.expect(ipc.TypeCommandAck, stream)); ack.Cmd != cmd || ack.Accepted != accepted {
		c.t.Fatalf("stream %d: COMMAND_ACK %+v, want cmd %q accepted %v", stream, ack, cmd, accepted)
	}
}

func decode[T any](t *testing.T, f frame) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(f.payload, &v); err != nil {
		t.Fatalf("%s payload %s: %v", f.typ, f.payload, err)
	}
	return v
}

// ---------------------------------------------------------------------------
// The agent process
// ---------------------------------------------------------------------------

type agentProc struct {
	cmd    *exec.Cmd
	stderr syncbuf.Buffer
	done   chan struct{} // closed when the process has exited
	err    error         // cmd.Wait's result, set before done is closed
}

// startAgent runs agent.py with args and extra environment; t.Cleanup kills
// it (if still running) and reaps it, logging its stderr when t failed.
func startAgent(t *testing.T, env []string, args ...string) *agentProc {
	t.Helper()
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Fatalf("python3 is not on PATH (%v): this test runs examples/python-agent/agent.py for real and needs Python 3.8 or later", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &agentProc{done: make(chan struct{})}
	p.cmd = exec.CommandContext(ctx, python, append([]string{"agent.py"}, args...)...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start python3 agent.py: %v", err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		cancel()
		<-p.done
		if t.Failed() {
			t.Logf("agent stderr:\n%s", p.stderr.String())
		}
	})
	return p
}

// wait waits for the process to exit and returns cmd.Wait's error.
func (p *agentProc) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-p.done:
		var exit *exec.ExitError
		if errors.As(p.err, &exit) {
			return fmt.Errorf("%w; stderr:\n%s", p.err, strings.TrimSpace(p.stderr.String()))
		}
		return p.err
	case <-time.After(wait):
		t.Fatalf("agent did not exit within %v", wait)
		return nil
	}
}
