package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

const (
	// handshakeTimeout bounds dialling-to-WELCOME.
	handshakeTimeout = 10 * time.Second
	// defaultHeartbeat applies when WELCOME carries no heartbeat_ms.
	defaultHeartbeat = 5 * time.Second
	// bestEffortWrite bounds the ERROR written just before closing.
	bestEffortWrite = 100 * time.Millisecond
)

var (
	// errClosing is the failure reason of a connection this side closed
	// on purpose (graceful shutdown).
	errClosing = errors.New("agent: connection closed by the agent")
	// errNotSent: the connection died before a SUBMIT was written.
	errNotSent = errors.New("agent: request not sent")
	// goawayShutdown is the GOAWAY payload of a graceful shutdown.
	goawayShutdown = mustMarshal(ipc.Status{Code: ipc.CodeShutdown, Message: "agent shutting down"})
)

// conn is one established connection to the sidecar and the runs on it.
//
// Goroutines: readLoop and heartbeatLoop (joined by stop), and one
// handler goroutine per run (counted by Client.handlers). Writes from any
// goroutine go through send.
type conn struct {
	client    *Client
	log       *slog.Logger
	nc        net.Conn
	r         *ipc.Reader // read by readLoop only; accepts frames as large as the sidecar's max_frame
	w         *ipc.Writer // concurrent-safe
	heartbeat time.Duration
	// base is the parent of every run context: the values of Serve's
	// context without its cancellation.
	base context.Context

	lastSend atomic.Int64 // Unix ns of the last frame written
	// wtimeout bounds each write (ns): a sidecar that stops reading for
	// 3 heartbeats is as dead as a silent one.
	wtimeout *atomic.Int64
	lastRecv atomic.Int64 // Unix ns of the last frame read
	pingSeq  atomic.Uint64

	dead     chan struct{} // closed by fail
	failOnce sync.Once
	failErr  error       // why the connection ended; written before dead is closed
	peerErr  *ipc.Status // ERROR the sidecar sent on stream 0; readLoop only

	wg sync.WaitGroup // readLoop and heartbeatLoop

	mu         sync.Mutex                          // guards the fields below
	runs       map[uint64]*Run                     // open streams: removed just before FINISH is sent
	active     int                                 // handlers that have not finished (FINISH sent or given up)
	lastStream uint64                              // highest RUN stream id seen
	submits    map[string]chan submitResultPayload // pending SUBMITs by req id
	idle       chan struct{}                       // closed when active drops to 0; nil when nobody waits
	stopping   bool                                // grace is over: new and running runs are cancelled
}

// dial connects and performs the handshake. ctx aborts it.
func (c *Client) dial(ctx context.Context) (*conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", c.cfg.Socket)
	if err != nil {
		return nil, fmt.Errorf("agent: dial %s: %w", c.cfg.Socket, err)
	}
	abort := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	_ = nc.SetDeadline(time.Now().Add(handshakeTimeout))
	welcome, err := c.handshake(nc)
	if !abort() {
		err = context.Cause(ctx)
	}
	if err != nil {
		_ = nc.Close()
		return nil, fmt.Errorf("agent: handshake with %s: %w", c.cfg.Socket, err)
	}
	_ = nc.SetDeadline(time.Time{})

	hb := time.Duration(welcome.HeartbeatMs) * time.Millisecond
	if hb <= 0 {
		hb = defaultHeartbeat
	}
	wtimeout := new(atomic.Int64)
	wtimeout.Store(int64(3 * hb))
	cn := &conn{
		client:    c,
		nc:        nc,
		r:         ipc.NewReader(nc, ipc.ReaderConfig{MaxFrame: max(welcome.MaxFrame, ipc.DefaultMaxFrame)}),
		w:         ipc.NewWriter(ipc.DeadlineWriter{Conn: nc, Timeout: wtimeout}, ipc.WriterConfig{MaxFrame: welcome.MaxFrame, Yield: true}),
		wtimeout:  wtimeout,
		heartbeat: hb,
		base:      context.WithoutCancel(ctx),
		dead:      make(chan struct{}),
		runs:      make(map[uint64]*Run),
		submits:   make(map[string]chan submitResultPayload),
	}
	cn.log = c.log.With("sidecar_id", welcome.SidecarID)
	now := time.Now().UnixNano()
	cn.lastSend.Store(now)
	cn.lastRecv.Store(now)
	return cn, nil
}

