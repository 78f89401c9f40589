package hub_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// blockedStore is a run's checkpoint store whose first write blocks until
// release: a slow disk under one run.
type blockedStore struct {
	entered chan struct{} // closed when the first checkpoint write starts
	gate    chan struct{} // closed by release
	once    sync.Once

	mu  sync.Mutex
	ids []string // message ids persisted, in order
}

func newBlockedStore(t testing.TB) *blockedStore {
	s := &blockedStore{entered: make(chan struct{}), gate: make(chan struct{})}
	t.Cleanup(s.release) // never leave the run's goroutine blocked
	return s
}

func (s *blockedStore) release() { s.once.Do(func() { close(s.gate) }) }

func (s *blockedStore) checkpoint(_ context.Context, c engine.RunCheckpoint) error {
	s.mu.Lock()
	first := len(s.ids) == 0
	s.mu.Unlock()
	if first {
		close(s.entered)
		<-s.gate
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range c.Messages {
		s.ids = append(s.ids, m.ID)
	}
	return nil
}

func (s *blockedStore) persisted() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ids...)
}

func checkpointFrame(seq int) string {
	return fmt.Sprintf(`{"seq":%d,"messages":[{"id":"m%d","role":"assistant"}]}`, seq, seq)
}

// expectPong reads frames until the PONG that echoes payload; anything else
// but the hub's own PINGs fails.
func expectPong(t *testing.T, a *rawAgent, payload []byte) {
	t.Helper()
	for {
		f, err := a.readErr(10 * time.Second)
		if err != nil {
			t.Fatalf("waiting for PONG: %v (the connection's reader is stalled)", err)
		}
		switch {
		case f.Type == ipc.TypePong && bytes.Equal(f.Payload, payload):
			return
		case f.Type == ipc.TypePing:
		default:
			t.Fatalf("got %s on stream %d (%s) while waiting for PONG", f.Type, f.Stream, f.Payload)
		}
	}
}

// An agent may send CHECKPOINTs without waiting for their ACKs
// (docs/protocol.md). While one run's store is slow, its pipelined
// checkpoints used to fill the run's 16-slot control channel, and the
// connection's reader then blocked on it: the PONGs, events and FINISH of
// every other run on the connection stalled behind one run's disk.
func TestPipelinedCheckpointsDoNotStallOtherRuns(t *testing.T) {
	r := newRig(t, hub.Config{})
	a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
	eventually(t, "agent", func() bool { return r.hub.Capacity() == 2 })

	store := newBlockedStore(t)
	slowReq := request("slow")
	slowReq.Checkpoint = store.checkpoint
	slow := startRun(r.hub, context.Background(), slowReq)
	a.expect(ipc.TypeRun, 1)
	other := startRun(r.hub, context.Background(), request("other"))
	a.expect(ipc.TypeRun, 2)

	const n = 64 // well past the old 16-slot channel, within the default bound
	for i := 1; i <= n; i++ {
		a.send(ipc.TypeCheckpoint, 1, checkpointFrame(i))
	}
	<-store.entered // run 1 is stuck persisting seq 1; 63 more wait

	// The connection still serves everything else, at once.
	ping := []byte("12345678")
	a.send(ipc.TypePing, 0, ping)
	expectPong(t, a, ping)
	a.send(ipc.TypeEvent, 2, `{"type":"text_delta","delta":"still here"}`)
	a.send(ipc.TypeFinish, 2, finishDone("other done"))
	if o := other.wait(t); o.Kind != engine.OutcomeCompleted || o.Response != "other done" {
		t.Fatalf("other run: %+v", o)
	}
	if got := other.sink.got(); len(got) != 1 || !strings.Contains(got[0], "still here") {
		t.Fatalf("other run's events: %q", got)
	}

	// The slow run's checkpoints are all applied and acked, in order,
	// before its FINISH counts.
	a.send(ipc.TypeFinish, 1, finishDone("slow done"))
	store.release()
	for i := 1; i <= n; i++ {
		f := a.expect(ipc.TypeCheckpointAck, 1)
		if want := fmt.Sprintf(`{"seq":%d}`, i); string(f.Payload) != want {
			t.Fatalf("ack %d = %s, want %s", i, f.Payload, want)
		}
	}
	if o := slow.wait(t); o.Kind != engine.OutcomeCompleted || o.Response != "slow done" {
		t.Fatalf("slow run: %+v", o)
	}
	ids := store.persisted()
	if len(ids) != n {
		t.Fatalf("%d checkpoints persisted, want %d", len(ids), n)
	}
	for i, id := range ids {
		if want := fmt.Sprintf("m%d", i+1); id != want {
			t.Fatalf("checkpoint %d persisted %s, want %s (order)", i, id, want)
		}
	}
}

