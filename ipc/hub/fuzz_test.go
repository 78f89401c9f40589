package hub_test

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// healthyAgent answers every RUN with FINISH and every PING with PONG
// until its connection closes.
func healthyAgent(t testing.TB, path string) (stop func(), alive func() error) {
	a, _ := connect(t, path, ipc.Hello{Name: "healthy", MaxRuns: 1})
	done := make(chan struct{})
	var died atomic.Value
	go func() {
		defer close(done)
		for {
			f, err := a.r.ReadFrame()
			if err != nil {
				died.Store(err)
				return
			}
			switch f.Type {
			case ipc.TypeRun:
				_ = a.w.WriteFrame(ipc.TypeFinish, 0, f.Stream, []byte(finishDone("healthy")))
			case ipc.TypePing:
				_ = a.w.WriteFrame(ipc.TypePong, 0, 0, f.Payload)
			}
			f.Release()
		}
	}()
	return func() { a.nc.Close(); <-done }, func() error {
		if err, ok := died.Load().(error); ok {
			return err
		}
		return nil
	}
}

func frameBytes(typ ipc.FrameType, stream uint64, payload string) []byte {
	return ipc.AppendFrame(nil, typ, 0, stream, []byte(payload))
}

// FuzzHubConn feeds arbitrary bytes to a hub connection that holds a
// run, after a valid handshake. The hub must not panic, the run must end
// (completed by a FINISH in the input, or failed as transient), and
// another agent's connection must keep working.
func FuzzHubConn(f *testing.F) {
	cat := func(parts ...[]byte) []byte {
		var out []byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	f.Add([]byte{})
	f.Add(frameBytes(ipc.TypeFinish, 1, finishDone("x")))
	f.Add(cat(frameBytes(ipc.TypeEvent, 1, `{"type":"run_start"}`), frameBytes(ipc.TypeCheckpoint, 1, `{"seq":1,"messages":[{"role":"assistant"}]}`), frameBytes(ipc.TypeFinish, 1, `{"status":"waiting"}`)))
	f.Add(cat(frameBytes(ipc.TypeFinish, 1, finishDone("a")), frameBytes(ipc.TypeFinish, 1, finishDone("b"))))
	f.Add(cat(frameBytes(ipc.TypeEvent, 9, `{"type":"x"}`), frameBytes(ipc.TypeCommandAck, 1, `{"cmd":"1","accepted":true}`)))
	f.Add(cat(frameBytes(ipc.TypePing, 0, "12345678"), frameBytes(ipc.TypeGoAway, 0, `{"code":"bye"}`)))
	f.Add(frameBytes(ipc.TypeSubmit, 0, `{"req":"1","thread_id":"t","messages":[{"role":"user","content":"x"}]}`))
	f.Add(frameBytes(ipc.TypeError, 0, `{"code":"x"}`))
	f.Add(frameBytes(ipc.TypeCheckpoint, 1, `{"seq":"nope"}`))
	f.Add([]byte("\x00\x00\x00\x05\x11\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01{\"a\":"))
	f.Add([]byte("\xff\xff\xff\xff\x11\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"))

	h, err := hub.New(hub.Config{
		Logger: discardLogger(), Heartbeat: time.Second, MaxFrame: 1 << 16,
		AgentWait: 2 * time.Second, CancelGrace: 100 * time.Millisecond, Submitter: &submitter{},
	})
	if err != nil {
		f.Fatal(err)
	}
	path := socketPath(f)
	ln, err := net.Listen("unix", path)
	if err != nil {
		f.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); h.Serve(ln) }()
	stopHealthy, healthyAlive := healthyAgent(f, path)
	f.Cleanup(func() {
		stopHealthy()
		h.Close()
		<-served
	})
	hello := frameBytes(ipc.TypeHello, 0, `{"protocol":1,"name":"fuzz","max_runs":4}`)

	f.Fuzz(func(t *testing.T, data []byte) {
		client, server := net.Pipe()
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); h.ServeConn(server) }()
		gotRun := make(chan struct{})
		go func() { // the agent's reading side: drain until closed
			defer wg.Done()
			r := ipc.NewReader(client, ipc.ReaderConfig{SkipPayloadCheck: true})
			seen := false
			for {
				fr, err := r.ReadFrame()
				if err != nil {
					if !seen {
						close(gotRun)
					}
					return
				}
				if fr.Type == ipc.TypeRun && !seen {
					seen = true
					close(gotRun)
				}
				fr.Release()
			}
		}()
		client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := client.Write(hello); err != nil {
			t.Fatalf("HELLO: %v", err)
		}
		// The fuzzed connection has the most free slots: the run goes there.
		deadline := time.Now().Add(5 * time.Second)
		for h.Capacity() != 5 {
			if time.Now().After(deadline) {
				t.Fatalf("fuzz agent not registered: capacity %d, connections %d, healthy agent alive %v", h.Capacity(), h.Connections(), healthyAlive())
			}
			time.Sleep(time.Millisecond)
		}
		rc := startRun(h, context.Background(), request("fuzz"))
		select {
		case <-gotRun:
		case <-time.After(5 * time.Second):
			t.Fatal("RUN not sent")
		}
		client.Write(data) // may fail once the hub closes the connection
		client.Close()
		o := rc.wait(t)
		switch o.Kind {
		case engine.OutcomeCompleted, engine.OutcomeTransient, engine.OutcomePermanent:
		default:
			t.Fatalf("run on the fuzzed connection ended %+v", o)
		}
		wg.Wait()
		eventually(t, "fuzz agent gone", func() bool { return h.Capacity() == 1 })
		// Another agent is unaffected.
		if o := startRun(h, context.Background(), request("healthy")).wait(t); o.Kind != engine.OutcomeCompleted || o.Response != "healthy" {
			out, _ := json.Marshal(o)
			t.Fatalf("healthy agent's run: %s", out)
		}
	})
}
