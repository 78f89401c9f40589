package hub

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/drain"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/loglimit"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

var errTooManyFiles = syscall.EMFILE

// conn is one agent connection past its handshake.
type conn struct {
	h         *Hub
	id        uint64
	rejectLog loglimit.EverySecond // "agent rejected a frame", one a second
	nc        net.Conn
	r         *ipc.Reader
	w         *ipc.Writer
	// wtimeout bounds each write (nanoseconds); failing shortens it.
	wtimeout *atomic.Int64
	log      *slog.Logger
	name     string
	maxRuns  int
	anyID    bool
	agents   map[string]struct{}

	// quiet holds the streams whose events the reader emitted without
	// waking their readers (engine.QuietSink), and quietFrames counts the
	// frames read since; the reader wakes them once it has no whole frame
	// left to read, or every maxQuietFrames frames. Owned by the reader.
	quiet       []*stream
	quietFrames int

	recvAt atomic.Int64 // Unix ns of the last frame received, for the heartbeat
	sentAt atomic.Int64 // Unix ns of the last frame sent, for the heartbeat

	ctx    context.Context // cancelled when the connection fails
	cancel context.CancelFunc
	dead   chan struct{} // closed when the connection fails
	// readDone is closed when the reader has stopped: after the
	// connection failed, it has handed over every frame it had received.
	readDone chan struct{}
	once     sync.Once
	cause    error // why it failed; set before dead is closed

	mu       sync.Mutex
	streams  map[uint64]*stream
	reserved int // slots taken by runs whose RUN is not written yet
	// abandoned holds streams the hub gave up on at a drain, past their
	// CancelGrace: the agent still runs them, so they keep their slot
	// until their FINISH.
	abandoned   map[uint64]struct{}
	nextStream  uint64
	agentGoAway bool
	// runMu orders RUN frames: a stream id is taken and its RUN written
	// under it, so ids arrive in increasing order (docs/protocol.md).
	runMu sync.Mutex

	// pong carries the payload of the PONG owed for the agent's last
	// PING from the reader to the heartbeat goroutine, which writes it:
	// the reader never waits for a write to an agent that does not read
	// (which may itself wait for this connection's reader).
	pong chan [ipc.PingSize]byte
	// replies carries the answers the reader owes the agent (ERROR
	// unknown_stream, a refused CHECKPOINT, a refused SUBMIT) to the
	// heartbeat goroutine, which writes them, for the same reason.
	replies chan owedFrame

	nextCmd atomic.Uint64
	submits chan struct{} // semaphore of SUBMITs in flight
	wg      sync.WaitGroup
}

// serveConn runs one connection: handshake, then the read loop, then
// cleanup. It returns when the connection is closed.
func (h *Hub) serveConn(nc net.Conn) {
	id := h.nextConn.Add(1)
	log := h.log.With("agent_conn", id)
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		nc.Close()
		return
	}
	if open := len(h.greeting) + len(h.conns); open >= h.cfg.MaxConns {
		h.mu.Unlock()
		h.refuseConn(nc, open, log)
		return
	}
	h.greeting[nc] = struct{}{}
	h.mu.Unlock()
	c, err := h.handshake(nc, id, log)
	if err != nil {
		h.mu.Lock()
		delete(h.greeting, nc)
		h.mu.Unlock()
		log.Warn("agent handshake failed", "err", err)
		nc.Close()
		return
	}
	// It leaves greeting as it joins conns, under one lock: MaxConns
	// counts it throughout.
	ok, goaway := h.register(c, nc)
	if !ok {
		c.fail(ErrClosed, ipc.Status{Code: ipc.CodeShutdown, Message: "sidecar closing"})
		close(c.readDone)
		c.wg.Wait()
		return
	}
	h.m.connects.Inc()
	c.log.Info("agent connected", "max_runs", c.maxRuns)
	if goaway != nil {
		c.sendGoAway(*goaway)
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.heartbeat()
	}()
	c.readLoop()
	h.unregister(c)
	c.wg.Wait()
	// A connection lost without the agent's GOAWAY, the sidecar's own
	// close aside, is a warning: its runs failed and are retried (found by
	// review: logged at INFO, beside a heartbeat loss's WARN).
	c.mu.Lock()
	clean := c.agentGoAway
	c.mu.Unlock()
	if clean || errors.Is(c.cause, ErrClosed) {
		c.log.Info("agent disconnected", "cause", c.cause)
	} else {
		c.log.Warn("agent disconnected", "cause", c.cause, "goaway", false)
	}
}

