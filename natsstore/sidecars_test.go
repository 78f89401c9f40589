package natsstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// Multi-sidecar tests: several engine.Mailbox instances, each with its own
// natsstore.Store (its own connection), share one stream, as sidecars on
// several hosts do. Only the agent side is fake (fakeAgent); everything
// between the mailboxes — claims, signals, live commands — is the real
// store on a real server.

// world is the shared journal of every fake agent of a test: which run
// executes where and when, and whether a thread ever ran twice at once.
type world struct {
	mu      sync.Mutex
	active  map[string]*agentRun // thread → the run executing on it
	runs    []*agentRun
	overlap []string
	changed chan struct{} // closed and replaced on every change
}

// agentRun is one attempt as an agent saw it.
type agentRun struct {
	sidecar    string
	thread     string
	runID      string
	dispatchID string
	text       string
	start, end time.Time
	cancelled  bool     // ended because the engine cancelled it
	live       []string // live messages received (texts)
	decisions  []string // decisions received (call ids)
}

func newWorld() *world {
	return &world{active: map[string]*agentRun{}, changed: make(chan struct{})}
}

func (w *world) notifyLocked() {
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *world) begin(sidecar string, req *engine.RunRequest) *agentRun {
	r := &agentRun{sidecar: sidecar, thread: req.ThreadID, runID: req.RunID, dispatchID: req.DispatchID, text: firstText(req.Messages), start: time.Now()}
	w.mu.Lock()
	defer w.mu.Unlock()
	if other := w.active[r.thread]; other != nil {
		w.overlap = append(w.overlap, fmt.Sprintf("thread %s: run %s on %s started while run %s runs on %s", r.thread, r.runID, sidecar, other.runID, other.sidecar))
	}
	w.active[r.thread] = r
	w.runs = append(w.runs, r)
	w.notifyLocked()
	return r
}

func (w *world) finish(r *agentRun, cancelled bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	r.end, r.cancelled = time.Now(), cancelled
	if w.active[r.thread] == r {
		delete(w.active, r.thread)
	}
	w.notifyLocked()
}

func (w *world) record(f func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	f()
	w.notifyLocked()
}

// waitFor blocks until cond (called under the lock) holds, at most 20s.
func (w *world) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	timeout := time.NewTimer(20 * time.Second)
	defer timeout.Stop()
	for {
		w.mu.Lock()
		ok, ch := cond(), w.changed
		w.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-timeout.C:
			t.Fatalf("%s: not within 20s\n%s", what, w.dump())
		}
	}
}

// runsOf returns the attempts of a dispatch (under the lock).
func (w *world) runsOfLocked(dispatchID string) []*agentRun {
	var out []*agentRun
	for _, r := range w.runs {
		if r.dispatchID == dispatchID {
			out = append(out, r)
		}
	}
	return out
}

// activeRun waits until a run with text executes and returns a copy.
func (w *world) activeRun(t *testing.T, thread string) agentRun {
	t.Helper()
	var got agentRun
	w.waitFor(t, "a run executing on "+thread, func() bool {
		if r := w.active[thread]; r != nil {
			got = *r
			return true
		}
		return false
	})
	return got
}

func (w *world) dump() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var b strings.Builder
	for _, r := range w.runs {
		fmt.Fprintf(&b, "  %s %s run=%s dispatch=%s %q %s..%s cancelled=%v\n", r.sidecar, r.thread, r.runID, r.dispatchID, r.text,
			r.start.Format("15:04:05.000"), r.end.Format("15:04:05.000"), r.cancelled)
	}
	return b.String()
}

// checkNoOverlap fails if a thread ever ran twice at once: by the live
// check at every start and by the recorded intervals.
func (w *world) checkNoOverlap(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, o := range w.overlap {
		t.Error(o)
	}
	byThread := map[string][]*agentRun{}
	for _, r := range w.runs {
		byThread[r.thread] = append(byThread[r.thread], r)
	}
	for thread, rs := range byThread {
		sort.Slice(rs, func(i, j int) bool { return rs[i].start.Before(rs[j].start) })
		for i := 1; i < len(rs); i++ {
			if rs[i-1].end.IsZero() || rs[i].start.Before(rs[i-1].end) {
				t.Errorf("thread %s: run %s (%s) started at %s before run %s (%s) ended at %s", thread,
					rs[i].runID, rs[i].sidecar, rs[i].start.Format("15:04:05.000000"), rs[i-1].runID, rs[i-1].sidecar, rs[i-1].end.Format("15:04:05.000000"))
			}
		}
	}
}

