package engine_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A run that shutdown cancels goes back to the queue and runs again after
// the restart. Its stream ends with the sidecar's "interrupted"
// run_finish, not the agent's "cancelled" one, which told the client the
// run was over (found by review); an agent that completes the run on its
// own at shutdown keeps its word.
func TestAShutdownCancelsNoStreamAsCancelled(t *testing.T) {
	for _, finishes := range []bool{false, true} {
		name := map[bool]string{false: "obeys the cancel", true: "completes on its own"}[finishes]
		t.Run(name, func(t *testing.T) {
			script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
				sink.Emit([]byte(`{"type":"text_delta","delta":"working"}`))
				<-ctx.Done()
				if finishes {
					sink.Emit([]byte(`{"type":"run_finish","termination":{"type":"natural_end"},"by":"the agent"}`))
					return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
				}
				sink.Emit([]byte(`{"type":"run_finish","termination":{"type":"cancelled"}}`))
				return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
			}
			r := newRig(t, newFake(1, script), engine.Config{})
			r.start(t)
			ctx := context.Background()
			res, log, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "the agent's first event", func() bool { evs, _ := readAll(log, 0); return len(evs) > 0 })
			grace, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			defer cancel()
			if err := r.mb.Stop(grace); err != nil {
				t.Fatal(err)
			}
			evs, _ := readAll(log, 0)
			var seen []string
			for _, e := range evs {
				if e.Type == "run_finish" {
					seen = append(seen, string(e.Data))
				}
			}
			d, _ := r.store.LoadDispatch(ctx, res.DispatchID)
			if finishes {
				if len(seen) != 1 || !strings.Contains(seen[0], `"by":"the agent"`) || d.Status != engine.StatusAcked {
					t.Fatalf("run_finish events %v, dispatch %v: want the agent's own, byte for byte, acked", seen, d.Status)
				}
				return
			}
			// With retry_at, as a retried attempt's (found by review: a
			// client took it for a final failure).
			if len(seen) != 1 || strings.Contains(seen[0], "cancelled") || !strings.Contains(seen[0], "interrupted") || !strings.Contains(seen[0], `"retry_at":`) {
				t.Fatalf("run_finish events %v: want one, the sidecar's interrupted with retry_at, not the agent's cancelled", seen)
			}
			if d.Status != engine.StatusQueued || d.AttemptCount != 0 {
				t.Fatalf("after shutdown the dispatch is %v (attempts %d), want queued again", d.Status, d.AttemptCount)
			}
		})
	}
}

// A run whose lease was lost (the sidecar paused, the store stalled) is
// cancelled and retried, as a sweep's reclaim would: its stream ends with
// the sidecar's lease_lost error, not the agent's "cancelled" (found by
// review: the client was told the run was cancelled, then it ran again
// and finished), and the run is not recorded as cancelled.
func TestALostLeaseEndsNoStreamAsCancelled(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.Attempt > 1 {
			return complete(ctx, req, sink)
		}
		<-ctx.Done()
		sink.Emit([]byte(`{"type":"run_finish","termination":{"type":"cancelled"}}`))
		return execCancelled()
	}
	r, _ := newExecRig(t, newFake(1, script), engine.Config{Lease: 2 * time.Second, RenewInterval: 50 * time.Millisecond, RetryDelay: 10 * time.Millisecond},
		func(s *execFaultStore) {
			s.extendLease = func(n int32) (bool, error, bool) {
				if n == 1 {
					return false, nil, false // lost
				}
				return false, nil, true
			}
		})
	r.start(t)
	ctx := context.Background()
	res, log, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first attempt's end", func() bool { _, closed := log.ClosedAt(); return closed })
	evs, _ := readAll(log, 0)
	var seen []string
	for _, e := range evs {
		if e.Type == "run_finish" {
			seen = append(seen, string(e.Data))
		}
	}
	if len(seen) != 1 || strings.Contains(seen[0], "cancelled") || !strings.Contains(seen[0], "lease") {
		t.Fatalf("run_finish events %v: want one, the sidecar's lease_lost error, not the agent's cancelled", seen)
	}
	d := waitAcked(t, r, res.DispatchID)
	run, err := r.store.LoadRun(ctx, res.RunID)
	if err != nil || run == nil || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermNaturalEnd || d.AttemptCount != 1 {
		t.Fatalf("after the retry: run %+v (%v), dispatch attempts %d; want the retry's natural end, one attempt spent", run, err, d.AttemptCount)
	}
}

