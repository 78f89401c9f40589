package engine_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Go counterparts of the seed's submit tests (engine.md §4, §5, §7, §12).
// The seed-to-Go map is seedmap_execution.md.

func TestSeed_submit_background_enqueues_dispatch(t *testing.T) {
	// No agent connected: the dispatch stays queued for inspection.
	r := newRig(t, newFake(0, complete), engine.Config{})
	r.start(t)
	ctx := context.Background()
	before := time.Now().UnixMilli()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-1", AgentID: "agent-1", Messages: []engine.Message{userMsg("hello")}})
	if err != nil {
		t.Fatal(err)
	}
	if res.ThreadID != "thread-1" || res.DispatchID == "" || res.RunID == "" || res.DispatchID == res.RunID || res.Status != engine.SubmitQueued {
		t.Fatalf("submit result %+v", res)
	}
	ds, err := r.store.ListDispatches(ctx, "thread-1", nil, 100, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 1 {
		t.Fatalf("want 1 dispatch, got %+v", ds)
	}
	d := ds[0]
	if d.DispatchID != res.DispatchID || d.RunID != res.RunID || d.Status != engine.StatusQueued || d.AttemptCount != 0 ||
		d.MaxAttempts != engine.DefaultMaxAttempts || d.Priority != engine.DefaultPriority || d.AvailableAt < before || d.AvailableAt > time.Now().UnixMilli() {
		t.Fatalf("dispatch %+v", d)
	}
	run := execRun(t, r.store, res.RunID)
	if run.Status != engine.RunCreated || run.AgentID != "agent-1" || run.DispatchID != res.DispatchID || run.ThreadID != "thread-1" {
		t.Fatalf("precreated run %+v", run)
	}
	msgs, _ := r.store.LoadMessages(ctx, "thread-1")
	if len(msgs) != 1 || execText(msgs[0].Message) != "hello" {
		t.Fatalf("thread log %v", msgs)
	}
}

func TestSeed_submit_background_returns_correct_status(t *testing.T) {
	release, releaseAll := execRelease(t)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-release:
		case <-ctx.Done():
			return execCancelled()
		}
		return complete(ctx, req, sink)
	}
	// Two slots: a Queued second submit is due to the busy thread, not
	// to missing capacity.
	r := newRig(t, newFake(2, script), engine.Config{})
	ctx := context.Background()
	// Submitted before Start, so no dispatcher pass races the submit's own
	// claim (a claim by the dispatcher would make the submit report queued).
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-status", AgentID: "agent-1", Messages: []engine.Message{userMsg("a")}})
	if err != nil {
		t.Fatal(err)
	}
	r.start(t)
	if first.Status != engine.SubmitRunning {
		t.Fatalf("first submit on an idle thread with a free slot: %s, want running", first.Status)
	}
	if st := dispatchStatus(t, r.store, first.DispatchID); st != engine.StatusClaimed {
		t.Fatalf("running submit's dispatch is %s", st)
	}
	second, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-status", AgentID: "agent-1", Messages: []engine.Message{userMsg("b")}})
	if err != nil {
		t.Fatal(err)
	}
	if second.Status != engine.SubmitQueued {
		t.Fatalf("second submit while the first runs: %s, want queued", second.Status)
	}
	if st := dispatchStatus(t, r.store, second.DispatchID); st != engine.StatusQueued {
		t.Fatalf("queued submit's dispatch is %s", st)
	}
	releaseAll()
	eventually(t, "both acked", func() bool {
		return dispatchStatus(t, r.store, first.DispatchID) == engine.StatusAcked && dispatchStatus(t, r.store, second.DispatchID) == engine.StatusAcked
	})
	runs := r.exec.execRuns()
	if len(runs) != 2 || runs[0].DispatchID != first.DispatchID || runs[1].DispatchID != second.DispatchID {
		t.Fatalf("executor ran %d attempts, want the first then the second", len(runs))
	}
	if _, _, overlap := r.exec.stats(); overlap {
		t.Fatal("two runs of one thread overlapped")
	}
}