func firstText(msgs []engine.Message) string {
	for _, m := range msgs {
		var s string
		if json.Unmarshal(m.Content, &s) == nil {
			return s
		}
	}
	return ""
}

func userMsg(text string) engine.Message {
	b, _ := json.Marshal(text)
	return engine.Message{Role: engine.RoleUser, Content: b}
}

// fakeAgent is one sidecar's agent. The first message's text scripts a
// run: "hold" runs until cancelled, taking live commands; "work <µs>"
// works that long (the agent's own time, not a synchronisation); anything
// else finishes at once.
type fakeAgent struct {
	name     string
	w        *world
	capacity int
	capCh    chan struct{}
}

func (f *fakeAgent) Capacity() int                    { return f.capacity }
func (f *fakeAgent) CapacityChanged() <-chan struct{} { return f.capCh }

func (f *fakeAgent) Run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	r := f.w.begin(f.name, req)
	sink.Emit([]byte(`{"type":"run_start"}`))
	done := engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: f.name}
	cancelled := engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	switch {
	case r.text == "hold":
		for {
			select {
			case <-ctx.Done():
				f.w.finish(r, true)
				return cancelled
			case c := <-req.Commands:
				f.w.record(func() {
					for _, m := range c.Messages {
						r.live = append(r.live, firstText([]engine.Message{m.Message}))
					}
					for _, d := range c.Decisions {
						r.decisions = append(r.decisions, d.CallID)
					}
				})
				if len(c.Decisions) == 1 && c.Decisions[0].CallID == "refuse-me" {
					c.Reply <- errors.New("no such call")
					continue
				}
				c.Reply <- nil
			}
		}
	case strings.HasPrefix(r.text, "work "):
		var us int
		fmt.Sscanf(r.text, "work %d", &us)
		t := time.NewTimer(time.Duration(us) * time.Microsecond)
		defer t.Stop()
		select {
		case <-ctx.Done():
			f.w.finish(r, true)
			return cancelled
		case <-t.C:
		}
	}
	sink.Emit([]byte(`{"type":"run_finish"}`))
	f.w.finish(r, false)
	return done
}

// sidecar is one mailbox on its own store.
type sidecar struct {
	name  string
	store *natsstore.Store
	mb    *engine.Mailbox
}

// startSidecar opens a store on cfg, builds a mailbox with a fake agent
// of capacity slots on it, wires live commands and starts it. Everything
// stops when the test ends (mailbox first, then the store).
func startSidecar(t *testing.T, w *world, cfg natsstore.Config, name string, capacity int) *sidecar {
	t.Helper()
	return startSidecarWith(t, w, cfg, name, capacity, engineConfig(name))
}

// engineConfig is the engine configuration of the test sidecars: quick
// retries and signal redeliveries, and a sweep a minute away so that
// signals, not the sweep, move the work between sidecars.
func engineConfig(name string) engine.Config {
	return engine.Config{
		ConsumerID:     name,
		RetryDelay:     20 * time.Millisecond,
		MaxRetryDelay:  200 * time.Millisecond,
		SweepInterval:  time.Minute,
		SignalWait:     200 * time.Millisecond,
		SignalNackBase: 20 * time.Millisecond,
		SignalNackMax:  200 * time.Millisecond,
	}
}

func startSidecarWith(t *testing.T, w *world, cfg natsstore.Config, name string, capacity int, ecfg engine.Config) *sidecar {
	t.Helper()
	st := openCfg(t, cfg)
	ag := &fakeAgent{name: name, w: w, capacity: capacity, capCh: make(chan struct{}, 1)}
	mb, err := engine.New(st, ag, ecfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.ServeLiveAnswers(mb.AnswerLive); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := mb.Stop(ctx); err != nil {
			t.Errorf("stop %s: %v", name, err)
		}
	})
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return &sidecar{name: name, store: st, mb: mb}
}

func startSidecars(t *testing.T, w *world, cfg natsstore.Config, capacities ...int) []*sidecar {
	t.Helper()
	out := make([]*sidecar, len(capacities))
	for i, c := range capacities {
		out[i] = startSidecar(t, w, cfg, fmt.Sprintf("sc%d", i+1), c)
	}
	return out
}

