package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// envPrefix prefixes the environment variable of every serve flag:
// --data-dir reads MAILBOX_SIDECAR_DATA_DIR. A flag on the command line
// wins over its variable.
const envPrefix = "MAILBOX_SIDECAR_"

// maxSocketPath is the longest path a Unix socket address takes on Linux
// (sun_path is 108 bytes including the terminating NUL).
const maxSocketPath = 107

// serveConfig is everything `serve` is configured with.
type serveConfig struct {
	// Store selects the store: "" or "badger", or NATS server URLs
	// (store.go); the NATS fields configure the NATS store.
	Store           string
	NATSCreds       string
	NATSUser        string
	NATSPassword    string
	NATSToken       string
	NATSStream      string
	NATSPrefix      string
	NATSReplicas    int
	ConsumerID      string
	DataDir         string
	APISocket       string
	AgentSocket     string
	HTTPAddr        string
	AdminAddr       string
	MaxBody         byteSize
	MaxBodyTotal    byteSize
	MaxConns        int
	MaxAgentConns   int
	MaxQueued       int64
	Sync            bool
	ContextMessages int
	ContextBytes    byteSize
	EventBuffer     int
	EventBytes      byteSize
	EventRetention  time.Duration
	EventKeptBytes  byteSize
	EventLiveBytes  byteSize
	AuthToken       string
	Lease           time.Duration
	ReclaimOrphans  bool
	SuspendedLease  time.Duration
	LeaseRenewal    time.Duration
	SweepInterval   time.Duration
	GCInterval      time.Duration
	GCTTL           time.Duration
	MaxAttempts     uint
	RetryDelay      time.Duration
	MaxRetryDelay   time.Duration
	Heartbeat       time.Duration
	CommandTimeout  time.Duration
	ShutdownGrace   time.Duration
	LogLevel        string
	LogFormat       string
	MemoryLimit     byteSize
	GOGC            int
	GOMAXPROCS      int
	// ClockSkew shifts the engine's clock (leases, due times, records):
	// a fault-injection hook for tests of clock jumps, set only by the
	// MAILBOX_SIDECAR_TEST_CLOCK_SKEW variable, never by a flag.
	ClockSkew time.Duration
	// explicit names the flags set on the command line or in the
	// environment (parseServe): fitBudgets leaves them as they are.
	explicit map[string]bool
}

// fitBudgets lowers the defaults of the memory budgets the operator did
// not set to fit limit, the Go runtime's soft memory limit (0: none):
// --event-buffer-total-bytes and --event-retention-bytes to a quarter of
// it (at least 1MiB), --max-body-total to an eighth (at least
// --max-body). At the default limit, 512MiB, that is 128MiB, 128MiB and
// 64MiB; a sidecar given a smaller limit for a smaller container gets
// smaller budgets, where it used to keep 256MiB, 256MiB and 64MiB. It
// returns what it changed, as log attributes.
func (c *serveConfig) fitBudgets(limit int64) []any {
	if limit <= 0 || limit == math.MaxInt64 {
		return nil
	}
	var fitted []any
	fit := func(name string, v *byteSize, want int64) {
		if !c.explicit[name] && int64(*v) > want {
			*v = byteSize(want)
			fitted = append(fitted, name, v.String())
		}
	}
	fit("event-buffer-total-bytes", &c.EventLiveBytes, max(limit/4, 1<<20))
	fit("event-retention-bytes", &c.EventKeptBytes, max(limit/4, 1<<20))
	fit("max-body-total", &c.MaxBodyTotal, max(limit/8, int64(c.MaxBody)))
	return fitted
}

// byteSize is a flag value in bytes written as 4MiB, 512KiB, 1GB or 4096.
type byteSize int64

func (b *byteSize) String() string { return formatBytes(int64(*b)) }

func (b *byteSize) Set(s string) error {
	n, err := parseBytes(s)
	if err != nil {
		return err
	}
	*b = byteSize(n)
	return nil
}

var byteUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
}

func parseBytes(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range byteUnits {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size (examples: 4MiB, 512KiB, 4096)", s)
	}
	return n * mult, nil
}

