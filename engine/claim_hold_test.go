package engine_test

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// poisonStore fails every claim of one thread with err, as often as it
// is asked, and records when; other threads claim as usual.
type poisonStore struct {
	*badgerstore.Store
	thread string
	err    error
	mu     sync.Mutex
	tries  []time.Time
}

func (p *poisonStore) ClaimStart(ctx context.Context, thread, consumer string, lease time.Duration, instance string, now int64) (*engine.Dispatch, error) {
	if thread == p.thread {
		p.mu.Lock()
		p.tries = append(p.tries, time.Now())
		p.mu.Unlock()
		return nil, fmt.Errorf("claim start %s: %w", thread, p.err)
	}
	return p.Store.ClaimStart(ctx, thread, consumer, lease, instance, now)
}

func (p *poisonStore) triedAt() []time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.tries)
}

// A thread whose claims keep failing does not hold the agent's only slot:
// the dispatcher sets it aside and serves the threads behind it, and
// reports it in mailbox_dispatch_held_threads. It is tried again after a
// second, whatever passes the dispatcher makes meanwhile; while its record
// is damaged (ErrCorrupt) the delay doubles, while the store fails
// otherwise (perhaps for every thread) it stays a second.
func TestAThreadThatCannotBeClaimedDoesNotBlockTheOthers(t *testing.T) {
	for _, c := range []struct {
		name    string
		err     error
		doubles bool
	}{
		{"corrupt", fmt.Errorf("decode dispatch %q: %w", "dx", engine.ErrCorrupt), true},
		{"unavailable", fmt.Errorf("read: %w", engine.ErrUnavailable), false},
		// A store's own request timeout (the NATS store's) is the store
		// failing, not the caller going: held as well (found by a review:
		// it was taken for the caller's and retried at once, in a loop).
		{"the store's own deadline", fmt.Errorf("read: %w: %w", engine.ErrUnavailable, context.DeadlineExceeded), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			var ps *poisonStore
			// No slot while submitting: every dispatch stays queued for the
			// dispatcher, which serves the oldest waiting thread first.
			r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
				ps = &poisonStore{Store: s, thread: "bad", err: c.err}
				return ps
			})
			bad, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "bad", Messages: []engine.Message{userMsg("first in line")}})
			if err != nil {
				t.Fatal(err)
			}
			var good []string
			for i := range 3 {
				res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("good%d", i), Messages: []engine.Message{userMsg("behind it")}})
				if err != nil {
					t.Fatal(err)
				}
				good = append(good, res.DispatchID)
			}
			r.start(t)
			// The dispatcher's wakes from the submits are spent before the
			// slot comes: the slot's pass claims the failing thread, and
			// nothing but the dispatcher's own look after the failure
			// brings the threads behind it (at a second it tried the
			// failing thread again first, for ever; a stress run found it).
			time.Sleep(100 * time.Millisecond)
			r.exec.setCapacity(1)
			for _, id := range good {
				eventually(t, "the threads behind the failing one run", func() bool { return dispatchStatus(t, r.store, id) == engine.StatusAcked })
			}
			if len(ps.triedAt()) == 0 {
				t.Fatal("the failing thread was never tried")
			}
			if st := dispatchStatus(t, r.store, bad.DispatchID); st != engine.StatusQueued {
				t.Fatalf("the failing thread's dispatch is %v; want it left queued", st)
			}
			var buf bytes.Buffer
			r.mb.Metrics().WritePrometheus(&buf)
			if !bytes.Contains(buf.Bytes(), []byte("mailbox_dispatch_held_threads 1\n")) {
				t.Fatalf("metrics do not report the held thread:\n%s", buf.Bytes())
			}
			// More passes of the dispatcher meanwhile: a submit, its run.
			if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "good9", Messages: []engine.Message{userMsg("kick")}}); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the kick's run", func() bool { runs, _, _ := r.exec.stats(); return runs == 4 })
			eventually(t, "three tries of the held thread", func() bool { return len(ps.triedAt()) >= 3 })
			at := ps.triedAt()
			gap1, gap2 := at[1].Sub(at[0]), at[2].Sub(at[1])
			if gap1 < 900*time.Millisecond || gap2 < 900*time.Millisecond {
				t.Fatalf("the held thread was tried again after %v, then %v; want a second at least", gap1, gap2)
			}
			if doubled := gap2 > 1800*time.Millisecond; doubled != c.doubles {
				t.Fatalf("tries %v then %v apart: doubling %v, want %v", gap1, gap2, doubled, c.doubles)
			}
		})
	}
}

// On a work-queue store a signal for a thread whose record is damaged is
// redelivered when the thread's hold ends, not at once (a claim error of
// another kind is still redelivered at once: the seed's
// TestSeed_dispatch_signal_loop_nacks_and_redelivers_after_claim_error).
func TestASignalForADamagedThreadComesBackAfterItsHold(t *testing.T) {
	ss := newSigStore(t, true)
	ss.claimErr = fmt.Errorf("decode dispatch: %w", engine.ErrCorrupt)
	ss.claimFailures.Store(1)
	mb := liveMailbox(t, ss, newFake(1, complete), sigConfig())
	d := sigEnqueue(t, mb, ss, "thread-damaged", "wake")
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the redelivered signal to run the dispatch", func() bool { return dispatchStatus(t, ss.Store, d.DispatchID) == engine.StatusAcked })
	delays := ss.nackDelays()
	if len(delays) != 1 || delays[0] < 900*time.Millisecond || delays[0] > time.Second {
		t.Fatalf("nack delays %v, want one of the thread's hold (a second)", delays)
	}
}

