//go:build scale

package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Window of the drain measurement.
const (
	scaleWarmup     = 2 * time.Second        // or a tenth of the backlog
	scaleWarmupPoll = 250 * time.Millisecond // /metrics polls until the window opens
	scaleWindow     = 25 * time.Second       // or until 60 % of the backlog completed
	scalePoll       = 500 * time.Millisecond // /metrics and /proc polls in the window
	scaleAgentSlots = 64
)

// BenchmarkScale and BenchmarkScaleMillion: the sidecar binary restarted
// on a data directory holding a large backlog, drained by the echo agent
// (issue 6, "Load and scale"). Figures: README.md, Scale.
//
// This file is built only with -tags scale, so neither `make test` nor a
// plain `go test -bench .` runs it; `make scale` (also run by `make
// bench`) does:
//
//	MAILBOX_SCALE=1 MAILBOX_SCALE_AGENTS=1 go test -tags scale -run '^$' -bench '^BenchmarkScale' -benchtime 1x -v ./bench/
//
// BenchmarkScale runs the 10 000-queued baselines (over 1 000 and over
// 10 000 threads: 10 000 dispatches cannot spread over 100 000 threads);
// BenchmarkScaleMillion runs 1 000 000 queued over 100 000 threads (10
// per thread) and over 1 000 threads (1 000 per thread) and skips unless
// MAILBOX_SCALE=1. Compare the 1M figures as ratios to the baselines of
// the same run: the machine is shared.
//
// # Fixture
//
// The backlog is written by opening badgerstore directly (fsync off while
// filling; Close flushes it) under an engine.Mailbox whose executor has
// no capacity: every dispatch is made by Mailbox.SubmitBackground — the
// call behind POST /v1/threads/{id}/dispatches — so it has its run record,
// its activation message in the thread log and the thread projection
// exactly as a real submit leaves them, and nothing is claimed. Dispatch i
// goes to thread i mod threads (submitted by 128 goroutines), so the
// threads' work is interleaved in time as if clients had submitted
// round-robin. The directory is cached under MAILBOX_BENCH_CACHE when set
// (delete the cache when the store's format changes) and copied for every
// iteration, so the measured process always starts on the same bytes. The
// copy has just been written: the page cache is warm.
//
// # Measurement
//
// Each iteration starts the binary (`serve`, fsync on, every other flag at
// its default — so --memory-limit is the deployment's 512 MiB) on the copy
// and measures what follows. MAILBOX_SCALE_CONTEXT=n passes
// --context-messages n: over 1 000 threads each thread's log holds 1 000
// messages, so at the default window every RUN frame carries 500 of them,
// and the figures then measure the context's size rather than the queue's
// shape (bench/README.md, Scale, the eighteenth session).
//
//   - ready-ms: process start → /readyz 200 (polled every millisecond).
//   - Then the echo agent binary connects with --max-runs 64 — or, with
//     MAILBOX_SCALE_AGENTS=n, n echo agents with 64/n slots each (64
//     agents of one slot avoid the hub's out-of-order RUN frames; see
//     README.md, Scale). Their JSON logs at debug level (one "run
//     started" line when a RUN arrives, one "run finished" line after its
//     FINISH is sent, both with nanosecond times and the dispatch id) are
//     the per-run record.
//   - runs/s: mailbox_runs_total{outcome="completed"} from /metrics over a
//     window. /metrics is polled every 250 ms until the window opens — 2 s
//     after all agents connected, or once a tenth of the backlog has
//     completed — then every 500 ms (never faster: a scrape is not free)
//     until it closes: 25 s later, or once 60 % of the backlog has
//     completed (the 10 000 baselines: about 5 000 runs).
//   - handoff-p50-ms / handoff-p99-ms, the claim latency: how long an
//     agent slot stays empty, from the agent sending a run's FINISH to the
//     next RUN arriving at it. With all 64 slots busy and a backlog, the
//     k-th freed slot is refilled by the (k+64)-th RUN (the sidecar never
//     has more than 64 runs claimed), so the gap is start[k+64] −
//     finish[k] over the FINISHes sent in the window. It covers everything
//     a queued dispatch goes through once a slot frees: the finished run's
//     complete commit, the dispatcher's ready-thread scan, the claim
//     commit, rebuilding the request (run record, activation message,
//     thread context) and the start commit. It is not enqueue → start: a
//     dispatch submitted during the drain waits behind the whole backlog
//     (threads are served oldest-due first), which measures the backlog,
//     not the claim.
//   - claim-op-ms and claim-to-start-ms: means over the window of the
//     engine's histograms mailbox_operation_duration_seconds{operation=
//     "claim",result="ok"} (the store's Claim call) and
//     mailbox_dispatch_claim_to_start_seconds, from their _sum and _count
//     (their buckets are too coarse for percentiles), to tell which part of
//     the handoff grows.
//   - run-p50-ms: RUN → FINISH at the agent (the echo agent emits, waits
//     for its checkpoint commit, finishes).
//   - rss-ready-MiB, rss-max-MiB, rss-end-MiB, hwm-MiB: the sidecar's VmRSS
//     from /proc/<pid>/status at ready, the largest sample (every 500 ms)
//     in the window, at the window's end; VmHWM (peak RSS of the process)
//     at the end; anon-end-MiB and file-end-MiB split the last VmRSS into
//     RssAnon (Go heap, stacks, Badger's allocations) and RssFile (pages of
//     Badger's memory-mapped tables and value log, which the kernel may
//     drop); heap-end-MiB is go_memstats_heap_inuse_bytes from /metrics.
//   - load1-start / load1-end: the 1-minute load average around the
//     iteration.
//   - With MAILBOX_SCALE_PPROF=<dir> (and the profiling build, see
//     scaleProfiles) a heap and a CPU profile taken after the window.
//
// Correctness only is asserted, never a time: the backlog makes progress;
// no agent connection is lost (mailbox_agent_connects_total stays at the
// number of agents); no dispatch reaches an agent twice and every one is
// a first attempt;
// every run the agent finished ended done with a natural end and nothing
// failed; every completion the sidecar counted was finished by the agent;
// no outcome other than completed and no dead letter in /metrics.
func BenchmarkScale(b *testing.B) {
	for _, threads := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("queued=10000/threads=%d", threads), func(b *testing.B) {
			benchScale(b, 10000, threads)
		})
	}
}

