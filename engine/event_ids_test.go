package engine_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Event ids of a run across attempts whose earlier event log is gone
// (spec/http.md, Events: a client that re-attaches with Last-Event-ID
// misses nothing still buffered; an id it cannot be served from gets
// `event: reset`). Each test has attempt 1 emit events a client reads,
// loses attempt 1's log (a restart, a sidecar killed with its claim, a
// retry later than EventRetention), lets attempt 2 emit more events than
// the client saw, and re-attaches with the last id the client saw. The
// ids used to restart at 1 with the new log, so the re-attached client
// was served attempt 2 from the middle, without a reset.

// taggedEvents emits n text_delta events {"tag":tag,"n":i}.
func taggedEvents(sink engine.EventSink, tag string, n int) {
	for i := 1; i <= n; i++ {
		sink.Emit(fmt.Appendf(nil, `{"type":"text_delta","tag":%q,"n":%d}`, tag, i))
	}
}

// readAll reads what log holds after `after` without waiting.
func readAll(log *engine.EventLog, after uint64) (evs []engine.Event, reset bool) {
	for {
		batch, r, _, _ := log.Read(after, 64, nil)
		reset = reset || r
		if len(batch) == 0 {
			return evs, reset
		}
		for _, e := range batch {
			evs = append(evs, engine.Event{Seq: e.Seq, Type: e.Type, Data: append([]byte(nil), e.Data...)})
		}
		after = batch[len(batch)-1].Seq
	}
}

// tagged counts the events of evs that carry tag.
func tagged(evs []engine.Event, tag string) int {
	n := 0
	for _, e := range evs {
		if strings.Contains(string(e.Data), `"tag":"`+tag+`"`) {
			n++
		}
	}
	return n
}

// checkReattachMissesNothing is the client's re-attachment to log with
// the last id it saw of the earlier attempt (seen): it must get the new
// attempt from its first event, or a reset (and then its first event), and
// every id of the new attempt must be above every id seen before.
func checkReattachMissesNothing(t *testing.T, log *engine.EventLog, seen []engine.Event, tag string, n int) {
	t.Helper()
	last := seen[len(seen)-1].Seq
	all, _ := readAll(log, 0)
	if tagged(all, tag) != n {
		t.Fatalf("the new attempt's log holds %d %q events, want %d: %s", tagged(all, tag), tag, n, describe(all))
	}
	if last > log.LastSeq() {
		t.Fatalf("setup: the client's id %d is beyond the new log (last %d); the test needs a log that went past it", last, log.LastSeq())
	}
	for _, e := range all {
		if e.Seq <= last {
			t.Errorf("event id %d of the new attempt (%s) is not above the last id %d the client saw of the earlier one: ids are reused across attempts", e.Seq, e.Data, last)
			break
		}
	}
	if fresh, reset := readAll(log, 0); reset || len(fresh) != len(all) {
		t.Errorf("a client that saw nothing yet: reset=%v, %d events, want the whole log (%d) without a reset", reset, len(fresh), len(all))
	}
	got, reset := readAll(log, last)
	if len(got) == 0 || !strings.Contains(string(got[0].Data), fmt.Sprintf(`"tag":%q,"n":1}`, tag)) || tagged(got, tag) != n {
		t.Fatalf("re-attached with Last-Event-ID %d (the earlier attempt's): reset=%v, got %s; want the new attempt from its first event (%d %q events), with or without a reset — without a reset the client silently misses the skipped ones",
			last, reset, describe(got), n, tag)
	}
}

func describe(evs []engine.Event) string {
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "[%d %s] ", e.Seq, e.Data)
	}
	return b.String()
}