func TestSeed_concurrent_submit_background_same_thread_only_one_runs(t *testing.T) {
	release, releaseAll := execRelease(t)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-release:
		case <-ctx.Done():
			return execCancelled()
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(4, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	const n = 5
	results := make([]engine.SubmitResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			results[i], errs[i] = r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-conc", AgentID: "agent-1", Messages: []engine.Message{userMsg("msg-" + string(rune('0'+i)))}})
		})
	}
	wg.Wait()
	running := 0
	var runningID string
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("submit %d: %v", i, errs[i])
		}
		if results[i].Status == engine.SubmitRunning {
			running++
			runningID = results[i].DispatchID
		}
	}
	if running > 1 {
		t.Fatalf("%d submits report running, want at most 1", running)
	}
	eventually(t, "one attempt executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
	claimed := execClaimed(t, r.store, "thread-conc")
	if len(claimed) != 1 {
		t.Fatalf("want exactly 1 claimed dispatch while the first runs, got %d", len(claimed))
	}
	if running == 1 && claimed[0].DispatchID != runningID {
		t.Fatalf("the submit that reported running (%s) is not the claimed one (%s)", runningID, claimed[0].DispatchID)
	}
	if runs, _, _ := r.exec.stats(); runs != 1 || r.mb.InFlight() != 1 {
		t.Fatalf("executor runs %d, in flight %d: a second run of the thread started", runs, r.mb.InFlight())
	}
	releaseAll()
	eventually(t, "all acked", func() bool {
		c, _ := r.store.CountByStatus(ctx)
		return c.Get(engine.StatusAcked) == n
	})
	runs, maxActive, overlap := r.exec.stats()
	if runs != n || maxActive != 1 || overlap {
		t.Fatalf("runs %d (want %d), max concurrent %d (want 1), overlap %v", runs, n, maxActive, overlap)
	}
}

func TestSeed_concurrent_submit_same_thread_only_one_claims(t *testing.T) {
	release, releaseAll := execRelease(t)
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select {
		case <-release:
		case <-ctx.Done():
			return execCancelled()
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(4, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	const n = 3
	results := make([]engine.SubmitResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			results[i], _, errs[i] = r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-stream-conc", AgentID: "agent-1", Messages: []engine.Message{userMsg("msg")}})
		})
	}
	wg.Wait()
	ok := 0
	for i := range n {
		switch {
		case errs[i] == nil:
			ok++
		case !execIsConflict(errs[i]):
			t.Fatalf("submit %d: unexpected error %v", i, errs[i])
		}
	}
	if ok < 1 {
		t.Fatal("no foreground submit succeeded")
	}
	if c := execClaimed(t, r.store, "thread-stream-conc"); len(c) > 1 {
		t.Fatalf("at most 1 claimed, got %d", len(c))
	}
	releaseAll()
	eventually(t, "thread settled", func() bool {
		ds, _ := r.store.ListDispatches(ctx, "thread-stream-conc", engine.StatusFilter{engine.StatusQueued, engine.StatusClaimed}, 0, 0)
		return len(ds) == 0 && r.mb.InFlight() == 0
	})
	if _, _, overlap := r.exec.stats(); overlap {
		t.Fatal("two runs of one thread overlapped")
	}
}

