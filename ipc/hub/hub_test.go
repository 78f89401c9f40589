package hub_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

func TestHandshakeAnnouncesSettingsAndCapacity(t *testing.T) {
	r := newRig(t, hub.Config{SidecarID: "sc-1", Heartbeat: 2 * time.Second, MaxFrame: 1 << 20})
	if r.hub.Capacity() != 0 {
		t.Fatalf("capacity before any agent = %d", r.hub.Capacity())
	}
	_, w := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 3})
	if w.Protocol != ipc.ProtocolVersion || w.SidecarID != "sc-1" || w.HeartbeatMs != 2000 || w.MaxFrame != 1<<20 {
		t.Fatalf("WELCOME = %+v", w)
	}
	eventually(t, "capacity 3", func() bool { return r.hub.Capacity() == 3 })
	select {
	case <-r.hub.CapacityChanged():
	default:
		t.Fatal("CapacityChanged not signalled")
	}
	connect(t, r.path, ipc.Hello{Name: "b"}) // max_runs missing → 1
	eventually(t, "capacity 4", func() bool { return r.hub.Capacity() == 4 })
	connect(t, r.path, ipc.Hello{Name: "c", MaxRuns: 1 << 20}) // capped
	eventually(t, "capped capacity", func() bool { return r.hub.Capacity() == 4+hub.MaxRunsLimit })
}

func TestHandshakeRefusals(t *testing.T) {
	r := newRig(t, hub.Config{HandshakeTimeout: 100 * time.Millisecond})
	cases := []struct {
		name  string
		first func(a *rawAgent)
		code  string
	}{
		{"wrong protocol version", func(a *rawAgent) { a.send(ipc.TypeHello, 0, ipc.Hello{Protocol: 2, MaxRuns: 1}) }, ipc.CodeUnsupportedProtocol},
		{"first frame not HELLO", func(a *rawAgent) { a.send(ipc.TypeEvent, 1, `{"type":"x"}`) }, ipc.CodeProtocolError},
		{"HELLO on a run stream", func(a *rawAgent) { a.send(ipc.TypeHello, 7, ipc.Hello{Protocol: 1}) }, ipc.CodeProtocolError},
		{"HELLO without protocol", func(a *rawAgent) { a.send(ipc.TypeHello, 0, `{"name":"x","max_runs":1}`) }, ipc.CodeProtocolError},
		{"HELLO with bad field types", func(a *rawAgent) { a.send(ipc.TypeHello, 0, `{"protocol":"one"}`) }, ipc.CodeProtocolError},
		{"garbage header", func(a *rawAgent) { a.nc.Write([]byte("GET / HTTP/1.1\r\n\r\n")) }, ipc.CodeProtocolError},
		{"silence", func(a *rawAgent) {}, ipc.CodeHandshakeTimeout},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := dial(t, r.path)
			tc.first(a)
			got := findError(t, a.expectClosed())
			if got.Code != tc.code {
				t.Fatalf("ERROR code %q (%s), want %q", got.Code, got.Message, tc.code)
			}
		})
	}
	if r.hub.Capacity() != 0 || r.hub.Connections() != 0 {
		t.Fatalf("refused agents count: capacity %d, connections %d", r.hub.Capacity(), r.hub.Connections())
	}
}

func TestRunRoundTrip(t *testing.T) {
	var cps []engine.RunCheckpoint
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 2})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 2 })

	req := request("t1")
	req.Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	req.Context = engine.ThreadContext{Messages: []engine.MessageRecord{{MessageID: "m0", ThreadID: "t1", Seq: 1, Message: engine.Message{ID: "m0", Role: "user", Content: json.RawMessage(`"earlier"`)}}}, FirstSeq: 1, TotalMessages: 1}
	req.Checkpoint = func(ctx context.Context, c engine.RunCheckpoint) error {
		cps = append(cps, c)
		return nil
	}
	rc := startRun(r.hub, context.Background(), req)
	f := a.expect(ipc.TypeRun, 1)
	run := decodeRun(t, f)
	if run.DispatchID != "d-t1" || run.RunID != "r-t1" || run.ThreadID != "t1" || run.SessionID != "s-t1" || run.Attempt != 1 || run.AgentID != "default" {
		t.Fatalf("RUN ids = %+v", run)
	}
	if run.Request.Origin != "user" || run.Request.RunMode != "resume" || run.Request.Traceparent != req.Traceparent {
		t.Fatalf("RUN request = %+v", run.Request)
	}
	if len(run.Request.Messages) != 1 || string(run.Request.Messages[0].Content) != `"hi"` {
		t.Fatalf("RUN messages = %+v", run.Request.Messages)
	}
	if len(run.Context.Messages) != 1 || run.Context.Messages[0].MessageID != "m0" || run.Context.TotalMessages != 1 {
		t.Fatalf("RUN context = %+v", run.Context)
	}

	events := []string{`{"type":"run_start"}`, `{ "type" : "text_delta", "delta":"h\u00e9", "x":[1,2,{"y":null}] }`, `{"type":"run_finish"}`}
	a.send(ipc.TypeEvent, 1, events[0])
	a.send(ipc.TypeEvent, 1, events[1])
	a.send(ipc.TypeCheckpoint, 1, `{"seq":7,"messages":[{"role":"assistant","content":"echo"}],"run":{"steps":2}}`)
	ack := a.expect(ipc.TypeCheckpointAck, 1)
	if string(ack.Payload) != `{"seq":7}` {
		t.Fatalf("CHECKPOINT_ACK %s", ack.Payload)
	}
	a.send(ipc.TypeEvent, 1, events[2])
	a.send(ipc.TypeFinish, 1, finishDone("echo"))
	o := rc.wait(t)
	if o.Kind != engine.OutcomeCompleted || o.Status != engine.RunDone || o.Response != "echo" || o.Termination == nil || o.Termination.Type != engine.TermNaturalEnd {
		t.Fatalf("outcome %+v", o)
	}
	if got := rc.sink.got(); strings.Join(got, "\n") != strings.Join(events, "\n") {
		t.Fatalf("events forwarded %q, want byte-for-byte %q", got, events)
	}
	if len(cps) != 1 || len(cps[0].Messages) != 1 || cps[0].Messages[0].Role != "assistant" || cps[0].Run == nil || *cps[0].Run.Steps != 2 {
		t.Fatalf("checkpoints %+v", cps)
	}
}