// A graceful restart: Stop releases the running attempt without spending
// one (its dispatch's attempt number stays 1), and the next sidecar runs
// the run again as attempt 1.
func TestEventIDsGrowAcrossARestart(t *testing.T) {
	first := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		taggedEvents(sink, "first", 3)
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "cancelled"}
	}
	r := newRig(t, newFake(1, first), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-restart", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	var log1 *engine.EventLog
	eventually(t, "attempt 1's events", func() bool {
		log1 = r.mb.Reattach("t-restart")
		if log1 == nil {
			return false
		}
		evs, _ := readAll(log1, 0)
		return tagged(evs, "first") == 3
	})
	grace, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := r.mb.Stop(grace); err != nil {
		t.Fatal(err)
	}
	seen, _ := readAll(log1, 0) // the client saw everything, the synthetic run_finish included
	if d := execLoad(t, r.store, res.DispatchID); d.Status != engine.StatusQueued || d.AttemptCount != 0 {
		t.Fatalf("after Stop the dispatch is %+v, want queued with no attempt spent", d)
	}

	hold := make(chan struct{})
	second := newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		taggedEvents(sink, "second", 6)
		select {
		case <-hold:
		case <-ctx.Done():
		}
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	})
	mb2, err := engine.New(r.store, second, engine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(hold)
		stop, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := mb2.Stop(stop); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	if err := mb2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var log2 *engine.EventLog
	eventually(t, "attempt 2's events", func() bool {
		log2 = mb2.Reattach("t-restart")
		if log2 == nil {
			return false
		}
		evs, _ := readAll(log2, 0)
		return tagged(evs, "second") == 6
	})
	if runs := second.execRuns(); len(runs) != 1 || runs[0].Attempt != 1 {
		t.Fatalf("after the restart: %+v, want one run, attempt 1 again", runs)
	}
	checkReattachMissesNothing(t, log2, seen, "second", 6)
}

// A sidecar killed while it ran the run: its claim (whose start it had
// recorded) lapses, and the next sidecar's recovery reclaims and retries
// the run. The client saw five events of the killed attempt.
func TestEventIDsGrowAfterAKilledSidecarsAttempt(t *testing.T) {
	ctx := context.Background()
	s := liveStore(t)
	hold := make(chan struct{})
	mb := liveMailbox(t, s, newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		taggedEvents(sink, "retry", 6)
		select {
		case <-hold:
		case <-ctx.Done():
		}
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	}), engine.Config{})
	t.Cleanup(func() { close(hold) }) // before the mailbox stops
	d := livePrepared(t, mb, engine.SubmitRequest{ThreadID: "t-killed", Messages: []engine.Message{userMsg("x")}})
	past := time.Now().UnixMilli() - 5000
	d.AvailableAt = past
	if _, err := s.Enqueue(ctx, d); err != nil {
		t.Fatal(err)
	}
	// The killed sidecar claimed the dispatch and recorded the attempt's
	// start; its lease lapsed long ago.
	c, err := s.ClaimStart(ctx, "t-killed", "dead-consumer", time.Millisecond, "dead-instance", past)
	if err != nil || c == nil || c.InstanceID != "dead-instance" {
		t.Fatalf("claim and start of the killed sidecar: %+v %v", c, err)
	}
	// What its client saw: events 1…5 (the first start of a run numbers
	// from 1).
	seen := make([]engine.Event, 5)
	for i := range seen {
		seen[i] = engine.Event{Seq: uint64(i + 1), Type: "text_delta"}
	}
	if err := mb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var log *engine.EventLog
	eventually(t, "the retry's events", func() bool {
		log = mb.Reattach("t-killed")
		if log == nil {
			return false
		}
		evs, _ := readAll(log, 0)
		return tagged(evs, "retry") == 6
	})
	checkReattachMissesNothing(t, log, seen, "retry", 6)
}

// A retry due later than the event retention: attempt 1's log is dropped
// (Reattach finds nothing) before attempt 2 starts. The clock is the
// test's.
func TestEventIDsGrowWhenTheRetryOutlivesTheEventRetention(t *testing.T) {
	forEachStartPath(t, func(t *testing.T, wrap wrapStore) {
		seen, log2 := retryAfter(t, time.Minute, wrap)
		checkReattachMissesNothing(t, log2, seen, "second", 6)
	})
}

