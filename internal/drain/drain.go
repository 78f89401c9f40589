// Package drain closes a connection whose peer may still be sending,
// without the reset that would lose what was written to it.
package drain

import (
	"io"
	"net"
	"time"
)

// Close closes c's sending side, reads and drops what the peer still
// sends, up to maxBytes and until deadline, and closes c. A socket
// closed with unread bytes is reset: the peer loses what it had not read
// yet (an answer, an ERROR frame) or gets a broken pipe on its next
// write. A c without CloseWrite is closed at once.
func Close(c net.Conn, maxBytes int64, deadline time.Time) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok && maxBytes > 0 && cw.CloseWrite() == nil {
		_ = c.SetReadDeadline(deadline)
		_, _ = io.Copy(io.Discard, io.LimitReader(c, maxBytes))
	}
	return c.Close()
}
