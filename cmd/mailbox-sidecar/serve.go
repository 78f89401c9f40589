package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// liveStall is how long a loop of the engine may be busy with one round,
// or the store with one write, before /livez answers 503: far beyond any
// legitimate round (a purge works in chunks, each its own commit) and
// any fsync, short enough for an orchestrator to restart a wedged pod.
const liveStall = 2 * time.Minute

// storeCloseTimeout bounds the store's Close at shutdown (Badger flushes
// its memtables, a second or two): a process that exits without it loses
// nothing acknowledged.
const storeCloseTimeout = 30 * time.Second

// closeStore closes the store unless closing would hang or crash the
// process (the store's Closable: a failed log sync, a full disk), and
// gives up waiting after timeout. The directory is crash-safe either way:
// what was acknowledged is in the synced logs, and the next start replays
// them.
func closeStore(st sidecarStore, timeout time.Duration, log *slog.Logger) {
	if c, ok := st.(interface{ Closable() error }); ok {
		if err := c.Closable(); err != nil {
			log.Error("store not closed: closing it now would hang or crash; what was acknowledged is in its synced logs, replayed at the next start", "err", err)
			return
		}
	}
	done := make(chan error, 1)
	go func() { done <- st.Close() }()
	select {
	case err := <-done:
		if err != nil {
			log.Error("close store", "err", err)
		}
	case <-time.After(timeout):
		log.Error("store close still running: exiting without it; what was acknowledged is in its synced logs, replayed at the next start", "waited", timeout)
	}
}

// sidecar is a running sidecar: store, engine, hub and API servers.
type sidecar struct {
	cfg   serveConfig
	log   *slog.Logger
	store sidecarStore
	hub   *hub.Hub
	mb    *engine.Mailbox
	px    *proxy.Server

	recovered    atomic.Bool
	agentReady   atomic.Bool
	agentSock    os.FileInfo // the agent socket as bound: readiness checks the path still names it
	agentPath    string
	agentGone    atomic.Bool // the agent socket's file was found removed or replaced (logged once)
	shuttingDown atomic.Bool

	wg     sync.WaitGroup
	errs   chan error // a listener that failed
	closed []func()
}