// A retry due while attempt 1's log is still retained: attempt 2's ids are
// above attempt 1's, and a client that saw attempt 1 to its end goes on
// with attempt 2's first event without a reset (this process saw where
// attempt 1 ended).
func TestEventIDsGrowAcrossARetryWithinTheEventRetention(t *testing.T) {
	forEachStartPath(t, func(t *testing.T, wrap wrapStore) {
		seen, log2 := retryAfter(t, time.Hour, wrap)
		checkReattachMissesNothing(t, log2, seen, "second", 6)
		if evs, reset := readAll(log2, seen[len(seen)-1].Seq); reset || len(evs) == 0 || evs[0].Seq <= seen[len(seen)-1].Seq {
			t.Fatalf("re-attached with attempt 1's last id %d: reset=%v %s, want attempt 2 without a reset", seen[len(seen)-1].Seq, reset, describe(evs))
		}
	})
}

// wrapStore gives the mailbox a wrapper of the rig's store (nil: the
// store itself).
type wrapStore func(*badgerstore.Store) engine.Store

// claimThenStart hides the Badger store's optional capabilities
// (StartClaimer, IdleSubmitter, CompleteClaimer): every attempt is claimed,
// then its start recorded in a commit of its own, as on a store without engine.StartClaimer.
type claimThenStart struct{ engine.Store }

// forEachStartPath runs fn with the start recorded in the claim's commit
// (the Badger store) and after the claim (claimThenStart).
func forEachStartPath(t *testing.T, fn func(*testing.T, wrapStore)) {
	t.Run("start_in_the_claim", func(t *testing.T) { fn(t, nil) })
	t.Run("start_after_the_claim", func(t *testing.T) {
		fn(t, func(s *badgerstore.Store) engine.Store { return claimThenStart{s} })
	})
}

// flakyFirstAttempt is an agent whose attempt 1 emits three events tagged
// "first" and fails as transient; every later attempt emits n events
// tagged tag and then waits until hold is closed or it is cancelled.
func flakyFirstAttempt(tag string, n int, hold <-chan struct{}) *fakeExecutor {
	return newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.Attempt == 1 {
			taggedEvents(sink, "first", 3)
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "flaky"}
		}
		taggedEvents(sink, tag, n)
		select {
		case <-hold:
		case <-ctx.Done():
		}
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	})
}

// retryAfter runs attempt 1 (three events, then a transient failure, the
// retry due 10 minutes later by the test's clock) with the given event
// retention, reads attempt 1's whole log as a client, lets the retry run
// (six events, then it waits) and returns what the client saw and
// attempt 2's log.
func retryAfter(t *testing.T, retention time.Duration, wrap wrapStore) (seen []engine.Event, log2 *engine.EventLog) {
	t.Helper()
	var now atomic.Int64
	now.Store(time.Now().UnixMilli())
	hold := make(chan struct{})
	exec := flakyFirstAttempt("second", 6, hold)
	r := newRigWith(t, exec, engine.Config{
		Now:            now.Load,
		EventRetention: retention,
		RetryDelay:     10 * time.Minute, MaxRetryDelay: 10 * time.Minute,
	}, wrap)
	t.Cleanup(func() { close(hold) }) // before the mailbox stops
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-late", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "attempt 1 nacked", func() bool {
		d := execLoad(t, r.store, res.DispatchID)
		return d.Status == engine.StatusQueued && d.AttemptCount == 1
	})
	log1 := r.mb.Reattach("t-late")
	if log1 == nil {
		t.Fatal("attempt 1's log is not retained")
	}
	eventually(t, "attempt 1's log closed", func() bool { _, closed := log1.ClosedAt(); return closed })
	seen, _ = readAll(log1, 0)
	if tagged(seen, "first") != 3 {
		t.Fatalf("attempt 1's events: %s", describe(seen))
	}
	now.Add((2 * time.Minute).Milliseconds())
	if l := r.mb.Reattach("t-late"); (l == nil) != (retention < 2*time.Minute) {
		t.Fatalf("2 minutes after attempt 1 with EventRetention %v: Reattach = %v", retention, l)
	}
	now.Add((10 * time.Minute).Milliseconds())
	exec.setCapacity(1) // wakes the dispatcher: the retry is due by the test's clock
	eventually(t, "attempt 2's events", func() bool {
		log2 = r.mb.Reattach("t-late")
		if log2 == nil || log2 == log1 {
			return false
		}
		evs, _ := readAll(log2, 0)
		return tagged(evs, "second") == 6
	})
	return seen, log2
}

