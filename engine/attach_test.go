package engine_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// afterListStore runs hook once, right after a ListDispatches read that
// found something (Attach's), before Attach registers its log: fault
// injection for the moment between the two.
type afterListStore struct {
	*badgerstore.Store
	mu   sync.Mutex
	hook func()
}

func (h *afterListStore) ListDispatches(ctx context.Context, thread string, f engine.StatusFilter, limit, offset int) ([]engine.Dispatch, error) {
	ds, err := h.Store.ListDispatches(ctx, thread, f, limit, offset)
	if len(ds) == 0 {
		return ds, err
	}
	h.mu.Lock()
	hook := h.hook
	h.hook = nil
	h.mu.Unlock()
	if hook != nil {
		hook()
	}
	return ds, err
}

func (h *afterListStore) setHook(f func()) {
	h.mu.Lock()
	h.hook = f
	h.mu.Unlock()
}

// claimAsDeadProcess enqueues dispatch id of thread and claims and starts
// it as a killed process left it.
func claimAsDeadProcess(t *testing.T, s *badgerstore.Store, id, thread string, maxAttempts uint32, lease time.Duration) {
	t.Helper()
	ctx := context.Background()
	now := time.Now().UnixMilli()
	if _, err := s.Enqueue(ctx, engine.Dispatch{DispatchID: id, ThreadID: thread, RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: now, CreatedAt: now, MaxAttempts: maxAttempts}); err != nil {
		t.Fatal(err)
	}
	d, err := s.ClaimDispatch(ctx, id, "killed-process", lease, now)
	if err != nil || d == nil {
		t.Fatalf("claim: %v %v", d, err)
	}
	if err := s.RecordDispatchStart(ctx, id, d.ClaimToken, "killed-attempt", now); err != nil {
		t.Fatal(err)
	}
}