// startSidecar opens everything and starts serving. Recovery runs in the
// background; /readyz turns 200 when it is done. On error everything
// opened so far is closed again: the listeners (their socket files
// removed), the goroutines serving them, the hub and the store.
func startSidecar(cfg serveConfig, log *slog.Logger) (_ *sidecar, err error) {
	s := &sidecar{cfg: cfg, log: log, errs: make(chan error, 4)}
	defer func() {
		if err != nil {
			s.shuttingDown.Store(true) // listener loops ending now are no failure
			s.release()
		}
	}()
	tuneRuntime(cfg, os.Getenv, log)
	limit := int64(cfg.MemoryLimit)
	if os.Getenv("GOMEMLIMIT") != "" {
		limit = debug.SetMemoryLimit(-1) // the environment's, which wins
	}
	if fitted := cfg.fitBudgets(limit); fitted != nil {
		log.Info("memory budgets fitted to the memory limit (set them to choose)", append([]any{"memory_limit", formatBytes(limit)}, fitted...)...)
		s.cfg = cfg
	}
	// A sidecar serving either socket refuses this one before the store
	// is opened: a start refused at the API socket had made and
	// initialised a data directory, and left the agent socket's lock file
	// (found by review). listenUnix takes the locks for good below.
	// So is a socket path holding another file, or a socket another
	// process listens on: they were found after the store was open, the
	// data directory made (found by review).
	for _, sock := range []struct{ name, path string }{{"agent socket", cfg.AgentSocket}, {"API socket", cfg.APISocket}} {
		if err := probeSocketLock(sock.path); err != nil {
			return nil, fmt.Errorf("%s: %w", sock.name, err)
		}
		if err := probeSocketPath(sock.path); err != nil {
			return nil, fmt.Errorf("%s: %w", sock.name, err)
		}
	}
	// The TCP ports before the store: one taken refused the start after
	// the data directory was made (found by review). Their requests wait
	// in the backlog until they are served below.
	var httpLn, adminLn net.Listener
	if cfg.HTTPAddr != "" {
		if httpLn, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
			return nil, fmt.Errorf("--http-addr: %w", err)
		}
		s.closed = append(s.closed, func() { httpLn.Close() })
	}
	if cfg.AdminAddr != "" {
		if adminLn, err = net.Listen("tcp", cfg.AdminAddr); err != nil {
			return nil, fmt.Errorf("--admin-addr: %w", err)
		}
		s.closed = append(s.closed, func() { adminLn.Close() })
	}
	// The store first: Badger's lock says whether another sidecar owns
	// this directory, and only then may sockets left behind be removed.
	if s.store, err = openStore(cfg, log.With("component", "store")); err != nil {
		return nil, err
	}
	s.closed = append(s.closed, func() { closeStore(s.store, storeCloseTimeout, log) })
	if s.hub, err = hub.New(cfg.hubConfig(log.With("component", "hub"))); err != nil {
		return nil, err
	}
	// Closing the hub closes the agent listener it serves (which removes
	// the socket file) and its connections.
	s.closed = append(s.closed, func() { s.hub.Close() })
	if s.mb, err = engine.New(s.store, s.hub, cfg.engineConfig(log.With("component", "engine"))); err != nil {
		return nil, err
	}
	s.hub.SetSubmitter(s.mb)
	if err := serveLive(s.store, s.mb); err != nil {
		return nil, err
	}

	agentLn, err := listenUnix(cfg.AgentSocket, log)
	if err != nil {
		return nil, fmt.Errorf("agent socket: %w", err)
	}
	s.serve("agent socket", func() error { return s.hub.Serve(agentLn) }, hub.ErrClosed)
	if s.agentSock, err = os.Stat(cfg.AgentSocket); err != nil {
		return nil, fmt.Errorf("agent socket: %w", err)
	}
	s.agentPath = cfg.AgentSocket
	s.agentReady.Store(true)

	s.px, err = proxy.New(proxy.Config{
		Mailbox:      s.mb,
		Ready:        s.readiness,
		Live:         func() error { return s.mb.Alive(time.Now(), liveStall) },
		Metrics:      s.metricSets(),
		MaxBody:      int(cfg.MaxBody),
		MaxBodyTotal: int64(cfg.MaxBodyTotal),
		MaxConns:     cfg.MaxConns,
		AuthToken:    cfg.AuthToken,
		Logger:       log.With("component", "api"),
	})
	if err != nil {
		return nil, err
	}
	// Shutting the API server down closes every listener it serves (and
	// one it is handed later), so the API socket file goes too.
	s.closed = append(s.closed, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.px.Shutdown(ctx); err != nil {
			log.Warn("API shutdown", "err", err)
		}
	})
	apiLn, err := listenUnix(cfg.APISocket, log)
	if err != nil {
		return nil, fmt.Errorf("API socket: %w", err)
	}
	s.serve("API socket", func() error { return s.px.ServeAPI(apiLn) }, nil)
	// The log names the addresses bound, not the ones asked for: with
	// port 0 the kernel picks one, and only the log tells which (found by
	// review).
	var httpAddr, adminAddr string
	if httpLn != nil {
		httpAddr = httpLn.Addr().String()
		s.serve("TCP API", func() error { return s.px.ServeTCP(httpLn) }, nil)
	}
	if adminLn != nil {
		adminAddr = adminLn.Addr().String()
		s.serve("admin", func() error { return s.px.ServeAdmin(adminLn) }, nil)
	}
	if cfg.ClockSkew != 0 {
		log.Warn("engine clock skewed for testing", "skew", cfg.ClockSkew)
	}
	v, c := versionInfo()
	log.Info("sidecar listening", append([]any{"version", v, "commit", c, "api_socket", cfg.APISocket, "agent_socket", cfg.AgentSocket,
		"http_addr", httpAddr, "admin_addr", adminAddr, "gomaxprocs", runtime.GOMAXPROCS(0)}, cfg.storeDescription()...)...)
	return s, nil
}

