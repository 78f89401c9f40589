package ipc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"testing/iotest"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// allTypes lists every frame type with a payload valid for it.
var allTypes = []struct {
	typ     FrameType
	name    string
	stream  uint64
	payload string
}{
	{TypeHello, "HELLO", 0, `{"protocol":1,"name":"py","agent_ids":["*"],"max_runs":8}`},
	{TypeWelcome, "WELCOME", 0, `{"protocol":1,"sidecar_id":"s1","heartbeat_ms":5000,"max_frame":16777216}`},
	{TypePing, "PING", 0, "\x00\xff\x01\xfe{\"}\x80"},
	{TypePong, "PONG", 0, "\x00\xff\x01\xfe{\"}\x80"},
	{TypeGoAway, "GOAWAY", 0, `{"code":"shutdown","message":"bye"}`},
	{TypeError, "ERROR", 7, `{"code":"bad_frame","message":"no"}`},
	{TypeRun, "RUN", 1, `{"dispatch_id":"d","run_id":"r","thread_id":"t","agent_id":"default","attempt":1,"request":{"messages":[]},"context":{"messages":[]}}`},
	{TypeEvent, "EVENT", 1, `{"type":"text_delta","delta":"héllo ✓"}`},
	{TypeCheckpoint, "CHECKPOINT", 1, `{"seq":3,"messages":[],"run":{}}`},
	{TypeCheckpointAck, "CHECKPOINT_ACK", 1, `{"seq":3}`},
	{TypeFinish, "FINISH", 1, `{"status":"done","termination":{"type":"natural_end"},"response":"ok"}`},
	{TypeCancel, "CANCEL", 1 << 40, `{"cmd":"c1"}`},
	{TypeMessages, "MESSAGES", 2, `{"cmd":"c2","messages":[{"id":"m"}]}`},
	{TypeDecision, "DECISION", 2, `{"cmd":"c3","decisions":[{"call_id":"x","resume":{}}]}`},
	{TypeCommandAck, "COMMAND_ACK", 2, `{"cmd":"c3","accepted":false,"reason":"gone"}`},
	{TypeSubmit, "SUBMIT", 0, ` {"req":"q1","agent_id":"default"} `},
	{TypeSubmitResult, "SUBMIT_RESULT", 0, `{"req":"q1","error":{"code":"validation"}}`},
}

// encodeAll returns the wire bytes of every frame in allTypes.
func encodeAll() []byte {
	var b []byte
	for _, tt := range allTypes {
		b = AppendFrame(b, tt.typ, 0, tt.stream, []byte(tt.payload))
	}
	return b
}

func TestFrameTypes(t *testing.T) {
	t.Parallel()
	known := 0
	for i := range 256 {
		if FrameType(i).Known() {
			known++
		}
	}
	if known != len(allTypes) {
		t.Fatalf("%d known types, table has %d", known, len(allTypes))
	}
	for _, tt := range allTypes {
		if got := tt.typ.String(); got != tt.name {
			t.Errorf("String(0x%02x) = %q, want %q", uint8(tt.typ), got, tt.name)
		}
		wantJSON := tt.typ != TypePing && tt.typ != TypePong
		if tt.typ.JSONPayload() != wantJSON {
			t.Errorf("%s.JSONPayload() = %v", tt.typ, !wantJSON)
		}
	}
	if got := FrameType(0x7f).String(); got != "FrameType(0x7f)" {
		t.Errorf("unknown String = %q", got)
	}
}

// TestHeaderWireLayout pins the byte layout other languages implement.
func TestHeaderWireLayout(t *testing.T) {
	t.Parallel()
	var b [HeaderSize]byte
	Header{Length: 0x01020304, Type: TypeEvent, Flags: 0xa5, Stream: 0x1122334455667788}.Encode(&b)
	want := []byte{1, 2, 3, 4, 0x11, 0xa5, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88}
	if !bytes.Equal(b[:], want) {
		t.Fatalf("Encode = % x, want % x", b, want)
	}
	h, err := DecodeHeader(b[:], 0x01020304)
	if err != nil {
		t.Fatal(err)
	}
	if h != (Header{Length: 0x01020304, Type: TypeEvent, Flags: 0xa5, Stream: 0x1122334455667788}) {
		t.Fatalf("DecodeHeader = %+v", h)
	}
	if _, err := DecodeHeader(b[:15], 0); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short header: %v", err)
	}
}

