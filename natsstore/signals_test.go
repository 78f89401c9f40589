package natsstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// pullOne pulls until one signal arrives (bounded).
func pullOne(t *testing.T, s *natsstore.Store) engine.DispatchSignal {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		sigs, err := s.PullDispatchSignals(context.Background(), 1, 200*time.Millisecond)
		if err != nil {
			t.Fatalf("pull: %v", err)
		}
		if len(sigs) == 1 {
			return sigs[0]
		}
	}
	t.Fatal("no signal within 10s")
	return engine.DispatchSignal{}
}

// pullNone checks that no signal is pending for a while.
func pullNone(t *testing.T, s *natsstore.Store, wait time.Duration) {
	t.Helper()
	sigs, err := s.PullDispatchSignals(context.Background(), 10, wait)
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	if len(sigs) > 0 {
		t.Fatalf("unexpected signals: %+v", sigs)
	}
}

// Every transition into queued signals once, after its commit; the
// receipt acks, nacks (at once, or after a delay) and counts deliveries;
// signals are shared between stores (one consumer: one receiver each).
func TestSignalsOnEveryTransitionIntoQueued(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	now := time.Now().UnixMilli()

	if _, err := a.Enqueue(ctx, queued("d1", "t1", now)); err != nil {
		t.Fatal(err)
	}
	sig := pullOne(t, b) // the other store receives it
	if sig.ThreadID != "t1" || sig.DispatchID != "d1" {
		t.Fatalf("signal %+v", sig)
	}
	if n, ok := sig.Receipt.Deliveries(); !ok || n != 1 {
		t.Fatalf("deliveries %d %v", n, ok)
	}
	// Nack at once: redelivered, count 2.
	if err := sig.Receipt.Nack(0); err != nil {
		t.Fatal(err)
	}
	sig = pullOne(t, a)
	if n, _ := sig.Receipt.Deliveries(); n != 2 || sig.DispatchID != "d1" {
		t.Fatalf("redelivery %+v (n=%d)", sig, n)
	}
	// Delayed nack: not before the delay.
	start := time.Now()
	if err := sig.Receipt.Nack(400 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	sig = pullOne(t, b)
	if waited := time.Since(start); waited < 400*time.Millisecond {
		t.Fatalf("delayed nack redelivered after %v", waited)
	}
	if err := sig.Receipt.Ack(); err != nil {
		t.Fatal(err)
	}
	pullNone(t, a, 100*time.Millisecond)

	// Claim (no signal), nack back to queued (signal), claim, release
	// (signal), claim, dead letter after the last attempt, requeue
	// (signal for the new dispatch), claim and let the lease lapse,
	// reclaim (signal).
	claim := func() *engine.Dispatch {
		t.Helper()
		d, err := a.Claim(ctx, "t1", "c", time.Minute, time.Now().UnixMilli())
		if err != nil || d == nil {
			t.Fatalf("claim: %v %v", d, err)
		}
		return d
	}
	expect := func(id string) {
		t.Helper()
		sig := pullOne(t, b)
		if sig.DispatchID != id || sig.ThreadID != "t1" {
			t.Fatalf("signal %+v, want %s", sig, id)
		}
		if err := sig.Receipt.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	d := claim()
	pullNone(t, b, 50*time.Millisecond)
	if _, err := a.Nack(ctx, d.DispatchID, d.ClaimToken, time.Now().UnixMilli(), "boom", time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	expect("d1")
	d = claim()
	if _, err := a.Release(ctx, d.DispatchID, d.ClaimToken, time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	expect("d1")
	d = claim()
	if err := a.DeadLetter(ctx, d.DispatchID, d.ClaimToken, "gone", time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	pullNone(t, b, 50*time.Millisecond)
	if _, err := a.Requeue(ctx, "d1", "d2", time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	expect("d2")
	at := time.Now().UnixMilli()
	d, err := a.Claim(ctx, "t1", "c", time.Millisecond, at)
	if err != nil || d == nil {
		t.Fatalf("claim: %v %v", d, err)
	}
	got, err := a.ReclaimExpired(ctx, at+10, 10)
	if err != nil || len(got) != 1 || got[0].Status != engine.StatusQueued {
		t.Fatalf("reclaim: %+v %v", got, err)
	}
	expect("d2")
}

// The sweeper signals a due, unclaimed queued dispatch again once it has
// not been signalled for SignalRepublishAfter — one per thread, the one a
// claim would take — and the sweepers of two stores add one signal per
// window between them. A thread holding a claim is left alone.
func TestSweeperRepublishesLostSignals(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	cfg.SignalRepublishAfter = time.Minute
	cfg.SignalSweepInterval = time.Hour // swept by hand below
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	now := time.Now().UnixMilli()
	for _, d := range []engine.Dispatch{queued("x1", "tx", now), queued("x2", "tx", now+1), queued("y1", "ty", now), queued("z1", "tz", now+3_600_000)} {
		if _, err := a.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	// Take the four signals away without acting on them (as if lost).
	for range 4 {
		if err := pullOne(t, b).Receipt.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	if n := a.SweepSignals(time.Now().UnixMilli()); n != 0 {
		t.Fatalf("swept %d dispatches signalled a moment ago", n)
	}
	later := time.Now().Add(2 * time.Minute).UnixMilli()
	eventually(t, "b's index holds the dispatches", func() bool {
		c, err := b.CountByStatus(ctx)
		return err == nil && c.Get(engine.StatusQueued) == 4
	})
	if n := a.SweepSignals(later); n != 2 {
		t.Fatalf("a swept %d, want 2 (x1 and y1)", n)
	}
	if n := b.SweepSignals(later); n != 2 {
		t.Fatalf("b swept %d, want 2", n)
	}
	got := map[string]int{}
	for range 2 {
		sig := pullOne(t, a)
		got[sig.DispatchID]++
		if err := sig.Receipt.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	pullNone(t, a, 100*time.Millisecond)
	if got["x1"] != 1 || got["y1"] != 1 {
		t.Fatalf("sweep signals %v, want x1 and y1 once each", got)
	}
	// A claimed thread is not swept.
	if d, err := a.Claim(ctx, "ty", "c", time.Minute, time.Now().UnixMilli()); err != nil || d == nil {
		t.Fatalf("claim: %v %v", d, err)
	}
	if _, err := a.Enqueue(ctx, queued("y2", "ty", now)); err != nil {
		t.Fatal(err)
	}
	if err := pullOne(t, a).Receipt.Ack(); err != nil {
		t.Fatal(err)
	}
	if n := a.SweepSignals(time.Now().Add(5 * time.Minute).UnixMilli()); n != 1 {
		t.Fatalf("swept %d, want 1 (x1 only)", n)
	}
}

// A signal whose payload does not decode is acked and skipped.
func TestMalformedSignalIsSkipped(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	s := openCfg(t, cfg)
	if _, err := s.Conn().Request(cfg.Prefix+"sig.hzz", []byte("{not json"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	pullNone(t, s, 200*time.Millisecond)
	if _, err := s.Enqueue(context.Background(), queued("ok", "t", time.Now().UnixMilli())); err != nil {
		t.Fatal(err)
	}
	if sig := pullOne(t, s); sig.DispatchID != "ok" {
		t.Fatalf("signal %+v", sig)
	}
}

// Live commands reach the store whose handler accepts the exact target;
// nobody accepting, nobody listening and malformed payloads are "not
// delivered" without an error.
func TestLiveRouting(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	cfg.LiveTimeout = 300 * time.Millisecond
	a, b, c := openCfg(t, cfg), openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	target := engine.LiveTarget{ThreadID: "th.1 *>", RunID: "r1", DispatchID: "d1"}
	cmd := engine.LiveCommand{Kind: engine.LiveDecision, Decisions: []engine.Decision{{CallID: "call", Resume: json.RawMessage(`{"action":"resume"}`)}}}

	// No subscriber at all: not delivered, at once.
	start := time.Now()
	if ok, err := a.DeliverLive(ctx, target, cmd); ok || err != nil {
		t.Fatalf("no subscriber: %v %v", ok, err)
	}
	if d := time.Since(start); d > 250*time.Millisecond {
		t.Fatalf("no-responders took %v", d)
	}

	var got atomic.Pointer[engine.LiveCommand]
	var bCalls, cCalls atomic.Int32
	if err := b.ServeLive(func(_ context.Context, tg engine.LiveTarget, cm engine.LiveCommand) bool {
		bCalls.Add(1)
		if tg != target {
			return false
		}
		got.Store(&cm)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if err := b.ServeLive(func(context.Context, engine.LiveTarget, engine.LiveCommand) bool { return true }); !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("second ServeLive: %v", err)
	}
	if err := c.ServeLive(func(context.Context, engine.LiveTarget, engine.LiveCommand) bool {
		cCalls.Add(1)
		return false
	}); err != nil {
		t.Fatal(err)
	}
	if ok, err := a.DeliverLive(ctx, target, cmd); !ok || err != nil {
		t.Fatalf("deliver: %v %v", ok, err)
	}
	if g := got.Load(); g == nil || g.Kind != engine.LiveDecision || len(g.Decisions) != 1 || g.Decisions[0].CallID != "call" || string(g.Decisions[0].Resume) != `{"action":"resume"}` {
		t.Fatalf("handler got %+v", g)
	}
	eventually(t, "both subscribers saw the command", func() bool { return bCalls.Load() == 1 && cCalls.Load() == 1 })

	// The same run without its dispatch is another target: refused.
	if ok, err := a.DeliverLive(ctx, engine.LiveTarget{ThreadID: target.ThreadID, RunID: "r1"}, engine.LiveCommand{Kind: engine.LiveCancel}); ok || err != nil {
		t.Fatalf("thread+run target: %v %v", ok, err)
	}
	msgs := engine.LiveCommand{Kind: engine.LiveMessages, Messages: []engine.MessageRecord{{MessageID: "m1", ThreadID: target.ThreadID, Seq: 3, Message: engine.Message{Role: engine.RoleUser, Content: json.RawMessage(`"hi"`)}}}}
	if ok, err := a.DeliverLive(ctx, target, msgs); !ok || err != nil {
		t.Fatalf("deliver messages: %v %v", ok, err)
	}
	if g := got.Load(); g.Kind != engine.LiveMessages || len(g.Messages) != 1 || g.Messages[0].Seq != 3 || string(g.Messages[0].Message.Content) != `"hi"` {
		t.Fatalf("handler got %+v", g)
	}

	// Malformed payloads (bad JSON, unknown version or kind) on the exact
	// subject get no reply.
	before := bCalls.Load()
	subj := cfg.Prefix + "live.h" + hexOf(target.ThreadID) + ".h" + hexOf("r1") + ".h" + hexOf("d1")
	for _, p := range []string{`{nope`, `{"v":2,"kind":"cancel"}`, `{"v":1,"kind":"explode"}`, `{"v":1,"kind":"messages"}`} {
		if _, err := a.Conn().Request(subj, []byte(p), 200*time.Millisecond); !errors.Is(err, nats.ErrTimeout) {
			t.Fatalf("payload %s: %v, want a timeout", p, err)
		}
	}
	if bCalls.Load() != before {
		t.Fatal("a malformed command reached the handler")
	}
}

func hexOf(s string) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(s))
	for i := 0; i < len(s); i++ {
		out = append(out, digits[s[i]>>4], digits[s[i]&15])
	}
	return string(out)
}

// Writable (the readiness probe) follows the connection: not writable
// while the server is gone, not writable once closed.
func TestWritableFollowsTheConnection(t *testing.T) {
	t.Parallel()
	own := natstest.Start(t)
	cfg := freshConfig()
	cfg.URL = own.URL()
	s := openCfg(t, cfg)
	if err := s.Writable(); err != nil {
		t.Fatalf("connected store: %v", err)
	}
	own.Shutdown()
	eventually(t, "not writable without a server", func() bool { return errors.Is(s.Writable(), engine.ErrUnavailable) })
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Writable(); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("closed store: %v", err)
	}
}

// A sidecar's name (its consumer id) is taken by one running store: a
// second store asking for it is refused with the first's answer, another
// name is free, and a closed store's name is free at once (found by
// review: a second sidecar with the same --consumer-id started silently,
// and the two would take each other's claims for their own).
func TestTakeNameRefusesANameInUse(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	if err := a.TakeName(ctx, "sc1", "pid 1 on host-a"); err != nil {
		t.Fatal(err)
	}
	err := b.TakeName(ctx, "sc1", "pid 2 on host-b")
	if !errors.Is(err, natsstore.ErrNameInUse) || !strings.Contains(err.Error(), "pid 1 on host-a") {
		t.Fatalf("a second store taking sc1: %v; want ErrNameInUse naming the first", err)
	}
	if err := b.TakeName(ctx, "sc2", "pid 2 on host-b"); err != nil {
		t.Fatalf("another name: %v", err)
	}
	a.Close()
	c := openCfg(t, cfg)
	if err := c.TakeName(ctx, "sc1", "pid 3 on host-c"); err != nil {
		t.Fatalf("the name of a closed store: %v", err)
	}
}

// A free name is known free at once, from the server's "no responders",
// while other sidecars serve live commands (found by review: their
// subscriptions to every live subject answered for the name's subject,
// and every start waited out the question's timeout). Not parallel: it
// sets the timeout.
func TestTakeNameOfAFreeNameDoesNotWaitForOtherSidecars(t *testing.T) {
	defer natsstore.SetNameQuestionTimeout(time.Hour)()
	cfg := freshConfig()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	if err := a.ServeLive(func(context.Context, engine.LiveTarget, engine.LiveCommand) bool { return false }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := b.TakeName(ctx, "free", "pid 2"); err != nil || ctx.Err() != nil {
		t.Fatalf("a free name beside a serving sidecar: %v (context %v); want taken before the context ended", err, ctx.Err())
	}
}
