package engine_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// staleDispatchRead answers one LoadDispatch of hide with nothing, as a
// read taken just before another sidecar on the same store continued the
// run would have.
type staleDispatchRead struct {
	*badgerstore.Store
	hide atomic.Pointer[string]
}

func (s *staleDispatchRead) LoadDispatch(ctx context.Context, id string) (*engine.Dispatch, error) {
	if h := s.hide.Load(); h != nil && *h == id && s.hide.CompareAndSwap(h, nil) {
		return nil, nil
	}
	return s.Store.LoadDispatch(ctx, id)
}

// A message that names no run continues the thread's waiting run only
// while no dispatch of that run is pending. When the run turns out, as
// it is written, to have a pending dispatch after all (a writer outside
// the thread's lock continued it between the two reads; here a stale
// read stands for it), the message gets a run of its own instead of the
// validation error a hint naming that run gets. The crash harness found
// it: with the NATS store a live message was answered 400 "run_id … is
// not open for dispatch".
func TestMessageRacingAContinuationGetsARunOfItsOwn(t *testing.T) {
	stale := &staleDispatchRead{}
	r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store { stale.Store = s; return stale })
	ctx := context.Background()
	for _, path := range []string{"background", "message"} {
		thread, waiting := "thread-"+path, "run-waiting-"+path
		if err := r.store.CreateRun(ctx, spWaitingRun(waiting, thread, engine.WaitUserInput)); err != nil {
			t.Fatal(err)
		}
		first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("one")}})
		if err != nil || first.RunID != waiting {
			t.Fatalf("%s: first message: %+v %v, want the waiting run continued", path, first, err)
		}
		id := first.DispatchID
		stale.hide.Store(&id) // the reuse check reads the continuation as absent
		second := engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("two")}}
		var res engine.SubmitResult
		if path == "background" {
			res, err = r.mb.SubmitBackground(ctx, second)
		} else {
			res, _, err = r.mb.SendMessages(ctx, second, "")
		}
		if err != nil {
			t.Fatalf("%s racing the continuation: %v", path, err)
		}
		if res.RunID == "" || res.RunID == waiting || res.Status != engine.SubmitQueued {
			t.Fatalf("%s racing the continuation: %+v, want a queued run of its own", path, res)
		}
		if stale.hide.Load() != nil {
			t.Fatalf("%s: the stale read was not taken: the race was not reproduced", path)
		}
		if run := execRun(t, r.store, waiting); run.DispatchID != first.DispatchID {
			t.Fatalf("%s: the waiting run was rewritten: dispatch %s, want %s", path, run.DispatchID, first.DispatchID)
		}
		if ds, _ := r.store.ListDispatches(ctx, thread, nil, 0, 0); len(ds) != 2 {
			t.Fatalf("%s: %d dispatches, want 2", path, len(ds))
		}
	}
}

// rejectAtCommit refuses one Submit that continues run, as the NATS store
// refuses one at commit when a sidecar sharing the store continued that
// run first (natsstore checkNotPending).
type rejectAtCommit struct {
	*badgerstore.Store
	run atomic.Pointer[string]
}

func (s *rejectAtCommit) Submit(ctx context.Context, c engine.Checkpoint, d engine.Dispatch) ([]engine.MessageRecord, engine.Dispatch, error) {
	if h := s.run.Load(); h != nil && c.Run != nil && c.Run.RunID == *h && s.run.CompareAndSwap(h, nil) {
		return nil, engine.Dispatch{}, engine.Validationf("run_id '%s' is not open for dispatch", *h)
	}
	return s.Store.Submit(ctx, c, d)
}

// A request that names no run and is refused at commit for continuing
// the thread's waiting run (its store found a dispatch of that run
// pending only then) gets a run of its own, as when the engine's own
// check finds it; it was answered 400 "run_id … is not open for
// dispatch", a run the client never named.
func TestARequestRefusedAtCommitForAWaitingRunGetsARunOfItsOwn(t *testing.T) {
	rej := &rejectAtCommit{}
	r := newRigWith(t, newFake(0, complete), engine.Config{}, func(s *badgerstore.Store) engine.Store { rej.Store = s; return rej })
	ctx := context.Background()
	for _, path := range []string{"background", "message"} {
		thread, waiting := "thread-c-"+path, "run-waiting-c-"+path
		if err := r.store.CreateRun(ctx, spWaitingRun(waiting, thread, engine.WaitUserInput)); err != nil {
			t.Fatal(err)
		}
		rej.run.Store(&waiting)
		req := engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("hi")}}
		var res engine.SubmitResult
		var err error
		if path == "background" {
			res, err = r.mb.SubmitBackground(ctx, req)
		} else {
			res, _, err = r.mb.SendMessages(ctx, req, "")
		}
		if err != nil {
			t.Fatalf("%s refused at commit: %v", path, err)
		}
		if rej.run.Load() != nil {
			t.Fatalf("%s: the commit was not refused: the race was not reproduced", path)
		}
		if res.RunID == "" || res.RunID == waiting || res.Status != engine.SubmitQueued {
			t.Fatalf("%s refused at commit: %+v, want a queued run of its own", path, res)
		}
		if run := execRun(t, r.store, waiting); run.DispatchID != "" {
			t.Fatalf("%s: the waiting run was given to dispatch %s", path, run.DispatchID)
		}
	}
}
