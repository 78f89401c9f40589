package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	json "github.com/goccy/go-json"
	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitTimeout bounds every wait of the tests for something that should
// happen at once.
const waitTimeout = 5 * time.Second

// testLogger discards logs unless AGENT_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("AGENT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// socketPath returns a fresh Unix socket path short enough for sun_path.
func socketPath(t testing.TB) string {
	dir := t.TempDir()
	if len(dir) > 90 {
		var err error
		dir, err = os.MkdirTemp("", "sdk")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(dir) })
	}
	return filepath.Join(dir, "a.sock")
}

// fakeSidecar is a scripted sidecar: it listens on a Unix socket and hands
// each accepted connection to the test as a fakeConn.
type fakeSidecar struct {
	t        testing.TB
	path     string
	autoPong bool // new connections answer PING with PONG; set before listening

	mu    sync.Mutex // guards ln and all
	ln    net.Listener
	all   []*fakeConn
	conns chan *fakeConn
	wg    sync.WaitGroup // accept loops
}

func newFakeSidecar(t testing.TB, autoPong bool) *fakeSidecar {
	s := &fakeSidecar{t: t, path: socketPath(t), autoPong: autoPong, conns: make(chan *fakeConn, 16)}
	s.listen()
	t.Cleanup(s.close)
	return s
}

// listen starts (or restarts) listening on the socket path.
func (s *fakeSidecar) listen() {
	ln, err := net.Listen("unix", s.path)
	if err != nil {
		s.t.Fatal(err)
	}
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			fc := newFakeConn(s.t, nc, s.autoPong)
			s.mu.Lock()
			s.all = append(s.all, fc)
			s.mu.Unlock()
			s.conns <- fc
		}
	}()
}

// stopListening closes the listener (which removes the socket file).
func (s *fakeSidecar) stopListening() {
	s.mu.Lock()
	ln := s.ln
	s.ln = nil
	s.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	s.wg.Wait()
}

func (s *fakeSidecar) close() {
	s.stopListening()
	s.mu.Lock()
	all := s.all
	s.mu.Unlock()
	for _, fc := range all {
		fc.close()
	}
}

// accept returns the next connection the SDK opened.
func (s *fakeSidecar) accept() *fakeConn {
	s.t.Helper()
	select {
	case fc := <-s.conns:
		return fc
	case <-time.After(waitTimeout):
		s.t.Fatal("no connection from the SDK")
		return nil
	}
}

// acceptBefore is accept with a deadline: ok is false when no connection
// came by then.
func (s *fakeSidecar) acceptBefore(deadline time.Time) (*fakeConn, bool) {
	select {
	case fc := <-s.conns:
		return fc, true
	case <-time.After(time.Until(deadline)):
		return nil, false
	}
}

// frame is a frame the fake received, payload copied.
type frame struct {
	typ     ipc.FrameType
	stream  uint64
	payload []byte
}

func (f frame) String() string { return fmt.Sprintf("%s[%d] %s", f.typ, f.stream, f.payload) }

// fakeConn is the sidecar's end of one connection. A reader goroutine
// queues every frame but PING on frames (closed at EOF); PINGs go to pings
// and are answered with PONG when autoPong is set.
type fakeConn struct {
	t        testing.TB
	nc       net.Conn
	w        *ipc.Writer
	autoPong atomic.Bool
	drain    atomic.Bool   // drop frames instead of queueing them (benchmarks)
	drained  atomic.Int64  // frames dropped
	frames   chan frame    // closed when the reader ends
	pings    chan []byte   // PING payloads, newest dropped when full
	done     chan struct{} // closed when the reader ends
}

func newFakeConn(t testing.TB, nc net.Conn, autoPong bool) *fakeConn {
	fc := &fakeConn{
		t:      t,
		nc:     nc,
		w:      ipc.NewWriter(nc, ipc.WriterConfig{}),
		frames: make(chan frame, 4096),
		pings:  make(chan []byte, 64),
		done:   make(chan struct{}),
	}
	fc.autoPong.Store(autoPong)
	go fc.read()
	return fc
}