func TestSeed_submit_returns_event_channel(t *testing.T) {
	t.Run("running", func(t *testing.T) {
		r := newRig(t, newFake(1, complete), engine.Config{})
		r.start(t)
		res, events, err := r.mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "thread-stream", AgentID: "agent-1", Messages: []engine.Message{userMsg("hi")}})
		if err != nil {
			t.Fatal(err)
		}
		if res.ThreadID != "thread-stream" || res.DispatchID == "" || res.RunID == "" || res.Status != engine.SubmitRunning || events == nil {
			t.Fatalf("submit result %+v events %v", res, events)
		}
		if r.mb.Reattach("thread-stream") != events {
			t.Fatal("re-attach does not return the submit's event log")
		}
		evs := execReadAll(t, events)
		if got := execTypes(evs); len(got) != 2 || got[0] != "text_delta" || got[1] != "run_finish" {
			t.Fatalf("events %v", got)
		}
		var fin struct {
			RunID string `json:"run_id"`
		}
		if err := json.Unmarshal(evs[1].Data, &fin); err != nil || fin.RunID != res.RunID {
			t.Fatalf("run_finish %s (want run_id %s)", evs[1].Data, res.RunID)
		}
		eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	})
	// Without a free agent slot the submit is queued at the head of its
	// thread; its event log follows the run once a slot frees.
	t.Run("queued without a slot", func(t *testing.T) {
		r := newRig(t, newFake(0, complete), engine.Config{})
		r.start(t)
		res, events, err := r.mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "thread-stream", Messages: []engine.Message{userMsg("hi")}})
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != engine.SubmitQueued || events == nil {
			t.Fatalf("submit without capacity: %+v events %v", res, events)
		}
		if st := dispatchStatus(t, r.store, res.DispatchID); st != engine.StatusQueued {
			t.Fatalf("dispatch is %s without capacity", st)
		}
		r.exec.setCapacity(1)
		if got := execTypes(execReadAll(t, events)); len(got) != 2 || got[1] != "run_finish" {
			t.Fatalf("events of the queued foreground run %v", got)
		}
		eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	})
}

func TestSeed_submit_inline_claim_fails_when_thread_already_claimed(t *testing.T) {
	// Claimed by a run executing here: the replacement cancels it, waits
	// for its claim to go, then claims; never two claims at once.
	t.Run("claimed here", func(t *testing.T) {
		script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			if execText(req.Messages[0]) == "first" {
				<-ctx.Done()
				return execCancelled()
			}
			return complete(ctx, req, sink)
		}
		r := newRig(t, newFake(2, script), engine.Config{})
		r.start(t)
		ctx := context.Background()
		first, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-clash", AgentID: "agent-1", Messages: []engine.Message{userMsg("first")}})
		if err != nil {
			t.Fatalf("first submit: %v", err)
		}
		eventually(t, "first run executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
		second, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-clash", AgentID: "agent-1", Messages: []engine.Message{userMsg("second")}})
		if err != nil {
			t.Fatalf("second submit: %v", err)
		}
		if second.DispatchID == "" || second.DispatchID == first.DispatchID {
			t.Fatalf("second result %+v", second)
		}
		if c := execClaimed(t, r.store, "thread-clash"); len(c) > 1 || (len(c) == 1 && c[0].DispatchID != second.DispatchID) {
			t.Fatalf("claimed after the replacement: %+v", c)
		}
		if st := dispatchStatus(t, r.store, first.DispatchID); !st.Terminal() {
			t.Fatalf("replaced dispatch is %s, want terminal", st)
		}
		eventually(t, "replacement acked", func() bool { return dispatchStatus(t, r.store, second.DispatchID) == engine.StatusAcked })
		if _, _, overlap := r.exec.stats(); overlap {
			t.Fatal("the replacement started before the replaced run returned")
		}
	})
	// Claimed by another process and no LiveRouter to reach it: nothing
	// can release it before its lease lapses, so the submit is refused
	// and writes nothing.
	t.Run("claimed elsewhere", func(t *testing.T) {
		r := newRig(t, newFake(2, complete), engine.Config{CancelWait: 100 * time.Millisecond})
		ctx := context.Background()
		active := execEnqueuePrepared(t, r, "thread-clash", "active", time.Now().UnixMilli(), nil)
		if d, err := r.store.ClaimDispatch(ctx, active.DispatchID, "other-process", 30*time.Second, time.Now().UnixMilli()); err != nil || d == nil {
			t.Fatalf("foreign claim: %v %v", d, err)
		}
		_, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-clash", AgentID: "agent-1", Messages: []engine.Message{userMsg("second")}})
		if !execIsConflict(err) || events != nil {
			t.Fatalf("submit over a foreign claim: err %v events %v, want the active-run conflict", err, events)
		}
		all, _ := r.store.ListDispatches(ctx, "thread-clash", nil, 0, 0)
		if len(all) != 1 || all[0].DispatchID != active.DispatchID || all[0].Status != engine.StatusClaimed || all[0].ClaimedBy != "other-process" {
			t.Fatalf("dispatches after the refused submit %+v", all)
		}
		if msgs, _ := r.store.LoadMessages(ctx, "thread-clash"); len(msgs) != 1 {
			t.Fatalf("refused submit wrote messages: %v", msgs)
		}
		if page, _ := r.store.ListRuns(ctx, engine.RunQuery{ThreadID: "thread-clash"}); page.Total != 1 {
			t.Fatalf("refused submit wrote a run: %+v", page.Items)
		}
		if runs, _, _ := r.exec.stats(); runs != 0 || r.mb.InFlight() != 0 {
			t.Fatalf("executor runs %d, in flight %d", runs, r.mb.InFlight())
		}
	})
}

