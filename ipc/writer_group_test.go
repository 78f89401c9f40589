package ipc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	json "github.com/goccy/go-json"
)

// gateWriter records every Write; the first one blocks until release is
// closed and then returns firstErr.
type gateWriter struct {
	entered  chan struct{}
	release  chan struct{}
	firstErr error

	mu     sync.Mutex
	writes [][]byte
}

func newGateWriter(firstErr error) *gateWriter {
	return &gateWriter{entered: make(chan struct{}), release: make(chan struct{}), firstErr: firstErr}
}

func (g *gateWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	g.writes = append(g.writes, bytes.Clone(p))
	first := len(g.writes) == 1
	g.mu.Unlock()
	if first {
		close(g.entered)
		<-g.release
		if g.firstErr != nil {
			return 0, g.firstErr
		}
	}
	return len(p), nil
}

func (g *gateWriter) written() [][]byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.writes
}

// waitQueued waits until n frames wait for the next write.
func waitQueued(t *testing.T, w *Writer, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		w.mu.Lock()
		got := w.frames
		w.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d frames queued, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestWriterGroupsFramesWhileWriting: frames written while a Write is in
// progress go out together, in the order they were queued, in the next
// Write; each call returns only once its frame is written.
func TestWriterGroupsFramesWhileWriting(t *testing.T) {
	t.Parallel()
	gw := newGateWriter(nil)
	w := NewWriter(gw, WriterConfig{})
	errs := make(chan error, 8)
	go func() { errs <- w.WriteFrame(TypeEvent, 0, 1, []byte(`{"n":1}`)) }()
	<-gw.entered
	const followers = 5
	for i := range followers {
		go func() { errs <- w.WriteFrame(TypeEvent, 0, uint64(i+2), []byte(`{"n":2}`)) }()
		waitQueued(t, w, i+1) // one at a time: the order is known
	}
	select {
	case err := <-errs:
		t.Fatalf("a call returned (%v) before its frame was written", err)
	case <-time.After(20 * time.Millisecond):
	}
	close(gw.release)
	for range followers + 1 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	writes := gw.written()
	if len(writes) != 2 {
		t.Fatalf("%d writes, want 2: the first frame, then the %d frames queued meanwhile", len(writes), followers)
	}
	if want := AppendFrame(nil, TypeEvent, 0, 1, []byte(`{"n":1}`)); !bytes.Equal(writes[0], want) {
		t.Fatalf("first write %q, want %q", writes[0], want)
	}
	var want []byte
	for i := range followers {
		want = AppendFrame(want, TypeEvent, 0, uint64(i+2), []byte(`{"n":2}`))
	}
	if !bytes.Equal(writes[1], want) {
		t.Fatalf("second write %q, want %q", writes[1], want)
	}
}

// TestWriterGroupFailsWithItsWrite: when a Write fails, the calls whose
// frames were waiting for the next one fail with the same error, and their
// frames are never written.
func TestWriterGroupFailsWithItsWrite(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	gw := newGateWriter(boom)
	w := NewWriter(gw, WriterConfig{})
	first := make(chan error, 1)
	go func() { first <- w.WriteFrame(TypeEvent, 0, 1, []byte(`{}`)) }()
	<-gw.entered
	const followers = 3
	errs := make(chan error, followers)
	for i := range followers {
		go func() { errs <- w.WriteFrame(TypeEvent, 0, uint64(i+2), []byte(`{}`)) }()
	}
	waitQueued(t, w, followers)
	close(gw.release)
	// Each call's error names its own frame; the leader's is the
	// stream's, which every other error wraps.
	lead := <-first
	if !errors.Is(lead, boom) || !strings.HasPrefix(lead.Error(), "ipc: write EVENT frame on stream 1 ") {
		t.Fatalf("leader: %v, want boom, naming its frame", lead)
	}
	named := map[string]bool{}
	for range followers {
		err := <-errs
		if !errors.Is(err, boom) || !strings.HasSuffix(err.Error(), ": "+lead.Error()) {
			t.Fatalf("waiting call: %v, want boom, wrapping the leader's error", err)
		}
		named[strings.SplitN(err.Error(), " not written", 2)[0]] = true
	}
	for i := range followers {
		if want := fmt.Sprintf("ipc: EVENT frame on stream %d", i+2); !named[want] {
			t.Fatalf("no waiting call's error names its own frame %q: %v", want, named)
		}
	}
	if err := w.WriteFrame(TypePing, 0, 0, make([]byte, PingSize)); !errors.Is(err, boom) || !strings.HasPrefix(err.Error(), "ipc: PING frame on stream 0 not written: ") {
		t.Fatalf("later call: %v, want boom, naming its PING frame", err)
	}
	if n := len(gw.written()); n != 1 {
		t.Fatalf("%d writes, want 1: frames queued behind a failed write are not written", n)
	}
}

// TestWriterLeaderLetsReadyGoroutinesJoin: with one processor, goroutines
// that are ready when a call leads write their frames into its group (it
// yields before writing), so far fewer Writes than frames reach the stream.
func TestWriterLeaderLetsReadyGoroutinesJoin(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	cw := &countingWriter{}
	w := NewWriter(cw, WriterConfig{Yield: true})
	const writers = 16
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range writers {
		wg.Go(func() {
			<-start
			if err := w.WriteFrame(TypeEvent, 0, uint64(i+1), []byte(`{}`)); err != nil {
				t.Error(err)
			}
		})
	}
	close(start)
	wg.Wait()
	if cw.writes > writers/4 {
		t.Fatalf("%d writes for %d frames written at once, want at most %d", cw.writes, writers, writers/4)
	}
	if cw.buf.Len() != writers*(HeaderSize+2) {
		t.Fatalf("%d bytes written, want %d", cw.buf.Len(), writers*(HeaderSize+2))
	}
}

// TestWriterAloneSeldomYields: a yield that gathers no other frame is
// skipped by the next leads, twice as many after each, so a writer alone
// yields about log2(maxYieldSkip) times and then once per maxYieldSkip
// frames (a goroutine that computes without blocking would otherwise
// delay each of its frames by a scheduler time slice).
func TestWriterAloneSeldomYields(t *testing.T) {
	var yields int
	gosched = func() { yields++ }
	defer func() { gosched = runtime.Gosched }()
	w := NewWriter(io.Discard, WriterConfig{Yield: true})
	const frames = 10_000
	for range frames {
		if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	if want := 11 + frames/maxYieldSkip; yields > want {
		t.Fatalf("%d yields for %d frames written alone, want at most %d", yields, frames, want)
	}
	if yields == 0 {
		t.Fatal("no yield at all: a writer alone never finds out whether others would join")
	}
}

// Without WriterConfig.Yield a lead never yields (frames written while a
// write is in progress are still grouped).
func TestWriterWithoutYieldNeverYields(t *testing.T) {
	var yields int
	gosched = func() { yields++ }
	defer func() { gosched = runtime.Gosched }()
	w := NewWriter(io.Discard, WriterConfig{})
	for range 100 {
		if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	if yields != 0 {
		t.Fatalf("%d yields without WriterConfig.Yield", yields)
	}
}

// Control frames never wait for a yield, even with WriterConfig.Yield:
// a CANCEL must not wait behind goroutines that compute.
func TestWriterControlFramesDoNotYield(t *testing.T) {
	var yields int
	gosched = func() { yields++ }
	defer func() { gosched = runtime.Gosched }()
	w := NewWriter(io.Discard, WriterConfig{Yield: true})
	for _, typ := range []FrameType{TypeCancel, TypeMessages, TypeDecision, TypeCommandAck, TypePing, TypePong, TypeError, TypeGoAway} {
		payload := []byte(`{}`)
		if typ == TypePing || typ == TypePong {
			payload = make([]byte, PingSize)
		}
		if err := w.WriteFrame(typ, 0, 1, payload); err != nil {
			t.Fatal(err)
		}
	}
	if yields != 0 {
		t.Fatalf("%d yields for control frames", yields)
	}
	if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	if yields != 1 {
		t.Fatalf("%d yields for an event after control frames, want 1", yields)
	}
}

// A control frame that comes while a leader yields before its write does
// not wait for the yield (which, next to goroutines that compute, can
// last several scheduler time slices): it writes the group at once, the
// leader's frame first. The leader then finds its frame written.
func TestWriterControlFrameTakesOverAYield(t *testing.T) {
	inYield, release := make(chan struct{}), make(chan struct{})
	gosched = func() {
		close(inYield)
		<-release
	}
	defer func() { gosched = runtime.Gosched }()
	var out syncBuffer
	w := NewWriter(&out, WriterConfig{Yield: true})
	leader := make(chan error, 1)
	go func() { leader <- w.WriteFrame(TypeEvent, 0, 1, []byte(`{"e":1}`)) }()
	<-inYield
	control := make(chan error, 1)
	go func() { control <- w.WriteFrame(TypeCancel, 0, 1, []byte(`{"cmd":1}`)) }()
	select {
	case err := <-control:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the CANCEL waited for the leader's yield")
	}
	frames := readFrames(t, out.bytes())
	if len(frames) != 2 || frames[0].Type != TypeEvent || frames[1].Type != TypeCancel {
		t.Fatalf("written while the leader yielded: %v, want the EVENT then the CANCEL", frames)
	}
	close(release)
	if err := <-leader; err != nil {
		t.Fatal(err)
	}
	gosched = func() {}
	if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{"e":2}`)); err != nil {
		t.Fatal(err)
	}
	if frames := readFrames(t, out.bytes()); len(frames) != 3 || frames[2].Type != TypeEvent {
		t.Fatalf("after the yield: %v, want 3 frames, the EVENT last", frames)
	}
	if n := out.writeCalls(); n != 2 {
		t.Fatalf("%d writes, want 2: the group the CANCEL took over, then the last EVENT", n)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	writes int
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.writes++
	return b.buf.Write(p)
}

func (b *syncBuffer) writeCalls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.writes
}

func (b *syncBuffer) bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}

// readFrames decodes every frame in b.
func readFrames(t *testing.T, b []byte) []Header {
	t.Helper()
	r := NewReader(bytes.NewReader(b), ReaderConfig{})
	var hs []Header
	for {
		f, err := r.ReadFrame()
		if errors.Is(err, io.EOF) {
			return hs
		}
		if err != nil {
			t.Fatalf("frame %d: %v", len(hs), err)
		}
		hs = append(hs, f.Header)
		f.Release()
	}
}

// A lead that finds frames waiting from calls that queued during the
// last write writes them at once, without a yield: they have waited one
// write already, and one of them may be a control frame.
func TestWriterLeadWithFramesWaitingDoesNotYield(t *testing.T) {
	var yields int
	gosched = func() { yields++ }
	defer func() { gosched = runtime.Gosched }()
	var out syncBuffer
	w := NewWriter(&out, WriterConfig{Yield: true})
	// A CANCEL queued behind a write that has just ended; its call has
	// not woken yet.
	w.mu.Lock()
	var hdr [HeaderSize]byte
	payload := []byte(`{"cmd":1}`)
	Header{Length: uint32(len(payload)), Type: TypeCancel, Stream: 1}.Encode(&hdr)
	w.fill = append(append(w.fill, hdr[:]...), payload...)
	w.frames = 1
	w.mu.Unlock()
	if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{"e":1}`)); err != nil {
		t.Fatal(err)
	}
	if yields != 0 {
		t.Fatalf("%d yields with a CANCEL waiting", yields)
	}
	if frames := readFrames(t, out.bytes()); len(frames) != 2 || frames[0].Type != TypeCancel || frames[1].Type != TypeEvent {
		t.Fatalf("written: %v, want the CANCEL then the EVENT", frames)
	}
	if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{"e":2}`)); err != nil {
		t.Fatal(err)
	}
	if yields != 1 {
		t.Fatalf("%d yields for an event written alone, want 1", yields)
	}
}

// WriteFrameQueued calls queued once the frame's place is fixed: before
// the leader's yield and before any write; and exactly once, not placed,
// also when the frame is refused or the stream has failed.
func TestWriteFrameQueuedRunsOnceBeforeTheWrite(t *testing.T) {
	var steps []string
	gosched = func() { steps = append(steps, "yield") }
	defer func() { gosched = runtime.Gosched }()
	g := &recordWriter{write: func() { steps = append(steps, "write") }}
	w := NewWriter(g, WriterConfig{Yield: true, MaxFrame: 1 << 20})
	queued := func(placed bool) { steps = append(steps, fmt.Sprintf("queued %v", placed)) }
	check := func(what string, err error, want ...string) {
		t.Helper()
		if what == "" && err != nil {
			t.Fatal(err)
		}
		if strings.Join(steps, ",") != strings.Join(want, ",") {
			t.Fatalf("%s: steps %v, want %v", what, steps, want)
		}
		steps = steps[:0]
	}
	check("", w.WriteFrameQueued(TypeEvent, 0, 1, []byte(`{}`), queued), "queued true", "yield", "write")
	check("", w.WriteFrameQueued(TypeCancel, 0, 1, []byte(`{}`), queued), "queued true", "write")
	big := make([]byte, 64<<10) // past the buffer: written uncopied,
	// header and payload (net.Buffers: one writev on a socket, two
	// Writes here)
	check("", w.WriteFrameQueued(TypePong, 0, 1, big, queued), "queued true", "write", "write")

	err := w.WriteFrameQueued(FrameType(0x7f), 0, 1, nil, queued)
	check("unknown type", nil, "queued false")
	if !errors.Is(err, ErrUnknownType) {
		t.Fatalf("unknown type: %v", err)
	}
	err = w.WriteFrameQueued(TypeEvent, 0, 1, make([]byte, 2<<20), queued)
	check("too large", nil, "queued false")
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("too large: %v", err)
	}
	g.err = errors.New("broken pipe")
	if err := w.WriteFrame(TypeCancel, 0, 1, []byte(`{}`)); err == nil {
		t.Fatal("the failing write returned nil")
	}
	steps = steps[:0]
	err = w.WriteFrameQueued(TypeCancel, 0, 1, []byte(`{}`), queued)
	check("failed stream", nil, "queued false")
	if err == nil {
		t.Fatal("a write on the failed stream returned nil")
	}
}

// recordWriter calls write for every Write and then fails with err, if set.
type recordWriter struct {
	write func()
	err   error
}

func (r *recordWriter) Write(p []byte) (int, error) {
	r.write()
	if r.err != nil {
		return 0, r.err
	}
	return len(p), nil
}

// Under concurrency, with leaders that yield for random spans, every frame
// is written once and whole, each goroutine's frames in its order, and a
// frame written because another frame's queued callback ran comes after
// that frame.
func TestWriterKeepsOrderUnderConcurrency(t *testing.T) {
	var spins atomic.Int64
	gosched = func() {
		runtime.Gosched()
		if spins.Add(1)%7 == 0 {
			time.Sleep(time.Duration(spins.Load()%50) * time.Microsecond)
		}
	}
	defer func() { gosched = runtime.Gosched }()
	var out syncBuffer
	w := NewWriter(&out, WriterConfig{Yield: true, BufferSize: 256})
	const writers, frames = 6, 300
	types := []FrameType{TypeEvent, TypeCancel, TypeCheckpointAck, TypeCommandAck, TypeRun}
	after := make(chan int, frames)
	var wg sync.WaitGroup
	fail := make(chan error, writers+2)
	payload := func(g, i, pad int) []byte {
		return fmt.Appendf(nil, `{"g":%d,"i":%d,"pad":"%s"}`, g, i, strings.Repeat("x", pad))
	}
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range frames {
				typ := types[(g+i)%len(types)]
				pad := (g*31 + i*17) % 400 // some frames past the buffer
				var err error
				if g == 0 {
					// The causal writer: each callback lets the follower
					// write its frame i.
					called := 0
					err = w.WriteFrameQueued(typ, 0, uint64(g), payload(g, i, pad), func(placed bool) {
						called++
						if placed {
							after <- i
						}
					})
					if called != 1 {
						err = fmt.Errorf("queued called %d times", called)
					}
				} else {
					err = w.WriteFrame(typ, 0, uint64(g), payload(g, i, pad))
				}
				if err != nil {
					fail <- err
					return
				}
			}
			if g == 0 {
				close(after)
			}
		}()
	}
	wg.Add(1)
	go func() { // the follower, stream 99
		defer wg.Done()
		for i := range after {
			if err := w.WriteFrame(TypeEvent, 0, 99, payload(99, i, 0)); err != nil {
				fail <- err
				return
			}
		}
	}()
	wg.Wait()
	close(fail)
	for err := range fail {
		t.Fatal(err)
	}

	r := NewReader(bytes.NewReader(out.bytes()), ReaderConfig{})
	next := map[uint64]int{}
	pos0 := map[int]int{} // frame i of writer 0 → its position
	for n := 0; ; n++ {
		f, err := r.ReadFrame()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("frame %d: %v", n, err)
		}
		var p struct{ G, I int }
		if err := json.Unmarshal(f.Payload, &p); err != nil || uint64(p.G) != f.Stream {
			t.Fatalf("frame %d on stream %d: payload %q (%v)", n, f.Stream, f.Payload, err)
		}
		f.Release()
		if p.I != next[f.Stream] {
			t.Fatalf("stream %d: frame %d where %d was due", f.Stream, p.I, next[f.Stream])
		}
		next[f.Stream]++
		switch p.G {
		case 0:
			pos0[p.I] = n
		case 99:
			if at, ok := pos0[p.I]; !ok {
				t.Fatalf("the follower's frame %d at %d precedes frame %d of writer 0, whose queued callback let it go", p.I, n, p.I)
			} else if at >= n {
				t.Fatalf("bad positions %d, %d", at, n)
			}
		}
	}
	for g := range writers {
		if next[uint64(g)] != frames {
			t.Fatalf("stream %d: %d frames written, want %d", g, next[uint64(g)], frames)
		}
	}
	if next[99] != frames {
		t.Fatalf("follower: %d frames, want %d", next[99], frames)
	}
}

// A frame whose queued callback runs while another call's write fails is
// not written afterwards: the stream is not written again once a write
// has failed (a partial frame may lie in it).
func TestWriterWritesNothingAfterAFailureDuringACallback(t *testing.T) {
	gw := newGateWriter(errors.New("boom"))
	w := NewWriter(gw, WriterConfig{})
	first := make(chan error, 1)
	go func() { first <- w.WriteFrame(TypePing, 0, 0, make([]byte, PingSize)) }()
	<-gw.entered // the first write is under way, and will fail

	inCallback, release := make(chan struct{}), make(chan struct{})
	second := make(chan error, 1)
	go func() {
		second <- w.WriteFrameQueued(TypeEvent, 0, 2, []byte(`{"type":"x"}`), func(bool) {
			close(inCallback)
			<-release
		})
	}()
	<-inCallback
	close(gw.release)
	if err := <-first; err == nil {
		t.Fatal("the failed write returned nil")
	}
	close(release)
	if err := <-second; err == nil {
		t.Fatal("the frame queued behind the failed write returned nil")
	}
	if n := len(gw.written()); n != 1 {
		t.Fatalf("%d writes, want 1: a frame was written after the stream failed", n)
	}
}

// cutWriter: its first write waits for release and succeeds; the second
// writes only its first cut bytes and fails.
type cutWriter struct {
	entered, release chan struct{}
	cut              int
	mu               sync.Mutex
	calls            int
}

func (c *cutWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.calls++
	n := c.calls
	c.mu.Unlock()
	if n == 1 {
		close(c.entered)
		<-c.release
		return len(p), nil
	}
	return min(c.cut, len(p)), errors.New("write deadline exceeded")
}

// When a grouped write fails part way, the calls whose frames went out
// whole before the failure succeed (their peer may process them: a caller
// must not report them unsent and send them again); the others fail, and
// so does every later call.
func TestWriterFramesWrittenWholeBeforeAFailureSucceed(t *testing.T) {
	ev := func(i int) []byte { return []byte(fmt.Sprintf(`{"type":"e%d"}`, i)) }
	frameLen := HeaderSize + len(ev(0))
	cw := &cutWriter{entered: make(chan struct{}), release: make(chan struct{}), cut: 2*frameLen + 3} // A, B and 3 bytes of C
	w := NewWriter(cw, WriterConfig{})
	go w.WriteFrame(TypePing, 0, 0, make([]byte, PingSize))
	<-cw.entered
	errs := make([]chan error, 3)
	for i := range errs {
		errs[i] = make(chan error, 1)
		go func() { errs[i] <- w.WriteFrame(TypeEvent, 0, uint64(i+1), ev(i)) }()
		waitQueued(t, w, i+1) // A, B, C in this order
	}
	close(cw.release)
	for i, want := range []bool{true, true, false} {
		err := <-errs[i]
		if (err == nil) != want {
			t.Errorf("frame %c: err %v, want success %v", 'A'+i, err, want)
		}
	}
	if err := w.WriteFrame(TypePing, 0, 0, make([]byte, PingSize)); err == nil {
		t.Error("a write after the failure succeeded")
	}
}
