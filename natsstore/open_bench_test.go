package natsstore_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// BenchmarkOpen: opening a store (the index's catch-up and the signals'
// start: a restarted sidecar's wait before it is ready) on a stream of
// records dispatches, each with its run record, over records/10 threads.
func BenchmarkOpen(b *testing.B) {
	for _, records := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("records=%d", records), func(b *testing.B) {
			cfg := freshConfig()
			s := openCfg(b, cfg)
			ctx := context.Background()
			var wg sync.WaitGroup
			errs := make(chan error, 64)
			for w := range 64 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := w; i < records; i += 64 {
						id := fmt.Sprintf("d%06d", i)
						thread := fmt.Sprintf("t%05d", i/10)
						if _, err := s.Enqueue(ctx, queued(id, thread, int64(1000+i))); err != nil {
							errs <- err
							return
						}
						run := engine.RunRecord{RunID: "run-" + id, ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
						if err := s.CreateRun(ctx, run); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				octx, cancel := context.WithTimeout(ctx, time.Minute)
				o, err := natsstore.Open(octx, cfg)
				cancel()
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				o.Close()
				b.StartTimer()
			}
		})
	}
}
