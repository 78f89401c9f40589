//go:build soak

package bench

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// BenchmarkSoak runs the binary and the echo agent under a steady mixed
// load for MAILBOX_SOAK_DURATION (default 20m) and watches what a
// long-lived sidecar must keep bounded: its heap, goroutines and sockets,
// its data directory once terminal dispatches are purged, and its
// latency. `make soak` runs it; `make test` runs a short version so that
// it cannot rot.
//
// The load, paced at MAILBOX_SOAK_RATE requests a second (default 200),
// goes to generations of MAILBOX_SOAK_WINDOW threads (default 400),
// soakRunsPerThread requests each, after which the generation goes idle
// for good and the next one starts (so new threads keep coming and old
// ones must be forgotten). Of every 100 requests: one a page of a
// thread's messages (GET), one a live-then-queue message, two or three a
// foreground run on a thread of its own read to its end, the rest
// background submits. The sidecar purges terminal dispatches older than
// MAILBOX_SOAK_GC_TTL (default 2m) every MAILBOX_SOAK_GC_INTERVAL (10s).
//
// Every MAILBOX_SOAK_SAMPLE (30s) it logs: runs completed, latency
// p50/p99 of each kind of request over the interval, RSS (and its
// anonymous part), Go heap in use, goroutines, open sockets, the data
// directory's blocks on disk, the queue depth.
//
// Asserted, never a time: every submit answered 2xx; every run the load
// caused completed (none lost, none failed); once the load stops and a
// purge has run, the first generation's dispatches are gone (404), and the
// goroutines and sockets are back at what the idle sidecar had before
// the load (a worker, stream or connection kept per thread would show).
func BenchmarkSoak(b *testing.B) {
	cfg := soakConfig{
		duration: envDuration("MAILBOX_SOAK_DURATION", 20*time.Minute),
		rate:     envInt("MAILBOX_SOAK_RATE", 200),
		window:   envInt("MAILBOX_SOAK_WINDOW", 400),
		gcTTL:    envDuration("MAILBOX_SOAK_GC_TTL", 2*time.Minute),
		gcEvery:  envDuration("MAILBOX_SOAK_GC_INTERVAL", 10*time.Second),
		sample:   envDuration("MAILBOX_SOAK_SAMPLE", 30*time.Second),
	}
	for range b.N {
		b.StopTimer()
		soak(b, cfg)
	}
	b.ReportMetric(0, "ns/op")
}

// soakRunsPerThread is how many submits each thread of a generation gets.
const soakRunsPerThread = 5

type soakConfig struct {
	duration       time.Duration
	rate, window   int
	gcTTL, gcEvery time.Duration
	sample         time.Duration
}

// envDuration reads a duration from the environment.
func envDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil && d > 0 {
		return d
	}
	return def
}

// The kinds of request the soak sends, for its latency columns.
const (
	soakBackground = iota // POST …/dispatches: the answer
	soakForeground        // POST …/runs: the whole stream, to run_finish
	soakMessage           // POST …/messages
	soakPage              // GET …/messages
	soakKinds
)

// soakSample is one row of the soak's table.
type soakSample struct {
	at                  time.Duration
	completed           float64
	p50, p99            [soakKinds]time.Duration
	mem                 procMem
	heap                int64
	goroutines, sockets int
	disk                int64
	depth               float64
}

func (s soakSample) String() string {
	return fmt.Sprintf("%7s  completed %8.0f  p50/p99 ms: submit %5.2f/%6.1f  stream %5.2f/%6.1f  message %5.2f/%6.1f  page %5.2f/%6.1f  RSS %4.0f MiB (anon %4.0f)  heap %4.0f MiB  goroutines %4d  sockets %3d  disk %6.1f MiB  queued %4.0f",
		s.at.Round(time.Second), s.completed,
		ms(s.p50[soakBackground]), ms(s.p99[soakBackground]), ms(s.p50[soakForeground]), ms(s.p99[soakForeground]),
		ms(s.p50[soakMessage]), ms(s.p99[soakMessage]), ms(s.p50[soakPage]), ms(s.p99[soakPage]),
		mib(s.mem.rss), mib(s.mem.anon), mib(s.heap), s.goroutines, s.sockets, mib(s.disk), s.depth)
}

