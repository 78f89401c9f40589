package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

func TestHandshake(t *testing.T) {
	t.Parallel()
	nop := HandlerFunc(func(context.Context, *Run) Result { return Result{} })
	tests := []struct {
		name string
		cfg  Config
		want ipc.Hello
	}{
		{"explicit", Config{Name: "echo", AgentIDs: []string{"a", "b"}, MaxRuns: 3, Handler: nop},
			ipc.Hello{Protocol: 1, Name: "echo", AgentIDs: []string{"a", "b"}, MaxRuns: 3}},
		{"defaults", Config{Handler: nop},
			ipc.Hello{Protocol: 1, Name: filepath.Base(os.Args[0]), AgentIDs: []string{"*"}, MaxRuns: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := startClient(t, tt.cfg, harnessOpt{noHandshake: true})
			fc := h.sc.accept()
			got := fc.handshake(testWelcome)
			if got.Protocol != tt.want.Protocol || got.Name != tt.want.Name || got.MaxRuns != tt.want.MaxRuns ||
				!slices.Equal(got.AgentIDs, tt.want.AgentIDs) {
				t.Fatalf("HELLO = %+v, want %+v", got, tt.want)
			}
			// The connection is established: the SDK answers a PING.
			fc.barrier()
		})
	}
}

func TestHandshakeRefused(t *testing.T) {
	t.Parallel()
	nop := HandlerFunc(func(context.Context, *Run) Result { return Result{} })

	t.Run("unsupported_protocol", func(t *testing.T) {
		t.Parallel()
		h := startClient(t, Config{Handler: nop}, harnessOpt{noHandshake: true})
		fc := h.sc.accept()
		fc.expect(ipc.TypeHello, 0)
		fc.send(ipc.TypeError, 0, `{"code":"unsupported_protocol","message":"want 2"}`)
		err := h.wait()
		var he *HandshakeError
		if !errors.As(err, &he) || he.Code != ipc.CodeUnsupportedProtocol || he.Retryable() {
			t.Fatalf("Serve = %v, want a non-retryable unsupported_protocol HandshakeError", err)
		}
	})

	t.Run("welcome_of_another_version", func(t *testing.T) {
		t.Parallel()
		h := startClient(t, Config{Handler: nop}, harnessOpt{noHandshake: true})
		fc := h.sc.accept()
		w := testWelcome
		w.Protocol = 2
		fc.handshake(w)
		var he *HandshakeError
		if err := h.wait(); !errors.As(err, &he) || he.Code != ipc.CodeUnsupportedProtocol {
			t.Fatalf("Serve = %v, want unsupported_protocol", err)
		}
	})

	t.Run("other_refusal_is_retried", func(t *testing.T) {
		t.Parallel()
		h := startClient(t, Config{Handler: nop}, harnessOpt{noHandshake: true})
		fc := h.sc.accept()
		fc.expect(ipc.TypeHello, 0)
		fc.send(ipc.TypeError, 0, `{"code":"busy","message":"later"}`)
		fc.expectEOF()
		h.sc.accept().handshake(testWelcome) // the SDK came back
		select {
		case err := <-h.errc:
			t.Fatalf("Serve returned %v after a retryable refusal", err)
		default:
		}
	})
}

func TestRunEventsCheckpointsFinish(t *testing.T) {
	t.Parallel()
	runs := make(chan *Run, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		runs <- run
		if err := run.Emit(map[string]string{"type": "run_start", "run_id": run.RunID}); err != nil {
			return Transient("emit", err.Error())
		}
		if err := run.EmitRaw([]byte(`{"type":"text_delta","delta":"a\u00e9"}`)); err != nil {
			return Transient("emit", err.Error())
		}
		steps := int64(1)
		err := run.Checkpoint(ctx, Checkpoint{
			Messages: []Message{TextMessage(RoleAssistant, "answer")},
			Run:      &RunPatch{Steps: &steps, State: []byte(`{"k":1}`)},
		})
		if err != nil {
			return Transient("checkpoint", err.Error())
		}
		if err := run.Checkpoint(ctx, Checkpoint{}); err != nil {
			return Transient("checkpoint", err.Error())
		}
		if err := run.EmitRaw([]byte(`{"type":"run_finish"}`)); err != nil {
			return Transient("emit", err.Error())
		}
		return Done("answer")
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "hello"))

	run := recv(t, runs)
	text, _ := run.Request.Messages[0].Text()
	if run.DispatchID != "d-r1" || run.RunID != "r1" || run.ThreadID != "t-r1" || run.AgentID != "default" ||
		run.SessionID != "s-r1" || run.Attempt != 2 || text != "hello" || run.Request.RunMode != ModeForeground ||
		run.Request.Traceparent != "00-abc-def-01" {
		t.Errorf("run fields: %+v", run)
	}
	if c := run.Context; len(c.Messages) != 1 || c.Messages[0].Seq != 4 || c.FirstSeq != 4 || c.TotalMessages != 5 ||
		c.LatestRun == nil || c.LatestRun.RunID != "r0" || c.LatestRun.Steps != 3 {
		t.Errorf("run context: %+v", c)
	}

	// Events arrive byte for byte, in order, checkpoints after the
	// events sent before them.
	if f := fc.expect(ipc.TypeEvent, 1); string(f.payload) != `{"run_id":"r1","type":"run_start"}` {
		t.Errorf("event 1 = %s", f.payload)
	}
	if f := fc.expect(ipc.TypeEvent, 1); string(f.payload) != `{"type":"text_delta","delta":"a\u00e9"}` {
		t.Errorf("event 2 = %s", f.payload)
	}
	fc.expectEqualJSON(ipc.TypeCheckpoint, 1,
		`{"seq":1,"messages":[{"role":"assistant","content":"answer"}],"run":{"steps":1,"state":{"k":1}}}`)
	fc.barrier() // the SDK waits for the ACK: nothing follows yet
	fc.send(ipc.TypeCheckpointAck, 1, `{"seq":1}`)
	fc.expectEqualJSON(ipc.TypeCheckpoint, 1, `{"seq":2,"messages":[]}`)
	fc.send(ipc.TypeCheckpointAck, 1, `{"seq":2}`)
	fc.expectEqualJSON(ipc.TypeEvent, 1, `{"type":"run_finish"}`)
	fc.expectEqualJSON(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"},"response":"answer"}`)
}

