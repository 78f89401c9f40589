package agent

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// liveMessage is a MESSAGES command with one user message.
func liveMessage(cmd, id, text string) map[string]any {
	return map[string]any{"cmd": cmd, "messages": []MessageRecord{{MessageID: id, ThreadID: "t-r1", Seq: 7, Message: TextMessage(RoleUser, text)}}}
}

// A run closes its live input before its last step: what it accepted
// before is handed back to it, and a command after is refused, so the
// sidecar queues a message for a run of its own (ipc.md: accepted only if
// the run will hand it to its model; found by review: a message accepted
// while the run wrote its final answer was answered by no run).
// CloseDecisions does the same for decisions.
func TestClosingLiveInputRefusesWhatComesAfter(t *testing.T) {
	t.Parallel()
	message := func(cmd, text string) (ipc.FrameType, any) {
		return ipc.TypeMessages, liveMessage(cmd, "id-"+cmd, text)
	}
	decision := func(cmd, callID string) (ipc.FrameType, any) {
		return ipc.TypeDecision, map[string]any{"cmd": cmd, "decisions": []Decision{{CallID: callID, Resume: []byte(`{}`)}}}
	}
	for _, tc := range []struct {
		name   string
		open   func(*Run)
		close  func(*Run) []string // what was handed back, as texts or call ids
		send   func(cmd, v string) (ipc.FrameType, any)
		reason string
	}{
		{"messages", func(r *Run) { r.Messages() }, func(r *Run) []string {
			var out []string
			for _, m := range r.CloseMessages() {
				out = append(out, mustText(m.Message))
			}
			return out
		}, message, "run takes no more live messages (its last step began)"},
		{"decisions", func(r *Run) { r.Decisions() }, func(r *Run) []string {
			var out []string
			for _, d := range r.CloseDecisions() {
				out = append(out, d.CallID)
			}
			return out
		}, decision, "run takes no more decisions (its last step began)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ready, closed, release := make(chan struct{}), make(chan []string, 1), make(chan struct{})
			h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
				tc.open(run)
				ready <- struct{}{}
				<-ready // the test sent a command, accepted
				closed <- tc.close(run)
				<-release
				return Done("")
			})})
			fc := h.fc
			fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
			recv(t, ready)
			typ, v := tc.send("c1", "before")
			fc.sendJSON(typ, 1, v)
			fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"c1","accepted":true}`)
			ready <- struct{}{}
			if got := recv(t, closed); len(got) != 1 || got[0] != "before" {
				t.Fatalf("closing handed back %q, want what was accepted before", got)
			}
			typ, v = tc.send("c2", "after")
			fc.sendJSON(typ, 1, v)
			fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"c2","accepted":false,"reason":"`+tc.reason+`"}`)
			close(release)
			fc.expect(ipc.TypeFinish, 1)
		})
	}
}

// DecisionsFor takes decisions for the calls the run suspended on, and
// refuses one for another call (found by review: the echo agent accepted
// a decision for a call it never made, and dropped it).
func TestDecisionsForRefusesOtherCalls(t *testing.T) {
	t.Parallel()
	ready := make(chan struct{})
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		decs := run.DecisionsFor("call-1")
		ready <- struct{}{}
		d := <-decs
		if err := run.Emit(map[string]any{"type": "tool_call_resumed", "call_id": d[0].CallID}); err != nil {
			return Transient("emit", err.Error())
		}
		return Done("")
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	recv(t, ready)
	fc.send(ipc.TypeDecision, 1, `{"cmd":"d1","decisions":[{"call_id":"call-999","resume":{"approved":true}}]}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"d1","accepted":false,"reason":"no suspended call for the decision"}`)
	fc.send(ipc.TypeDecision, 1, `{"cmd":"d2","decisions":[{"call_id":"call-1","resume":{"approved":true}},{"call_id":"call-2","resume":{}}]}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"d2","accepted":false,"reason":"no suspended call for the decision"}`)
	fc.send(ipc.TypeDecision, 1, `{"cmd":"d3","decisions":[{"call_id":"call-1","resume":{"approved":true}}]}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"d3","accepted":true}`)
	fc.expectEqualJSON(ipc.TypeEvent, 1, `{"type":"tool_call_resumed","call_id":"call-1"}`)
	fc.expect(ipc.TypeFinish, 1)
}

