package ipc

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"runtime"
	"sync"
	"unicode/utf8"

	json "github.com/goccy/go-json"
)

const (
	// HeaderSize is the size of a frame header in bytes.
	HeaderSize = 16
	// DefaultMaxFrame is the default largest payload, in bytes, a peer
	// accepts (16 MiB); WELCOME announces the sidecar's value as max_frame.
	DefaultMaxFrame = 16 << 20
	// PingSize is the size of a PING or PONG payload in bytes.
	PingSize = 8

	defaultReadBuffer  = 64 << 10
	defaultWriteBuffer = 16 << 10
)

// Protocol errors. Each wraps ErrProtocol; the receiver of one sends ERROR on
// stream 0 and closes the connection. Test with errors.Is.
var (
	// ErrProtocol reports a peer that broke the framing rules.
	ErrProtocol = errors.New("ipc: protocol error")
	// ErrFrameTooLarge reports a payload length above max_frame.
	ErrFrameTooLarge = fmt.Errorf("%w: frame too large", ErrProtocol)
	// ErrUnknownType reports a frame type not in the protocol.
	ErrUnknownType = fmt.Errorf("%w: unknown frame type", ErrProtocol)
	// ErrReservedNotZero reports a header whose reserved field is not 0.
	ErrReservedNotZero = fmt.Errorf("%w: reserved header field not zero", ErrProtocol)
	// ErrBadJSON reports a payload that is not a UTF-8 JSON object where the
	// frame type requires one.
	ErrBadJSON = fmt.Errorf("%w: payload is not a JSON object", ErrProtocol)
)

// FrameType identifies what a frame carries (the frame-type table of
// spec/ipc.md).
type FrameType uint8

// Frame types. The comment gives direction and stream.
const (
	TypeHello         FrameType = 0x01 // agent → sidecar, stream 0: first frame
	TypeWelcome       FrameType = 0x02 // sidecar → agent, stream 0: handshake reply
	TypePing          FrameType = 0x03 // either, stream 0: 8 opaque bytes
	TypePong          FrameType = 0x04 // either, stream 0: the PING's 8 bytes
	TypeGoAway        FrameType = 0x05 // either, stream 0: no new streams
	TypeError         FrameType = 0x06 // either, any stream: rejects a frame or closes
	TypeRun           FrameType = 0x10 // sidecar → agent, new stream: run to execute
	TypeEvent         FrameType = 0x11 // agent → sidecar, run: one agent event
	TypeCheckpoint    FrameType = 0x12 // agent → sidecar, run: messages and run fields
	TypeCheckpointAck FrameType = 0x13 // sidecar → agent, run: checkpoint is durable
	TypeFinish        FrameType = 0x14 // agent → sidecar, run: outcome; ends the stream
	TypeCancel        FrameType = 0x20 // sidecar → agent, run: cancel command
	TypeMessages      FrameType = 0x21 // sidecar → agent, run: inject messages
	TypeDecision      FrameType = 0x22 // sidecar → agent, run: tool-call decisions
	TypeCommandAck    FrameType = 0x23 // agent → sidecar, run: command accepted or not
	TypeSubmit        FrameType = 0x30 // agent → sidecar, stream 0: background run request
	TypeSubmitResult  FrameType = 0x31 // sidecar → agent, stream 0: SUBMIT outcome
)

// typeNames holds the wire name of every known type; "" marks unknown ones.
var typeNames = [256]string{
	TypeHello:         "HELLO",
	TypeWelcome:       "WELCOME",
	TypePing:          "PING",
	TypePong:          "PONG",
	TypeGoAway:        "GOAWAY",
	TypeError:         "ERROR",
	TypeRun:           "RUN",
	TypeEvent:         "EVENT",
	TypeCheckpoint:    "CHECKPOINT",
	TypeCheckpointAck: "CHECKPOINT_ACK",
	TypeFinish:        "FINISH",
	TypeCancel:        "CANCEL",
	TypeMessages:      "MESSAGES",
	TypeDecision:      "DECISION",
	TypeCommandAck:    "COMMAND_ACK",
	TypeSubmit:        "SUBMIT",
	TypeSubmitResult:  "SUBMIT_RESULT",
}