func (fc *fakeConn) read() {
	defer close(fc.done)
	defer close(fc.frames)
	r := ipc.NewReader(fc.nc, ipc.ReaderConfig{})
	for {
		f, err := r.ReadFrame()
		if err != nil {
			return
		}
		if fc.drain.Load() && f.Type == ipc.TypeEvent {
			f.Release()
			fc.drained.Add(1)
			continue
		}
		fr := frame{typ: f.Type, stream: f.Stream, payload: bytes.Clone(f.Payload)}
		f.Release()
		if fr.typ == ipc.TypePing {
			select {
			case fc.pings <- fr.payload:
			default:
			}
			if fc.autoPong.Load() {
				_ = fc.w.WriteFrame(ipc.TypePong, 0, 0, fr.payload)
			}
			continue
		}
		fc.frames <- fr
	}
}

func (fc *fakeConn) close() {
	_ = fc.nc.Close()
	<-fc.done
}

// send writes one frame.
func (fc *fakeConn) send(typ ipc.FrameType, stream uint64, payload string) {
	fc.t.Helper()
	if err := fc.w.WriteFrame(typ, 0, stream, []byte(payload)); err != nil {
		fc.t.Fatalf("fake sidecar: send %s: %v", typ, err)
	}
}

// sendJSON writes one frame with v as its JSON payload.
func (fc *fakeConn) sendJSON(typ ipc.FrameType, stream uint64, v any) {
	fc.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		fc.t.Fatal(err)
	}
	fc.send(typ, stream, string(b))
}

// next returns the next frame (PINGs excluded).
func (fc *fakeConn) next() frame {
	fc.t.Helper()
	return fc.nextWithin(waitTimeout)
}

// nextWithin is next, waiting up to d: for frames whose making takes
// seconds under the race detector on a loaded machine.
func (fc *fakeConn) nextWithin(d time.Duration) frame {
	fc.t.Helper()
	select {
	case f, ok := <-fc.frames:
		if !ok {
			fc.t.Fatal("fake sidecar: connection closed while waiting for a frame")
		}
		return f
	case <-time.After(d):
		fc.t.Fatalf("fake sidecar: no frame from the SDK in %v", d)
	}
	return frame{}
}

// expect returns the next frame and fails unless it has type typ on
// stream.
func (fc *fakeConn) expect(typ ipc.FrameType, stream uint64) frame {
	fc.t.Helper()
	return fc.expectWithin(waitTimeout, typ, stream)
}

// expectWithin is expect, waiting up to d.
func (fc *fakeConn) expectWithin(d time.Duration, typ ipc.FrameType, stream uint64) frame {
	fc.t.Helper()
	f := fc.nextWithin(d)
	if f.typ != typ || f.stream != stream {
		fc.t.Fatalf("fake sidecar: got %v, want %s on stream %d", f, typ, stream)
	}
	return f
}

// expectJSON is expect, decoding the payload into v.
func (fc *fakeConn) expectJSON(typ ipc.FrameType, stream uint64, v any) frame {
	fc.t.Helper()
	f := fc.expect(typ, stream)
	if err := json.Unmarshal(f.payload, v); err != nil {
		fc.t.Fatalf("fake sidecar: decode %v: %v", f, err)
	}
	return f
}

// expectEqualJSON is expect, comparing the payload with want as JSON
// values.
func (fc *fakeConn) expectEqualJSON(typ ipc.FrameType, stream uint64, want string) {
	fc.t.Helper()
	f := fc.expect(typ, stream)
	if !jsonEqual(fc.t, f.payload, []byte(want)) {
		fc.t.Fatalf("fake sidecar: %s payload\n got %s\nwant %s", typ, f.payload, want)
	}
}

// expectEOF waits for the SDK to close the connection, failing on any
// frame but PING before it.
func (fc *fakeConn) expectEOF() {
	fc.t.Helper()
	select {
	case f, ok := <-fc.frames:
		if ok {
			fc.t.Fatalf("fake sidecar: got %v, want the connection closed", f)
		}
	case <-time.After(waitTimeout):
		fc.t.Fatal("fake sidecar: the SDK did not close the connection")
	}
}

