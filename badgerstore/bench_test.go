package badgerstore_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Benchmarks of the store's hot paths. Figures are compared as ratios to
// BenchmarkFsyncBaseline measured in the same run (see bench/README.md).

// BenchmarkFsyncBaseline: sequential 4 KiB append + fsync on the same
// disk: the rate a durable store without group commit cannot beat.
func BenchmarkFsyncBaseline(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "wal"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "fsyncs/s")
}

func benchStore(b *testing.B, o badgerstore.Options) *badgerstore.Store {
	b.Helper()
	if o.Dir == "" && !o.InMemory {
		o.Dir = b.TempDir()
	}
	s, err := badgerstore.Open(o)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

// BenchmarkEnqueue: one durable enqueue at a time, then 64 at once.
func BenchmarkEnqueue(b *testing.B) {
	for _, par := range []int{1, 64} {
		b.Run(fmt.Sprintf("concurrent=%d", par), func(b *testing.B) {
			s := benchStore(b, badgerstore.Options{})
			ctx := context.Background()
			var n atomic.Int64
			b.ReportAllocs()
			b.SetParallelism(max(1, par/runtime.GOMAXPROCS(0)))
			b.ResetTimer()
			if par == 1 {
				for b.Loop() {
					i := n.Add(1)
					if _, err := s.Enqueue(ctx, queued(fmt.Sprint(i), fmt.Sprintf("t%d", i%100), 1000)); err != nil {
						b.Fatal(err)
					}
				}
			} else {
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						i := n.Add(1)
						if _, err := s.Enqueue(ctx, queued(fmt.Sprint(i), fmt.Sprintf("t%d", i%100), 1000)); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "enqueues/s")
		})
	}
}

// BenchmarkCycle: the full durable cycle enqueue → claim → record start →
// record result → ack, with fsync on, from 1 and from 64 threads at once
// (each goroutine owns a thread). One op is one whole cycle.
func BenchmarkCycle(b *testing.B) {
	for _, threads := range []int{1, 64} {
		b.Run(fmt.Sprintf("threads=%d", threads), func(b *testing.B) {
			s := benchStore(b, badgerstore.Options{})
			ctx := context.Background()
			var next, tid atomic.Int64
			cycle := func(thread string) error {
				i := next.Add(1)
				id := fmt.Sprintf("d%d", i)
				now := time.Now().UnixMilli()
				if _, err := s.Enqueue(ctx, queued(id, thread, now)); err != nil {
					return err
				}
				c, err := s.Claim(ctx, thread, "bench", 30*time.Second, now)
				if err != nil || c == nil {
					return fmt.Errorf("claim %s: %v %v", thread, c, err)
				}
				if err := s.RecordDispatchStart(ctx, c.DispatchID, c.ClaimToken, "inst-"+id, now); err != nil {
					return err
				}
				res := engine.RunResult{RunID: c.RunID, InstanceID: "inst-" + id, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "ok"}
				if err := s.RecordRunResult(ctx, c.DispatchID, c.ClaimToken, res, now); err != nil {
					return err
				}
				return s.Ack(ctx, c.DispatchID, c.ClaimToken, now)
			}
			b.ReportAllocs()
			b.ResetTimer()
			if threads == 1 {
				for b.Loop() {
					if err := cycle("t0"); err != nil {
						b.Fatal(err)
					}
				}
			} else {
				b.SetParallelism(threads / runtime.GOMAXPROCS(0))
				b.RunParallel(func(pb *testing.PB) {
					thread := fmt.Sprintf("t%d", tid.Add(1))
					for pb.Next() {
						if err := cycle(thread); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "cycles/s")
			batches, ops := s.BatchStats()
			b.ReportMetric(float64(ops)/float64(max(batches, 1)), "ops/commit")
		})
	}
}

// queueFixture is a store directory holding `total` queued dispatches over
// `threads` threads, built once per process and shared by benchmarks.
type queueFixture struct {
	once sync.Once
	dir  string
	err  error
}

var fixtures sync.Map // "total/threads" → *queueFixture

func fixtureDir(b *testing.B, total, threads int) string {
	b.Helper()
	v, _ := fixtures.LoadOrStore(fmt.Sprintf("%d/%d", total, threads), &queueFixture{})
	f := v.(*queueFixture)
	f.once.Do(func() {
		// MAILBOX_BENCH_CACHE keeps fixtures between runs (rebuilt when the
		// layout version in the name changes); otherwise they are temporary.
		if cache := os.Getenv("MAILBOX_BENCH_CACHE"); cache != "" {
			f.dir = filepath.Join(cache, fmt.Sprintf("queued-%d-threads-%d-v%d", total, threads, fixtureVersion))
			if _, err := os.Stat(filepath.Join(f.dir, "complete")); err == nil {
				return
			}
			_ = os.RemoveAll(f.dir)
		} else {
			f.dir, f.err = os.MkdirTemp("", fmt.Sprintf("mailbox-bench-%d-", total))
			if f.err != nil {
				return
			}
			benchDirs.Store(f.dir, true)
		}
		defer func() {
			if f.err == nil {
				f.err = os.WriteFile(filepath.Join(f.dir, "complete"), nil, 0o644)
			}
		}()
		start := time.Now()
		// Close compacts level 0, so the benchmarks start from a settled
		// tree rather than racing the compaction of a fresh bulk load.
		s, err := badgerstore.Open(badgerstore.CompactOnClose(badgerstore.Options{Dir: f.dir, NoSync: true}))
		if err != nil {
			f.err = err
			return
		}
		defer s.Close()
		const chunk = 2000
		batch := make([]engine.Dispatch, 0, chunk)
		flush := func() error {
			err := s.EnqueueMany(batch)
			batch = batch[:0]
			return err
		}
		for i := range total {
			d := queued(fmt.Sprintf("q%09d", i), fmt.Sprintf("thread-%06d", i%threads), int64(1000+i))
			batch = append(batch, d)
			if len(batch) == chunk {
				if f.err = flush(); f.err != nil {
					return
				}
			}
		}
		if f.err = flush(); f.err != nil {
			return
		}
		b.Logf("fixture %d queued over %d threads built in %s", total, threads, time.Since(start).Round(time.Millisecond))
	})
	if f.err != nil {
		b.Fatalf("fixture: %v", f.err)
	}
	return f.dir
}

// fixtureVersion changes whenever the on-disk layout does.
const fixtureVersion = 4

// benchDirs are removed by TestMain after the run.
var benchDirs sync.Map

func removeBenchDirs() {
	benchDirs.Range(func(k, _ any) bool {
		_ = os.RemoveAll(k.(string))
		return true
	})
}

// BenchmarkClaimLatency: claim on a spread-out thread of a queue of 1 000
// or 1 000 000 queued dispatches (over 100 and 100 000 threads: 10 per
// thread); outside the timer each claimed dispatch is acked and a fresh
// one enqueued at the end of its thread, so the queue keeps its size and
// the LSM tree sees the deletion churn of a real queue. With sync=off
// the figure shows the index and LSM cost alone; sync=on is what a
// durable claim costs. The ratio between the sizes is what matters.
func BenchmarkClaimLatency(b *testing.B) {
	for _, sync := range []bool{false, true} {
		for _, size := range []struct{ total, threads int }{{1_000, 100}, {1_000_000, 100_000}} {
			b.Run(fmt.Sprintf("sync=%v/queued=%d", sync, size.total), func(b *testing.B) {
				benchClaim(b, sync, size.total, size.threads)
			})
		}
	}
}

func benchClaim(b *testing.B, sync bool, total, threads int) {
	dir := fixtureDir(b, total, threads)
	s := benchStore(b, badgerstore.Options{Dir: dir, NoSync: !sync})
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		i := int(claimSeq.Add(1))
		thread := fmt.Sprintf("thread-%06d", (i*7919)%threads)
		c, err := s.Claim(ctx, thread, "bench", time.Minute, 1_000_000_000)
		if err != nil || c == nil {
			b.Fatalf("claim %s: %v %v", thread, c, err)
		}
		b.StopTimer()
		if err := s.Ack(ctx, c.DispatchID, c.ClaimToken, 1_000_000_000); err != nil {
			b.Fatal(err)
		}
		refill++
		d := queued(fmt.Sprintf("r%d-%d-%09d", total, runNonce, refill), thread, 1000)
		d.CreatedAt = int64(2_000_000_000 + refill)
		if _, err := s.Enqueue(ctx, d); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// claimSeq and refill make ids unique across benchmark rounds that share a
// fixture.
var claimSeq atomic.Int64

var refill int

// runNonce keeps refill ids unique across processes sharing a cached fixture.
var runNonce = time.Now().UnixNano()

// BenchmarkResidentMemory opens a store holding 1 000 000 queued
// dispatches in a fresh child process with the default Options,
// claims and releases 20 000 of them, and reports the child's peak
// resident set: once with Go's default GC settings and once with
// GOMEMLIMIT=160MiB, the soft limit a memory-bounded deployment sets.
func BenchmarkResidentMemory(b *testing.B) {
	dir := fixtureDir(b, 1_000_000, 100_000)
	for b.Loop() {
		b.ReportMetric(childPeakRSS(b, dir, ""), "peak-RSS-MiB")
		b.ReportMetric(childPeakRSS(b, dir, "160MiB"), "peak-RSS-MiB@GOMEMLIMIT=160MiB")
	}
}

func childPeakRSS(b *testing.B, fixture, memLimit string) float64 {
	// Each child works on its own copy of the same fixture, so both see
	// the same pending compaction work.
	dir := filepath.Join(b.TempDir(), "copy")
	if out, err := exec.Command("cp", "-a", fixture, dir).CombinedOutput(); err != nil {
		b.Fatalf("copy fixture: %v: %s", err, out)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), rssEnv+"="+dir)
	if memLimit != "" {
		cmd.Env = append(cmd.Env, "GOMEMLIMIT="+memLimit)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("rss child: %v: %s", err, out)
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM_KB "); ok {
			kb, _ := strconv.ParseFloat(v, 64)
			return kb / 1024
		}
	}
	b.Fatalf("rss child printed no VmHWM: %s", out)
	return 0
}

const rssEnv = "MAILBOX_RSS_CHILD"

// runRSSChild is the child of BenchmarkResidentMemory.
func runRSSChild() bool {
	dir := os.Getenv(rssEnv)
	if dir == "" {
		return false
	}
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir, NoSync: true})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(2)
	}
	ctx := context.Background()
	for i := range 20_000 {
		thread := fmt.Sprintf("thread-%06d", (i*7919)%100_000)
		c, err := s.Claim(ctx, thread, "rss", time.Minute, 1_000_000_000)
		if err != nil || c == nil {
			fmt.Println("claim:", c, err)
			os.Exit(2)
		}
		if _, err := s.Release(ctx, c.DispatchID, c.ClaimToken, 1_000_000_000); err != nil {
			fmt.Println("release:", err)
			os.Exit(2)
		}
	}
	if _, err := s.QueuedThreadIDs(ctx); err != nil {
		fmt.Println("queued threads:", err)
		os.Exit(2)
	}
	_ = s.Close()
	status, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			fmt.Println("VmHWM_KB", strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
		if strings.HasPrefix(l, "Rss") {
			fmt.Println(strings.Join(strings.Fields(l), " "))
		}
	}
	os.Exit(0)
	return true
}

