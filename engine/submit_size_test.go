package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// messages is n user messages of content bytes each (ids minted by the
// engine).
func messages(n, content int) []engine.Message {
	text, _ := json.Marshal(strings.Repeat("x", content))
	msgs := make([]engine.Message, n)
	for i := range msgs {
		msgs[i] = engine.Message{Role: engine.RoleUser, Content: text}
	}
	return msgs
}

// largest is the largest n in [1, hi) for which ok holds, ok being
// monotone (true up to some n, false after).
func largest(hi int, ok func(n int) bool) int {
	lo := 0 // ok(lo) holds (0: vacuously)
	for lo+1 < hi {
		mid := (lo + hi) / 2
		if ok(mid) {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo
}

// The store's size check never passes a submit its commit refuses, and
// is not far below what fits: for messages without content (the count
// of entries bounds them) and of 3 KB (their bytes do).
func TestCheckSubmitSizeNeverPassesWhatDoesNotFit(t *testing.T) {
	t.Parallel()
	// On disk, as the sidecar runs it (the in-memory store refuses any
	// value above 64 KiB: the run record of some 900 messages).
	r := newRigOn(t, newFake(0, complete), engine.Config{}, badgerstore.Options{Dir: t.TempDir(), NoSync: true}, nil)
	ctx := context.Background()
	for _, shape := range []struct {
		name        string
		content, hi int
	}{{"empty", 0, 40000}, {"3KB", 3000, 4000}} {
		t.Run(shape.name, func(t *testing.T) {
			trial := 0
			fits := largest(shape.hi, func(n int) bool {
				trial++
				_, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprintf("%s-%d", shape.name, trial), Messages: messages(n, shape.content)})
				if err != nil && !errors.Is(err, engine.ErrTooLarge) {
					t.Fatalf("submit of %d: %v", n, err)
				}
				return err == nil
			})
			passes := largest(shape.hi, func(n int) bool {
				return r.store.CheckSubmitSize("t", messages(n, shape.content), 1024) == nil
			})
			t.Logf("%s: %d messages fit one commit; the check passes %d", shape.name, fits, passes)
			if fits == 0 || fits >= shape.hi-1 {
				t.Fatalf("no boundary found below %d (fits %d)", shape.hi, fits)
			}
			if passes > fits || passes < fits/2 {
				t.Fatalf("the check passes %d messages; %d fit: want at most that, and not below half", passes, fits)
			}
		})
	}
}

// A foreground submit too large for one commit, sent to a busy thread,
// is refused before its interrupt: the running run goes on and the
// queued work stays queued. It had been superseded and cancelled, and
// nothing took their place (found by review).
func TestAForegroundSubmitTooLargeLeavesTheBusyThreadAsItWas(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	block := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-ctx.Done():
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "cancelled"}
		case <-release:
			return complete(ctx, req, sink)
		}
	}
	r := newRigOn(t, newFake(1, block), engine.Config{}, badgerstore.Options{Dir: t.TempDir(), NoSync: true}, nil)
	t.Cleanup(func() { close(release) }) // before the rig's stop: the last run ends
	r.start(t)
	ctx := context.Background()
	running, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "busy", Messages: []engine.Message{userMsg("running")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first run executing", func() bool { return dispatchStatus(t, r.store, running.DispatchID) == engine.StatusClaimed })
	queued, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "busy", Messages: []engine.Message{userMsg("queued")}})
	if err != nil {
		t.Fatal(err)
	}
	for _, msgs := range [][]engine.Message{messages(20000, 0), messages(1000, 3000)} {
		_, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "busy", Messages: msgs})
		if !errors.Is(err, engine.ErrTooLarge) {
			t.Fatalf("a foreground submit of %d messages: %v; want ErrTooLarge", len(msgs), err)
		}
	}
	if st := dispatchStatus(t, r.store, running.DispatchID); st != engine.StatusClaimed {
		t.Fatalf("the running run's dispatch is %s; want it still claimed", st)
	}
	if st := dispatchStatus(t, r.store, queued.DispatchID); st != engine.StatusQueued {
		t.Fatalf("the queued dispatch is %s; want it still queued", st)
	}
	if runs, _, _ := r.exec.stats(); runs != 1 {
		t.Fatalf("%d runs started; want the first alone", runs)
	}
	// A submit that fits interrupts as before.
	if _, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "busy", Messages: messages(2000, 0)}); err != nil {
		t.Fatalf("a foreground submit of 2000 messages: %v", err)
	}
	if st := dispatchStatus(t, r.store, queued.DispatchID); st != engine.StatusSuperseded {
		t.Fatalf("after the interrupt the queued dispatch is %s; want superseded", st)
	}
}