// handshake sends HELLO and reads the WELCOME. It reads without buffering,
// so that the frames after WELCOME are left for the connection's Reader,
// which is sized by WELCOME's max_frame.
func (c *Client) handshake(nc net.Conn) (ipc.Welcome, error) {
	hello := mustMarshal(ipc.Hello{
		Protocol: ipc.ProtocolVersion,
		Name:     c.cfg.Name,
		AgentIDs: c.cfg.AgentIDs,
		MaxRuns:  c.cfg.MaxRuns,
	})
	if err := ipc.NewWriter(nc, ipc.WriterConfig{}).WriteFrame(ipc.TypeHello, 0, 0, hello); err != nil {
		return ipc.Welcome{}, err
	}
	f, err := readFrameUnbuffered(nc)
	if err != nil {
		return ipc.Welcome{}, fmt.Errorf("read WELCOME: %w", err)
	}
	switch {
	case f.Type == ipc.TypeWelcome && f.Stream == 0:
		var w ipc.Welcome
		if err := unmarshal(f.Payload, &w); err != nil {
			return w, fmt.Errorf("%w: WELCOME: %w", ipc.ErrProtocol, err)
		}
		if w.Protocol != ipc.ProtocolVersion {
			return w, &HandshakeError{Code: ipc.CodeUnsupportedProtocol,
				Message: fmt.Sprintf("sidecar speaks protocol %d, this SDK %d", w.Protocol, ipc.ProtocolVersion)}
		}
		return w, nil
	case f.Type == ipc.TypeError:
		var st ipc.Status
		if err := unmarshal(f.Payload, &st); err != nil {
			return ipc.Welcome{}, fmt.Errorf("%w: ERROR: %w", ipc.ErrProtocol, err)
		}
		return ipc.Welcome{}, &HandshakeError{Code: st.Code, Message: st.Message}
	}
	return ipc.Welcome{}, fmt.Errorf("%w: %s on stream %d in place of WELCOME", ipc.ErrProtocol, f.Type, f.Stream)
}

// readFrameUnbuffered reads one frame of at most ipc.DefaultMaxFrame
// bytes from r, reading nothing beyond it.
func readFrameUnbuffered(r io.Reader) (ipc.Frame, error) {
	var hdr [ipc.HeaderSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return ipc.Frame{}, err
	}
	h, err := ipc.DecodeHeader(hdr[:], ipc.DefaultMaxFrame)
	if err != nil {
		return ipc.Frame{}, err
	}
	f := ipc.Frame{Header: h, Payload: make([]byte, h.Length)}
	if _, err := io.ReadFull(r, f.Payload); err != nil {
		return ipc.Frame{}, err
	}
	return f, ipc.CheckPayload(h.Type, f.Payload)
}

// serveConn connects, serves the connection until it fails or ctx is done
// (then drains it), and reports whether a connection was established and
// why it ended.
func (c *Client) serveConn(ctx context.Context) (established bool, err error) {
	cn, err := c.dial(ctx)
	if err != nil {
		return false, err
	}
	cn.log.Info("connected to the sidecar", "socket", c.cfg.Socket, "heartbeat", cn.heartbeat)
	cn.wg.Add(2)
	go cn.readLoop()
	go cn.heartbeatLoop()
	c.setConn(cn)

	select {
	case <-cn.dead:
	case <-ctx.Done():
		cn.drain()
	}
	c.setConn(nil)
	cn.stop()
	if errors.Is(cn.failErr, errClosing) {
		cn.log.Info("disconnected from the sidecar")
	} else {
		cn.log.Warn("lost the sidecar connection", "err", cn.failErr)
	}
	return true, cn.failErr
}