func formatBytes(n int64) string {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.mult && n%u.mult == 0 {
			return strconv.FormatInt(n/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// serveFlags declares the serve flags on fs with their defaults.
func serveFlags(fs *flag.FlagSet, c *serveConfig) {
	*c = serveConfig{MaxBody: 4 << 20, MaxBodyTotal: proxy.DefaultMaxBodyTotal, ContextBytes: 4 << 20, EventBytes: engine.DefaultEventBufferBytes, EventKeptBytes: engine.DefaultEventRetentionBytes, EventLiveBytes: engine.DefaultEventBufferTotalBytes, MemoryLimit: 512 << 20}
	storeFlags(fs, c)
	fs.StringVar(&c.DataDir, "data-dir", "./data", "Badger data directory (created if absent; a second sidecar on it is refused); not used with --store nats://")
	fs.StringVar(&c.APISocket, "api-socket", "./run/api.sock", "client API socket")
	fs.StringVar(&c.AgentSocket, "agent-socket", "./run/agent.sock", "agent protocol socket")
	fs.StringVar(&c.HTTPAddr, "http-addr", "", "optional TCP listener for the client API (requires --auth-token)")
	fs.StringVar(&c.AdminAddr, "admin-addr", "", "TCP listener for /metrics, /livez, /readyz and /healthz only")
	fs.Var(&c.MaxBody, "max-body", "largest accepted request body")
	fs.Var(&c.MaxBodyTotal, "max-body-total", "bytes of request bodies over 16KiB read and handled at once (at least --max-body); past it a request waits up to 10s for room, then gets 503 (unset: at most an eighth of the memory limit)")
	fs.IntVar(&c.MaxConns, "max-conns", proxy.DefaultMaxConns, "most connections each client API listener (socket, --http-addr) keeps open at once, streams and idle ones included; past it a new one gets 503 and is closed")
	fs.IntVar(&c.MaxAgentConns, "max-agent-conns", hub.DefaultMaxConns, "most agent connections open at once; past it a new one gets ERROR busy and is closed")
	fs.BoolVar(&c.Sync, "sync", true, "fsync before acknowledging (false trades the last moments of acknowledged work on power loss for throughput); Badger only")
	fs.IntVar(&c.ContextMessages, "context-messages", 500, "most thread messages sent with each RUN")
	fs.Var(&c.ContextBytes, "context-bytes", "most bytes of thread messages sent with each RUN")
	fs.IntVar(&c.EventBuffer, "event-buffer", 10000, "events buffered per run for re-attachment")
	fs.Var(&c.EventBytes, "event-buffer-bytes", "bytes of events buffered per run for re-attachment (the newest event is always kept)")
	fs.Var(&c.EventLiveBytes, "event-buffer-total-bytes", "bytes of events the running runs keep together; past it a run's growing buffer drops its oldest events down to 64KiB (unset: at most a quarter of the memory limit)")
	fs.DurationVar(&c.EventRetention, "event-retention", 60*time.Second, "how long a finished run's events stay re-attachable")
	fs.Var(&c.EventKeptBytes, "event-retention-bytes", "bytes of events the finished runs of all threads keep for re-attachment; past it those that finished first are forgotten before --event-retention (unset: at most a quarter of the memory limit)")
	fs.StringVar(&c.AuthToken, "auth-token", "", "bearer token required on the TCP API listener")
	fs.DurationVar(&c.Lease, "lease", 30*time.Second, "dispatch lease")
	fs.DurationVar(&c.SuspendedLease, "suspended-lease", 10*time.Minute, "lease while the run waits on a suspended tool call")
	fs.DurationVar(&c.LeaseRenewal, "lease-renewal", 10*time.Second, "lease renewal interval")
	fs.BoolVar(&c.ReclaimOrphans, "reclaim-orphans", true, "at start, reclaim at once the runs a killed sidecar left claimed in --data-dir (false: they wait for their leases to lapse, as on NATS); Badger only")
	fs.DurationVar(&c.SweepInterval, "sweep-interval", 30*time.Second, "expired-lease reclaim and reconciliation interval")
	fs.DurationVar(&c.GCInterval, "gc-interval", 60*time.Second, "purge interval of terminal dispatches and idle workers")
	fs.DurationVar(&c.GCTTL, "gc-ttl", 24*time.Hour, "age after which terminal dispatches are purged")
	fs.UintVar(&c.MaxAttempts, "max-attempts", 5, "attempts before dead-lettering")
	fs.Int64Var(&c.MaxQueued, "max-queued", 0, "most dispatches waiting in the queue; past it a background submit gets 503 (an agent's SUBMIT: unavailable); foreground submits and messages are not refused. 0: no bound")
	fs.DurationVar(&c.RetryDelay, "retry-delay", 250*time.Millisecond, "base of the exponential retry backoff")
	fs.DurationVar(&c.MaxRetryDelay, "max-retry-delay", 30*time.Second, "cap of the retry backoff")
	fs.DurationVar(&c.Heartbeat, "heartbeat", 5*time.Second, "agent-socket heartbeat; a peer silent for 3x is dead")
	fs.DurationVar(&c.CommandTimeout, "command-timeout", 2*time.Second, "how long a live command waits for the agent's COMMAND_ACK")
	fs.DurationVar(&c.ShutdownGrace, "shutdown-grace", 20*time.Second, "how long SIGTERM waits for running runs before putting them back in the queue")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
	fs.Var(&c.MemoryLimit, "memory-limit", "soft memory limit of the Go runtime (GOMEMLIMIT, when set, wins); 0 turns it off")
	fs.IntVar(&c.GOGC, "gogc", 200, "Go garbage collector target percentage (GOGC, when set, wins); -1 turns the collector off below the memory limit")
	fs.IntVar(&c.GOMAXPROCS, "gomaxprocs", 0, "processors the Go scheduler uses (GOMAXPROCS, when set, wins); 0: Go's default under a CPU limit (a container's), else half of it, at least 2")
}

// parseServe reads the serve flags from args and the environment and
// validates them. Every problem is reported, not only the first (but a
// value from the environment that does not parse stops the checks: the
// others would see the zero it left).
func parseServe(args []string, getenv func(string) string, stderr io.Writer) (serveConfig, error) {
	var c serveConfig
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	// The flag package prints a parse error and then every flag (some 70
	// lines) before the caller prints the error again (found by review):
	// only -h prints the flags; an error names -h.
	fs.SetOutput(io.Discard)
	serveFlags(fs, &c)
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stderr)
		fmt.Fprintln(stderr, "usage: mailbox-sidecar serve [flags]")
		fs.PrintDefaults()
		return c, err
	} else if err != nil {
		return c, fmt.Errorf("%w (mailbox-sidecar serve -h lists the flags)", hintParseError(fs, err))
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("serve takes no arguments, got %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		name := envPrefix + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v := getenv(name); v != "" {
			set[f.Name] = true
			if err := f.Value.Set(v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %v%s", name, v, err, valueHint(f)))
			}
		}
	})
	c.explicit = set
	if v := getenv(envPrefix + "TEST_CLOCK_SKEW"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%sTEST_CLOCK_SKEW=%q: %v", envPrefix, v, err))
		}
		c.ClockSkew = d
	}
	if len(errs) > 0 {
		// A value that did not parse left its flag at zero: checking it
		// would add a second, misleading error (found by review:
		// "--lease 0s must be positive" after the lease that did not parse).
		return c, errors.Join(errs...)
	}
	if c.ConsumerID == "" {
		c.ConsumerID = defaultConsumerID()
	}
	errs = append(errs, c.validate()...)
	// The collector off needs a limit in effect: the environment's
	// GOMEMLIMIT wins over --memory-limit (tuneRuntime).
	if c.GOGC == -1 && !goEnvTaken("GOGC", getenv) {
		limited := c.MemoryLimit > 0
		if v := strings.TrimSpace(getenv("GOMEMLIMIT")); v != "" {
			limited = v != "off"
		}
		if !limited {
			errs = append(errs, errors.New("--gogc -1 needs a memory limit (--memory-limit, or GOMEMLIMIT): without one the heap grows without bound"))
		}
	}
	return c, errors.Join(errs...)
}