// BenchmarkScaleMillion: 1 000 000 queued over 100 000 and over 1 000
// threads. Runs only with MAILBOX_SCALE=1 (`make scale`, `make bench`):
// each variant writes a fixture of about a million submits once and
// drains for half a minute.
func BenchmarkScaleMillion(b *testing.B) {
	if os.Getenv("MAILBOX_SCALE") != "1" {
		b.Skip("1 000 000-queued variants run only with MAILBOX_SCALE=1 (make scale)")
	}
	for _, threads := range []int{100000, 1000} {
		b.Run(fmt.Sprintf("queued=1000000/threads=%d", threads), func(b *testing.B) {
			benchScale(b, 1000000, threads)
		})
	}
}

func benchScale(b *testing.B, queued, threads int) {
	fixture := scaleFixture(b, queued, threads)
	var res []scaleResult
	for range b.N {
		b.StopTimer()
		r := scaleRun(b, fixture, queued)
		res = append(res, r)
		b.Logf("queued=%d threads=%d: %s", queued, threads, r)
	}
	avg := func(f func(scaleResult) float64) float64 {
		s := 0.0
		for _, r := range res {
			s += f(r)
		}
		return s / float64(len(res))
	}
	b.ReportMetric(avg(func(r scaleResult) float64 { return ms(r.ready) }), "ready-ms")
	b.ReportMetric(avg(func(r scaleResult) float64 { return r.runsPerSec }), "runs/s")
	b.ReportMetric(avg(func(r scaleResult) float64 { return ms(r.handoffP50) }), "handoff-p50-ms")
	b.ReportMetric(avg(func(r scaleResult) float64 { return ms(r.handoffP99) }), "handoff-p99-ms")
	b.ReportMetric(avg(func(r scaleResult) float64 { return r.claimOpMs }), "claim-op-ms")
	b.ReportMetric(avg(func(r scaleResult) float64 { return r.claimToStartMs }), "claim-to-start-ms")
	b.ReportMetric(avg(func(r scaleResult) float64 { return ms(r.runP50) }), "run-p50-ms")
	b.ReportMetric(avg(func(r scaleResult) float64 { return mib(r.rssReady) }), "rss-ready-MiB")
	b.ReportMetric(avg(func(r scaleResult) float64 { return mib(r.rssMax) }), "rss-max-MiB")
	b.ReportMetric(avg(func(r scaleResult) float64 { return mib(r.rssEnd) }), "rss-end-MiB")
	b.ReportMetric(avg(func(r scaleResult) float64 { return mib(r.hwm) }), "hwm-MiB")
	b.ReportMetric(avg(func(r scaleResult) float64 { return mib(r.anonEnd) }), "anon-end-MiB")
	b.ReportMetric(avg(func(r scaleResult) float64 { return mib(r.fileEnd) }), "file-end-MiB")
	b.ReportMetric(avg(func(r scaleResult) float64 { return mib(r.heapEnd) }), "heap-end-MiB")
	b.ReportMetric(avg(func(r scaleResult) float64 { return r.load1Start }), "load1-start")
	b.ReportMetric(avg(func(r scaleResult) float64 { return r.load1End }), "load1-end")
	// ns/op is meaningless here (the timer is stopped throughout).
	b.ReportMetric(0, "ns/op")
}