// send writes one frame. A write failure kills the connection; the error
// then wraps ErrConnectionLost. A frame above max_frame is refused without
// harm to the connection.
func (cn *conn) send(typ ipc.FrameType, stream uint64, payload []byte) error {
	return cn.sendQueued(typ, stream, payload, nil)
}

// sendQueued is send; queued, when not nil, runs once the frame's place
// in the stream is fixed (ipc.Writer.WriteFrameQueued): a run releases
// its sendMu there, so that the connection's reader, which takes it to
// ack a command, never waits for another frame's write.
func (cn *conn) sendQueued(typ ipc.FrameType, stream uint64, payload []byte, queued func(placed bool)) error {
	if err := cn.w.WriteFrameQueued(typ, 0, stream, payload, queued); err != nil {
		if errors.Is(err, ipc.ErrFrameTooLarge) {
			return err
		}
		cn.fail(err)
		return fmt.Errorf("%w: %w", ErrConnectionLost, err)
	}
	cn.lastSend.Store(time.Now().UnixNano())
	return nil
}

// fail ends the connection (once): it records why, closes the socket and
// cancels every run on it with ErrConnectionLost.
func (cn *conn) fail(err error) {
	cn.failOnce.Do(func() {
		cn.failErr = err
		close(cn.dead)
		_ = cn.nc.Close()
		cn.mu.Lock()
		runs := make([]*Run, 0, len(cn.runs))
		for _, r := range cn.runs {
			runs = append(runs, r)
		}
		cn.mu.Unlock()
		for _, r := range runs {
			r.cancel(ErrConnectionLost)
		}
	})
}

// closeWith sends ERROR{code,message} on stream 0, best effort, and fails
// the connection with err.
func (cn *conn) closeWith(code string, err error) {
	cn.wtimeout.Store(int64(bestEffortWrite))
	_ = cn.nc.SetWriteDeadline(time.Now().Add(bestEffortWrite))
	_ = cn.w.WriteFrame(ipc.TypeError, 0, 0, mustMarshal(ipc.Status{Code: code, Message: err.Error()}))
	cn.fail(err)
}

// stop closes the connection and joins its reader and heartbeat.
func (cn *conn) stop() {
	cn.fail(errClosing)
	cn.wg.Wait()
}

// drain is the graceful stop: GOAWAY, let runs finish within the grace,
// cancel the rest with ErrShutdown and wait for their handlers.
func (cn *conn) drain() {
	grace := cn.client.cfg.ShutdownGrace
	cn.log.Info("shutting down: sending GOAWAY", "runs", cn.runCount(), "grace", grace)
	if err := cn.send(ipc.TypeGoAway, 0, goawayShutdown); err != nil {
		return
	}
	if grace > 0 {
		t := time.NewTimer(grace)
		select {
		case <-cn.idleChan():
		case <-cn.dead:
		case <-t.C:
		}
		t.Stop()
	}
	cn.mu.Lock()
	cn.stopping = true
	left := make([]*Run, 0, len(cn.runs))
	for _, r := range cn.runs {
		left = append(left, r)
	}
	cn.mu.Unlock()
	if len(left) > 0 {
		cn.log.Warn("shutdown grace over: cancelling runs", "runs", len(left))
	}
	for _, r := range left {
		r.cancel(ErrShutdown)
	}
	var expire <-chan time.Time
	if stop := cn.client.cfg.StopTimeout; stop > 0 {
		cn.client.stopBy = time.Now().Add(stop)
		t := time.NewTimer(stop)
		defer t.Stop()
		expire = t.C
	}
	tick := time.NewTicker(max(grace, time.Second))
	defer tick.Stop()
	for {
		select {
		case <-cn.idleChan():
			return
		case <-cn.dead:
			return
		case <-tick.C:
			cn.log.Warn("still waiting for cancelled runs to finish", "runs", cn.runCount())
		case <-expire:
			// The connection closes next: the sidecar retries these runs.
			cn.log.Error("cancelled runs ignore their context: closing the connection without their FINISH",
				"runs", cn.runCount(), "stop_timeout", cn.client.cfg.StopTimeout)
			return
		}
	}
}