// minMemoryLimit is the lowest --memory-limit other than 0 (off).
const minMemoryLimit = 128 << 20

// validate checks everything that can be checked without opening a file
// or a socket.
func (c *serveConfig) validate() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	errs = append(errs, c.validateStore()...)
	for name, path := range map[string]string{"--api-socket": c.APISocket, "--agent-socket": c.AgentSocket} {
		switch {
		case strings.TrimSpace(path) == "":
			bad("%s must not be empty", name)
		case len(path) > maxSocketPath:
			bad("%s %q is %d bytes; Unix socket paths are limited to %d", name, path, len(path), maxSocketPath)
		}
	}
	if c.APISocket == c.AgentSocket {
		bad("--api-socket and --agent-socket are both %q", c.APISocket)
	}
	// Checked here, not first at the listen after the store is open:
	// a bad address exited 1 having made the data directory (found by
	// review).
	for _, a := range []struct{ name, addr string }{{"--http-addr", c.HTTPAddr}, {"--admin-addr", c.AdminAddr}} {
		if a.addr != "" {
			if err := checkTCPAddr(a.addr); err != nil {
				bad("%s %q: %v", a.name, a.addr, err)
			}
		}
	}
	if c.HTTPAddr != "" && c.AuthToken == "" {
		bad("--http-addr %q needs --auth-token: the TCP API is never served without a bearer token", c.HTTPAddr)
	}
	if c.AuthToken != "" && len(c.AuthToken) < 16 {
		bad("--auth-token is %d characters; use at least 16", len(c.AuthToken))
	}
	if c.MaxBody < 1<<10 {
		bad("--max-body %s is below 1KiB", c.MaxBody.String())
	}
	if c.MaxBody > ipc.DefaultMaxFrame {
		// Such a body was taken (202) and dead-lettered at once: its RUN
		// cannot reach the agent (found by review).
		bad("--max-body %s is above the agent frame limit (16MiB): a run made from a larger body could never reach the agent", c.MaxBody.String())
	}
	if c.MaxQueued < 0 {
		bad("--max-queued %d is negative", c.MaxQueued)
	}
	if c.MaxConns < 1 {
		bad("--max-conns %d is below 1", c.MaxConns)
	}
	if c.MaxAgentConns < 1 {
		bad("--max-agent-conns %d is below 1", c.MaxAgentConns)
	}
	if c.MaxBodyTotal < c.MaxBody {
		bad("--max-body-total %s is below --max-body %s: the largest body could never be read", c.MaxBodyTotal.String(), c.MaxBody.String())
	}
	if c.ContextBytes < 1<<10 {
		bad("--context-bytes %s is below 1KiB", c.ContextBytes.String())
	}
	if c.ContextMessages < 1 {
		bad("--context-messages %d must be at least 1", c.ContextMessages)
	}
	if c.EventLiveBytes < 1<<20 {
		bad("--event-buffer-total-bytes %s is below 1MiB", c.EventLiveBytes.String())
	}
	if c.EventKeptBytes < 1<<20 {
		bad("--event-retention-bytes %s is below 1MiB", c.EventKeptBytes.String())
	}
	if c.EventBytes < 1<<10 {
		bad("--event-buffer-bytes %s is below 1KiB", c.EventBytes.String())
	}
	if c.EventBuffer < 1 {
		bad("--event-buffer %d must be at least 1", c.EventBuffer)
	}
	if c.MaxAttempts < 1 || c.MaxAttempts > 1000 {
		bad("--max-attempts %d must be between 1 and 1000", c.MaxAttempts)
	}
	if c.MemoryLimit > 0 && c.MemoryLimit < minMemoryLimit {
		// 1 byte was taken (found by review), and the collector then ran
		// without pause: a Badger store alone keeps about 64MiB (two
		// memtables, the block and index caches).
		bad("--memory-limit %s is below %s: the collector would run almost without pause (a Badger store alone keeps about 64MiB); 0 turns the limit off", c.MemoryLimit.String(), formatBytes(minMemoryLimit))
	}
	if c.GOGC < 1 && c.GOGC != -1 {
		bad("--gogc %d must be positive, or -1 (off)", c.GOGC)
	}
	if c.GOMAXPROCS < 0 {
		bad("--gomaxprocs %d must be positive, or 0 (the default)", c.GOMAXPROCS)
	}
	for name, d := range map[string]time.Duration{
		"--lease": c.Lease, "--suspended-lease": c.SuspendedLease, "--lease-renewal": c.LeaseRenewal,
		"--sweep-interval": c.SweepInterval, "--gc-interval": c.GCInterval, "--gc-ttl": c.GCTTL,
		"--retry-delay": c.RetryDelay, "--max-retry-delay": c.MaxRetryDelay, "--heartbeat": c.Heartbeat,
		"--command-timeout": c.CommandTimeout, "--event-retention": c.EventRetention,
	} {
		if d <= 0 {
			bad("%s %v must be positive", name, d)
		}
	}
	// The engine's rules between durations, in the flags' names (found by
	// review: they came as "RenewInterval 10s must be shorter than Lease
	// 6s", and only once every other problem was gone).
	if c.Lease > 0 && c.LeaseRenewal >= c.Lease {
		bad("--lease-renewal %v must be shorter than --lease %v", c.LeaseRenewal, c.Lease)
	}
	if c.Lease > 0 && c.SuspendedLease > 0 && c.SuspendedLease < c.Lease {
		bad("--suspended-lease %v must be at least --lease %v", c.SuspendedLease, c.Lease)
	}
	if c.RetryDelay > 0 && c.MaxRetryDelay > 0 && c.MaxRetryDelay < c.RetryDelay {
		bad("--max-retry-delay %v must be at least --retry-delay %v", c.MaxRetryDelay, c.RetryDelay)
	}
	if c.ShutdownGrace < 0 {
		bad("--shutdown-grace %v must not be negative", c.ShutdownGrace)
	}
	if c.Heartbeat > 0 && c.Heartbeat < 10*time.Millisecond {
		bad("--heartbeat %v is below 10ms", c.Heartbeat)
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		errs = append(errs, err)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		bad("--log-format %q must be text or json", c.LogFormat)
	}
	if len(errs) == 0 {
		// The engine's own rules (renewal shorter than the lease …).
		if err := c.engineConfig(nil).Validate(); err != nil {
			errs = append(errs, fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "validation: ")))
		}
		if _, err := hub.New(c.hubConfig(nil)); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level %q must be debug, info, warn or error", s)
	}
	return l, nil
}

