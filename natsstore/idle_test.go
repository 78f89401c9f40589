package natsstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// lastSeq returns the last sequence of the store's stream.
func lastSeq(t *testing.T, s *natsstore.Store, stream string) uint64 {
	t.Helper()
	js, err := s.Conn().JetStream()
	if err != nil {
		t.Fatal(err)
	}
	info, err := js.StreamInfo(stream)
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

// batchesIn counts the writes that stored the messages (from, to] of the
// stream: one per atomic batch (told apart by Nats-Batch-Id), one per
// message written alone.
func batchesIn(t *testing.T, s *natsstore.Store, stream string, from, to uint64) int {
	t.Helper()
	js, err := s.Conn().JetStream()
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	n := 0
	for seq := from + 1; seq <= to; seq++ {
		m, err := js.GetMsg(stream, seq)
		if err != nil {
			t.Fatalf("get %d: %v", seq, err)
		}
		id := m.Header.Get("Nats-Batch-Id")
		if id == "" {
			n++
			continue
		}
		if !ids[id] {
			ids[id] = true
			n++
		}
	}
	return n
}

// Mirrors badgerstore's TestSubmitIdle.
func TestSubmitIdle(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	s := openCfg(t, cfg)
	ctx := context.Background()
	cp := func(thread, msg string, count uint64) engine.Checkpoint {
		// The run of dispatch "f"+n is "run-f"+n (queued).
		run := &engine.RunRecord{RunID: "run-f" + msg[1:], ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
		return engine.Checkpoint{ThreadID: thread, ExpectedCount: count, CreatedAt: 1000, Run: run,
			Messages: []engine.Message{{ID: msg, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
	}
	before := lastSeq(t, s, cfg.Stream)
	recs, d, err := s.SubmitIdle(ctx, cp("t1", "m1", 0), queued("f1", "t1", 1000), "me", 30*time.Second, "inst", 1000)
	if err != nil || d == nil {
		t.Fatalf("idle thread: %v %v", d, err)
	}
	after := lastSeq(t, s, cfg.Stream)
	if after <= before {
		t.Fatalf("nothing written (%d → %d)", before, after)
	}
	if n := batchesIn(t, s, cfg.Stream, before, after); n != 1 {
		t.Fatalf("%d writes, want one atomic batch", n)
	}
	if d.Status != engine.StatusClaimed || d.ClaimedBy != "me" || d.Epoch != 1 || d.LeaseUntil != 31_000 || d.InstanceID != "inst" || d.RunStatus != engine.RunRunning || len(recs) != 1 || recs[0].Seq != 1 {
		t.Fatalf("claimed %+v, records %v", d, recs)
	}
	if got, err := s.LoadDispatch(ctx, "f1"); err != nil || got == nil || got.Status != engine.StatusClaimed || got.ClaimToken != d.ClaimToken || got.InstanceID != "inst" {
		t.Fatalf("stored dispatch %+v %v, want the claimed one", got, err)
	}
	if run, err := s.LoadRun(ctx, d.RunID); err != nil || run == nil || run.Status != engine.RunRunning || run.SessionID != "inst" {
		t.Fatalf("run after SubmitIdle: %+v %v, want running with the instance id", run, err)
	}
	if ep, _ := s.CurrentEpoch(ctx, "t1"); ep != 1 {
		t.Fatalf("epoch %d, want 1 (the interrupt)", ep)
	}
	// The claim is real: the thread cannot be claimed again, and the
	// claimed dispatch completes under its token.
	if d2, err := s.Claim(ctx, "t1", "other", time.Minute, 2000); err != nil || d2 != nil {
		t.Fatalf("claim of a thread SubmitIdle claimed: %v %v", d2, err)
	}
	// Claimed work on the thread: declined, nothing written.
	before = lastSeq(t, s, cfg.Stream)
	if _, d2, err := s.SubmitIdle(ctx, cp("t1", "m2", 1), queued("f2", "t1", 1000), "me", 30*time.Second, "inst", 1000); err != nil || d2 != nil {
		t.Fatalf("thread with a claim: %v %v, want declined", d2, err)
	}
	if got := lastSeq(t, s, cfg.Stream); got != before {
		t.Fatalf("declined submit on a claimed thread wrote %d messages", got-before)
	}
	// Queued work on the thread: declined, nothing written.
	if _, err := s.Enqueue(ctx, queued("q3", "t3", 1000)); err != nil {
		t.Fatal(err)
	}
	if _, d3, err := s.SubmitIdle(ctx, cp("t3", "m3", 0), queued("f3", "t3", 1000), "me", 30*time.Second, "inst", 1000); err != nil || d3 != nil {
		t.Fatalf("thread with queued work: %v %v, want declined", d3, err)
	}
	// Delayed queued work counts too.
	if _, err := s.Enqueue(ctx, queued("q5", "t5", 1<<40)); err != nil {
		t.Fatal(err)
	}
	mid2 := lastSeq(t, s, cfg.Stream)
	if _, d5, err := s.SubmitIdle(ctx, cp("t5", "m5", 0), queued("f5", "t5", 1000), "me", 30*time.Second, "inst", 1000); err != nil || d5 != nil {
		t.Fatalf("thread with delayed queued work: %v %v, want declined", d5, err)
	}
	if got := lastSeq(t, s, cfg.Stream); got != mid2 {
		t.Fatalf("declined submits wrote: last seq %d, want %d", got, mid2)
	}
	for _, id := range []string{"f2", "f3", "f5"} {
		if got, _ := s.LoadDispatch(ctx, id); got != nil {
			t.Fatalf("declined submit stored %s", id)
		}
	}
	for thread, want := range map[string]uint64{"t1": 1, "t3": 0, "t5": 0} {
		if n, _ := s.MessageCount(ctx, thread); n != want {
			t.Fatalf("%s has %d messages, want %d", thread, n, want)
		}
		if ep, _ := s.CurrentEpoch(ctx, thread); ep != want {
			t.Fatalf("%s epoch %d, want %d", thread, ep, want)
		}
	}
	// A thread whose queued work was cancelled is idle again.
	if c, err := s.Cancel(ctx, "q3", 2000); err != nil || c == nil {
		t.Fatalf("cancel q3: %v %v", c, err)
	}
	if _, d3, err := s.SubmitIdle(ctx, cp("t3", "m3", 0), queued("f3", "t3", 1000), "me", 30*time.Second, "inst", 1000); err != nil || d3 == nil || d3.Epoch != 1 {
		t.Fatalf("thread whose queue was cancelled: %+v %v, want claimed at epoch 1", d3, err)
	}
	// A stale expected count fails like Submit: nothing written.
	before = lastSeq(t, s, cfg.Stream)
	if _, _, err := s.SubmitIdle(ctx, cp("t4", "m4", 5), queued("f4", "t4", 1000), "me", 30*time.Second, "inst", 1000); !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("stale count: %v, want a version conflict", err)
	}
	if got := lastSeq(t, s, cfg.Stream); got != before {
		t.Fatalf("failed submit wrote %d messages", got-before)
	}
	if ep, _ := s.CurrentEpoch(ctx, "t4"); ep != 0 {
		t.Fatalf("t4 epoch %d after a failed submit, want 0", ep)
	}
}

// SubmitIdle through one store races an Enqueue through another (whose
// write reaches the first store's index only eventually): either the
// enqueue came first and SubmitIdle declined, or SubmitIdle came first and
// the enqueued dispatch carries the new epoch. Never a queued dispatch of
// the old epoch next to the fast path's claim.
func TestSubmitIdleRacesEnqueueOnAnotherStore(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	won, declined := 0, 0
	for i := range 40 {
		thread := fmt.Sprintf("r%d", i)
		c := engine.Checkpoint{ThreadID: thread, CreatedAt: 1000,
			Run:      &engine.RunRecord{RunID: "run-f" + thread, ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1},
			Messages: []engine.Message{{ID: "m" + thread, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
		var wg sync.WaitGroup
		var got *engine.Dispatch
		var errA, errB error
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, got, errA = a.SubmitIdle(ctx, c, queued("f"+thread, thread, 1000), "me", time.Minute, "inst", 1000)
		}()
		go func() {
			defer wg.Done()
			_, errB = b.Enqueue(ctx, queued("q"+thread, thread, 1000))
		}()
		wg.Wait()
		if errA != nil || errB != nil {
			t.Fatalf("round %d: submit idle %v, enqueue %v", i, errA, errB)
		}
		q, err := a.LoadDispatch(ctx, "q"+thread)
		if err != nil || q == nil {
			t.Fatalf("round %d: enqueued dispatch %v %v", i, q, err)
		}
		if got == nil {
			declined++
			if q.Epoch != 0 || q.Status != engine.StatusQueued {
				t.Fatalf("round %d: declined, but the queued dispatch is %+v", i, q)
			}
			continue
		}
		won++
		if q.Epoch != 1 {
			t.Fatalf("round %d: SubmitIdle claimed %s while %s of epoch %d was queued", i, got.DispatchID, q.DispatchID, q.Epoch)
		}
	}
	t.Logf("SubmitIdle won %d rounds, declined %d", won, declined)
	// Enqueue through b, then at once SubmitIdle through a, whose index
	// may not have b's write yet: it must decline all the same.
	for i := range 100 {
		thread := fmt.Sprintf("s%d", i)
		c := engine.Checkpoint{ThreadID: thread, CreatedAt: 1000,
			Run:      &engine.RunRecord{RunID: "run-f" + thread, ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1},
			Messages: []engine.Message{{ID: "m" + thread, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
		if _, err := b.Enqueue(ctx, queued("q"+thread, thread, 1000)); err != nil {
			t.Fatal(err)
		}
		if _, got, err := a.SubmitIdle(ctx, c, queued("f"+thread, thread, 1000), "me", time.Minute, "inst", 1000); err != nil || got != nil {
			t.Fatalf("round %d: SubmitIdle right after another store's enqueue: %+v %v, want declined", i, got, err)
		}
	}
}

// A foreground Submit on an idle thread of a natsstore-backed mailbox
// takes the one-batch fast path.
func TestForegroundSubmitFastPathOnNATS(t *testing.T) {
	t.Parallel()
	w := newWorld()
	sc := startSidecar(t, w, freshConfig(), "sc1", 2)
	ctx := context.Background()
	res, events, err := sc.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "idle", Messages: []engine.Message{userMsg("hi")}})
	if err != nil || res.Status != engine.SubmitRunning || events == nil {
		t.Fatalf("fast path submit: %+v %v", res, err)
	}
	d := waitStatus(t, sc, res.DispatchID, engine.StatusAcked)
	if n := metricCount(sc.mb, "submit_idle", "ok"); n != 1 {
		t.Fatalf("submit_idle ok = %d, want 1", n)
	}
	for _, op := range []string{"interrupt", "record_dispatch_start"} {
		if n := metricCount(sc.mb, op, "ok"); n != 0 {
			t.Fatalf("%s ok = %d on the fast path, want 0", op, n)
		}
	}
	run, _ := sc.store.LoadRun(ctx, res.RunID)
	if run == nil || run.Status != engine.RunDone || run.SessionID == "" || run.SessionID != d.InstanceID {
		t.Fatalf("fast-path run %+v / dispatch %+v: want done, one instance id", run, d)
	}
	if ep, _ := sc.store.CurrentEpoch(ctx, "idle"); ep != 1 {
		t.Fatalf("epoch %d after a foreground submit, want 1", ep)
	}
	w.checkNoOverlap(t)
}

func metricCount(mb *engine.Mailbox, op, result string) int {
	var b strings.Builder
	mb.Metrics().WritePrometheus(&b)
	prefix := fmt.Sprintf(`mailbox_operations_total{operation=%q,result=%q} `, op, result)
	for _, line := range strings.Split(b.String(), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			var n int
			_, _ = fmt.Sscan(v, &n)
			return n
		}
	}
	return 0
}