// String returns the wire name ("EVENT"), or "FrameType(0x7f)" for an
// unknown type.
func (t FrameType) String() string {
	if n := typeNames[t]; n != "" {
		return n
	}
	return fmt.Sprintf("FrameType(0x%02x)", uint8(t))
}

// Known reports whether t is a type of the protocol.
func (t FrameType) Known() bool { return typeNames[t] != "" }

// JSONPayload reports whether frames of type t carry a JSON object; PING and
// PONG carry opaque bytes instead.
func (t FrameType) JSONPayload() bool { return t != TypePing && t != TypePong }

// Header is a decoded frame header. The reserved field is not represented:
// it is always written as 0 and rejected when not 0.
type Header struct {
	Length uint32    // payload length in bytes
	Type   FrameType // what the frame carries
	Flags  uint8     // 0 unless the type defines a bit (none does yet)
	Stream uint64    // 0 for the connection, otherwise one run
}

// Encode writes h into dst in wire order. It does not allocate.
func (h Header) Encode(dst *[HeaderSize]byte) {
	binary.BigEndian.PutUint32(dst[0:4], h.Length)
	dst[4] = byte(h.Type)
	dst[5] = h.Flags
	dst[6], dst[7] = 0, 0
	binary.BigEndian.PutUint64(dst[8:16], h.Stream)
}

// DecodeHeader decodes the first HeaderSize bytes of src. It rejects a length
// above maxFrame (0 means DefaultMaxFrame) with ErrFrameTooLarge, an unknown
// type with ErrUnknownType and a non-zero reserved field with
// ErrReservedNotZero; a src shorter than a header yields io.ErrUnexpectedEOF.
// It allocates only to build an error.
func DecodeHeader(src []byte, maxFrame uint32) (Header, error) {
	if len(src) < HeaderSize {
		return Header{}, fmt.Errorf("ipc: decode header from %d bytes: %w", len(src), io.ErrUnexpectedEOF)
	}
	if maxFrame == 0 {
		maxFrame = DefaultMaxFrame
	}
	h := Header{
		Length: binary.BigEndian.Uint32(src[0:4]),
		Type:   FrameType(src[4]),
		Flags:  src[5],
		Stream: binary.BigEndian.Uint64(src[8:16]),
	}
	if !h.Type.Known() {
		return Header{}, fmt.Errorf("%w 0x%02x (stream %d)", ErrUnknownType, src[4], h.Stream)
	}
	if src[6] != 0 || src[7] != 0 {
		return Header{}, fmt.Errorf("%w: 0x%02x%02x in %s header (stream %d)", ErrReservedNotZero, src[6], src[7], h.Type, h.Stream)
	}
	if h.Length > maxFrame {
		return Header{}, fmt.Errorf("%w: %s payload of %d bytes exceeds max %d (stream %d)", ErrFrameTooLarge, h.Type, h.Length, maxFrame, h.Stream)
	}
	return h, nil
}

// CheckPayload reports whether payload is acceptable for frames of type t:
// for every type but PING and PONG a UTF-8 JSON object, else ErrBadJSON.
// PING and PONG payloads are opaque and never checked.
func CheckPayload(t FrameType, payload []byte) error {
	if !t.JSONPayload() {
		return nil
	}
	i := 0
	for i < len(payload) && isJSONSpace(payload[i]) {
		i++
	}
	switch {
	case i == len(payload):
		return fmt.Errorf("%w: empty %s payload", ErrBadJSON, t)
	case payload[i] != '{':
		return fmt.Errorf("%w: %s payload starts with %q", ErrBadJSON, t, payload[i])
	case !utf8.Valid(payload):
		return fmt.Errorf("%w: %s payload is not UTF-8", ErrBadJSON, t)
	case !json.Valid(payload): // goccy's: ≈ 5× stdlib's, same verdicts (FuzzValidAgreesWithStdlib)
		return fmt.Errorf("%w: %s payload is malformed", ErrBadJSON, t)
	}
	return nil
}

func isJSONSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// AppendFrame appends the encoding of one frame to dst and returns the
// extended slice. It does not check typ or the payload.
func AppendFrame(dst []byte, typ FrameType, flags uint8, stream uint64, payload []byte) []byte {
	var hdr [HeaderSize]byte
	Header{Length: uint32(len(payload)), Type: typ, Flags: flags, Stream: stream}.Encode(&hdr)
	return append(append(dst, hdr[:]...), payload...)
}

// Frame is one decoded frame. Payload is borrowed from a shared pool: it is
// valid only until Release, and must not be used, or retained, after it.
type Frame struct {
	Header
	Payload []byte // Header.Length bytes; nil when Length is 0

	buf *[]byte // pooled backing array of Payload, nil if none
}

// Release returns the payload buffer to the pool and clears f.Payload. Call
// it once the payload has been consumed (copied, decoded or forwarded).
// Releasing a zero Frame, or releasing twice through the same pointer, is a
// no-op; releasing two copies of one Frame corrupts later payloads.
func (f *Frame) Release() {
	if f.buf != nil {
		putPayload(f.buf)
	}
	f.buf, f.Payload = nil, nil
}

// Payload buffers are pooled in power-of-two size classes from 256 B to
// 16 MiB; larger payloads (only with a MaxFrame above the default) are
// allocated and left to the garbage collector.
const (
	minPoolShift = 8
	maxPoolShift = 24
)

var payloadPools [maxPoolShift - minPoolShift + 1]sync.Pool // of *[]byte

func poolClass(n int) int {
	return max(0, bits.Len(uint(n-1))-minPoolShift)
}

// getPayload returns a buffer of length n (n > 0).
func getPayload(n int) *[]byte {
	if n > 1<<maxPoolShift {
		b := make([]byte, n)
		return &b
	}
	c := poolClass(n)
	if p, _ := payloadPools[c].Get().(*[]byte); p != nil {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minPoolShift))
	return &b
}

func putPayload(p *[]byte) {
	c := cap(*p)
	if c < 1<<minPoolShift || c > 1<<maxPoolShift || c&(c-1) != 0 {
		return
	}
	payloadPools[poolClass(c)].Put(p)
}

// ReaderConfig configures a Reader. The zero value is ready to use.
type ReaderConfig struct {
	// MaxFrame is the largest payload accepted, in bytes. Default
	// DefaultMaxFrame (16 MiB).
	MaxFrame uint32
	// BufferSize is the size of the read buffer in bytes. Default 64 KiB.
	BufferSize int
	// SkipPayloadCheck turns off the JSON check of payloads (CheckPayload),
	// for peers that are trusted or validated elsewhere. Default false.
	SkipPayloadCheck bool
}

// Reader reads frames from a byte stream. It is not safe for concurrent use:
// one goroutine reads a connection.
type Reader struct {
	br       *bufio.Reader
	maxFrame uint32
	check    bool
	hdr      [HeaderSize]byte
	err      error // first error; returned by every later ReadFrame
}

// NewReader returns a Reader over r, which it buffers.
func NewReader(r io.Reader, cfg ReaderConfig) *Reader {
	if cfg.MaxFrame == 0 {
		cfg.MaxFrame = DefaultMaxFrame
	}
	if cfg.BufferSize <= 0 {
		cfg.BufferSize = defaultReadBuffer
	}
	return &Reader{
		br:       bufio.NewReaderSize(r, cfg.BufferSize),
		maxFrame: cfg.MaxFrame,
		check:    !cfg.SkipPayloadCheck,
	}
}

// ReadFrame reads the next frame. The caller owns the returned Frame and
// calls Release when done with its payload.
//
// At a frame boundary with no more input it returns io.EOF; input that ends
// inside a frame yields io.ErrUnexpectedEOF; a frame that breaks the
// protocol yields an error wrapping ErrProtocol (ErrFrameTooLarge,
// ErrUnknownType, ErrReservedNotZero, ErrBadJSON). A too-large frame is
// rejected from its header, before any payload is read or allocated. Any
// error is final: the stream position is lost, so every later call returns
// the same error and the connection is to be closed.
func (r *Reader) ReadFrame() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.readFrame()
	if err != nil {
		r.err = err
	}
	return f, err
}

