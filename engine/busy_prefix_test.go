package engine_test

import (
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

// twoAgents is the fake executor as two agents that count their slots
// (engine.SlotCounter): one serves agent id "full" with one slot, which
// each of its runs keeps until finish is received from (nil: until the
// run's context ends), and refuses the runs that come meanwhile
// (CodeAgentBusy); the other serves the default agent id ("") with
// slots slots and runs noop.
type twoAgents struct {
	*fakeExecutor
	finish     chan struct{}
	refused    atomic.Int64
	mu         sync.Mutex
	fullBusy   bool
	fullRuns   []string // the threads the full agent ran, in order
	refusedLog []string // the refusals, in order
	active     int      // runs of the default agent id
	slots      int
	// noSlotAfterAdmission: once FreeSlots shows the full agent's slot
	// free, the dispatcher's claim that follows finds no engine slot left,
	// as if another claimer took it meanwhile (the round's own count of
	// free slots is Capacity's first call after FreeSlots, the claim's
	// the second); cleared then.
	noSlotAfterAdmission atomic.Bool
	capCalls             int // Capacity calls since FreeSlots armed that (0: not armed)
}

// Capacity is the fake's, but see noSlotAfterAdmission.
func (a *twoAgents) Capacity() int {
	a.mu.Lock()
	if a.capCalls > 0 {
		if a.capCalls++; a.capCalls == 3 {
			a.capCalls = 0
			a.noSlotAfterAdmission.Store(false)
			a.mu.Unlock()
			return 0
		}
	}
	a.mu.Unlock()
	return a.fakeExecutor.Capacity()
}

func newTwoAgents(slots int) *twoAgents {
	a := &twoAgents{slots: slots}
	a.fakeExecutor = newFake(slots+1, a.run)
	a.fakeExecutor.forget = true
	return a
}

func (a *twoAgents) run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	a.mu.Lock()
	if req.AgentID == "full" {
		if a.fullBusy {
			a.refusedLog = append(a.refusedLog, fmt.Sprintf("%s while %s ran", req.ThreadID, a.fullRuns[len(a.fullRuns)-1]))
			a.mu.Unlock()
			a.refused.Add(1)
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentBusy, Error: "full"}
		}
		a.fullBusy = true
		a.fullRuns = append(a.fullRuns, req.ThreadID)
		a.mu.Unlock()
		if req.SlotTaken != nil {
			req.SlotTaken()
		}
		defer func() {
			a.mu.Lock()
			a.fullBusy = false // free before the engine learns the run ended
			a.mu.Unlock()
		}()
		select {
		case <-a.finish:
			return noop(ctx, req, sink)
		case <-ctx.Done():
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable, Error: "stopped"}
		}
	}
	a.active++
	a.mu.Unlock()
	if req.SlotTaken != nil {
		req.SlotTaken()
	}
	defer func() {
		a.mu.Lock()
		a.active--
		a.mu.Unlock()
	}()
	return noop(ctx, req, sink)
}

// FreeSlots implements engine.SlotCounter.
func (a *twoAgents) FreeSlots() []engine.AgentSlots {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []engine.AgentSlots
	if !a.fullBusy {
		out = append(out, engine.AgentSlots{Free: 1, AgentIDs: []string{"full"}})
		if a.noSlotAfterAdmission.Load() && a.capCalls == 0 {
			a.capCalls = 1
		}
	}
	if free := a.slots - a.active; free > 0 {
		out = append(out, engine.AgentSlots{Free: free, AgentIDs: []string{""}})
	}
	return out
}

// Serves implements engine.SlotCounter.
func (a *twoAgents) Serves(id string) bool { return id == "full" || id == engine.DefaultAgentID }

// ranFull returns the threads the full agent ran, in order.
func (a *twoAgents) ranFull() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.fullRuns)
}

