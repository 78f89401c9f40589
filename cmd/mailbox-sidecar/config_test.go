package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestParseServeDefaults(t *testing.T) {
	c, err := parseServe(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.DataDir != "./data" || c.APISocket != "./run/api.sock" || c.AgentSocket != "./run/agent.sock" ||
		c.MaxBody != 4<<20 || c.MaxBodyTotal != 64<<20 || !c.Sync || c.ContextMessages != 500 || c.ContextBytes != 4<<20 ||
		c.EventBuffer != 10000 || c.EventBytes != 32<<20 || c.EventRetention != time.Minute || c.Lease != 30*time.Second ||
		c.SuspendedLease != 10*time.Minute || c.LeaseRenewal != 10*time.Second || c.SweepInterval != 30*time.Second ||
		c.GCInterval != time.Minute || c.GCTTL != 24*time.Hour || c.MaxAttempts != 5 || c.RetryDelay != 250*time.Millisecond ||
		c.MaxRetryDelay != 30*time.Second || c.Heartbeat != 5*time.Second || c.CommandTimeout != 2*time.Second ||
		c.ShutdownGrace != 20*time.Second || c.LogLevel != "info" || c.LogFormat != "text" ||
		c.MemoryLimit != 512<<20 || c.GOGC != 200 || c.GOMAXPROCS != 0 || !c.ReclaimOrphans || c.engineConfig(nil).KeepOrphanedClaims ||
		c.engineConfig(nil).EventRetentionBytes != 256<<20 || c.engineConfig(nil).EventBufferTotalBytes != 256<<20 {
		t.Fatalf("defaults differ from the spec: %+v", c)
	}
}

func TestParseServeFlagsAndEnvironment(t *testing.T) {
	c, err := parseServe(
		[]string{"--lease", "45s", "--max-body=1MiB", "--sync=false"},
		env(map[string]string{
			"MAILBOX_SIDECAR_LEASE":           "99s", // the flag wins
			"MAILBOX_SIDECAR_DATA_DIR":        "/tmp/x",
			"MAILBOX_SIDECAR_CONTEXT_BYTES":   "512KiB",
			"MAILBOX_SIDECAR_LOG_FORMAT":      "json",
			"MAILBOX_SIDECAR_MAX_ATTEMPTS":    "7",
			"MAILBOX_SIDECAR_GOGC":            "300",
			"MAILBOX_SIDECAR_GOMAXPROCS":      "3",
			"MAILBOX_SIDECAR_TEST_CLOCK_SKEW": "-90s",
			"MAILBOX_SIDECAR_RECLAIM_ORPHANS": "false",
		}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.ClockSkew != -90*time.Second {
		t.Fatalf("clock skew %v", c.ClockSkew)
	}
	if now := c.engineConfig(nil).Now(); now > time.Now().Add(-80*time.Second).UnixMilli() {
		t.Fatalf("skewed engine clock reads %d", now)
	}
	if c.ReclaimOrphans || !c.engineConfig(nil).KeepOrphanedClaims {
		t.Fatalf("--reclaim-orphans=false (from the environment) did not reach the engine: %+v", c)
	}
	if c.Lease != 45*time.Second || c.MaxBody != 1<<20 || c.Sync || c.DataDir != "/tmp/x" || c.ContextBytes != 512<<10 || c.LogFormat != "json" || c.MaxAttempts != 7 || c.GOGC != 300 || c.GOMAXPROCS != 3 {
		t.Fatalf("parsed %+v", c)
	}
}

func TestParseServeRejectsBadConfiguration(t *testing.T) {
	cases := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--lease", "soon"}, nil, "invalid value"},
		{[]string{"--lease", "soon"}, nil, "want a duration such as 30s"},
		{[]string{"--context-messages", "many"}, nil, "want a whole number"},
		{[]string{"--sync=perhaps"}, nil, "want true or false"},
		{nil, map[string]string{"MAILBOX_SIDECAR_MAX_ATTEMPTS": "-1"}, "want a whole number, 0 or more"},
		{[]string{"--lease", "-1s"}, nil, "--lease -1s must be positive"},
		{[]string{"--lease", "5s", "--lease-renewal", "10s"}, nil, "--lease-renewal 10s must be shorter than --lease 5s"},
		{[]string{"--lease", "5s", "--suspended-lease", "1s"}, nil, "--suspended-lease 1s must be at least --lease 5s"},
		{[]string{"--retry-delay", "5s", "--max-retry-delay", "1s"}, nil, "--max-retry-delay 1s must be at least --retry-delay 5s"},
		{[]string{"--http-addr", ":8080"}, nil, "needs --auth-token"},
		{[]string{"--http-addr", ":8080", "--auth-token", "short"}, nil, "at least 16"},
		{[]string{"--max-body", "lots"}, nil, "not a size"},
		{[]string{"--max-body", "64MiB"}, nil, "above the agent frame limit"},
		{[]string{"--max-body", "8MiB", "--max-body-total", "4MiB"}, nil, "--max-body-total 4MiB is below --max-body 8MiB"},
		{[]string{"--max-conns", "0"}, nil, "--max-conns 0 is below 1"},
		{nil, map[string]string{"MAILBOX_SIDECAR_MAX_AGENT_CONNS": "-3"}, "--max-agent-conns -3 is below 1"},
		{nil, map[string]string{"MAILBOX_SIDECAR_MAX_BODY_TOTAL": "1MiB"}, "--max-body-total 1MiB is below --max-body 4MiB"},
		{[]string{"--admin-addr", "notaddr"}, nil, "--admin-addr \"notaddr\""},
		{[]string{"--admin-addr", "127.0.0.1:99999"}, nil, "out of range"},
		{[]string{"--http-addr", "127.0.0.1:nosuchservice", "--auth-token", "0123456789abcdef"}, nil, "--http-addr"},
		{[]string{"--api-socket", "/tmp/" + strings.Repeat("s", 120)}, nil, "limited to 107"},
		{[]string{"--api-socket", "a.sock", "--agent-socket", "a.sock"}, nil, "both"},
		{[]string{"--log-level", "loud"}, nil, "--log-level"},
		{[]string{"--log-format", "xml"}, nil, "--log-format"},
		{[]string{"--max-attempts", "0"}, nil, "--max-attempts"},
		{[]string{"--event-buffer-bytes", "100"}, nil, "--event-buffer-bytes 100 is below 1KiB"},
		{[]string{"--event-retention-bytes", "1000"}, nil, "--event-retention-bytes 1000 is below 1MiB"},
		{[]string{"--event-buffer-total-bytes", "1000"}, nil, "--event-buffer-total-bytes 1000 is below 1MiB"},
		{[]string{"--gogc", "0"}, nil, "--gogc 0 must be positive"},
		{[]string{"--gomaxprocs", "-2"}, nil, "--gomaxprocs -2 must be positive, or 0"},
		{[]string{"--gogc", "-1", "--memory-limit", "0"}, nil, "needs a memory limit"},
		{[]string{"--gogc", "-1"}, map[string]string{"GOMEMLIMIT": "off"}, "needs a memory limit"},
		{[]string{"--heartbeat", "1ms"}, nil, "below 10ms"},
		{[]string{"--memory-limit", "1"}, nil, "--memory-limit 1 is below 128MiB"},
		{nil, map[string]string{"MAILBOX_SIDECAR_MEMORY_LIMIT": "100MiB"}, "--memory-limit 100MiB is below 128MiB"},
		{[]string{"extra"}, nil, "no arguments"},
		{nil, map[string]string{"MAILBOX_SIDECAR_GC_TTL": "forever"}, "MAILBOX_SIDECAR_GC_TTL"},
		{nil, map[string]string{"MAILBOX_SIDECAR_SYNC": "perhaps"}, "MAILBOX_SIDECAR_SYNC"},
		{nil, map[string]string{"MAILBOX_SIDECAR_TEST_CLOCK_SKEW": "later"}, "TEST_CLOCK_SKEW"},
	}
	for _, tc := range cases {
		_, err := parseServe(tc.args, env(tc.env), io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v %v: error %v, want it to mention %q", tc.args, tc.env, err, tc.want)
		}
	}
	// The rules between flags are listed beside the others, in the flags'
	// names (found by review: only once every other problem was gone, as
	// "RenewInterval 10s must be shorter than Lease 6s").
	_, err := parseServe([]string{"--lease", "6s", "--log-format", "yaml"}, env(nil), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--log-format") || !strings.Contains(err.Error(), "--lease-renewal 10s must be shorter than --lease 6s") {
		t.Errorf("two problems: %v; want both listed", err)
	}
	// A value that does not parse is named once, with where the flags are
	// listed, not followed by all of them.
	var usage strings.Builder
	if _, err := parseServe([]string{"--lease", "soon"}, env(nil), &usage); err == nil || !strings.Contains(err.Error(), "serve -h") || usage.Len() != 0 {
		t.Errorf("a value that does not parse: %v, and %d bytes printed; want the error naming -h and nothing printed", err, usage.Len())
	}
	usage.Reset()
	if _, err := parseServe([]string{"-h"}, env(nil), &usage); !errors.Is(err, flag.ErrHelp) || !strings.Contains(usage.String(), "-lease-renewal") {
		t.Errorf("-h: %v, printed %q; want the flags", err, usage.String())
	}
	// The collector may be off while a limit is in effect, from the flag
	// or from GOMEMLIMIT.
	for _, e := range []map[string]string{nil, {"GOMEMLIMIT": "1GiB", "MAILBOX_SIDECAR_MEMORY_LIMIT": "0"}} {
		if _, err := parseServe([]string{"--gogc", "-1"}, env(e), io.Discard); err != nil {
			t.Errorf("--gogc -1 with %v: %v", e, err)
		}
	}
	// A value that did not parse is reported alone, not also as the zero
	// it left behind (found by review).
	if _, err := parseServe(nil, env(map[string]string{"MAILBOX_SIDECAR_LEASE": "abc"}), io.Discard); err == nil ||
		!strings.Contains(err.Error(), `MAILBOX_SIDECAR_LEASE="abc"`) || strings.Contains(err.Error(), "must be positive") {
		t.Errorf("a lease that does not parse: %v", err)
	}
	// Every problem is reported at once.
	_, err = parseServe([]string{"--lease", "0s", "--log-format", "xml"}, env(nil), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--lease") || !strings.Contains(err.Error(), "--log-format") {
		t.Fatalf("combined errors: %v", err)
	}
}

func TestByteSizes(t *testing.T) {
	for in, want := range map[string]int64{"4MiB": 4 << 20, "512KiB": 512 << 10, "1GiB": 1 << 30, "4096": 4096, "2MB": 2e6, "16M": 16 << 20, "10B": 10} {
		if got, err := parseBytes(in); err != nil || got != want {
			t.Errorf("parseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "1.5MiB", "MiB", "9999999999GiB"} {
		if _, err := parseBytes(in); err == nil {
			t.Errorf("parseBytes(%q) accepted", in)
		}
	}
	if s := formatBytes(4 << 20); s != "4MiB" {
		t.Errorf("formatBytes = %s", s)
	}
}

func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "sc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestListenUnixStaleLiveAndForeignFiles(t *testing.T) {
	dir := shortDir(t)
	log := slog.New(slog.DiscardHandler)
	path := filepath.Join(dir, "sub", "a.sock")

	// A fresh path: directories created, socket mode 0660.
	ln, err := listenUnix(path, log)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v", fi.Mode().Perm())
	}
	// A live listener is refused.
	if _, err := listenUnix(path, log); err == nil || !strings.Contains(err.Error(), "another sidecar holds") {
		t.Fatalf("second listen on a live socket: %v", err)
	}
	// A stale socket file (its process gone without unlinking) is replaced.
	abandon(ln)
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket file missing: %v", err)
	}
	ln2, err := listenUnix(path, log)
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	ln2.Close()
	// A regular file is never removed.
	file := filepath.Join(dir, "not-a-socket")
	os.WriteFile(file, []byte("keep me"), 0o600)
	if _, err := listenUnix(file, log); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "keep me" {
		t.Fatal("regular file touched")
	}
}

func TestRunUsageAndVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run(nil, env(nil), &out, &errb); code != 2 || !strings.Contains(errb.String(), "usage") {
		t.Fatalf("no command: %d %q", code, errb.String())
	}
	errb.Reset()
	if code := run([]string{"frobnicate"}, env(nil), &out, &errb); code != 2 || !strings.Contains(errb.String(), "unknown command") {
		t.Fatalf("unknown command: %d %q", code, errb.String())
	}
	out.Reset()
	if code := run([]string{"version"}, env(nil), &out, &errb); code != 0 || !strings.Contains(out.String(), "agent protocol 1") || !strings.Contains(out.String(), "go1.") {
		t.Fatalf("version: %d %q", code, out.String())
	}
	errb.Reset()
	if code := run([]string{"version", "--json"}, env(nil), &out, &errb); code != 2 || !strings.Contains(errb.String(), "takes no arguments") {
		t.Fatalf("version with an argument: %d %q; want 2 and the argument refused", code, errb.String())
	}
	errb.Reset()
	if code := run([]string{"serve", "--lease", "0s"}, env(nil), &out, &errb); code != 2 || !strings.Contains(errb.String(), "invalid configuration") {
		t.Fatalf("serve with bad config: %d %q", code, errb.String())
	}
	// Under --log-format json (flag or environment) the problems are one
	// JSON line, as every other line the sidecar logs.
	for _, c := range []struct {
		args []string
		env  map[string]string
	}{
		{[]string{"serve", "--log-format", "json", "--lease", "0s", "--gogc", "0"}, nil},
		{[]string{"serve", "--lease", "soon"}, map[string]string{"MAILBOX_SIDECAR_LOG_FORMAT": "json"}},
	} {
		errb.Reset()
		code := run(c.args, env(c.env), &out, &errb)
		var line struct {
			Level  string   `json:"level"`
			Msg    string   `json:"msg"`
			Errors []string `json:"errors"`
		}
		if err := json.Unmarshal(errb.Bytes(), &line); code != 2 || err != nil || line.Level != "ERROR" || line.Msg != "invalid configuration" || len(line.Errors) == 0 {
			t.Fatalf("%v %v: %d %q (%v); want 2 and one JSON line listing the problems", c.args, c.env, code, errb.String(), err)
		}
		if c.env == nil && len(line.Errors) != 2 {
			t.Fatalf("two problems as %q; want two elements", line.Errors)
		}
	}
	errb.Reset()
	if code := run([]string{"ctl", "show", "dispatch"}, env(nil), &out, &errb); code != 2 {
		t.Fatalf("ctl with a missing argument: %d %q", code, errb.String())
	}
	errb.Reset()
	if code := run([]string{"ctl", "--socket", filepath.Join(shortDir(t), "none.sock"), "check"}, env(nil), &out, &errb); code != 3 {
		t.Fatalf("ctl check without a sidecar: %d %q", code, errb.String())
	}
}

