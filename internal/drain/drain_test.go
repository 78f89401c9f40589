package drain

import (
	"bufio"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// A peer that wrote more than the other side read still reads what was
// written to it, to its end, when the other side closes through Close;
// closed plainly with the bytes unread, it reads a reset instead.
func TestClosePeerReadsTheAnswerNotAReset(t *testing.T) {
	for _, tc := range []struct {
		name  string
		close func(net.Conn) error
		reset bool
	}{
		{"drained", func(c net.Conn) error { return Close(c, 64<<10, time.Now().Add(time.Second)) }, false},
		{"plain", func(c net.Conn) error { return c.Close() }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				time.Sleep(50 * time.Millisecond) // the request arrives, unread
				c.Write([]byte("answer\n"))
				tc.close(c)
			}()
			c, err := net.Dial("unix", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(make([]byte, 4096)); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			r := bufio.NewReader(c)
			line, err := r.ReadString('\n')
			if line != "answer\n" || err != nil {
				t.Fatalf("read %q, %v", line, err)
			}
			_, err = r.ReadByte()
			if gotReset := err != nil && err != io.EOF; gotReset != tc.reset {
				t.Fatalf("after the answer: %v; want a reset %v", err, tc.reset)
			}
		})
	}
}