// refuseConn answers a connection past MaxConns with ERROR busy on
// stream 0 and closes it. The agent's HELLO is read and dropped first
// (up to 64 KiB, for at most a second, on the connection's own
// goroutine), after the sending side is closed: closed at once, the
// agent's HELLO met a broken pipe and it never read why. Each agent
// connection holds about 80 KiB (buffers, goroutines): a review's 8 000
// idle ones held 666 MiB before the cap.
func (h *Hub) refuseConn(nc net.Conn, open int, log *slog.Logger) {
	h.m.refusedConns.Inc()
	if held, ok := h.refusedLog.Allow(time.Now()); ok {
		log.Warn("agent connection refused: too many open", "open", open, "max_conns", h.cfg.MaxConns, "refused_since_last_warning", held)
	}
	p, _ := json.Marshal(ipc.Status{Code: ipc.CodeBusy, Message: fmt.Sprintf("the sidecar has its most agent connections open (%d, --max-agent-conns): retry", h.cfg.MaxConns)}) // strings always marshal
	until := time.Now().Add(time.Second)
	_ = nc.SetWriteDeadline(until)
	if _, err := nc.Write(ipc.AppendFrame(nil, ipc.TypeError, 0, 0, p)); err != nil {
		_ = nc.Close()
		return
	}
	_ = drain.Close(nc, 64<<10, until)
}