// other returns a sidecar that is not name.
func other(scs []*sidecar, name string) *sidecar {
	for _, s := range scs {
		if s.name != name {
			return s
		}
	}
	return nil
}

// waitStatus polls a dispatch (on s's store: direct reads, not the
// index) until it has status want.
func waitStatus(t *testing.T, s *sidecar, id string, want engine.DispatchStatus) *engine.Dispatch {
	t.Helper()
	var d *engine.Dispatch
	var err error
	eventually(t, fmt.Sprintf("dispatch %s %s", id, want), func() bool {
		d, err = s.store.LoadDispatch(context.Background(), id)
		return err == nil && d != nil && d.Status == want
	})
	return d
}

// submitSpread submits n background runs over threads through random
// sidecars from a few goroutines at once and returns their dispatch ids.
func submitSpread(t *testing.T, scs []*sidecar, n, threads int, text string) []string {
	t.Helper()
	ids := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	const workers = 6
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				s := scs[rand.IntN(len(scs))]
				res, err := s.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: fmt.Sprintf("th%02d", i%threads), Messages: []engine.Message{userMsg(text)}})
				if err != nil {
					errs <- fmt.Errorf("submit %d on %s: %w", i, s.name, err)
					return
				}
				ids[i] = res.DispatchID
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return ids
}

// checkOnceEach checks that every dispatch ran exactly once and is acked,
// and reports how the runs spread over the sidecars.
func checkOnceEach(t *testing.T, w *world, s *sidecar, ids []string) map[string]int {
	t.Helper()
	for _, id := range ids {
		waitStatus(t, s, id, engine.StatusAcked)
	}
	spread := map[string]int{}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, id := range ids {
		rs := w.runsOfLocked(id)
		if len(rs) != 1 {
			t.Errorf("dispatch %s executed %d times", id, len(rs))
			continue
		}
		spread[rs[0].sidecar]++
	}
	return spread
}

// Many dispatches on many threads, submitted through random sidecars:
// every run executes exactly once, each by one sidecar, and no thread
// ever runs on two sidecars at once.
func TestSidecarsClaimEachDispatchOnce(t *testing.T) {
	t.Parallel()
	w := newWorld()
	scs := startSidecars(t, w, freshConfig(), 3, 3, 3)
	ids := submitSpread(t, scs, 90, 12, "work 500")
	spread := checkOnceEach(t, w, scs[0], ids)
	w.checkNoOverlap(t)
	t.Logf("runs per sidecar: %v", spread)
	if len(spread) < 2 {
		t.Errorf("every run executed on one sidecar (%v): the others never claimed", spread)
	}
}

// A foreground submit on one sidecar interrupts the run executing on
// another: that run is cancelled through the live router, its dispatch is
// superseded, and only then does the new run start (inline, on the
// submitting sidecar).
func TestForegroundSubmitInterruptsARunOnAnotherSidecar(t *testing.T) {
	t.Parallel()
	w := newWorld()
	scs := startSidecars(t, w, freshConfig(), 1, 1, 1)
	ctx := context.Background()
	first, err := scs[1].mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "ti", Messages: []engine.Message{userMsg("hold")}})
	if err != nil {
		t.Fatal(err)
	}
	running := w.activeRun(t, "ti")
	a := other(scs, running.sidecar)
	res, events, err := a.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "ti", Messages: []engine.Message{userMsg("now")}})
	if err != nil {
		t.Fatalf("foreground submit on %s while %s runs the thread: %v", a.name, running.sidecar, err)
	}
	if res.Status != engine.SubmitRunning || events == nil {
		t.Fatalf("foreground submit: %+v", res)
	}
	waitStatus(t, a, res.DispatchID, engine.StatusAcked)
	waitStatus(t, a, first.DispatchID, engine.StatusSuperseded)
	w.mu.Lock()
	old, cur := w.runsOfLocked(first.DispatchID), w.runsOfLocked(res.DispatchID)
	w.mu.Unlock()
	if len(old) != 1 || !old[0].cancelled || len(cur) != 1 || cur[0].sidecar != a.name {
		t.Fatalf("runs: interrupted %d, new %d\n%s", len(old), len(cur), w.dump())
	}
	if !cur[0].start.After(old[0].end) {
		t.Errorf("the new run started at %s, before the interrupted one ended at %s", cur[0].start, old[0].end)
	}
	w.checkNoOverlap(t)
}

