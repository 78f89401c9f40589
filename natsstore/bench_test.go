package natsstore_test

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// BenchmarkDispatchCycle: the full durable cycle enqueue → claim → record
// start → record result → ack (badgerstore's BenchmarkCycle, same steps),
// on natsstore against the embedded server (sync always) and, in the same
// run for comparison, on badgerstore on disk (fsync on), from 1 and from
// 64 threads at once (each goroutine owns a thread). One op is one whole
// cycle.
func BenchmarkDispatchCycle(b *testing.B) {
	stores := []struct {
		name string
		open func(b *testing.B) engine.Store
	}{
		{"nats", func(b *testing.B) engine.Store { return openCfg(b, freshConfig()) }},
		{"badger", func(b *testing.B) engine.Store {
			s, err := badgerstore.Open(badgerstore.Options{Dir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = s.Close() })
			return s
		}},
	}
	for _, st := range stores {
		for _, threads := range []int{1, 64} {
			b.Run(fmt.Sprintf("store=%s/threads=%d", st.name, threads), func(b *testing.B) {
				s := st.open(b)
				benchCycle(b, s, threads)
			})
		}
	}
}

func benchCycle(b *testing.B, s engine.Store, threads int) {
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
}

// noopAgent completes every run at once.
type noopAgent struct{ slots int }

func (a noopAgent) Capacity() int                    { return a.slots }
func (a noopAgent) CapacityChanged() <-chan struct{} { return nil }
func (a noopAgent) Run(_ context.Context, _ *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	sink.Emit([]byte(`{"type":"run_finish"}`))
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
}

// BenchmarkSidecarsBackgroundRun: aggregate throughput of background runs
// (SubmitBackground → claim → no-op agent → ack) with 1, 2 and 3 engine
// instances, each on its own store and connection, sharing one stream on
// the embedded server. 64 submitters, submitter i submitting through
// sidecar i mod n; every sidecar has 64 agent slots, so a run may execute
// on any of them. threads=64: submitter i submits all its runs to thread
// i (hot threads: a thread's next run is submitted while its last one
// executes, perhaps on another sidecar); threads=fresh: every run on a
// thread of its own. One op is one run, from submit to ack.
func BenchmarkSidecarsBackgroundRun(b *testing.B) {
	const submitters = 64
	for _, n := range []int{1, 2, 3} {
		for _, fresh := range []bool{false, true} {
			name := fmt.Sprintf("sidecars=%d/threads=64", n)
			if fresh {
				name = fmt.Sprintf("sidecars=%d/threads=fresh", n)
			}
			b.Run(name, func(b *testing.B) { benchSidecars(b, n, submitters, fresh) })
		}
	}
}

func benchSidecars(b *testing.B, n, submitters int, fresh bool) {
	cfg := freshConfig()
	var mbs []*engine.Mailbox
	var first *natsstore.Store
	for i := range n {
		st := openCfg(b, cfg)
		if first == nil {
			first = st
		}
		mb, err := engine.New(st, noopAgent{slots: submitters}, engine.Config{
			ConsumerID: fmt.Sprintf("sc%d", i+1), ContextMessages: 20,
			SignalWait: 200 * time.Millisecond,
		})
		if err != nil {
			b.Fatal(err)
		}
		if err := st.ServeLive(mb.HandleLive); err != nil {
			b.Fatal(err)
		}
		if err := mb.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = mb.Stop(ctx)
		})
		mbs = append(mbs, mb)
	}
	ctx := context.Background()
	msg := []engine.Message{userMsg("go")}
	var seq atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	errc := make(chan error, submitters)
	for w := range submitters {
		go func() {
			k := b.N / submitters
			if w < b.N%submitters {
				k++
			}
			mb := mbs[w%n]
			for range k {
				thread := fmt.Sprintf("t%d", w)
				if fresh {
					thread = fmt.Sprintf("t%d-%d", w, seq.Add(1))
				}
				if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: msg}); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	for range submitters {
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		c, err := first.CountByStatus(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if c.Get(engine.StatusAcked) == int64(b.N) {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d runs acked", c.Get(engine.StatusAcked), b.N)
		}
		time.Sleep(time.Millisecond) // polling pace
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "runs/s")
}

// BenchmarkReclaimExpired: a sweep after a crash, on the embedded server:
// leases=N claimed dispatches on N threads whose leases have lapsed,
// reclaimed by one ReclaimExpired call. One op is one lease reclaimed.
func BenchmarkReclaimExpired(b *testing.B) {
	const leases = 200
	ctx := context.Background()
	s := openCfg(b, freshConfig())
	reclaimed := 0
	b.ReportAllocs()
	var spent time.Duration
	for round := 0; reclaimed < b.N; round++ {
		now := time.Now().UnixMilli()
		for i := range leases {
			thread := fmt.Sprintf("r%d-t%d", round, i)
			if _, err := s.Enqueue(ctx, queued(fmt.Sprintf("r%d-d%d", round, i), thread, now)); err != nil {
				b.Fatal(err)
			}
			if c, err := s.Claim(ctx, thread, "crashed", time.Millisecond, now); err != nil || c == nil {
				b.Fatalf("claim %s: %v %v", thread, c, err)
			}
		}
		start := time.Now()
		got, err := s.ReclaimExpired(ctx, now+1000, leases)
		spent += time.Since(start)
		if err != nil || len(got) != leases {
			b.Fatalf("reclaimed %d of %d: %v", len(got), leases, err)
		}
		reclaimed += len(got)
	}
	b.ReportMetric(float64(spent.Nanoseconds())/float64(reclaimed), "ns/lease")
	b.ReportMetric(float64(reclaimed)/spent.Seconds(), "leases/s")
}