// Threads waiting for a full agent's free slot count in the held prefix:
// the rounds that serve other agents list after them, and each free slot
// of that agent admits the oldest of them, with no listing from the
// start (found by BenchmarkBackgroundRunBesideBusy: every round listed
// them all, and 10 000 of them made every other run cost twice as much).
// The clock stands still: the prefix is not listed again for its age.
func TestThreadsWaitingForAFullAgentAreAdmittedFromThePrefix(t *testing.T) {
	exec, mb, ls, s := busyPrefixRig(t)
	n := engine.HeldPrefixMin + 8
	ctx := context.Background()
	// Each waiting thread was refused once: its submit does not end the
	// hold that the dispatcher's claim of its dispatch, refused, set.
	refused := exec.refused.Load()
	if refused != int64(n-1) {
		exec.mu.Lock()
		defer exec.mu.Unlock()
		t.Fatalf("%d refusals of the %d waiting threads: %v", refused, n-1, exec.refusedLog)
	}
	fromTheStart := func(phase string) {
		t.Helper()
		for _, l := range ls.take() {
			if l.after.IsZero() {
				t.Fatalf("%s: a round listed the order from the start: %+v", phase, l.got)
			}
			for _, e := range l.got {
				if strings.HasPrefix(e.ThreadID, "f") {
					t.Fatalf("%s: a round listed %s, which waits in the prefix", phase, e.ThreadID)
				}
			}
		}
	}
	ls.take()

	// Other threads' runs: the rounds list after the waiting threads.
	var runs []engine.SubmitResult
	for i := range 10 {
		res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprint("o", i%5), Messages: []engine.Message{userMsg("go")}})
		if err != nil {
			t.Fatal(err)
		}
		runs = append(runs, res)
	}
	for _, res := range runs {
		eventually(t, res.DispatchID+" acked", func() bool {
			d, err := s.LoadDispatch(ctx, res.DispatchID)
			return err == nil && d.Status == engine.StatusAcked
		})
	}
	fromTheStart("other agents' runs")

	// The full agent's slot frees five times: the oldest waiting thread
	// takes it each time, and the prefix is kept.
	for i := range 5 {
		exec.finish <- struct{}{}
		exec.awaitFullRun(t, i+1, fmt.Sprintf("f%02d", i+1))
	}
	fromTheStart("free slots of the full agent")
	if got, _ := mb.HeldPrefix(); got != n-1-5 {
		t.Fatalf("prefix of %d threads after 5 were admitted, want %d", got, n-1-5)
	}
	if r := exec.refused.Load(); r != refused {
		exec.mu.Lock()
		defer exec.mu.Unlock()
		t.Fatalf("%d refusals since the threads settled: a thread waiting for a free slot was claimed while there was none (%v)", r-refused, exec.refusedLog)
	}
}

// A thread admitted from the held prefix whose claim finds no slot left
// (another claimer took it meanwhile) keeps its turn: the prefix is
// dropped, and the next round lists it again. Before, rounds went on
// listing after the prefix, and gave its agent's free slots to younger
// threads (found by review).
func TestAThreadAdmittedFromThePrefixButNotClaimedKeepsItsTurn(t *testing.T) {
	exec, _, _, _ := busyPrefixRig(t)
	exec.noSlotAfterAdmission.Store(true)
	exec.finish <- struct{}{}
	exec.awaitFullRun(t, 1, "f01")
	if exec.noSlotAfterAdmission.Load() {
		t.Fatal("no claim of an admitted thread found its slot taken: the test tests nothing")
	}
	exec.finish <- struct{}{}
	exec.awaitFullRun(t, 2, "f02")
}

// awaitFullRun waits for the full agent's run i (from 0) and fails
// unless it is of thread want.
func (a *twoAgents) awaitFullRun(t *testing.T, i int, want string) {
	t.Helper()
	eventually(t, want+" run", func() bool { return len(a.ranFull()) > i })
	if got := a.ranFull(); got[i] != want {
		a.mu.Lock()
		defer a.mu.Unlock()
		t.Fatalf("the full agent ran %v: want %s next (refusals: %v)", got, want, a.refusedLog)
	}
}

