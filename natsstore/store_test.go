package natsstore_test

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine/storetest"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// srv is the one embedded server every test of this binary shares; each
// test gets its own stream and subject prefix on it.
var srv *natstest.Server

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "natsstore-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	srv, err = natstest.New(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	code := m.Run()
	srv.Shutdown()
	_ = os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

var streamSeq atomic.Int64

// freshConfig returns a config naming a stream no other test uses.
func freshConfig() natsstore.Config {
	n := streamSeq.Add(1)
	return natsstore.Config{URL: srv.URL(), Stream: fmt.Sprintf("T%d", n), Prefix: fmt.Sprintf("t%d", n)}
}

func openCfg(t testing.TB, cfg natsstore.Config) *natsstore.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := natsstore.Open(ctx, cfg)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func open(t *testing.T) engine.Store { return openCfg(t, freshConfig()) }

func TestConformance(t *testing.T) { storetest.Run(t, open) }