// cancelAfterSubmit stands for a client that goes away once its submit is
// durable: it cancels the caller's context, and the claim that follows
// honours it (as a networked store's does).
type cancelAfterSubmit struct {
	*badgerstore.Store
	cancel func()
}

func (c *cancelAfterSubmit) Submit(ctx context.Context, cp engine.Checkpoint, d engine.Dispatch) ([]engine.MessageRecord, engine.Dispatch, error) {
	recs, out, err := c.Store.Submit(ctx, cp, d)
	c.cancel()
	return recs, out, err
}

func (c *cancelAfterSubmit) ClaimStart(ctx context.Context, thread, consumer string, lease time.Duration, instance string, now int64) (*engine.Dispatch, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return c.Store.ClaimStart(ctx, thread, consumer, lease, instance, now)
}

// A claim that ends with its caller's context says nothing of the thread:
// it is not set aside, and the dispatcher runs its work (found by a
// review: it waited out a second's hold).
func TestAClaimEndedByItsCallerDoesNotHoldTheThread(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := newRigWith(t, newFake(1, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		return &cancelAfterSubmit{Store: s, cancel: cancel}
	})
	r.start(t)
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "healthy", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	r.mb.Metrics().WritePrometheus(&buf)
	if !bytes.Contains(buf.Bytes(), []byte("mailbox_dispatch_held_threads 0\n")) {
		t.Fatalf("the thread was set aside:\n%s", buf.Bytes())
	}
	eventually(t, "the run", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
}

// corruptRunStore fails the loads of one run's record with ErrCorrupt
// while poisoned, and records when.
type corruptRunStore struct {
	*badgerstore.Store
	run      atomic.Pointer[string]
	poisoned atomic.Bool
	mu       sync.Mutex
	tries    []time.Time
}

func (c *corruptRunStore) LoadRun(ctx context.Context, runID string) (*engine.RunRecord, error) {
	if p := c.run.Load(); p != nil && *p == runID && c.poisoned.Load() {
		c.mu.Lock()
		c.tries = append(c.tries, time.Now())
		c.mu.Unlock()
		return nil, fmt.Errorf("load run %s: decode: %w", runID, engine.ErrCorrupt)
	}
	return c.Store.LoadRun(ctx, runID)
}

func (c *corruptRunStore) triedAt() []time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.tries)
}

// A run whose records do not decode is not retried as a transient
// failure: no attempt is spent, its thread is set aside (a second, then
// doubling) and the others run on; once the records read again it runs.
// Each attempt failed at once as transient, and the run was
// dead-lettered within a second (found by review).
func TestARunWhoseRecordsDoNotDecodeSetsItsThreadAside(t *testing.T) {
	t.Parallel() // seven seconds of holds
	ctx := context.Background()
	var cs *corruptRunStore
	r := newRigWith(t, newFake(1, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		cs = &corruptRunStore{Store: s}
		return cs
	})
	bad, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "bad", Messages: []engine.Message{userMsg("damaged")}})
	if err != nil {
		t.Fatal(err)
	}
	cs.run.Store(&bad.RunID)
	cs.poisoned.Store(true)
	good, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "good", Messages: []engine.Message{userMsg("fine")}})
	if err != nil {
		t.Fatal(err)
	}
	r.start(t) // the submits queued: the dispatcher claims both
	eventually(t, "the other thread's run", func() bool { return dispatchStatus(t, r.store, good.DispatchID) == engine.StatusAcked })
	eventually(t, "three tries of the damaged run", func() bool { return len(cs.triedAt()) >= 3 })
	// The third attempt settles (put back, its thread held for four
	// seconds) a moment after its try.
	eventually(t, "the third attempt put back", func() bool {
		return dispatchStatus(t, r.store, bad.DispatchID) == engine.StatusQueued
	})
	if d := loadDispatch(t, r, bad.DispatchID); d.AttemptCount != 0 {
		t.Fatalf("the damaged run's dispatch: %d attempts; want none spent", d.AttemptCount)
	}
	eventually(t, "the held thread reported", func() bool {
		var buf bytes.Buffer
		r.mb.Metrics().WritePrometheus(&buf)
		return bytes.Contains(buf.Bytes(), []byte("mailbox_dispatch_held_threads 1\n"))
	})
	at := cs.triedAt()
	gap1, gap2 := at[1].Sub(at[0]), at[2].Sub(at[1])
	if gap1 < 900*time.Millisecond || gap2 < 1800*time.Millisecond {
		t.Fatalf("tried again after %v, then %v; want a second, then two", gap1, gap2)
	}
	cs.poisoned.Store(false) // mended
	eventually(t, "the mended run", func() bool { return dispatchStatus(t, r.store, bad.DispatchID) == engine.StatusAcked })
}

// An agent that goes away with every run it takes (a crash loop: GOAWAY,
// FINISH shutdown, reconnect) has it put back without an attempt spent
// three times in a row; from the fourth on each spends one, and the run
// is dead-lettered once they are spent. It ran again at once, for ever,
// and nothing recorded it (found by review: forty attempts in 0.9 s).
func TestAnAgentShuttingDownWithEveryRunSpendsItsAttemptsFromTheFourth(t *testing.T) {
	goAway := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentShutdown, Error: "agent shutting down"}
	}
	r := newRig(t, newFake(1, goAway), engine.Config{MaxAttempts: 2})
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the dead letter", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
	if runs, _, _ := r.exec.stats(); runs != 3+2 {
		t.Fatalf("%d attempts executed; want three put back, then the two the budget holds", runs)
	}
	d := loadDispatch(t, r, res.DispatchID)
	if d.AttemptCount != 2 || !strings.Contains(d.LastError, "shut down with it 5 times in a row") {
		t.Fatalf("dispatch: %d attempts spent, last error %q", d.AttemptCount, d.LastError)
	}
}