// A waiting run continued by a foreground submit is the run's second
// start: the submitter's stream (read from 0, after `submitted`) gets the
// continuation from its first event without a reset, numbered above the
// first attempt's ids (2^32+1), and a client that followed the first
// attempt to its end goes on without a reset. With the Badger store the
// foreground fast path records the start in the claim's commit, before
// the run is read; without it, the start is recorded after the read.
func TestEventIDsOfAContinuedWaitingRun(t *testing.T) {
	forEachStartPath(t, continuedWaitingRun)
}

func continuedWaitingRun(t *testing.T, wrap wrapStore) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.ContinueRunID == "" {
			taggedEvents(sink, "ask", 2)
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunWaiting,
				Termination: &engine.Termination{Type: engine.TermSuspended}, Waiting: &engine.RunWaitingState{Reason: engine.WaitUserInput}}
		}
		taggedEvents(sink, "answer", 3)
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	}
	r := newRigWith(t, newFake(1, script), engine.Config{}, wrap)
	r.start(t)
	ctx := context.Background()
	first, log1, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t-cont", Messages: []engine.Message{userMsg("question")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first attempt's log closed", func() bool { _, closed := log1.ClosedAt(); return closed })
	seen, reset := readAll(log1, 0)
	if reset || tagged(seen, "ask") != 2 || seen[0].Seq != 1 {
		t.Fatalf("first attempt: reset=%v %s, want its events from 1", reset, describe(seen))
	}
	second, log2, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t-cont", Messages: []engine.Message{userMsg("answer")}})
	if err != nil || second.RunID != first.RunID {
		t.Fatalf("second submit %+v %v, want the waiting run %s continued", second, err, first.RunID)
	}
	eventually(t, "the continuation's log closed", func() bool { _, closed := log2.ClosedAt(); return closed })
	got, reset := readAll(log2, 0)
	if reset || tagged(got, "answer") != 3 || got[0].Seq != 1<<32+1 {
		t.Fatalf("the submitter's stream of the continuation: reset=%v %s, want its events from 4294967297 without a reset", reset, describe(got))
	}
	if run, _ := r.store.LoadRun(ctx, first.RunID); run == nil || run.StartCount != 2 {
		t.Fatalf("run after two starts: %+v", run)
	}
	if after, reset := readAll(log2, seen[len(seen)-1].Seq); reset || len(after) != len(got) {
		t.Fatalf("a client that followed the first attempt to its end: reset=%v %s", reset, describe(after))
	}
}

// A run started under a version that did not count starts (started_at set,
// start_count 0) counts that start: its next start is its second.
func TestMarkStartedCountsAStartOfAnEarlierVersion(t *testing.T) {
	d := &engine.Dispatch{DispatchID: "d", ThreadID: "t", RunID: "r"}
	old := engine.RunRecord{RunID: "r", ThreadID: "t", Status: engine.RunWaiting, StartedAt: 5}
	if !old.MarkStarted(d, "i", 9) || old.StartCount != 2 {
		t.Fatalf("after a start: %+v, want start_count 2", old)
	}
	fresh := engine.RunRecord{RunID: "r", ThreadID: "t", Status: engine.RunCreated}
	if !fresh.MarkStarted(d, "i", 9) || fresh.StartCount != 1 || !fresh.MarkStarted(d, "j", 10) || fresh.StartCount != 2 {
		t.Fatalf("after two starts: %+v, want start_count 2", fresh)
	}
}

// failLoadRun fails LoadRun while armed (the run cannot be read: the
// attempt ends before reaching the agent).
type failLoadRun struct {
	*badgerstore.Store
	armed atomic.Bool
}

func (s *failLoadRun) LoadRun(ctx context.Context, id string) (*engine.RunRecord, error) {
	if s.armed.CompareAndSwap(true, false) {
		return nil, fmt.Errorf("injected: %w", engine.ErrUnavailable)
	}
	return s.Store.LoadRun(ctx, id)
}