func TestSeed_submit_inline_claim_empty_cancels_precreated_run(t *testing.T) {
	r, fs := newExecRig(t, newFake(1, complete), engine.Config{}, func(s *execFaultStore) { s.claimDispatchEmpty.Store(1) })
	r.start(t)
	ctx := context.Background()
	// Here the seed answers the active-run conflict; the submit was taken
	// (its message is in the log, its run and dispatch are made), so it
	// is answered as taken and superseded before it started: status
	// cancelled, a stream that ends with run_finish cancelled (README,
	// "Decisions that differ from the seed").
	lost, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-inline-empty", AgentID: "agent", Messages: []engine.Message{userMsg("go")}})
	if err != nil || lost.Status != engine.SubmitCancelled || events == nil {
		t.Fatalf("submit whose inline claim came back empty: %+v %v (events %v), want it answered cancelled", lost, err, events)
	}
	if last := waitClosed(t, events); last != "run_finish" {
		t.Fatalf("its stream ended with %q, want run_finish", last)
	}
	if fs.claimDispatchEmpty.Load() != 0 {
		t.Fatal("the inline claim was never attempted")
	}
	ds, err := r.store.ListDispatches(ctx, "thread-inline-empty", nil, 10, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 1 || ds[0].Status != engine.StatusCancelled {
		t.Fatalf("dispatches after the lost inline claim %+v, want 1 cancelled", ds)
	}
	run := execRun(t, r.store, ds[0].RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled || run.DispatchID != ds[0].DispatchID {
		t.Fatalf("precreated run %+v, want done/cancelled with the dispatch id", run)
	}
	if runs, _, _ := r.exec.stats(); runs != 0 || r.mb.InFlight() != 0 {
		t.Fatalf("executor runs %d, in flight %d after the lost claim", runs, r.mb.InFlight())
	}
	for _, want := range []string{
		`mailbox_operations_total{operation="claim_dispatch",result="empty"} 1`,
		`mailbox_operations_total{operation="cancel",result="ok"} 1`,
	} {
		if out := execMetrics(r.mb); !strings.Contains(out, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// The slot and the thread are free again.
	res, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-inline-empty", Messages: []engine.Message{userMsg("again")}})
	if err != nil || res.Status != engine.SubmitRunning || events == nil {
		t.Fatalf("next submit: %+v %v", res, err)
	}
	eventually(t, "next submit acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
}

func TestSeed_foreground_submit_marks_prior_queued_run_cancelled(t *testing.T) {
	// Not started: nothing but the foreground submit claims.
	r := newRig(t, newFake(1, complete), engine.Config{})
	ctx := context.Background()
	old := execEnqueuePrepared(t, r, "thread-submit-supersede", "old", time.Now().UnixMilli(), nil)
	res, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-submit-supersede", AgentID: "agent", Messages: []engine.Message{userMsg("new")}})
	if err != nil || res.Status != engine.SubmitRunning {
		t.Fatalf("foreground submit: %+v %v", res, err)
	}
	d := execLoad(t, r.store, old.DispatchID)
	if d.Status != engine.StatusSuperseded {
		t.Fatalf("old dispatch is %s, want superseded", d.Status)
	}
	oldRun := execRun(t, r.store, old.RunID)
	if oldRun.Status != engine.RunDone || oldRun.TerminationReason == nil || oldRun.TerminationReason.Type != engine.TermCancelled || oldRun.DispatchID != old.DispatchID {
		t.Fatalf("old run %+v, want done/cancelled with its dispatch id", oldRun)
	}
	if !strings.Contains(execMetrics(r.mb), `mailbox_operations_total{operation="supersede",result="ok"} 1`) {
		t.Error("the superseded dispatch is not counted (engine.md items 20.4, 65)")
	}
	execReadAll(t, events)
	eventually(t, "new run acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	runs := r.exec.execRuns()
	if len(runs) != 1 || runs[0].RunID != res.RunID || execText(runs[0].Messages[0]) != "new" {
		t.Fatalf("executor ran %d attempts; the superseded run must never run", len(runs))
	}
}

func TestSeed_foreground_submit_does_not_prepare_replacement_when_local_cancel_times_out(t *testing.T) {
	release, releaseAll := execRelease(t)
	started := make(chan struct{}, 1)
	// An agent that ignores cancellation.
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		started <- struct{}{}
		<-release
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(2, script), engine.Config{CancelWait: 100 * time.Millisecond})
	r.start(t)
	ctx := context.Background()
	const thread = "thread-local-cancel-timeout"
	active, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("active")}})
	if err != nil {
		t.Fatalf("active submit: %+v %v", active, err)
	}
	<-started
	t0 := time.Now()
	_, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("replacement")}})
	if !execIsConflict(err) || events != nil {
		t.Fatalf("submit while the active run ignores cancel: %v, want the active-run conflict", err)
	}
	if waited := time.Since(t0); waited < 100*time.Millisecond {
		t.Fatalf("conflict after %s, before CancelWait", waited)
	}
	msgs, _ := r.store.LoadMessages(ctx, thread)
	if len(msgs) != 1 || execText(msgs[0].Message) != "active" {
		t.Fatalf("thread log after the refused submit %v", msgs)
	}
	all, _ := r.store.ListDispatches(ctx, thread, nil, 10, 0)
	if len(all) != 1 || all[0].DispatchID != active.DispatchID || all[0].Status != engine.StatusClaimed {
		t.Fatalf("dispatches after the refused submit %+v", all)
	}
	if page, _ := r.store.ListRuns(ctx, engine.RunQuery{ThreadID: thread}); page.Total != 1 || page.Items[0].RunID != active.RunID {
		t.Fatalf("runs after the refused submit %+v", page.Items)
	}
	if runs, _, _ := r.exec.stats(); runs != 1 || r.mb.InFlight() != 1 {
		t.Fatalf("executor runs %d, in flight %d", runs, r.mb.InFlight())
	}
	releaseAll()
	eventually(t, "active dispatch settled", func() bool { return dispatchStatus(t, r.store, active.DispatchID).Terminal() && r.mb.InFlight() == 0 })
}