// scaleResult is one iteration's figures.
type scaleResult struct {
	ready                     time.Duration
	window                    time.Duration
	windowRuns                int64
	runsPerSec                float64
	handoffP50, handoffP99    time.Duration
	handoffs                  int
	claimOpMs, claimToStartMs float64
	runP50                    time.Duration
	rssReady, rssMax, rssEnd  int64
	hwm                       int64
	anonEnd, fileEnd, heapEnd int64
	load1Start, load1End      float64
}

func (r scaleResult) String() string {
	return fmt.Sprintf("ready %v; %d runs in %v = %.0f runs/s; handoff p50 %.2f ms p99 %.2f ms (%d); claim op %.2f ms, claim→start %.2f ms (means); run p50 %.2f ms; RSS ready %.0f MiB, max %.0f MiB, end %.0f MiB (anon %.0f, file %.0f; Go heap in use %.0f), VmHWM %.0f MiB; load %.2f → %.2f",
		r.ready.Round(time.Millisecond), r.windowRuns, r.window.Round(time.Millisecond), r.runsPerSec,
		ms(r.handoffP50), ms(r.handoffP99), r.handoffs, r.claimOpMs, r.claimToStartMs, ms(r.runP50),
		mib(r.rssReady), mib(r.rssMax), mib(r.rssEnd), mib(r.anonEnd), mib(r.fileEnd), mib(r.heapEnd), mib(r.hwm), r.load1Start, r.load1End)
}

