package engine

import (
	"fmt"
	"sync/atomic"
	"time"
)

// StallReporter is implemented by stores that can tell a write stuck
// inside them (a hung disk, an operation that never returns) from one
// that is merely slow.
type StallReporter interface {
	// Stalled returns an error naming what has been stuck for longer
	// than limit at now, or nil.
	Stalled(now time.Time, limit time.Duration) error
}

// loopWatch records since when a loop has been busy with one round of
// work (0: waiting for the next one, which may legitimately take hours).
type loopWatch struct{ since atomic.Int64 }

func (w *loopWatch) busy() { w.since.Store(time.Now().UnixNano()) }
func (w *loopWatch) idle() { w.since.Store(0) }

// busyFor is how long the current round has taken at now (0: idle).
func (w *loopWatch) busyFor(now time.Time) time.Duration {
	s := w.since.Load()
	if s == 0 {
		return 0
	}
	return now.Sub(time.Unix(0, s))
}

// loopWatches are the watches of the engine's loops.
type loopWatches struct {
	dispatch, maintenance, signals loopWatch
}

// Alive reports whether the engine still responds: an error names a loop
// (dispatcher, maintenance, signals) that has been busy with one round of
// work for longer than limit, or a write the store reports stuck that
// long. Waiting for work is not busy. Meant for a liveness probe: a
// process in that state should be restarted; recovery on restart
// requeues what it held.
func (m *Mailbox) Alive(now time.Time, limit time.Duration) error {
	for _, l := range []struct {
		name string
		w    *loopWatch
	}{{"dispatcher", &m.watch.dispatch}, {"maintenance", &m.watch.maintenance}, {"signals", &m.watch.signals}} {
		if d := l.w.busyFor(now); d > limit {
			return fmt.Errorf("the %s loop has been busy with one round for %v (limit %v)", l.name, d.Round(time.Millisecond), limit)
		}
	}
	if sr, ok := m.raw.(StallReporter); ok {
		if err := sr.Stalled(now, limit); err != nil {
			return fmt.Errorf("store: %w", err)
		}
	}
	return nil
}