func (cn *conn) runCount() int {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	return cn.active
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// idleChan returns a channel closed once every run has finished.
func (cn *conn) idleChan() <-chan struct{} {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.active == 0 {
		return closedChan
	}
	if cn.idle == nil {
		cn.idle = make(chan struct{})
	}
	return cn.idle
}

// closeStream forgets a run's stream: frames for it are no longer
// answered. Called just before its FINISH is sent.
func (cn *conn) closeStream(stream uint64) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	delete(cn.runs, stream)
}

// runEnded counts a run whose FINISH was sent (or given up).
func (cn *conn) runEnded() {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	cn.active--
	if cn.active == 0 && cn.idle != nil {
		close(cn.idle)
		cn.idle = nil
	}
}

func (cn *conn) run(stream uint64) *Run {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	return cn.runs[stream]
}

// heartbeatLoop sends PING after a heartbeat without sending, and kills
// the connection when the sidecar was silent for three heartbeats.
func (cn *conn) heartbeatLoop() {
	defer cn.wg.Done()
	hb := cn.heartbeat.Nanoseconds()
	t := time.NewTicker(max(cn.heartbeat/4, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-cn.dead:
			return
		case <-t.C:
		}
		now := time.Now().UnixNano()
		if silent := now - cn.lastRecv.Load(); silent >= 3*hb {
			cn.closeWith(ipc.CodeHeartbeatTimeout, fmt.Errorf("agent: sidecar silent for %v (heartbeat %v)", time.Duration(silent).Round(time.Millisecond), cn.heartbeat))
			return
		}
		if now-cn.lastSend.Load() >= hb {
			var p [ipc.PingSize]byte
			binary.BigEndian.PutUint64(p[:], cn.pingSeq.Add(1))
			_ = cn.send(ipc.TypePing, 0, p[:])
		}
	}
}

// readLoop reads and dispatches frames until the connection ends.
func (cn *conn) readLoop() {
	defer cn.wg.Done()
	for {
		f, err := cn.r.ReadFrame()
		if err != nil {
			switch {
			case errors.Is(err, ipc.ErrProtocol):
				cn.closeWith(ipc.CodeProtocolError, err)
			case cn.peerErr != nil:
				cn.fail(fmt.Errorf("agent: sidecar closed the connection: %s: %s", cn.peerErr.Code, cn.peerErr.Message))
			case errors.Is(err, io.EOF):
				cn.fail(errors.New("agent: sidecar closed the connection"))
			default:
				cn.fail(fmt.Errorf("agent: read: %w", err))
			}
			return
		}
		cn.lastRecv.Store(time.Now().UnixNano())
		err = cn.handle(&f)
		f.Release()
		if err != nil {
			cn.closeWith(ipc.CodeProtocolError, err)
			return
		}
	}
}