// scaleRun restarts the binary on a copy of fixture and measures one drain.
func scaleRun(b *testing.B, fixture string, queued int) scaleResult {
	var r scaleResult
	tmp := b.TempDir()
	dir := filepath.Join(tmp, "data")
	if out, err := exec.Command("cp", "-a", fixture, dir).CombinedOutput(); err != nil {
		b.Fatalf("copy fixture: %v %s", err, out)
	}
	sockDir, err := os.MkdirTemp("", "sc")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	r.load1Start = loadAvg1()

	start := time.Now()
	var extra []string
	if n := envInt("MAILBOX_SCALE_CONTEXT", 0); n > 0 {
		extra = append(extra, "--context-messages", strconv.Itoa(n))
	}
	s := startSidecar(b, dir, sockDir, extra...)
	defer s.kill()
	c := s.client()
	s.waitReady(b, c, 5*time.Minute)
	r.ready = time.Since(start)
	pid := s.cmd.Process.Pid
	r.rssReady = procStatus(b, pid).rss

	// The agent slots: one echo agent with all of them (how the sidecar
	// is deployed), or MAILBOX_SCALE_AGENTS agents sharing them.
	agents := envInt("MAILBOX_SCALE_AGENTS", 1)
	if scaleAgentSlots%agents != 0 {
		b.Fatalf("MAILBOX_SCALE_AGENTS=%d does not divide %d slots", agents, scaleAgentSlots)
	}
	var logs []string
	for i := range agents {
		path := filepath.Join(tmp, fmt.Sprintf("agent%d.log", i))
		logf, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		defer logf.Close()
		agent := exec.Command(echoAgentBin(b), "--socket", s.agentSock, "--max-runs", strconv.Itoa(scaleAgentSlots/agents), "--log-format", "json", "--log-level", "debug")
		agent.Stdout, agent.Stderr = logf, logf
		if err := agent.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { agent.Process.Kill(); agent.Wait() }()
		logs = append(logs, path)
	}
	n := &node{sc: s, http: c}
	deadline := time.Now().Add(30 * time.Second)
	for scrape(b, n)["mailbox_agent_capacity"] < scaleAgentSlots {
		if time.Now().After(deadline) {
			b.Fatal("the echo agents did not connect")
		}
		time.Sleep(200 * time.Millisecond)
	}
	connected := time.Now()

	// Warm-up, then the window.
	var m0 metricsSnapshot
	var w0 time.Time
	for {
		time.Sleep(scaleWarmupPoll)
		m0, w0 = scrape(b, n), time.Now()
		if w0.Sub(connected) >= scaleWarmup || m0.completed() >= float64(queued/10) {
			break
		}
	}
	base := m0.completed()
	r.rssMax = r.rssReady
	var m1 metricsSnapshot
	var w1 time.Time
	for {
		time.Sleep(scalePoll)
		m1, w1 = scrape(b, n), time.Now()
		r.rssMax = max(r.rssMax, procStatus(b, pid).rss)
		if w1.Sub(w0) >= scaleWindow || m1.completed() >= float64(queued*6/10) {
			break
		}
	}
	end := procStatus(b, pid)
	r.rssEnd, r.hwm, r.anonEnd, r.fileEnd = end.rss, end.hwm, end.anon, end.file
	r.rssMax = max(r.rssMax, r.rssEnd)
	r.heapEnd = int64(m1["go_memstats_heap_inuse_bytes"])
	r.window = w1.Sub(w0)
	r.windowRuns = int64(m1.completed() - base)
	r.runsPerSec = float64(r.windowRuns) / r.window.Seconds()
	r.claimOpMs = m1.meanMs(m0, `mailbox_operation_duration_seconds`, `{operation="claim",result="ok"}`)
	r.claimToStartMs = m1.meanMs(m0, `mailbox_dispatch_claim_to_start_seconds`, ``)
	r.load1End = loadAvg1()
	scaleProfiles(b, filepath.Base(fixture))

	// Correctness of what the sidecar reports.
	if r.windowRuns <= 0 {
		b.Fatalf("no run completed in the window (%v)", r.window)
	}
	for series, v := range m1 {
		if strings.HasPrefix(series, `mailbox_runs_total{`) && !strings.Contains(series, `outcome="completed"`) && v != 0 {
			b.Errorf("%s = %v, want 0", series, v)
		}
	}
	if v := m1[`mailbox_dispatch_depth{status="dead_letter"}`]; v != 0 {
		b.Errorf("%v dead letters", v)
	}

	// The agent's record, read after the last scrape: every completion
	// counted above was finished (FINISH sent) by the agent before.
	if v := m1["mailbox_agent_connects_total"]; v != float64(agents) {
		b.Errorf("%v agent connections for %d agents: a connection was lost", v, agents)
	}
	runs := readAgentLogs(b, logs)
	if float64(len(runs.finished)) < m1.completed() {
		b.Errorf("the sidecar counts %v completed runs, the agent finished %d", m1.completed(), len(runs.finished))
	}
	starts := make([]time.Time, 0, len(runs.started))
	for _, t := range runs.started {
		starts = append(starts, t)
	}
	finishes := make([]time.Time, 0, len(runs.finished))
	var runTimes []time.Duration
	for id, t := range runs.finished {
		finishes = append(finishes, t)
		st, ok := runs.started[id]
		if !ok {
			runs.problemf("dispatch %s finished without a start", id)
			continue
		}
		if !t.Before(w0) && !t.After(w1) {
			runTimes = append(runTimes, t.Sub(st))
		}
	}
	runs.report(b)
	slices.SortFunc(starts, func(x, y time.Time) int { return x.Compare(y) })
	slices.SortFunc(finishes, func(x, y time.Time) int { return x.Compare(y) })
	var gaps []time.Duration
	for k, f := range finishes {
		if f.Before(w0) || f.After(w1) || k+scaleAgentSlots >= len(starts) {
			continue
		}
		gaps = append(gaps, starts[k+scaleAgentSlots].Sub(f))
	}
	if len(gaps) == 0 {
		b.Fatalf("no slot handoff in the window (%d starts, %d finishes since %v)", len(starts), len(finishes), connected)
	}
	r.handoffs = len(gaps)
	r.handoffP50, r.handoffP99 = percentile(gaps, 50), percentile(gaps, 99)
	r.runP50 = percentile(runTimes, 50)
	return r
}