func TestHeaderNoAllocs(t *testing.T) {
	h := Header{Length: 200, Type: TypeEvent, Stream: 42}
	var b [HeaderSize]byte
	var got Header
	var err error
	allocs := testing.AllocsPerRun(1000, func() {
		h.Encode(&b)
		got, err = DecodeHeader(b[:], DefaultMaxFrame)
	})
	if err != nil || got != h {
		t.Fatalf("round trip = %+v, %v", got, err)
	}
	if allocs != 0 {
		t.Fatalf("Encode+DecodeHeader: %v allocs, want 0", allocs)
	}
}

func TestRoundTripEveryType(t *testing.T) {
	t.Parallel()
	for _, tt := range allTypes {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var buf bytes.Buffer
			w := NewWriter(&buf, WriterConfig{})
			if err := w.WriteFrame(tt.typ, 3, tt.stream, []byte(tt.payload)); err != nil {
				t.Fatal(err)
			}
			r := NewReader(&buf, ReaderConfig{})
			f, err := r.ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			want := Header{Length: uint32(len(tt.payload)), Type: tt.typ, Flags: 3, Stream: tt.stream}
			if f.Header != want || string(f.Payload) != tt.payload {
				t.Fatalf("got %+v %q, want %+v %q", f.Header, f.Payload, want, tt.payload)
			}
			f.Release()
			if f.Payload != nil {
				t.Fatal("Release left Payload set")
			}
			if _, err := r.ReadFrame(); err != io.EOF {
				t.Fatalf("after last frame: %v, want io.EOF", err)
			}
		})
	}
}

// readAll reads frames until an error and checks them against allTypes
// repeated; it returns the number of frames and the final error.
func readAll(t *testing.T, r *Reader) (int, error) {
	t.Helper()
	for n := 0; ; n++ {
		f, err := r.ReadFrame()
		if err != nil {
			return n, err
		}
		tt := allTypes[n%len(allTypes)]
		if f.Type != tt.typ || f.Stream != tt.stream || string(f.Payload) != tt.payload {
			t.Fatalf("frame %d: got %s/%d %q, want %s/%d %q", n, f.Type, f.Stream, f.Payload, tt.typ, tt.stream, tt.payload)
		}
		f.Release()
	}
}

// chunkReader returns its data in reads of at most size(i) bytes.
type chunkReader struct {
	data []byte
	size func() int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(c.data), max(1, c.size()))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func TestSplitReads(t *testing.T) {
	t.Parallel()
	data := bytes.Repeat(encodeAll(), 3)
	rng := rand.New(rand.NewPCG(1, 2))
	sources := map[string]func() io.Reader{
		"one byte":      func() io.Reader { return iotest.OneByteReader(bytes.NewReader(data)) },
		"half":          func() io.Reader { return iotest.HalfReader(bytes.NewReader(data)) },
		"data with EOF": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(data)) },
		"random chunks": func() io.Reader {
			return &chunkReader{data: data, size: func() int { return 1 + rng.IntN(300) }}
		},
		"all at once": func() io.Reader { return bytes.NewReader(data) },
	}
	for name, src := range sources {
		for _, bufSize := range []int{16, 100, 0} {
			n, err := readAll(t, NewReader(src(), ReaderConfig{BufferSize: bufSize}))
			if err != io.EOF || n != 3*len(allTypes) {
				t.Errorf("%s, buffer %d: %d frames, %v; want %d, io.EOF", name, bufSize, n, err, 3*len(allTypes))
			}
		}
	}
}

// TestSplitAtEveryBoundary feeds one stream in two reads, split at every
// byte offset.
func TestSplitAtEveryBoundary(t *testing.T) {
	t.Parallel()
	data := encodeAll()
	for cut := 0; cut <= len(data); cut++ {
		first := true
		src := &chunkReader{data: data, size: func() int {
			if first {
				first = false
				return cut
			}
			return len(data)
		}}
		if n, err := readAll(t, NewReader(src, ReaderConfig{BufferSize: 16})); err != io.EOF || n != len(allTypes) {
			t.Fatalf("cut %d: %d frames, %v", cut, n, err)
		}
	}
}