// FrameBuffered reports whether the next frame is already read in whole
// (ReadFrame returns it without reading the connection): a reader that
// defers work until its input runs dry asks this before it would block.
func (r *Reader) FrameBuffered() bool {
	if r.err != nil || r.br.Buffered() < HeaderSize {
		return false
	}
	hdr, err := r.br.Peek(HeaderSize) // buffered: does not read
	if err != nil {
		return false
	}
	h, err := DecodeHeader(hdr, r.maxFrame)
	if err != nil {
		return true // ReadFrame fails at once, without reading
	}
	return uint64(r.br.Buffered()) >= HeaderSize+uint64(h.Length)
}

func (r *Reader) readFrame() (Frame, error) {
	if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
		if err == io.EOF {
			return Frame{}, io.EOF
		}
		return Frame{}, fmt.Errorf("ipc: read frame header: %w", err)
	}
	h, err := DecodeHeader(r.hdr[:], r.maxFrame)
	if err != nil {
		return Frame{}, err
	}
	f := Frame{Header: h}
	if h.Length > 0 {
		f.buf, err = r.readPayload(int(h.Length))
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return Frame{}, fmt.Errorf("ipc: read %s payload of %d bytes (stream %d): %w", h.Type, h.Length, h.Stream, err)
		}
		f.Payload = *f.buf
	}
	if r.check {
		if err := CheckPayload(h.Type, f.Payload); err != nil {
			f.Release()
			return Frame{}, fmt.Errorf("ipc: stream %d: %w", h.Stream, err)
		}
	}
	return f, nil
}

// eagerPayload is the largest payload read into a buffer of its full
// size at once. A larger one is read into buffers that double as its
// bytes arrive: a header alone had the reader hold the whole length
// (found by review: fifty connections each announcing a 16 MiB frame and
// sending ten bytes of it held 800 MB).
const eagerPayload = 1 << 20

// readPayload reads a payload of n bytes into a pooled buffer.
func (r *Reader) readPayload(n int) (*[]byte, error) {
	size := min(n, eagerPayload)
	buf := getPayload(size)
	got := 0
	for {
		if _, err := io.ReadFull(r.br, (*buf)[got:size]); err != nil {
			putPayload(buf)
			return nil, err
		}
		if got = size; got == n {
			return buf, nil
		}
		size = min(2*size, n)
		next := getPayload(size)
		copy(*next, (*buf)[:got])
		putPayload(buf)
		buf = next
	}
}

// WriterConfig configures a Writer. The zero value is ready to use.
type WriterConfig struct {
	// MaxFrame is the largest payload the peer accepts, in bytes; larger
	// frames are refused before anything is written. Default
	// DefaultMaxFrame (16 MiB); set it to the peer's announced max_frame.
	MaxFrame uint32
	// BufferSize is the size in bytes of the buffer a frame is assembled in
	// so that header and payload go out in one Write. Larger frames are
	// written with net.Buffers (writev on sockets). Default 16 KiB.
	BufferSize int
	// Yield makes a call that leads the write of a run's bulk frame
	// (RUN, EVENT, CHECKPOINT, CHECKPOINT_ACK, FINISH, SUBMIT,
	// SUBMIT_RESULT) yield first, so that frames goroutines ready to run
	// write meanwhile go out in the same Write (see Writer): fewer system
	// calls when many runs write, at the price of waiting, now and then,
	// for goroutines that compute without blocking. Control frames
	// (commands and their acks, PING, PONG, ERROR, GOAWAY, the handshake)
	// never wait for a yield. The agent SDK and the sidecar's hub set it.
	Yield bool
}