func TestFinishMapsToOutcomes(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	cases := []struct {
		finish string
		want   engine.RunOutcome
	}{
		{`{"status":"done"}`, engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: "natural_end"}}},
		{`{"status":"waiting","waiting":{"reason":"tool"}}`, engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunWaiting, Termination: &engine.Termination{Type: "suspended"}, Waiting: &engine.RunWaitingState{Reason: "tool"}}},
		{`{"status":"done","termination":{"type":"cancelled"}}`, engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: "cancelled"}}},
		{`{"error":{"kind":"transient","code":"llm","message":"rate limited"}}`, engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: "llm", Error: "rate limited"}},
		{`{"error":{"kind":"permanent","code":"agent_not_found"}}`, engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "agent_not_found", Error: "agent_not_found"}},
		{`{"error":{"kind":"weird","message":"m"}}`, engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "m"}},
	}
	for i, tc := range cases {
		rc := startRun(r.hub, context.Background(), request(fmt.Sprint("t", i)))
		f := a.expect(ipc.TypeRun, uint64(i+1))
		a.send(ipc.TypeFinish, f.Stream, tc.finish)
		o := rc.wait(t)
		gotJ, _ := json.Marshal(o)
		wantJ, _ := json.Marshal(tc.want)
		if string(gotJ) != string(wantJ) {
			t.Errorf("FINISH %s → %s, want %s", tc.finish, gotJ, wantJ)
		}
	}
}

func TestCheckpointFailureAnswersErrorWithSeq(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	// Each store failure is answered with its seq and, as its reason, the
	// client API's code of the error: the agent tells a checkpoint worth
	// resending (unavailable) from one that fails again as sent.
	cases := []struct {
		err    error
		reason string
	}{
		{fmt.Errorf("append: %w: disk full", engine.ErrUnavailable), ipc.ReasonUnavailable},
		{fmt.Errorf("append: message m1: %w", engine.ErrAlreadyExists), ipc.ReasonAlreadyExists},
		{fmt.Errorf("append: %w", context.DeadlineExceeded), ipc.ReasonUnavailable},
		{fmt.Errorf("append: %w: 5 MiB", engine.ErrTooLarge), "too_large"},
		{&engine.ConflictError{What: "message_count", Expected: 4, Actual: 5}, ipc.ReasonConflict},
		{errors.New("append: something odd"), ipc.ReasonInternal},
	}
	for i, tc := range cases {
		req := request(fmt.Sprint("t", i))
		req.Checkpoint = func(context.Context, engine.RunCheckpoint) error { return tc.err }
		rc := startRun(r.hub, context.Background(), req)
		stream := uint64(i + 1)
		a.expect(ipc.TypeRun, stream)
		a.send(ipc.TypeCheckpoint, stream, `{"seq":3,"messages":[{"role":"assistant","content":"x"}]}`)
		s := status(t, a.expect(ipc.TypeError, stream))
		if s.Code != ipc.CodeCheckpointFailed || s.Seq == nil || *s.Seq != 3 || !strings.Contains(s.Message, tc.err.Error()) || s.Reason != tc.reason {
			t.Fatalf("checkpoint error for %v: %+v, want reason %s", tc.err, s, tc.reason)
		}
		a.send(ipc.TypeFinish, stream, finishDone(""))
		if o := rc.wait(t); o.Kind != engine.OutcomeCompleted {
			t.Fatalf("outcome %+v", o)
		}
	}
}

func TestCheckpointsAndFinishApplyInOrder(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	var mu sync.Mutex
	var seqs []string
	req := request("t1")
	req.Checkpoint = func(ctx context.Context, c engine.RunCheckpoint) error {
		time.Sleep(time.Millisecond) // a slow disk: the FINISH must still wait
		mu.Lock()
		seqs = append(seqs, c.Messages[0].ID)
		mu.Unlock()
		return nil
	}
	rc := startRun(r.hub, context.Background(), req)
	a.expect(ipc.TypeRun, 1)
	const n = 40 // more than the stream's control buffer
	for i := range n {
		a.send(ipc.TypeCheckpoint, 1, fmt.Sprintf(`{"seq":%d,"messages":[{"id":"m%d","role":"assistant"}]}`, i, i))
	}
	a.send(ipc.TypeFinish, 1, finishDone(""))
	for i := range n {
		f := a.expect(ipc.TypeCheckpointAck, 1)
		if want := fmt.Sprintf(`{"seq":%d}`, i); string(f.Payload) != want {
			t.Fatalf("ack %d = %s", i, f.Payload)
		}
	}
	rc.wait(t)
	mu.Lock()
	defer mu.Unlock()
	if len(seqs) != n || seqs[0] != "m0" || seqs[n-1] != fmt.Sprintf("m%d", n-1) {
		t.Fatalf("checkpoints applied %v", seqs)
	}
}