// handshake reads HELLO and answers WELCOME.
func (h *Hub) handshake(nc net.Conn, id uint64, log *slog.Logger) (*conn, error) {
	// Every write is bounded: an agent that stops reading cannot block
	// the hub for longer than the heartbeat's dead-peer time.
	wtimeout := new(atomic.Int64)
	wtimeout.Store(int64(max(3*h.cfg.Heartbeat, time.Second)))
	w := ipc.NewWriter(ipc.DeadlineWriter{Conn: nc, Timeout: wtimeout}, ipc.WriterConfig{MaxFrame: h.cfg.MaxFrame, Yield: true})
	refuse := func(code string, err error) error {
		if p, merr := json.Marshal(ipc.Status{Code: code, Message: err.Error()}); merr == nil {
			_ = w.WriteFrame(ipc.TypeError, 0, 0, p)
		}
		return err
	}
	if err := nc.SetReadDeadline(time.Now().Add(h.cfg.HandshakeTimeout)); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	r := ipc.NewReader(nc, ipc.ReaderConfig{MaxFrame: h.cfg.MaxFrame})
	f, err := r.ReadFrame()
	if err != nil {
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			return nil, refuse(ipc.CodeHandshakeTimeout, fmt.Errorf("handshake: no HELLO within %v", h.cfg.HandshakeTimeout))
		case errors.Is(err, ipc.ErrProtocol):
			h.m.protocolErrors.Inc()
			return nil, refuse(ipc.CodeProtocolError, fmt.Errorf("handshake: %w", err))
		}
		return nil, fmt.Errorf("handshake: %w", err)
	}
	defer f.Release()
	if f.Type != ipc.TypeHello || f.Stream != 0 {
		h.m.protocolErrors.Inc()
		return nil, refuse(ipc.CodeProtocolError, fmt.Errorf("handshake: %w: first frame is %s on stream %d, want HELLO on stream 0", ipc.ErrProtocol, f.Type, f.Stream))
	}
	var hello ipc.Hello
	if err := json.Unmarshal(f.Payload, &hello); err != nil {
		h.m.protocolErrors.Inc()
		return nil, refuse(ipc.CodeProtocolError, fmt.Errorf("handshake: %w: HELLO: %v", ipc.ErrProtocol, err))
	}
	if hello.Protocol == 0 {
		// A HELLO without its version is a bug in the agent, not a
		// version it speaks: unsupported_protocol would tell it to stop
		// for good (found by review).
		h.m.protocolErrors.Inc()
		return nil, refuse(ipc.CodeProtocolError, fmt.Errorf("handshake: %w: HELLO without protocol", ipc.ErrProtocol))
	}
	if hello.Protocol != ipc.ProtocolVersion {
		return nil, refuse(ipc.CodeUnsupportedProtocol, fmt.Errorf("handshake: agent speaks protocol %d, sidecar speaks %d", hello.Protocol, ipc.ProtocolVersion))
	}
	if err := nc.SetReadDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	c := &conn{
		h: h, id: id, nc: nc, r: r, w: w, wtimeout: wtimeout,
		name:      hello.Name,
		maxRuns:   min(max(hello.MaxRuns, 1), MaxRunsLimit),
		agents:    make(map[string]struct{}),
		dead:      make(chan struct{}),
		readDone:  make(chan struct{}),
		streams:   make(map[uint64]*stream),
		abandoned: make(map[uint64]struct{}),
		submits:   make(chan struct{}, max(h.cfg.MaxSubmits, 1)),
		pong:      make(chan [ipc.PingSize]byte, 1),
		replies:   make(chan owedFrame, maxReplies),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.recvAt.Store(time.Now().UnixNano())
	if len(hello.AgentIDs) == 0 {
		c.anyID = true
	}
	for _, a := range hello.AgentIDs {
		if a == "*" {
			c.anyID = true
		}
		c.agents[a] = struct{}{}
	}
	c.log = log.With("agent", loglimit.Clip(hello.Name, maxLoggedText))
	welcome, err := json.Marshal(ipc.Welcome{
		Protocol: ipc.ProtocolVersion, SidecarID: h.cfg.SidecarID,
		HeartbeatMs: h.cfg.Heartbeat.Milliseconds(), MaxFrame: h.cfg.MaxFrame,
	})
	if err != nil {
		return nil, fmt.Errorf("handshake: encode WELCOME: %w", err)
	}
	if err := c.write(ipc.TypeWelcome, 0, welcome); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	return c, nil
}

// write sends one frame.
func (c *conn) write(typ ipc.FrameType, stream uint64, payload []byte) error {
	err := c.w.WriteFrame(typ, 0, stream, payload)
	if err == nil {
		c.sentAt.Store(time.Now().UnixNano())
	}
	return err
}

// writeJSON encodes v and sends it; a failed write fails the connection.
func (c *conn) writeJSON(typ ipc.FrameType, stream uint64, v any) error {
	p, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", typ, err)
	}
	if err := c.write(typ, stream, p); err != nil {
		if !errors.Is(err, ipc.ErrFrameTooLarge) { // nothing was written
			c.fail(err, ipc.Status{})
		}
		return err
	}
	return nil
}

// fail closes the connection once, recording why; status, when it has a
// code, is sent as ERROR on stream 0 first (best effort).
func (c *conn) fail(cause error, status ipc.Status) {
	c.once.Do(func() {
		// A write blocked on an agent that stopped reading gives up
		// now; the farewell ERROR gets a short chance.
		c.wtimeout.Store(int64(100 * time.Millisecond))
		_ = c.nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		c.cause = cause
		close(c.dead)
		if status.Code != "" {
			if p, err := json.Marshal(status); err == nil {
				_ = c.w.WriteFrame(ipc.TypeError, 0, 0, p)
			}
		}
		c.cancel()
		c.nc.Close()
	})
}