func TestCheckpointFailures(t *testing.T) {
	t.Parallel()
	errs := make(chan error, 3)
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		errs <- run.Checkpoint(ctx, Checkpoint{Messages: []Message{TextMessage(RoleAssistant, "x")}})
		short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		errs <- run.Checkpoint(short, Checkpoint{})
		errs <- run.Checkpoint(ctx, Checkpoint{})
		return Done("")
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))

	fc.expectEqualJSON(ipc.TypeCheckpoint, 1, `{"seq":1,"messages":[{"role":"assistant","content":"x"}]}`)
	fc.send(ipc.TypeError, 1, `{"code":"checkpoint_failed","message":"disk full","seq":1,"reason":"unavailable"}`)
	var ce *CheckpointError
	if err := recv(t, errs); !errors.As(err, &ce) || ce.Seq != 1 || ce.Code != ipc.CodeCheckpointFailed || ce.Message != "disk full" ||
		ce.Reason != ipc.ReasonUnavailable || !ce.Retryable() {
		t.Fatalf("checkpoint 1 = %v, want a retryable CheckpointError seq 1 checkpoint_failed, reason unavailable", err)
	}

	fc.expectEqualJSON(ipc.TypeCheckpoint, 1, `{"seq":2,"messages":[]}`)
	if err := recv(t, errs); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("checkpoint 2 = %v, want its context's deadline", err)
	}
	fc.send(ipc.TypeCheckpointAck, 1, `{"seq":2}`) // late: ignored

	fc.expectEqualJSON(ipc.TypeCheckpoint, 1, `{"seq":3,"messages":[]}`)
	fc.send(ipc.TypeCheckpointAck, 1, `{"seq":3}`)
	if err := recv(t, errs); err != nil {
		t.Fatalf("checkpoint 3 = %v", err)
	}
	fc.expect(ipc.TypeFinish, 1)
}

func TestCheckpointErrorRetryableByReason(t *testing.T) {
	for reason, want := range map[string]bool{
		ipc.ReasonUnavailable:       true,
		ipc.ReasonConflict:          true,
		ipc.ReasonAlreadyExists:     false,
		ipc.ReasonRunEnded:          false,
		ipc.ReasonCheckpointBacklog: false,
		ipc.ReasonInternal:          false,
		"too_large":                 false,
		"":                          false, // a sidecar that sends no reason
	} {
		e := &CheckpointError{Seq: 1, Code: ipc.CodeCheckpointFailed, Reason: reason}
		if got := e.Retryable(); got != want {
			t.Errorf("reason %q: Retryable() = %v, want %v", reason, got, want)
		}
		if reason != "" && !strings.Contains(e.Error(), reason) {
			t.Errorf("reason %q: %q does not name it", reason, e.Error())
		}
	}
}