func TestSecondFinishAndUnknownStreamsAreRejectedNotFatal(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	rc := startRun(r.hub, context.Background(), request("t1"))
	a.expect(ipc.TypeRun, 1)
	a.send(ipc.TypeFinish, 1, finishDone("first"))
	a.send(ipc.TypeFinish, 1, finishDone("second"))
	if s := status(t, a.expect(ipc.TypeError, 1)); s.Code != ipc.CodeUnknownStream {
		t.Fatalf("second FINISH answered %+v", s)
	}
	if o := rc.wait(t); o.Response != "first" {
		t.Fatalf("outcome %+v, want the first FINISH", o)
	}
	for _, typ := range []ipc.FrameType{ipc.TypeEvent, ipc.TypeCheckpoint, ipc.TypeCommandAck} {
		a.send(typ, 99, `{"type":"x","seq":1,"cmd":"1"}`)
		if s := status(t, a.expect(ipc.TypeError, 99)); s.Code != ipc.CodeUnknownStream {
			t.Fatalf("%s on unknown stream answered %+v", typ, s)
		}
	}
	// The connection still works.
	rc = startRun(r.hub, context.Background(), request("t2"))
	a.expect(ipc.TypeRun, 2)
	a.send(ipc.TypeFinish, 2, finishDone("ok"))
	if o := rc.wait(t); o.Kind != engine.OutcomeCompleted || o.Response != "ok" {
		t.Fatalf("run after rejections: %+v", o)
	}
}

func TestAgentDisconnectMidRunFailsItTransient(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 2 })
	rc1 := startRun(r.hub, context.Background(), request("t1"))
	rc2 := startRun(r.hub, context.Background(), request("t2"))
	a.expect(ipc.TypeRun, 1)
	a.expect(ipc.TypeRun, 2)
	a.send(ipc.TypeEvent, 1, `{"type":"run_start"}`)
	a.nc.Close()
	for _, rc := range []*runCall{rc1, rc2} {
		o := rc.wait(t)
		if o.Kind != engine.OutcomeTransient || o.ErrorCode != "agent_lost" {
			t.Fatalf("outcome %+v, want transient agent_lost", o)
		}
	}
	eventually(t, "capacity 0", func() bool { return r.hub.Capacity() == 0 && r.hub.Connections() == 0 })
}

func TestFinishSentJustBeforeDisconnectCounts(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	rc := startRun(r.hub, context.Background(), request("t1"))
	a.expect(ipc.TypeRun, 1)
	a.send(ipc.TypeFinish, 1, finishDone("made it"))
	a.nc.Close()
	if o := rc.wait(t); o.Kind != engine.OutcomeCompleted || o.Response != "made it" {
		t.Fatalf("outcome %+v", o)
	}
}

func TestOversizedFrameClosesWithProtocolError(t *testing.T) {
	r := newRig(t, hub.Config{MaxFrame: 4096})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	rc := startRun(r.hub, context.Background(), request("t1"))
	a.expect(ipc.TypeRun, 1)
	var hdr [ipc.HeaderSize]byte
	ipc.Header{Length: 1 << 30, Type: ipc.TypeEvent, Stream: 1}.Encode(&hdr)
	a.nc.Write(hdr[:]) // no payload follows: the header alone is refused
	s := findError(t, a.expectClosed())
	if s.Code != ipc.CodeProtocolError || !strings.Contains(s.Message, "too large") {
		t.Fatalf("ERROR %+v", s)
	}
	if o := rc.wait(t); o.Kind != engine.OutcomeTransient {
		t.Fatalf("run on the closed connection: %+v, want transient (retried)", o)
	}
}

func TestProtocolViolationsClose(t *testing.T) {
	r := newRig(t, hub.Config{})
	cases := []struct {
		name string
		send func(a *rawAgent)
	}{
		{"second HELLO", func(a *rawAgent) { a.send(ipc.TypeHello, 0, ipc.Hello{Protocol: 1}) }},
		{"sidecar-only frame type", func(a *rawAgent) { a.send(ipc.TypeRun, 5, `{}`) }},
		{"EVENT on stream 0", func(a *rawAgent) { a.send(ipc.TypeEvent, 0, `{"type":"x"}`) }},
		{"SUBMIT on a run stream", func(a *rawAgent) { a.send(ipc.TypeSubmit, 3, `{"req":"1"}`) }},
		{"PING of 3 bytes", func(a *rawAgent) { a.send(ipc.TypePing, 0, []byte{1, 2, 3}) }},
		{"PONG of 3 bytes", func(a *rawAgent) { a.send(ipc.TypePong, 0, []byte{1, 2, 3}) }},
		{"empty PONG", func(a *rawAgent) { a.send(ipc.TypePong, 0, []byte{}) }},
		{"EVENT not JSON", func(a *rawAgent) { a.send(ipc.TypeEvent, 1, `{"type":`) }},
		{"unknown frame type", func(a *rawAgent) {
			var h [ipc.HeaderSize]byte
			ipc.Header{Type: ipc.TypeEvent}.Encode(&h)
			h[4] = 0x7f
			a.nc.Write(h[:])
		}},
		{"reserved bits", func(a *rawAgent) {
			var h [ipc.HeaderSize]byte
			ipc.Header{Type: ipc.TypePong}.Encode(&h)
			h[6] = 1
			a.nc.Write(h[:])
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
			tc.send(a)
			if s := findError(t, a.expectClosed()); s.Code != ipc.CodeProtocolError {
				t.Fatalf("ERROR %+v", s)
			}
		})
	}
	t.Run("malformed FINISH fails the run transient", func(t *testing.T) {
		a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
		eventually(t, "agent", func() bool { return r.hub.Capacity() >= 1 })
		rc := startRun(r.hub, context.Background(), request("t1"))
		f := a.expect(ipc.TypeRun, 1)
		a.send(ipc.TypeFinish, f.Stream, `{"status":"exploded"}`)
		if s := findError(t, a.expectClosed()); s.Code != ipc.CodeProtocolError {
			t.Fatalf("ERROR %+v", s)
		}
		if o := rc.wait(t); o.Kind != engine.OutcomeTransient {
			t.Fatalf("outcome %+v", o)
		}
	})
}