// A client attaching to a run of a killed process whose dispatch ends in
// the moment between Attach's read and its registration — cancelled, or
// dead-lettered by a sweep — learns it at once: the withdrawal or the
// sweep found no log to end then (found by review: the log stayed open
// until the next GC, a minute by default).
func TestAttachToADispatchThatEndsMeanwhile(t *testing.T) {
	for _, tc := range []struct {
		name        string
		maxAttempts uint32
		end         func(t *testing.T, r *rig)
		want        engine.DispatchStatus
		finish      string
	}{
		{"cancelled", 3, func(t *testing.T, r *rig) {
			// Queued again after the killed process's attempt, then
			// cancelled.
			if ok, err := r.mb.Cancel(context.Background(), "d1"); !ok || err != nil {
				t.Errorf("cancel: %v %v", ok, err)
			}
		}, engine.StatusCancelled, `"cancelled"`},
		{"dead-lettered", 1, func(t *testing.T, r *rig) {
			time.Sleep(80 * time.Millisecond) // the killed process's lease lapses
			r.mb.Sweep(context.Background())
		}, engine.StatusDeadLetter, `"error"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hs *afterListStore
			r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store {
				hs = &afterListStore{Store: s}
				return hs
			})
			ctx := context.Background()
			claimAsDeadProcess(t, r.store, "d1", "t1", tc.maxAttempts, 50*time.Millisecond)
			if tc.want == engine.StatusCancelled {
				time.Sleep(80 * time.Millisecond)
				r.mb.Sweep(ctx) // reclaimed: queued again, an attempt spent
				if d, _ := r.store.LoadDispatch(ctx, "d1"); d.Status != engine.StatusQueued || d.AttemptCount != 1 {
					t.Fatalf("after the sweep: %+v", d)
				}
			}
			hs.setHook(func() { tc.end(t, r) })
			l, err := r.mb.Attach(ctx, "t1", 0)
			if err != nil || l == nil {
				t.Fatalf("attach: %v %v", l, err)
			}
			if st := dispatchStatus(t, r.store, "d1"); st != tc.want {
				t.Fatalf("status %s, want %s", st, tc.want)
			}
			if _, closed := l.ClosedAt(); !closed {
				t.Fatal("the dispatch ended, the attached log is still open")
			}
			evs, _ := readAll(l, 0)
			if len(evs) != 1 || evs[0].Type != "run_finish" || !strings.Contains(string(evs[0].Data), tc.finish) {
				t.Fatalf("the log: %s, want one run_finish with %s", describe(evs), tc.finish)
			}
		})
	}
}

// Attach follows no run where none is active: a thread whose next
// dispatch never had an attempt, or that has none.
func TestAttachWithoutAnActiveRun(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{})
	ctx := context.Background()
	now := time.Now().UnixMilli()
	if _, err := r.store.Enqueue(ctx, engine.Dispatch{DispatchID: "q1", ThreadID: "t1", RunID: "run-q1", Priority: engine.DefaultPriority, AvailableAt: now + time.Hour.Milliseconds(), CreatedAt: now, MaxAttempts: 3}); err != nil {
		t.Fatal(err)
	}
	for _, thread := range []string{"t1", "none"} {
		if l, err := r.mb.Attach(ctx, thread, 0); l != nil || err != nil {
			t.Fatalf("thread %s: %v %v, want no run", thread, l, err)
		}
	}
}

// An attempt that fails transiently ends its log with a run_finish that
// names the retry (retry_at); a client that read it to that end and
// re-attaches with its id follows the retry's attempt, from its first
// event and without a reset (found by review: the retry ran unseen; a
// re-attachment replayed the failed attempt's end again). A final failure
// names no retry.
func TestAClientFollowsTheRetryOfAFailedAttempt(t *testing.T) {
	var attempt atomic.Int32
	proceed := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		switch attempt.Add(1) {
		case 1:
			taggedEvents(sink, "first", 2)
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "flaky model"}
		case 2:
			<-proceed
			taggedEvents(sink, "second", 3)
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "flaky again"}
		}
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "never"}
	}
	r := newRig(t, newFake(1, script), engine.Config{RetryDelay: 50 * time.Millisecond, MaxRetryDelay: 50 * time.Millisecond, MaxAttempts: 2})
	r.start(t)
	ctx := context.Background()
	res, log1, last, follow := followTheRetry(t, r)
	if again, _ := r.mb.Attach(ctx, "t1", last.Seq-1); again != log1 {
		t.Fatal("a client that did not read attempt 1 to its end is not served it")
	}
	close(proceed)
	eventually(t, "attempt 2 ended", func() bool { _, closed := follow.ClosedAt(); return closed })
	got, reset := readAll(follow, last.Seq)
	if reset || tagged(got, "second") != 3 || got[0].Seq <= last.Seq {
		t.Fatalf("followed from %d: reset=%v %s, want attempt 2 whole without a reset", last.Seq, reset, describe(got))
	}
	fin := got[len(got)-1]
	if fin.Type != "run_finish" || strings.Contains(string(fin.Data), "retry_at") {
		t.Fatalf("the last attempt ended with %s, want a run_finish without retry_at", fin.Data)
	}
	eventually(t, "dead-lettered", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
}

// The run_finish that ends an attached log whose dispatch ended without
// running here is numbered in the band of the run's last recorded start,
// above the ids its client saw of that attempt, not in the first band
// (found by review: a client of a run's second attempt got a lower id).
func TestAnAttachedLogEndsInTheBandOfTheRunsLastStart(t *testing.T) {
	r := newRigWith(t, newFake(0, complete), engine.Config{MaxAttempts: 2}, nil)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 { // two attempts of a killed process, each started
		d, err := r.store.ClaimDispatch(ctx, res.DispatchID, "killed-process", 30*time.Millisecond, time.Now().UnixMilli())
		if err != nil || d == nil {
			t.Fatalf("claim %d: %v %v", i, d, err)
		}
		if err := r.store.RecordDispatchStart(ctx, res.DispatchID, d.ClaimToken, fmt.Sprint("killed-attempt-", i), time.Now().UnixMilli()); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			time.Sleep(50 * time.Millisecond)
			r.mb.Sweep(ctx) // reclaimed: queued again
		}
	}
	l, err := r.mb.Attach(ctx, "t1", 0)
	if err != nil || l == nil {
		t.Fatalf("attach: %v %v", l, err)
	}
	time.Sleep(50 * time.Millisecond)
	r.mb.Sweep(ctx) // the second lapse spends the last attempt
	evs, _ := readAll(l, 0)
	const secondBandUnstarted = 1<<32 + 1<<31 + 1
	if len(evs) != 1 || evs[0].Type != "run_finish" || evs[0].Seq != secondBandUnstarted {
		t.Fatalf("the attached log: %s, want one run_finish with id %d", describe(evs), uint64(secondBandUnstarted))
	}
}

// An agent's own run_finish stands only if its attempt completes: one
// that then fails (its connection lost before FINISH, say) ends its log
// with the sidecar's run_finish saying how — retry_at for a retry, the
// error for a dead letter — not the agent's natural_end (found by
// review: the client was told the run ended well, and it ran again).
func TestAnAgentsRunFinishStandsOnlyIfItsAttemptCompletes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		outcome engine.RunOutcome
		want    []string
		not     string
	}{
		{"transient", engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "agent lost"}, []string{`"retry_at":`, `"agent lost"`}, "natural_end"},
		{"permanent", engine.RunOutcome{Kind: engine.OutcomePermanent, Error: "bad input"}, []string{`"bad input"`}, "natural_end"},
		{"completed", engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}, []string{`"natural_end"`, `"agent":true`}, "retry_at"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
				sink.Emit([]byte(`{"type":"text_delta","delta":"hi"}`))
				sink.Emit([]byte(`{"type":"run_finish","agent":true,"termination":{"type":"natural_end"}}`))
				return tc.outcome
			}
			r := newRig(t, newFake(1, script), engine.Config{MaxAttempts: 3, RetryDelay: time.Hour, MaxRetryDelay: time.Hour})
			r.start(t)
			_, l, err := r.mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "the attempt ended", func() bool { _, closed := l.ClosedAt(); return closed })
			evs, _ := readAll(l, 0)
			finishes := 0
			for _, e := range evs {
				if e.Type == "run_finish" {
					finishes++
				}
			}
			last := string(evs[len(evs)-1].Data)
			if finishes != 1 || evs[len(evs)-1].Type != "run_finish" || strings.Contains(last, tc.not) {
				t.Fatalf("the log: %s", describe(evs))
			}
			for _, w := range tc.want {
				if !strings.Contains(last, w) {
					t.Fatalf("its run_finish %s lacks %s", last, w)
				}
			}
		})
	}
}

// run_finish is the agent's last event: one it sends after it is dropped,
// not passed ahead of the held run_finish (found by review: clients saw
// A, B, run_finish for an agent's A, run_finish, B).
func TestAgentEventsAfterItsRunFinishAreDropped(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		sink.Emit([]byte(`{"type":"text_delta","delta":"A"}`))
		sink.Emit([]byte(`{"type":"run_finish","agent":true,"termination":{"type":"natural_end"}}`))
		sink.Emit([]byte(`{"type":"text_delta","delta":"B"}`))
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	_, l, err := r.mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the attempt ended", func() bool { _, closed := l.ClosedAt(); return closed })
	evs, _ := readAll(l, 0)
	var got []string
	for _, e := range evs {
		if e.Type == "text_delta" || e.Type == "run_finish" {
			got = append(got, e.Type+":"+string(e.Data))
		}
	}
	if len(got) != 2 || !strings.Contains(got[0], `"A"`) || !strings.Contains(got[1], `"agent":true`) {
		t.Fatalf("the log: %s, want A then the agent's run_finish", describe(evs))
	}
}

// An interrupted attempt whose agent sent run_finish (cancelled) and then
// failed: its dispatch is superseded, not retried, so its clients get the
// agent's run_finish, not one announcing a retry (found by review).
func TestAnInterruptedAttemptIsNotAnnouncedAsRetried(t *testing.T) {
	started := make(chan struct{}, 1)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		started <- struct{}{}
		<-ctx.Done()
		sink.Emit([]byte(`{"type":"run_finish","agent":true,"termination":{"type":"cancelled"}}`))
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "stopped"}
	}
	r := newRig(t, newFake(1, script), engine.Config{MaxAttempts: 3, RetryDelay: time.Hour, MaxRetryDelay: time.Hour})
	r.start(t)
	_, l, err := r.mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	if _, err := r.mb.Interrupt(context.Background(), "t1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the attempt ended", func() bool { _, closed := l.ClosedAt(); return closed })
	evs, _ := readAll(l, 0)
	last := string(evs[len(evs)-1].Data)
	if strings.Contains(last, "retry_at") || !strings.Contains(last, `"agent":true`) {
		t.Fatalf("the interrupted attempt ended with %s, want the agent's run_finish", last)
	}
}

// followTheRetry submits a foreground run to thread t1 whose first
// attempt fails transiently, reads that attempt to its run_finish (which
// must name the retry) and re-attaches with its id: it returns the
// submit, the first attempt's log and last event, and the log followed.
func followTheRetry(t *testing.T, r *rig) (engine.SubmitResult, *engine.EventLog, engine.Event, *engine.EventLog) {
	t.Helper()
	ctx := context.Background()
	res, log1, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil || log1 == nil {
		t.Fatalf("submit: %+v %v", res, err)
	}
	eventually(t, "attempt 1 ended", func() bool { _, closed := log1.ClosedAt(); return closed })
	seen, _ := readAll(log1, 0)
	last := seen[len(seen)-1]
	if last.Type != "run_finish" || !strings.Contains(string(last.Data), `"retry_at":`) {
		t.Fatalf("attempt 1 ended with %s, want a run_finish with retry_at", describe(seen))
	}
	follow, err := r.mb.Attach(ctx, "t1", last.Seq)
	if err != nil || follow == nil || follow == log1 {
		t.Fatalf("attach after the end: %v %v (the failed attempt's log: %v)", follow, err, follow == log1)
	}
	return res, log1, last, follow
}