// BenchmarkValueLogGCPause: value-log GC runs on the writer (durable.go),
// so writes wait for it. One op: a GC of the store's first value-log file
// (64 MiB, the default size) with 60 % of its values garbage; it reports
// the GC's wall time and how long a write issued as the GC starts waits.
func BenchmarkValueLogGCPause(b *testing.B) {
	ctx := context.Background()
	state := []byte(`"` + strings.Repeat("s", 100<<10) + `"`) // above ValueThreshold: in the value log
	var gcTotal, stallTotal time.Duration
	for b.Loop() {
		b.StopTimer()
		opts := badgerstore.CompactOnClose(badgerstore.Options{Dir: b.TempDir(), GCInterval: -1})
		s, err := badgerstore.Open(opts)
		if err != nil {
			b.Fatal(err)
		}
		const runs = 700 // ≈ 70 MiB of values: the first file full
		write := func(i, step int) {
			r := engine.RunRecord{RunID: fmt.Sprintf("r%04d", i), ThreadID: fmt.Sprintf("t%04d", i), AgentID: "a", Status: engine.RunRunning, State: state, CreatedAt: 1, UpdatedAt: int64(1 + step), Steps: int64(step)}
			if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: r.ThreadID, Run: &r}); err != nil {
				b.Fatal(err)
			}
		}
		each := func(step int, which func(i int) bool) {
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := w; i < runs; i += 16 {
						if which(i) {
							write(i, step)
						}
					}
				}()
			}
			wg.Wait()
		}
		each(0, func(int) bool { return true })
		each(1, func(i int) bool { return i%5 < 3 }) // 60 % of the first versions are garbage now
		if err := s.Close(); err != nil {            // flush + compaction: GC learns the garbage
			b.Fatal(err)
		}
		if s, err = badgerstore.Open(opts); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start := time.Now()
		gcDone := make(chan int, 1)
		go func() { gcDone <- s.RunValueLogGC() }()
		time.Sleep(time.Millisecond) // the GC has the writer
		w0 := time.Now()
		write(1, 2)
		stall := time.Since(w0)
		n := <-gcDone
		gc := time.Since(start)
		b.StopTimer()
		if n == 0 {
			b.Fatal("GC rewrote nothing")
		}
		gcTotal += gc / time.Duration(n)
		stallTotal += stall
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(gcTotal.Microseconds())/float64(b.N)/1000, "gc-ms/file")
	b.ReportMetric(float64(stallTotal.Microseconds())/float64(b.N)/1000, "write-wait-ms")
}