func TestFinishResults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		res  Result
		want string
	}{
		{"done", Done("hi"), `{"status":"done","termination":{"type":"natural_end"},"response":"hi"}`},
		{"cancelled", Cancelled(), `{"status":"done","termination":{"type":"cancelled"}}`},
		{"suspended", Suspended(WaitingState{Reason: WaitToolPermission, TicketIDs: []string{"call-1"}}),
			`{"status":"waiting","termination":{"type":"suspended"},"waiting":{"reason":"tool_permission","ticket_ids":["call-1"]}}`},
		{"transient", Transient("llm_down", "503"),
			`{"status":"done","termination":{"type":"error","value":"503"},"error":{"kind":"transient","code":"llm_down","message":"503"}}`},
		{"permanent", Permanent("agent_not_found", "no such agent"),
			`{"status":"done","termination":{"type":"error","value":"no such agent"},"error":{"kind":"permanent","code":"agent_not_found","message":"no such agent"}}`},
		{"zero", Result{}, `{"status":"done","termination":{"type":"natural_end"}}`},
		{"response_only", Result{Response: "r"}, `{"status":"done","termination":{"type":"natural_end"},"response":"r"}`},
		{"waiting_only", Result{Waiting: &WaitingState{Reason: WaitUserInput}},
			`{"status":"waiting","termination":{"type":"suspended"},"waiting":{"reason":"user_input"}}`},
		{"error_without_kind", Result{Error: &ipc.FinishError{Code: "x", Message: "m"}},
			`{"status":"done","termination":{"type":"error","value":"m"},"error":{"kind":"transient","code":"x","message":"m"}}`},
		{"bad_raw_json", Result{Termination: &Termination{Type: TermBlocked, Value: []byte(`{`)}},
			`{"status":"done","termination":{"type":"error","value":"agent returned a result that does not encode"},"error":{"kind":"transient","code":"invalid_result","message":"agent returned a result that does not encode"}}`},
		// A status the sidecar would answer by closing the connection
		// (every run on it failed) fails this run alone, for good; the
		// runs after it in this table share the connection.
		{"bad_status", Result{Status: StatusRunning},
			`{"status":"done","termination":{"type":"error","value":"agent returned status \"running\"; a run ends done or waiting"},"error":{"kind":"permanent","code":"invalid_result","message":"agent returned status \"running\"; a run ends done or waiting"}}`},
		{"after_bad_status", Done("fine"), `{"status":"done","termination":{"type":"natural_end"},"response":"fine"}`},
		// A kind the sidecar would take as transient, a typo retried to its
		// last attempt (found by review), fails this run for good.
		{"bad_kind", Result{Error: &ipc.FinishError{Kind: "fatal", Code: "x", Message: "m"}},
			`{"status":"done","termination":{"type":"error","value":"agent returned error kind \"fatal\"; a failure is transient or permanent"},"error":{"kind":"permanent","code":"invalid_result","message":"agent returned error kind \"fatal\"; a failure is transient or permanent"}}`},
	}
	byRun := make(map[string]Result, len(tests))
	for _, tt := range tests {
		byRun[tt.name] = tt.res
	}
	h := startClient(t, Config{MaxRuns: len(tests), Handler: HandlerFunc(func(_ context.Context, run *Run) Result {
		return byRun[run.RunID]
	})})
	for i, tt := range tests {
		stream := uint64(i + 1)
		h.fc.send(ipc.TypeRun, stream, runJSON(tt.name, "x"))
		f := h.fc.expect(ipc.TypeFinish, stream)
		got := string(f.payload)
		if tt.name == "bad_raw_json" { // the encoder's message varies
			if !strings.Contains(got, `"code":"invalid_result"`) || !strings.Contains(got, `"kind":"transient"`) {
				t.Errorf("%s: FINISH = %s", tt.name, got)
			}
			continue
		}
		if !jsonEqual(t, f.payload, []byte(tt.want)) {
			t.Errorf("%s: FINISH\n got %s\nwant %s", tt.name, got, tt.want)
		}
	}
}

func TestCancel(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	causes := make(chan error, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		started <- struct{}{}
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return Result{} // zero after cancellation: Cancelled()
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	recv(t, started)
	fc.send(ipc.TypeCancel, 1, `{"cmd":"c1"}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"c1","accepted":true}`)
	if cause := recv(t, causes); !errors.Is(cause, ErrCancelled) {
		t.Fatalf("cause = %v, want ErrCancelled", cause)
	}
	fc.expectEqualJSON(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"cancelled"}}`)

	// A command for a stream that is not open draws nothing.
	fc.send(ipc.TypeCancel, 1, `{"cmd":"c2"}`)
	fc.send(ipc.TypeMessages, 9, `{"cmd":"c3","messages":[]}`)
	fc.barrier()
}

func TestLiveCommands(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	ready := make(chan struct{}, 1)
	h := startClient(t, Config{MaxRuns: 2, Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "deaf" { // never subscribes
			ready <- struct{}{}
			<-ctx.Done()
			return Cancelled()
		}
		msgs, decs := run.Messages(), run.Decisions()
		ready <- struct{}{}
		<-release
		for range liveBuffer {
			batch := <-msgs
			if err := run.Emit(map[string]string{"type": "custom", "message_id": batch[0].MessageID, "text": mustText(batch[0].Message)}); err != nil {
				return Transient("emit", err.Error())
			}
		}
		d := <-decs
		if err := run.Emit(map[string]any{"type": "tool_call_resumed", "call_id": d[0].CallID, "resume": d[0].Resume}); err != nil {
			return Transient("emit", err.Error())
		}
		return Done("")
	})})
	fc := h.fc

	fc.send(ipc.TypeRun, 1, runJSON("deaf", "x"))
	recv(t, ready)
	fc.send(ipc.TypeMessages, 1, `{"cmd":"m0","messages":[]}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"m0","accepted":false,"reason":"run does not take live messages"}`)
	fc.send(ipc.TypeDecision, 1, `{"cmd":"d0","decisions":[]}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 1, `{"cmd":"d0","accepted":false,"reason":"run does not take live decisions"}`)
	fc.send(ipc.TypeCancel, 1, `{"cmd":"c0"}`)
	fc.expect(ipc.TypeCommandAck, 1)
	fc.expect(ipc.TypeFinish, 1)

	fc.send(ipc.TypeRun, 2, runJSON("live", "x"))
	recv(t, ready)
	for i := range liveBuffer {
		fc.sendJSON(ipc.TypeMessages, 2, map[string]any{"cmd": "m" + string(rune('a'+i)), "messages": []MessageRecord{{
			MessageID: "id-" + string(rune('a'+i)), ThreadID: "t-live", Seq: uint64(10 + i),
			Message: TextMessage(RoleUser, "live "+string(rune('a'+i))),
		}}})
		var ack ipc.CommandAck
		fc.expectJSON(ipc.TypeCommandAck, 2, &ack)
		if !ack.Accepted || ack.Cmd != "m"+string(rune('a'+i)) {
			t.Fatalf("ack %d = %+v, want accepted", i, ack)
		}
	}
	fc.send(ipc.TypeMessages, 2, `{"cmd":"full","messages":[]}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 2, `{"cmd":"full","accepted":false,"reason":"live message buffer full"}`)
	// A command read after its ack was due is refused: the sidecar may
	// have fallen back already.
	fc.send(ipc.TypeDecision, 2, `{"cmd":"d-late","decisions":[{"call_id":"call-1","resume":{"approved":false}}],"ack_by":1}`)
	fc.expectEqualJSON(ipc.TypeCommandAck, 2, `{"cmd":"d-late","accepted":false,"reason":"late"}`)
	fc.sendJSON(ipc.TypeDecision, 2, map[string]any{"cmd": "d1", "decisions": []map[string]any{{"call_id": "call-1", "resume": map[string]bool{"approved": true}}},
		"ack_by": time.Now().Add(time.Minute).UnixMilli()})
	fc.expectEqualJSON(ipc.TypeCommandAck, 2, `{"cmd":"d1","accepted":true}`)

	close(release)
	for i := range liveBuffer {
		c := string(rune('a' + i))
		fc.expectEqualJSON(ipc.TypeEvent, 2, `{"type":"custom","message_id":"id-`+c+`","text":"live `+c+`"}`)
	}
	fc.expectEqualJSON(ipc.TypeEvent, 2, `{"type":"tool_call_resumed","call_id":"call-1","resume":{"approved":true}}`)
	fc.expect(ipc.TypeFinish, 2)
}

func mustText(m Message) string {
	s, _ := m.Text()
	return s
}

func TestHandlerPanic(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result {
		panic("boom")
	})})
	h.fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	var fin Result
	h.fc.expectJSON(ipc.TypeFinish, 1, &fin)
	if fin.Error == nil || fin.Error.Kind != ipc.KindTransient || fin.Error.Code != "panic" || !strings.Contains(fin.Error.Message, "boom") {
		t.Fatalf("FINISH = %+v, want transient panic", fin)
	}
	// The connection survives: the next run works.
	h.fc.send(ipc.TypeRun, 2, runJSON("r2", "x"))
	h.fc.expect(ipc.TypeFinish, 2)
}

func TestRunAfterFinish(t *testing.T) {
	t.Parallel()
	runs := make(chan *Run, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(_ context.Context, run *Run) Result {
		if err := run.EmitRaw([]byte(`[1]`)); !errors.Is(err, ipc.ErrBadJSON) {
			return Permanent("test", "EmitRaw of an array: "+errString(err))
		}
		if err := run.Emit(func() {}); err == nil {
			return Permanent("test", "Emit of a func succeeded")
		}
		run.Messages()
		runs <- run
		return Done("ok")
	})})
	h.fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	h.fc.expectEqualJSON(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"},"response":"ok"}`)
	run := recv(t, runs)
	if err := run.EmitRaw([]byte(`{"type":"late"}`)); !errors.Is(err, ErrRunFinished) {
		t.Errorf("EmitRaw after FINISH = %v", err)
	}
	if err := run.Checkpoint(context.Background(), Checkpoint{}); !errors.Is(err, ErrRunFinished) {
		t.Errorf("Checkpoint after FINISH = %v", err)
	}
	if _, ok := <-run.Messages(); ok {
		t.Error("Messages channel open after FINISH")
	}
	if _, ok := <-run.Decisions(); ok {
		t.Error("Decisions channel open after FINISH")
	}
	h.fc.barrier() // nothing was sent for the late calls
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