// An interrupt through one sidecar stops the run executing on another at
// once, not at its next lease renewal (here a minute away: only the live
// cancel can stop it within waitFor's 20 s).
func TestInterruptCancelsARunOnAnotherSidecar(t *testing.T) {
	t.Parallel()
	w := newWorld()
	cfg := freshConfig()
	var scs []*sidecar
	for i := range 3 {
		ecfg := engineConfig(fmt.Sprintf("sc%d", i+1))
		ecfg.Lease, ecfg.RenewInterval = 3*time.Minute, time.Minute
		scs = append(scs, startSidecarWith(t, w, cfg, ecfg.ConsumerID, 1, ecfg))
	}
	ctx := context.Background()
	first, err := scs[0].mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "tx", Messages: []engine.Message{userMsg("hold")}})
	if err != nil {
		t.Fatal(err)
	}
	running := w.activeRun(t, "tx")
	a := other(scs, running.sidecar)
	res, err := a.mb.Interrupt(ctx, "tx")
	if err != nil || res.Active == nil || res.Active.DispatchID != first.DispatchID {
		t.Fatalf("interrupt through %s: %+v %v", a.name, res, err)
	}
	w.waitFor(t, "the interrupted run stopped", func() bool {
		rs := w.runsOfLocked(first.DispatchID)
		return len(rs) == 1 && rs[0].cancelled && !rs[0].end.IsZero()
	})
	waitStatus(t, a, first.DispatchID, engine.StatusSuperseded)
}

// Live messages, a decision and a cancel sent through one sidecar reach
// the run executing on another.
func TestLiveCommandsReachARunOnAnotherSidecar(t *testing.T) {
	t.Parallel()
	w := newWorld()
	scs := startSidecars(t, w, freshConfig(), 1, 1, 1)
	ctx := context.Background()
	sub, err := scs[0].mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "tl", Messages: []engine.Message{userMsg("hold")}})
	if err != nil {
		t.Fatal(err)
	}
	running := w.activeRun(t, "tl")
	a := other(scs, running.sidecar)
	// The sender finds the run through its index (eventually consistent
	// across processes): wait until it shows the run running.
	eventually(t, a.name+" sees the run running", func() bool {
		r, err := a.store.LatestRun(ctx, "tl")
		return err == nil && r != nil && r.RunID == sub.RunID && r.Status == engine.RunRunning
	})

	res, how, err := a.mb.SendMessages(ctx, engine.SubmitRequest{ThreadID: "tl", Messages: []engine.Message{userMsg("live one")}}, "")
	if err != nil || how != engine.DeliveredLive || res.RunID != sub.RunID {
		t.Fatalf("send messages through %s: %+v %s %v", a.name, res, how, err)
	}
	ok, err := a.mb.SendDecision(ctx, sub.RunID, engine.Decision{CallID: "call-1", Resume: json.RawMessage(`{"action":"resume"}`)})
	if err != nil || !ok {
		t.Fatalf("send decision through %s: %v %v", a.name, ok, err)
	}
	w.mu.Lock()
	got := *w.active["tl"]
	w.mu.Unlock()
	if got.sidecar != running.sidecar || len(got.live) != 1 || got.live[0] != "live one" || len(got.decisions) != 1 || got.decisions[0] != "call-1" {
		t.Fatalf("the run on %s received live=%q decisions=%q", got.sidecar, got.live, got.decisions)
	}
	// A decision for a run that does not run anywhere is not delivered.
	if ok, err := a.mb.SendDecision(ctx, "no-such-run", engine.Decision{CallID: "c"}); ok || err != nil {
		t.Fatalf("decision for an unknown run: %v %v", ok, err)
	}

	ok, err = a.mb.Cancel(ctx, sub.RunID)
	if err != nil || !ok {
		t.Fatalf("cancel through %s: %v %v", a.name, ok, err)
	}
	// Accepted means durable: the owner settled the claim before its
	// receipt (a crash right after cannot bring the run back).
	if d, err := a.store.LoadDispatch(ctx, sub.DispatchID); err != nil || d == nil || d.Status != engine.StatusAcked {
		t.Fatalf("dispatch right after an accepted remote cancel: %+v %v, want acked", d, err)
	}
	d := waitStatus(t, a, sub.DispatchID, engine.StatusAcked)
	if d.Termination == nil || d.Termination.Type != engine.TermCancelled {
		t.Errorf("cancelled dispatch: termination %+v", d.Termination)
	}
	w.mu.Lock()
	rs := w.runsOfLocked(sub.DispatchID)
	w.mu.Unlock()
	if len(rs) != 1 || !rs[0].cancelled {
		t.Fatalf("runs of the cancelled dispatch:\n%s", w.dump())
	}
}

