// Package natstest starts an embedded NATS server with JetStream for tests,
// the way net/http/httptest starts an HTTP server: on a random loopback
// port, with its store in a directory the caller owns, and with every
// JetStream write fsynced before it is acknowledged (sync_interval:
// always), so tests see the durability a production server must be
// configured for.
package natstest

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Server is a running embedded NATS server with JetStream enabled.
type Server struct {
	srv *server.Server
	url string
}

// New starts a server whose JetStream store lives in dir (created if
// absent). Stop it with Shutdown.
func New(dir string) (*Server, error) {
	opts := &server.Options{
		ServerName: "natstest",
		Host:       "127.0.0.1",
		Port:       server.RANDOM_PORT,
		JetStream:  true,
		StoreDir:   dir,
		SyncAlways: true,
		NoLog:      true,
		NoSigs:     true,
		MaxPayload: 8 << 20,
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("natstest: new server: %w", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("natstest: server not ready within 10s")
	}
	return &Server{srv: srv, url: srv.ClientURL()}, nil
}

// Start starts a server on tb.TempDir() and shuts it down when the test
// ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	s, err := New(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(s.Shutdown)
	return s
}

// URL is the client URL (nats://127.0.0.1:<port>).
func (s *Server) URL() string { return s.url }

// Server is the embedded server itself, for tests that inspect it.
func (s *Server) Server() *server.Server { return s.srv }

// Shutdown stops the server and waits until all its goroutines have
// ended; safe to call twice.
func (s *Server) Shutdown() {
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
}