// takesRuns reports whether the connection may get new runs. Caller may
// hold h.mu.
func (c *conn) takesRuns() bool {
	select {
	case <-c.dead:
		return false
	default:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.agentGoAway
}

// capacityShare is what the connection adds to the hub's Capacity: its
// max_runs while it takes runs; after the agent's GOAWAY, the runs it
// still holds, which the engine counts as in flight (found by review:
// counting nothing for them took as many slots from the other
// connections, so that an agent started to replace one that sent GOAWAY
// got fewer runs than its max_runs until every old run ended); nothing
// once it is dead.
func (c *conn) capacityShare() int {
	select {
	case <-c.dead:
		return 0
	default:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.agentGoAway {
		return c.maxRuns
	}
	return len(c.streams) + c.reserved + len(c.abandoned)
}

// runEnded follows the end of one of the connection's runs: the hub's
// Capacity shrinks with it after the agent's GOAWAY (capacityShare), and
// a caller waiting for a slot is woken.
func (c *conn) runEnded() {
	c.mu.Lock()
	goingAway := c.agentGoAway
	c.mu.Unlock()
	if goingAway {
		c.h.updateCapacity()
	}
	c.h.wake()
}

func (c *conn) serves(agent string) bool {
	if c.anyID {
		return true
	}
	_, ok := c.agents[agent]
	return ok
}

func (c *conn) freeSlots() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.maxRuns - len(c.streams) - c.reserved - len(c.abandoned)
}

func (c *conn) sendGoAway(s ipc.Status) {
	if err := c.writeJSON(ipc.TypeGoAway, 0, s); err != nil {
		c.log.Debug("GOAWAY not sent", "err", err)
	}
}

// heartbeat sends PING after a quiet interval and fails the connection
// when the agent has been silent for three intervals.
func (c *conn) heartbeat() {
	hb := c.h.cfg.Heartbeat
	t := time.NewTicker(max(hb/4, time.Millisecond))
	defer t.Stop()
	var ping [ipc.PingSize]byte
	for {
		select {
		case <-c.dead:
			return
		case p := <-c.pong:
			if err := c.write(ipc.TypePong, 0, p[:]); err != nil {
				c.fail(fmt.Errorf("send PONG: %w", err), ipc.Status{})
				return
			}
			continue
		case r := <-c.replies:
			if err := c.write(r.typ, r.stream, r.payload); err != nil {
				if !errors.Is(err, ipc.ErrFrameTooLarge) { // nothing was written
					c.fail(fmt.Errorf("send %s: %w", r.typ, err), ipc.Status{})
					return
				}
			}
			continue
		case <-t.C:
		}
		now := time.Now().UnixNano()
		if now-c.recvAt.Load() >= int64(3*hb) {
			c.log.Warn("agent silent; closing its connection", "silent_for", 3*hb)
			c.fail(fmt.Errorf("agent silent for %v", 3*hb), ipc.Status{Code: ipc.CodeHeartbeatTimeout, Message: fmt.Sprintf("no frame for %v", 3*hb)})
			return
		}
		if now-c.sentAt.Load() >= int64(hb) {
			binary.BigEndian.PutUint64(ping[:], uint64(now))
			if err := c.write(ipc.TypePing, 0, ping[:]); err != nil {
				c.fail(err, ipc.Status{})
				return
			}
		}
	}
}

// readLoop reads frames until the connection fails, and then goes on with
// the frames it had already received, in its buffer: the connection is
// closed by then, so the first read past them ends it. Whichever goroutine
// failed the connection, a FINISH the hub had received is the run's
// outcome. Only a frame that breaks the protocol (or the agent's ERROR on
// stream 0) stops it at once.
func (c *conn) readLoop() {
	defer close(c.readDone)
	defer c.wakeQuiet()
	for {
		f, err := c.r.ReadFrame()
		if err != nil {
			c.readFailed(err)
			return
		}
		c.recvAt.Store(time.Now().UnixNano())
		err = c.handle(&f)
		f.Release()
		if err != nil {
			c.readFailed(err)
			return
		}
		if len(c.quiet) > 0 {
			if c.quietFrames++; c.quietFrames >= maxQuietFrames || !c.r.FrameBuffered() {
				c.wakeQuiet()
			}
		}
	}
}

// maxQuietFrames bounds the frames read between an event and the wake of
// its readers while the agent keeps the reader's buffer full.
const maxQuietFrames = 64

// wakeQuiet wakes the readers of the events emitted quietly since the
// last call. It runs after the frames of one read were handed on (a
// CHECKPOINT to its run's goroutine): the stream writers, woken last, run
// first (see engine.QuietSink).
func (c *conn) wakeQuiet() {
	for i, st := range c.quiet {
		st.sink.(engine.QuietSink).WakeReaders()
		c.quiet[i] = nil
	}
	c.quiet, c.quietFrames = c.quiet[:0], 0
}

func (c *conn) readFailed(err error) {
	select {
	case <-c.dead:
		return // failed elsewhere; the read error is its consequence
	default:
	}
	if errors.Is(err, ipc.ErrProtocol) {
		c.h.m.protocolErrors.Inc()
		c.log.Warn("agent protocol error; closing its connection", "err", err)
		c.fail(err, ipc.Status{Code: ipc.CodeProtocolError, Message: err.Error()})
		return
	}
	c.fail(fmt.Errorf("agent connection: %w", err), ipc.Status{})
}

func protocolErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ipc.ErrProtocol, fmt.Sprintf(format, args...))
}