// Work enqueued on a sidecar without agent slots is picked up by an idle
// one through a dispatch signal (the sweep is a minute away and nothing
// else wakes the idle sidecar).
func TestIdleSidecarPicksUpWorkThroughSignals(t *testing.T) {
	t.Parallel()
	w := newWorld()
	scs := startSidecars(t, w, freshConfig(), 0, 2)
	ctx := context.Background()
	var ids []string
	for i := range 4 {
		res, err := scs[0].mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("ts%d", i), Messages: []engine.Message{userMsg("work 100")}})
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != engine.SubmitQueued {
			t.Fatalf("submit on a sidecar without slots: %+v", res)
		}
		ids = append(ids, res.DispatchID)
	}
	spread := checkOnceEach(t, w, scs[0], ids)
	if spread["sc2"] != len(ids) {
		t.Fatalf("runs per sidecar %v, want all on sc2", spread)
	}
	var buf bytes.Buffer
	scs[1].mb.Metrics().WritePrometheus(&buf)
	if !strings.Contains(buf.String(), "mailbox_dispatch_signal_ack_total") {
		t.Fatalf("sc2 acked no dispatch signal:\n%s", buf.String())
	}
	w.checkNoOverlap(t)
}

// Messages and a cancel by thread id sent through one sidecar reach the
// run executing on another while work is queued behind it (found by
// review: the sender took the thread's latest run, the queued one, and
// queued the messages or answered "nothing to cancel").
func TestThreadCommandsReachTheRunningRunPastQueuedWork(t *testing.T) {
	t.Parallel()
	w := newWorld()
	scs := startSidecars(t, w, freshConfig(), 1, 1, 1)
	ctx := context.Background()
	sub, err := scs[0].mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "tq", Messages: []engine.Message{userMsg("hold")}})
	if err != nil {
		t.Fatal(err)
	}
	running := w.activeRun(t, "tq")
	a := other(scs, running.sidecar)
	behind, err := a.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "tq", Messages: []engine.Message{userMsg("hold")}})
	if err != nil || behind.Status != engine.SubmitQueued {
		t.Fatalf("the submit behind: %+v %v", behind, err)
	}
	eventually(t, a.name+" sees the run claimed", func() bool {
		ds, err := a.store.ListDispatches(ctx, "tq", engine.StatusFilter{engine.StatusClaimed}, 1, 0)
		return err == nil && len(ds) == 1 && ds[0].DispatchID == sub.DispatchID
	})
	res, how, err := a.mb.SendMessages(ctx, engine.SubmitRequest{ThreadID: "tq", Messages: []engine.Message{userMsg("live past the queue")}}, sub.RunID)
	if err != nil || how != engine.DeliveredLive || res.RunID != sub.RunID {
		t.Fatalf("send messages through %s: %+v %s %v; want live to %s", a.name, res, how, err, sub.RunID)
	}
	w.mu.Lock()
	got := *w.active["tq"]
	w.mu.Unlock()
	if got.dispatchID != sub.DispatchID || len(got.live) != 1 || got.live[0] != "live past the queue" {
		t.Fatalf("the running run received live=%q (dispatch %s)", got.live, got.dispatchID)
	}
	ok, err := a.mb.Cancel(ctx, "tq")
	if err != nil || !ok {
		t.Fatalf("cancel by thread through %s: %v %v", a.name, ok, err)
	}
	d := waitStatus(t, a, sub.DispatchID, engine.StatusAcked)
	if d.Termination == nil || d.Termination.Type != engine.TermCancelled {
		t.Errorf("cancelled dispatch: termination %+v", d.Termination)
	}
}

