package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Config.EventBufferBytes bounds what a run's log keeps: a client that
// re-attaches from the start is served the newest events with a reset.
func TestARunsEventsAreBoundedInBytes(t *testing.T) {
	emitted, release := make(chan struct{}), make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		for i := range 20 {
			sink.Emit(fmt.Appendf(nil, `{"type":"text_delta","n":%d,"pad":"%0300d"}`, i, 0))
		}
		close(emitted)
		<-release
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{EventBufferBytes: 2000})
	r.start(t)
	defer close(release)
	if _, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("go")}}); err != nil {
		t.Fatal(err)
	}
	<-emitted
	l := r.mb.Reattach("t1")
	if l == nil {
		t.Fatal("no log to re-attach to")
	}
	evs, reset, _, _ := l.Read(0, 100, nil)
	var size int64
	for _, e := range evs {
		size += e.Size()
	}
	if !reset || len(evs) == 0 || len(evs) >= 20 || size > 2000 || evs[len(evs)-1].Seq != l.LastSeq() {
		t.Fatalf("re-attached from the start: reset=%v, %d events of %d bytes; want the newest within 2000 bytes, with a reset", reset, len(evs), size)
	}
}

// The finished runs of every thread keep at most EventRetentionBytes of
// events for re-attachment: past it the runs that finished first are
// forgotten before EventRetention (found by review: twenty runs that
// finished within a minute held 700 MB).
func TestFinishedRunsKeepAtMostTheRetentionBytes(t *testing.T) {
	big, _ := json.Marshal(map[string]string{"type": "text_delta", "delta": strings.Repeat("x", 20<<10)})
	emit := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		sink.Emit(big)
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
	}
	r := newRig(t, newFake(1, emit), engine.Config{EventRetentionBytes: 100 << 10, EventRetention: time.Hour})
	r.start(t)
	ctx := context.Background()
	const threads = 12
	for i := range threads {
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprint("t", i), Messages: []engine.Message{userMsg("x")}})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "the run's end", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
		eventually(t, "its log closed", func() bool {
			l := r.mb.Reattach(fmt.Sprint("t", i))
			if l == nil {
				return false
			}
			_, closed := l.ClosedAt()
			return closed
		})
	}
	kept := 0
	for i := range threads {
		if r.mb.Reattach(fmt.Sprint("t", i)) != nil {
			kept++
		}
	}
	if r.mb.Reattach("t0") != nil || r.mb.Reattach(fmt.Sprint("t", threads-1)) == nil {
		t.Fatalf("the first run's events kept, or the last one's forgotten (%d of %d kept)", kept, threads)
	}
	if kept > 5 { // 100 KiB of 20 KiB runs
		t.Fatalf("%d finished runs' events of 20 KiB kept under a budget of 100 KiB", kept)
	}
}

// Config.EventBufferTotalBytes bounds what the open logs of all running
// runs keep together: each run's own bound times the agents' slots was no
// bound (found by review: a 1 024-slot agent could make the sidecar hold
// 32 GiB). Past it a growing log keeps LiveBudgetFloor; a log closes out
// of the budget.
func TestRunningRunsEventsAreBoundedTogether(t *testing.T) {
	const runs, perRun, total = 6, 4 << 20, 2 << 20
	ev, _ := json.Marshal(map[string]string{"type": "text_delta", "delta": strings.Repeat("y", 16<<10)})
	emitted, release := make(chan struct{}, runs), make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		for range 128 { // 2 MiB each, under its own bound
			sink.Emit(ev)
		}
		emitted <- struct{}{}
		<-release
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(runs, script), engine.Config{EventBufferBytes: perRun, EventBufferTotalBytes: total})
	r.start(t)
	var once sync.Once
	releaseAll := func() { once.Do(func() { close(release) }) }
	defer releaseAll() // a failure below must not leave the runs waiting
	ctx := context.Background()
	var ids []string
	for i := range runs {
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprint("t", i), Messages: []engine.Message{userMsg("go")}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.DispatchID)
	}
	for range runs {
		<-emitted
	}
	// Without the budget they would hold runs × 2 MiB = 12 MiB.
	bound := int64(total) + runs*(engine.LiveBudgetFloor+engine.Event{Type: "text_delta", Data: ev}.Size())
	if used := r.mb.LiveEventBytes(); used > bound || used < total/2 {
		t.Fatalf("the open logs hold %d bytes; want at most %d (the budget, and a floor and one event a log)", used, bound)
	}
	var sum int64
	for i := range runs {
		l := r.mb.Reattach(fmt.Sprint("t", i))
		if l == nil {
			t.Fatalf("no log of t%d", i)
		}
		evs, _, _, _ := l.Read(0, 1000, nil)
		if len(evs) == 0 || evs[len(evs)-1].Seq != l.LastSeq() {
			t.Fatalf("t%d: %d events; want the newest kept", i, len(evs))
		}
		for _, e := range evs {
			sum += e.Size()
		}
	}
	if sum != r.mb.LiveEventBytes() {
		t.Fatalf("the logs hold %d bytes, the budget counts %d", sum, r.mb.LiveEventBytes())
	}
	var b strings.Builder
	r.mb.Metrics().WritePrometheus(&b)
	if want := fmt.Sprintf("mailbox_event_buffer_bytes %d\n", sum); !strings.Contains(b.String(), want) {
		t.Fatalf("metrics lack %q", want)
	}
	releaseAll()
	for _, id := range ids {
		eventually(t, "the run's end", func() bool { return dispatchStatus(t, r.store, id) == engine.StatusAcked })
	}
	eventually(t, "the closed logs out of the budget", func() bool { return r.mb.LiveEventBytes() == 0 })
}

// mailbox_suspended_runs counts the attempts waiting on a tool call's
// decision (found by review: they showed as active runs only, as if
// stuck), and drops when the call is resumed.
func TestSuspendedRunsAreAGauge(t *testing.T) {
	suspended, resume, done := make(chan struct{}), make(chan struct{}), make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		sink.Emit([]byte(`{"type":"tool_call_done","call_id":"c1","outcome":"suspended"}`))
		close(suspended)
		<-resume
		sink.Emit([]byte(`{"type":"tool_call_resumed","call_id":"c1"}`))
		<-done
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	var resumed, finished sync.Once
	defer func() {
		resumed.Do(func() { close(resume) })
		finished.Do(func() { close(done) })
	}()
	if _, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "ts", Messages: []engine.Message{userMsg("x")}}); err != nil {
		t.Fatal(err)
	}
	<-suspended
	gauge := func() string {
		var b strings.Builder
		r.mb.Metrics().WritePrometheus(&b)
		return metricValue(b.String(), "mailbox_suspended_runs")
	}
	if g := gauge(); g != "1" {
		t.Fatalf("mailbox_suspended_runs %q while a call waits; want 1", g)
	}
	resumed.Do(func() { close(resume) })
	eventually(t, "the gauge back to 0", func() bool { return gauge() == "0" })
}

// metricValue is the value of the unlabelled metric name in a scrape.
func metricValue(scrape, name string) string {
	for _, l := range strings.Split(scrape, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return v
		}
	}
	return ""
}
