package proxy

import (
	"fmt"
	"net"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/internal/drain"
)

// adminMaxConns caps the admin listener's open connections: probes and
// scrapes need few.
const adminMaxConns = 256

// Bounds of a refusal (refuseConn): how many drain at once, and how long
// and how much one drains. Past maxRefusing a connection is closed at
// once after its answer.
const (
	maxRefusing   = 64
	refusalDrain  = time.Second
	refusalMaxLen = 64 << 10
)

// maxConns is the cap of kind's listener.
func (s *Server) maxConns(kind listenerKind) int {
	if kind == kindAdmin {
		return adminMaxConns
	}
	return s.cfg.MaxConns
}

// refusal is the answer to a connection past its listener's cap: 503
// unavailable, Retry-After: 1, and the connection closes. Made once per
// listener (New), written before any request is read.
func refusal(kind listenerKind, maxConns int) []byte {
	bound := "--max-conns"
	if kind == kindAdmin {
		bound = "the admin listener's fixed cap"
	}
	body, _ := json.Marshal(errorBody{Error: errorDetail{Code: CodeUnavailable, Message: fmt.Sprintf(
		"the %s listener serves its most connections (%d, %s): retry", kind, maxConns, bound)}}) // strings always marshal
	return fmt.Appendf(nil, "HTTP/1.1 503 Service Unavailable\r\nServer: mailbox-sidecar\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s",
		len(body), body)
}

// refuseConn answers a connection accepted past its listener's cap and
// closes it. The client has usually sent its request already: closed
// with that unread, the kernel would reset the connection and the
// client might lose the answer, so the answer is followed by a close of
// the sending side and the request is read and dropped (up to 64 KiB, 1
// s) on a goroutine of its own before the close; at most 64 do so at
// once, past that a refusal closes at once. The accept loop never waits
// on the client.
func (s *Server) refuseConn(c net.Conn, kind listenerKind) {
	s.m.connsRefused[kind].Inc()
	answer := s.refusals[kind]
	s.mu.Lock()
	draining := !s.closing && len(s.refusing) < cap(s.refusing)
	if draining {
		s.refusing <- struct{}{}
		s.refuseWG.Add(1)
	}
	s.mu.Unlock()
	if !draining {
		_ = c.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
		_, _ = c.Write(answer)
		_ = c.Close()
		return
	}
	go func() {
		defer s.refuseWG.Done()
		defer func() { <-s.refusing }()
		until := time.Now().Add(refusalDrain)
		_ = c.SetWriteDeadline(until)
		if _, err := c.Write(answer); err != nil {
			_ = c.Close()
			return
		}
		_ = drain.Close(c, refusalMaxLen, until)
	}()
}
