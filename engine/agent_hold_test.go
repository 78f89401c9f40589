package engine_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
)

// unavailableFor is an executor script that no agent serves agent for.
func unavailableFor(agent string) func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
	return func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.AgentID == agent {
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable, Error: "nobody serves " + agent}
		}
		return complete(ctx, req, sink)
	}
}

// refusedForReviewer starts a rig with cfg on an executor that no agent
// serves "reviewer" for, submits work for it on thread t1 and waits for
// its first attempt, refused.
func refusedForReviewer(t *testing.T, cfg engine.Config) (*rig, engine.SubmitResult) {
	t.Helper()
	r := newRig(t, newFake(2, unavailableFor("reviewer")), cfg)
	r.start(t)
	bad, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t1", AgentID: "reviewer", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first attempt", func() bool { n, _, _ := r.exec.stats(); return n >= 1 })
	return r, bad
}

// A thread set aside because no agent served its run is served again as
// soon as its queue changes: here its dispatch for the absent agent is
// cancelled and work for an agent that is here is submitted. (Found by
// review: the hold outlived the dispatch that caused it, and the new
// work waited out the minute.) The bound below is far under the hold.
func TestAnAgentHoldEndsWhenTheThreadsQueueChanges(t *testing.T) {
	r, bad := refusedForReviewer(t, engine.Config{})
	ctx := context.Background()
	eventually(t, "back in the queue", func() bool { return dispatchStatus(t, r.store, bad.DispatchID) == engine.StatusQueued })
	if ok, err := r.mb.Cancel(ctx, bad.DispatchID); err != nil || !ok {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	good, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", AgentID: "writer", Messages: []engine.Message{userMsg("b")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the work for the agent that is here done", func() bool {
		return dispatchStatus(t, r.store, good.DispatchID) == engine.StatusAcked
	})
}

// A cancel of a held thread's queued dispatch wakes the dispatcher for
// the work behind it: it slept until the hold's end (a minute), and the
// work waited for the next sweep (found by review). Here nothing else
// wakes it: the work was queued before the cancel, and sweeps are an
// hour apart.
func TestACancelOfAHeldDispatchServesTheWorkBehindIt(t *testing.T) {
	r, bad := refusedForReviewer(t, engine.Config{SweepInterval: time.Hour})
	ctx := context.Background()
	good, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", AgentID: "writer", Messages: []engine.Message{userMsg("b")}})
	if err != nil {
		t.Fatal(err)
	}
	// The submit ended the hold; the dispatcher claims the thread again,
	// its first dispatch is refused again, and the thread is held again.
	eventually(t, "refused again", func() bool { n, _, _ := r.exec.stats(); return n >= 2 })
	eventually(t, "back in the queue", func() bool { return dispatchStatus(t, r.store, bad.DispatchID) == engine.StatusQueued })
	time.Sleep(100 * time.Millisecond) // its release's wake-ups spent
	if ok, err := r.mb.Cancel(ctx, bad.DispatchID); err != nil || !ok {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	eventually(t, "the work behind the cancelled dispatch done", func() bool {
		return dispatchStatus(t, r.store, good.DispatchID) == engine.StatusAcked
	})
}

// No hold is set when agents came or went while the attempt ran: the
// executor's "no agent" answer may predate them, and the wake-up that
// would end the hold has passed (found by review: the dispatcher took
// the CapacityChanged signal before the hold was set, which then lasted
// its minute with the agent there).
func TestAnAgentHoldIsNotSetWhenAgentsCameMeanwhile(t *testing.T) {
	var calls atomic.Int32
	var f *fakeExecutor
	f = newFake(2, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if calls.Add(1) == 1 {
			f.setCapacity(3) // an agent for it connects after the executor looked
			for len(f.capCh) > 0 {
				time.Sleep(time.Millisecond) // the dispatcher takes the signal
			}
			time.Sleep(20 * time.Millisecond)
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable, Error: "nobody serves reviewer"}
		}
		return complete(ctx, req, sink)
	})
	r := newRig(t, f, engine.Config{})
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t1", AgentID: "reviewer", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the run done once the agent came", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
}

// slowLoadStore slows LoadDispatch of one dispatch (fault injection).
type slowLoadStore struct {
	*badgerstore.Store
	mu   sync.Mutex
	slow string
}

func (s *slowLoadStore) LoadDispatch(ctx context.Context, id string) (*engine.Dispatch, error) {
	s.mu.Lock()
	slow := s.slow == id
	s.mu.Unlock()
	if slow {
		time.Sleep(200 * time.Millisecond)
	}
	return s.Store.LoadDispatch(ctx, id)
}