// recover runs startup recovery and starts the engine's loops; the
// sidecar is ready when it returns nil. Recovery failing is fatal (fail
// closed): the caller shuts down.
func (s *sidecar) recover(ctx context.Context) error {
	start := time.Now()
	if err := s.mb.Start(ctx); err != nil {
		return fmt.Errorf("startup recovery: %w", err)
	}
	s.recovered.Store(true)
	s.log.Info("ready", "recovery", time.Since(start).Round(time.Millisecond))
	return nil
}

// recoverRetrying is recover, retried with backoff while the store is
// unavailable (a full disk at start): the sidecar stays up and not ready
// instead of exiting into a restart loop. Other failures (a corrupt
// store) are returned at once.
func (s *sidecar) recoverRetrying(ctx context.Context) error {
	backoff := 250 * time.Millisecond
	for {
		err := s.recover(ctx)
		if err == nil || !errors.Is(err, engine.ErrUnavailable) || ctx.Err() != nil {
			return err
		}
		s.log.Warn("startup recovery failed; retrying, not ready meanwhile", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// serve runs a listener's loop on its own goroutine; an error other than
// the expected one at shutdown is reported on s.errs.
func (s *sidecar) serve(name string, run func() error, closedErr error) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		err := run()
		if err == nil || s.shuttingDown.Load() || closedErr != nil && errors.Is(err, closedErr) {
			return
		}
		select {
		case s.errs <- fmt.Errorf("%s: %w", name, err):
		default:
		}
	}()
}

// metricSets are the sets /metrics serves: the engine's, the hub's and,
// when it keeps any (Badger does), the store's.
func (s *sidecar) metricSets() []*metrics.Set {
	sets := []*metrics.Set{s.mb.Metrics(), s.hub.Metrics(), buildInfoSet()}
	if ms, ok := s.store.(interface{ Metrics() *metrics.Set }); ok {
		sets = append(sets, ms.Metrics())
	}
	return sets
}

// buildInfoSet holds mailbox_build_info: 1, labelled with the version,
// commit, Go version and agent protocol (found by review: a dashboard
// could not tell which build a sidecar ran).
func buildInfoSet() *metrics.Set {
	set := metrics.NewSet()
	v, c := versionInfo()
	set.NewGauge(fmt.Sprintf(`mailbox_build_info{version=%q,commit=%q,goversion=%q,protocol="%d"}`, v, c, runtime.Version(), ipc.ProtocolVersion), func() float64 { return 1 })
	return set
}

// readiness is /readyz: recovery done, the store writable, the agent
// socket listening, and not shutting down.
func (s *sidecar) readiness() proxy.Readiness {
	checks := map[string]bool{
		"recovered":         s.recovered.Load(),
		"store_writable":    s.store.Writable() == nil,
		"agent_socket":      s.agentSocketBound(),
		"not_shutting_down": !s.shuttingDown.Load(),
	}
	ready := true
	for _, ok := range checks {
		ready = ready && ok
	}
	return proxy.Readiness{Ready: ready, Checks: checks, AgentConnected: s.hub.Connections() > 0}
}

// agentSocketBound reports whether the agent socket listens at its path:
// bound, and the file there still the one bound (found by review: a
// removed socket file left agents unable to connect while /readyz said
// agent_socket true). A change is logged once.
func (s *sidecar) agentSocketBound() bool {
	if !s.agentReady.Load() {
		return false
	}
	fi, err := os.Stat(s.agentPath)
	ok := err == nil && os.SameFile(fi, s.agentSock)
	if !ok && !s.agentGone.Swap(true) {
		s.log.Error("the agent socket's file is gone or replaced: agents cannot connect; restart the sidecar", "path", s.agentPath, "err", err)
	}
	return ok
}

// shutdown is the staged stop: not ready at once; GOAWAY to agents (no
// new runs are claimed); running runs get grace to finish, the rest are
// cancelled and put back without spending an attempt; the API stops;
// the hub and the store close.
func (s *sidecar) shutdown(grace time.Duration) {
	s.shuttingDown.Store(true)
	s.log.Info("shutting down", "grace", grace)
	s.hub.GoAway("shutdown", "sidecar shutting down")
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := s.mb.Stop(ctx); err != nil {
		s.log.Warn("engine stop", "err", err)
	}
	s.release()
	s.log.Info("stopped")
}

// release closes what was opened, newest first (the API server, the hub,
// the store), and waits for the listener goroutines.
func (s *sidecar) release() {
	for i := len(s.closed) - 1; i >= 0; i-- {
		s.closed[i]()
	}
	s.closed = nil
	s.wg.Wait()
}

// tuneRuntime applies --memory-limit, --gogc and --gomaxprocs to the Go
// runtime, unless the environment's GOMEMLIMIT, GOGC or GOMAXPROCS set
// them already. The default GOGC of 200 lets the heap grow to three times
// what is live before a collection instead of twice: less collection work
// per run (3–5 % of the sidecar's CPU under load, bench/README.md) for
// more memory, which the soft memory limit still bounds.
//
// The default GOMAXPROCS is half of Go's own, at least 2 (gomaxprocs),
// when the sidecar sees all of the host's processors: it shares them
// with the agent it serves, and every idle processor costs the scheduler
// wake-ups and spinning threads looking for work (on earlier two-core
// guests at saturation one processor instead of two cut the sidecar's CPU
// per run by a third to a half; on the thirty-seventh session's guest two
// cost less). But one processor let the store's CPU-bound
// flushes and compactions hold every request back: under a steady load
// two gave p99 latencies 3–9 times lower for about the same CPU per run
// (bench/README.md). Under a CPU limit (Go's default, which
// follows a container's limit, below the processors the process may run
// on) the budget is the sidecar's own, as in a pod where the agent is
// another container with its own limit: Go's default is kept. The
// startup log line "sidecar listening" names the number in use.
//
// GOMAXPROCS or GOGC set to a value the Go runtime does not take (it
// ignores one, as if unset) does not win either: the flag applies, and
// the value is named in a warning (found by review: GOMAXPROCS=abc left
// Go's default of two processors in place of the sidecar's one).
func tuneRuntime(cfg serveConfig, getenv func(string) string, log *slog.Logger) {
	for _, name := range []string{"GOMAXPROCS", "GOGC"} {
		if v := getenv(name); v != "" && !goEnvTaken(name, getenv) {
			log.Warn("the Go runtime ignores this environment value: the flag applies", "env", name, "value", v)
		}
	}
	if !goEnvTaken("GOMAXPROCS", getenv) {
		runtime.SetDefaultGOMAXPROCS() // Go's default, not what an earlier call (a test's sidecar) set
		runtime.GOMAXPROCS(gomaxprocs(cfg.GOMAXPROCS, runtime.GOMAXPROCS(0), runtime.NumCPU()))
	}
	if getenv("GOMEMLIMIT") == "" && cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(int64(cfg.MemoryLimit))
	}
	if !goEnvTaken("GOGC", getenv) && cfg.GOGC != 0 { // 0: a config built without the flags (tests) leaves Go's default
		debug.SetGCPercent(cfg.GOGC)
	}
}