// handle acts on one frame from the agent. An error closes the connection
// and stops the reader; a failed write fails the connection (see write and
// writeJSON) but is not returned, so that the reader goes on with the
// frames it has received.
func (c *conn) handle(f *ipc.Frame) error {
	switch f.Type {
	case ipc.TypeEvent, ipc.TypeCheckpoint, ipc.TypeFinish, ipc.TypeCommandAck:
		if f.Stream == 0 {
			return protocolErr("%s frame on stream 0", f.Type)
		}
	case ipc.TypePing, ipc.TypePong, ipc.TypeGoAway, ipc.TypeSubmit:
		if f.Stream != 0 {
			return protocolErr("%s frame on stream %d, want stream 0", f.Type, f.Stream)
		}
	case ipc.TypeError:
	default:
		return protocolErr("unexpected %s frame from an agent", f.Type)
	}
	switch f.Type {
	case ipc.TypeEvent:
		return c.onEvent(f)
	case ipc.TypeCheckpoint:
		return c.onCheckpoint(f)
	case ipc.TypeFinish:
		return c.onFinish(f)
	case ipc.TypeCommandAck:
		return c.onCommandAck(f)
	case ipc.TypePing:
		if len(f.Payload) != ipc.PingSize {
			return protocolErr("PING payload of %d bytes, want %d", len(f.Payload), ipc.PingSize)
		}
		// Written by the heartbeat goroutine. A PONG still owed for an
		// earlier PING answers this one too: any frame shows the agent
		// that this side is alive.
		var p [ipc.PingSize]byte
		copy(p[:], f.Payload)
		select {
		case c.pong <- p:
		default:
		}
	case ipc.TypePong:
		// Only its arrival counts (any frame is a sign of life), but a
		// PONG that is not a PING's 8 bytes is a peer that does not speak
		// the protocol, as a PING of another length is.
		if len(f.Payload) != ipc.PingSize {
			return protocolErr("PONG payload of %d bytes, want %d", len(f.Payload), ipc.PingSize)
		}
	case ipc.TypeGoAway:
		var s ipc.Status
		_ = json.Unmarshal(f.Payload, &s)
		c.log.Info("agent sent GOAWAY", "code", loglimit.Clip(s.Code, maxLoggedText), "message", loglimit.Clip(s.Message, maxLoggedText))
		c.mu.Lock()
		c.agentGoAway = true
		c.mu.Unlock()
		c.h.refreshServed() // it serves no agent id now
		c.h.updateCapacity()
	case ipc.TypeError:
		var s ipc.Status
		_ = json.Unmarshal(f.Payload, &s)
		if f.Stream == 0 {
			return fmt.Errorf("agent closed the connection with ERROR %s: %s", loglimit.Clip(s.Code, maxLoggedText), loglimit.Clip(s.Message, maxLoggedText))
		}
		// Text from the agent, clipped, one line a second (found by
		// review: 1 MB messages wrote 57 MB of log in 1.6 s). An ERROR on
		// a run's stream ends nothing: the run goes on until its FINISH
		// or the connection's end (docs/protocol.md).
		if n, ok := c.rejectLog.Allow(time.Now()); ok {
			c.log.Warn("agent rejected a frame", "stream", f.Stream, "code", loglimit.Clip(s.Code, maxLoggedText), "message", loglimit.Clip(s.Message, maxLoggedText), "held_back", n)
		}
	case ipc.TypeSubmit:
		return c.onSubmit(f)
	}
	return nil
}