// busyPrefixRig is a started mailbox on a clock that stands still, over
// twoAgents (two slots for the default agent id) and a store that records
// the dispatcher's listings, with HeldPrefixMin+8 threads (f00, f01, …)
// submitted for the full agent: f00 runs, and each of the others was
// refused once and waits in the held prefix.
func busyPrefixRig(t *testing.T) (*twoAgents, *engine.Mailbox, *listingStore, *badgerstore.Store) {
	t.Helper()
	now := new(atomic.Int64)
	now.Store(time.Now().UnixMilli())
	exec := newTwoAgents(2)
	exec.finish = make(chan struct{})
	var ls *listingStore
	s, mb := startedOn(t, exec, engine.Config{Now: now.Load}, func(s *badgerstore.Store) engine.Store {
		ls = &listingStore{Store: s}
		return ls
	}, 200*time.Millisecond) // the full agent's last run is held until its context ends
	r := &rig{store: s, exec: exec.fakeExecutor, mb: mb}
	ctx := context.Background()
	n := engine.HeldPrefixMin + 8
	for i := range n {
		if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("f%02d", i), AgentID: "full", Messages: []engine.Message{userMsg("x")}}); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			exec.awaitFullRun(t, 0, "f00") // it, not one of the others, takes the slot
		}
	}
	// f00 runs; each of the others is refused and waits, all of them in
	// the prefix.
	state := ""
	settled := func() bool {
		for i := 1; i < n; i++ {
			if th := fmt.Sprintf("f%02d", i); !backInQueue(t, r, th) {
				state = th + " not back in the queue"
				return false
			}
		}
		got, last := mb.HeldPrefix()
		state = fmt.Sprintf("%d refusals; prefix of %d ending %+v", exec.refused.Load(), got, last)
		return got == n-1
	}
	for deadline := time.Now().Add(30 * time.Second); !settled(); time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the waiting threads did not settle in 30 s: %s", state)
		}
	}
	return exec, mb, ls, s
}

// slottedFake is the fake executor as agents that count their slots:
// two free for agent id "writer", none ever for "full".
type slottedFake struct{ *fakeExecutor }

func (slottedFake) FreeSlots() []engine.AgentSlots {
	return []engine.AgentSlots{{Free: 2, AgentIDs: []string{"writer"}}}
}

func (slottedFake) Serves(id string) bool { return id == "full" || id == "writer" }

// Work submitted while an attempt of its thread is in flight, ahead of
// it and for an agent that is here, is not held behind that attempt's
// refusal: the submit found no hold to end yet, and the refusal's hold,
// set after it, kept the new work waiting for the full agent's slot, up
// to a minute (found by review).
func TestWorkSubmittedDuringARefusedAttemptIsNotHeldBehindIt(t *testing.T) {
	inExec, refuse := make(chan struct{}), make(chan struct{})
	var once sync.Once
	exec := slottedFake{newFake(3, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.AgentID == "full" {
			once.Do(func() { close(inExec); <-refuse }) // a refusal that takes a moment
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentBusy, Error: "full"}
		}
		return complete(ctx, req, sink)
	})}
	s, mb := startedOn(t, exec, engine.Config{}, nil, 5*time.Second)
	submitFor(t, mb, "t", "full", false, "d")
	<-inExec
	e := submitFor(t, mb, "t", "writer", true, "e")
	close(refuse)
	eventually(t, "the writer's run done", func() bool { return dispatchStatus(t, s, e.DispatchID) == engine.StatusAcked })
}

// startedOn is a started mailbox over exec on an in-memory Badger store
// (wrapped by wrap, if not nil), stopped (giving up on held runs after
// stopWait) and closed when t ends.
func startedOn(t *testing.T, exec engine.Executor, cfg engine.Config, wrap func(*badgerstore.Store) engine.Store, stopWait time.Duration) (*badgerstore.Store, *engine.Mailbox) {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	var st engine.Store = s
	if wrap != nil {
		st = wrap(s)
	}
	mb, err := engine.New(st, exec, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), stopWait)
		defer cancel()
		mb.Stop(ctx)
	})
	return s, mb
}