// waitAcked waits for dispatch id to be acked and returns it.
func waitAcked(t *testing.T, r *rig, id string) engine.Dispatch {
	t.Helper()
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, id) == engine.StatusAcked })
	d, err := r.store.LoadDispatch(context.Background(), id)
	if err != nil || d == nil {
		t.Fatalf("load %s: %v %v", id, d, err)
	}
	return *d
}

// GC meeting a foreground submit whose dispatch is not written yet leaves
// its stream alone (found by review: GC found no dispatch, took the run for
// one that ended elsewhere and closed the stream, which a proxy ended with
// a "cancelled" run_finish, and the run then ran into a log nobody read).
func TestGCDuringAForegroundSubmitLeavesItsStream(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	r, _ := newExecRig(t, newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		sink.Emit([]byte(`{"type":"text_delta","delta":"the answer"}`))
		return complete(ctx, req, sink)
	}), engine.Config{}, func(s *execFaultStore) {
		s.beforeSubmitIdle = func() {
			once.Do(func() { close(entered); <-release })
		}
	})
	r.start(t)
	ctx := context.Background()
	type out struct {
		log *engine.EventLog
		err error
	}
	done := make(chan out, 1)
	go func() {
		_, log, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
		done <- out{log, err}
	}()
	<-entered
	r.mb.GC(ctx) // the submit's dispatch does not exist yet
	close(release)
	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	eventually(t, "the stream's end", func() bool { _, closed := o.log.ClosedAt(); return closed })
	evs, _ := readAll(o.log, 0)
	if len(evs) == 0 {
		t.Fatal("the submitter's stream ended empty; want the run's events")
	}
	var all []string
	for _, e := range evs {
		all = append(all, string(e.Data))
	}
	if s := strings.Join(all, " | "); !strings.Contains(s, "the answer") || evs[len(evs)-1].Type != "run_finish" || strings.Contains(s, "cancelled") {
		t.Fatalf("the submitter's stream: %s; want the run's events", s)
	}
}

// A queued foreground run that another sidecar sharing the store ran to
// its end ends its submitter's stream with how it ended (found by review:
// GC closed it as "cancelled"), at the id apart from every started
// attempt's.
func TestAForegroundRunThatEndedElsewhereEndsItsStreamAsItEnded(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{}) // no agent here: it stays queued
	r.start(t)
	ctx := context.Background()
	res, log, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	// Another sidecar claims and completes it.
	d, err := r.store.ClaimDispatch(ctx, res.DispatchID, "elsewhere", time.Minute, time.Now().UnixMilli())
	if err != nil || d == nil {
		t.Fatalf("claim elsewhere: %v %v", d, err)
	}
	if err := r.store.Complete(ctx, d.DispatchID, d.ClaimToken, engine.RunResult{RunID: res.RunID, InstanceID: "other-instance", Status: engine.RunDone,
		Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "done there"}, time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	r.mb.GC(ctx)
	if _, closed := log.ClosedAt(); !closed {
		t.Fatal("the stream of a run that ended elsewhere is still open after GC")
	}
	evs, _ := readAll(log, 0)
	if len(evs) != 1 || evs[0].Type != "run_finish" || !strings.Contains(string(evs[0].Data), "natural_end") || evs[0].Seq != engine.WithdrawnFinishID {
		t.Fatalf("the stream's events: %+v; want one run_finish natural_end at id %d", evs, engine.WithdrawnFinishID)
	}
}

// completeElsewhere claims and completes dispatch id as another sidecar
// sharing the store would.
func completeElsewhere(t *testing.T, s engine.Store, id, runID string) {
	t.Helper()
	ctx := context.Background()
	d, err := s.ClaimDispatch(ctx, id, "elsewhere", time.Minute, time.Now().UnixMilli())
	if err != nil || d == nil {
		t.Fatalf("claim elsewhere: %v %v", d, err)
	}
	completeClaimedElsewhere(t, s, d, runID)
}

