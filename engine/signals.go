package engine

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// signalLoop pulls dispatch signals from a work-queue store and handles
// each batch with bounded concurrency (engine.md §13).
func (m *Mailbox) signalLoop(ctx context.Context, src SignalSource) {
	defer m.loops.Done()
	for ctx.Err() == nil {
		sigs, err := src.PullDispatchSignals(ctx, m.cfg.SignalBatch, m.cfg.SignalWait)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			m.log.Warn("pull dispatch signals failed", "err", err)
			if sleepCtx(ctx, 250*time.Millisecond) != nil {
				return
			}
			continue
		}
		m.metrics.count(metricSigPulled).Add(len(sigs))
		if len(sigs) == 0 {
			continue
		}
		m.watch.signals.busy() // the pull itself may wait SignalWait: not busy
		sem := make(chan struct{}, max(1, min(m.cfg.SignalHandlers, len(sigs))))
		var wg sync.WaitGroup
		for _, sig := range sigs {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				m.handleSignal(ctx, sig)
			})
		}
		wg.Wait()
		m.watch.signals.idle()
	}
}

// handleSignal tries the signalled thread and settles the signal: ack
// when work started, is running here, or is not due; nack at once after
// a claim error, but after the thread's hold when its record is damaged
// (ErrCorrupt, claimhold.go); nack with a growing delay while the
// dispatch is due but blocked (another dispatch of its thread holds the
// claim, or no slot).
func (m *Mailbox) handleSignal(ctx context.Context, sig DispatchSignal) {
	n, ok := sig.Receipt.Deliveries()
	if !ok || n < 1 {
		n = 1
	}
	if n > 1 {
		m.metrics.count(metricSigRedeliv).Inc()
	}
	ack := func() error {
		m.metrics.count(metricSigAck).Inc()
		return sig.Receipt.Ack()
	}
	nack := func(d time.Duration) error {
		m.metrics.count(metricSigNack, "delayed", fmt.Sprint(d > 0)).Inc()
		return sig.Receipt.Nack(d)
	}
	if d := m.corruptHold(sig.ThreadID); d > 0 {
		// The thread's record is damaged (claimhold.go): come back when
		// its hold ends, as the dispatcher does.
		if err := nack(d); err != nil {
			m.log.Warn("settle dispatch signal failed", "dispatch_id", sig.DispatchID, "err", err)
		}
		return
	}
	var err error
	r := m.tryDispatch(ctx, sig.ThreadID)
	if (r == attemptNone || r == attemptError || r == attemptCorrupt) && m.starved.Load() {
		// The probe took a slot and let it go: the dispatcher may have
		// looked meanwhile, found no slot for the work that waits, and
		// slept (found by review: that work waited for the next sweep).
		// The dispatcher looks at the slots again once it has said it
		// is starved (dispatchReady), so one of the two sees the other.
		m.kick()
	}
	switch r {
	case attemptClaimed, attemptBusy:
		err = ack()
	case attemptError:
		err = nack(0)
	case attemptCorrupt:
		err = nack(max(m.corruptHold(sig.ThreadID), time.Millisecond))
	default:
		d, lerr := m.store.LoadDispatch(ctx, sig.DispatchID)
		switch {
		case lerr != nil:
			err = nack(0)
		case d != nil && d.Status == StatusQueued && d.AvailableAt <= m.cfg.Now():
			err = nack(SignalNackDelay(n, m.cfg.SignalNackBase, m.cfg.SignalNackMax))
		default:
			err = ack()
		}
	}
	if err != nil {
		m.log.Warn("settle dispatch signal failed", "dispatch_id", sig.DispatchID, "err", err)
	}
}

// SignalNackDelay is the delay of the n-th (1-based) redelivery of a
// blocked signal: base·2^min(n−1,16), capped at max.
func SignalNackDelay(n int, base, maxDelay time.Duration) time.Duration {
	exp := min(max(n-1, 0), 16)
	d := base << exp
	if d > maxDelay || d <= 0 {
		d = maxDelay
	}
	return d
}