func TestSeed_foreground_submit_waits_for_local_cancelled_dispatch_to_release_claim(t *testing.T) {
	// The active run stops on cancel, but its claim stays in the store
	// (settling it fails): a released local slot is not enough, the
	// submit is refused and writes nothing.
	t.Run("claim kept", func(t *testing.T) {
		started := make(chan struct{}, 1)
		stopped := make(chan struct{})
		script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			started <- struct{}{}
			<-ctx.Done()
			close(stopped)
			return execCancelled()
		}
		r, fs := newExecRig(t, newFake(2, script), engine.Config{CancelWait: 300 * time.Millisecond}, nil)
		r.start(t)
		ctx := context.Background()
		const thread = "thread-local-cancel-claim-window"
		active, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("active")}})
		if err != nil {
			t.Fatalf("active submit: %+v %v", active, err)
		}
		<-started
		fs.failSettle.Store(true)
		_, events, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("replacement")}})
		if !execIsConflict(err) || events != nil {
			t.Fatalf("submit while the claim stays: %v, want the active-run conflict", err)
		}
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			t.Fatal("the active run was never cancelled")
		}
		eventually(t, "the local attempt finished", func() bool { return r.mb.InFlight() == 0 })
		msgs, _ := r.store.LoadMessages(ctx, thread)
		if len(msgs) != 1 || execText(msgs[0].Message) != "active" {
			t.Fatalf("thread log after the refused submit %v", msgs)
		}
		all, _ := r.store.ListDispatches(ctx, thread, nil, 10, 0)
		if len(all) != 1 || all[0].DispatchID != active.DispatchID || all[0].Status != engine.StatusClaimed {
			t.Fatalf("dispatches after the refused submit %+v", all)
		}
		if page, _ := r.store.ListRuns(ctx, engine.RunQuery{ThreadID: thread}); page.Total != 1 {
			t.Fatalf("refused submit wrote a run: %+v", page.Items)
		}
		fs.failSettle.Store(false)
	})
	// The active run stops on cancel after a while and its claim goes: the
	// submit waits for that, then runs the replacement.
	t.Run("claim released", func(t *testing.T) {
		var mu sync.Mutex
		var oldReturned, newStarted time.Time
		script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			if execText(req.Messages[0]) == "active" {
				<-ctx.Done()
				time.Sleep(50 * time.Millisecond) // the agent winds down
				mu.Lock()
				oldReturned = time.Now()
				mu.Unlock()
				return execCancelled()
			}
			mu.Lock()
			newStarted = time.Now()
			mu.Unlock()
			return complete(ctx, req, sink)
		}
		r := newRig(t, newFake(2, script), engine.Config{CancelWait: 2 * time.Second})
		r.start(t)
		ctx := context.Background()
		const thread = "thread-local-cancel-release"
		active, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("active")}})
		if err != nil {
			t.Fatalf("active submit: %+v %v", active, err)
		}
		eventually(t, "active executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
		res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("replacement")}})
		if err != nil || res.Status != engine.SubmitRunning {
			t.Fatalf("replacement submit: %+v %v", res, err)
		}
		if st := dispatchStatus(t, r.store, active.DispatchID); st == engine.StatusClaimed || st == engine.StatusQueued {
			t.Fatalf("replacement claimed while the old dispatch is %s", st)
		}
		eventually(t, "replacement acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
		mu.Lock()
		defer mu.Unlock()
		if oldReturned.IsZero() || newStarted.Before(oldReturned) {
			t.Fatalf("replacement started %v, old run returned %v", newStarted, oldReturned)
		}
	})
}

