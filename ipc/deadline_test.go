package ipc

import (
	"net"
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
