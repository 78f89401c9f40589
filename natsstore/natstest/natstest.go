// Package natstest starts an embedded NATS server with JetStream for tests,
// the way net/http/httptest starts an HTTP server: on a random loopback
// port, with its store in a directory the caller owns, and with every
// JetStream write fsynced before it is acknowledged (sync_interval:
// always), so tests see the durability a production server must be
// configured for. NewCluster starts several such servers joined in one
// JetStream cluster (for replicated streams and client failover).
package natstest

import (
	"fmt"
	"path/filepath"
	"strings"
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
func New(dir string) (*Server, error) { return newServer(dir, 8<<20) }

func newServer(dir string, maxPayload int32) (*Server, error) {
	opts := &server.Options{
		ServerName: "natstest",
		Host:       "127.0.0.1",
		Port:       server.RANDOM_PORT,
		JetStream:  true,
		StoreDir:   dir,
		SyncAlways: true,
		NoLog:      true,
		NoSigs:     true,
		MaxPayload: maxPayload,
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
	return StartWithMaxPayload(tb, 8<<20)
}

// StartWithMaxPayload is Start with the server's max_payload (the largest
// message it takes) set to maxPayload bytes, for tests of messages over
// it: a stock server takes 1 MiB, the servers of Start 8 MiB.
func StartWithMaxPayload(tb testing.TB, maxPayload int32) *Server {
	tb.Helper()
	s, err := newServer(tb.TempDir(), maxPayload)
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

// Cluster is a JetStream cluster of embedded servers on loopback, joined
// by routes, for tests of replicated streams and of a client failing over
// when its server goes away.
type Cluster struct {
	// Servers are the cluster's servers, n1 first.
	Servers []*Server
}

// NewCluster starts n servers (n ≥ 1) named n1…nN in one cluster, each
// with its JetStream store in its own directory under dir, and waits
// (up to 30s) until JetStream's meta group has a leader that knows all n
// peers and every server is current. Every write is fsynced before it is acknowledged, as
// on a single test server. Stop it with Shutdown.
func NewCluster(dir string, n int) (*Cluster, error) {
	if n < 1 {
		return nil, fmt.Errorf("natstest: a cluster needs at least one server, got %d", n)
	}
	c := &Cluster{}
	var routes []string
	for i := range n {
		opts := &server.Options{
			ServerName: fmt.Sprintf("n%d", i+1),
			Host:       "127.0.0.1",
			Port:       server.RANDOM_PORT,
			JetStream:  true,
			StoreDir:   filepath.Join(dir, fmt.Sprintf("n%d", i+1)),
			SyncAlways: true,
			NoLog:      true,
			NoSigs:     true,
			MaxPayload: 8 << 20,
			Cluster: server.ClusterOpts{
				Name: "natstest",
				Host: "127.0.0.1",
				Port: server.RANDOM_PORT,
			},
			Routes: server.RoutesFromStr(strings.Join(routes, ",")),
		}
		srv, err := server.NewServer(opts)
		if err != nil {
			c.Shutdown()
			return nil, fmt.Errorf("natstest: new cluster server %d: %w", i+1, err)
		}
		srv.Start()
		s := &Server{srv: srv}
		c.Servers = append(c.Servers, s)
		if !srv.ReadyForConnections(10 * time.Second) {
			c.Shutdown()
			return nil, fmt.Errorf("natstest: cluster server %d not ready within 10s", i+1)
		}
		s.url = srv.ClientURL()
		routes = append(routes, fmt.Sprintf("nats-route://%s", srv.ClusterAddr()))
	}
	deadline := time.Now().Add(30 * time.Second)
	for !c.formed(n) {
		if time.Now().After(deadline) {
			c.Shutdown()
			return nil, fmt.Errorf("natstest: JetStream cluster of %d did not form within 30s", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return c, nil
}

// formed reports whether the meta group has a leader that knows all n
// peers and every server is current with it.
func (c *Cluster) formed(n int) bool {
	leader := false
	for _, s := range c.Servers {
		if !s.srv.JetStreamIsCurrent() {
			return false
		}
		if s.srv.JetStreamIsLeader() {
			leader = len(s.srv.JetStreamClusterPeers()) == n
		}
	}
	return leader
}

// StartCluster starts a cluster of n servers on tb.TempDir() and shuts
// it down when the test ends.
func StartCluster(tb testing.TB, n int) *Cluster {
	tb.Helper()
	c, err := NewCluster(tb.TempDir(), n)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(c.Shutdown)
	return c
}

// URLs is every server's client URL, comma-separated, in server order.
func (c *Cluster) URLs() string {
	urls := make([]string, len(c.Servers))
	for i, s := range c.Servers {
		urls[i] = s.URL()
	}
	return strings.Join(urls, ",")
}

// Shutdown stops every server; safe to call twice.
func (c *Cluster) Shutdown() {
	for _, s := range c.Servers {
		s.Shutdown()
	}
}