func TestHeartbeat(t *testing.T) {
	t.Parallel()
	w := testWelcome
	w.HeartbeatMs = 100 // short, with room for a starved test process
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })},
		harnessOpt{welcome: &w})
	fc := h.fc

	fc.send(ipc.TypePing, 0, "\x00\x01\x02\x03\x04\x05\x06\x07")
	if f := fc.expect(ipc.TypePong, 0); string(f.payload) != "\x00\x01\x02\x03\x04\x05\x06\x07" {
		t.Fatalf("PONG payload %q", f.payload)
	}
	// Idle, the SDK pings; answered, the connection outlives many
	// heartbeats.
	p1 := recv(t, fc.pings)
	p2 := recv(t, fc.pings)
	if len(p1) != ipc.PingSize || string(p1) == string(p2) {
		t.Fatalf("PINGs %x, %x: want 8 distinct bytes each", p1, p2)
	}
	deadline := time.Now().Add(6 * 100 * time.Millisecond)
	for time.Now().Before(deadline) {
		recv(t, fc.pings)
	}
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	fc.expect(ipc.TypeFinish, 1) // still the first connection
}

func TestHeartbeatTimeout(t *testing.T) {
	t.Parallel()
	w := testWelcome
	w.HeartbeatMs = 50
	noPong := false
	started := make(chan struct{}, 1)
	causes := make(chan error, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "r2" {
			return Done("")
		}
		started <- struct{}{}
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return Done("too late")
	})}, harnessOpt{welcome: &w, autoPong: &noPong})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	recv(t, started)

	// The fake answers nothing: after 3 heartbeats the SDK gives up.
	start := time.Now()
	var st ipc.Status
	fc.expectJSON(ipc.TypeError, 0, &st)
	if st.Code != ipc.CodeHeartbeatTimeout {
		t.Fatalf("ERROR %+v, want heartbeat_timeout", st)
	}
	fc.expectEOF() // and no FINISH for the run
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Errorf("silence detected after %v", elapsed)
	}
	if cause := recv(t, causes); !errors.Is(cause, ErrConnectionLost) {
		t.Fatalf("run cancelled with %v, want ErrConnectionLost", cause)
	}

	// It reconnects; this time the fake answers.
	fc2 := h.sc.accept()
	fc2.autoPong.Store(true)
	fc2.handshake(testWelcome)
	fc2.send(ipc.TypeRun, 1, runJSON("r2", "x"))
	fc2.expect(ipc.TypeFinish, 1)
}