// A sweep ends the stream of a queued foreground run acked elsewhere, as
// it ends those of withdrawn ones: not only the next GC, up to a minute
// later (found by the crash test of two sidecars on one NATS queue: a
// submitter's stream open 30 s after its run ended on the other sidecar).
func TestASweepEndsTheStreamOfAForegroundRunAckedElsewhere(t *testing.T) {
	r, res, log := queuedForegroundRig(t, false)
	completeElsewhere(t, r.store, res.DispatchID, res.RunID)
	r.mb.Sweep(context.Background())
	if _, closed := log.ClosedAt(); !closed {
		t.Fatal("the stream of a run acked elsewhere is still open after a sweep")
	}
	wantOneFinish(t, log, "natural_end")
}

// On a shared store the submitter's stream of a queued foreground run
// that ran and ended on another sidecar ends within about a second,
// without waiting for a sweep or a GC.
func TestOnASharedStoreAStreamEndsSoonAfterItsRunEndedElsewhere(t *testing.T) {
	r, res, log := queuedForegroundRig(t, true)
	completeElsewhere(t, r.store, res.DispatchID, res.RunID)
	eventually(t, "the stream's end", func() bool { _, closed := log.ClosedAt(); return closed })
	wantOneFinish(t, log, "natural_end")
}

// On a shared store the submitter's stream of a queued foreground run
// whose attempt failed on another sidecar ends as a local failure's does:
// a run_finish with the error and retry_at, after which a re-attach
// follows the retry to its end (found by review: the stream waited out
// every retry and learned of none).
func TestOnASharedStoreAStreamEndsWhenItsRunFailedElsewhere(t *testing.T) {
	r, res, log := queuedForegroundRig(t, true)
	ctx := context.Background()
	d, err := r.store.ClaimDispatch(ctx, res.DispatchID, "elsewhere", time.Minute, time.Now().UnixMilli())
	if err != nil || d == nil {
		t.Fatalf("claim elsewhere: %v %v", d, err)
	}
	retryAt := time.Now().Add(time.Hour).UnixMilli()
	if _, err := r.store.Nack(ctx, d.DispatchID, d.ClaimToken, retryAt, "provider overloaded", time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the stream's end", func() bool { _, closed := log.ClosedAt(); return closed })
	wantOneFinish(t, log, "provider overloaded", fmt.Sprintf(`"retry_at":%d`, retryAt))
	evs, _ := readAll(log, 0)
	// Re-attached, the client follows the retry; it ends elsewhere.
	again, err := r.mb.Attach(ctx, "t1", evs[0].Seq)
	if err != nil || again == nil || again == log {
		t.Fatalf("re-attach: %v %v", again, err)
	}
	completeElsewhere(t, r.store, res.DispatchID, res.RunID)
	eventually(t, "the re-attached stream's end", func() bool { _, closed := again.ClosedAt(); return closed })
	evs, _ = readAll(again, 0)
	if len(evs) == 0 || !strings.Contains(string(evs[len(evs)-1].Data), "natural_end") {
		t.Fatalf("the re-attached stream's events: %+v; want the retry's natural_end", evs)
	}
}

// An idempotent repeat of a foreground submit whose run is queued follows
// that run to its end, as the first submitter's stream does (found by
// review: it got `submitted` and an ended stream, and ctl exited 1).
func TestARepeatedForegroundSubmitFollowsTheQueuedRun(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{SweepInterval: time.Hour, GCInterval: time.Hour}) // no agent here: it stays queued
	r.start(t)
	ctx := context.Background()
	req := engine.SubmitRequest{ThreadID: "t1", DedupeKey: "k1", Messages: []engine.Message{userMsg("x")}}
	first, log1, err := r.mb.Submit(ctx, req)
	if err != nil || log1 == nil {
		t.Fatalf("first submit: %+v %v %v", first, log1, err)
	}
	again, log2, err := r.mb.Submit(ctx, req)
	if err != nil || again.DispatchID != first.DispatchID {
		t.Fatalf("repeat: %+v %v; want the first's dispatch %s", again, err, first.DispatchID)
	}
	if log2 == nil {
		t.Fatal("the repeat follows nothing")
	}
	completeElsewhere(t, r.store, first.DispatchID, first.RunID)
	r.mb.Sweep(ctx)
	for i, l := range []*engine.EventLog{log1, log2} {
		eventually(t, "the stream's end", func() bool { _, closed := l.ClosedAt(); return closed })
		evs, _ := readAll(l, 0)
		if len(evs) == 0 || evs[len(evs)-1].Type != "run_finish" || !strings.Contains(string(evs[len(evs)-1].Data), "natural_end") {
			t.Fatalf("stream %d: %+v; want the run's natural_end", i, evs)
		}
	}
}

