package proxy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"strconv"
	"sync"
	"time"

	gojson "github.com/goccy/go-json"
	"github.com/valyala/fasthttp"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// readBatch is how many events a stream takes from the ring per read; it
// flushes once per batch.
const readBatch = 64

// readBatchBytes bounds the event data one read takes (it goes one
// event past it): what a stream holds of the ring's events while its
// client is slow, whatever the ring has dropped meanwhile. 64 events of
// 1 MiB held 64 MiB per stalled client outside --event-buffer-total-bytes
// (found by review: 30 stalled clients took the heap past
// --memory-limit). fasthttp's pipe to the connection holds up to four
// writes more, each a copy.
const readBatchBytes = 256 << 10

// minStall is the shortest default StallTimeout.
const minStall = 10 * time.Second

// sseStream is one client following a run's EventLog. Its goroutine is
// the one fasthttp starts for SetBodyStreamWriter; it owns every field
// but mu's.
type sseStream struct {
	s       *Server
	thread  string // the thread whose run it follows (for logs)
	log     *engine.EventLog
	after   uint64 // the last event id written (the client's position)
	head    []byte // written first: the submitted event, or a reset
	finish  []byte // a foreground stream's run_finish if its run never started
	conn    net.Conn
	broken  bool // a write failed: the connection is gone or going
	dropped bool // counted in mailbox_http_sse_dropped_total
	direct  bool // written on the hijacked connection (an HTTP/1.0 client), closed at its end

	mu    sync.Mutex // guards cut, until and the connection's write deadline
	cut   bool       // Shutdown cut the stream off
	until time.Time  // the write deadline last set
}

// startStream answers the request with an SSE stream of log (a run of
// thread) from after on, starting with head. fg is the submit result of a foreground submit
// (nil on re-attachment). A nil log sends head alone.
func (s *Server) startStream(ctx *fasthttp.RequestCtx, thread string, log *engine.EventLog, after uint64, head []byte, fg *engine.SubmitResult) error {
	ctx.SetStatusCode(fasthttp.StatusOK)
	h := &ctx.Response.Header
	h.SetContentType("text/event-stream")
	h.Set(fasthttp.HeaderCacheControl, "no-cache")
	h.Set("X-Accel-Buffering", "no")
	// The connection is kept for the client's next request once the stream
	// ends: the write deadline run moved is cleared when that request
	// comes (handle; a foreground client does not dial again for every
	// run). A stream that ended on a failed
	// write leaves a connection fasthttp closes, and so does a stream to
	// an HTTP/1.0 client (below), whose end is the connection's.
	if log == nil {
		ctx.SetBody(head)
		return nil
	}
	st := &sseStream{s: s, thread: thread, log: log, after: after, head: head, conn: ctx.Conn()}
	if fg != nil {
		st.finish = appendSyntheticFinish(nil, fg)
	}
	if !ctx.Request.Header.IsHTTP11() && !ctx.IsHead() {
		// HTTP/1.0 has no chunked coding (RFC 9112 §6.1), and fasthttp
		// chunks every body stream (an HTTP/1.0 client read the chunk
		// sizes as lines of the stream). The stream is written on the
		// hijacked connection as it is, and its end closes the
		// connection. It is registered when it starts: fasthttp skips
		// the hijack when the connection fails first.
		st.direct = true
		h.SetContentLength(-2) // no length and no coding: Connection: close
		ctx.HijackSetNoResponse(true)
		ctx.Hijack(func(c net.Conn) {
			defer s.hijackSeen(st.conn, 0, true) // fasthttp closes c next
			w := bufio.NewWriterSize(c, directBuffer)
			w.Write(h.Header()) // ctx is fasthttp's until this returns
			if !s.addStream(st) {
				c.SetWriteDeadline(time.Now().Add(s.stall()))
				w.Write(head)
				w.Flush()
				return
			}
			st.run(w)
		})
		return nil
	}
	if !s.addStream(st) {
		ctx.SetBody(head)
		return nil
	}
	ctx.Response.ImmediateHeaderFlush = true
	ctx.SetBodyStreamWriter(st.run)
	return nil
}

// addStream registers st with the streams Shutdown ends and waits for;
// false once Shutdown began (the stream answers what is known: its head).
func (s *Server) addStream(st *sseStream) bool {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return false
	}
	s.streams[st] = struct{}{}
	s.streamWG.Add(1)
	s.mu.Unlock()
	s.m.subscribers.Add(1)
	return true
}

// directBuffer is the write buffer of a stream to an HTTP/1.0 client (a
// stream to any other gets fasthttp's).
const directBuffer = 4 << 10