// maxLoggedText is how much of a text the agent sends (its name, an
// ERROR's code and message) goes into a log line.
const maxLoggedText = 256

// stream returns an open stream or nil.
func (c *conn) stream(id uint64) *stream {
	c.mu.Lock()
	st := c.streams[id]
	c.mu.Unlock()
	return st
}

// unknownStream answers a run frame for a stream that is not open.
func (c *conn) unknownStream(f *ipc.Frame) {
	c.h.m.unknownStream.Inc()
	c.log.Debug("frame for a stream that is not open", "type", f.Type, "stream", f.Stream)
	c.answer(ipc.TypeError, f.Stream, ipc.Status{
		Code:    ipc.CodeUnknownStream,
		Message: fmt.Sprintf("%s for stream %d, which is not open", f.Type, f.Stream),
	}, true)
}

// maxReplies is how many of the reader's answers may wait for the
// heartbeat goroutine to write them.
const maxReplies = 64

// owedFrame is a frame the reader owes the agent.
type owedFrame struct {
	typ     ipc.FrameType
	stream  uint64
	payload []byte
}

// answer hands an answer to the heartbeat goroutine, which writes it: the
// reader never waits for a write to an agent that does not read. When
// maxReplies answers already wait, an answer that may be dropped is
// (ERROR unknown_stream: the frame it answers has been ignored either
// way); any other waits for room, which comes once a write completes or
// fails the connection on its deadline.
func (c *conn) answer(typ ipc.FrameType, stream uint64, v any, droppable bool) {
	p, err := json.Marshal(v)
	if err != nil {
		c.log.Error("encode answer", "type", typ, "err", err)
		return
	}
	r := owedFrame{typ: typ, stream: stream, payload: p}
	select {
	case c.replies <- r:
		return
	default:
	}
	if droppable {
		c.h.m.repliesDropped.Inc()
		return
	}
	select {
	case c.replies <- r:
	case <-c.dead:
	}
}

func (c *conn) onEvent(f *ipc.Frame) error {
	st := c.stream(f.Stream)
	if st == nil {
		c.unknownStream(f)
		return nil
	}
	st.mu.Lock()
	if !st.closed {
		if qs, ok := st.sink.(engine.QuietSink); ok {
			qs.EmitQuiet(f.Payload)
			if n := len(c.quiet); n == 0 || c.quiet[n-1] != st {
				c.quiet = append(c.quiet, st)
			}
		} else {
			st.sink.Emit(f.Payload)
		}
	}
	st.mu.Unlock()
	c.h.m.events.Inc()
	return nil
}

// checkpointPayload is a CHECKPOINT.
type checkpointPayload struct {
	Seq      uint64           `json:"seq"`
	Messages []engine.Message `json:"messages,omitempty"`
	Run      *engine.RunPatch `json:"run,omitempty"`
}