func TestSeed_cancel_queued_dispatch_works(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{})
	ctx := context.Background()
	res := execEnqueuePrepared(t, r, "thread-cancel", "hello", time.Now().UnixMilli(), nil)
	ok, err := r.mb.Cancel(ctx, res.DispatchID)
	if err != nil || !ok {
		t.Fatalf("cancel queued dispatch: %v %v", ok, err)
	}
	if st := dispatchStatus(t, r.store, res.DispatchID); st != engine.StatusCancelled {
		t.Fatalf("dispatch is %s, want cancelled", st)
	}
	run := execRun(t, r.store, res.RunID)
	if run.Status != engine.RunDone || run.TerminationReason == nil || run.TerminationReason.Type != engine.TermCancelled || run.DispatchID != res.DispatchID {
		t.Fatalf("cancelled run %+v", run)
	}
	if !strings.Contains(execMetrics(r.mb), `mailbox_operations_total{operation="cancel",result="ok"} 1`) {
		t.Error("cancel not counted")
	}
	// Nothing left to cancel: a second cancel and an unknown id report false.
	for _, id := range []string{res.DispatchID, "no-such-id"} {
		if ok, err := r.mb.Cancel(ctx, id); ok || err != nil {
			t.Errorf("cancel %s: %v %v, want false", id, ok, err)
		}
	}
}

