package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Shared helpers of the submit and execution seed tests
// (seed_submit_test.go, seed_execution_test.go). Everything here is
// prefixed exec so it does not collide with other helpers' files.

// errExecInjected is the error the fault-injecting store returns for
// claims and renewals; errExecSettle for settling writes (not
// ErrUnavailable, so the engine does not retry them in place).
var (
	errExecInjected = fmt.Errorf("injected store fault: %w", engine.ErrUnavailable)
	errExecSettle   = errors.New("injected settle fault")
)

// execFaultStore is a real in-memory Badger store with faults injected
// into chosen operations. Configure it before the mailbox uses it; the
// counters are safe for concurrent use.
type execFaultStore struct {
	*badgerstore.Store
	//lint:ignore U1000 embedded to hide the store's StartClaimer: the faults below sit in Claim and RecordDispatchStart
	hideStartClaim

	// claimEmpty makes the next n Claim calls return nil without claiming.
	claimEmpty atomic.Int32
	// claimErr makes the next n Claim calls fail.
	claimErr atomic.Int32
	// interruptAfterClaim interrupts the thread once, right after a
	// successful Claim (the seed's InterruptOnLoadMailboxStore: the
	// execution pre-flight then sees a stale epoch).
	interruptAfterClaim atomic.Bool
	// claimDispatchEmpty makes the next n ClaimDispatch calls return nil.
	claimDispatchEmpty atomic.Int32
	// failSettle makes RecordRunResult, Complete, Ack, Nack, DeadLetter and Release
	// fail: an attempt finishes but its claim stays in the store.
	failSettle atomic.Bool
	// failDeadLetter makes DeadLetter alone fail (a crash right before
	// the dead letter's commit).
	failDeadLetter atomic.Bool
	// deadLettersRefused counts the DeadLetter calls failDeadLetter failed.
	deadLettersRefused atomic.Int32
	// extendLease, when set, decides ExtendLease calls (call counts from
	// 1); real=true delegates to the store.
	extendLease func(call int32) (ok bool, err error, real bool)
	extendCalls atomic.Int32
	claimCalls  atomic.Int32
	// afterCompleteClaim, when set, runs after a CompleteAndClaim commit
	// that claimed a next dispatch, before the engine learns of it.
	afterCompleteClaim func(next *engine.Dispatch)
	// beforeSubmitIdle, when set, runs before a SubmitIdle reaches the
	// store (a foreground submit whose dispatch is not written yet).
	beforeSubmitIdle func()
	// afterClaim, when set, runs after a Claim that claimed a dispatch,
	// before the engine learns of it (a claim in flight).
	afterClaim func(d *engine.Dispatch)
	// interrupts counts Interrupt calls; claimHits the Claim calls that
	// claimed a dispatch.
	interrupts atomic.Int32
	claimHits  atomic.Int32
	// completeClaimErr makes the next n CompleteAndClaim calls fail as if
	// the claim half found the next dispatch's record damaged (nothing
	// written; a stale claim, marked ErrNextClaim as the contract says).
	completeClaimErr atomic.Int32
	// storeCancels counts store Cancel calls; readyCalls ReadyThreads calls.
	storeCancels atomic.Int32
	readyCalls   atomic.Int32
}

// hideStartClaim, embedded next to *badgerstore.Store, hides the store's
// engine.StartClaimer (two methods of one name at one depth cancel out, so
// the wrapper lacks both): the engine then claims with Claim and records
// the start with RecordDispatchStart, as on a store without it, and
// a wrapper's faults in those reach it.
type hideStartClaim struct{}

//lint:ignore U1000 never called: it only cancels out the promoted method
func (hideStartClaim) ClaimStart() {}

//lint:ignore U1000 never called: it only cancels out the promoted method
func (hideStartClaim) CompleteAndClaimStart() {}

func TestHideStartClaimHidesIt(t *testing.T) {
	if _, ok := any(&execFaultStore{}).(engine.StartClaimer); ok {
		t.Fatal("execFaultStore still offers StartClaimer: its Claim faults would be bypassed")
	}
	if _, ok := any(&interruptBeforeStart{}).(engine.StartClaimer); ok {
		t.Fatal("interruptBeforeStart still offers StartClaimer: its fault would be bypassed")
	}
	if _, ok := any(&badgerstore.Store{}).(engine.StartClaimer); !ok {
		t.Fatal("the Badger store no longer offers StartClaimer")
	}
}