// A foreground submit queued behind a run that claimed its thread after
// its interrupt leaves that run's log the thread's until it starts
// itself (found by review: Reattach, and a repeat of the running
// submit's dedupe key, followed the queued run's empty log).
func TestAForegroundSubmitQueuedBehindARunLeavesItTheThreadsLog(t *testing.T) {
	release := make(chan struct{})
	r0done := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		text := string(req.Messages[len(req.Messages)-1].Content)
		switch {
		case strings.Contains(text, "r0"):
			<-ctx.Done()
			defer close(r0done)
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
		case strings.Contains(text, "b"):
			sink.Emit([]byte(`{"type":"text_delta","delta":"from B"}`))
			<-release
		}
		return complete(ctx, req, sink)
	}
	var ss *slowLoadStore
	r := newRigWith(t, newFake(4, script), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		ss = &slowLoadStore{Store: s}
		return ss
	})
	r.start(t)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	ctx := context.Background()
	r0, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("r0")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "r0 runs", func() bool { n, _, _ := r.exec.stats(); return n == 1 })
	// The foreground submit's look for r0 still stopping is slow: B,
	// submitted once r0 has stopped, claims the thread first.
	ss.mu.Lock()
	ss.slow = r0.DispatchID
	ss.mu.Unlock()
	bc := make(chan engine.SubmitResult, 1)
	go func() {
		<-r0done
		b, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("b")}})
		if err != nil {
			t.Error(err)
		}
		bc <- b
	}()
	a, aEvents, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	b := <-bc
	if a.Status != engine.SubmitQueued || dispatchStatus(t, r.store, b.DispatchID) != engine.StatusClaimed {
		t.Fatalf("foreground %+v, background %+v (%s): want the foreground queued behind the running background run", a, b, dispatchStatus(t, r.store, b.DispatchID))
	}
	l := r.mb.Reattach("t1")
	if l == nil || l == aEvents {
		t.Fatalf("while B runs, the thread's log is %p, A's queued one %p: want B's", l, aEvents)
	}
	evs, _, _, _ := l.Read(0, 100, nil)
	if len(evs) == 0 || !strings.Contains(string(evs[0].Data), "from B") {
		t.Fatalf("the thread's log while B runs holds %+v, want B's event", evs)
	}
	close(release)
	if last := waitClosed(t, aEvents); last != "run_finish" {
		t.Fatalf("A's stream ended with %q", last)
	}
}

// A thread whose run no connected agent serves is tried again after a
// minute, then after two, four… up to claimHoldAgentMax while it is
// refused so: every minute cost each such thread a claim and a release,
// store work a minute in proportion to a backlog nobody serves.
func TestAnUnservedThreadIsTriedLessAndLessOften(t *testing.T) {
	r, now, refused := heldRig(t, 1, engine.Config{}, nil, nil)
	ctx := context.Background()
	// rounds makes the dispatcher look a few times (submits of work for an
	// agent that is here) and returns h00's refusals.
	rounds := func(n int) int {
		for range n {
			res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "w", Messages: []engine.Message{userMsg("go")}})
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "the work acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
		}
		return refused("h00")
	}
	waitRefused := func(want int) {
		t.Helper()
		for i := 0; rounds(1) < want; i++ {
			if i == 50 {
				t.Fatalf("h00 refused %d times, want %d", refused("h00"), want)
			}
		}
		eventually(t, "h00 held again (back in the queue)", func() bool { return backInQueue(t, r, "h00") })
	}
	now.Add(61_000) // the first hold: a minute
	waitRefused(2)
	now.Add(61_000) // the second: two minutes
	if got := rounds(5); got != 2 {
		t.Fatalf("h00 tried again a minute into its second hold (refused %d times)", got)
	}
	now.Add(61_000)
	waitRefused(3)
}

// A run refused because no connected agent serves its agent id is
// logged, once a minute per agent id, not once per thread: an operator
// learns which agent id work waits for (only a held-threads count said
// so before), and a backlog does not flood the log.
func TestWorkForAnUnservedAgentIDIsLoggedOnceAMinute(t *testing.T) {
	var logs syncbuf.Buffer
	r, now, refused := heldRig(t, 3, engine.Config{Logger: slog.New(slog.NewJSONHandler(&logs, nil))}, nil, nil)
	warnings := func() int {
		n := 0
		for l := range strings.Lines(logs.String()) {
			if strings.Contains(l, `"msg":"no connected agent serves the run's agent id`) {
				if !strings.Contains(l, `"agent_id":"absent"`) || !strings.Contains(l, `"level":"WARN"`) {
					t.Fatalf("the warning %s does not name the agent id", l)
				}
				n++
			}
		}
		return n
	}
	if got := warnings(); got != 1 {
		t.Fatalf("three refused threads logged %d warnings, want 1:\n%s", got, logs.String())
	}
	now.Add(61_000)
	if _, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "later", AgentID: "absent", Messages: []engine.Message{userMsg("x")}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the later thread refused", func() bool { return refused("later") == 1 })
	eventually(t, "a minute on, the next refusal logged", func() bool { return warnings() == 2 })
}