func TestSeed_list_dispatches_returns_entries(t *testing.T) {
	r := newRig(t, newFake(0, complete), engine.Config{})
	ctx := context.Background()
	want := map[string]bool{}
	for i := range 3 {
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-list", AgentID: "agent-" + string(rune('0'+i)), Messages: []engine.Message{userMsg("msg")}})
		if err != nil {
			t.Fatal(err)
		}
		want[res.DispatchID] = true
	}
	ds, err := r.store.ListDispatches(ctx, "thread-list", nil, 100, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 3 {
		t.Fatalf("want 3 dispatches, got %d", len(ds))
	}
	for _, d := range ds {
		if !want[d.DispatchID] || d.Status != engine.StatusQueued {
			t.Fatalf("unexpected dispatch %+v", d)
		}
	}
}

func TestSeed_worker_status_not_corrupted_after_empty_claim(t *testing.T) {
	// A thread that is executing is not claimed again by another trigger.
	t.Run("busy thread", func(t *testing.T) {
		release, releaseAll := execRelease(t)
		script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
			select {
			case <-release:
			case <-ctx.Done():
				return execCancelled()
			}
			return complete(ctx, req, sink)
		}
		r := newRig(t, newFake(2, script), engine.Config{})
		r.start(t)
		ctx := context.Background()
		first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-guard", Messages: []engine.Message{userMsg("a")}})
		if err != nil {
			t.Fatalf("first: %+v %v", first, err)
		}
		eventually(t, "first executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
		second, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-guard", Messages: []engine.Message{userMsg("b")}})
		if err != nil || second.Status != engine.SubmitQueued {
			t.Fatalf("second: %+v %v", second, err)
		}
		r.mb.Sweep(ctx) // another trigger for the dispatcher
		eventually(t, "first executing", func() bool { runs, _, _ := r.exec.stats(); return runs == 1 })
		if runs, _, _ := r.exec.stats(); runs != 1 || r.mb.InFlight() != 1 || len(execClaimed(t, r.store, "thread-guard")) != 1 {
			t.Fatalf("a busy thread was claimed again: runs %d, in flight %d", runs, r.mb.InFlight())
		}
		releaseAll()
		eventually(t, "both acked", func() bool { return dispatchStatus(t, r.store, second.DispatchID) == engine.StatusAcked })
		if _, _, overlap := r.exec.stats(); overlap {
			t.Fatal("runs of one thread overlapped")
		}
	})
	// An empty or failed claim leaves the thread claimable: the work runs
	// without a further submit.
	for _, tc := range []struct {
		name  string
		fault func(*execFaultStore)
		left  func(*execFaultStore) int32
	}{
		{"empty claim", func(s *execFaultStore) { s.claimEmpty.Store(1) }, func(s *execFaultStore) int32 { return s.claimEmpty.Load() }},
		{"claim error", func(s *execFaultStore) { s.claimErr.Store(1) }, func(s *execFaultStore) int32 { return s.claimErr.Load() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, fs := newExecRig(t, newFake(1, complete), engine.Config{}, tc.fault)
			r.start(t)
			res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "thread-guard", Messages: []engine.Message{userMsg("a")}})
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "acked after the "+tc.name, func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
			if tc.left(fs) != 0 {
				t.Fatalf("the %s was never hit", tc.name)
			}
			d := execLoad(t, r.store, res.DispatchID)
			if runs, _, _ := r.exec.stats(); runs != 1 || d.AttemptCount != 0 {
				t.Fatalf("runs %d, attempts %d", runs, d.AttemptCount)
			}
			eventually(t, "slot released", func() bool { return r.mb.InFlight() == 0 })
		})
	}
}