// barrier proves that the SDK sent nothing since the last frame read: it
// sends a PING and expects its PONG as the very next frame.
func (fc *fakeConn) barrier() {
	fc.t.Helper()
	fc.send(ipc.TypePing, 0, "barrier!")
	f := fc.next()
	if f.typ != ipc.TypePong || string(f.payload) != "barrier!" {
		fc.t.Fatalf("fake sidecar: got %v, want the barrier PONG", f)
	}
}

var testWelcome = ipc.Welcome{Protocol: 1, SidecarID: "fake", HeartbeatMs: 5000, MaxFrame: ipc.DefaultMaxFrame}

// handshake expects HELLO, answers WELCOME and returns the HELLO.
func (fc *fakeConn) handshake(w ipc.Welcome) ipc.Hello {
	fc.t.Helper()
	var h ipc.Hello
	fc.expectJSON(ipc.TypeHello, 0, &h)
	fc.sendJSON(ipc.TypeWelcome, 0, w)
	return h
}

// runJSON is a RUN payload for runID whose one activation message is a
// user message with text.
func runJSON(runID, text string) string {
	b, _ := json.Marshal(text)
	return fmt.Sprintf(`{"dispatch_id":"d-%[1]s","run_id":"%[1]s","thread_id":"t-%[1]s","agent_id":"default",`+
		`"session_id":"s-%[1]s","attempt":2,"request":{"messages":[{"id":"m1","role":"user","content":%[2]s}],`+
		`"run_mode":"foreground","origin":"user","traceparent":"00-abc-def-01"},`+
		`"context":{"messages":[{"message_id":"m0","thread_id":"t-%[1]s","seq":4,"message":{"id":"m0","role":"user","content":"before"}}],`+
		`"first_seq":4,"total_messages":5,"latest_run":{"run_id":"r0","thread_id":"t-%[1]s","agent_id":"default","status":"done","created_at":1,"updated_at":2,"steps":3,"input_tokens":0,"output_tokens":0,"future_field":{"x":1}}}}`,
		runID, b)
}

func jsonEqual(t testing.TB, a, b []byte) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("decode %s: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	ja, _ := json.Marshal(va)
	jb, _ := json.Marshal(vb)
	return bytes.Equal(ja, jb)
}

// harness is a Client serving against a fake sidecar.
type harness struct {
	t      testing.TB
	sc     *fakeSidecar
	client *Client
	cancel context.CancelFunc
	errc   chan error // Serve's return value
	fc     *fakeConn  // the first connection, handshaken with testWelcome unless noHandshake
}

type harnessOpt struct {
	welcome     *ipc.Welcome
	noHandshake bool
	autoPong    *bool
}

// startClient starts Serve with cfg (Socket, Logger and small backoffs
// filled in) against a new fake sidecar, and accepts and handshakes its
// first connection. Cleanup stops Serve and checks it returned nil.
func startClient(t testing.TB, cfg Config, opts ...harnessOpt) *harness {
	t.Helper()
	var opt harnessOpt
	if len(opts) > 0 {
		opt = opts[0]
	}
	sc := newFakeSidecar(t, opt.autoPong == nil || *opt.autoPong)
	cfg.Socket = sc.path
	if cfg.Logger == nil {
		cfg.Logger = testLogger()
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff, cfg.MaxBackoff = 5*time.Millisecond, 20*time.Millisecond
	}
	if cfg.ShutdownGrace == 0 {
		cfg.ShutdownGrace = 2 * time.Second
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, sc: sc, client: c, cancel: cancel, errc: make(chan error, 1)}
	go func() { h.errc <- c.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := h.wait(); err != nil {
			t.Errorf("Serve returned %v, want nil", err)
		}
	})
	if !opt.noHandshake {
		h.fc = sc.accept()
		w := testWelcome
		if opt.welcome != nil {
			w = *opt.welcome
		}
		h.fc.handshake(w)
	}
	return h
}

// wait returns what Serve returned (once; later calls return nil).
func (h *harness) wait() error {
	select {
	case err := <-h.errc:
		h.errc <- nil
		return err
	case <-time.After(waitTimeout):
		h.t.Fatal("Serve did not return")
		return nil
	}
}

// recv waits for a value from ch.
func recv[T any](t testing.TB, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitTimeout):
		t.Fatal("timed out waiting on a channel")
		var zero T
		return zero
	}
}