func TestManyFramesInOneRead(t *testing.T) {
	t.Parallel()
	data := bytes.Repeat(encodeAll(), 50) // ≈ 25 KiB, under the 64 KiB buffer
	calls := 0
	src := &chunkReader{data: data, size: func() int { calls++; return len(data) }}
	n, err := readAll(t, NewReader(src, ReaderConfig{}))
	if err != io.EOF || n != 50*len(allTypes) {
		t.Fatalf("%d frames, %v", n, err)
	}
	if calls != 1 {
		t.Fatalf("%d reads of the source, want 1", calls)
	}
}

// failReader fails the test if the Reader asks for more input.
type failReader struct{ t *testing.T }

func (f failReader) Read([]byte) (int, error) {
	f.t.Error("reader read past a rejected header")
	return 0, io.ErrClosedPipe
}

// rawHeader builds a header with arbitrary field values.
func rawHeader(length uint32, typ byte, reserved uint16, stream uint64) []byte {
	b := make([]byte, HeaderSize)
	binary.BigEndian.PutUint32(b, length)
	b[4] = typ
	binary.BigEndian.PutUint16(b[6:], reserved)
	binary.BigEndian.PutUint64(b[8:], stream)
	return b
}

func TestProtocolErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		header []byte
		want   error
	}{
		{"length over max", rawHeader(1<<20+1, byte(TypeEvent), 0, 1), ErrFrameTooLarge},
		{"length 4 GiB", rawHeader(0xffffffff, byte(TypeEvent), 0, 1), ErrFrameTooLarge},
		{"type 0", rawHeader(2, 0x00, 0, 0), ErrUnknownType},
		{"type 0x07", rawHeader(2, 0x07, 0, 0), ErrUnknownType},
		{"type 0x15", rawHeader(2, 0x15, 0, 1), ErrUnknownType},
		{"type 0xff", rawHeader(2, 0xff, 0, 1), ErrUnknownType},
		{"reserved low", rawHeader(2, byte(TypeEvent), 1, 1), ErrReservedNotZero},
		{"reserved high", rawHeader(2, byte(TypePing), 0x8000, 0), ErrReservedNotZero},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			src := io.MultiReader(bytes.NewReader(tt.header), failReader{t})
			r := NewReader(src, ReaderConfig{MaxFrame: 1 << 20})
			_, err := r.ReadFrame()
			if !errors.Is(err, tt.want) || !errors.Is(err, ErrProtocol) {
				t.Fatalf("ReadFrame: %v, want %v", err, tt.want)
			}
			if _, err2 := r.ReadFrame(); err2 != err {
				t.Fatalf("second ReadFrame: %v, want the same %v", err2, err)
			}
		})
	}
}

func TestMaxFrameBoundary(t *testing.T) {
	t.Parallel()
	payload := []byte(`{"k":"` + strings.Repeat("x", 92) + `"}`) // 100 bytes
	if len(payload) != 100 {
		t.Fatalf("payload is %d bytes", len(payload))
	}
	data := AppendFrame(nil, TypeEvent, 0, 1, payload)
	if f, err := NewReader(bytes.NewReader(data), ReaderConfig{MaxFrame: 100}).ReadFrame(); err != nil {
		t.Fatalf("length == max: %v", err)
	} else {
		f.Release()
	}
	if _, err := NewReader(bytes.NewReader(data), ReaderConfig{MaxFrame: 99}).ReadFrame(); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("length == max+1: %v", err)
	}
}

func TestBadJSON(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, payload string }{
		{"empty", ""},
		{"spaces", "  \n"},
		{"not json", "hello"},
		{"array", `[1,2]`},
		{"string", `"s"`},
		{"number", `42`},
		{"null", `null`},
		{"truncated object", `{"a":`},
		{"trailing garbage", `{"a":1} x`},
		{"two objects", `{}{}`},
		{"invalid utf-8", "{\"a\":\"\xff\"}"},
		{"control char", "{\"a\":\"\x01\"}"},
	}
	for _, tt := range tests {
		for _, typ := range []FrameType{TypeHello, TypeEvent, TypeFinish, TypeSubmitResult} {
			data := AppendFrame(nil, typ, 0, 5, []byte(tt.payload))
			_, err := NewReader(bytes.NewReader(data), ReaderConfig{}).ReadFrame()
			if !errors.Is(err, ErrBadJSON) {
				t.Errorf("%s in %s: %v, want ErrBadJSON", tt.name, typ, err)
			}
			f, err := NewReader(bytes.NewReader(data), ReaderConfig{SkipPayloadCheck: true}).ReadFrame()
			if err != nil || string(f.Payload) != tt.payload {
				t.Errorf("%s in %s without check: %q, %v", tt.name, typ, f.Payload, err)
			}
			f.Release()
		}
	}
}