func TestSeed_send_decision_unknown_id_returns_false(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	ctx := context.Background()
	dec := engine.Decision{CallID: "tc-1", Resume: json.RawMessage(`{"decision_id":"d1","action":"resume","result":{"approved":true}}`)}
	ok, err := r.mb.SendDecision(ctx, "nonexistent", dec)
	if ok || err != nil {
		t.Fatalf("decision for an unknown id: %v %v, want false", ok, err)
	}
	// A run that finished is not running anywhere either.
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t-dec", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "acked", func() bool {
		return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked && r.mb.InFlight() == 0
	})
	for _, id := range []string{res.RunID, res.DispatchID, "t-dec"} {
		if ok, err := r.mb.SendDecision(ctx, id, dec); ok || err != nil {
			t.Errorf("decision for finished %s: %v %v, want false", id, ok, err)
		}
	}
}

func TestSeed_background_task_completion_should_enqueue_internal_wake_message(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.ContinueRunID == "" {
			// The first run spawns a background task and waits for it.
			return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunWaiting,
				Termination: &engine.Termination{Type: engine.TermSuspended},
				Waiting:     &engine.RunWaitingState{Reason: engine.WaitBackgroundTasks, TicketIDs: []string{"task-1"}}}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-bg", AgentID: "agent", Messages: []engine.Message{userMsg("start")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "run waits on background tasks", func() bool {
		run, _ := r.store.LoadRun(ctx, first.RunID)
		return run != nil && run.IsBackgroundTaskWaiting() && dispatchStatus(t, r.store, first.DispatchID) == engine.StatusAcked
	})
	// The task finished: the agent SUBMITs an internal wake for the run.
	text := "<background-task-event kind=\"completed\" task_id=\"task-1\">\n{\"done\":true}\n</background-task-event>"
	content, _ := json.Marshal(text)
	wake, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{
		ThreadID: "thread-bg", ContinueRunID: first.RunID, Origin: "internal", RunMode: engine.ModeInternalWake, Adapter: engine.AdapterInternal,
		Messages: []engine.Message{{Role: engine.RoleUser, Content: content, Visibility: "internal"}},
	})
	if err != nil {
		t.Fatalf("wake submit: %v", err)
	}
	if wake.RunID != first.RunID || wake.DispatchID == first.DispatchID {
		t.Fatalf("wake %+v does not continue run %s", wake, first.RunID)
	}
	eventually(t, "wake acked", func() bool { return dispatchStatus(t, r.store, wake.DispatchID) == engine.StatusAcked })
	ds, _ := r.store.ListDispatches(ctx, "thread-bg", nil, 10, 0)
	if len(ds) != 2 {
		t.Fatalf("want the first dispatch and the wake, got %d", len(ds))
	}
	msgs, _ := r.store.LoadMessages(ctx, "thread-bg")
	found := false
	for _, m := range msgs {
		if m.Message.Role == engine.RoleUser && m.Message.Visibility == "internal" && strings.Contains(execText(m.Message), "<background-task-event") && strings.Contains(execText(m.Message), `"done":true`) {
			found = true
		}
	}
	if !found || len(msgs) != 2 {
		t.Fatalf("thread log lacks the internal wake message: %v", msgs)
	}
	runs := r.exec.execRuns()
	if len(runs) != 2 {
		t.Fatalf("executor ran %d attempts, want 2", len(runs))
	}
	w := runs[1]
	if w.RunID != first.RunID || w.ContinueRunID != first.RunID || w.RunMode != engine.ModeInternalWake || w.Origin != engine.OriginInternal ||
		len(w.Messages) != 1 || w.Messages[0].Visibility != "internal" || !strings.Contains(execText(w.Messages[0]), "<background-task-event") {
		t.Fatalf("wake attempt %+v", w)
	}
	run := execRun(t, r.store, first.RunID)
	if run.Status != engine.RunDone || run.Waiting != nil {
		t.Fatalf("woken run %+v, want done", run)
	}
	if page, _ := r.store.ListRuns(ctx, engine.RunQuery{ThreadID: "thread-bg"}); page.Total != 1 {
		t.Fatalf("the wake created a new run: %+v", page.Items)
	}
}
