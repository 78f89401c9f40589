package badgerstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// gatedExec completes every run, the one whose message is "first" only
// once gate is closed.
type gatedExec struct{ gate chan struct{} }

func (g *gatedExec) Capacity() int                    { return 2 }
func (g *gatedExec) CapacityChanged() <-chan struct{} { return nil }
func (g *gatedExec) Run(ctx context.Context, req *engine.RunRequest, _ engine.EventSink) engine.RunOutcome {
	var text string
	_ = json.Unmarshal(req.Messages[0].Content, &text)
	if text == "first" {
		select {
		case <-g.gate:
		case <-ctx.Done():
		}
	}
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
}

func userText(s string) engine.Message {
	b, _ := json.Marshal(s)
	return engine.Message{Role: engine.RoleUser, Content: b}
}

// A damaged record of a thread's next dispatch makes the claim half of
// CompleteAndClaim fail — with ErrCorrupt when the record is gone, with a
// stale claim when it is no longer queued though the queue index still
// lists it. Either way nothing is written, the error is marked
// ErrNextClaim, and the engine completes the finished attempt alone: its
// run is done and its dispatch acked (with the stale claim it used to take
// the error for Complete's own and leave the run running).
func TestCompletionSurvivesADamagedNextDispatch(t *testing.T) {
	for _, damage := range []string{"deleted", "not queued"} {
		t.Run(damage, func(t *testing.T) {
			g := &gatedExec{gate: make(chan struct{})}
			s, mb := openMailbox(t, Options{InMemory: true}, g)
			ctx := context.Background()
			first, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "T", Messages: []engine.Message{userText("first")}})
			if err != nil {
				t.Fatal(err)
			}
			startMailbox(t, mb)
			waitFor(t, "the first run to start", func() bool {
				r, _ := s.LoadRun(ctx, first.RunID)
				return r != nil && r.Status == engine.RunRunning
			})
			second, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "T", Messages: []engine.Message{userText("second")}})
			if err != nil {
				t.Fatal(err)
			}
			d2, err := s.LoadDispatch(ctx, second.DispatchID)
			if err != nil || d2 == nil {
				t.Fatal(d2, err)
			}
			if damage == "deleted" {
				err = s.RawDelete(dispatchKey(d2.DispatchID))
			} else {
				bad := d2.Clone()
				bad.Status, bad.CompletedAt = engine.StatusCancelled, bad.UpdatedAt
				b, _ := encode(&bad)
				err = s.RawSet(dispatchKey(d2.DispatchID), b)
			}
			if err != nil {
				t.Fatal(err)
			}
			close(g.gate)
			waitFor(t, "the finished run's dispatch acked", func() bool {
				d1, _ := s.LoadDispatch(ctx, first.DispatchID)
				return d1 != nil && d1.Status == engine.StatusAcked
			})
			if r, _ := s.LoadRun(ctx, first.RunID); r == nil || r.Status != engine.RunDone {
				t.Fatalf("first run %+v, want done", r)
			}
		})
	}
}

// The claim half's failure is marked, and nothing of the completion is
// written with it.
func TestCompleteAndClaimMarksAFailedClaimHalf(t *testing.T) {
	s, err := Open(Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	for _, id := range []string{"d1", "d2"} {
		d := engine.Dispatch{DispatchID: id, ThreadID: "T", RunID: "r-" + id, Status: engine.StatusQueued, MaxAttempts: 3, CreatedAt: 1, UpdatedAt: 1, AvailableAt: 1}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	d1, err := s.Claim(ctx, "T", "c1", time.Minute, 10)
	if err != nil || d1 == nil || d1.DispatchID != "d1" {
		t.Fatal(d1, err)
	}
	d2, _ := s.LoadDispatch(ctx, "d2")
	bad := d2.Clone()
	bad.Status, bad.CompletedAt = engine.StatusCancelled, 5
	b, _ := encode(&bad)
	if err := s.RawSet(dispatchKey("d2"), b); err != nil {
		t.Fatal(err)
	}
	res := engine.RunResult{RunID: d1.RunID, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	next, err := s.CompleteAndClaim(ctx, "d1", d1.ClaimToken, res, 20, "c1", time.Minute)
	if !errors.Is(err, engine.ErrNextClaim) || next != nil {
		t.Fatalf("CompleteAndClaim = %v, %v; want an error marked ErrNextClaim", next, err)
	}
	if got, _ := s.LoadDispatch(ctx, "d1"); got.Status != engine.StatusClaimed {
		t.Fatalf("d1 is %s after a failed CompleteAndClaim, want claimed (nothing written)", got.Status)
	}
}

// openMailbox opens a store with o and a mailbox over it on ex; the test's
// cleanup closes the store.
func openMailbox(t *testing.T, o Options, ex engine.Executor) (*Store, *engine.Mailbox) {
	t.Helper()
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	mb, err := engine.New(s, ex, engine.Config{ConsumerID: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	return s, mb
}

// startMailbox starts mb; the test's cleanup stops it (before the store
// closes).
func startMailbox(t *testing.T, mb *engine.Mailbox) {
	t.Helper()
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := mb.Stop(ctx); err != nil {
			t.Error(err)
		}
	})
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// oneSlotExec runs one run at a time, once opened, and finishes it at once.
type oneSlotExec struct {
	open    atomic.Bool
	changed chan struct{}
}

func (e *oneSlotExec) Capacity() int {
	if e.open.Load() {
		return 1
	}
	return 0
}
func (e *oneSlotExec) CapacityChanged() <-chan struct{} { return e.changed }
func (e *oneSlotExec) Run(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
}

// A dispatch record damaged on the disk stops its own thread only: with
// an agent of one slot, the threads submitted after it still run (the
// engine sets the damaged thread aside, engine/README.md "A thread that
// cannot be claimed"), and Verify names the record.
func TestADamagedDispatchRecordStopsOnlyItsThread(t *testing.T) {
	ex := &oneSlotExec{changed: make(chan struct{}, 1)} // closed while submitting: all stay queued
	s, mb := openMailbox(t, Options{Dir: t.TempDir()}, ex)
	ctx := context.Background()
	bad, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "bad", Messages: []engine.Message{userText("first in line")}})
	if err != nil {
		t.Fatal(err)
	}
	if r, _ := s.LoadRun(ctx, bad.RunID); r == nil || r.Status != engine.RunCreated {
		t.Fatalf("the first submit ran before its record was damaged: %+v", r)
	}
	if err := s.RawSet(dispatchKey(bad.DispatchID), []byte{binaryV1, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	var good []engine.SubmitResult
	for i := range 3 {
		res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("good%d", i), Messages: []engine.Message{userText("behind it")}})
		if err != nil {
			t.Fatal(err)
		}
		good = append(good, res)
	}
	startMailbox(t, mb)
	ex.open.Store(true)
	ex.changed <- struct{}{}
	for _, g := range good {
		waitFor(t, "the threads behind the damaged one to run", func() bool {
			r, _ := s.LoadRun(ctx, g.RunID)
			return r != nil && r.Status == engine.RunDone
		})
	}
	if _, err := s.LoadDispatch(ctx, bad.DispatchID); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("the damaged record reads %v; want ErrCorrupt", err)
	}
	rep, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(rep.Problems, func(p string) bool { return strings.Contains(p, bad.DispatchID) }) {
		t.Fatalf("Verify does not name the damaged dispatch: %v", rep.Problems)
	}
}
