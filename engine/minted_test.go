package engine_test

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// mintedSpy records the Minted marks of the writes that carry them, on
// the real store.
type mintedSpy struct {
	*badgerstore.Store
	mu   sync.Mutex
	seen map[string][]mintedWrite // by thread
}

type mintedWrite struct {
	op     string
	msgIDs []string
	runID  string
	minted engine.Minted
}

func (s *mintedSpy) record(op string, c engine.Checkpoint) {
	w := mintedWrite{op: op, minted: c.Minted}
	for _, m := range c.Messages {
		w.msgIDs = append(w.msgIDs, m.ID)
	}
	if c.Run != nil {
		w.runID = c.Run.RunID
	}
	s.mu.Lock()
	s.seen[c.ThreadID] = append(s.seen[c.ThreadID], w)
	s.mu.Unlock()
}

func (s *mintedSpy) writes(thread string) []mintedWrite {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]mintedWrite(nil), s.seen[thread]...)
}

func (s *mintedSpy) Submit(ctx context.Context, c engine.Checkpoint, d engine.Dispatch) ([]engine.MessageRecord, engine.Dispatch, error) {
	s.record("submit", c)
	return s.Store.Submit(ctx, c, d)
}

func (s *mintedSpy) SubmitIdle(ctx context.Context, c engine.Checkpoint, d engine.Dispatch, consumerID string, lease time.Duration, instanceID string, now int64) ([]engine.MessageRecord, *engine.Dispatch, error) {
	s.record("submit_idle", c)
	return s.Store.SubmitIdle(ctx, c, d, consumerID, lease, instanceID, now)
}

func (s *mintedSpy) Checkpoint(ctx context.Context, c engine.Checkpoint) ([]engine.MessageRecord, error) {
	s.record("checkpoint", c)
	return s.Store.Checkpoint(ctx, c)
}

// The engine marks an id minted (engine.Minted: the store skips its
// duplicate check) exactly when it made the id for the write: never an
// id a caller or an agent supplied.
func TestMintedMarksOnlyIDsTheEngineMade(t *testing.T) {
	spy := &mintedSpy{seen: map[string][]mintedWrite{}}
	agentMsg := func(id string) engine.Message {
		return engine.Message{ID: id, Role: engine.RoleAssistant, Content: json.RawMessage(`"a"`)}
	}
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		for _, m := range []engine.Message{agentMsg(""), agentMsg("agent-" + req.RunID)} {
			if err := req.Checkpoint(ctx, engine.RunCheckpoint{Messages: []engine.Message{m}}); err != nil {
				t.Error(err)
			}
		}
		return complete(ctx, req, sink)
	}
	r := newRigWith(t, newFake(2, script), engine.Config{}, func(s *badgerstore.Store) engine.Store {
		spy.Store = s
		return spy
	})
	r.start(t)
	ctx := context.Background()
	minted, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "minted", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	hinted := userMsg("y")
	hinted.ID = "client-msg"
	supplied, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "supplied", RunIDHint: "client-run", DispatchIDHint: "client-dispatch",
		Messages: []engine.Message{hinted}})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{minted.DispatchID, supplied.DispatchID} {
		eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, id) == engine.StatusAcked })
	}
	// On an idle thread: the one-commit fast path, or (when the slot of
	// a finished run is not back yet) the slow path, which mints the
	// same ids.
	fg, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "foreground", Messages: []engine.Message{userMsg("z")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, fg.DispatchID) == engine.StatusAcked })
	for _, id := range []string{minted.DispatchID, minted.RunID, fg.DispatchID, fg.RunID} {
		if u, err := uuid.Parse(id); err != nil || u.Version() != 7 {
			t.Fatalf("id %q: want a UUIDv7 the engine made (%v)", id, err)
		}
	}

	all := engine.Minted{MessageIDs: true, RunID: true, DispatchID: true}
	agentOnly := []mintedWrite{
		{op: "checkpoint", minted: engine.Minted{MessageIDs: true}},
		{op: "checkpoint", minted: engine.Minted{}},
	}
	for _, tc := range []struct {
		thread string
		want   []mintedWrite // op and minted of each write, in order
	}{
		{"minted", append([]mintedWrite{{op: "submit", minted: all}}, agentOnly...)},
		{"supplied", append([]mintedWrite{{op: "submit", minted: engine.Minted{}}}, agentOnly...)},
		{"foreground", append([]mintedWrite{{op: "submit_idle|submit", minted: all}}, agentOnly...)},
	} {
		got := spy.writes(tc.thread)
		// Other checkpoints (a run-only one: no messages) carry no marks
		// and are not what this test is about.
		var withMsgs []mintedWrite
		for _, w := range got {
			if len(w.msgIDs) > 0 {
				withMsgs = append(withMsgs, w)
			}
		}
		if len(withMsgs) != len(tc.want) {
			t.Fatalf("thread %s: writes %+v, want %d with messages", tc.thread, got, len(tc.want))
		}
		for i, w := range withMsgs {
			if !slices.Contains(strings.Split(tc.want[i].op, "|"), w.op) || w.minted != tc.want[i].minted {
				t.Fatalf("thread %s, write %d: %s %+v (messages %v, run %s), want %s %+v", tc.thread, i, w.op, w.minted, w.msgIDs, w.runID, tc.want[i].op, tc.want[i].minted)
			}
		}
	}
}
