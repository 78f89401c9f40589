package natsstore_test

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// BenchmarkDispatchCycle: the full durable cycle enqueue → claim → record
// start → record result → ack (badgerstore's BenchmarkCycle, same steps),
// against the embedded server with sync always, from 1 and from 64
// threads at once (each goroutine owns a thread). One op is one whole
// cycle.
func BenchmarkDispatchCycle(b *testing.B) {
	for _, threads := range []int{1, 64} {
		b.Run(fmt.Sprintf("threads=%d", threads), func(b *testing.B) {
			s := openCfg(b, freshConfig())
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
		})
	}
}