// scaleProfiles saves a heap profile and a 10 s CPU profile of the
// sidecar, taken after the window (the drain goes on; the figures are not
// disturbed), into the directory MAILBOX_SCALE_PPROF when it is set. The
// binary must be the profiling build: MAILBOX_BENCH_TAGS=pprof and
// MAILBOX_SIDECAR_PPROF_ADDR=127.0.0.1:<port> (see
// cmd/mailbox-sidecar/pprof.go).
func scaleProfiles(b *testing.B, name string) {
	dir, addr := os.Getenv("MAILBOX_SCALE_PPROF"), os.Getenv("MAILBOX_SIDECAR_PPROF_ADDR")
	if dir == "" || addr == "" {
		return
	}
	for _, p := range []struct{ file, path string }{
		{name + ".heap", "/debug/pprof/heap"},
		{name + ".cpu", "/debug/pprof/profile?seconds=10"},
	} {
		resp, err := http.Get("http://" + addr + p.path)
		if err != nil {
			b.Logf("profile %s: %v", p.path, err)
			return
		}
		data, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			b.Logf("profile %s: %d %v", p.path, resp.StatusCode, err)
			return
		}
		if err := os.WriteFile(filepath.Join(dir, p.file), data, 0o644); err != nil {
			b.Fatal(err)
		}
	}
}

// agentRuns is the echo agent's log: when each dispatch's RUN arrived and
// when its FINISH was sent.
type agentRuns struct {
	started, finished map[string]time.Time
	problems          []string // what the checks found wrong
}

// report fails the benchmark with the first few problems and their count.
func (r *agentRuns) report(b *testing.B) {
	for i, p := range r.problems {
		if i == 5 {
			b.Errorf("… %d problems in the agents' logs in all", len(r.problems))
			break
		}
		b.Error(p)
	}
}