func TestPingPongOpaque(t *testing.T) {
	t.Parallel()
	nonce := []byte{0xff, 0, '[', 0x80, 0xc0, 1, 2, 3} // not JSON, not UTF-8
	var buf bytes.Buffer
	w := NewWriter(&buf, WriterConfig{})
	for _, typ := range []FrameType{TypePing, TypePong} {
		if err := w.WriteFrame(typ, 0, 0, nonce); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf, ReaderConfig{})
	for _, typ := range []FrameType{TypePing, TypePong} {
		f, err := r.ReadFrame()
		if err != nil || f.Type != typ || !bytes.Equal(f.Payload, nonce) {
			t.Fatalf("%s: %+v %x, %v", typ, f.Header, f.Payload, err)
		}
		f.Release()
	}
}

func TestTruncatedStream(t *testing.T) {
	t.Parallel()
	data := AppendFrame(nil, TypeEvent, 0, 9, []byte(`{"type":"run_start"}`))
	for cut := range len(data) {
		r := NewReader(bytes.NewReader(data[:cut]), ReaderConfig{})
		_, err := r.ReadFrame()
		want := io.ErrUnexpectedEOF
		if cut == 0 {
			want = io.EOF
		}
		if !errors.Is(err, want) {
			t.Fatalf("cut at %d: %v, want %v", cut, err, want)
		}
		if cut == 0 && err != io.EOF {
			t.Fatalf("clean end: %v, want bare io.EOF", err)
		}
	}
}

func TestStickyErrorAfterProtocolError(t *testing.T) {
	t.Parallel()
	good := AppendFrame(nil, TypeEvent, 0, 1, []byte(`{}`))
	bad := AppendFrame(nil, TypeEvent, 0, 1, []byte(`nope`))
	data := slices(good, bad, good, good)
	r := NewReader(bytes.NewReader(data), ReaderConfig{})
	f, err := r.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	f.Release()
	_, err = r.ReadFrame()
	if !errors.Is(err, ErrBadJSON) {
		t.Fatalf("bad frame: %v", err)
	}
	for range 3 {
		if f, err2 := r.ReadFrame(); err2 != err || f.Payload != nil {
			t.Fatalf("after protocol error: %v, %q; want %v", err2, f.Payload, err)
		}
	}
}

func slices(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestReadFrameAllocs guards the hot path: with payloads released, a read
// reuses pooled buffers.
func TestReadFrameAllocs(t *testing.T) {
	if testing.Short() {
		t.Skip("allocation counts vary under -short runs with GC pressure")
	}
	frame := AppendFrame(nil, TypeEvent, 0, 1, eventPayload(200))
	src := &loopReader{data: bytes.Repeat(frame, 64)}
	r := NewReader(src, ReaderConfig{})
	allocs := testing.AllocsPerRun(10000, func() {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		f.Release()
	})
	if allocs > 1 {
		t.Fatalf("ReadFrame: %v allocs/op, want ≤ 1", allocs)
	}
}

func TestWriterOneWritePerFrame(t *testing.T) {
	t.Parallel()
	cw := &countingWriter{}
	w := NewWriter(cw, WriterConfig{BufferSize: 1024})
	for _, tt := range allTypes {
		if err := w.WriteFrame(tt.typ, 0, tt.stream, []byte(tt.payload)); err != nil {
			t.Fatal(err)
		}
	}
	if cw.writes != len(allTypes) {
		t.Fatalf("%d writes for %d frames", cw.writes, len(allTypes))
	}
	if !bytes.Equal(cw.buf.Bytes(), encodeAll()) {
		t.Fatal("written bytes differ from AppendFrame")
	}
	// A frame larger than the buffer still arrives intact.
	big := eventPayload(5000)
	if err := w.WriteFrame(TypeEvent, 0, 3, big); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasSuffix(cw.buf.Bytes(), AppendFrame(nil, TypeEvent, 0, 3, big)) {
		t.Fatal("large frame corrupted")
	}
}

func TestWriteFrameNoAllocs(t *testing.T) {
	w := NewWriter(io.Discard, WriterConfig{})
	payload := eventPayload(200)
	allocs := testing.AllocsPerRun(1000, func() {
		if err := w.WriteFrame(TypeEvent, 0, 1, payload); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("WriteFrame: %v allocs/op, want 0", allocs)
	}
}

type countingWriter struct {
	buf    bytes.Buffer
	writes int
}

func (c *countingWriter) Write(p []byte) (int, error) { c.writes++; return c.buf.Write(p) }

func TestWriterRefuses(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	w := NewWriter(&buf, WriterConfig{MaxFrame: 10})
	if err := w.WriteFrame(0x7f, 0, 0, []byte(`{}`)); !errors.Is(err, ErrUnknownType) {
		t.Fatalf("unknown type: %v", err)
	}
	if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{"a":"123456"}`)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("too large: %v", err)
	}
	if buf.Len() != 0 {
		t.Fatalf("refused frames wrote %d bytes", buf.Len())
	}
	if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{}`)); err != nil {
		t.Fatalf("refusals are not sticky: %v", err)
	}
}