// sharedAgent is the fake executor as two agents that count their slots:
// agent A serves agent ids "x" and "y" with one slot, and refuses a run
// of either while it has one (CodeAgentBusy); agent B serves "z" with one
// slot and is never asked. A run of "y" waits for gate if it is set.
type sharedAgent struct {
	*fakeExecutor
	gate  chan struct{}
	mu    sync.Mutex
	aBusy bool
	order []string // the threads A ran, in order
}

func newSharedAgent() *sharedAgent {
	a := &sharedAgent{gate: make(chan struct{})}
	a.fakeExecutor = newFake(2, a.run)
	return a
}

func (a *sharedAgent) run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	a.mu.Lock()
	if a.aBusy {
		a.mu.Unlock()
		return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentBusy, Error: "A is full"}
	}
	a.aBusy = true
	a.order = append(a.order, req.ThreadID)
	gate := a.gate
	a.mu.Unlock()
	if req.SlotTaken != nil {
		req.SlotTaken()
	}
	defer func() {
		a.mu.Lock()
		a.aBusy = false // free before the engine learns the run ended, as the hub's
		a.mu.Unlock()
	}()
	if req.AgentID == "y" && gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
		}
	}
	return noop(ctx, req, sink)
}

// FreeSlots implements engine.SlotCounter.
func (a *sharedAgent) FreeSlots() []engine.AgentSlots {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := []engine.AgentSlots{{Free: 1, AgentIDs: []string{"z"}}}
	if !a.aBusy {
		out = append(out, engine.AgentSlots{Free: 1, AgentIDs: []string{"x", "y"}})
	}
	return out
}

// Serves implements engine.SlotCounter.
func (a *sharedAgent) Serves(id string) bool { return id == "x" || id == "y" || id == "z" }

func (a *sharedAgent) ran() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.order)
}

// A thread waiting for a full agent's slot gets it when the agent frees
// it, though the run that ends is of another agent id the agent serves
// and its thread has more work: the finishing attempt does not claim its
// own thread's next run, which the dispatcher would give the slot to the
// waiting thread instead (found by review: ty's next run was claimed at
// every completion, and tx waited for all 40 of them).
func TestAWaitingThreadGetsASlotAnotherAgentIDOfItsAgentKeeps(t *testing.T) {
	exec := newSharedAgent()
	s, mb := startedOn(t, exec, engine.Config{}, nil, 5*time.Second)
	ctx := context.Background()
	submit := func(thread, agent string) engine.SubmitResult {
		t.Helper()
		res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, AgentID: agent, Messages: []engine.Message{userMsg("go")}})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	submit("ty", "y")
	eventually(t, "ty's first run on A", func() bool { return len(exec.ran()) == 1 })
	tx := submit("tx", "x")
	// Refused (A is full; B does not serve x) and set aside for A's slot.
	eventually(t, "tx refused and back in the queue", func() bool {
		n, _, _ := exec.stats()
		d, err := s.LoadDispatch(ctx, tx.DispatchID)
		return n >= 2 && err == nil && d.Status == engine.StatusQueued
	})
	var ty []engine.SubmitResult
	for range 40 {
		ty = append(ty, submit("ty", "y"))
	}
	// The wake-ups of the submits spent: a pass of the dispatcher while
	// A's slot is free would give it to tx whatever the completions do.
	time.Sleep(200 * time.Millisecond)
	exec.mu.Lock()
	close(exec.gate)
	exec.gate = nil
	exec.mu.Unlock()
	eventually(t, "tx ran", func() bool { return dispatchStatus(t, s, tx.DispatchID) == engine.StatusAcked })
	order := exec.ran()
	if i := slices.Index(order, "tx"); i < 0 || i > 20 {
		t.Fatalf("tx ran on A as its run %d of %v; want it among the first (each of A's slots freed could take it)", i, order)
	}
	for _, res := range ty {
		eventually(t, "ty's runs done", func() bool { return dispatchStatus(t, s, res.DispatchID) == engine.StatusAcked })
	}
}