func (r *agentRuns) problemf(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

// readAgentLogs parses the echo agents' JSON logs and checks them: one
// first-attempt RUN per dispatch, every run finished done, no warning.
func readAgentLogs(b *testing.B, paths []string) *agentRuns {
	runs := &agentRuns{started: map[string]time.Time{}, finished: map[string]time.Time{}}
	for _, path := range paths {
		readAgentLog(b, path, runs)
	}
	return runs
}

func readAgentLog(b *testing.B, path string, runs *agentRuns) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l struct {
			Time        time.Time `json:"time"`
			Level       string    `json:"level"`
			Msg         string    `json:"msg"`
			DispatchID  string    `json:"dispatch_id"`
			Attempt     int       `json:"attempt"`
			Status      string    `json:"status"`
			Termination string    `json:"termination"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue // a line cut by the read
		}
		switch l.Msg {
		case "run started":
			if _, dup := runs.started[l.DispatchID]; dup {
				runs.problemf("dispatch %s reached the agent twice", l.DispatchID)
			}
			if l.Attempt != 1 {
				runs.problemf("dispatch %s: attempt %d, want 1", l.DispatchID, l.Attempt)
			}
			runs.started[l.DispatchID] = l.Time
		case "run finished":
			if l.Status != "done" || l.Termination != "natural_end" {
				runs.problemf("dispatch %s finished %s/%s", l.DispatchID, l.Status, l.Termination)
			}
			runs.finished[l.DispatchID] = l.Time
		default:
			if l.Level == "WARN" || l.Level == "ERROR" {
				runs.problemf("echo agent: %s", sc.Text())
			}
		}
	}
	if err := sc.Err(); err != nil {
		b.Fatal(err)
	}
}

// noAgent is an executor without capacity: submits are stored, never
// claimed.
type noAgent struct{}

func (noAgent) Run(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
	panic("noAgent has no capacity")
}
func (noAgent) Capacity() int                    { return 0 }
func (noAgent) CapacityChanged() <-chan struct{} { return nil }

// scaleFixture returns a cleanly closed data directory holding `queued`
// background submits over `threads` threads (see the file comment),
// cached under MAILBOX_BENCH_CACHE when set.
func scaleFixture(b *testing.B, queued, threads int) string {
	b.Helper()
	name := fmt.Sprintf("scale-q%d-t%d", queued, threads)
	cache := os.Getenv("MAILBOX_BENCH_CACHE")
	if cache != "" {
		if _, err := os.Stat(filepath.Join(cache, name, "ok")); err == nil {
			return filepath.Join(cache, name)
		}
	} else {
		cache = b.TempDir()
	}
	dir := filepath.Join(cache, name)
	os.RemoveAll(dir)
	start := time.Now()
	st, err := badgerstore.Open(badgerstore.Options{Dir: dir, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	mb, err := engine.New(st, noAgent{}, engine.Config{})
	if err != nil {
		st.Close()
		b.Fatal(err)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	for range 128 {
		wg.Go(func() {
			for failed.Load() == nil {
				i := int(next.Add(1)) - 1
				if i >= queued {
					return
				}
				content, _ := json.Marshal("queued work " + strconv.Itoa(i))
				_, err := mb.SubmitBackground(context.Background(), engine.SubmitRequest{
					ThreadID: fmt.Sprintf("t%06d", i%threads),
					Messages: []engine.Message{{Role: "user", Content: content}},
				})
				if err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
			}
		})
	}
	wg.Wait()
	counts, cerr := st.CountByStatus(context.Background())
	if err := st.Close(); err != nil {
		b.Fatal(err)
	}
	if p := failed.Load(); p != nil {
		b.Fatalf("fixture submit: %v", *p)
	}
	if cerr != nil {
		b.Fatal(cerr)
	}
	if got := counts.Get(engine.StatusQueued); got != int64(queued) {
		b.Fatalf("fixture holds %d queued dispatches, want %d", got, queued)
	}
	size, _ := exec.Command("du", "-sh", dir).Output()
	b.Logf("fixture %s: %d submits in %v (%.0f/s), %s", name, queued, time.Since(start).Round(time.Millisecond),
		float64(queued)/time.Since(start).Seconds(), strings.Fields(string(size) + " ?")[0])
	if err := os.WriteFile(filepath.Join(dir, "ok"), nil, 0o644); err != nil {
		b.Fatal(err)
	}
	return dir
}