func TestReconnect(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	causes := make(chan error, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "after" {
			return Done("again")
		}
		started <- struct{}{}
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return Result{}
	})})
	h.fc.send(ipc.TypeRun, 1, runJSON("before", "x"))
	recv(t, started)

	// The sidecar goes away: listener and connection.
	h.sc.stopListening()
	h.fc.close()
	if cause := recv(t, causes); !errors.Is(cause, ErrConnectionLost) {
		t.Fatalf("run cancelled with %v, want ErrConnectionLost", cause)
	}
	time.Sleep(50 * time.Millisecond) // let a few dials fail: nothing listens
	select {
	case err := <-h.errc:
		t.Fatalf("Serve returned %v while the sidecar was away", err)
	default:
	}

	// It comes back on the same path.
	h.sc.listen()
	fc := h.sc.accept()
	fc.handshake(testWelcome)
	fc.send(ipc.TypeRun, 1, runJSON("after", "x"))
	fc.expectEqualJSON(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"},"response":"again"}`)
}

func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		started <- struct{}{}
		select {
		case <-release:
			return Done("finished in time")
		case <-ctx.Done():
			return Cancelled()
		}
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	recv(t, started)

	h.cancel()
	fc.expectEqualJSON(ipc.TypeGoAway, 0, `{"code":"shutdown","message":"agent shutting down"}`)
	fc.barrier() // still serving: the run may finish
	select {
	case err := <-h.errc:
		t.Fatalf("Serve returned %v before the run finished", err)
	default:
	}
	close(release)
	fc.expectEqualJSON(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"},"response":"finished in time"}`)
	fc.expectEOF()
	if err := h.wait(); err != nil {
		t.Fatalf("Serve = %v", err)
	}
}

func TestShutdownGraceExpires(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	causes := make(chan error, 1)
	h := startClient(t, Config{ShutdownGrace: 100 * time.Millisecond, Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		started <- struct{}{}
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return Cancelled()
	})})
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	recv(t, started)

	start := time.Now()
	h.cancel()
	fc.expect(ipc.TypeGoAway, 0)
	if cause := recv(t, causes); !errors.Is(cause, ErrShutdown) {
		t.Fatalf("cause = %v, want ErrShutdown", cause)
	}
	if elapsed := time.Since(start); elapsed < 100*time.Millisecond {
		t.Errorf("run cancelled after %v, before the grace", elapsed)
	}
	// Not the user's cancel: reported as transient, so it is retried.
	var fin Result
	fc.expectJSON(ipc.TypeFinish, 1, &fin)
	if fin.Error == nil || fin.Error.Kind != ipc.KindTransient || fin.Error.Code != ipc.CodeShutdown {
		t.Fatalf("FINISH %+v, want transient shutdown", fin)
	}
	fc.expectEOF()
	if err := h.wait(); err != nil {
		t.Fatalf("Serve = %v", err)
	}
}

func TestServeReturnsWithoutHandlersThatIgnoreTheirCancel(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	returned := make(chan struct{})
	h := startClient(t, Config{ShutdownGrace: 50 * time.Millisecond, StopTimeout: 200 * time.Millisecond,
		Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
			defer close(returned)
			started <- struct{}{}
			<-release // deaf to ctx
			return Done("late")
		})})
	var releaseOnce sync.Once
	free := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(func() { free(); <-returned }) // before the harness's cleanup: goleak
	fc := h.fc
	fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	recv(t, started)

	start := time.Now()
	h.cancel()
	fc.expect(ipc.TypeGoAway, 0)
	// No FINISH: the connection closes, and the sidecar retries the run.
	fc.expectEOF()
	err := h.wait()
	if !errors.Is(err, ErrHandlersStuck) {
		t.Fatalf("Serve = %v, want ErrHandlersStuck", err)
	}
	if elapsed := time.Since(start); elapsed < 250*time.Millisecond {
		t.Errorf("Serve returned after %v, before grace and stop timeout (250ms)", elapsed)
	}
	select {
	case <-returned:
		t.Fatal("the handler returned before it was released")
	default:
	}
	free()
}

// A Client whose Serve gave up on a stuck handler serves again: its
// handler count is not a WaitGroup that a waiter left behind still
// waits on (found by review: the race detector flagged Serve #2's first
// run, and without it the runtime could panic).
func TestServeAgainAfterHandlersStuck(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	stuckReturned := make(chan struct{})
	h := startClient(t, Config{ShutdownGrace: 20 * time.Millisecond, StopTimeout: 100 * time.Millisecond,
		Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
			if run.RunID == "r1" {
				defer close(stuckReturned)
				<-release
			}
			return Done("ok")
		})})
	h.fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	time.Sleep(50 * time.Millisecond)
	h.cancel()
	if err := h.wait(); !errors.Is(err, ErrHandlersStuck) {
		t.Fatalf("Serve #1 = %v, want ErrHandlersStuck", err)
	}
	close(release)
	<-stuckReturned
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- h.client.Serve(ctx) }()
	fc := h.sc.accept()
	fc.handshake(testWelcome)
	fc.send(ipc.TypeRun, 1, runJSON("r2", "y"))
	fc.expect(ipc.TypeFinish, 1)
	cancel()
	if err := <-errc; err != nil {
		t.Fatalf("Serve #2 = %v", err)
	}
}