// goEnvTaken tells whether the Go runtime took the environment variable
// name (GOMAXPROCS or GOGC): it is set to a value the runtime parses, a
// positive number for GOMAXPROCS, a number or "off" for GOGC (runtime's
// gomaxprocs and readGOGC). GOMEMLIMIT needs no such check: the runtime
// refuses to start with one it cannot parse.
func goEnvTaken(name string, getenv func(string) string) bool {
	v := getenv(name)
	if v == "" || v[0] == '+' { // the runtime's atoi takes a minus, not a plus
		return false
	}
	n, err := strconv.ParseInt(v, 10, 32)
	if name == "GOGC" {
		return v == "off" || err == nil
	}
	return err == nil && n > 0
}

// gomaxprocs is the number of processors for --gomaxprocs n, given Go's
// default and the processors the process may run on: n itself, or for 0
// Go's default when it is below cpus (a CPU limit: the sidecar's own
// budget), else half of it, at least 2 (at most Go's default). With one
// processor Badger's memtable flushes and compactions, CPU-bound for
// 0.1–0.5 s, held every request goroutine back behind them: the soak's
// p99 was 3–9 times that at two, for about the same CPU per run
// (bench/README.md, the thirty-seventh session).
func gomaxprocs(n, goDefault, cpus int) int {
	if n > 0 {
		return n
	}
	if goDefault < cpus {
		return goDefault
	}
	return min(goDefault, max(2, goDefault/2))
}