func TestLiveCommandsAckRefuseAndTimeout(t *testing.T) {
	r := newRig(t, hub.Config{CommandTimeout: 100 * time.Millisecond})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	cmds := make(chan engine.Command)
	req := request("t1")
	req.Commands = cmds
	rc := startRun(r.hub, context.Background(), req)
	a.expect(ipc.TypeRun, 1)

	send := func(c engine.Command) chan error {
		ch := make(chan error, 1)
		c.Reply = ch
		cmds <- c
		return ch
	}
	// Accepted.
	reply := send(engine.Command{Kind: engine.CommandMessages, Messages: []engine.MessageRecord{{MessageID: "m9", Seq: 9, Message: engine.Message{ID: "m9", Role: "user"}}}})
	f := a.expect(ipc.TypeMessages, 1)
	var cmd ipc.Command
	json.Unmarshal(f.Payload, &cmd)
	var recs []engine.MessageRecord
	if err := json.Unmarshal(cmd.Messages, &recs); err != nil || len(recs) != 1 || recs[0].Seq != 9 {
		t.Fatalf("MESSAGES %s", f.Payload)
	}
	a.send(ipc.TypeCommandAck, 1, ipc.CommandAck{Cmd: cmd.Cmd, Accepted: true})
	if err := <-reply; err != nil {
		t.Fatalf("accepted command replied %v", err)
	}
	// Refused.
	reply = send(engine.Command{Kind: engine.CommandDecision, Decisions: []engine.Decision{{CallID: "c1", Resume: json.RawMessage(`{"ok":true}`)}}})
	f = a.expect(ipc.TypeDecision, 1)
	json.Unmarshal(f.Payload, &cmd)
	if !strings.Contains(string(cmd.Decisions), `"call_id":"c1"`) {
		t.Fatalf("DECISION %s", f.Payload)
	}
	a.send(ipc.TypeCommandAck, 1, ipc.CommandAck{Cmd: cmd.Cmd, Accepted: false, Reason: "no such call"})
	if err := <-reply; !errors.Is(err, hub.ErrCommandRefused) || !strings.Contains(err.Error(), "no such call") {
		t.Fatalf("refused command replied %v", err)
	}
	// Never acknowledged: not delivered, within the timeout.
	start := time.Now()
	reply = send(engine.Command{Kind: engine.CommandMessages})
	f = a.expect(ipc.TypeMessages, 1)
	if err := <-reply; !errors.Is(err, hub.ErrCommandTimeout) {
		t.Fatalf("unacknowledged command replied %v", err)
	}
	if time.Since(start) > 3*time.Second {
		t.Fatalf("timeout took %v", time.Since(start))
	}
	// Its ack was due by half the timeout (ack_by).
	cmd = ipc.Command{}
	json.Unmarshal(f.Payload, &cmd)
	if due := time.UnixMilli(cmd.AckBy); due.Before(start) || due.After(start.Add(100*time.Millisecond)) {
		t.Fatalf("ack_by %d (%v after the send), want within the timeout", cmd.AckBy, due.Sub(start))
	}
	// A late ack changes nothing, but one that accepted is counted: the
	// agent may act on a command that fell back.
	a.send(ipc.TypeCommandAck, 1, ipc.CommandAck{Cmd: cmd.Cmd, Accepted: true})
	eventually(t, "the late ack counted", func() bool {
		var m bytes.Buffer
		r.hub.Metrics().WritePrometheus(&m)
		return strings.Contains(m.String(), `mailbox_agent_commands_late_total 1`)
	})
	// A command pending when the run ends is answered.
	reply = send(engine.Command{Kind: engine.CommandMessages})
	a.expect(ipc.TypeMessages, 1)
	a.send(ipc.TypeFinish, 1, finishDone(""))
	rc.wait(t)
	if err := <-reply; !errors.Is(err, hub.ErrRunEnded) {
		t.Fatalf("pending command at the end replied %v", err)
	}
}

