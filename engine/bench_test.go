package engine_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// BenchmarkEngineFsyncBaseline: sequential 4 KiB append + fsync on the
// disk the engine benchmarks use — the ratio's denominator.
func BenchmarkEngineFsyncBaseline(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "wal"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
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

// processCPU is the user + system CPU time this process has used.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkEngineFdatasyncBaseline: 4 KiB overwrites of a preallocated
// file + fdatasync (no metadata to journal) — the stricter reading of "the
// machine's sequential fsync rate", closer to a preallocated WAL.
func BenchmarkEngineFdatasyncBaseline(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "wal"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	const slots = 256
	buf := make([]byte, 4096)
	if err := f.Truncate(slots * 4096); err != nil {
		b.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	i := 0
	for b.Loop() {
		if _, err := f.WriteAt(buf, int64(i%slots)*4096); err != nil {
			b.Fatal(err)
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "fsyncs/s")
}

func noop(_ context.Context, _ *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	sink.Emit([]byte(`{"type":"run_finish"}`))
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
}

// benchMailbox is a started mailbox on a durable Badger store in a
// temporary directory (closed when b ends; the caller stops the mailbox),
// its agent the scripted fake with slots slots that keeps no requests. A
// short context (20 messages) keeps the cost per run independent of b.N:
// the thread logs grow with every run.
func benchMailbox(b *testing.B, slots int, script func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome) (*badgerstore.Store, *engine.Mailbox) {
	b.Helper()
	exec := newFake(slots, script)
	exec.forget = true
	return benchMailboxOn(b, exec)
}

// stopHeld stops mb, giving up after wait on runs its agents hold until
// their context ends: Stop waits for them that long, then puts them back.
func stopHeld(mb *engine.Mailbox, wait time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	mb.Stop(ctx)
}

// benchMailboxOn is benchMailbox with exec for its agents.
func benchMailboxOn(b *testing.B, exec engine.Executor) (*badgerstore.Store, *engine.Mailbox) {
	b.Helper()
	s, err := badgerstore.Open(badgerstore.Options{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	mb, err := engine.New(s, exec, engine.Config{ContextMessages: 20})
	if err != nil {
		b.Fatal(err)
	}
	if err := mb.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	return s, mb
}

// BenchmarkBackgroundRun: SubmitBackground → run (no-op executor) → ack,
// durable (fsync on, Badger on disk), spread over 1 and 64 threads with
// as many agent slots. One op is one run, from submit to ack.
func BenchmarkBackgroundRun(b *testing.B) {
	for _, threads := range []int{1, 64} {
		b.Run(fmt.Sprintf("threads=%d", threads), func(b *testing.B) {
			s, mb := benchMailbox(b, threads, noop)
			ctx := context.Background()
			defer mb.Stop(ctx)
			msg := []engine.Message{userMsg("go")}
			timedRuns(b, s, mb, threads, msg)
			batches, ops := s.BatchStats()
			b.ReportMetric(float64(ops)/float64(max(batches, 1)), "ops/commit")
		})
	}
}

// timedRuns times b.N background runs of msg spread over threads
// threads, from their submits to their acks, and reports the CPU per run
// and runs/s.
func timedRuns(b *testing.B, s *badgerstore.Store, mb *engine.Mailbox, threads int, msg []engine.Message) {
	b.Helper()
	b.ReportAllocs()
	cpu0 := processCPU(b)
	b.ResetTimer()
	submitSpread(b, mb, threads, msg)
	awaitAcked(b, s, int64(b.N))
	b.StopTimer()
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/run")
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "runs/s")
}

// submitSpread submits b.N background runs of msg spread over threads
// threads (t0, t1, …), one submitter each, and returns once all are
// accepted.
func submitSpread(b *testing.B, mb *engine.Mailbox, threads int, msg []engine.Message) {
	b.Helper()
	errc := make(chan error, threads)
	for w := range threads {
		go func() {
			n := b.N / threads
			if w < b.N%threads {
				n++
			}
			for range n {
				if _, err := mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: fmt.Sprintf("t%d", w), Messages: msg}); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	for range threads {
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
	}
}

// awaitAcked waits (up to 5 minutes) until the store counts want acked
// dispatches.
func awaitAcked(b *testing.B, s *badgerstore.Store, want int64) {
	b.Helper()
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(time.Millisecond) {
		c, err := s.CountByStatus(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		if c.Get(engine.StatusAcked) == want {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d runs acked", c.Get(engine.StatusAcked), want)
		}
	}
}

// BenchmarkForegroundInterrupt: a foreground submit to a thread whose run
// is executing (the agent holds each run until it is cancelled): the
// interrupt, the cancel and wait for the run, then the new run's submit,
// claim and start; one op is one such submit, until the new run reached
// the agent. Durable (fsync on, Badger on disk).
func BenchmarkForegroundInterrupt(b *testing.B) {
	started := make(chan struct{}, 1)
	hold := func(ctx context.Context, _ *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case started <- struct{}{}:
		case <-ctx.Done(): // nobody waits for it (Stop)
		}
		<-ctx.Done()
		sink.Emit([]byte(`{"type":"run_finish"}`))
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}
	s, mb := benchMailbox(b, 1, hold)
	ctx := context.Background()
	defer stopHeld(mb, 100*time.Millisecond) // the last run is still held
	msg := []engine.Message{userMsg("go")}
	submit := func() {
		res, _, err := mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t", Messages: msg})
		if err != nil || res.Status != engine.SubmitRunning {
			b.Fatalf("submit: %+v %v", res, err)
		}
		<-started
	}
	submit() // the run every op interrupts
	batches0, _ := s.BatchStats()
	cpu0 := processCPU(b)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		submit()
	}
	b.StopTimer()
	batches, _ := s.BatchStats()
	b.ReportMetric(float64(batches-batches0)/float64(b.N), "commits/op")
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/op")
}

// BenchmarkReattach: a client re-attaching to a run's event log and
// reading the last 100 of its buffered events.
func BenchmarkReattach(b *testing.B) {
	l := engine.NewEventLog(10_000)
	for i := range 10_000 {
		l.Append(fmt.Appendf(nil, `{"type":"text_delta","delta":"%d"}`, i))
	}
	buf := make([]engine.Event, 0, 100)
	b.ReportAllocs()
	for b.Loop() {
		evs, reset, _, _ := l.Read(l.LastSeq()-100, 100, buf)
		if reset || len(evs) != 100 {
			b.Fatalf("read %d events, reset %v", len(evs), reset)
		}
	}
}

// BenchmarkBackgroundRunBesideHeld: BackgroundRun at 64 threads while
// held threads wait for an agent id that no agent serves (each refused
// once, then set aside by the dispatcher: claimhold.go). One op is one
// run of the 64 threads, from submit to ack; the held threads' setup is
// outside the timer.
func BenchmarkBackgroundRunBesideHeld(b *testing.B) {
	for _, held := range []int{0, 10000, 40000} {
		b.Run(fmt.Sprintf("held=%d", held), func(b *testing.B) {
			const threads = 64
			var refused atomic.Int64
			s, mb := benchMailbox(b, threads, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
				if req.AgentID == "absent" {
					refused.Add(1)
					return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable, Error: "nobody serves absent"}
				}
				return noop(ctx, req, sink)
			})
			ctx := context.Background()
			defer mb.Stop(ctx)
			msg := []engine.Message{userMsg("go")}
			var wg sync.WaitGroup
			for w := range threads {
				wg.Go(func() {
					for i := w; i < held; i += threads {
						if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("held%d", i), AgentID: "absent", Messages: msg}); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			for deadline := time.Now().Add(5 * time.Minute); refused.Load() < int64(held); time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					b.Fatalf("only %d of %d held threads refused", refused.Load(), held)
				}
			}
			timedRuns(b, s, mb, threads, msg)
			if extra := refused.Load() - int64(held); extra != 0 {
				b.ReportMetric(float64(extra), "refusals-again")
			}
		})
	}
}

// BenchmarkBackgroundRunBesideBusy: BackgroundRun at 64 threads while
// waiting threads' agent is full: an agent of its own id ("full", one
// slot, taken by a run that lasts the benchmark) serves them, so each is
// refused once (CodeAgentBusy) and then waits for that agent's free slot
// (claimhold.go), while the 64 threads' agent has slots to spare. One op
// is one run of the 64 threads, from submit to ack; the waiting threads'
// setup is outside the timer.
func BenchmarkBackgroundRunBesideBusy(b *testing.B) {
	for _, waiting := range []int{0, 10000, 40000} {
		b.Run(fmt.Sprintf("waiting=%d", waiting), func(b *testing.B) {
			const threads = 64
			exec := newTwoAgents(threads)
			s, mb := benchMailboxOn(b, exec)
			ctx := context.Background()
			defer stopHeld(mb, 100*time.Millisecond) // the full agent's run is still held
			msg := []engine.Message{userMsg("go")}
			var wg sync.WaitGroup
			for w := range threads {
				wg.Go(func() {
					for i := w; i < waiting; i += threads {
						if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("full%d", i), AgentID: "full", Messages: msg}); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			for deadline := time.Now().Add(5 * time.Minute); exec.refused.Load() < int64(max(waiting-1, 0)); time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					b.Fatalf("only %d of %d waiting threads refused", exec.refused.Load(), waiting-1)
				}
			}
			refused := exec.refused.Load()
			timedRuns(b, s, mb, threads, msg)
			if extra := exec.refused.Load() - refused; extra != 0 {
				b.ReportMetric(float64(extra), "refusals-again")
			}
		})
	}
}