// A command the run's owner refuses is answered at once: its sender on
// another sidecar does not wait out the live timeout (found by review:
// every refusal cost 5 s there, against none on the owner).
func TestARefusedLiveCommandIsAnsweredAtOnce(t *testing.T) {
	t.Parallel()
	w := newWorld()
	cfg := freshConfig()
	cfg.LiveTimeout = time.Minute
	scs := startSidecars(t, w, cfg, 1, 1, 1)
	ctx := context.Background()
	sub, err := scs[0].mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "tr", Messages: []engine.Message{userMsg("hold")}})
	if err != nil {
		t.Fatal(err)
	}
	running := w.activeRun(t, "tr")
	a := other(scs, running.sidecar)
	eventually(t, a.name+" sees the run running", func() bool {
		r, err := a.store.LatestRun(ctx, "tr")
		return err == nil && r != nil && r.RunID == sub.RunID && r.Status == engine.RunRunning
	})
	// Without the owner's answer the send would wait for the live timeout
	// (a minute), past this context's 20 s.
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	ok, err := a.mb.SendDecision(dctx, sub.RunID, engine.Decision{CallID: "refuse-me", Resume: json.RawMessage(`{"action":"resume"}`)})
	if ok || err != nil || dctx.Err() != nil {
		t.Fatalf("a refused decision through %s: delivered=%v err=%v, context %v; want not delivered, answered before the context ended", a.name, ok, err, dctx.Err())
	}
	if ok, err := a.mb.SendDecision(ctx, sub.RunID, engine.Decision{CallID: "call-2", Resume: json.RawMessage(`{"action":"resume"}`)}); !ok || err != nil {
		t.Fatalf("an accepted decision through %s: %v %v", a.name, ok, err)
	}
	if ok, err := a.mb.Cancel(ctx, sub.RunID); !ok || err != nil { // not left for the shutdown's grace
		t.Fatalf("cancel through %s: %v %v", a.name, ok, err)
	}
}

// An idempotent repeat through another sidecar right after the first
// submit finds the first's dispatch from its dedupe lock, not the other
// sidecar's index, which may not have it yet (found by review: repeats
// through two sidecars made a second dispatch, or a 409).
func TestARepeatThroughAnotherSidecarFindsTheFirstAtOnce(t *testing.T) {
	t.Parallel()
	w := newWorld()
	scs := startSidecars(t, w, freshConfig(), 0, 0)
	ctx := context.Background()
	for i := range 20 {
		thread := fmt.Sprintf("tk%d", i)
		req := engine.SubmitRequest{ThreadID: thread, DedupeKey: "same", Messages: []engine.Message{userMsg("hold")}}
		first, err := scs[0].mb.SubmitBackground(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		again, err := scs[1].mb.SubmitBackground(ctx, req)
		if err != nil || again.DispatchID != first.DispatchID {
			t.Fatalf("%s: the repeat through %s: %+v %v; want the first's dispatch %s", thread, scs[1].name, again, err, first.DispatchID)
		}
		if holder, err := scs[1].store.DedupeHolder(ctx, thread, "same"); err != nil || holder != first.DispatchID {
			t.Fatalf("%s: DedupeHolder %q %v", thread, holder, err)
		}
	}
}

// blindIndex is a NATS store whose listings have not caught up yet.
type blindIndex struct{ *natsstore.Store }

func (blindIndex) ListDispatches(context.Context, string, engine.StatusFilter, int, int) ([]engine.Dispatch, error) {
	return nil, nil
}

// The engine finds a repeat's first dispatch through the store's dedupe
// lock (DedupeLookup) even when the listing does not show it yet.
func TestARepeatIsFoundThroughTheDedupeLockNotTheListing(t *testing.T) {
	t.Parallel()
	st := openCfg(t, freshConfig())
	w := newWorld()
	ag := &fakeAgent{name: "sc1", w: w, capacity: 0, capCh: make(chan struct{}, 1)}
	mb, err := engine.New(blindIndex{st}, ag, engineConfig("sc1"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	req := engine.SubmitRequest{ThreadID: "tb", DedupeKey: "k", Messages: []engine.Message{userMsg("hold")}}
	first, err := mb.SubmitBackground(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	again, err := mb.SubmitBackground(ctx, req)
	if err != nil || again.DispatchID != first.DispatchID {
		t.Fatalf("the repeat: %+v %v; want the first's dispatch %s", again, err, first.DispatchID)
	}
}
