package hub_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	json "github.com/goccy/go-json"
	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// socketPath returns a short Unix socket path (t.TempDir paths can
// exceed the 108-byte limit).
func socketPath(t testing.TB) string {
	dir, err := os.MkdirTemp("", "hub")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "a.sock")
}

// rig is a hub serving a real Unix socket.
type rig struct {
	t    testing.TB
	hub  *hub.Hub
	path string
	done chan error
}

func newRig(t testing.TB, cfg hub.Config) *rig {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = discardLogger()
	}
	h, err := hub.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := socketPath(t)
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, hub: h, path: path, done: make(chan error, 1)}
	go func() { r.done <- h.Serve(ln) }()
	t.Cleanup(r.close)
	return r
}

func (r *rig) close() {
	r.hub.Close()
	if err := <-r.done; !errors.Is(err, hub.ErrClosed) {
		r.t.Errorf("Serve returned %v, want ErrClosed", err)
	}
	r.done <- hub.ErrClosed // idempotent for a second close
}

// rawAgent speaks the protocol frame by frame, so tests can misbehave.
type rawAgent struct {
	t  testing.TB
	nc net.Conn
	r  *ipc.Reader
	w  *ipc.Writer
}

func dial(t testing.TB, path string) *rawAgent {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	a := &rawAgent{t: t, nc: nc, r: ipc.NewReader(nc, ipc.ReaderConfig{}), w: ipc.NewWriter(nc, ipc.WriterConfig{})}
	t.Cleanup(func() { nc.Close() })
	return a
}

// connect dials and completes the handshake.
func connect(t testing.TB, path string, hello ipc.Hello) (*rawAgent, ipc.Welcome) {
	t.Helper()
	a := dial(t, path)
	if hello.Protocol == 0 {
		hello.Protocol = ipc.ProtocolVersion
	}
	a.send(ipc.TypeHello, 0, hello)
	f := a.read()
	if f.Type != ipc.TypeWelcome {
		t.Fatalf("handshake answered with %s %s", f.Type, f.Payload)
	}
	var w ipc.Welcome
	if err := json.Unmarshal(f.Payload, &w); err != nil {
		t.Fatal(err)
	}
	a.nc.SetReadDeadline(time.Time{}) // agents that read on their own goroutine wait as long as they like
	return a, w
}

func (a *rawAgent) send(typ ipc.FrameType, stream uint64, v any) {
	a.t.Helper()
	var p []byte
	switch v := v.(type) {
	case []byte:
		p = v
	case string:
		p = []byte(v)
	default:
		var err error
		if p, err = json.Marshal(v); err != nil {
			a.t.Fatal(err)
		}
	}
	if err := a.w.WriteFrame(typ, 0, stream, p); err != nil {
		a.t.Fatalf("send %s: %v", typ, err)
	}
}

// frame is a received frame with its payload copied.
type frame struct {
	Type    ipc.FrameType
	Stream  uint64
	Payload []byte
}

func (a *rawAgent) readErr(timeout time.Duration) (frame, error) {
	a.nc.SetReadDeadline(time.Now().Add(timeout))
	f, err := a.r.ReadFrame()
	if err != nil {
		return frame{}, err
	}
	out := frame{Type: f.Type, Stream: f.Stream, Payload: append([]byte(nil), f.Payload...)}
	f.Release()
	return out, nil
}

// frames reads the agent's frames on a goroutine of its own, for a test
// that must see that nothing arrives for a while; the channel closes
// once a read fails (the connection ends, or idle passes without one).
func (a *rawAgent) frames(idle time.Duration) <-chan frame {
	out := make(chan frame, 16)
	go func() {
		defer close(out)
		for {
			f, err := a.readErr(idle)
			if err != nil {
				return
			}
			out <- f
		}
	}()
	return out
}

// read returns the next frame that is not a PING or PONG.
func (a *rawAgent) read() frame {
	a.t.Helper()
	for {
		f, err := a.readErr(5 * time.Second)
		if err != nil {
			a.t.Fatalf("read: %v", err)
		}
		if f.Type == ipc.TypePing {
			a.send(ipc.TypePong, 0, f.Payload)
			continue
		}
		if f.Type != ipc.TypePong {
			return f
		}
	}
}

