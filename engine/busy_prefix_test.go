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
	finish   chan struct{}
	refused  atomic.Int64
	mu       sync.Mutex
	fullBusy bool
	fullRuns []string // the threads the full agent ran, in order
	active   int      // runs of the default agent id
	slots    int
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
	}
	if free := a.slots - a.active; free > 0 {
		out = append(out, engine.AgentSlots{Free: free, AgentIDs: []string{""}})
	}
	return out
}

// Serves implements engine.SlotCounter.
func (a *twoAgents) Serves(id string) bool { return id == "full" || id == "" }

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
	now := new(atomic.Int64)
	now.Store(time.Now().UnixMilli())
	exec := newTwoAgents(2)
	exec.finish = make(chan struct{})
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ls := &listingStore{Store: s}
	mb, err := engine.New(ls, exec, engine.Config{Now: now.Load})
	if err != nil {
		t.Fatal(err)
	}
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		mb.Stop(ctx) // the full agent's last run is held until its context ends
	}()
	r := &rig{store: s, exec: exec.fakeExecutor, mb: mb}
	ctx := context.Background()
	n := engine.HeldPrefixMin + 8
	for i := range n {
		if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("f%02d", i), AgentID: "full", Messages: []engine.Message{userMsg("x")}}); err != nil {
			t.Fatal(err)
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
		want := fmt.Sprintf("f%02d", i+1)
		eventually(t, want+" run", func() bool { return len(exec.ranFull()) == i+2 })
		if got := exec.ranFull(); got[i+1] != want {
			t.Fatalf("the full agent ran %v: want %s next", got, want)
		}
	}
	fromTheStart("free slots of the full agent")
	if got, _ := mb.HeldPrefix(); got != n-1-5 {
		t.Fatalf("prefix of %d threads after 5 were admitted, want %d", got, n-1-5)
	}
	if r := exec.refused.Load(); r != int64(n-1) {
		t.Fatalf("%d refusals, want one for each of the %d waiting threads", r, n-1)
	}
}
