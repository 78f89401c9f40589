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

// DeadlineWriter writes to a connection, each write bounded by Timeout
// (nanoseconds, see SetWriteDeadline). Its WriteBuffers keeps the
// connection's vectored write (writev on sockets), which a wrapper around
// a net.Conn otherwise hides from net.Buffers.
type DeadlineWriter struct {
	Conn    net.Conn
	Timeout *atomic.Int64
}

// Write writes p by the deadline.
func (d DeadlineWriter) Write(p []byte) (int, error) {
	if err := SetWriteDeadline(d.Conn, d.Timeout); err != nil {
		return 0, err
	}
	return d.Conn.Write(p)
}

// WriteBuffers writes bufs by the deadline, in one system call where the
// connection can.
func (d DeadlineWriter) WriteBuffers(bufs *net.Buffers) (int64, error) {
	if err := SetWriteDeadline(d.Conn, d.Timeout); err != nil {
		return 0, err
	}
	return bufs.WriteTo(d.Conn)
}

// BuffersWriter is a writer that writes several buffers at once; the
// Writer uses it for a frame too large to copy.
type BuffersWriter interface {
	WriteBuffers(bufs *net.Buffers) (int64, error)
}