// Writer writes frames to a byte stream. It is safe for concurrent use: the
// runs sharing a connection write through one Writer, and each frame goes
// out whole, in the order the calls took their turn. WriteFrame returns once
// its frame is written (or the write failed), so there is nothing to flush.
//
// Frames of concurrent callers are grouped. A call that finds no write in
// progress leads: with WriterConfig.Yield, for a run's bulk frame, it lets
// the goroutines that are ready to run go first (runtime.Gosched), so
// that frames they write meanwhile join its own; then it writes every
// waiting frame with one Write. A yield that gathers no
// other frame makes the next leads skip it, for longer after each (see
// adaptYield): alone, or next to goroutines that compute without
// blocking, a writer seldom yields. A call that finds a write in progress
// adds its frame to the next group and waits; when the write ends, one of
// the waiting calls leads the next group. A control frame that finds the
// leader yielding does not wait for it: it writes the group at once.
// Under load one system call carries many frames
// (BenchmarkFramesOverUnixSocketConcurrent reports writes/frame); alone, a
// frame costs one Write, as it would without grouping.
type Writer struct {
	maxFrame uint32
	bufSize  int
	yield    bool // WriterConfig.Yield

	mu      sync.Mutex // guards the fields below
	turn    sync.Cond  // on mu: broadcast when a write ends
	w       io.Writer
	fill    []byte // frames waiting for the next write, whole, in order
	frames  int    // how many frames fill holds
	spare   []byte // the buffer of the last write, for reuse
	taken   uint64 // groups taken for writing; fill is group taken+1
	written uint64 // groups written
	writing bool   // a leader is writing, or gathering before it writes
	// gathering: the leader of group taken+1 is yielding before it
	// writes; a control frame that comes meanwhile writes the group
	// itself rather than wait for the yield.
	gathering bool
	// yieldSkip is how many of the next leads write at once, without
	// yielding first; yieldBackoff the last such count (adaptYield).
	yieldSkip, yieldBackoff int
	hdr                     [HeaderSize]byte
	err                     error // first write error; returned by every later call
	// failedGroup is the group whose write failed, and failedN the bytes
	// of it written before: its frames that ended within them went out
	// whole, and their calls succeed.
	failedGroup uint64
	failedN     int
}

// NewWriter returns a Writer over w.
func NewWriter(w io.Writer, cfg WriterConfig) *Writer {
	if cfg.MaxFrame == 0 {
		cfg.MaxFrame = DefaultMaxFrame
	}
	if cfg.BufferSize < HeaderSize {
		cfg.BufferSize = defaultWriteBuffer
	}
	wr := &Writer{maxFrame: cfg.MaxFrame, bufSize: cfg.BufferSize, yield: cfg.Yield, w: w, fill: make([]byte, 0, cfg.BufferSize)}
	wr.turn.L = &wr.mu
	return wr
}

// WriteFrame writes one frame, grouped with the frames of concurrent calls
// (see Writer). It refuses an unknown type (ErrUnknownType) and a payload
// above MaxFrame (ErrFrameTooLarge) without writing anything; it does not
// check JSON payloads (see CheckPayload). A failed write leaves the stream
// unusable, so it is final: every later call fails, with an error that
// names its own frame and wraps the first failure (errors.Is finds its
// cause; its message names the frame whose write failed). A
// call returns nil when its frame went out whole, also when the write
// that carried it failed on a frame after it: the peer may have it, so
// an error means the frame did not reach the stream whole, and a peer
// never acts on part of a frame.
func (w *Writer) WriteFrame(typ FrameType, flags uint8, stream uint64, payload []byte) error {
	return w.write(typ, flags, stream, payload, nil)
}

// WriteFrameQueued is WriteFrame, and calls queued as soon as the frame's
// place in the stream is fixed: any frame a call writes after that goes
// out after this one. queued runs once, without the Writer's lock,
// before WriteFrameQueued returns. placed is false when the frame is
// refused or the stream has already failed; true when the frame has its
// place (its write may still fail). A caller that orders its frames
// under a lock of its own releases it in queued, so that the lock is not
// held while the frame waits for a yield or for the write. queued must not
// write through w (the frame may be waiting for it to return: a deadlock)
// and must not panic.
func (w *Writer) WriteFrameQueued(typ FrameType, flags uint8, stream uint64, payload []byte, queued func(placed bool)) error {
	return w.write(typ, flags, stream, payload, queued)
}

