package natsstore_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// startFixed starts an embedded JetStream server like natstest.New, on a
// given port (0: random) and store dir, so it can be restarted in place.
func startFixed(t *testing.T, dir string, port int) *server.Server {
	t.Helper()
	if port == 0 {
		port = server.RANDOM_PORT
	}
	opts := &server.Options{ServerName: "restart", Host: "127.0.0.1", Port: port, JetStream: true,
		StoreDir: dir, SyncAlways: true, NoLog: true, NoSigs: true, MaxPayload: 8 << 20}
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	return s
}

// After the (single) NATS server restarts, the store must keep working:
// its index follows new writes and dispatch signals flow again.
func TestServerRestart(t *testing.T) {
	dir := t.TempDir()
	s1 := startFixed(t, dir, 0)
	p := s1.ClientURL()
	cfg := natsstore.Config{URL: p, Stream: "RST", Prefix: "rst", SignalSweepInterval: 200 * time.Millisecond, SignalRepublishAfter: 300 * time.Millisecond}
	st := openCfg(t, cfg)
	ctx := context.Background()
	if _, err := st.Enqueue(ctx, queued("d1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	sig := pullOne(t, st)
	_ = sig.Receipt.Ack()

	if got := storeMetric(st, "mailbox_store_nats_connected"); got != "1" {
		t.Fatalf("connected gauge before the restart: %q", got)
	}
	portNum := s1.Addr().(*net.TCPAddr).Port
	s1.Shutdown()
	s1.WaitForShutdown()
	eventually(t, "the loss counted", func() bool {
		return storeMetric(st, "mailbox_store_nats_connected") == "0" && storeMetric(st, "mailbox_store_nats_disconnects_total") == "1"
	})
	s2 := startFixed(t, dir, portNum)
	defer func() { s2.Shutdown(); s2.WaitForShutdown() }()
	eventually(t, "reconnect", func() bool { return st.Writable() == nil })
	// The store's metrics say what happened (found by review: it had none).
	eventually(t, "the return counted", func() bool {
		return storeMetric(st, "mailbox_store_nats_connected") == "1" && storeMetric(st, "mailbox_store_nats_reconnects_total") == "1"
	})
	if got := storeMetric(st, `mailbox_store_commits_total{result="ok"}`); got == "0" || got == "" {
		t.Fatalf("commits counted before the restart: %q", got)
	}

	var err error
	eventually(t, "enqueue after restart", func() bool {
		_, err = st.Enqueue(ctx, queued("d2", "t2", 1000))
		return err == nil
	})
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	d, err := st.Claim(cctx, "t2", "c", time.Minute, 2000)
	if err != nil || d == nil {
		t.Fatalf("claim after restart: %v %v", d, err)
	}
	if _, err := st.Release(ctx, d.DispatchID, d.ClaimToken, 2000); err != nil {
		t.Fatal(err)
	}
	// a signal for the released dispatch (or the sweeper's) must arrive
	deadline := time.Now().Add(5 * time.Second)
	for {
		sigs, err := st.PullDispatchSignals(ctx, 10, 200*time.Millisecond)
		if err == nil && len(sigs) > 0 {
			for _, s := range sigs {
				_ = s.Receipt.Ack()
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no dispatch signal within 5s of the server's restart; last pull: %d signals, err %v", len(sigs), err)
		}
	}
}

// After a server restart, a store's index follows writes made by another
// store (its ordered consumer must resume where it stopped).
func TestIndexAfterRestart(t *testing.T) {
	dir := t.TempDir()
	s1 := startFixed(t, dir, 0)
	cfg := natsstore.Config{URL: s1.ClientURL(), Stream: "RST2", Prefix: "rst2"}
	a := openCfg(t, cfg)
	b := openCfg(t, cfg)
	ctx := context.Background()
	for i := range 5 {
		if _, err := b.Enqueue(ctx, queued(fmt.Sprintf("a%d", i), "t1", 1000)); err != nil {
			t.Fatal(err)
		}
	}
	portNum := s1.Addr().(*net.TCPAddr).Port
	s1.Shutdown()
	s1.WaitForShutdown()
	s2 := startFixed(t, dir, portNum)
	defer func() { s2.Shutdown(); s2.WaitForShutdown() }()
	eventually(t, "reconnect", func() bool { return a.Writable() == nil && b.Writable() == nil })
	for i := range 20 {
		id := fmt.Sprintf("b%d", i)
		eventually(t, "enqueue", func() bool {
			_, err := b.Enqueue(ctx, queued(id, fmt.Sprintf("u%d", i), 1000))
			return err == nil || errors.Is(err, engine.ErrAlreadyExists)
		})
	}
	eventually(t, "a's index sees b's writes after the restart", func() bool {
		c, err := a.CountByStatus(ctx)
		return err == nil && c.Get(engine.StatusQueued) == 25
	})
}

// A sub-millisecond SignalRepublishAfter passes validation, then the
// sweeper divides by its millisecond count (0).
func TestSubMillisecondRepublishAfter(t *testing.T) {
	cfg := freshConfig()
	cfg.SignalRepublishAfter = 500 * time.Microsecond
	cfg.SignalSweepInterval = time.Hour
	s := openCfg(t, cfg)
	if _, err := s.Enqueue(context.Background(), queued("d1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("SweepSignals panicked: %v", r)
		}
	}()
	s.SweepSignals(2000)
}

// storeMetric is the value of the series name in st's metrics ("" when
// absent).
func storeMetric(st *natsstore.Store, name string) string {
	var b strings.Builder
	st.Metrics().WritePrometheus(&b)
	for _, line := range strings.Split(b.String(), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	return ""
}