func TestSubmit(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })},
		harnessOpt{noHandshake: true})

	// Submit before the connection is up: it waits for one.
	type out struct {
		res SubmitResult
		err error
	}
	outs := make(chan out, 1)
	submit := func(req SubmitRequest) {
		res, err := h.client.Submit(context.Background(), req)
		outs <- out{res, err}
	}
	go submit(SubmitRequest{
		ThreadID: "t1", AgentID: "default", Messages: []Message{TextMessage(RoleUser, "wake up")},
		DedupeKey: "k1", RunMode: ModeInternalWake, Origin: OriginInternal, ParentRunID: "r0", ParentThreadID: "t0",
		Overrides: []byte(`{"model":"m"}`),
	})
	fc := h.sc.accept()
	fc.handshake(testWelcome)

	var req map[string]any
	fc.expectJSON(ipc.TypeSubmit, 0, &req)
	id, _ := req["req"].(string)
	if id == "" {
		t.Fatalf("SUBMIT without req: %v", req)
	}
	delete(req, "req")
	want := `{"thread_id":"t1","agent_id":"default","messages":[{"role":"user","content":"wake up"}],"dedupe_key":"k1",
		"run_mode":"internal_wake","origin":"internal","parent_run_id":"r0","parent_thread_id":"t0","overrides":{"model":"m"}}`
	if got := mustMarshal(req); !jsonEqual(t, got, []byte(want)) {
		t.Fatalf("SUBMIT\n got %s\nwant %s", got, want)
	}
	fc.sendJSON(ipc.TypeSubmitResult, 0, map[string]string{"req": "other", "dispatch_id": "nope"}) // not ours: ignored
	fc.sendJSON(ipc.TypeSubmitResult, 0, map[string]string{"req": id, "dispatch_id": "d1", "run_id": "r1", "thread_id": "t1", "status": "queued"})
	if o := recv(t, outs); o.err != nil || o.res != (SubmitResult{DispatchID: "d1", RunID: "r1", ThreadID: "t1", Status: "queued"}) {
		t.Fatalf("Submit = %+v, %v", o.res, o.err)
	}

	// A refusal.
	go submit(SubmitRequest{ThreadID: "t1"})
	var req2 struct {
		Req      string    `json:"req"`
		Messages []Message `json:"messages"`
	}
	fc.expectJSON(ipc.TypeSubmit, 0, &req2)
	if req2.Req == id || req2.Messages == nil {
		t.Fatalf("second SUBMIT %+v: want a new req id and messages:[]", req2)
	}
	fc.sendJSON(ipc.TypeSubmitResult, 0, map[string]any{"req": req2.Req, "error": map[string]string{"code": "busy", "message": "slow down"}})
	var se *SubmitError
	if o := recv(t, outs); !errors.As(o.err, &se) || se.Code != ipc.CodeBusy || se.Message != "slow down" {
		t.Fatalf("Submit error = %v, want SubmitError busy", o.err)
	}
}

// TestSubmitRetriesUnsent: a SUBMIT that could not be written because its
// connection had died is sent on the next connection.
func TestSubmitRetriesUnsent(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })})
	dead := &conn{dead: make(chan struct{}), submits: map[string]chan submitResultPayload{}}
	close(dead.dead)
	var live *conn
	for deadline := time.Now().Add(waitTimeout); live == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the connection was not published")
		}
		h.client.mu.Lock()
		if live = h.client.cur; live != nil {
			h.client.cur = dead
		}
		h.client.mu.Unlock()
	}

	errs := make(chan error, 1)
	go func() {
		_, err := h.client.Submit(context.Background(), SubmitRequest{ThreadID: "t1"})
		errs <- err
	}()
	h.fc.barrier() // nothing sent while only the dead connection is current
	select {
	case err := <-errs:
		t.Fatalf("Submit returned %v on a dead connection", err)
	default:
	}
	h.client.setConn(live)
	var req submitPayload
	h.fc.expectJSON(ipc.TypeSubmit, 0, &req)
	h.fc.sendJSON(ipc.TypeSubmitResult, 0, map[string]string{"req": req.Req, "dispatch_id": "d1", "status": "queued"})
	if err := recv(t, errs); err != nil {
		t.Fatalf("Submit = %v", err)
	}
}

func TestSubmitWithoutConnection(t *testing.T) {
	t.Parallel()
	c, err := New(Config{Socket: "/nonexistent/a.sock", Logger: testLogger(),
		Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := c.Submit(ctx, SubmitRequest{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Submit without Serve = %v, want the context's deadline", err)
	}
}

func TestSubmitConnectionLost(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })})
	errs := make(chan error, 1)
	go func() {
		_, err := h.client.Submit(context.Background(), SubmitRequest{ThreadID: "t1"})
		errs <- err
	}()
	h.fc.expect(ipc.TypeSubmit, 0)
	h.fc.close()
	if err := recv(t, errs); !errors.Is(err, ErrConnectionLost) {
		t.Fatalf("Submit = %v, want ErrConnectionLost", err)
	}
	h.sc.accept().handshake(testWelcome) // reconnects after it
}

func TestServeTwice(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result { return Done("") })})
	if err := h.client.Serve(context.Background()); !errors.Is(err, ErrServing) {
		t.Fatalf("second Serve = %v, want ErrServing", err)
	}
}