func TestWriterStickyError(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	w := NewWriter(errWriter{boom}, WriterConfig{})
	err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{}`))
	if !errors.Is(err, boom) {
		t.Fatalf("first write: %v", err)
	}
	// A later call fails too, naming its own frame and the write that
	// failed the stream.
	err2 := w.WriteFrame(TypePing, 0, 0, make([]byte, 8))
	if !errors.Is(err2, boom) || !strings.HasPrefix(err2.Error(), "ipc: PING frame on stream 0 not written: ") || !strings.HasSuffix(err2.Error(), err.Error()) {
		t.Fatalf("second write: %v, want its PING frame named, wrapping %v", err2, err)
	}
}

type errWriter struct{ err error }

func (e errWriter) Write([]byte) (int, error) { return 0, e.err }

// unixPair returns the two ends of a connected Unix stream socket.
func unixPair(tb testing.TB) (client, server net.Conn) {
	tb.Helper()
	ln, err := net.Listen("unix", filepath.Join(tb.TempDir(), "s"))
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			tb.Error(err)
		}
		accepted <- c
	}()
	client, err = net.Dial("unix", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		tb.FailNow()
	}
	tb.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestConcurrentWriters has several runs write to one connection at once;
// every frame must arrive whole, and each run's frames in order.
func TestConcurrentWriters(t *testing.T) {
	t.Parallel()
	const runs, perRun = 8, 200
	client, server := unixPair(t)
	w := NewWriter(client, WriterConfig{BufferSize: 4096})

	var wg sync.WaitGroup
	for run := range runs {
		wg.Go(func() {
			for seq := range perRun {
				size := 10 + (seq*37+run)%300
				if seq%50 == 0 {
					size = 20000 // larger than the buffer: the writev path
				}
				p := fmt.Appendf(nil, `{"run":%d,"seq":%d,"pad":"%s"}`, run, seq, strings.Repeat("z", size))
				if err := w.WriteFrame(TypeEvent, 0, uint64(run+1), p); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	go func() { wg.Wait(); client.Close() }()

	r := NewReader(server, ReaderConfig{BufferSize: 1000})
	next := make([]int, runs)
	total := 0
	for {
		f, err := r.ReadFrame()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var run, seq int
		if _, err := fmt.Sscanf(string(f.Payload), `{"run":%d,"seq":%d,`, &run, &seq); err != nil {
			t.Fatalf("payload %.60q: %v", f.Payload, err)
		}
		if uint64(run+1) != f.Stream || seq != next[run] {
			t.Fatalf("stream %d: got run %d seq %d, want run %d seq %d", f.Stream, run, seq, f.Stream-1, next[run])
		}
		next[run]++
		total++
		f.Release()
	}
	wg.Wait()
	if total != runs*perRun {
		t.Fatalf("read %d frames, want %d", total, runs*perRun)
	}
}

// TestLightDependencies guards the SDK promise: ipc depends on the standard
// library and the JSON library only (never Badger, fasthttp or metrics).
func TestLightDependencies(t *testing.T) {
	t.Parallel()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not found")
	}
	out, err := exec.Command(goTool, "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		switch {
		case dep == "github.com/mailbox-sidecar/mailbox-sidecar/ipc",
			dep == "github.com/goccy/go-json", strings.HasPrefix(dep, "github.com/goccy/go-json/"):
		default:
			t.Errorf("ipc depends on %s", dep)
		}
	}
}

// eventPayload returns an EVENT-like JSON object of exactly n bytes (n ≥ 40).
func eventPayload(n int) []byte {
	head := `{"type":"text_delta","delta":"`
	return []byte(head + strings.Repeat("a", n-len(head)-2) + `"}`)
}

// loopReader serves data over and over, forever.
type loopReader struct {
	data []byte
	off  int
}

func (l *loopReader) Read(p []byte) (int, error) {
	n := copy(p, l.data[l.off:])
	l.off = (l.off + n) % len(l.data)
	return n, nil
}

// FrameBuffered tells whether the next frame is read in whole, without
// reading the source.
func TestFrameBuffered(t *testing.T) {
	t.Parallel()
	ev := AppendFrame(nil, TypeEvent, 0, 1, []byte(`{"type":"run_start"}`))
	data := append(append(append([]byte(nil), ev...), ev...), ev[:len(ev)-3]...) // two frames and most of a third
	r := NewReader(&chunkReader{data: data, size: func() int { return len(data) }}, ReaderConfig{})
	if r.FrameBuffered() {
		t.Fatal("buffered before anything was read")
	}
	for i, want := range []bool{true, false} {
		if _, err := r.ReadFrame(); err != nil {
			t.Fatal(err)
		}
		if got := r.FrameBuffered(); got != want {
			t.Fatalf("after frame %d: FrameBuffered %v, want %v", i+1, got, want)
		}
	}
	// A header the Reader rejects: ReadFrame fails at once, so it counts
	// as buffered (the caller would not block).
	bad := append(append([]byte(nil), ev...), rawHeader(DefaultMaxFrame+1, byte(TypeEvent), 0, 1)...)
	r = NewReader(&chunkReader{data: bad, size: func() int { return len(bad) }}, ReaderConfig{})
	if _, err := r.ReadFrame(); err != nil {
		t.Fatal(err)
	}
	if !r.FrameBuffered() {
		t.Fatal("a rejected header is not reported as buffered")
	}
	if _, err := r.ReadFrame(); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("read of the rejected header: %v", err)
	}
	if r.FrameBuffered() {
		t.Fatal("FrameBuffered after a failed read")
	}
}

// A payload above eagerPayload arrives whole through reads of every size
// (its buffer doubles as its bytes arrive).
func TestLargePayloadRoundTrip(t *testing.T) {
	t.Parallel()
	payload := []byte(`{"d":"` + strings.Repeat("0123456789abcdef", (5<<20)/16) + `x"}`) // 5 MiB and 9 bytes
	var hdr [HeaderSize]byte
	Header{Type: TypeEvent, Stream: 7, Length: uint32(len(payload))}.Encode(&hdr)
	data := append(hdr[:], payload...)
	for name, src := range map[string]io.Reader{
		"all at once": bytes.NewReader(data),
		"half":        iotest.HalfReader(bytes.NewReader(data)),
		"64 KiB":      &chunkReader{data: data, size: func() int { return 64 << 10 }},
	} {
		f, err := NewReader(src, ReaderConfig{}).ReadFrame()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if f.Stream != 7 || !bytes.Equal(f.Payload, payload) {
			t.Fatalf("%s: stream %d, %d bytes; want 7 and the %d bytes sent", name, f.Stream, len(f.Payload), len(payload))
		}
		f.Release()
	}
}

// A header alone does not make the reader hold the length it announces:
// a peer that announces 16 MiB and sends ten bytes costs about a MiB
// (found by review: fifty connections doing so held 800 MB).
func TestAnAnnouncedLengthIsNotHeldBeforeItsBytesArrive(t *testing.T) {
	var hdr [HeaderSize]byte
	Header{Type: TypeEvent, Stream: 1, Length: DefaultMaxFrame}.Encode(&hdr)
	data := append(hdr[:], `{"type":"x`...)
	runtime.GC()
	runtime.GC() // the payload pools emptied: a pooled buffer would hide the allocation
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := NewReader(bytes.NewReader(data), ReaderConfig{}).ReadFrame()
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read: %v; want the payload cut short", err)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 4<<20 {
		t.Fatalf("reading a header that announces %d bytes, and ten of them, allocated %d bytes", DefaultMaxFrame, grew)
	}
}