func (s *execFaultStore) ReadyThreads(ctx context.Context, now int64, after engine.ReadyEntry, limit int) ([]engine.ReadyEntry, int64, error) {
	defer s.readyCalls.Add(1)
	return s.Store.ReadyThreads(ctx, now, after, limit)
}

func (s *execFaultStore) Cancel(ctx context.Context, id string, now int64) (*engine.Dispatch, error) {
	defer s.storeCancels.Add(1)
	return s.Store.Cancel(ctx, id, now)
}

func (s *execFaultStore) Interrupt(ctx context.Context, thread string, now int64) (engine.InterruptResult, error) {
	defer s.interrupts.Add(1)
	return s.Store.Interrupt(ctx, thread, now)
}

func (s *execFaultStore) Claim(ctx context.Context, thread, consumer string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	s.claimCalls.Add(1)
	if execTake(&s.claimErr) {
		return nil, errExecInjected
	}
	if execTake(&s.claimEmpty) {
		return nil, nil
	}
	d, err := s.Store.Claim(ctx, thread, consumer, lease, now)
	if err == nil && d != nil {
		s.claimHits.Add(1)
		if s.afterClaim != nil {
			s.afterClaim(d)
		}
	}
	if err == nil && d != nil && s.interruptAfterClaim.CompareAndSwap(true, false) {
		if _, ierr := s.Store.Interrupt(ctx, thread, now); ierr != nil {
			return nil, ierr
		}
	}
	return d, err
}

func (s *execFaultStore) ClaimDispatch(ctx context.Context, id, consumer string, lease time.Duration, now int64) (*engine.Dispatch, error) {
	if execTake(&s.claimDispatchEmpty) {
		return nil, nil
	}
	return s.Store.ClaimDispatch(ctx, id, consumer, lease, now)
}

// SubmitIdle leaves the foreground fast path to the store unless a
// ClaimDispatch fault is armed: then it declines (as for a busy thread) so
// the general inline path, and the fault, are reached.
func (s *execFaultStore) SubmitIdle(ctx context.Context, c engine.Checkpoint, d engine.Dispatch, consumer string, lease time.Duration, instance string, now int64) ([]engine.MessageRecord, *engine.Dispatch, error) {
	if s.claimDispatchEmpty.Load() > 0 {
		return nil, nil, nil
	}
	if s.beforeSubmitIdle != nil {
		s.beforeSubmitIdle()
	}
	return s.Store.SubmitIdle(ctx, c, d, consumer, lease, instance, now)
}

// CompleteAndClaim fails as Complete does; while a Claim fault is armed
// it only completes, so the engine's next Claim meets the fault.
func (s *execFaultStore) CompleteAndClaim(ctx context.Context, id, token string, r engine.RunResult, now int64, consumer string, lease time.Duration) (*engine.Dispatch, error) {
	if s.failSettle.Load() {
		return nil, errExecSettle
	}
	if execTake(&s.completeClaimErr) {
		return nil, fmt.Errorf("%w: claim dispatch x: %w", engine.ErrNextClaim, engine.ErrStaleClaim)
	}
	if s.claimErr.Load() > 0 || s.claimEmpty.Load() > 0 || s.interruptAfterClaim.Load() {
		return nil, s.Store.Complete(ctx, id, token, r, now)
	}
	next, err := s.Store.CompleteAndClaim(ctx, id, token, r, now, consumer, lease)
	if err == nil && next != nil && s.afterCompleteClaim != nil {
		s.afterCompleteClaim(next)
	}
	return next, err
}

func (s *execFaultStore) RecordRunResult(ctx context.Context, id, token string, r engine.RunResult, now int64) error {
	if s.failSettle.Load() {
		return errExecSettle
	}
	return s.Store.RecordRunResult(ctx, id, token, r, now)
}

func (s *execFaultStore) Complete(ctx context.Context, id, token string, r engine.RunResult, now int64) error {
	if s.failSettle.Load() {
		return errExecSettle
	}
	return s.Store.Complete(ctx, id, token, r, now)
}

func (s *execFaultStore) Ack(ctx context.Context, id, token string, now int64) error {
	if s.failSettle.Load() {
		return errExecSettle
	}
	return s.Store.Ack(ctx, id, token, now)
}

