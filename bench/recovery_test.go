// Package bench holds the sidecar's end-to-end benchmarks: the real
// binary, real sockets, real agents. Figures and the commands that
// produce them are in README.md.
package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

var sidecarBin string

func TestMain(m *testing.M) {
	if path := os.Getenv(echoPeerEnv); path != "" {
		os.Exit(echoPeer(path)) // this process is rawEcho's other end
	}
	dir, err := os.MkdirTemp("", "benchbin")
	if err != nil {
		panic(err)
	}
	sidecarBin = filepath.Join(dir, "mailbox-sidecar")
	// MAILBOX_BENCH_TAGS=pprof builds the profiling variant (see
	// cmd/mailbox-sidecar/pprof.go).
	cmd := exec.Command("go", "build", "-tags", os.Getenv("MAILBOX_BENCH_TAGS"), "-o", sidecarBin, "../cmd/mailbox-sidecar")
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		panic(fmt.Sprintf("build the sidecar: %v", err))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// envInt reads a positive integer from the environment.
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// sidecar is the binary running as a child process.
type sidecar struct {
	cmd            *exec.Cmd
	api, agentSock string
	out            bytes.Buffer
	done           chan struct{}
}

func startSidecar(tb testing.TB, dataDir, sockDir string, extra ...string) *sidecar {
	tb.Helper()
	s := &sidecar{api: filepath.Join(sockDir, "api.sock"), agentSock: filepath.Join(sockDir, "agent.sock"), done: make(chan struct{})}
	args := append([]string{"serve", "--data-dir", dataDir, "--api-socket", s.api, "--agent-socket", s.agentSock, "--log-level", "warn"}, extra...)
	s.cmd = exec.Command(sidecarBin, args...)
	s.cmd.Stdout, s.cmd.Stderr = &s.out, &s.out
	if err := s.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	go func() { s.cmd.Wait(); close(s.done) }()
	return s
}

func (s *sidecar) kill() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.done
}

func (s *sidecar) client() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", s.api)
		},
		MaxIdleConnsPerHost: 128,
	}}
}

// waitReady polls /readyz every millisecond and returns when it is 200.
func (s *sidecar) waitReady(tb testing.TB, c *http.Client, timeout time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := c.Get("http://sidecar/readyz")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			tb.Fatalf("sidecar not ready after %v: %v\n%s", timeout, err, s.out.String())
		}
		time.Sleep(time.Millisecond)
	}
}