// A checkpoint with a context already done is not sent (found by review:
// it was sent and applied while Checkpoint returned an error, and the
// handler's retry logged its messages twice).
func TestCheckpointWithADoneContextIsNotSent(t *testing.T) {
	t.Parallel()
	errs := make(chan error, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		<-ctx.Done()
		errs <- run.Checkpoint(ctx, Checkpoint{Messages: []Message{TextMessage(RoleAssistant, "partial")}})
		return Cancelled()
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	fc.send(ipc.TypeCancel, 1, `{"cmd":"c1"}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"c1","accepted":true}`)
	if err := recv(t, errs); !errors.Is(err, ErrCancelled) || !strings.Contains(err.Error(), "not sent") {
		t.Fatalf("Checkpoint = %v, want not sent, ErrCancelled", err)
	}
	fc.expectEqualJSON(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"cancelled"}}`) // no CHECKPOINT before it
}

// A checkpoint in flight when the sidecar cancels the run gets the
// sidecar's answer, not the cancellation: its result says whether it was
// applied (found by review: it returned "cancelled" for a checkpoint the
// sidecar had applied).
func TestCheckpointInFlightAtACancelGetsItsAnswer(t *testing.T) {
	t.Parallel()
	errs := make(chan error, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		errs <- run.Checkpoint(ctx, Checkpoint{Messages: []Message{TextMessage(RoleAssistant, "partial")}})
		return Cancelled()
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	fc.expect(ipc.TypeCheckpoint, 1)
	fc.send(ipc.TypeCancel, 1, `{"cmd":"c1"}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"c1","accepted":true}`)
	time.Sleep(20 * time.Millisecond) // the handler's context is done by now
	select {
	case err := <-errs:
		t.Fatalf("Checkpoint returned %v before the sidecar answered it", err)
	default:
	}
	fc.send(ipc.TypeCheckpointAck, 1, `{"seq":1}`)
	if err := recv(t, errs); err != nil {
		t.Fatalf("Checkpoint = %v, want nil (the sidecar applied it)", err)
	}
	fc.expect(ipc.TypeFinish, 1)
}

// A handler that ends its goroutine without returning (runtime.Goexit, as
// t.FailNow does) still finishes its run (found by review: no FINISH, the
// slot held, and Serve waited for it for ever).
func TestAHandlerThatExitsItsGoroutineFinishesItsRun(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "exits" {
			runtime.Goexit()
		}
		return Done("fine")
	})})
	h.fc.send(ipc.TypeRun, 1, runJSON("exits", "x"))
	var fin Result
	h.fc.expectJSON(ipc.TypeFinish, 1, &fin)
	if fin.Error == nil || fin.Error.Kind != ipc.KindTransient || fin.Error.Code != "handler_exited" {
		t.Fatalf("FINISH = %+v, want transient handler_exited", fin)
	}
	h.fc.send(ipc.TypeRun, 2, runJSON("after", "x"))
	h.fc.expectEqualJSON(ipc.TypeFinish, 2, `{"status":"done","termination":{"type":"natural_end"},"response":"fine"}`)
}

// A SUBMIT whose raw fields are not UTF-8 is refused before it is sent
// (found by review: the sidecar closed the connection on it, failing the
// runs on it, and the documented retry did it again).
func TestSubmitOfBytesThatAreNotUTF8IsRefusedHere(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })})
	_, err := h.client.Submit(context.Background(), SubmitRequest{ThreadID: "t1",
		Messages: []Message{{Role: RoleUser, Content: []byte("\"tool output \xff\xfe\"")}}})
	if !errors.Is(err, ipc.ErrBadJSON) {
		t.Fatalf("Submit = %v, want ErrBadJSON", err)
	}
	h.fc.barrier() // nothing was sent
	h.fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	h.fc.expect(ipc.TypeFinish, 1) // the connection is fine
}

// A connection that fails right after its handshake counts as a failure:
// the reconnects back off instead of coming at once, over and over (found
// by review: a sidecar refusing what an agent sent drew ten reconnects a
// second, and every attempt of the runs was spent in under one).
func TestConnectionsThatFailAfterTheirHandshakeBackOff(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{MinBackoff: 40 * time.Millisecond, MaxBackoff: 5 * time.Second,
		Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })})
	h.fc.close()
	n := 1
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		fc, ok := h.sc.acceptBefore(deadline)
		if !ok {
			break
		}
		fc.handshake(testWelcome)
		fc.close()
		n++
	}
	// Without the back-off: a delay of 20 ms on average, some 40
	// connections. With it: 40, 80, 160, 320, 640 ms at most, some 5.
	if n > 12 {
		t.Fatalf("%d connections in a second, each closed after its handshake: no back-off", n)
	}
}

// Text does not decode arrays nested in an array of parts: reading them
// cost a decode of the rest at every level, quadratic in the depth (found
// by review: seconds for a request body of nested arrays). Counted in
// allocations, which do not depend on the machine: twice as deep costs
// about the same.
func TestTextOfNestedArraysCostsTheSameAtAnyDepth(t *testing.T) {
	nested := func(depth int) Message {
		content := strings.Repeat("[", depth) + strings.Repeat("]", depth)
		return Message{Role: RoleUser, Content: []byte(`["top", ` + content + `]`)}
	}
	shallow, deep := nested(500), nested(1000)
	if text, ok := deep.Text(); !ok || text != "top" {
		t.Fatalf("Text = %q %v, want the string part", text, ok)
	}
	a := testing.AllocsPerRun(5, func() { shallow.Text() })
	b := testing.AllocsPerRun(5, func() { deep.Text() })
	if b > a+10 {
		t.Fatalf("Text of arrays nested 500 deep: %v allocations, 1000 deep: %v", a, b)
	}
}