func (s *execFaultStore) Nack(ctx context.Context, id, token string, retryAt int64, msg string, now int64) (engine.Dispatch, error) {
	if s.failSettle.Load() {
		return engine.Dispatch{}, errExecSettle
	}
	return s.Store.Nack(ctx, id, token, retryAt, msg, now)
}

func (s *execFaultStore) DeadLetter(ctx context.Context, id, token, msg string, now int64) error {
	if s.failSettle.Load() || s.failDeadLetter.Load() {
		s.deadLettersRefused.Add(1)
		return errExecSettle
	}
	return s.Store.DeadLetter(ctx, id, token, msg, now)
}

func (s *execFaultStore) Release(ctx context.Context, id, token string, now int64) (engine.Dispatch, error) {
	if s.failSettle.Load() {
		return engine.Dispatch{}, errExecSettle
	}
	return s.Store.Release(ctx, id, token, now)
}

func (s *execFaultStore) ExtendLease(ctx context.Context, id, token string, lease time.Duration, now int64) (bool, error) {
	n := s.extendCalls.Add(1)
	if s.extendLease != nil {
		if ok, err, real := s.extendLease(n); !real {
			return ok, err
		}
	}
	return s.Store.ExtendLease(ctx, id, token, lease, now)
}

// execTake consumes one unit of a fault budget.
func execTake(n *atomic.Int32) bool {
	for {
		v := n.Load()
		if v <= 0 {
			return false
		}
		if n.CompareAndSwap(v, v-1) {
			return true
		}
	}
}

// newExecRig is newRig over an execFaultStore: r.store is the underlying
// Badger store (for inspection), the mailbox sees the faults. configure
// runs before the mailbox is built.
func newExecRig(t *testing.T, exec *fakeExecutor, cfg engine.Config, configure func(*execFaultStore)) (*rig, *execFaultStore) {
	t.Helper()
	var fs *execFaultStore
	r := newRigWith(t, exec, cfg, func(s *badgerstore.Store) engine.Store {
		fs = &execFaultStore{Store: s}
		if configure != nil {
			configure(fs)
		}
		return fs
	})
	return r, fs
}

// execRelease returns a channel and a function that closes it once; the
// function is also registered as a cleanup, so a script blocked on the
// channel never outlives the test. Cleanups run last-registered first:
// called after the rig is made, the release comes before the rig's Stop;
// called before, after it — then the script must also watch its ctx
// (Stop cancels it), as the seed-style scripts do.
func execRelease(t *testing.T) (<-chan struct{}, func()) {
	ch := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	return ch, release
}

// execRuns returns a copy of the requests the fake executor received.
func (f *fakeExecutor) execRuns() []engine.RunRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]engine.RunRequest(nil), f.runs...)
}

// execText decodes a message whose content is a JSON string.
func execText(m engine.Message) string {
	var s string
	if err := json.Unmarshal(m.Content, &s); err != nil {
		return string(m.Content)
	}
	return s
}

// execCancelled is a completed outcome for a run that stopped because its
// context was cancelled.
func execCancelled() engine.RunOutcome {
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
}

// execEnqueuePrepared mirrors the seed's enqueue_prepared_dispatch: the
// run is prepared through the mailbox, the dispatch is enqueued straight
// into the store (no claim, no wake-up). mutate may adjust the dispatch.
func execEnqueuePrepared(t *testing.T, r *rig, thread, text string, availableAt int64, mutate func(*engine.Dispatch)) engine.SubmitResult {
	t.Helper()
	ctx := context.Background()
	req := engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg(text)}}
	if err := engine.ValidateRunInputs(&req); err != nil {
		t.Fatal(err)
	}
	runID, err := r.mb.PrepareRun(ctx, &req)
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	d, err := r.mb.BuildDispatch(&req, availableAt)
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	if mutate != nil {
		mutate(&d)
	}
	if _, err := r.store.Enqueue(ctx, d); err != nil {
		t.Fatalf("enqueue: %v", err)
	}
	return engine.SubmitResult{DispatchID: d.DispatchID, RunID: runID, ThreadID: thread, Status: engine.SubmitQueued}
}