// --gogc and --memory-limit reach the Go runtime, unless the
// environment's GOGC and GOMEMLIMIT set them already.
func TestTuneRuntime(t *testing.T) {
	oldGC, oldLimit := debug.SetGCPercent(100), debug.SetMemoryLimit(math.MaxInt64)
	t.Cleanup(func() { debug.SetGCPercent(oldGC); debug.SetMemoryLimit(oldLimit); runtime.SetDefaultGOMAXPROCS() })
	cfg := serveConfig{GOGC: 250, MemoryLimit: 300 << 20}
	tuneRuntime(cfg, env(nil), discardLog)
	if gc, limit := debug.SetGCPercent(100), debug.SetMemoryLimit(math.MaxInt64); gc != 250 || limit != 300<<20 {
		t.Fatalf("after tuneRuntime: GOGC %d, memory limit %d; want 250 and %d", gc, limit, 300<<20)
	}
	tuneRuntime(cfg, env(map[string]string{"GOGC": "100", "GOMEMLIMIT": "1GiB"}), discardLog)
	if gc, limit := debug.SetGCPercent(100), debug.SetMemoryLimit(math.MaxInt64); gc != 100 || limit != math.MaxInt64 {
		t.Fatalf("with GOGC and GOMEMLIMIT set: GOGC %d, memory limit %d; want both left alone", gc, limit)
	}
	// A GOGC the runtime does not parse it ignores (its default, 100):
	// the flag applies, with a warning naming the value.
	var logged bytes.Buffer
	tuneRuntime(cfg, env(map[string]string{"GOGC": "abc"}), slog.New(slog.NewTextHandler(&logged, nil)))
	if gc := debug.SetGCPercent(100); gc != 250 {
		t.Fatalf("with GOGC=abc: GOGC %d, want --gogc's 250", gc)
	}
	if !strings.Contains(logged.String(), "env=GOGC value=abc") {
		t.Fatalf("with GOGC=abc: no warning naming it, logged %q", logged.String())
	}
	debug.SetMemoryLimit(math.MaxInt64)
	tuneRuntime(cfg, env(map[string]string{"GOGC": "off"}), discardLog)
	if gc := debug.SetGCPercent(100); gc != 100 {
		t.Fatalf("with GOGC=off: GOGC %d, want it left alone", gc)
	}
}

