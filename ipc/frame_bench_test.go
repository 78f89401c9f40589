package ipc

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// benchPayloadSize is the EVENT payload of the read/write benchmarks; the raw
// socket baseline sends messages of benchPayloadSize+HeaderSize bytes, the
// same bytes per message as a frame.
const benchPayloadSize = 200

func BenchmarkHeaderEncode(b *testing.B) {
	b.ReportAllocs()
	var dst [HeaderSize]byte
	h := Header{Length: benchPayloadSize, Type: TypeEvent, Stream: 42}
	for i := 0; b.Loop(); i++ {
		h.Stream = uint64(i)
		h.Encode(&dst)
	}
}

func BenchmarkHeaderDecode(b *testing.B) {
	b.ReportAllocs()
	var src [HeaderSize]byte
	Header{Length: benchPayloadSize, Type: TypeEvent, Stream: 42}.Encode(&src)
	for b.Loop() {
		if _, err := DecodeHeader(src[:], DefaultMaxFrame); err != nil {
			b.Fatal(err)
		}
	}
}

func reportFrames(b *testing.B, n int) {
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "frames/s")
}

// BenchmarkReadFrame reads 200-byte EVENT frames from memory: header decode,
// pooled payload and JSON check.
func BenchmarkReadFrame(b *testing.B) {
	for _, check := range []bool{true, false} {
		name := "check"
		if !check {
			name = "nocheck"
		}
		b.Run(name, func(b *testing.B) {
			frame := AppendFrame(nil, TypeEvent, 0, 1, eventPayload(benchPayloadSize))
			r := NewReader(&loopReader{data: bytes.Repeat(frame, 64)}, ReaderConfig{SkipPayloadCheck: !check})
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			n := 0
			for b.Loop() {
				f, err := r.ReadFrame()
				if err != nil {
					b.Fatal(err)
				}
				f.Release()
				n++
			}
			reportFrames(b, n)
		})
	}
}

func BenchmarkWriteFrame(b *testing.B) {
	payload := eventPayload(benchPayloadSize)
	w := NewWriter(io.Discard, WriterConfig{})
	b.SetBytes(int64(HeaderSize + len(payload)))
	b.ReportAllocs()
	n := 0
	for i := 0; b.Loop(); i++ {
		if err := w.WriteFrame(TypeEvent, 0, uint64(i), payload); err != nil {
			b.Fatal(err)
		}
		n++
	}
	reportFrames(b, n)
}

// BenchmarkRawUnixSocket is the baseline: b.N messages of one frame's size,
// one Write each, over a Unix stream socket, read through a 64 KiB bufio
// reader with no parsing. Compare its msgs/s with the frames/s of
// BenchmarkFramesOverUnixSocket in the same run.
func BenchmarkRawUnixSocket(b *testing.B) {
	client, server := unixPair(b)
	msg := AppendFrame(nil, TypeEvent, 0, 1, eventPayload(benchPayloadSize))
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	done := make(chan error, 1)
	go func() {
		for range b.N {
			if _, err := client.Write(msg); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	br := bufio.NewReaderSize(server, defaultReadBuffer)
	buf := make([]byte, len(msg))
	for range b.N {
		if _, err := io.ReadFull(br, buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

// BenchmarkFramesOverUnixSocket writes 200-byte EVENT frames with a Writer on
// one end of a Unix stream socket and reads them with a Reader on the other.
func BenchmarkFramesOverUnixSocket(b *testing.B) { framesOverUnixSocket(b, 1) }

// BenchmarkFramesOverUnixSocketConcurrent: the same with 64 goroutines
// sharing the Writer (the runs of one agent connection). writes/frame is
// the Write calls per frame: below 1 only if the Writer grouped frames.
func BenchmarkFramesOverUnixSocketConcurrent(b *testing.B) {
	cc := framesOverUnixSocket(b, 64)
	b.ReportMetric(float64(cc.writes.Load())/float64(b.N), "writes/frame")
}

// countingConn counts the Write calls that reach a connection.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// framesOverUnixSocket writes b.N frames from writers goroutines sharing one
// Writer and reads them on the other end of a socket pair.
func framesOverUnixSocket(b *testing.B, writers int) *countingConn {
	client, server := unixPair(b)
	cc := &countingConn{Conn: client}
	payload := eventPayload(benchPayloadSize)
	w := NewWriter(cc, WriterConfig{Yield: true}) // as the agent SDK's
	r := NewReader(server, ReaderConfig{})
	b.SetBytes(int64(HeaderSize + len(payload)))
	b.ReportAllocs()
	b.ResetTimer()
	done := make(chan error, writers)
	for g := range writers {
		go func() {
			n := b.N / writers
			if g < b.N%writers {
				n++
			}
			for i := range n {
				if err := w.WriteFrame(TypeEvent, 0, uint64(i), payload); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for range b.N {
		f, err := r.ReadFrame()
		if err != nil {
			b.Fatal(err)
		}
		f.Release()
	}
	for range writers {
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
	reportFrames(b, b.N)
	return cc
}

// writeOnly hides a connection's vectored write, as a plain wrapper
// around a net.Conn does: net.Buffers then writes buffer by buffer.
type writeOnly struct{ w io.Writer }

func (o writeOnly) Write(p []byte) (int, error) { return o.w.Write(p) }

// BenchmarkLargeFrameOverUnixSocket writes frames too large to copy
// through a DeadlineWriter (one writev each) and, for comparison in the
// same run, through a wrapper that hides the vectored write (a write for
// the header, another for the payload).
func BenchmarkLargeFrameOverUnixSocket(b *testing.B) {
	for _, size := range []int{64 << 10, 1 << 20} {
		for _, mode := range []string{"deadline", "write-only"} {
			b.Run(fmt.Sprintf("payload=%dKiB/writer=%s", size>>10, mode), func(b *testing.B) {
				client, server := unixPair(b)
				timeout := new(atomic.Int64)
				timeout.Store(int64(time.Minute))
				var out io.Writer = DeadlineWriter{Conn: client, Timeout: timeout}
				if mode == "write-only" {
					out = writeOnly{out}
				}
				payload := []byte(`{"d":"` + strings.Repeat("x", size-8) + `"}`)
				w := NewWriter(out, WriterConfig{})
				r := NewReader(server, ReaderConfig{})
				b.SetBytes(int64(HeaderSize + len(payload)))
				b.ReportAllocs()
				done := make(chan error, 1)
				b.ResetTimer()
				go func() {
					for range b.N {
						if err := w.WriteFrame(TypeEvent, 0, 1, payload); err != nil {
							done <- err
							return
						}
					}
					done <- nil
				}()
				for range b.N {
					f, err := r.ReadFrame()
					if err != nil {
						b.Fatal(err)
					}
					f.Release()
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}