// An attempt that ends before reaching the agent (its run could not be
// read) has one event, the sidecar's run_finish, numbered apart from every
// id a started attempt uses (2^31+1); the retry numbers from its own start
// count, above it. A client that saw that run_finish gets the retry from
// its first event with a reset: the failed attempt's claim recorded its
// start, but the attempt never learnt the run's start count, so this
// process cannot tell that no attempt ran elsewhere in between
// (TestEventIDsResetAfterAnAttemptInAnotherSidecar).
func TestEventIDsOfAnAttemptThatDidNotReachTheAgent(t *testing.T) {
	fs := &failLoadRun{}
	exec := newFake(0, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		taggedEvents(sink, "ran", 2)
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	})
	var now atomic.Int64
	now.Store(time.Now().UnixMilli())
	r := newRigWith(t, exec, engine.Config{Now: now.Load, RetryDelay: time.Minute, MaxRetryDelay: time.Minute},
		func(s *badgerstore.Store) engine.Store { fs.Store = s; return fs })
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-unreached", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	fs.armed.Store(true)
	exec.setCapacity(1)
	eventually(t, "the failed attempt nacked", func() bool { return execLoad(t, r.store, res.DispatchID).AttemptCount == 1 })
	var log1 *engine.EventLog
	eventually(t, "its log", func() bool { log1 = r.mb.Reattach("t-unreached"); return log1 != nil })
	eventually(t, "its log closed", func() bool { _, closed := log1.ClosedAt(); return closed })
	seen, _ := readAll(log1, 0)
	if len(seen) != 1 || seen[0].Type != "run_finish" || seen[0].Seq != 1<<31+1 {
		t.Fatalf("the attempt that did not reach the agent: %s, want its run_finish alone, id 2147483649", describe(seen))
	}
	now.Add(time.Minute.Milliseconds())
	exec.setCapacity(1) // the retry is due by the test's clock
	eventually(t, "the retry acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	log2 := r.mb.Reattach("t-unreached")
	got, reset := readAll(log2, seen[0].Seq)
	if log2 == log1 || !reset || tagged(got, "ran") != 2 || got[0].Seq != 1<<32+1 {
		t.Fatalf("the retry after it, read from its run_finish: reset=%v %s, want a reset and the retry's events from 4294967297 (its run's second recorded start)", reset, describe(got))
	}
}

