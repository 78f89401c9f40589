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
			inParallel(b, 64, func(w int) error {
				for i := w; i < records; i += 64 {
					id := fmt.Sprintf("d%06d", i)
					thread := fmt.Sprintf("t%05d", i/10)
					if _, err := s.Enqueue(ctx, queued(id, thread, int64(1000+i))); err != nil {
						return err
					}
					run := engine.RunRecord{RunID: "run-" + id, ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
					if err := s.CreateRun(ctx, run); err != nil {
						return err
					}
				}
				return nil
			})
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

// BenchmarkRecoverTerminal: a restarted engine's startup recovery
// (engine.Mailbox.Recover: reclaims, the reconciliation of every
// terminal dispatch, the waiting runs' wakes) on a stream of records
// finished dispatches, each with its run (one in five cancelled, the
// rest acked), ten to a thread: the part of a restarted
// sidecar's wait before it is ready that comes after the store opened.
func BenchmarkRecoverTerminal(b *testing.B) {
	for _, records := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("records=%d", records), func(b *testing.B) {
			s := openCfg(b, freshConfig())
			ctx := context.Background()
			inParallel(b, 64, func(w int) error { return finishDispatches(ctx, s, w, 64, records) })
			b.ResetTimer()
			for range b.N {
				mb, err := engine.New(s, noopAgent{}, engine.Config{ConsumerID: "recover"})
				if err != nil {
					b.Fatal(err)
				}
				n, err := mb.Recover(ctx)
				if err != nil || n != 0 {
					b.Fatalf("recover: %d %v, want 0 reclaimed", n, err)
				}
				b.StopTimer()
				sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_ = mb.Stop(sctx)
				cancel()
				b.StartTimer()
			}
		})
	}
}

// inParallel runs fn(0) … fn(n-1) at once and fails tb on an error.
func inParallel(tb testing.TB, n int, fn func(w int) error) {
	tb.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(w); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		tb.Fatal(err)
	}
}

// finishDispatches writes dispatches w, w+step … below n, each with its
// run, ten to a thread of w's own, and finishes them: every fifth
// cancelled while queued, the rest claimed and acked.
func finishDispatches(ctx context.Context, s *natsstore.Store, w, step, n int) error {
	for i := w; i < n; i += step {
		id := fmt.Sprintf("d%06d", i)
		thread := fmt.Sprintf("t%02d-%04d", w, i/step/10)
		if _, err := s.Enqueue(ctx, queued(id, thread, int64(1000+i))); err != nil {
			return err
		}
		run := engine.RunRecord{RunID: "run-" + id, ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
		if err := s.CreateRun(ctx, run); err != nil {
			return err
		}
		if i%5 == 0 {
			if _, err := s.Cancel(ctx, id, int64(2000+i)); err != nil {
				return err
			}
			continue
		}
		c, err := s.Claim(ctx, thread, "c", time.Minute, int64(2000+i))
		if err != nil {
			return err
		}
		if c == nil || c.DispatchID != id {
			return fmt.Errorf("claim on %s: %v, want %s", thread, c, id)
		}
		if err := s.Ack(ctx, id, c.ClaimToken, int64(3000+i)); err != nil {
			return err
		}
	}
	return nil
}

// BenchmarkLoadMessageRange: reading a thread's log, 1 000 messages
// appended 50 at a time: the whole log (GET /v1/threads/{id}/messages
// with limit=1000, one op) and its last 20 messages (a run's context).
func BenchmarkLoadMessageRange(b *testing.B) {
	s := openCfg(b, freshConfig())
	ctx := context.Background()
	const thread, total = "tlog", 1000
	for n := uint64(0); n < total; n += 50 {
		msgs := make([]engine.Message, 50)
		for i := range msgs {
			msgs[i] = engine.Message{ID: fmt.Sprintf("m%04d", n+uint64(i)), Role: engine.RoleUser, Content: []byte(`"a message of some length, as a user would write one"`)}
		}
		if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: thread, ExpectedCount: n, Messages: msgs, CreatedAt: 1}); err != nil {
			b.Fatal(err)
		}
	}
	for _, r := range []struct {
		name     string
		from, to uint64
	}{{"all", 1, total}, {"last20", total - 19, total}} {
		b.Run(r.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				got, err := s.LoadMessageRange(ctx, thread, r.from, r.to)
				if err != nil || len(got) != int(r.to-r.from+1) {
					b.Fatalf("loaded %d, %v", len(got), err)
				}
			}
		})
	}
}
