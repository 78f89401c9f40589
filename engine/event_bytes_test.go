package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
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
	size := 0
	for _, e := range evs {
		size += len(e.Data)
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