func TestSidecarProtocolViolations(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		raw  []byte
	}{
		{"unknown_type", ipc.AppendFrame(nil, 0x7f, 0, 0, []byte(`{}`))},
		{"not_json", ipc.AppendFrame(nil, ipc.TypeCancel, 0, 1, []byte(`{"cmd":`))},
		{"agent_frame_type", ipc.AppendFrame(nil, ipc.TypeEvent, 0, 1, []byte(`{"type":"x"}`))},
		{"second_welcome", ipc.AppendFrame(nil, ipc.TypeWelcome, 0, 0, []byte(`{"protocol":1}`))},
		{"run_on_stream_0", ipc.AppendFrame(nil, ipc.TypeRun, 0, 0, []byte(runJSON("r", "x")))},
		{"cancel_on_stream_0", ipc.AppendFrame(nil, ipc.TypeCancel, 0, 0, []byte(`{"cmd":"c"}`))},
		{"ping_on_run_stream", ipc.AppendFrame(nil, ipc.TypePing, 0, 3, []byte("12345678"))},
		{"ping_not_8_bytes", ipc.AppendFrame(nil, ipc.TypePing, 0, 0, []byte("1234"))},
		{"pong_not_8_bytes", ipc.AppendFrame(nil, ipc.TypePong, 0, 0, []byte("1234"))},
		{"run_stream_reused", ipc.AppendFrame(ipc.AppendFrame(nil, ipc.TypeRun, 0, 2, []byte(runJSON("a", "x"))),
			ipc.TypeRun, 0, 2, []byte(runJSON("b", "x")))},
		{"command_of_wrong_shape", ipc.AppendFrame(nil, ipc.TypeMessages, 0, 1, []byte(`{"cmd":"c","messages":{"not":"an array"}}`))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, _ *Run) Result {
				<-ctx.Done()
				return Result{}
			})})
			if _, err := h.fc.nc.Write(tt.raw); err != nil {
				t.Fatal(err)
			}
			var st ipc.Status
			h.fc.expectJSON(ipc.TypeError, 0, &st)
			if st.Code != ipc.CodeProtocolError {
				t.Fatalf("ERROR %+v, want protocol_error", st)
			}
			h.fc.expectEOF()
			h.sc.accept().handshake(testWelcome) // and it reconnects
		})
	}
}

func TestMalformedRunIsPermanent(t *testing.T) {
	t.Parallel()
	called := make(chan struct{}, 1)
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result {
		called <- struct{}{}
		return Done("")
	})})
	h.fc.send(ipc.TypeRun, 1, `{"run_id":7}`)
	var fin Result
	h.fc.expectJSON(ipc.TypeFinish, 1, &fin)
	if fin.Error == nil || fin.Error.Kind != ipc.KindPermanent || fin.Error.Code != "invalid_run" {
		t.Fatalf("FINISH %+v, want permanent invalid_run", fin)
	}
	select {
	case <-called:
		t.Fatal("handler called for a malformed RUN")
	default:
	}
	h.fc.send(ipc.TypeRun, 2, runJSON("ok", "x")) // the connection is fine
	h.fc.expect(ipc.TypeFinish, 2)
}

func TestRunStreamErrorKeepsConnection(t *testing.T) {
	t.Parallel()
	started := make(chan *Run, 1)
	release := make(chan struct{})
	h := startClient(t, Config{Handler: HandlerFunc(func(_ context.Context, run *Run) Result {
		started <- run
		<-release
		return Done("")
	})})
	h.fc.send(ipc.TypeRun, 1, runJSON("r1", "x"))
	recv(t, started)
	h.fc.send(ipc.TypeError, 1, `{"code":"unknown_stream","message":"?"}`)
	h.fc.send(ipc.TypeError, 5, `{"code":"unknown_stream","message":"?"}`)
	h.fc.send(ipc.TypeGoAway, 0, `{"code":"shutdown"}`)
	h.fc.barrier()
	close(release)
	h.fc.expect(ipc.TypeFinish, 1)
}