func (c *conn) onCheckpoint(f *ipc.Frame) error {
	st := c.stream(f.Stream)
	if st == nil {
		c.unknownStream(f)
		return nil
	}
	var cp checkpointPayload
	if err := json.Unmarshal(f.Payload, &cp); err != nil {
		return protocolErr("CHECKPOINT on stream %d: %v", f.Stream, err)
	}
	lim := checkpointLimits{count: c.h.cfg.MaxUnackedCheckpoints, bytes: c.h.cfg.MaxUnackedCheckpointBytes}
	switch st.ctl.pushCheckpoint(&cp, int64(len(f.Payload)), lim) {
	case pushQueued:
	case pushOverflow:
		c.log.Warn("agent exceeded a run's backlog of checkpoints awaiting CHECKPOINT_ACK; failing the run",
			"stream", f.Stream, "seq", cp.Seq, "max_unacked", lim.count, "max_unacked_bytes", lim.bytes)
		fallthrough
	case pushRefused:
		c.h.m.checkpointRefused.Inc()
		c.refuseCheckpoint(f.Stream, cp.Seq, ipc.ReasonCheckpointBacklog, fmt.Sprintf(
			"refused: more than %d checkpoints (or %d bytes of them) of this run awaiting CHECKPOINT_ACK; "+
				"this and every later CHECKPOINT of the run are refused and the run fails: wait for CHECKPOINT_ACK",
			lim.count, lim.bytes))
	case pushEnded:
		c.unknownStream(f)
	}
	return nil
}

// finishPayload is a FINISH.
type finishPayload struct {
	Status      string                  `json:"status"`
	Termination *engine.Termination     `json:"termination,omitempty"`
	Response    string                  `json:"response,omitempty"`
	Waiting     *engine.RunWaitingState `json:"waiting,omitempty"`
	Error       *ipc.FinishError        `json:"error,omitempty"`
}

func (c *conn) onFinish(f *ipc.Frame) error {
	st := c.stream(f.Stream)
	if st == nil {
		c.mu.Lock()
		_, ok := c.abandoned[f.Stream]
		delete(c.abandoned, f.Stream)
		c.mu.Unlock()
		if ok { // the agent finally stopped a run the hub gave up on
			c.runEnded()
			return nil
		}
		c.unknownStream(f)
		return nil
	}
	var fin finishPayload
	if err := json.Unmarshal(f.Payload, &fin); err != nil {
		return protocolErr("FINISH on stream %d: %v", f.Stream, err)
	}
	switch fin.Status {
	case "", string(engine.RunDone), string(engine.RunWaiting):
	default:
		return protocolErr("FINISH on stream %d: status %q, want done or waiting", f.Stream, fin.Status)
	}
	// The stream ends here: a second FINISH, or anything else for it, is
	// for an unknown stream; the slot is free for the next run.
	c.closeStream(st)
	if !st.ctl.pushFinish(&fin) {
		// The run's goroutine gave up on the run (a drain past its
		// CancelGrace) as this FINISH came: the slot it kept for the run
		// is free now.
		c.mu.Lock()
		delete(c.abandoned, f.Stream)
		c.mu.Unlock()
	}
	c.runEnded()
	return nil
}

func (c *conn) onCommandAck(f *ipc.Frame) error {
	st := c.stream(f.Stream)
	if st == nil {
		c.unknownStream(f)
		return nil
	}
	var ack ipc.CommandAck
	if err := json.Unmarshal(f.Payload, &ack); err != nil {
		return protocolErr("COMMAND_ACK on stream %d: %v", f.Stream, err)
	}
	p := st.takePending(ack.Cmd)
	if p == expiredCmd {
		if ack.Accepted {
			// The command fell back at its timeout (messages queued as a
			// new dispatch), yet the agent took it: it may act on it
			// twice (found by review). An agent that honours ack_by
			// refuses it instead.
			c.h.m.cmdLate.Inc()
			c.log.Warn("agent accepted a live command after its timeout, which had fallen back: the run may act on it twice (the agent should refuse a command read after its ack_by)",
				"stream", f.Stream, "cmd", ack.Cmd, "timeout", c.h.cfg.CommandTimeout)
		}
		return nil
	}
	if p == nil {
		c.log.Debug("unknown COMMAND_ACK", "stream", f.Stream, "cmd", ack.Cmd)
		return nil
	}
	var err error
	if ack.Accepted {
		c.h.m.cmdAccepted.Inc()
	} else {
		c.h.m.cmdRefused.Inc()
		reason := ack.Reason
		if reason == "" {
			reason = "no reason given"
		}
		err = fmt.Errorf("%w: %s", ErrCommandRefused, reason)
	}
	p.settle(err)
	return nil
}