// expect reads the next frame and checks its type and stream.
func (a *rawAgent) expect(typ ipc.FrameType, stream uint64) frame {
	a.t.Helper()
	f := a.read()
	if f.Type != typ || f.Stream != stream {
		a.t.Fatalf("got %s on stream %d (%s), want %s on stream %d", f.Type, f.Stream, f.Payload, typ, stream)
	}
	return f
}

// expectClosed reads until the hub closes the connection and returns the
// frames seen on the way.
func (a *rawAgent) expectClosed() []frame {
	a.t.Helper()
	var seen []frame
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		f, err := a.readErr(time.Until(deadline))
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) || isReset(err) {
				return seen
			}
			a.t.Fatalf("waiting for close: %v", err)
		}
		seen = append(seen, f)
	}
	a.t.Fatal("connection not closed")
	return nil
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && !ne.Timeout()
}

// status decodes an ERROR or GOAWAY payload.
func status(t testing.TB, f frame) ipc.Status {
	t.Helper()
	var s ipc.Status
	if err := json.Unmarshal(f.Payload, &s); err != nil {
		t.Fatalf("status %s: %v", f.Payload, err)
	}
	return s
}

// findError returns the first ERROR frame in fs, or fails.
func findError(t testing.TB, fs []frame) ipc.Status {
	t.Helper()
	for _, f := range fs {
		if f.Type == ipc.TypeError {
			return status(t, f)
		}
	}
	t.Fatalf("no ERROR frame among %d frames", len(fs))
	return ipc.Status{}
}

// runPayload is the RUN payload as an agent decodes it.
type runPayload struct {
	DispatchID string `json:"dispatch_id"`
	RunID      string `json:"run_id"`
	ThreadID   string `json:"thread_id"`
	AgentID    string `json:"agent_id"`
	SessionID  string `json:"session_id"`
	Attempt    uint32 `json:"attempt"`
	Request    struct {
		Messages    []engine.Message `json:"messages"`
		RunMode     string           `json:"run_mode"`
		Origin      string           `json:"origin"`
		Traceparent string           `json:"traceparent"`
	} `json:"request"`
	Context engine.ThreadContext `json:"context"`
}

func decodeRun(t testing.TB, f frame) runPayload {
	t.Helper()
	var p runPayload
	if err := json.Unmarshal(f.Payload, &p); err != nil {
		t.Fatalf("RUN %s: %v", f.Payload, err)
	}
	return p
}

// sink records events.
type sink struct {
	mu     sync.Mutex
	events []string
}

func (s *sink) Emit(data []byte) {
	s.mu.Lock()
	s.events = append(s.events, string(data))
	s.mu.Unlock()
}

func (s *sink) got() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.events...)
}

// runAsync calls Run on its own goroutine.
type runCall struct {
	out  chan engine.RunOutcome
	sink *sink
}

func startRun(h *hub.Hub, ctx context.Context, req *engine.RunRequest) *runCall {
	rc := &runCall{out: make(chan engine.RunOutcome, 1), sink: &sink{}}
	go func() { rc.out <- h.Run(ctx, req, rc.sink) }()
	return rc
}

func (rc *runCall) wait(t testing.TB) engine.RunOutcome {
	t.Helper()
	select {
	case o := <-rc.out:
		return o
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
		return engine.RunOutcome{}
	}
}

func request(thread string) *engine.RunRequest {
	return &engine.RunRequest{
		DispatchID: "d-" + thread, RunID: "r-" + thread, ThreadID: thread, AgentID: "default",
		SessionID: "s-" + thread, Attempt: 1, RunMode: engine.ModeResume, Origin: engine.OriginUser,
		Messages: []engine.Message{{ID: "m1", Role: "user", Content: json.RawMessage(`"hi"`)}},
	}
}

// eventually polls cond until it holds.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func finishDone(response string) string {
	return fmt.Sprintf(`{"status":"done","termination":{"type":"natural_end"},"response":%q}`, response)
}