// On a shared store (NATS: several sidecars) a run's attempts can move
// between processes. Attempt 1 runs here and fails; its retry (the run's
// second start) runs in another sidecar and fails too; the third start
// runs here again. This process still holds attempt 1's log, but attempt 1
// is not the run's previous attempt: a client that followed attempt 1 to
// its end and re-attaches here with its last id missed all of attempt 2,
// so it must get a reset. The log of attempt 3 took attempt 1's last id
// for "the previous attempt's last id seen here" and served attempt 3
// without one. Both stores' clocks are the test's.
func TestEventIDsResetAfterAnAttemptInAnotherSidecar(t *testing.T) {
	forEachStartPath(t, func(t *testing.T, wrap wrapStore) {
		var now atomic.Int64
		now.Store(time.Now().UnixMilli())
		hold := make(chan struct{})
		exec := flakyFirstAttempt("third", 4, hold)
		r := newRigWith(t, exec, engine.Config{Now: now.Load, EventRetention: time.Hour, RetryDelay: 10 * time.Minute, MaxRetryDelay: 10 * time.Minute}, wrap)
		t.Cleanup(func() { close(hold) }) // before the mailbox stops
		r.start(t)
		ctx := context.Background()
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-moved", Messages: []engine.Message{userMsg("x")}})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "attempt 1 nacked", func() bool {
			d := execLoad(t, r.store, res.DispatchID)
			return d.Status == engine.StatusQueued && d.AttemptCount == 1
		})
		log1 := r.mb.Reattach("t-moved")
		eventually(t, "attempt 1's log closed", func() bool { _, closed := log1.ClosedAt(); return closed })
		seen, _ := readAll(log1, 0)
		if tagged(seen, "first") != 3 {
			t.Fatalf("attempt 1's events: %s", describe(seen))
		}

		// Another sidecar on the same store runs the retry (the run's
		// second start) when it falls due by its clock, and fails it.
		other := now.Load() + (11 * time.Minute).Milliseconds()
		c, err := r.store.ClaimStart(ctx, "t-moved", "other-sidecar", time.Minute, "other-instance", other)
		if err != nil || c == nil || c.InstanceID != "other-instance" {
			t.Fatalf("the other sidecar's claim and start: %+v %v", c, err)
		}
		if _, err := r.store.Nack(ctx, c.DispatchID, c.ClaimToken, other, "flaky there too", other); err != nil {
			t.Fatal(err)
		}
		if run := execRun(t, r.store, res.RunID); run.StartCount != 2 {
			t.Fatalf("after the other sidecar's attempt: start_count %d, want 2", run.StartCount)
		}

		now.Store(other + time.Minute.Milliseconds())
		exec.setCapacity(1) // the third attempt is due by this sidecar's clock
		var log3 *engine.EventLog
		eventually(t, "attempt 3's events", func() bool {
			log3 = r.mb.Reattach("t-moved")
			if log3 == nil || log3 == log1 {
				return false
			}
			evs, _ := readAll(log3, 0)
			return tagged(evs, "third") == 4
		})
		last := seen[len(seen)-1].Seq
		got, reset := readAll(log3, last)
		if len(got) == 0 || got[0].Seq != 2<<32+1 || tagged(got, "third") != 4 {
			t.Fatalf("attempt 3 read after attempt 1's last id %d: %s, want its events from %d", last, describe(got), uint64(2<<32+1))
		}
		if !reset {
			t.Fatalf("re-attached with attempt 1's last id %d: attempt 3 served without a reset, but attempt 2 (ids from %d, in another sidecar) was skipped", last, uint64(1<<32+1))
		}
	})
}

// An operator's requeue keeps the count of a run's starts, also for a run
// started under a version that did not count them (started_at set,
// start_count 0): Reopen clears started_at, and the count read from it
// went back to 0, so the requeued run's next start was its "first" again
// and numbered its events from 1, over the ids its earlier attempt used.
func TestReopenKeepsAStartOfAnEarlierVersion(t *testing.T) {
	d := &engine.Dispatch{DispatchID: "d2", ThreadID: "t", RunID: "r"}
	r := engine.RunRecord{RunID: "r", ThreadID: "t", Status: engine.RunDone, StartedAt: 5, FinishedAt: 6}
	r.Reopen("d2", 9)
	if !r.MarkStarted(d, "i", 10) || r.StartCount != 2 {
		t.Fatalf("a run of an earlier version, requeued and started: start_count %d, want 2 (its earlier start counted)", r.StartCount)
	}
	counted := engine.RunRecord{RunID: "r", ThreadID: "t", Status: engine.RunDone, StartedAt: 5, StartCount: 3}
	counted.Reopen("d2", 9)
	if counted.StartCount != 3 || !counted.MarkStarted(d, "i", 10) || counted.StartCount != 4 {
		t.Fatalf("a counted run, requeued and started: start_count %d, want 4", counted.StartCount)
	}
}

// A waiting run continued loses its wait's termination when its attempt
// starts: running with termination "suspended" misled a client (found by
// review). A running run's termination is not touched by a start.
func TestMarkStartedEndsTheWaitsTermination(t *testing.T) {
	d := &engine.Dispatch{DispatchID: "d", ThreadID: "t", RunID: "r"}
	waiting := engine.RunRecord{RunID: "r", ThreadID: "t", Status: engine.RunWaiting, StartedAt: 5, StartCount: 1,
		TerminationReason: &engine.Termination{Type: engine.TermSuspended}, Waiting: &engine.RunWaitingState{Reason: "tool_permission"}}
	if !waiting.MarkStarted(d, "i", 9) || waiting.Status != engine.RunRunning || waiting.TerminationReason != nil || waiting.Waiting != nil {
		t.Fatalf("after the continuation's start: %+v, want running without termination or waiting state", waiting)
	}
}