// startServing is a started mailbox on an in-memory store with exec as
// its executor; it stops and closes with the test.
func startServing(t *testing.T, exec *servingFake) *rig {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	mb, err := engine.New(s, exec, engine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mb.Stop(context.Background()) })
	return &rig{store: s, exec: exec.fakeExecutor, mb: mb}
}

// servingFake is the fake executor as an executor that counts slots
// (SlotCounter): it serves the agent ids in served.
type servingFake struct {
	*fakeExecutor
	mu     sync.Mutex
	served map[string]bool
	asked  map[string]int // Serves calls by the engine, by agent id
}

func (f *servingFake) FreeSlots() []engine.AgentSlots { return nil }

func (f *servingFake) Serves(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked[id]++
	return f.served[id]
}

// serves is Serves for the fake's own script (not counted).
func (f *servingFake) serves(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.served[id]
}

// timesAsked is how often the engine asked whether id is served.
func (f *servingFake) timesAsked(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.asked[id]
}

// Agents that come or go end the holds of threads no agent served only
// when an agent now serves their agent id (found by review: every agent
// that came or went tried every thread of a backlog nobody serves again,
// a claim and a release each).
func TestAgentsComingEndOnlyTheHoldsTheyServe(t *testing.T) {
	var mu sync.Mutex
	refusals := map[string]int{}
	refused := func(thread string) int {
		mu.Lock()
		defer mu.Unlock()
		return refusals[thread]
	}
	exec := &servingFake{served: map[string]bool{"writer": true}, asked: map[string]int{}}
	exec.fakeExecutor = newFake(2, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if !exec.serves(req.AgentID) {
			mu.Lock()
			refusals[req.ThreadID]++
			mu.Unlock()
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable, Error: "nobody serves " + req.AgentID}
		}
		return complete(ctx, req, sink)
	})
	r := startServing(t, exec)
	mb := r.mb
	ctx := context.Background()
	held := []string{"a0", "a1", "a2"}
	for _, th := range held {
		if _, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: th, AgentID: "absent", Messages: []engine.Message{userMsg("x")}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, th := range held {
		eventually(t, th+" refused and held", func() bool { return refused(th) == 1 && backInQueue(t, r, th) })
	}
	// An agent for another agent id comes: the holds stay. (The engine
	// asks, as it takes the signal, whether their agent id is served now.)
	asked := exec.timesAsked("absent")
	exec.setCapacity(3)
	eventually(t, "the signal taken", func() bool { return exec.timesAsked("absent") > asked })
	for i := range 3 {
		res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "w", AgentID: "writer", Messages: []engine.Message{userMsg(fmt.Sprint(i))}})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "the writer's run done", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	}
	for _, th := range held {
		if n := refused(th); n != 1 {
			t.Fatalf("%s tried again (%d refusals) when an agent for another agent id came", th, n)
		}
	}
	// One for their agent id comes: they run.
	exec.mu.Lock()
	exec.served["absent"] = true
	exec.mu.Unlock()
	exec.setCapacity(4)
	for _, th := range held {
		eventually(t, th+"'s run done once its agent came", func() bool {
			ds, err := r.store.ListDispatches(ctx, th, engine.StatusFilter{engine.StatusAcked}, 0, 0)
			return err == nil && len(ds) == 1
		})
	}
}

// A submit that names no agent id is for agent "default": with no agent
// serving it, it is answered queued, not running (found by review: taken
// for served by any agent, it was "running", and its run record said so
// with a session, although no agent ever ran it).
func TestASubmitWithoutAnAgentIDIsForTheDefaultAgent(t *testing.T) {
	exec := &servingFake{served: map[string]bool{"other": true}, asked: map[string]int{}}
	exec.fakeExecutor = newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if !exec.serves(req.AgentID) {
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable, Error: "nobody serves " + req.AgentID}
		}
		return complete(ctx, req, sink)
	})
	mb := startServing(t, exec).mb
	res, _, err := mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != engine.SubmitQueued || exec.timesAsked(engine.DefaultAgentID) == 0 {
		t.Fatalf("a submit without an agent id, no agent serving %q: %s (asked %d times); want queued", engine.DefaultAgentID, res.Status, exec.timesAsked(engine.DefaultAgentID))
	}
}