func TestConfig(t *testing.T) {
	t.Parallel()
	nop := HandlerFunc(func(context.Context, *Run) Result { return Result{} })
	bad := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no_socket", Config{Handler: nop}, "Socket is required"},
		{"no_handler", Config{Socket: "s"}, "Handler is required"},
		{"max_runs_negative", Config{Socket: "s", Handler: nop, MaxRuns: -1}, "MaxRuns -1"},
		{"max_runs_too_many", Config{Socket: "s", Handler: nop, MaxRuns: MaxMaxRuns + 1}, "MaxRuns 1025"},
		{"empty_agent_id", Config{Socket: "s", Handler: nop, AgentIDs: []string{"a", ""}}, "empty id"},
		{"backoff_inverted", Config{Socket: "s", Handler: nop, MinBackoff: time.Second, MaxBackoff: time.Millisecond}, "backoff"},
	}
	for _, tt := range bad {
		if _, err := New(tt.cfg); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: New = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
	c, err := New(Config{Socket: "s", Handler: nop})
	if err != nil {
		t.Fatal(err)
	}
	got := c.cfg
	if got.Name != filepath.Base(os.Args[0]) || !slices.Equal(got.AgentIDs, []string{"*"}) || got.MaxRuns != 1 ||
		got.MinBackoff != DefaultMinBackoff || got.MaxBackoff != DefaultMaxBackoff ||
		got.ShutdownGrace != DefaultShutdownGrace || got.StopTimeout != 0 || got.Logger == nil {
		t.Errorf("defaults: %+v", got)
	}
	c, _ = New(Config{Socket: "s", Handler: nop, MinBackoff: 10 * time.Second})
	if c.cfg.MaxBackoff != 10*time.Second {
		t.Errorf("MaxBackoff below an explicit MinBackoff: %v", c.cfg.MaxBackoff)
	}
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	c, err := New(Config{Socket: "s", Handler: HandlerFunc(func(context.Context, *Run) Result { return Result{} }),
		MinBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for n, ceil := range []time.Duration{100, 200, 400, 800, 1600, 3200, 5000, 5000} {
		ceil *= time.Millisecond
		var hi time.Duration
		for range 300 {
			d := c.backoff(n)
			if d < 0 || d > ceil {
				t.Fatalf("backoff(%d) = %v, outside [0, %v]", n, d, ceil)
			}
			hi = max(hi, d)
		}
		if hi < ceil/2 { // full jitter spreads over the whole range
			t.Errorf("backoff(%d): max of 300 draws %v, want above %v", n, hi, ceil/2)
		}
	}
	if d := c.backoff(1000); d > 5*time.Second {
		t.Errorf("backoff(1000) = %v overflows", d)
	}
}

// TestWelcomeFramesAfter: frames right behind WELCOME (in the same write)
// are not lost, and the reader accepts frames up to the max_frame WELCOME
// announced, even above the default.
//
// Not parallel: a 16 MiB frame under the race detector is heavy enough to
// starve the heartbeat tests.
func TestWelcomeFramesAfter(t *testing.T) {
	sizes := make(chan int, 2)
	h := startClient(t, Config{MaxRuns: 2, Handler: HandlerFunc(func(_ context.Context, run *Run) Result {
		text, _ := run.Request.Messages[0].Text()
		sizes <- len(text)
		return Done("")
	})}, harnessOpt{noHandshake: true})
	fc := h.sc.accept()
	fc.expect(ipc.TypeHello, 0)
	w := testWelcome
	w.MaxFrame = 2 * ipc.DefaultMaxFrame
	big := strings.Repeat("x", ipc.DefaultMaxFrame+1)
	raw := ipc.AppendFrame(nil, ipc.TypeWelcome, 0, 0, mustMarshal(w))
	raw = ipc.AppendFrame(raw, ipc.TypeRun, 0, 1, []byte(runJSON("small", "x")))
	raw = ipc.AppendFrame(raw, ipc.TypeRun, 0, 2, []byte(runJSON("big", big)))
	if _, err := fc.nc.Write(raw); err != nil {
		t.Fatal(err)
	}
	// Decoding a 16 MiB run under the race detector takes seconds alone
	// and far longer beside the other packages' tests on two cores (CI
	// saw more than 5 s).
	fc.expectWithin(time.Minute, ipc.TypeFinish, 1)
	fc.expectWithin(time.Minute, ipc.TypeFinish, 2)
	if a, b := recv(t, sizes), recv(t, sizes); a+b != 1+len(big) {
		t.Fatalf("message sizes %d, %d", a, b)
	}
}

// A result too large for a frame still ends the run at the sidecar: a
// permanent failure, result_too_large, instead of no FINISH at all.
func TestResultLargerThanMaxFrameFailsTheRun(t *testing.T) {
	t.Parallel()
	h := startClient(t, Config{Handler: HandlerFunc(func(context.Context, *Run) Result {
		return Done(strings.Repeat("x", 5000))
	})}, harnessOpt{noHandshake: true})
	fc := h.sc.accept()
	fc.expect(ipc.TypeHello, 0)
	w := testWelcome
	w.MaxFrame = 4096
	raw := ipc.AppendFrame(nil, ipc.TypeWelcome, 0, 0, mustMarshal(w))
	raw = ipc.AppendFrame(raw, ipc.TypeRun, 0, 1, []byte(runJSON("r", "x")))
	if _, err := fc.nc.Write(raw); err != nil {
		t.Fatal(err)
	}
	f := fc.expect(ipc.TypeFinish, 1)
	got := string(f.payload)
	if !strings.Contains(got, `"code":"result_too_large"`) || !strings.Contains(got, `"kind":"permanent"`) || len(f.payload) > 4096 {
		t.Fatalf("FINISH = %s", got)
	}
}

// After a dropped connection, a run of a thread whose handler of the
// dropped connection has not returned yet (it ignores its cancel) waits
// for it: a sidecar restarted after a kill sends the thread's run again
// at once, and the two never overlap in this agent.
func TestARunWaitsForItsThreadsHandlerOfADroppedConnection(t *testing.T) {
	t.Parallel()
	started := make(chan string, 2)
	release := make(chan struct{})
	var running atomic.Int32
	h := startClient(t, Config{Handler: HandlerFunc(func(ctx context.Context, run *Run) Result {
		if running.Add(1) > 1 {
			t.Errorf("two handlers of thread %s at once", run.ThreadID)
		}
		defer running.Add(-1)
		started <- run.SessionID
		if run.SessionID == "s-first" {
			<-release // deaf to its cancel
		}
		return Done("ok")
	})})
	h.fc.send(ipc.TypeRun, 1, strings.Replace(runJSON("r1", "x"), `"session_id":"s-r1"`, `"session_id":"s-first"`, 1))
	if s := recv(t, started); s != "s-first" {
		t.Fatalf("started %s", s)
	}
	h.sc.stopListening()
	h.fc.close()
	h.sc.listen()
	fc := h.sc.accept()
	fc.handshake(testWelcome)
	fc.send(ipc.TypeRun, 1, strings.Replace(runJSON("r1", "x"), `"session_id":"s-r1"`, `"session_id":"s-second"`, 1))
	select {
	case s := <-started:
		t.Fatalf("%s started while the dropped connection's handler of its thread still ran", s)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if s := recv(t, started); s != "s-second" {
		t.Fatalf("started %s", s)
	}
	fc.expectEqualJSON(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"},"response":"ok"}`)
}
