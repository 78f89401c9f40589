package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// Past --max-conns a new connection is answered 503 unavailable with
// Retry-After before its request is read, and closed; the connections
// open go on, and one closing makes room. A refused client that sent a
// body the server never reads still reads the answer, not a reset (over
// TCP a close with unread bytes resets the connection and drops what
// the client had not read yet).
func TestConnectionsPastTheCapAreRefused(t *testing.T) {
	t.Parallel()
	const token = "0123456789abcdef0123"
	sc := newSidecar(t, options{noAgent: true, tcp: true, admin: true, proxy: proxy.Config{MaxConns: 2, AuthToken: token}})
	admin := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for _, l := range []struct{ name, network, addr string }{{"api", "unix", sc.apiPath}, {"tcp", "tcp", sc.tcpAddr}} {
		t.Run(l.name, func(t *testing.T) {
			get := "GET /livez HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + "\r\n\r\n"
			var held []*rawConn
			for range 2 {
				c := dialRaw(t, l.network, l.addr)
				if status, _ := c.roundTrip(t, get); status != 200 {
					t.Fatalf("a connection within the cap: %d", status)
				}
				held = append(held, c)
			}
			body := strings.Repeat("x", 32<<10)
			post := fmt.Sprintf("POST /v1/threads/t/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
			refused := dialRaw(t, l.network, l.addr)
			status, resp := refused.roundTrip(t, post)
			if status != 503 || resp.Header.Get("Retry-After") != "1" || !resp.Close {
				t.Fatalf("a connection past the cap: %d, Retry-After %q, close %v", status, resp.Header.Get("Retry-After"), resp.Close)
			}
			if b := resp.body; !strings.Contains(b, `"code":"unavailable"`) || !strings.Contains(b, "--max-conns") {
				t.Fatalf("its answer: %s", b)
			}
			if _, err := refused.r.ReadByte(); err != io.EOF {
				t.Fatalf("after the answer: %v, want EOF", err)
			}
			_, m := doWith(t, admin, "http://"+sc.adminAddr, req{method: "GET", path: "/metrics"})
			want := fmt.Sprintf(`mailbox_http_connections_refused_total{listener=%q} 1`, l.name)
			if got := metricLine(string(m), fmt.Sprintf(`mailbox_http_connections_refused_total{listener=%q}`, l.name)); got != want {
				t.Fatalf("metric %q, want %q", got, want)
			}
			// The connections held go on; one closing makes room.
			if status, _ := held[0].roundTrip(t, get); status != 200 {
				t.Fatalf("a held connection after the refusal: %d", status)
			}
			held[1].nc.Close()
			eventually(t, "room after a close", func() bool {
				c := dialRaw(t, l.network, l.addr)
				defer c.nc.Close()
				status, _ := c.roundTrip(t, get)
				return status == 200
			})
			held[0].nc.Close()
		})
	}
}

// rawConn is a client connection that writes requests by hand.
type rawConn struct {
	nc net.Conn
	r  *bufio.Reader
}

type rawResponse struct {
	*http.Response
	body string
}

func dialRaw(t *testing.T, network, addr string) *rawConn {
	t.Helper()
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &rawConn{nc: nc, r: bufio.NewReader(nc)}
}

// roundTrip writes raw and reads one answer.
func (c *rawConn) roundTrip(t *testing.T, raw string) (int, rawResponse) {
	t.Helper()
	_ = c.nc.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := io.WriteString(c.nc, raw); err != nil {
		t.Fatalf("write: %v", err)
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		t.Fatalf("read the answer: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read the answer's body: %v", err)
	}
	return resp.StatusCode, rawResponse{resp, string(b)}
}