func soak(b *testing.B, cfg soakConfig) {
	n := startNode(b, 64, "--context-messages", "20",
		"--gc-ttl", cfg.gcTTL.String(), "--gc-interval", cfg.gcEvery.String())
	dataDir := flagValue(n.sc.cmd.Args, "--data-dir")
	pid := n.sc.cmd.Process.Pid
	load := n.sc.loadClient(64)
	stream := loadClient{&fasthttp.HostClient{
		Addr:               "sidecar",
		Dial:               func(string) (net.Conn, error) { return net.Dial("unix", n.sc.api) },
		MaxConns:           32,
		StreamResponseBody: true,
	}}

	var (
		mu       sync.Mutex
		lat      [soakKinds][]time.Duration // latencies since the last sample
		all      [soakKinds][]time.Duration // every latency of the load
		expected atomic.Int64               // runs the load caused
		failures atomic.Int64
		firstErr atomic.Value
		firstID  atomic.Value // a dispatch of the first generation
	)
	fail := func(err error) {
		if failures.Add(1) == 1 {
			firstErr.Store(err)
		}
	}
	take := func() soakSample {
		m := scrape(b, n)
		mu.Lock()
		l := lat
		lat = [soakKinds][]time.Duration{}
		for k := range soakKinds {
			all[k] = append(all[k], l[k]...)
		}
		mu.Unlock()
		s := soakSample{
			completed:  m.completed(),
			mem:        procStatus(b, pid),
			heap:       int64(m["go_memstats_heap_inuse_bytes"]),
			goroutines: int(m["go_goroutines"]),
			sockets:    openSockets(b, pid),
			disk:       diskBlocks(b, dataDir),
			depth:      m["mailbox_queue_depth"],
		}
		for k := range soakKinds {
			s.p50[k], s.p99[k] = percentile(l[k], 50), percentile(l[k], 99)
		}
		return s
	}

	// The idle sidecar's figures, before any load.
	time.Sleep(2 * time.Second)
	idle := take()
	b.Logf("soak: %v at %d submits/s over generations of %d threads × %d, gc-ttl %v every %v",
		cfg.duration, cfg.rate, cfg.window, soakRunsPerThread, cfg.gcTTL, cfg.gcEvery)
	b.Logf("idle     %s", idle)

	start := time.Now()
	cpu0 := cpuTime(b, pid)
	tokens := make(chan int64, cfg.rate) // a second's worth of submits
	var behind atomic.Int64              // submits the workers could not keep up with
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the pacer
		defer wg.Done()
		defer close(tokens)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		var k int64
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			due := int64(time.Since(start).Seconds() * float64(cfg.rate))
			for ; k < due; k++ {
				select {
				case tokens <- k:
				default:
					behind.Add(1)
				}
			}
		}
	}()
	body := []byte(`{"messages":[{"role":"user","content":"` + strings.Repeat("soak ", 60) + `"}]}`)
	gen := int64(cfg.window * soakRunsPerThread)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var answer []byte
			for k := range tokens {
				thread := fmt.Sprintf("g%d-%d", k/gen, k%int64(cfg.window))
				t0 := time.Now()
				var err error
				kind := soakBackground
				switch {
				case k%40 == 39:
					kind = soakForeground
					err = stream.stream(fmt.Sprintf("f%d", k), "soak", func(string) {})
					if err == nil {
						expected.Add(1)
					}
				case k%100 == 99:
					kind = soakPage
					_, err = load.get("http://sidecar/v1/threads/" + thread + "/messages?after_seq=0&limit=20")
				case k%50 == 49:
					kind = soakMessage
					err = load.postKeep("http://sidecar/v1/threads/"+thread+"/messages", body, &answer)
					if err == nil && strings.Contains(string(answer), `"delivery":"queued"`) {
						expected.Add(1)
					}
				default:
					err = load.postKeep("http://sidecar/v1/threads/"+thread+"/dispatches", body, &answer)
					if err == nil {
						expected.Add(1)
						if k == 0 {
							var sub struct {
								DispatchID string `json:"dispatch_id"`
							}
							json.Unmarshal(answer, &sub)
							firstID.Store(sub.DispatchID)
						}
					}
				}
				if err != nil {
					fail(err)
					continue
				}
				d := time.Since(t0)
				mu.Lock()
				lat[kind] = append(lat[kind], d)
				mu.Unlock()
			}
		}()
	}

	var samples []soakSample
	for tick := time.NewTicker(cfg.sample); time.Since(start) < cfg.duration; {
		<-tick.C
		s := take()
		s.at = time.Since(start)
		samples = append(samples, s)
		b.Logf("load     %s", s)
	}
	close(stop)
	wg.Wait()
	loadEnd := time.Since(start)
	cpu := cpuTime(b, pid) - cpu0
	mu.Lock()
	for k := range soakKinds { // the last interval's, which no sample took
		all[k] = append(all[k], lat[k]...)
	}
	lat = [soakKinds][]time.Duration{} // the end row has none of the load's
	mu.Unlock()
	if f := failures.Load(); f > 0 {
		b.Fatalf("%d requests failed; the first: %v", f, firstErr.Load())
	}

	// Every run the load caused completes.
	want := float64(expected.Load()) + idle.completed
	deadline := time.Now().Add(2 * time.Minute)
	for scrape(b, n).completed() < want {
		if time.Now().After(deadline) {
			b.Fatalf("%.0f of %.0f runs completed two minutes after the load stopped", scrape(b, n).completed()-idle.completed, want-idle.completed)
		}
		time.Sleep(100 * time.Millisecond)
	}
	m := scrape(b, n)
	if got := m.completed(); got != want {
		b.Fatalf("%.0f runs completed, the load caused %.0f", got-idle.completed, want-idle.completed)
	}
	for series, v := range m {
		if strings.HasPrefix(series, "mailbox_runs_total{") && series != `mailbox_runs_total{outcome="completed"}` && v > 0 {
			b.Errorf("%s = %.0f: the echo agent fails nothing", series, v)
		}
	}

	// Idle again: past the TTL of the last dispatch, two purges more and
	// a sample interval (at the defaults also past the runtime's forced GC,
	// every two minutes, so that heap-end is about what is live), and at
	// least 25 s: fasthttp's server keeps a goroutine that served a
	// connection for 10 s idle and looks every 10 s. The clients close
	// their idle connections, so that what the sidecar still holds is its
	// own.
	quiet := max(cfg.gcTTL+2*cfg.gcEvery+cfg.sample, 25*time.Second)
	load.c.CloseIdleConnections()
	stream.c.CloseIdleConnections()
	b.Logf("load stopped after %v (%d submits not paced in time); idle for %v", loadEnd.Round(time.Second), behind.Load(), quiet.Round(time.Second))
	time.Sleep(quiet)
	end := take()
	end.at = time.Since(start)
	b.Logf("end      %s", end)

	if id, _ := firstID.Load().(string); id == "" {
		b.Error("no dispatch of the first generation was recorded")
	} else if _, err := load.get("http://sidecar/v1/dispatches/" + id); err == nil || !strings.Contains(err.Error(), ": 404 ") {
		b.Errorf("the first dispatch %s after the purge: %v (want 404)", id, err)
	}
	// Back at what the idle sidecar had (both counted with the scrape's
	// connection open), but for goroutines that come and go.
	if end.goroutines > idle.goroutines+4 {
		b.Errorf("goroutines %d after the load, %d before it", end.goroutines, idle.goroutines)
	}
	if end.sockets > idle.sockets+1 {
		b.Errorf("open sockets %d after the load, %d before it", end.sockets, idle.sockets)
	}

	var maxHeap, maxRSS int64
	for _, s := range samples {
		maxHeap, maxRSS = max(maxHeap, s.heap), max(maxRSS, s.mem.rss)
	}
	runs := end.completed - idle.completed
	b.ReportMetric(runs/loadEnd.Seconds(), "runs/s")
	b.ReportMetric(float64(cpu.Microseconds())/runs, "sidecar-cpu-µs/run")
	// The whole load's tails: a sample's p99 shows when a stall came, these
	// how much of the load it touched.
	for _, k := range []struct {
		kind int
		name string
	}{{soakBackground, "submit"}, {soakForeground, "stream"}} {
		b.ReportMetric(ms(percentile(all[k.kind], 99)), k.name+"-p99-ms")
		b.ReportMetric(ms(percentile(all[k.kind], 99.9)), k.name+"-p999-ms")
	}
	b.ReportMetric(mib(maxHeap), "heap-max-MiB")
	b.ReportMetric(mib(end.heap), "heap-end-MiB")
	b.ReportMetric(mib(maxRSS), "rss-max-MiB")
	b.ReportMetric(mib(end.mem.rss), "rss-end-MiB")
	b.ReportMetric(float64(end.disk-idle.disk)/runs, "disk-B/run")
	b.ReportMetric(float64(end.goroutines-idle.goroutines), "goroutines-added")
}

// flagValue is the value after name in args.
func flagValue(args []string, name string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// openSockets counts the process's open socket descriptors.
func openSockets(b *testing.B, pid int) int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		b.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && strings.HasPrefix(target, "socket:") {
			n++
		}
	}
	return n
}

// diskBlocks is the bytes the files under dir occupy on disk (allocated
// blocks, not apparent sizes: Badger's files are sparse when created).
func diskBlocks(b *testing.B, dir string) int64 {
	var total int64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			total += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return total
}
