package hub_test

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// quietSink records, in order, the events emitted quietly ("q:<event>")
// and loudly ("e:<event>") and each wake of the readers ("wake").
type quietSink struct {
	mu  sync.Mutex
	ops []string
}

func (s *quietSink) add(op string) {
	s.mu.Lock()
	s.ops = append(s.ops, op)
	s.mu.Unlock()
}

func (s *quietSink) Emit(data []byte)      { s.add("e:" + string(data)) }
func (s *quietSink) EmitQuiet(data []byte) { s.add("q:" + string(data)) }
func (s *quietSink) WakeReaders()          { s.add("wake") }

func (s *quietSink) got() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.ops, " ")
}

var _ engine.QuietSink = (*quietSink)(nil)

// The hub emits a run's events quietly and wakes their readers once per
// read of the agent's socket, after the read's other frames; and it wakes
// them before it waits for more input, also when part of the next frame
// has arrived.
func TestEventReadersAreWokenOncePerRead(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	req := request("t1")
	req.Checkpoint = func(context.Context, engine.RunCheckpoint) error { return nil }
	s := &quietSink{}
	out := make(chan engine.RunOutcome, 1)
	go func() { out <- r.hub.Run(context.Background(), req, s) }()
	a.expect(ipc.TypeRun, 1)

	// Two events and a checkpoint in one write.
	var b []byte
	b = ipc.AppendFrame(b, ipc.TypeEvent, 0, 1, []byte(`{"type":"a"}`))
	b = ipc.AppendFrame(b, ipc.TypeEvent, 0, 1, []byte(`{"type":"b"}`))
	b = ipc.AppendFrame(b, ipc.TypeCheckpoint, 0, 1, []byte(`{"seq":1}`))
	if _, err := a.nc.Write(b); err != nil {
		t.Fatal(err)
	}
	a.expect(ipc.TypeCheckpointAck, 1)
	eventually(t, "the wake", func() bool { return strings.HasSuffix(s.got(), "wake") })
	if got, want := s.got(), `q:{"type":"a"} q:{"type":"b"} wake`; got != want {
		t.Fatalf("sink saw %q, want %q", got, want)
	}

	// An event, then the first bytes of the next: its readers are woken
	// while the hub waits for the rest.
	c := ipc.AppendFrame(nil, ipc.TypeEvent, 0, 1, []byte(`{"type":"c"}`))
	d := ipc.AppendFrame(nil, ipc.TypeEvent, 0, 1, []byte(`{"type":"d"}`))
	if _, err := a.nc.Write(append(c, d[:ipc.HeaderSize+2]...)); err != nil {
		t.Fatal(err)
	}
	want := `q:{"type":"a"} q:{"type":"b"} wake q:{"type":"c"} wake`
	eventually(t, "the wake of c", func() bool { return s.got() == want })
	if _, err := a.nc.Write(d[ipc.HeaderSize+2:]); err != nil {
		t.Fatal(err)
	}
	want += ` q:{"type":"d"} wake`
	eventually(t, "the wake of d", func() bool { return s.got() == want })

	a.send(ipc.TypeFinish, 1, finishDone("ok"))
	if o := <-out; o.Kind != engine.OutcomeCompleted {
		t.Fatalf("outcome %+v", o)
	}
}

// The hub goes on reading an agent that does not read: its PONGs, which
// the agent does not take, are written by another goroutine than the
// reader, so the agent's frames after a flood of PINGs still arrive. An
// agent whose reader waits to write to the sidecar (a COMMAND_ACK) while
// the sidecar's reader waits to write to it would otherwise hold both
// until a write deadline failed the connection.
func TestHubReadsAnAgentThatDoesNotRead(t *testing.T) {
	var flood []byte
	ping := make([]byte, ipc.PingSize)
	for range 20000 { // 480 KB of PINGs: their PONGs overfill the socket's buffer
		flood = ipc.AppendFrame(flood, ipc.TypePing, 0, 0, ping)
	}
	_, a, out := floodFromASilentAgent(t, flood)
	a.send(ipc.TypeFinish, 1, finishDone("ok"))
	// The agent reads again: the PONGs owed, and the FINISH's effect.
	go func() {
		for {
			if _, err := a.r.ReadFrame(); err != nil {
				return
			}
		}
	}()
	if o := <-out; o.Kind != engine.OutcomeCompleted {
		t.Fatalf("outcome %+v", o)
	}
}

// The same for the hub's answers to frames it refuses: a flood of EVENTs
// for a stream that is not open, from an agent that does not read, is
// answered by another goroutine than the reader, and the answers beyond
// those that can wait are dropped and counted, so that the agent's next
// frame for its open stream still arrives and the connection stays up.
func TestHubReadsAnAgentFloodingAClosedStreamThatDoesNotRead(t *testing.T) {
	var flood []byte
	for range 20000 { // each answered by an ERROR of about 70 bytes: 1.4 MB, more than the socket buffers
		flood = ipc.AppendFrame(flood, ipc.TypeEvent, 0, 7, []byte(`{}`))
	}
	r, a, out := floodFromASilentAgent(t, flood)
	var m strings.Builder
	r.hub.Metrics().WritePrometheus(&m)
	if !strings.Contains(m.String(), "mailbox_agent_unknown_stream_frames_total 20000") {
		t.Fatalf("unknown-stream frames not all counted:\n%s", m.String())
	}
	if strings.Contains(m.String(), "mailbox_agent_replies_dropped_total 0") {
		t.Fatalf("no answer dropped:\n%s", m.String())
	}
	a.send(ipc.TypeFinish, 1, finishDone("ok"))
	// The agent reads again: the answers that waited, then the run's end.
	answered := make(chan struct{})
	go func() {
		once := sync.OnceFunc(func() { close(answered) })
		for {
			f, err := a.r.ReadFrame()
			if err != nil {
				return
			}
			if f.Type == ipc.TypeError && f.Stream == 7 && strings.Contains(string(f.Payload), ipc.CodeUnknownStream) {
				once()
			}
		}
	}()
	if o := <-out; o.Kind != engine.OutcomeCompleted {
		t.Fatalf("outcome %+v", o)
	}
	<-answered
	eventually(t, "the connection still up", func() bool { return r.hub.Capacity() == 1 })
}

// floodFromASilentAgent starts a run on stream 1 of an agent that from
// then on reads nothing, has it write flood and then an EVENT for the
// run, and waits until the hub has read that EVENT.
func floodFromASilentAgent(t *testing.T, flood []byte) (*rig, *rawAgent, <-chan engine.RunOutcome) {
	t.Helper()
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", MaxRuns: 1})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 1 })
	s := &quietSink{}
	out := make(chan engine.RunOutcome, 1)
	go func() { out <- r.hub.Run(context.Background(), request("t1"), s) }()
	a.expect(ipc.TypeRun, 1)
	b := ipc.AppendFrame(flood, ipc.TypeEvent, 0, 1, []byte(`{"type":"after"}`))
	written := make(chan error, 1)
	go func() {
		_, err := a.nc.Write(b)
		written <- err
	}()
	eventually(t, "the event after the flood", func() bool { return strings.Contains(s.got(), `q:{"type":"after"}`) })
	if err := <-written; err != nil {
		t.Fatal(err)
	}
	return r, a, out
}