// write is WriteFrame; queued, when not nil, is called as
// WriteFrameQueued says.
func (w *Writer) write(typ FrameType, flags uint8, stream uint64, payload []byte, queued func(placed bool)) error {
	if !typ.Known() {
		call(queued, false)
		return fmt.Errorf("ipc: write frame on stream %d: %w 0x%02x", stream, ErrUnknownType, uint8(typ))
	}
	if uint64(len(payload)) > uint64(w.maxFrame) {
		call(queued, false)
		return fmt.Errorf("ipc: write %s frame on stream %d: %w: %d bytes exceeds max %d", typ, stream, ErrFrameTooLarge, len(payload), w.maxFrame)
	}
	h := Header{Length: uint32(len(payload)), Type: typ, Flags: flags, Stream: stream}

	w.mu.Lock()
	if w.err != nil {
		err := w.failed(typ, stream)
		w.mu.Unlock()
		call(queued, false)
		return err
	}
	if !w.writing && len(w.fill) == 0 && HeaderSize+len(payload) > w.bufSize {
		// A large frame with nothing else waiting goes out as it is (a
		// writev on sockets), not copied.
		w.writing = true
		w.taken++
		group := w.taken
		w.mu.Unlock()
		call(queued, true)
		h.Encode(&w.hdr)
		bufs := net.Buffers{w.hdr[:], payload}
		var n int64
		var err error
		if bw, ok := w.w.(BuffersWriter); ok {
			n, err = bw.WriteBuffers(&bufs)
		} else {
			n, err = bufs.WriteTo(w.w)
		}
		w.mu.Lock()
		return w.ended(group, err, int(n), 1, typ, stream, HeaderSize+len(payload))
	}
	var hdr [HeaderSize]byte
	h.Encode(&hdr)
	w.fill = append(append(w.fill, hdr[:]...), payload...)
	w.frames++
	end := len(w.fill) // the caller's frame ends here in its group's write
	group := w.taken + 1
	if queued != nil {
		w.mu.Unlock()
		queued(true)
		w.mu.Lock()
		if w.taken >= group || w.err != nil {
			// Another call took the group meanwhile, or a write failed:
			// the stream is not to be written again.
			return w.await(group, end, typ, stream)
		}
	}
	if w.writing {
		if w.gathering && !typ.bulk() {
			// A control frame does not wait for the leader's yield: it
			// writes the group now, the yielding leader's frame with it.
			w.gathering = false
			return w.lead(typ, stream, end)
		}
		return w.await(group, end, typ, stream)
	}
	w.writing = true
	// Frames of calls that waited for the last write (w.frames > 1)
	// are due: they go out now, without a yield (one of them may be a
	// control frame).
	bulk := w.yield && typ.bulk() && w.frames == 1
	yield := bulk && w.yieldSkip == 0
	if bulk && !yield {
		w.yieldSkip--
	}
	if !yield {
		return w.lead(typ, stream, end)
	}
	w.gathering = true
	w.mu.Unlock()
	// Let the goroutines that are ready run first: the frames they write
	// now join this group.
	gosched()
	w.mu.Lock()
	if w.taken >= group {
		// A control frame took the group over while this call yielded.
		return w.await(group, end, typ, stream)
	}
	w.gathering = false
	w.adaptYield(w.frames > 1)
	return w.lead(typ, stream, end)
}

// MaxFrame is the largest payload the Writer writes.
func (w *Writer) MaxFrame() uint32 { return w.maxFrame }

// Waiting reports how many frames wait for the Writer's next write (the
// group being gathered), for diagnostics and tests.
func (w *Writer) Waiting() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.frames
}

// call calls f(placed) unless f is nil.
func call(f func(placed bool), placed bool) {
	if f != nil {
		f(placed)
	}
}