// handle acts on one frame from the sidecar; an error is a protocol
// violation that closes the connection.
func (cn *conn) handle(f *ipc.Frame) error {
	switch f.Type {
	case ipc.TypePing, ipc.TypePong, ipc.TypeGoAway, ipc.TypeSubmitResult:
		if f.Stream != 0 {
			return fmt.Errorf("%w: %s on run stream %d", ipc.ErrProtocol, f.Type, f.Stream)
		}
	case ipc.TypeRun, ipc.TypeCheckpointAck, ipc.TypeCancel, ipc.TypeMessages, ipc.TypeDecision:
		if f.Stream == 0 {
			return fmt.Errorf("%w: %s on stream 0", ipc.ErrProtocol, f.Type)
		}
	case ipc.TypeError:
	default: // agent → sidecar types, and a second WELCOME
		return fmt.Errorf("%w: unexpected %s from the sidecar (stream %d)", ipc.ErrProtocol, f.Type, f.Stream)
	}

	switch f.Type {
	case ipc.TypePing:
		if len(f.Payload) != ipc.PingSize {
			return fmt.Errorf("%w: PING payload of %d bytes, want %d", ipc.ErrProtocol, len(f.Payload), ipc.PingSize)
		}
		return ignoreLost(cn.send(ipc.TypePong, 0, f.Payload))
	case ipc.TypePong:
		if len(f.Payload) != ipc.PingSize {
			return fmt.Errorf("%w: PONG payload of %d bytes, want %d", ipc.ErrProtocol, len(f.Payload), ipc.PingSize)
		}
		return nil
	case ipc.TypeGoAway:
		var st ipc.Status
		if err := decodePayload(f, &st); err != nil {
			return err
		}
		cn.log.Info("sidecar sent GOAWAY: no new runs on this connection", "code", st.Code, "message", st.Message)
		return nil
	case ipc.TypeError:
		return cn.handleError(f)
	case ipc.TypeSubmitResult:
		var res submitResultPayload
		if err := decodePayload(f, &res); err != nil {
			return err
		}
		cn.mu.Lock()
		ch := cn.submits[res.Req]
		delete(cn.submits, res.Req)
		cn.mu.Unlock()
		if ch == nil {
			cn.log.Debug("SUBMIT_RESULT for no pending request", "req", res.Req)
			return nil
		}
		ch <- res // buffered
		return nil
	case ipc.TypeRun:
		return cn.startRun(f)
	case ipc.TypeCheckpointAck:
		var ack ipc.CheckpointAck
		if err := decodePayload(f, &ack); err != nil {
			return err
		}
		if r := cn.run(f.Stream); r == nil || !r.resolveCheckpoint(ack.Seq, nil) {
			cn.log.Debug("CHECKPOINT_ACK for no pending checkpoint", "stream", f.Stream, "seq", ack.Seq)
		}
		return nil
	default: // CANCEL, MESSAGES, DECISION
		return cn.handleCommand(f)
	}
}

// ignoreLost drops a connection-loss error: the connection is already
// failing and readLoop sees it on its next read.
func ignoreLost(err error) error {
	if errors.Is(err, ErrConnectionLost) {
		return nil
	}
	return err
}

func (cn *conn) handleError(f *ipc.Frame) error {
	var st ipc.Status
	if err := decodePayload(f, &st); err != nil {
		return err
	}
	if f.Stream == 0 {
		// The sidecar is closing the connection; readLoop reports it at EOF.
		cn.peerErr = &st
		level := slog.LevelWarn
		if st.Code == ipc.CodeShutdown {
			level = slog.LevelInfo // a sidecar stopping is no fault
		}
		cn.log.Log(context.Background(), level, "sidecar reported a connection error", "code", st.Code, "message", st.Message)
		return nil
	}
	r := cn.run(f.Stream)
	if r != nil && st.Seq != nil && r.resolveCheckpoint(*st.Seq, &CheckpointError{Seq: *st.Seq, Code: st.Code, Message: st.Message, Reason: st.Reason}) {
		return nil
	}
	if r == nil {
		// Expected after FINISH: e.g. a COMMAND_ACK that crossed it.
		cn.log.Debug("sidecar rejected a frame of a finished run", "stream", f.Stream, "code", st.Code, "message", st.Message)
		return nil
	}
	r.logger().Warn("sidecar rejected a frame of the run", "code", st.Code, "message", st.Message)
	return nil
}

// runPayload is the RUN payload.
type runPayload struct {
	DispatchID string        `json:"dispatch_id"`
	RunID      string        `json:"run_id"`
	ThreadID   string        `json:"thread_id"`
	AgentID    string        `json:"agent_id"`
	SessionID  string        `json:"session_id"`
	Attempt    int           `json:"attempt"`
	Request    Request       `json:"request"`
	Context    ThreadContext `json:"context"`
}