// runAgent serves handler on the sidecar's agent socket until the
// returned stop is called.
func runAgent(tb testing.TB, socket string, maxRuns int, handler agent.HandlerFunc) (stop func()) {
	tb.Helper()
	c, err := agent.New(agent.Config{Socket: socket, MaxRuns: maxRuns, Handler: handler,
		MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, ShutdownGrace: time.Second,
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Serve(ctx) }()
	return func() { cancel(); <-done }
}

func postJSON(c *http.Client, path string, body any) (map[string]any, error) {
	b, _ := json.Marshal(body)
	resp, err := c.Post("http://sidecar"+path, "application/json", bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out map[string]any
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("POST %s: %d %s", path, resp.StatusCode, data)
	}
	return out, json.Unmarshal(data, &out)
}

// recoveryFixture builds (or reuses, under MAILBOX_BENCH_CACHE) a data
// directory left by a SIGKILLed sidecar with `queued` queued dispatches
// over `threads` threads and `claimed` runs claimed by an agent that
// never finished them (their leases lapse before the restart).
func recoveryFixture(tb testing.TB, queued, claimed, threads int) string {
	tb.Helper()
	name := fmt.Sprintf("recovery-q%d-c%d-t%d", queued, claimed, threads)
	cache := os.Getenv("MAILBOX_BENCH_CACHE")
	if cache != "" {
		if _, err := os.Stat(filepath.Join(cache, name, "ok")); err == nil {
			return filepath.Join(cache, name)
		}
	} else {
		cache = tb.TempDir()
	}
	dir := filepath.Join(cache, name)
	os.RemoveAll(dir)
	sockDir, err := os.MkdirTemp("", "fx")
	if err != nil {
		tb.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	s := startSidecar(tb, dir, sockDir, "--lease", "2s", "--lease-renewal", "500ms")
	defer s.kill()
	c := s.client()
	s.waitReady(tb, c, 30*time.Second)

	// First the runs that will hold expired leases: an agent takes them
	// and never answers.
	var started atomic.Int64
	block := make(chan struct{})
	stopAgent := runAgent(tb, s.agentSock, claimed, func(ctx context.Context, run *agent.Run) agent.Result {
		started.Add(1)
		select {
		case <-block:
		case <-ctx.Done():
		}
		return agent.Transient("never", "fixture")
	})
	submit := func(n, offset int) {
		var wg sync.WaitGroup
		var next atomic.Int64
		errs := make(chan error, 64)
		for range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1)) - 1
					if i >= n {
						return
					}
					thread := fmt.Sprintf("t%06d", (offset+i)%threads)
					if _, err := postJSON(c, "/v1/threads/"+thread+"/dispatches", map[string]any{
						"messages": []any{map[string]any{"role": "user", "content": "queued work " + strconv.Itoa(offset+i)}},
					}); err != nil {
						select {
						case errs <- err:
						default:
						}
						return
					}
				}
			}()
		}
		wg.Wait()
		select {
		case err := <-errs:
			tb.Fatal(err)
		default:
		}
	}
	submit(claimed, 0)
	deadline := time.Now().Add(60 * time.Second)
	for started.Load() < int64(claimed) {
		if time.Now().After(deadline) {
			tb.Fatalf("only %d of %d fixture runs started", started.Load(), claimed)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Then the queue, while those runs hold every agent slot.
	submit(queued, claimed)
	s.kill()
	close(block)
	stopAgent()
	time.Sleep(2100 * time.Millisecond) // the claimed runs' leases lapse
	os.WriteFile(filepath.Join(dir, "ok"), nil, 0o644)
	return dir
}

// BenchmarkRecoveryAfterKill: a sidecar SIGKILLed with MAILBOX_BENCH_QUEUED
// (default 100 000) queued dispatches over 10 000 threads and
// MAILBOX_BENCH_EXPIRED (default 1 000) runs whose leases lapsed restarts
// on the same directory: ready-ms is process start → /readyz 200,
// first-run-ms is process start → the first run reaching the agent, and
// first-reclaimed-ms → the first run whose lease lapsed in the crash
// (attempt > 1) reaching it.
func BenchmarkRecoveryAfterKill(b *testing.B) {
	queued := envInt("MAILBOX_BENCH_QUEUED", 100000)
	expired := envInt("MAILBOX_BENCH_EXPIRED", 1000)
	fixture := recoveryFixture(b, queued, expired, min(10000, max(queued/10, 1)))
	var readyMs, firstMs, reclaimedMs []float64
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		dir := filepath.Join(b.TempDir(), "data")
		if out, err := exec.Command("cp", "-a", fixture, dir).CombinedOutput(); err != nil {
			b.Fatalf("copy fixture: %v %s", err, out)
		}
		// The copy's pages reach the disk before the clock starts: a
		// process killed by SIGKILL leaves at most its unsynced memtable
		// log dirty, not a whole data directory, and the sidecar's start
		// syncs the logs it finds (syncLogFiles).
		syscall.Sync()
		sockDir, _ := os.MkdirTemp("", "rc")
		first := make(chan time.Time, 1)
		firstReclaimed := make(chan time.Time, 1)
		// The agent waits, connecting every few milliseconds.
		stopAgent := runAgent(b, filepath.Join(sockDir, "agent.sock"), 64, func(ctx context.Context, run *agent.Run) agent.Result {
			now := time.Now()
			select {
			case first <- now:
			default:
			}
			if run.Attempt > 1 { // a run whose lease lapsed in the crash
				select {
				case firstReclaimed <- now:
				default:
				}
			}
			return agent.Done("ok")
		})
		b.StartTimer()
		start := time.Now()
		s := startSidecar(b, dir, sockDir)
		s.waitReady(b, s.client(), 60*time.Second)
		ready := time.Since(start)
		var firstAt, reclaimedAt time.Time
		select {
		case firstAt = <-first:
		case <-time.After(60 * time.Second):
			b.Fatal("no run reached the agent")
		}
		select {
		case reclaimedAt = <-firstReclaimed:
		case <-time.After(60 * time.Second):
			b.Fatal("no reclaimed run reached the agent")
		}
		b.StopTimer()
		readyMs = append(readyMs, float64(ready.Microseconds())/1000)
		firstMs = append(firstMs, float64(firstAt.Sub(start).Microseconds())/1000)
		reclaimedMs = append(reclaimedMs, float64(reclaimedAt.Sub(start).Microseconds())/1000)
		stopAgent()
		s.kill()
		os.RemoveAll(sockDir)
		b.StartTimer()
	}
	b.StopTimer()
	b.ReportMetric(mean(readyMs), "ready-ms")
	b.ReportMetric(mean(firstMs), "first-run-ms")
	b.ReportMetric(mean(reclaimedMs), "first-reclaimed-ms")
	b.ReportMetric(float64(queued), "queued")
	b.ReportMetric(float64(expired), "expired")
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	var s float64
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}