// goEnvTaken follows the runtime: GOMAXPROCS a positive number, GOGC a
// number (negative: off) or "off".
func TestGoEnvTaken(t *testing.T) {
	for _, c := range []struct {
		name, value string
		want        bool
	}{
		{"GOMAXPROCS", "", false}, {"GOMAXPROCS", "3", true}, {"GOMAXPROCS", "0", false}, {"GOMAXPROCS", "-1", false},
		{"GOMAXPROCS", "abc", false}, {"GOMAXPROCS", "+2", false}, {"GOMAXPROCS", "2.5", false},
		{"GOGC", "", false}, {"GOGC", "50", true}, {"GOGC", "off", true}, {"GOGC", "-1", true}, {"GOGC", "abc", false}, {"GOGC", "OFF", false},
	} {
		if got := goEnvTaken(c.name, env(map[string]string{c.name: c.value})); got != c.want {
			t.Errorf("goEnvTaken(%s=%q) = %v, want %v", c.name, c.value, got, c.want)
		}
	}
}

// --gomaxprocs: 0 is half of Go's default (at least 2, at most all) when the process
// sees all the host's processors, Go's default under a CPU limit, computed
// from the default each time (a second sidecar in one process does not halve it
// again); a number is taken as is; GOMAXPROCS in the environment wins.
func TestTuneRuntimeGOMAXPROCS(t *testing.T) {
	t.Cleanup(runtime.SetDefaultGOMAXPROCS)
	runtime.SetDefaultGOMAXPROCS()
	def := runtime.GOMAXPROCS(0)
	for range 2 {
		runtime.GOMAXPROCS(4 * def) // as an earlier sidecar in the process, or anyone, may have left it
		tuneRuntime(serveConfig{}, env(nil), discardLog)
		if got, want := runtime.GOMAXPROCS(0), gomaxprocs(0, def, runtime.NumCPU()); got != want {
			t.Fatalf("--gomaxprocs 0 with Go's default %d: GOMAXPROCS %d, want %d", def, got, want)
		}
	}
	tuneRuntime(serveConfig{GOMAXPROCS: 3}, env(nil), discardLog)
	if got := runtime.GOMAXPROCS(0); got != 3 {
		t.Fatalf("--gomaxprocs 3: GOMAXPROCS %d", got)
	}
	runtime.GOMAXPROCS(5)
	tuneRuntime(serveConfig{GOMAXPROCS: 3}, env(map[string]string{"GOMAXPROCS": "5"}), discardLog)
	if got := runtime.GOMAXPROCS(0); got != 5 {
		t.Fatalf("with GOMAXPROCS=5 in the environment: GOMAXPROCS %d, want it left alone", got)
	}
	tuneRuntime(serveConfig{GOMAXPROCS: 3}, env(map[string]string{"GOMAXPROCS": "abc"}), discardLog)
	if got := runtime.GOMAXPROCS(0); got != 3 {
		t.Fatalf("with GOMAXPROCS=abc in the environment (the runtime ignores it): GOMAXPROCS %d, want --gomaxprocs's 3", got)
	}
	for _, c := range []struct{ n, def, cpus, want int }{
		{0, 1, 1, 1}, {0, 2, 2, 2}, {0, 3, 3, 2}, {0, 4, 4, 2}, {0, 8, 8, 4}, {0, 64, 64, 32}, // the whole host: half, at least 2
		{0, 2, 64, 2}, {0, 1, 8, 1}, {0, 6, 8, 6}, // a CPU limit below the host's processors: Go's default
		{2, 1, 1, 2}, {7, 64, 64, 7}, {3, 2, 64, 3}, // set
	} {
		if got := gomaxprocs(c.n, c.def, c.cpus); got != c.want {
			t.Errorf("gomaxprocs(%d, %d, %d cpus) = %d, want %d", c.n, c.def, c.cpus, got, c.want)
		}
	}
}