// run writes the stream until the log closes, the client leaves, the
// stream falls behind the ring, or Shutdown.
func (st *sseStream) run(w *bufio.Writer) {
	s := st.s
	defer s.endStream(st)
	defer st.extendDeadline() // the bytes still on their way get one more stall bound, no more
	ping := time.NewTicker(s.cfg.PingInterval)
	defer ping.Stop()
	buf := make([]engine.Event, 0, readBatch)
	var line []byte
	// Every write is bounded by the stall timeout, the first ones too: a
	// write larger than w's buffer goes to the connection at once, and
	// one to a client that did not read blocked until it closed (found
	// by review: a re-attached stream of 1 MiB events was never cut off).
	if !st.extendDeadline() {
		return
	}
	if len(st.head) > 0 {
		w.Write(st.head)
	}
	live := false // a reset after the first read means this stream fell behind
	for {
		select {
		case <-s.done:
			w.WriteString(": shutting down\n\n")
			st.flush(w)
			return
		default:
		}
		if !st.extendDeadline() {
			return
		}
		evs, reset, closed, wait := st.log.ReadUpTo(st.after, readBatch, readBatchBytes, buf)
		// A reset with nothing to serve: the client's id is from before
		// this log (an earlier attempt's), which has no event yet. The
		// position cannot move past it, so every read reports it again:
		// it is sent once, with the log's first event, and this read does
		// not make the stream live (the reset then is no slow reader's).
		deferred := reset && len(evs) == 0 && !closed
		if reset && !deferred {
			oldest := st.after + 1
			if len(evs) > 0 {
				oldest = evs[0].Seq
			}
			if live {
				line = appendReset(line[:0], "slow_subscriber", st.after, oldest)
				st.dropped = true // counted here, not again by a failing flush (found by review)
				w.Write(line)
				st.flush(w)
				s.m.dropped.Inc()
				s.log.Info("sse subscriber fell behind the event buffer: disconnected",
					"thread_id", st.thread, "after", st.after, "oldest", oldest)
				return
			}
			line = appendReset(line[:0], "expired", st.after, oldest)
			w.Write(line)
		}
		// Only events make the stream live: an empty read says nothing of
		// the position (a log not numbered yet reports no reset for an
		// earlier attempt's id, which its first events will).
		live = live || len(evs) > 0
		for i := range evs {
			var err error
			if line, err = st.writeEvent(w, line, &evs[i]); err != nil {
				// A large event goes to the connection at once, and so
				// does what fills w's buffer: the write fails as a flush
				// would.
				st.failed()
				return
			}
			st.after = evs[i].Seq
		}
		clear(evs) // hold no event the ring has dropped while the client is slow
		if len(evs) > 0 {
			if !st.flush(w) {
				return
			}
			continue
		}
		if closed {
			if st.finish != nil && st.log.LastSeq() == 0 {
				w.Write(st.finish)
			}
			st.flush(w)
			return
		}
		if w.Buffered() > 0 && !st.flush(w) {
			return
		}
		select {
		case <-wait:
		case <-ping.C:
			w.WriteString(": ping\n\n")
			if !st.flush(w) {
				return
			}
		case <-s.done:
			w.WriteString(": shutting down\n\n")
			st.flush(w)
			return
		}
	}
}

// flush sends what is buffered to the client, bounding how long the
// connection may stay stuck on it. false: the client is gone.
func (st *sseStream) flush(w *bufio.Writer) bool {
	if !st.extendDeadline() {
		return false
	}
	if err := w.Flush(); err != nil {
		st.failed()
		return false
	}
	return true
}

// failed records a failed write: the connection is gone or going. One
// that failed on its write deadline is a client that stopped reading:
// counted and logged as one that fell behind the ring is.
func (st *sseStream) failed() {
	st.broken = true
	if !st.dropped && st.stalled() {
		st.dropped = true
		st.s.m.dropped.Inc()
		st.s.log.Info("sse subscriber stopped reading: disconnected",
			"thread_id", st.thread, "after", st.after, "stall", st.s.stall())
	}
}

// stalled reports whether a failed write was the write deadline's doing:
// the deadline has passed and Shutdown did not cut the stream off. (w
// writes to a pipe fasthttp copies to the connection: its error does not
// say why the copy stopped.)
func (st *sseStream) stalled() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return !st.cut && st.conn != nil && !time.Now().Before(st.until)
}

// extendDeadline moves the connection's write deadline to now + stall,
// unless the stream was cut off.
func (st *sseStream) extendDeadline() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.cut {
		return false
	}
	if st.conn != nil {
		st.until = time.Now().Add(st.s.stall())
		st.conn.SetWriteDeadline(st.until)
	}
	return true
}

// cutOff makes the connection's pending and future writes fail at once,
// so a stream stuck on a client that does not read ends.
func (st *sseStream) cutOff() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.cut = true
	if st.conn != nil {
		st.conn.SetWriteDeadline(time.Now())
	}
}

// endStream unregisters a finished stream. Unless a write failed, its
// connection lingers until fasthttp has written the rest (Shutdown cuts
// it off like a stream); that is recorded before streamWG.Done, which
// Shutdown waits on.
func (s *Server) endStream(st *sseStream) {
	s.mu.Lock()
	delete(s.streams, st)
	s.mu.Unlock()
	// A direct stream wrote its last bytes itself.
	if st.conn != nil && !st.broken && !st.direct {
		s.linger(st.conn, time.Now().Add(s.stall()))
	}
	s.m.subscribers.Add(-1)
	s.streamWG.Done()
}