func TestCancelSendsCancelAndWaitsForFinish(t *testing.T) {
	r := newRig(t, hub.Config{CancelGrace: 200 * time.Millisecond})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 2 })

	ctx, cancel := context.WithCancel(context.Background())
	rc := startRun(r.hub, ctx, request("t1"))
	a.expect(ipc.TypeRun, 1)
	cancel()
	f := a.expect(ipc.TypeCancel, 1)
	var cmd ipc.Command
	if err := json.Unmarshal(f.Payload, &cmd); err != nil || cmd.Cmd == "" {
		t.Fatalf("CANCEL %s", f.Payload)
	}
	a.send(ipc.TypeCommandAck, 1, ipc.CommandAck{Cmd: cmd.Cmd, Accepted: true})
	a.send(ipc.TypeEvent, 1, `{"type":"run_finish"}`)
	a.send(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"cancelled"}}`)
	o := rc.wait(t)
	if o.Kind != engine.OutcomeCompleted || o.Termination.Type != "cancelled" {
		t.Fatalf("outcome %+v", o)
	}
	if got := rc.sink.got(); len(got) != 1 {
		t.Fatalf("events after cancel: %q", got)
	}

	// An agent that ignores CANCEL: past the grace the run is still held
	// (the agent runs it); a drain gives it up.
	ctx, cancel = context.WithCancel(context.Background())
	rc = startRun(r.hub, ctx, request("t2"))
	a.expect(ipc.TypeRun, 2)
	cancel()
	a.expect(ipc.TypeCancel, 2)
	select {
	case o := <-rc.out:
		t.Fatalf("the run ended %+v while the agent still runs it", o)
	case <-time.After(600 * time.Millisecond): // three graces
	}
	r.hub.GoAway("shutdown", "test")
	a.expect(ipc.TypeGoAway, 0)
	if o := rc.wait(t); o.Kind != engine.OutcomeTransient || o.ErrorCode != "cancel_timeout" {
		t.Fatalf("outcome %+v", o)
	}
	var m strings.Builder
	r.hub.Metrics().WritePrometheus(&m)
	if !strings.Contains(m.String(), "mailbox_agent_cancel_overdue_total 1") {
		t.Fatalf("overdue cancel not counted:\n%s", m.String())
	}
	// Its late frames are rejected.
	a.send(ipc.TypeEvent, 2, `{"type":"late"}`)
	if s := status(t, a.expect(ipc.TypeError, 2)); s.Code != ipc.CodeUnknownStream {
		t.Fatalf("late event answered %+v", s)
	}
	if got := rc.sink.got(); len(got) != 0 {
		t.Fatalf("late event reached the sink: %q", got)
	}
}

func TestHeartbeats(t *testing.T) {
	r := newRig(t, hub.Config{Heartbeat: 50 * time.Millisecond})
	t.Run("hub pings an idle agent and answers pings", func(t *testing.T) {
		a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
		f, err := a.readErr(time.Second)
		if err != nil || f.Type != ipc.TypePing || len(f.Payload) != ipc.PingSize {
			t.Fatalf("idle hub sent %v %v", f, err)
		}
		var p [8]byte
		binary.BigEndian.PutUint64(p[:], 0xfeedface)
		a.send(ipc.TypePing, 0, p[:])
		deadline := time.Now().Add(5 * time.Second)
		for {
			f, err := a.readErr(time.Until(deadline))
			if err != nil {
				t.Fatalf("no PONG: %v", err)
			}
			if f.Type == ipc.TypePing {
				a.send(ipc.TypePong, 0, f.Payload)
				continue
			}
			if f.Type != ipc.TypePong || string(f.Payload) != string(p[:]) {
				t.Fatalf("got %s %v, want PONG %v", f.Type, f.Payload, p)
			}
			break
		}
		// Answering its pings keeps the connection up well past 3 beats.
		until := time.Now().Add(300 * time.Millisecond)
		for time.Now().Before(until) {
			f, err := a.readErr(time.Second)
			if err != nil || f.Type == ipc.TypeError {
				t.Fatalf("connection of a live agent closed: %v %s", err, f.Payload)
			}
			if f.Type == ipc.TypePing {
				a.send(ipc.TypePong, 0, f.Payload)
			}
		}
	})
	t.Run("silent agent is closed and its runs fail transient", func(t *testing.T) {
		// The silence is counted from the handshake: time it from before
		// the connection (timed from after it, the three beats could
		// look shorter than they are: a flaky failure in CI).
		start := time.Now()
		a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
		eventually(t, "agent", func() bool { return r.hub.Capacity() >= 1 })
		rc := startRun(r.hub, context.Background(), request("t1"))
		// Read without answering anything: the agent is silent.
		var seen []frame
		for {
			f, err := a.readErr(2 * time.Second)
			if err != nil {
				break
			}
			seen = append(seen, f)
		}
		if s := findError(t, seen); s.Code != ipc.CodeHeartbeatTimeout {
			t.Fatalf("ERROR %+v", s)
		}
		o := rc.wait(t)
		if o.Kind != engine.OutcomeTransient || o.ErrorCode != "agent_lost" {
			t.Fatalf("outcome %+v", o)
		}
		if d := time.Since(start); d < 150*time.Millisecond {
			t.Fatalf("declared dead after %v, before 3 heartbeats", d)
		}
	})
}

func TestPingAnsweredWithSamePayload(t *testing.T) {
	r := newRig(t, hub.Config{Heartbeat: time.Hour})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	p := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	a.send(ipc.TypePing, 0, p)
	f, err := a.readErr(5 * time.Second)
	if err != nil || f.Type != ipc.TypePong {
		t.Fatalf("PING answered %v %v", f, err)
	}
	if string(f.Payload) != string(p) {
		t.Fatalf("PONG %v, want %v", f.Payload, p)
	}
}

func TestGoAway(t *testing.T) {
	r := newRig(t, hub.Config{AgentWait: 100 * time.Millisecond})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 2 })
	rc := startRun(r.hub, context.Background(), request("t1"))
	a.expect(ipc.TypeRun, 1)

	// Agent GOAWAY: no new runs; the running one finishes. The capacity
	// is the run it still holds until then.
	a.send(ipc.TypeGoAway, 0, ipc.Status{Code: "shutdown"})
	eventually(t, "capacity 1: the held run", func() bool { return r.hub.Capacity() == 1 })
	rc2 := startRun(r.hub, context.Background(), request("t2"))
	if o := rc2.wait(t); o.Kind != engine.OutcomeAbandoned {
		t.Fatalf("run with only a draining agent: %+v, want abandoned (back to the queue)", o)
	}
	a.send(ipc.TypeFinish, 1, finishDone("done"))
	if o := rc.wait(t); o.Kind != engine.OutcomeCompleted {
		t.Fatalf("running run after agent GOAWAY: %+v", o)
	}
	eventually(t, "capacity 0", func() bool { return r.hub.Capacity() == 0 })

	// Hub GOAWAY reaches agents connected now and later.
	b, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "capacity 1", func() bool { return r.hub.Capacity() == 1 })
	r.hub.GoAway(ipc.CodeShutdown, "draining")
	if s := status(t, b.expect(ipc.TypeGoAway, 0)); s.Code != ipc.CodeShutdown {
		t.Fatalf("GOAWAY %+v", s)
	}
	if r.hub.Capacity() != 0 {
		t.Fatalf("capacity after GoAway %d", r.hub.Capacity())
	}
	c, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	c.expect(ipc.TypeGoAway, 0)
	if r.hub.Capacity() != 0 {
		t.Fatalf("capacity after a late agent joined a draining hub: %d", r.hub.Capacity())
	}
}

func TestRunsSpreadOverConnectionsWithinMaxRuns(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 1})
	b, _ := connect(t, r.path, ipc.Hello{Name: "b", MaxRuns: 2})
	eventually(t, "agents", func() bool { return r.hub.Capacity() == 3 })
	var rcs []*runCall
	for i := range 3 {
		rcs = append(rcs, startRun(r.hub, context.Background(), request(fmt.Sprint("t", i))))
	}
	fa := a.expect(ipc.TypeRun, 1)
	fb1 := b.expect(ipc.TypeRun, 1)
	fb2 := b.expect(ipc.TypeRun, 2)
	// A fourth waits for a free slot, then takes the first one freed.
	rc4 := startRun(r.hub, context.Background(), request("t4"))
	time.Sleep(20 * time.Millisecond)
	a.send(ipc.TypeFinish, fa.Stream, finishDone("a"))
	f4 := a.expect(ipc.TypeRun, 2)
	if decodeRun(t, f4).ThreadID != "t4" {
		t.Fatalf("freed slot got %s", f4.Payload)
	}
	b.send(ipc.TypeFinish, fb1.Stream, finishDone("b1"))
	b.send(ipc.TypeFinish, fb2.Stream, finishDone("b2"))
	a.send(ipc.TypeFinish, f4.Stream, finishDone("a2"))
	for _, rc := range append(rcs, rc4) {
		if o := rc.wait(t); o.Kind != engine.OutcomeCompleted {
			t.Fatalf("outcome %+v", o)
		}
	}
}

func TestAgentIDRouting(t *testing.T) {
	r := newRig(t, hub.Config{AgentWait: time.Minute})
	a, _ := connect(t, r.path, ipc.Hello{AgentIDs: []string{"writer"}, MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	// Nobody serves it: back to the queue at once, without spending an
	// attempt (rc.wait gives up long before AgentWait).
	req := request("t1")
	req.AgentID = "reviewer"
	if o := startRun(r.hub, context.Background(), req).wait(t); o.Kind != engine.OutcomeAbandoned || o.ErrorCode != engine.CodeAgentUnavailable {
		t.Fatalf("run for an agent nobody serves: %+v, want abandoned, %s", o, engine.CodeAgentUnavailable)
	}
	req = request("t2")
	req.AgentID = "writer"
	rc := startRun(r.hub, context.Background(), req)
	f := a.expect(ipc.TypeRun, 1)
	if decodeRun(t, f).AgentID != "writer" {
		t.Fatalf("RUN %s", f.Payload)
	}
	a.send(ipc.TypeFinish, 1, finishDone(""))
	rc.wait(t)
}

// A run whose agents stay full for AgentWait goes back to the queue
// without spending an attempt: the engine counts the slots of every
// agent id together, so the miss is the sidecar's, not the run's.
func TestARunWhoseAgentsStayFullIsAbandoned(t *testing.T) {
	r := newRig(t, hub.Config{AgentWait: 100 * time.Millisecond})
	a, _ := connect(t, r.path, ipc.Hello{AgentIDs: []string{"writer"}, MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	busy := request("t1")
	busy.AgentID = "writer"
	rc := startRun(r.hub, context.Background(), busy)
	a.expect(ipc.TypeRun, 1)
	req := request("t2")
	req.AgentID = "writer"
	if o := startRun(r.hub, context.Background(), req).wait(t); o.Kind != engine.OutcomeAbandoned || o.ErrorCode != engine.CodeAgentBusy {
		t.Fatalf("run while its agent stays full: %+v, want abandoned, %s", o, engine.CodeAgentBusy)
	}
	a.send(ipc.TypeFinish, 1, finishDone(""))
	rc.wait(t)
}

func TestRunWaitsForAnAgentToConnect(t *testing.T) {
	r := newRig(t, hub.Config{})
	rc := startRun(r.hub, context.Background(), request("t1"))
	time.Sleep(20 * time.Millisecond)
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	a.expect(ipc.TypeRun, 1)
	a.send(ipc.TypeFinish, 1, finishDone("late agent"))
	if o := rc.wait(t); o.Response != "late agent" {
		t.Fatalf("outcome %+v", o)
	}
	// No agent within AgentWait: abandoned, not failed.
	r2 := newRig(t, hub.Config{AgentWait: 50 * time.Millisecond})
	if o := startRun(r2.hub, context.Background(), request("t2")).wait(t); o.Kind != engine.OutcomeAbandoned {
		t.Fatalf("outcome without agents %+v", o)
	}
}

type submitter struct {
	mu   sync.Mutex
	reqs []engine.SubmitRequest
	err  error
}

func (s *submitter) SubmitBackground(ctx context.Context, req engine.SubmitRequest) (engine.SubmitResult, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reqs = append(s.reqs, req)
	if s.err != nil {
		return engine.SubmitResult{}, s.err
	}
	return engine.SubmitResult{DispatchID: "d1", RunID: "r1", ThreadID: req.ThreadID, Status: "queued"}, nil
}

func TestSubmitFromAgent(t *testing.T) {
	sub := &submitter{}
	r := newRig(t, hub.Config{Submitter: sub})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	a.send(ipc.TypeSubmit, 0, `{"req":"q1","thread_id":"t9","messages":[{"role":"user","content":"wake"}],"run_mode":"internal_wake"}`)
	var res ipc.SubmitResult
	json.Unmarshal(a.expect(ipc.TypeSubmitResult, 0).Payload, &res)
	if res.Req != "q1" || res.DispatchID != "d1" || res.RunID != "r1" || res.ThreadID != "t9" || res.Status != "queued" || res.Error != nil {
		t.Fatalf("SUBMIT_RESULT %+v", res)
	}
	if len(sub.reqs) != 1 || sub.reqs[0].ThreadID != "t9" || sub.reqs[0].RunMode != "internal_wake" || string(sub.reqs[0].Messages[0].Content) != `"wake"` {
		t.Fatalf("submitted %+v", sub.reqs)
	}
	sub.mu.Lock()
	sub.err = engine.Validationf("messages: empty")
	sub.mu.Unlock()
	a.send(ipc.TypeSubmit, 0, `{"req":"q2","thread_id":"t9"}`)
	json.Unmarshal(a.expect(ipc.TypeSubmitResult, 0).Payload, &res)
	if res.Req != "q2" || res.Error == nil || res.Error.Code != engine.Code(engine.ErrValidation) {
		t.Fatalf("SUBMIT_RESULT on error %+v", res)
	}
	a.send(ipc.TypeSubmit, 0, `{"req":"q3","messages":"not a list"}`)
	json.Unmarshal(a.expect(ipc.TypeSubmitResult, 0).Payload, &res)
	if res.Req != "q3" || res.Error == nil || res.Error.Code != "validation" {
		t.Fatalf("SUBMIT_RESULT on bad request %+v", res)
	}
	// Ids a client could not put in a path of the HTTP API are refused,
	// as the API refuses them (found by review: a thread "bad/id" was
	// made, which no client could read).
	for _, body := range []string{
		`{"req":"q5","thread_id":"bad/id","messages":[{"role":"user","content":"x"}]}`,
		`{"req":"q5","thread_id":"t9","parent_thread_id":"a b","messages":[{"role":"user","content":"x"}]}`,
		`{"req":"q5","thread_id":"t9","run_id":"r%41","messages":[{"role":"user","content":"x"}]}`,
	} {
		a.send(ipc.TypeSubmit, 0, body)
		res = ipc.SubmitResult{}
		json.Unmarshal(a.expect(ipc.TypeSubmitResult, 0).Payload, &res)
		if res.Req != "q5" || res.Error == nil || res.Error.Code != "validation" || !strings.Contains(res.Error.Message, "[A-Za-z0-9._:-]") {
			t.Fatalf("SUBMIT %s answered %+v, want a validation error", body, res)
		}
	}
	sub.mu.Lock()
	n := len(sub.reqs)
	sub.mu.Unlock()
	if n != 2 {
		t.Fatalf("%d SUBMITs reached the engine, want 2 (the bad ids must not)", n)
	}

	r2 := newRig(t, hub.Config{})
	b, _ := connect(t, r2.path, ipc.Hello{MaxRuns: 1})
	b.send(ipc.TypeSubmit, 0, `{"req":"q4","thread_id":"t"}`)
	json.Unmarshal(b.expect(ipc.TypeSubmitResult, 0).Payload, &res)
	if res.Req != "q4" || res.Error == nil || res.Error.Code != "unsupported" {
		t.Fatalf("SUBMIT_RESULT without a submitter %+v", res)
	}
}

func TestCloseEndsConnectionsAndRuns(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	rc := startRun(r.hub, context.Background(), request("t1"))
	a.expect(ipc.TypeRun, 1)
	half := dial(t, r.path) // mid-handshake: Close must not wait for it
	_ = half
	start := time.Now()
	r.close()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %v", d)
	}
	if o := rc.wait(t); o.Kind != engine.OutcomeTransient {
		t.Fatalf("run at Close %+v", o)
	}
	if s := findError(t, a.expectClosed()); s.Code != ipc.CodeShutdown {
		t.Fatalf("ERROR at close %+v", s)
	}
}

func TestRunCancelledBeforeItStartsSendsNoRun(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if o := startRun(r.hub, ctx, request("t1")).wait(t); o.Kind != engine.OutcomeAbandoned {
		t.Fatalf("outcome %+v", o)
	}
	// The next frame the agent sees is the next run's RUN on stream 1.
	rc := startRun(r.hub, context.Background(), request("t2"))
	if f := a.expect(ipc.TypeRun, 1); decodeRun(t, f).ThreadID != "t2" {
		t.Fatalf("RUN %s", f.Payload)
	}
	a.send(ipc.TypeFinish, 1, finishDone(""))
	rc.wait(t)
}

// Stream ids of RUN frames increase on a connection (docs/protocol.md),
// also when many runs start at once: the id is taken and the RUN written
// under one lock, or a faster writer would overtake a lower id.
func TestConcurrentRunsArriveInStreamOrder(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 64})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 64 })
	var rcs []*runCall
	for round := range 30 {
		start := make(chan struct{})
		calls := make(chan *runCall, 64)
		var wg sync.WaitGroup
		for i := range 64 {
			wg.Go(func() {
				<-start
				calls <- startRun(r.hub, context.Background(), request(fmt.Sprintf("r%d-t%d", round, i)))
			})
		}
		close(start)
		wg.Wait()
		close(calls)
		for rc := range calls {
			rcs = append(rcs, rc)
		}
		last := uint64(0)
		var streams []uint64
		for range 64 {
			f := a.read()
			if f.Type != ipc.TypeRun || f.Stream <= last {
				t.Fatalf("round %d: %s on stream %d after stream %d: stream ids must increase", round, f.Type, f.Stream, last)
			}
			last = f.Stream
			streams = append(streams, f.Stream)
		}
		for _, s := range streams {
			a.send(ipc.TypeFinish, s, finishDone("ok"))
		}
		for _, rc := range rcs {
			if o := rc.wait(t); o.Kind != engine.OutcomeCompleted {
				t.Fatalf("outcome %+v", o)
			}
		}
		rcs = nil
	}
}

// mailbox_agent_free_slots is the agents' capacity less the runs they
// hold: a backlog that does not drain beside free slots shows on a
// dashboard (the hub had capacity and connections, no free slots).
func TestFreeSlotsAreAMetric(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
	freeSlots := func() string {
		var m strings.Builder
		r.hub.Metrics().WritePrometheus(&m)
		for _, line := range strings.Split(m.String(), "\n") {
			if v, ok := strings.CutPrefix(line, "mailbox_agent_free_slots "); ok {
				return v
			}
		}
		return ""
	}
	eventually(t, "two free slots", func() bool { return freeSlots() == "2" })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rc := startRun(r.hub, ctx, request("t1"))
	a.expect(ipc.TypeRun, 1)
	if got := freeSlots(); got != "1" {
		t.Fatalf("free slots with a run held: %q, want 1", got)
	}
	a.send(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"}}`)
	rc.wait(t)
	eventually(t, "two free slots again", func() bool { return freeSlots() == "2" })
}

