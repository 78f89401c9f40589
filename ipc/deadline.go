package ipc

import (
	"net"
	"sync/atomic"
	"time"
)

// SetWriteDeadline sets nc's write deadline to now plus timeout
// (nanoseconds). The timeout may be shortened at any time by another
// goroutine, which then sets the shorter deadline itself (to give up on a
// peer that stopped reading); a call that read the old timeout and set
// its deadline after that sets it again, so the shorter one holds.
func SetWriteDeadline(nc net.Conn, timeout *atomic.Int64) error {
	t := timeout.Load()
	for {
		if err := nc.SetWriteDeadline(time.Now().Add(time.Duration(t))); err != nil {
			return err
		}
		now := timeout.Load()
		if now == t {
			return nil
		}
		t = now
	}
}
