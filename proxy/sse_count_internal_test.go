package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// failAfter is the pipe fasthttp's stream writer writes to: its first
// write succeeds (and, as the client falls behind, the ring moves past
// what the stream sent); every write after it fails, as one does once the
// connection's write deadline has passed.
type failAfter struct {
	n       int
	onFirst func()
}

func (f *failAfter) Write(p []byte) (int, error) {
	f.n++
	if f.n == 1 {
		f.onFirst()
		return len(p), nil
	}
	time.Sleep(2 * time.Millisecond) // stuck past the stall bound
	return 0, errors.New("timeout")
}

// A stream that fell behind the ring and whose reset write then hits the
// stall bound is counted once in mailbox_http_sse_dropped_total (found by
// review: twice, by the failing flush and by the slow_subscriber branch).
func TestASlowSubscriberIsCountedOnce(t *testing.T) {
	s := &Server{cfg: Config{PingInterval: time.Hour, StallTimeout: time.Millisecond}, log: slog.Default(), m: newHTTPMetrics(),
		done: make(chan struct{}), streams: map[*sseStream]struct{}{}, lingering: map[net.Conn]time.Time{}, pruneAt: lingerPrune}
	log := engine.NewEventLog(4)
	log.Append([]byte(`{"type":"text_delta","n":0}`))
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	st := &sseStream{s: s, thread: "T", log: log, conn: c1}
	s.streams[st] = struct{}{}
	s.streamWG.Add(1)
	s.m.subscribers.Add(1)
	w := bufio.NewWriter(&failAfter{onFirst: func() {
		for i := range 10 { // the ring (4) moves past the stream's position
			log.Append([]byte(fmt.Sprintf(`{"type":"text_delta","n":%d}`, i+1)))
		}
	}})
	st.run(w)
	if s.m.dropped.Get() != 1 {
		t.Fatalf("one dropped stream counted %d times", s.m.dropped.Get())
	}
}