// After an agent's GOAWAY the runs it still holds stay in the hub's
// Capacity until they end: the engine counts them in flight, and counting
// nothing for them took as many slots from an agent started to replace it
// (found by review: the new agent got 3 runs of its 5 until every old run
// ended, up to the length of a suspended run).
func TestAnAgentGoingAwayKeepsItsHeldRunsInTheCapacity(t *testing.T) {
	r := newRig(t, hub.Config{})
	old, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
	eventually(t, "the old agent's capacity", func() bool { return r.hub.Capacity() == 2 })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rc1 := startRun(r.hub, ctx, request("t1"))
	old.expect(ipc.TypeRun, 1)
	rc2 := startRun(r.hub, ctx, request("t2"))
	old.expect(ipc.TypeRun, 2)
	old.send(ipc.TypeGoAway, 0, `{"code":"restart","message":"replaced"}`)
	connect(t, r.path, ipc.Hello{MaxRuns: 5})
	eventually(t, "the new agent's capacity beside the held runs", func() bool { return r.hub.Capacity() == 7 })
	select { // the signals of the new agent's coming
	case <-r.hub.CapacityChanged():
	default:
	}
	old.send(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"}}`)
	rc1.wait(t)
	eventually(t, "one held run fewer", func() bool { return r.hub.Capacity() == 6 })
	// A capacity that only shrank is not signalled: the signal ends the
	// engine's holds of threads set aside for lack of an agent, and each
	// held run's end had them all claimed and refused again (found by
	// review).
	select {
	case <-r.hub.CapacityChanged():
		t.Fatal("CapacityChanged signalled for a held run's end")
	default:
	}
	old.send(ipc.TypeFinish, 2, `{"status":"done","termination":{"type":"natural_end"}}`)
	rc2.wait(t)
	eventually(t, "the new agent's capacity alone", func() bool { return r.hub.Capacity() == 5 })
}

// HasFreeSlot answers for one agent id what FreeSlots lists: a connection
// serving it, taking runs, with a slot free.
func TestHasFreeSlotIsFreeSlotsForOneAgentID(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{AgentIDs: []string{"alpha"}, MaxRuns: 1})
	eventually(t, "the agent", func() bool { return r.hub.Capacity() == 1 })
	if !r.hub.HasFreeSlot("alpha") || r.hub.HasFreeSlot("beta") {
		t.Fatalf("free slot for alpha %v, for beta %v; want true, false", r.hub.HasFreeSlot("alpha"), r.hub.HasFreeSlot("beta"))
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req := request("t1")
	req.AgentID = "alpha"
	rc := startRun(r.hub, ctx, req)
	a.expect(ipc.TypeRun, 1)
	if r.hub.HasFreeSlot("alpha") {
		t.Fatal("a free slot for alpha while its one slot runs a run")
	}
	a.send(ipc.TypeFinish, 1, `{"status":"done","termination":{"type":"natural_end"}}`)
	rc.wait(t)
	eventually(t, "alpha's slot free again", func() bool { return r.hub.HasFreeSlot("alpha") })
	a.send(ipc.TypeGoAway, 0, `{"code":"restart"}`)
	eventually(t, "no slot after the agent's GOAWAY", func() bool { return !r.hub.HasFreeSlot("alpha") })
}

// A run an agent gives up because it is shutting down (after its GOAWAY,
// a transient failure with code shutdown) goes back to the queue without
// spending an attempt, as at the sidecar's own shutdown: in a pod the
// agent stops first, and every stop cost each long run an attempt (found
// by two reviews). Without a GOAWAY such an answer is a transient
// failure like any other.
func TestARunGivenUpByAnAgentShuttingDownSpendsNoAttempt(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
	eventually(t, "the agent", func() bool { return r.hub.Capacity() == 2 })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const shutdown = `{"status":"done","error":{"kind":"transient","code":"shutdown","message":"the agent shut down before the run finished"}}`
	rc1 := startRun(r.hub, ctx, request("t1"))
	a.expect(ipc.TypeRun, 1)
	a.send(ipc.TypeFinish, 1, shutdown)
	if o := rc1.wait(t); o.Kind != engine.OutcomeTransient || o.ErrorCode != ipc.CodeShutdown {
		t.Fatalf("shutdown without a GOAWAY: %+v, want a transient failure", o)
	}
	rc2 := startRun(r.hub, ctx, request("t2"))
	a.expect(ipc.TypeRun, 2)
	a.send(ipc.TypeGoAway, 0, `{"code":"shutdown","message":"agent shutting down"}`)
	a.send(ipc.TypeFinish, 2, shutdown)
	if o := rc2.wait(t); o.Kind != engine.OutcomeAbandoned || o.ErrorCode != hub.ErrorCodeAgentShutdown {
		t.Fatalf("shutdown after a GOAWAY: %+v, want abandoned, %s", o, hub.ErrorCodeAgentShutdown)
	}
}