// execReadAll reads an event log until it is closed (bounded).
func execReadAll(t *testing.T, l *engine.EventLog) []engine.Event {
	t.Helper()
	var out []engine.Event
	var after uint64
	deadline := time.After(5 * time.Second)
	for {
		evs, _, closed, wait := l.Read(after, 100, nil)
		for _, e := range evs {
			out = append(out, engine.Event{Seq: e.Seq, Type: e.Type, Data: append([]byte(nil), e.Data...)})
			after = e.Seq
		}
		if closed {
			return out
		}
		if wait != nil {
			select {
			case <-wait:
			case <-deadline:
				t.Fatalf("event log not closed; read so far: %d events", len(out))
			}
		}
	}
}

func execTypes(evs []engine.Event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.Type
	}
	return out
}

// execMetrics renders the mailbox's metrics in Prometheus text.
func execMetrics(mb *engine.Mailbox) string {
	var b strings.Builder
	mb.Metrics().WritePrometheus(&b)
	return b.String()
}

// countedIn reports whether a sample of out whose name starts with prefix
// is above zero (counters are there from the first scrape, at zero).
func countedIn(out, prefix string) bool {
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, prefix) && !strings.HasSuffix(line, " 0") {
			return true
		}
	}
	return false
}

// execMetric returns the value of the sample whose name-and-labels part is
// exactly series, or 0 when it is absent.
func execMetric(mb *engine.Mailbox, series string) float64 {
	for _, line := range strings.Split(execMetrics(mb), "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err == nil {
				return v
			}
		}
	}
	return 0
}

// execIsConflict reports whether err is the foreground submit's
// active-run conflict.
func execIsConflict(err error) bool {
	return err != nil && errors.Is(err, engine.ErrVersionConflict) && strings.Contains(err.Error(), engine.ConflictActiveRun)
}

// execClaimed lists a thread's claimed dispatches.
func execClaimed(t *testing.T, s *badgerstore.Store, thread string) []engine.Dispatch {
	t.Helper()
	ds, err := s.ListDispatches(context.Background(), thread, engine.StatusFilter{engine.StatusClaimed}, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

// execLoad loads a dispatch that must exist.
func execLoad(t *testing.T, s *badgerstore.Store, id string) engine.Dispatch {
	t.Helper()
	d, err := s.LoadDispatch(context.Background(), id)
	if err != nil || d == nil {
		t.Fatalf("load dispatch %s: %v %v", id, d, err)
	}
	return *d
}

// execRun loads a run that must exist.
func execRun(t *testing.T, s *badgerstore.Store, id string) engine.RunRecord {
	t.Helper()
	r, err := s.LoadRun(context.Background(), id)
	if err != nil || r == nil {
		t.Fatalf("load run %s: %v %v", id, r, err)
	}
	return *r
}

// A permanent failure is recorded and dead-lettered in one commit: when
// that commit fails (a crash before it), nothing of the attempt is
// recorded, the lease lapses and the retry dead-letters it. Before, the
// run result was its own commit and the retry found the run done and
// acked the dispatch (found by the crash harness).
func TestExec_permanent_failure_recorded_with_its_dead_letter(t *testing.T) {
	script := func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "no such agent"}
	}
	r, fs := newExecRig(t, newFake(1, script), engine.Config{Lease: 300 * time.Millisecond, RenewInterval: 50 * time.Millisecond, SweepInterval: 50 * time.Millisecond},
		func(s *execFaultStore) { s.failDeadLetter.Store(true) })
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-perm", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	// The attempt's dead letter was refused: the executor returning is not
	// enough (the test used to re-enable dead letters before the engine
	// had tried, and saw one attempt instead of two now and then).
	eventually(t, "the first dead letter refused", func() bool { return fs.deadLettersRefused.Load() >= 1 })
	if run := execRun(t, r.store, res.RunID); run.Status == engine.RunDone {
		t.Fatalf("the run is done although its dead letter was not committed: %+v", run)
	}
	fs.failDeadLetter.Store(false)
	eventually(t, "dead letter after the retry", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
	d := execLoad(t, r.store, res.DispatchID)
	if d.RunStatus != engine.RunDone || !strings.Contains(d.RunError, "no such agent") || len(r.exec.execRuns()) != 2 {
		t.Fatalf("dead letter %+v after %d attempts", d, len(r.exec.execRuns()))
	}
	if run := execRun(t, r.store, res.RunID); run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermError {
		t.Fatalf("run %+v", run)
	}
}

// A run whose agent is slow to stop after a user's cancel or an interrupt
// settled its claim is not a lost lease: the renewals that find the claim
// gone are neither counted lost nor logged (found by review: an alert on
// lost leases fired on ordinary cancels).
func TestASettledCancelIsNoLostLease(t *testing.T) {
	slow := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		time.Sleep(500 * time.Millisecond) // the agent takes its time to stop
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}
	r := newRig(t, newFake(2, slow), engine.Config{Lease: time.Second, RenewInterval: 50 * time.Millisecond})
	r.start(t)
	ctx := context.Background()
	a, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "tc", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "ti", Messages: []engine.Message{userMsg("x")}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "both running", func() bool { return r.mb.InFlight() == 2 })
	if ok, err := r.mb.Cancel(ctx, a.DispatchID); err != nil || !ok {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	if _, err := r.mb.Interrupt(ctx, "ti"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "both stopped", func() bool { return r.mb.InFlight() == 0 })
	var out strings.Builder
	r.mb.Metrics().WritePrometheus(&out)
	if !strings.Contains(out.String(), `mailbox_lease_renewals_total{result="lost"} 0`) {
		t.Fatalf("renewals after a settled cancel or interrupt were counted lost:\n%s", grepLines(out.String(), "lease_renewals"))
	}
}

