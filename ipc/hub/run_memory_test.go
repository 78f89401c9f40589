package hub_test

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"weak"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// A running run does not hold its request's messages and context once
// its RUN is written: they can be collected while the agent still runs
// it (a review's 200 running runs of threads with 3.6 MB of history held
// 745 MiB).
func TestARunningRunDoesNotHoldItsContext(t *testing.T) {
	t.Parallel()
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{AgentIDs: []string{"default"}, MaxRuns: 1})
	eventually(t, "agent registered", func() bool { return r.hub.Capacity() == 1 })
	req, history, activation := requestWithHistory("t1")
	rc := startRun(r.hub, context.Background(), req)
	run := decodeRun(t, a.expect(ipc.TypeRun, 1))
	if len(run.Context.Messages) != 64 || len(run.Request.Messages) != 1 {
		t.Fatalf("RUN carried %d context messages, %d messages", len(run.Context.Messages), len(run.Request.Messages))
	}
	// The run goes on at the agent; the history is garbage already.
	for range 3 {
		runtime.GC()
	}
	if history.Value() != nil || activation.Value() != nil {
		t.Fatalf("a running run holds its context (%v) or its messages (%v)", history.Value() != nil, activation.Value() != nil)
	}
	a.send(ipc.TypeFinish, 1, finishDone("ok"))
	if o := rc.wait(t); o.Kind != engine.OutcomeCompleted {
		t.Fatalf("outcome %+v", o)
	}
}

// requestWithHistory is request(thread) with 64 context messages of 16
// KiB, and weak pointers to the context's and the messages' arrays.
func requestWithHistory(thread string) (*engine.RunRequest, weak.Pointer[engine.MessageRecord], weak.Pointer[engine.Message]) {
	req := request(thread)
	recs := make([]engine.MessageRecord, 64)
	for i := range recs {
		recs[i] = engine.MessageRecord{ThreadID: thread, Seq: uint64(i + 1), MessageID: fmt.Sprint("m", i),
			Message: engine.Message{Role: "user", Content: json.RawMessage(`"` + strings.Repeat("x", 16<<10) + `"`)}}
	}
	req.Context = engine.ThreadContext{Messages: recs, FirstSeq: 1, TotalMessages: 64}
	return req, weak.Make(&recs[0]), weak.Make(&req.Messages[0])
}
