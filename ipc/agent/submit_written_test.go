package agent

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// partialWriter: the first write waits for release and succeeds; the
// second writes all but its last byte and fails (a sidecar that stopped
// reading: a write deadline). delivered is what reached the "socket".
type partialWriter struct {
	entered, release chan struct{}
	mu               sync.Mutex
	calls            int
	delivered        bytes.Buffer
}

func (p *partialWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	p.calls++
	n := p.calls
	p.mu.Unlock()
	if n == 1 {
		close(p.entered)
		<-p.release
		p.mu.Lock()
		p.delivered.Write(b)
		p.mu.Unlock()
		return len(b), nil
	}
	p.mu.Lock()
	p.delivered.Write(b[:len(b)-1])
	p.mu.Unlock()
	return len(b) - 1, errors.New("i/o timeout")
}

// A SUBMIT that went out whole in a write that then failed (on a frame
// grouped after it) is not reported unsent: the sidecar may have queued
// it, and Client.Submit would send it again on the next connection.
func TestSubmitWrittenWholeBeforeAFailedWriteIsNotReportedUnsent(t *testing.T) {
	pw := &partialWriter{entered: make(chan struct{}), release: make(chan struct{})}
	a, b := net.Pipe()
	defer b.Close()
	cn := &conn{nc: a, w: ipc.NewWriter(pw, ipc.WriterConfig{}), dead: make(chan struct{}),
		runs: map[uint64]*Run{}, submits: map[string]chan submitResultPayload{}}
	ping := make([]byte, ipc.PingSize)

	go cn.send(ipc.TypePing, 0, ping) // the first write, held
	<-pw.entered
	errc := make(chan error, 1)
	go func() {
		_, err := cn.submit(context.Background(), "q-1", []byte(`{"req":"q-1","thread_id":"t","messages":[]}`))
		errc <- err
	}()
	waitFrames(t, cn.w, 1) // the SUBMIT waits for the next write
	go cn.send(ipc.TypePing, 0, ping)
	waitFrames(t, cn.w, 2) // and a PING after it: that write fails in the PING
	close(pw.release)
	var err error
	select {
	case err = <-errc:
	case <-time.After(10 * time.Second):
		t.Fatal("submit did not return")
	}

	r := ipc.NewReader(bytes.NewReader(pw.delivered.Bytes()), ipc.ReaderConfig{})
	var got []ipc.FrameType
	for {
		f, ferr := r.ReadFrame()
		if ferr != nil {
			break
		}
		got = append(got, f.Type)
	}
	if len(got) != 2 || got[1] != ipc.TypeSubmit {
		t.Fatalf("whole frames delivered %v, want PING SUBMIT", got)
	}
	if err == nil || errors.Is(err, errNotSent) || !errors.Is(err, ErrConnectionLost) {
		t.Fatalf("submit returned %v, want the connection lost after the SUBMIT went out (not errNotSent)", err)
	}
}

// waitFrames waits until n frames wait for w's next write.
func waitFrames(t *testing.T, w *ipc.Writer, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for w.Waiting() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d frames waiting, want %d", w.Waiting(), n)
		}
		time.Sleep(time.Millisecond)
	}
}
