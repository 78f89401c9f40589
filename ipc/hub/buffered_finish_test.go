package hub_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// gatedSink holds the connection's reader in its first Emit until release.
type gatedSink struct {
	entered chan struct{}
	gate    chan struct{}
	once    sync.Once
	sink
}

func newGatedSink(t testing.TB) *gatedSink {
	s := &gatedSink{entered: make(chan struct{}), gate: make(chan struct{})}
	t.Cleanup(s.release)
	return s
}

func (s *gatedSink) release() { s.once.Do(func() { close(s.gate) }) }

func (s *gatedSink) Emit(data []byte) {
	s.sink.Emit(data)
	if len(s.got()) == 1 {
		close(s.entered)
		<-s.gate
	}
}

// Frames the hub's reader has already received when the connection fails
// from another goroutine still count: a FINISH among them is the run's
// outcome, not agent_lost, and a CHECKPOINT before it is applied.
//
// The agent sends an EVENT of run 2, a PING, and a CHECKPOINT and the
// FINISH of run 1 in one write, so the reader takes them into its buffer in
// one read; run 2's sink holds the reader on the EVENT. The connection then
// fails elsewhere, and only then is the reader let go. It used to stop at
// the PING (its PONG could not be written any more) and drop the rest, and
// run 1's goroutine declared the run lost without waiting for the reader.
func TestFramesReceivedBeforeConnectionFailsCount(t *testing.T) {
	cases := []struct {
		name string
		hb   time.Duration
		// fail makes the connection fail on a goroutine other than the
		// reader and returns once it has.
		fail func(t *testing.T, a *rawAgent, cmds chan<- engine.Command)
	}{
		{"heartbeat timeout", 100 * time.Millisecond, func(t *testing.T, a *rawAgent, _ chan<- engine.Command) {
			// Held, the reader hears nothing more: the heartbeat
			// goroutine declares the agent dead and closes.
			if s := findError(t, a.expectClosed()); s.Code != ipc.CodeHeartbeatTimeout {
				t.Fatalf("connection closed with %+v, want heartbeat_timeout", s)
			}
		}},
		{"write error", 0, func(t *testing.T, a *rawAgent, cmds chan<- engine.Command) {
			// The agent stops reading: the run's goroutine fails to
			// write a live command (EPIPE) and fails the connection.
			if err := a.nc.(*net.UnixConn).CloseRead(); err != nil {
				t.Fatal(err)
			}
			reply := make(chan error, 1)
			cmds <- engine.Command{Kind: engine.CommandMessages, Messages: []engine.MessageRecord{{MessageID: "m2", ThreadID: "t1", Seq: 2, Message: text("live")}}, Reply: reply}
			if err := <-reply; err == nil || !strings.Contains(err.Error(), "send MESSAGES") {
				t.Fatalf("command reply %v, want a write error", err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, hub.Config{Heartbeat: tc.hb})
			a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
			eventually(t, "agent", func() bool { return r.hub.Capacity() == 2 })

			var mu sync.Mutex
			var persisted []string
			req := request("t1")
			req.Checkpoint = func(_ context.Context, c engine.RunCheckpoint) error {
				mu.Lock()
				defer mu.Unlock()
				for _, m := range c.Messages {
					persisted = append(persisted, m.ID)
				}
				return nil
			}
			cmds := make(chan engine.Command)
			req.Commands = cmds
			run1 := startRun(r.hub, context.Background(), req)
			a.expect(ipc.TypeRun, 1)
			s := newGatedSink(t)
			out2 := make(chan engine.RunOutcome, 1)
			go func() { out2 <- r.hub.Run(context.Background(), request("t2"), s) }()
			a.expect(ipc.TypeRun, 2)

			var b []byte
			b = ipc.AppendFrame(b, ipc.TypeEvent, 0, 2, []byte(`{"type":"text_delta","delta":"x"}`))
			b = ipc.AppendFrame(b, ipc.TypePing, 0, 0, []byte("pingpong"))
			b = ipc.AppendFrame(b, ipc.TypeCheckpoint, 0, 1, []byte(checkpointFrame(1)))
			b = ipc.AppendFrame(b, ipc.TypeFinish, 0, 1, []byte(finishDone("made it")))
			if _, err := a.nc.Write(b); err != nil {
				t.Fatal(err)
			}
			<-s.entered // the reader holds the PING, CHECKPOINT and FINISH

			tc.fail(t, a, cmds)
			s.release()

			if o := run1.wait(t); o.Kind != engine.OutcomeCompleted || o.Response != "made it" {
				t.Fatalf("run 1: %+v, want the FINISH the hub had received", o)
			}
			select {
			case o := <-out2:
				if o.Kind != engine.OutcomeTransient || o.ErrorCode != "agent_lost" {
					t.Fatalf("run 2 (no FINISH): %+v, want agent_lost", o)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("run 2 did not return")
			}
			mu.Lock()
			defer mu.Unlock()
			if strings.Join(persisted, ",") != "m1" {
				t.Fatalf("persisted %v, want the received checkpoint m1", persisted)
			}
			eventually(t, "connection gone", func() bool { return r.hub.Connections() == 0 })
		})
	}
}