// BenchmarkSubmitIdle: the store's half of a foreground submit to an idle
// thread (the message, the dispatch enqueued and claimed, its start and its
// run record: one operation, one commit), each on a thread of its own, one
// at a time; on disk without fsync, so that the figure is the operation's
// and Badger's CPU, not the disk's.
func BenchmarkSubmitIdle(b *testing.B) {
	s := benchStore(b, badgerstore.Options{NoSync: true})
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		id := strconv.Itoa(i)
		run := &engine.RunRecord{RunID: "run-" + id, ThreadID: "t" + id, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
		c := engine.Checkpoint{ThreadID: "t" + id, CreatedAt: 1000, Run: run, Messages: []engine.Message{{ID: "m" + id, Role: engine.RoleUser, Content: []byte(`"hello"`)}}}
		if _, out, err := s.SubmitIdle(ctx, c, queued(id, "t"+id, 1000), "me", time.Minute, "inst", 1000); err != nil || out == nil {
			b.Fatalf("SubmitIdle: %v %v", out, err)
		}
	}
}

// BenchmarkLoadMessageRange: a run's context window read back, 500
// messages of about 300 bytes (as a long thread's RUN carries them), from
// a store on disk whose memtable holds them; the cost is the iteration and
// the records' decoding.
func BenchmarkLoadMessageRange(b *testing.B) {
	s := benchStore(b, badgerstore.Options{NoSync: true})
	ctx := context.Background()
	const n = 500
	text := `"` + strings.Repeat("lorem ipsum dolor sit amet ", 10) + `"`
	for i := range n {
		c := engine.Checkpoint{ThreadID: "thread-42", ExpectedCount: uint64(i), CreatedAt: 1_790_000_000_000, ProducedByRunID: "0197a4a2-5c0e-7d3e-9f3b-6c1e2a9b8f10",
			Messages: []engine.Message{{ID: fmt.Sprintf("0197a4a2-5c0e-7d3e-9f3b-%012d", i), Role: engine.RoleAssistant, Content: []byte(text)}}}
		if _, err := s.Checkpoint(ctx, c); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		msgs, err := s.LoadMessageRange(ctx, "thread-42", 1, n)
		if err != nil || len(msgs) != n {
			b.Fatalf("%d messages, %v", len(msgs), err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/message")
}