// A foreground repeat of a run executing on another sidecar follows it to
// its end also when this sidecar still keeps the thread's previous run's
// log (found by review: the repeat followed nothing).
func TestARepeatFollowsARunElsewherePastTheThreadsEarlierLog(t *testing.T) {
	r := newRigWith(t, newFake(1, complete), engine.Config{SweepInterval: time.Hour, GCInterval: time.Hour, EventRetention: time.Hour},
		func(s *badgerstore.Store) engine.Store { return silentSignalStore{s} })
	r.start(t)
	ctx := context.Background()
	_, earlier, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("first")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the earlier run's end", func() bool { _, closed := earlier.ClosedAt(); return closed })
	r.exec.setCapacity(0) // the next run is another sidecar's
	req := engine.SubmitRequest{ThreadID: "t1", DedupeKey: "k", Messages: []engine.Message{userMsg("second")}}
	first, err := r.mb.SubmitBackground(ctx, req) // as another sidecar's submit: no waiting log here
	if err != nil {
		t.Fatal(err)
	}
	d, err := r.store.ClaimDispatch(ctx, first.DispatchID, "elsewhere", time.Minute, time.Now().UnixMilli())
	if err != nil || d == nil {
		t.Fatalf("claim elsewhere: %v %v", d, err)
	}
	again, l, err := r.mb.Submit(ctx, req)
	if err != nil || again.DispatchID != first.DispatchID || l == nil || l == earlier {
		t.Fatalf("the repeat: %+v %v; log %p (the earlier run's %p)", again, err, l, earlier)
	}
	completeClaimedElsewhere(t, r.store, d, first.RunID)
	eventually(t, "the repeat's stream end", func() bool { _, closed := l.ClosedAt(); return closed })
	evs, _ := readAll(l, 0)
	if len(evs) == 0 || !strings.Contains(string(evs[len(evs)-1].Data), "natural_end") || !strings.Contains(string(evs[len(evs)-1].Data), first.DispatchID) {
		t.Fatalf("the repeat's stream: %+v; want its run's natural_end", evs)
	}
}

// completeClaimedElsewhere completes d, claimed by another sidecar.
func completeClaimedElsewhere(t *testing.T, s engine.Store, d *engine.Dispatch, runID string) {
	t.Helper()
	if err := s.Complete(context.Background(), d.DispatchID, d.ClaimToken, engine.RunResult{RunID: runID, InstanceID: "other-instance", Status: engine.RunDone,
		Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "done there"}, time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
}

// queuedForegroundRig starts a rig with no agent slot (a foreground run
// stays queued here, for another sidecar to take), on a store shared
// between processes when shared, and submits one foreground run on t1.
func queuedForegroundRig(t *testing.T, shared bool) (*rig, engine.SubmitResult, *engine.EventLog) {
	t.Helper()
	cfg := engine.Config{SweepInterval: time.Hour, GCInterval: time.Hour}
	var r *rig
	if shared {
		r = newRigWith(t, newFake(0, complete), cfg, func(s *badgerstore.Store) engine.Store { return silentSignalStore{s} })
	} else {
		r = newRig(t, newFake(0, complete), cfg)
	}
	r.start(t)
	res, log, err := r.mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	return r, res, log
}

// wantOneFinish checks that log holds one event, a run_finish whose data
// has each of want.
func wantOneFinish(t *testing.T, log *engine.EventLog, want ...string) {
	t.Helper()
	evs, _ := readAll(log, 0)
	ok := len(evs) == 1 && evs[0].Type == "run_finish"
	for _, w := range want {
		ok = ok && strings.Contains(string(evs[0].Data), w)
	}
	if !ok {
		t.Fatalf("the stream's events: %+v; want one run_finish with %q", evs, want)
	}
}
