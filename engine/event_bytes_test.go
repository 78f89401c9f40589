package engine_test

import (
	"context"
	"fmt"
	"testing"

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
