package ipc

import (
	"errors"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// shortenOnSet is a connection on which "another goroutine" shortens the
// timeout, and sets the short deadline, between the caller's read of the
// timeout and its first SetWriteDeadline, which therefore overrides the
// short deadline with the long one: the race between a write and a close.
type shortenOnSet struct {
	net.Conn
	timeout *atomic.Int64
	short   int64
	last    time.Time
	calls   int
}

func (c *shortenOnSet) SetWriteDeadline(t time.Time) error {
	c.calls++
	if c.calls == 1 {
		c.timeout.Store(c.short) // the closer, whose own short deadline this call now overrides
	}
	c.last = t
	return nil
}

func TestSetWriteDeadlineKeepsATimeoutShortenedMeanwhile(t *testing.T) {
	var timeout atomic.Int64
	timeout.Store(int64(time.Hour))
	c := &shortenOnSet{timeout: &timeout, short: int64(100 * time.Millisecond)}
	start := time.Now()
	if err := SetWriteDeadline(c, &timeout); err != nil {
		t.Fatal(err)
	}
	if c.last.Sub(start) > time.Minute {
		t.Fatalf("deadline %v after the start: the shortened timeout was overridden", c.last.Sub(start))
	}
	if c.calls != 2 {
		t.Fatalf("%d SetWriteDeadline calls, want 2", c.calls)
	}
}

// buffersRecorder records how the Writer writes to it.
type buffersRecorder struct {
	writes  int
	vectors [][]int // the lengths of the buffers of each WriteBuffers
}

func (r *buffersRecorder) Write(p []byte) (int, error) { r.writes++; return len(p), nil }

func (r *buffersRecorder) WriteBuffers(bufs *net.Buffers) (int64, error) {
	var lens []int
	var n int64
	for _, b := range *bufs {
		lens = append(lens, len(b))
		n += int64(len(b))
	}
	r.vectors = append(r.vectors, lens)
	*bufs = (*bufs)[len(*bufs):]
	return n, nil
}

// A frame too large to copy goes to a BuffersWriter in one WriteBuffers,
// header and payload as two buffers; a small frame in one Write.
func TestWriterHandsALargeFrameToWriteBuffers(t *testing.T) {
	rec := &buffersRecorder{}
	w := NewWriter(rec, WriterConfig{BufferSize: 1024})
	if err := w.WriteFrame(TypeEvent, 0, 1, make([]byte, 64<<10)); err != nil {
		t.Fatal(err)
	}
	if rec.writes != 0 || len(rec.vectors) != 1 || len(rec.vectors[0]) != 2 ||
		rec.vectors[0][0] != HeaderSize || rec.vectors[0][1] != 64<<10 {
		t.Fatalf("large frame: %d writes, vectors %v; want one WriteBuffers of [%d %d]", rec.writes, rec.vectors, HeaderSize, 64<<10)
	}
	if err := w.WriteFrame(TypeEvent, 0, 1, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	if rec.writes != 1 || len(rec.vectors) != 1 {
		t.Fatalf("small frame: %d writes, %d WriteBuffers; want 1 and still 1", rec.writes, len(rec.vectors))
	}
}

// DeadlineWriter's WriteBuffers writes every byte to a reading peer, and
// gives up on its deadline when the peer does not read.
func TestDeadlineWriterWriteBuffers(t *testing.T) {
	client, server := unixPair(t)
	timeout := new(atomic.Int64)
	timeout.Store(int64(5 * time.Second))
	d := DeadlineWriter{Conn: client, Timeout: timeout}
	payload := []byte(`{"d":"` + strings.Repeat("0123456789abcdef", 1<<16) + `"}`) // 1 MiB
	w := NewWriter(d, WriterConfig{})
	r := NewReader(server, ReaderConfig{})
	done := make(chan error, 1)
	go func() { done <- w.WriteFrame(TypeEvent, 0, 3, payload) }()
	f, err := r.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	if f.Stream != 3 || string(f.Payload) != string(payload) {
		t.Fatalf("read stream %d, %d bytes; want stream 3 and the payload", f.Stream, len(f.Payload))
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	timeout.Store(int64(100 * time.Millisecond))
	big := net.Buffers{make([]byte, HeaderSize), make([]byte, 16<<20)} // more than the socket buffers hold
	start := time.Now()
	n, err := d.WriteBuffers(&big)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("WriteBuffers to a peer that does not read: %d bytes, %v; want a deadline error", n, err)
	}
	if el := time.Since(start); el > 4*time.Second {
		t.Fatalf("gave up after %v, not on the 100ms deadline", el)
	}
}