// startRun opens the stream of a RUN and starts its handler.
func (cn *conn) startRun(f *ipc.Frame) error {
	var p runPayload
	decodeErr := unmarshal(f.Payload, &p)

	cn.mu.Lock()
	if f.Stream <= cn.lastStream {
		cn.mu.Unlock()
		return fmt.Errorf("%w: RUN on stream %d, not above the last one (%d)", ipc.ErrProtocol, f.Stream, cn.lastStream)
	}
	cn.lastStream = f.Stream
	if decodeErr != nil {
		cn.mu.Unlock()
		// The RUN is unusable; retrying it would fail the same way.
		cn.log.Error("malformed RUN", "stream", f.Stream, "err", decodeErr)
		res := Permanent("invalid_run", "agent could not decode the RUN payload: "+decodeErr.Error())
		return ignoreLost(cn.send(ipc.TypeFinish, f.Stream, mustMarshal(res)))
	}
	select {
	case <-cn.dead: // lost (fail has cancelled the runs it saw): the sidecar retries this one
		cn.mu.Unlock()
		return nil
	default:
	}
	r := newRun(cn, f.Stream, &p)
	cn.runs[f.Stream] = r
	cn.active++
	if cn.stopping {
		r.cancel(ErrShutdown)
	}
	cn.client.handlerStarted()
	cn.mu.Unlock()

	r.debug("run started")
	cn.client.pool.do(func() { r.execute(cn.client.cfg.Handler) })
	return nil
}

// commandPayload is the payload of CANCEL, MESSAGES and DECISION.
type commandPayload struct {
	Cmd       string          `json:"cmd"`
	Messages  []MessageRecord `json:"messages"`
	Decisions []Decision      `json:"decisions"`
	AckBy     int64           `json:"ack_by"`
}

// handleCommand answers CANCEL, MESSAGES and DECISION with COMMAND_ACK.
func (cn *conn) handleCommand(f *ipc.Frame) error {
	var cmd commandPayload
	if err := decodePayload(f, &cmd); err != nil {
		return err
	}
	r := cn.run(f.Stream)
	if r == nil {
		// The stream is not open (the run finished): an ack would only
		// draw ERROR unknown_stream. The sender gives up after its timeout.
		cn.log.Debug("command for a run that is not open", "type", f.Type, "stream", f.Stream, "cmd", cmd.Cmd)
		return nil
	}
	return r.command(f.Type, &cmd)
}

// submit sends one SUBMIT and waits for its SUBMIT_RESULT. It returns
// errNotSent when the connection died before the request went out.
func (cn *conn) submit(ctx context.Context, id string, payload []byte) (SubmitResult, error) {
	ch := make(chan submitResultPayload, 1)
	cn.mu.Lock()
	select {
	case <-cn.dead:
		cn.mu.Unlock()
		return SubmitResult{}, errNotSent
	default:
	}
	cn.submits[id] = ch
	cn.mu.Unlock()
	defer func() {
		cn.mu.Lock()
		delete(cn.submits, id)
		cn.mu.Unlock()
	}()
	if err := cn.send(ipc.TypeSubmit, 0, payload); err != nil {
		if errors.Is(err, ErrConnectionLost) {
			return SubmitResult{}, errNotSent // a partial frame is never processed
		}
		return SubmitResult{}, fmt.Errorf("agent: submit %s: %w", id, err)
	}
	var res submitResultPayload
	select {
	case res = <-ch:
	case <-ctx.Done():
		return SubmitResult{}, fmt.Errorf("agent: submit %s: %w", id, context.Cause(ctx))
	case <-cn.dead:
		select {
		case res = <-ch: // answered before the connection ended
		default:
			return SubmitResult{}, fmt.Errorf("agent: submit %s: %w", id, ErrConnectionLost)
		}
	}
	if res.Error != nil {
		return SubmitResult{}, &SubmitError{Code: res.Error.Code, Message: res.Error.Message}
	}
	return res.SubmitResult, nil
}

// decodePayload decodes a frame's JSON payload; a payload that does not
// fit v is a protocol error.
func decodePayload(f *ipc.Frame, v any) error {
	if err := unmarshal(f.Payload, v); err != nil {
		return fmt.Errorf("%w: malformed %s payload (stream %d): %w", ipc.ErrProtocol, f.Type, f.Stream, err)
	}
	return nil
}

// unmarshal decodes JSON, turning a decoder panic on hostile input into an
// error. The decoded value keeps no reference to b.
func unmarshal(b []byte, v any) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("json decoder panic: %v", r)
		}
	}()
	return json.Unmarshal(b, v)
}

// mustMarshal encodes a value whose encoding cannot fail (no channels,
// functions or invalid raw JSON).
func mustMarshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("agent: encode %T: %v", v, err))
	}
	return b
}