// await waits until group, which holds the caller's frame (of type typ
// on stream, ending at byte end of the group's write), is written, and
// leads it if the write before it ends first. Called with w.mu held; it
// unlocks.
func (w *Writer) await(group uint64, end int, typ FrameType, stream uint64) error {
	for w.written < group && w.err == nil {
		if !w.writing {
			return w.lead(typ, stream, end)
		}
		w.turn.Wait()
	}
	var err error
	if !w.sent(group, end) {
		err = w.failed(typ, stream)
	}
	w.mu.Unlock()
	return err
}

// sent reports whether a frame that ends at byte end of group's write
// went out: once the group is written, and also when the group's write
// failed after the frame's last byte (the frame reached the stream whole,
// so its call must not report it unsent). Called with w.mu held.
func (w *Writer) sent(group uint64, end int) bool {
	return w.written >= group || group == w.failedGroup && end <= w.failedN
}

// failed is the error of a call whose frame (typ on stream) did not go
// out whole because the stream failed: it names the caller's frame and
// wraps the stream's error, which names the frame whose write failed.
// Called with w.mu held and w.err set.
func (w *Writer) failed(typ FrameType, stream uint64) error {
	return fmt.Errorf("ipc: %s frame on stream %d not written: %w", typ, stream, w.err)
}

// bulk reports whether frames of type t carry a run's work, which can
// wait for a yield (WriterConfig.Yield), rather than control it.
func (t FrameType) bulk() bool {
	switch t {
	case TypeRun, TypeEvent, TypeCheckpoint, TypeCheckpointAck, TypeFinish, TypeSubmit, TypeSubmitResult:
		return true
	}
	return false
}

// gosched is runtime.Gosched (a variable for tests).
var gosched = runtime.Gosched

// maxYieldSkip bounds how many leads in a row skip the yield.
const maxYieldSkip = 1024

// adaptYield records whether a lead's yield gathered other frames. A
// yield that gathered none is skipped by the next leads, twice as many
// after each such yield in a row (up to maxYieldSkip): a writer alone, or
// one sharing its processor with goroutines that compute without
// blocking (which a yield would wait for, up to a scheduler time slice),
// pays it rarely. One that gathered frames keeps every lead yielding.
func (w *Writer) adaptYield(gathered bool) {
	if gathered {
		w.yieldBackoff = 0
		return
	}
	w.yieldBackoff = min(max(2*w.yieldBackoff, 1), maxYieldSkip)
	w.yieldSkip = w.yieldBackoff
}

// lead writes the waiting frames, the caller's among them (of type typ
// on stream, ending at byte end of the write; named in the error should
// the write fail), and ends the turn. Called with w.mu held and
// w.writing set; it unlocks.
func (w *Writer) lead(typ FrameType, stream uint64, end int) error {
	w.writing = true
	buf, frames := w.fill, w.frames
	w.fill, w.frames, w.spare = w.spare[:0], 0, nil
	w.taken++
	group := w.taken
	w.mu.Unlock()
	n, err := w.w.Write(buf)
	w.mu.Lock()
	if cap(buf) <= 4*w.bufSize {
		w.spare = buf[:0]
	}
	return w.ended(group, err, n, frames, typ, stream, end)
}

// ended records the end of a group's write (n bytes of it written) and
// wakes the waiting calls; it unlocks w.mu and returns the outcome of
// the caller's frame, which ends at byte end.
func (w *Writer) ended(group uint64, err error, n, frames int, typ FrameType, stream uint64, end int) error {
	own := err != nil && w.err == nil // this write failed the stream: its error names this frame
	if own {
		w.err = fmt.Errorf("ipc: write %s frame on stream %d (%d frames in the write, %d bytes of it written): %w", typ, stream, frames, n, err)
		w.failedGroup, w.failedN = group, n
	}
	if w.err == nil {
		w.written = group
	}
	w.writing = false
	w.turn.Broadcast()
	switch {
	case w.sent(group, end):
		err = nil
	case own:
		err = w.err
	default:
		err = w.failed(typ, stream)
	}
	w.mu.Unlock()
	return err
}