// engineConfig is the engine's configuration.
func (c *serveConfig) engineConfig(log *slog.Logger) engine.Config {
	return engine.Config{
		Lease: c.Lease, SuspendedLease: c.SuspendedLease, RenewInterval: c.LeaseRenewal,
		SweepInterval: c.SweepInterval, GCInterval: c.GCInterval, GCTTL: c.GCTTL,
		MaxAttempts: uint32(c.MaxAttempts), MaxQueued: c.MaxQueued, RetryDelay: c.RetryDelay, MaxRetryDelay: c.MaxRetryDelay,
		CommandTimeout: c.CommandTimeout, EventBuffer: c.EventBuffer, EventBufferBytes: int64(c.EventBytes), EventBufferTotalBytes: int64(c.EventLiveBytes), EventRetention: c.EventRetention, EventRetentionBytes: int64(c.EventKeptBytes),
		ContextMessages: c.ContextMessages, ContextBytes: int(c.ContextBytes),
		ConsumerID: c.ConsumerID, Logger: log, Now: skewedClock(c.ClockSkew),
		KeepOrphanedClaims: !c.ReclaimOrphans,
	}
}

// skewedClock is the engine's clock shifted by skew (nil: the default
// clock).
func skewedClock(skew time.Duration) func() int64 {
	if skew == 0 {
		return nil
	}
	return func() int64 { return time.Now().Add(skew).UnixMilli() }
}