// A run whose agent keeps sending CHECKPOINTs without waiting for their
// ACKs is bounded: past Config.MaxUnackedCheckpoints (or
// MaxUnackedCheckpointBytes) unanswered checkpoints, that CHECKPOINT and
// every later one of the run is refused with checkpoint_failed, the ones
// accepted before are still applied and acked in order, and the run is
// cancelled and fails as transient checkpoint_backlog. The connection and
// its other runs are untouched.
func TestCheckpointBacklogFailsOnlyItsRun(t *testing.T) {
	cases := []struct {
		name string
		cfg  hub.Config
	}{
		{"count", hub.Config{MaxUnackedCheckpoints: 4}},
		// Each CHECKPOINT payload below is 53 bytes: four fit in 240, five do not.
		{"bytes", hub.Config{MaxUnackedCheckpointBytes: 240}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if l := len(checkpointFrame(1)); l != 53 {
				t.Fatalf("checkpoint payload is %d bytes; adjust the byte bound", l)
			}
			r := newRig(t, tc.cfg)
			a, _ := connect(t, r.path, ipc.Hello{MaxRuns: 2})
			eventually(t, "agent", func() bool { return r.hub.Capacity() == 2 })

			store := newBlockedStore(t)
			greedyReq := request("greedy")
			greedyReq.Checkpoint = store.checkpoint
			greedy := startRun(r.hub, context.Background(), greedyReq)
			a.expect(ipc.TypeRun, 1)
			other := startRun(r.hub, context.Background(), request("other"))
			a.expect(ipc.TypeRun, 2)

			for i := 1; i <= 6; i++ {
				a.send(ipc.TypeCheckpoint, 1, checkpointFrame(i))
			}
			// 1–4 are accepted (1 is being persisted, and blocks); 5 and
			// 6 are refused at once, before anything is acked.
			for _, seq := range []uint64{5, 6} {
				s := status(t, a.expect(ipc.TypeError, 1))
				if s.Code != ipc.CodeCheckpointFailed || s.Seq == nil || *s.Seq != seq || !strings.Contains(s.Message, "CHECKPOINT_ACK") ||
					s.Reason != ipc.ReasonCheckpointBacklog {
					t.Fatalf("refusal of seq %d: %+v", seq, s)
				}
			}

			// The connection and the other run are unaffected.
			ping := []byte("abcdefgh")
			a.send(ipc.TypePing, 0, ping)
			expectPong(t, a, ping)
			a.send(ipc.TypeFinish, 2, finishDone("other done"))
			if o := other.wait(t); o.Kind != engine.OutcomeCompleted || o.Response != "other done" {
				t.Fatalf("other run: %+v", o)
			}

			// What was accepted is applied and acked in order; then the
			// hub cancels the run.
			store.release()
			for i := 1; i <= 4; i++ {
				f := a.expect(ipc.TypeCheckpointAck, 1)
				if want := fmt.Sprintf(`{"seq":%d}`, i); string(f.Payload) != want {
					t.Fatalf("ack %d = %s, want %s", i, f.Payload, want)
				}
			}
			a.expect(ipc.TypeCancel, 1)
			// Whatever the agent reports, the attempt failed: its log
			// lacks the refused checkpoints.
			a.send(ipc.TypeFinish, 1, finishDone("greedy done"))
			o := greedy.wait(t)
			if o.Kind != engine.OutcomeTransient || o.ErrorCode != "checkpoint_backlog" || !strings.Contains(o.Error, "seq 5") {
				t.Fatalf("greedy run: %+v, want transient checkpoint_backlog", o)
			}
			if ids := store.persisted(); strings.Join(ids, ",") != "m1,m2,m3,m4" {
				t.Fatalf("persisted %v, want m1..m4", ids)
			}

			// The connection takes new runs.
			next := startRun(r.hub, context.Background(), request("next"))
			a.expect(ipc.TypeRun, 3)
			a.send(ipc.TypeCheckpoint, 3, checkpointFrame(1))
			a.expect(ipc.TypeCheckpointAck, 3)
			a.send(ipc.TypeFinish, 3, finishDone("next done"))
			if o := next.wait(t); o.Kind != engine.OutcomeCompleted {
				t.Fatalf("next run: %+v", o)
			}
		})
	}
}