// submitPayload is a SUBMIT: a request id and a background run request.
type submitPayload struct {
	Req string `json:"req"`
	engine.SubmitRequest
}

func (c *conn) onSubmit(f *ipc.Frame) error {
	var sp submitPayload
	if err := json.Unmarshal(f.Payload, &sp); err != nil {
		// A request that does not decode is answered, not fatal: the
		// agent learns what was wrong.
		var req struct {
			Req string `json:"req"`
		}
		_ = json.Unmarshal(f.Payload, &req)
		c.answer(ipc.TypeSubmitResult, 0, ipc.SubmitResult{Req: req.Req, Error: &ipc.Status{Code: "validation", Message: "SUBMIT: " + err.Error()}}, false)
		return nil
	}
	c.h.m.submits.Inc()
	if err := sp.CheckPathIDs(); err != nil {
		// The HTTP API's rule: a thread or run no client could address
		// is not made (docs/protocol.md, SUBMIT).
		c.answer(ipc.TypeSubmitResult, 0, ipc.SubmitResult{Req: sp.Req, Error: &ipc.Status{Code: engine.Code(err), Message: "SUBMIT: " + err.Error()}}, false)
		return nil
	}
	sub := c.h.submitter.Load()
	if sub == nil || *sub == nil {
		c.answer(ipc.TypeSubmitResult, 0, ipc.SubmitResult{Req: sp.Req, Error: &ipc.Status{Code: "unsupported", Message: "this sidecar does not take SUBMIT"}}, false)
		return nil
	}
	select {
	case c.submits <- struct{}{}:
	default:
		c.answer(ipc.TypeSubmitResult, 0, ipc.SubmitResult{Req: sp.Req, Error: &ipc.Status{Code: ipc.CodeBusy, Message: fmt.Sprintf("more than %d SUBMITs in flight", cap(c.submits))}}, false)
		return nil
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() { <-c.submits }()
		res, err := (*sub).SubmitBackground(c.ctx, sp.SubmitRequest)
		out := ipc.SubmitResult{Req: sp.Req}
		if err != nil {
			out.Error = &ipc.Status{Code: engine.Code(err), Message: err.Error()}
		} else {
			out.DispatchID, out.RunID, out.ThreadID, out.Status = res.DispatchID, res.RunID, res.ThreadID, string(res.Status)
		}
		_ = c.writeJSON(ipc.TypeSubmitResult, 0, out)
	}()
	return nil
}

// reserveStream takes a slot for a run; start gives it its stream id and
// sends its RUN. Caller holds h.mu.
func (c *conn) reserveStream(sink engine.EventSink) *stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reserved++
	st := &stream{sink: sink, pending: make(map[string]*pendingCmd)}
	st.ctl.init()
	return st
}

// start gives a reserved stream the next id, registers it and writes its
// RUN, in id order across concurrent starts.
func (c *conn) start(st *stream, payload []byte) error {
	c.runMu.Lock()
	defer c.runMu.Unlock()
	c.mu.Lock()
	c.reserved--
	c.nextStream++
	st.id = c.nextStream
	c.streams[st.id] = st
	c.mu.Unlock()
	return c.write(ipc.TypeRun, st.id, payload)
}

// closeStream removes a stream from the table; later frames for it are
// answered as for an unknown stream, and its sink gets no more events.
func (c *conn) closeStream(st *stream) {
	c.mu.Lock()
	delete(c.streams, st.id)
	c.mu.Unlock()
	st.mu.Lock()
	st.closed = true
	st.mu.Unlock()
}

// newCmdID returns a connection-unique command id.
func (c *conn) newCmdID() string {
	return strconv.FormatUint(c.nextCmd.Add(1), 10)
}