// hubConfig is the agent hub's configuration.
func (c *serveConfig) hubConfig(log *slog.Logger) hub.Config {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return hub.Config{Heartbeat: c.Heartbeat, CommandTimeout: c.CommandTimeout, MaxConns: c.MaxAgentConns, Logger: log}
}

// newLogger builds the process logger.
func newLogger(w io.Writer, level, format string) *slog.Logger {
	l, _ := parseLevel(level)
	opts := &slog.HandlerOptions{Level: l}
	if format == "json" {
		// Durations as Go writes them ("1.5s"), as the text format does:
		// JSON had bare nanoseconds under keys without a unit (found by
		// review: "grace":20000000000).
		opts.ReplaceAttr = func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() == slog.KindDuration {
				a.Value = slog.StringValue(a.Value.Duration().String())
			}
			return a
		}
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// checkTCPAddr checks a listen address (host:port; the host may be empty,
// the port a number up to 65535 or a service name) without listening.
func checkTCPAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if n, err := strconv.Atoi(port); err == nil {
		if n < 0 || n > 65535 {
			return fmt.Errorf("port %d is out of range", n)
		}
		return nil
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("port %q: %w", port, err)
	}
	return nil
}

// valueHint says what a value of flag f looks like, for a parse error:
// the flag package's own says "parse error" alone (found by review).
func valueHint(f *flag.Flag) string {
	g, ok := f.Value.(flag.Getter)
	if !ok {
		return ""
	}
	switch g.Get().(type) {
	case time.Duration:
		return "; want a duration such as 30s, 500ms or 1h30m"
	case bool:
		return "; want true or false"
	case int:
		return "; want a whole number"
	case uint:
		return "; want a whole number, 0 or more"
	}
	return ""
}

// hintParseError adds valueHint to the flag package's error for a value
// that did not parse ("invalid value … for flag -NAME: …", or "for
// -NAME" for a bool).
func hintParseError(fs *flag.FlagSet, err error) error {
	_, rest, ok := strings.Cut(err.Error(), " for flag -")
	if !ok {
		// A bool's: "invalid boolean value … for -NAME: …".
		if _, rest, ok = strings.Cut(err.Error(), " for -"); !ok {
			return err
		}
	}
	name, _, ok := strings.Cut(rest, ":")
	if f := fs.Lookup(name); ok && f != nil {
		if h := valueHint(f); h != "" {
			return fmt.Errorf("%w%s", err, h)
		}
	}
	return err
}