// JSON logs write durations as Go does ("1.5s"), as the text format
// does, not as bare nanoseconds under keys without a unit (found by
// review).
func TestJSONLogsWriteDurationsWithTheirUnit(t *testing.T) {
	var b bytes.Buffer
	newLogger(&b, "info", "json").Info("draining", "grace", 20*time.Second, "n", 3)
	if !strings.Contains(b.String(), `"grace":"20s"`) || !strings.Contains(b.String(), `"n":3`) {
		t.Fatalf("JSON log line %s; want grace as \"20s\" and n as 3", b.String())
	}
}

// discardLog is a logger for calls whose logs a test does not read.
var discardLog = slog.New(slog.DiscardHandler)

// The memory budgets the operator did not set fit the memory limit; those
// set on the command line or in the environment stay as set.
func TestBudgetsFitTheMemoryLimit(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		args               []string
		env                map[string]string
		limit              int64
		live, kept, bodies int64
		fitted             int // flags lowered (and logged)
	}{
		{nil, nil, 512 * mib, 128 * mib, 128 * mib, 64 * mib, 2},
		{nil, nil, 384 * mib, 96 * mib, 96 * mib, 48 * mib, 3},
		{nil, nil, 0, 256 * mib, 256 * mib, 64 * mib, 0},
		{nil, nil, 4096 * mib, 256 * mib, 256 * mib, 64 * mib, 0}, // never raised
		{[]string{"--event-retention-bytes", "200MiB"}, map[string]string{"MAILBOX_SIDECAR_MAX_BODY_TOTAL": "100MiB"}, 384 * mib, 96 * mib, 200 * mib, 100 * mib, 1},
		{[]string{"--max-body", "16MiB"}, nil, 128 * mib, 32 * mib, 32 * mib, 16 * mib, 3}, // at least --max-body
	}
	for _, tc := range cases {
		c, err := parseServe(tc.args, env(tc.env), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		fitted := c.fitBudgets(tc.limit)
		if int64(c.EventLiveBytes) != tc.live || int64(c.EventKeptBytes) != tc.kept || int64(c.MaxBodyTotal) != tc.bodies || len(fitted) != 2*tc.fitted {
			t.Errorf("%v %v, limit %d MiB: %s, %s, %s, fitted %v; want %d, %d, %d MiB, %d fitted", tc.args, tc.env, tc.limit/mib,
				c.EventLiveBytes.String(), c.EventKeptBytes.String(), c.MaxBodyTotal.String(), fitted, tc.live/mib, tc.kept/mib, tc.bodies/mib, tc.fitted)
		}
		if errs := c.validate(); len(errs) > 0 {
			t.Errorf("%v, limit %d MiB: fitted budgets do not validate: %v", tc.args, tc.limit/mib, errs)
		}
	}
}