// stall is how long one write to a streaming client may stay stuck.
func (s *Server) stall() time.Duration { return s.cfg.StallTimeout }

// appendEvent appends one agent event in SSE form: id, event type, data
// on one line.
func appendEvent(dst []byte, e *engine.Event) []byte {
	dst = appendEventHead(dst, e)
	dst = appendOneLine(dst, e.Data)
	return append(dst, "\n\n"...)
}

// appendEventHead appends an event's lines up to its data: id, event
// type, "data: ".
func appendEventHead(dst []byte, e *engine.Event) []byte {
	dst = append(dst, "id: "...)
	dst = strconv.AppendUint(dst, e.Seq, 10)
	if e.Type != "" && printable(e.Type) {
		dst = append(dst, "\nevent: "...)
		dst = append(dst, e.Type...)
	}
	return append(dst, "\ndata: "...)
}

// sseChunk bounds one write of a large event to fasthttp's pipe. The
// pipe copies each write and queues up to four, plus the one its copier
// holds, whatever the client reads: written whole, a stream to a client
// that stopped reading held about five times its largest event (found
// by review: 100 re-attached streams of a run with 3.6 MB of events took
// 358 MB until the stall timeout cut them off).
const sseChunk = 32 << 10

// writeEvent writes e to w, its data in pieces of at most sseChunk, each
// with a fresh stall bound: a large event to a slow client is cut off
// when a piece makes no progress for the stall timeout, not when the
// whole event takes longer. line is scratch space, returned for reuse
// (dropped when an event made it large).
func (st *sseStream) writeEvent(w *bufio.Writer, line []byte, e *engine.Event) ([]byte, error) {
	if len(e.Data) <= sseChunk {
		line = appendEvent(line[:0], e)
		_, err := w.Write(line)
		return line, err
	}
	line = appendEventHead(line[:0], e)
	data := e.Data
	if bytes.IndexByte(data, '\n') >= 0 || bytes.IndexByte(data, '\r') >= 0 {
		data = appendOneLine(nil, data) // rare: an agent's JSON over several lines
	}
	if _, err := w.Write(line); err != nil {
		return line, err
	}
	for len(data) > 0 {
		n := min(len(data), sseChunk)
		if !st.extendDeadline() {
			return line, errStreamCut
		}
		if _, err := w.Write(data[:n]); err != nil {
			return line, err
		}
		data = data[n:]
	}
	_, err := w.WriteString("\n\n")
	return line, err
}

// errStreamCut is writeEvent's error for a stream Shutdown cut off.
var errStreamCut = errors.New("stream cut off")

// appendOneLine appends JSON data, compacted when it spans lines (an SSE
// data line ends at the first line break).
func appendOneLine(dst, data []byte) []byte {
	if bytes.IndexByte(data, '\n') < 0 && bytes.IndexByte(data, '\r') < 0 {
		return append(dst, data...)
	}
	var b bytes.Buffer
	if json.Compact(&b, data) == nil {
		return append(dst, b.Bytes()...)
	}
	for _, c := range data {
		if c == '\n' || c == '\r' {
			c = ' '
		}
		dst = append(dst, c)
	}
	return dst
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return false
		}
	}
	return true
}

// submittedEvent is the sidecar's first event of a foreground stream.
func submittedEvent(res engine.SubmitResult) []byte {
	data, _ := gojson.Marshal(res) // strings only: always marshals
	b := make([]byte, 0, len(data)+40)
	b = append(b, "id: 0\nevent: submitted\ndata: "...)
	b = append(b, data...)
	return append(b, "\n\n"...)
}

// appendReset appends an `event: reset` (no id: the client's
// Last-Event-ID stays) saying events after `after` up to oldest were not
// sent.
func appendReset(dst []byte, reason string, after, oldest uint64) []byte {
	dst = append(dst, `event: reset`+"\n"+`data: {"type":"reset","reason":"`...)
	dst = append(dst, reason...)
	dst = append(dst, `","after":`...)
	dst = strconv.AppendUint(dst, after, 10)
	dst = append(dst, `,"oldest":`...)
	dst = strconv.AppendUint(dst, oldest, 10)
	return append(dst, "}\n\n"...)
}

// appendSyntheticFinish appends the run_finish a foreground stream ends
// with when its dispatch was withdrawn before the run started.
func appendSyntheticFinish(dst []byte, res *engine.SubmitResult) []byte {
	data, _ := gojson.Marshal(map[string]any{
		"type": "run_finish", "thread_id": res.ThreadID, "run_id": res.RunID, "dispatch_id": res.DispatchID,
		"termination": engine.Termination{Type: engine.TermCancelled},
	})
	dst = append(dst, "id: "...)
	dst = strconv.AppendUint(dst, engine.WithdrawnFinishID, 10)
	dst = append(dst, "\nevent: run_finish\ndata: "...)
	dst = append(dst, data...)
	return append(dst, "\n\n"...)
}
