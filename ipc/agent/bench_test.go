package agent

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

var benchEvent = []byte(`{"type":"text_delta","delta":"` + strings.Repeat("x", 100) + `"}`)

// BenchmarkEmit measures Run.EmitRaw of a ~130-byte text_delta to a
// sidecar that drains the socket, beside a bare ipc.Writer on the same
// kind of socket (the baseline). Each iteration's time includes the
// reader draining the frame.
func BenchmarkEmit(b *testing.B) {
	b.Run("sdk", func(b *testing.B) {
		runs := make(chan *Run, 1)
		release := make(chan struct{})
		h := startClient(b, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
			runs <- run
			<-release
			return Done("")
		})})
		h.fc.drain.Store(true)
		h.fc.send(ipc.TypeRun, 1, runJSON("bench", "x"))
		run := recv(b, runs)
		b.SetBytes(int64(len(benchEvent)))
		b.ReportAllocs()
		n := int64(0)
		for b.Loop() {
			if err := run.EmitRaw(benchEvent); err != nil {
				b.Fatal(err)
			}
			n++
		}
		waitDrained(b, &h.fc.drained, n)
		b.StopTimer()
		close(release)
		h.fc.expect(ipc.TypeFinish, 1)
	})

	b.Run("raw_writer", func(b *testing.B) {
		ln, err := net.Listen("unix", socketPath(b))
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		var drained atomic.Int64
		done := make(chan struct{})
		go func() {
			defer close(done)
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			defer nc.Close()
			r := ipc.NewReader(nc, ipc.ReaderConfig{})
			for {
				f, err := r.ReadFrame()
				if err != nil {
					return
				}
				f.Release()
				drained.Add(1)
			}
		}()
		nc, err := net.Dial("unix", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		w := ipc.NewWriter(nc, ipc.WriterConfig{})
		b.SetBytes(int64(len(benchEvent)))
		b.ReportAllocs()
		n := int64(0)
		for b.Loop() {
			if err := w.WriteFrame(ipc.TypeEvent, 0, 1, benchEvent); err != nil {
				b.Fatal(err)
			}
			n++
		}
		waitDrained(b, &drained, n)
		b.StopTimer()
		_ = nc.Close()
		<-done
	})
}

// waitDrained polls until the reader has taken n frames.
func waitDrained(b *testing.B, drained *atomic.Int64, n int64) {
	deadline := time.Now().Add(waitTimeout)
	for drained.Load() < n {
		if time.Now().After(deadline) {
			b.Fatalf("reader drained %d of %d frames", drained.Load(), n)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// TestEmitRawAllocs guards the hot path: EmitRaw allocates nothing.
func TestEmitRawAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful under the race detector")
	}
	runs := make(chan *Run, 1)
	release := make(chan struct{})
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		runs <- run
		<-release
		return Done("")
	})})
	h.fc.drain.Store(true)
	h.fc.send(ipc.TypeRun, 1, runJSON("allocs", "x"))
	run := recv(t, runs)
	allocs := testing.AllocsPerRun(200, func() {
		if err := run.EmitRaw(benchEvent); err != nil {
			t.Fatal(err)
		}
	})
	close(release)
	h.fc.expect(ipc.TypeFinish, 1)
	if allocs != 0 {
		t.Fatalf("EmitRaw: %v allocations per call, want 0", allocs)
	}
}