func grepLines(s, sub string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// A routed cancel that finds its claim superseded by an interrupt made
// through another sidecar is accepted, and the attempt's later renewals
// are no lost lease (found by review).
func TestARoutedCancelAfterAnInterruptIsNoLostLease(t *testing.T) {
	slow := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		time.Sleep(400 * time.Millisecond)
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}
	r := newRig(t, newFake(1, slow), engine.Config{Lease: time.Second, RenewInterval: 50 * time.Millisecond})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "tx", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "running", func() bool { return r.mb.InFlight() == 1 })
	if _, err := r.store.Interrupt(ctx, "tx", time.Now().UnixMilli()); err != nil { // another sidecar's interrupt
		t.Fatal(err)
	}
	target := engine.LiveTarget{ThreadID: "tx", RunID: res.RunID, DispatchID: res.DispatchID}
	if a := r.mb.AnswerLive(ctx, target, engine.LiveCommand{Kind: engine.LiveCancel}); a != engine.LiveAccepted {
		t.Fatalf("the routed cancel: %v; want accepted", a)
	}
	eventually(t, "stopped", func() bool { return r.mb.InFlight() == 0 })
	var out strings.Builder
	r.mb.Metrics().WritePrometheus(&out)
	if !strings.Contains(out.String(), `mailbox_lease_renewals_total{result="lost"} 0`) {
		t.Fatalf("renewals after a routed cancel of an interrupted run were counted lost:\n%s", grepLines(out.String(), "lease_renewals"))
	}
}

// An attempt whose claim another process took over (its lease lapsed and
// a retry runs there) does not answer a routed command as refused: the
// owner's receipt must not be pre-empted (found by review).
func TestAStaleAttemptLeavesARoutedCommandToTheOwner(t *testing.T) {
	hold := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}
	r := newRig(t, newFake(1, hold), engine.Config{Lease: time.Minute, RenewInterval: 50 * time.Second, SweepInterval: time.Hour})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "ts", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "running", func() bool { return r.mb.InFlight() == 1 })
	// Its lease lapsed (as seen from two minutes on: no renewal comes
	// within the test) and another process reclaimed and claimed it.
	if _, err := r.store.ReclaimExpired(ctx, time.Now().Add(2*time.Minute).UnixMilli(), 10); err != nil {
		t.Fatal(err)
	}
	if d, err := r.store.ClaimDispatch(ctx, res.DispatchID, "other-process", time.Minute, time.Now().UnixMilli()); err != nil || d == nil {
		t.Fatalf("claim by the other process: %v %v", d, err)
	}
	target := engine.LiveTarget{ThreadID: "ts", RunID: res.RunID, DispatchID: res.DispatchID}
	if a := r.mb.AnswerLive(ctx, target, engine.LiveCommand{Kind: engine.LiveCancel}); a != engine.LiveNotHere {
		t.Fatalf("a stale attempt's answer: %v; want not here (the owner answers)", a)
	}
	if _, err := r.mb.Cancel(ctx, res.RunID); err != nil { // not left for the shutdown's grace
		t.Log(err)
	}
}
