package hub_test

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// stack is the sidecar's core without HTTP: the Badger store, the engine
// and the hub serving a real agent socket.
type stack struct {
	store *badgerstore.Store
	hub   *hub.Hub
	mb    *engine.Mailbox
	path  string
}

func newStack(t *testing.T, hcfg hub.Config) *stack {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	hcfg.Logger = discardLogger()
	h, err := hub.New(hcfg)
	if err != nil {
		t.Fatal(err)
	}
	mb, err := engine.New(s, h, engine.Config{RetryDelay: 20 * time.Millisecond, MaxRetryDelay: 100 * time.Millisecond, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	h.SetSubmitter(mb)
	path := socketPath(t)
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); h.Serve(ln) }()
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		h.GoAway("shutdown", "test over")
		if err := mb.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		h.Close()
		<-served
		if rep, err := s.Verify(context.Background()); err != nil || len(rep.Problems) > 0 {
			t.Errorf("verify: %v %v", err, rep.Problems)
		}
		s.Close()
	})
	return &stack{store: s, hub: h, mb: mb, path: path}
}

// serveSDK serves cfg's handler with the Go SDK on the stack's socket
// (Socket and Logger set here) until the test ends, or until the returned
// stop is called.
func (st *stack) serveSDK(t *testing.T, cfg agent.Config) (c *agent.Client, stop func()) {
	t.Helper()
	cfg.Socket, cfg.Logger = st.path, discardLogger()
	c, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- c.Serve(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-served }) }
	t.Cleanup(stop)
	return c, stop
}

// pythonAgent starts examples/python-agent/agent.py on the stack's socket.
func pythonAgent(t *testing.T, path string, args ...string) *exec.Cmd {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Fatalf("python3 is required for the Python agent integration test: %v", err)
	}
	script, err := filepath.Abs("../../examples/python-agent/agent.py")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(py, append([]string{script, "--socket", path}, args...)...)
	if testing.Verbose() {
		cmd.Stderr = os.Stderr
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

func text(s string) engine.Message {
	b, _ := json.Marshal(s)
	return engine.Message{Role: engine.RoleUser, Content: b}
}

// streamEvents waits for a foreground run's event log to close and
// returns its events.
func streamEvents(t *testing.T, log *engine.EventLog) []engine.Event {
	t.Helper()
	eventually(t, "event stream closed", func() bool { _, closed := log.ClosedAt(); return closed })
	evs, _, _, _ := log.Read(0, 1000, nil)
	return evs
}

func waitDispatch(t *testing.T, s *badgerstore.Store, id string, want engine.DispatchStatus) *engine.Dispatch {
	t.Helper()
	var d *engine.Dispatch
	deadline := time.Now().Add(20 * time.Second)
	for {
		var err error
		d, err = s.LoadDispatch(context.Background(), id)
		if err == nil && d.Status == want {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("dispatch %s is %+v (%v), want %s", id, d, err, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The Python agent (standard library only) runs a full run through the
// sidecar's engine and hub: RUN with the activation message, events
// streamed back, the echo checkpointed into the thread log, FINISH
// settling the run.
func TestPythonAgentFullRun(t *testing.T) {
	st := newStack(t, hub.Config{})
	pythonAgent(t, st.path)
	eventually(t, "python agent connected", func() bool { return st.hub.Capacity() == 2 })

	ctx := context.Background()
	res, log, err := st.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "py-1", Messages: []engine.Message{text("hi")}})
	if err != nil {
		t.Fatal(err)
	}
	evs := streamEvents(t, log)
	var types []string
	for _, e := range evs {
		types = append(types, e.Type)
	}
	if strings.Join(types, ",") != "run_start,text_delta,run_finish" || !strings.Contains(string(evs[1].Data), "echo: hi") {
		t.Fatalf("events %v: %+v", types, evs)
	}
	waitDispatch(t, st.store, res.DispatchID, engine.StatusAcked)
	run, err := st.store.LoadRun(ctx, res.RunID)
	if err != nil || run.Status != engine.RunDone || !strings.Contains(string(run.FinalOutput), "echo: hi") {
		t.Fatalf("run %+v %v", run, err)
	}
	msgs, err := st.store.LoadMessages(ctx, "py-1")
	if err != nil || len(msgs) != 2 || msgs[0].Message.Role != "user" || msgs[1].Message.Role != "assistant" ||
		!strings.Contains(string(msgs[1].Message.Content), "echo: hi") || msgs[1].ProducedByRunID != res.RunID {
		t.Fatalf("thread log %+v %v", msgs, err)
	}
}

// An agent killed mid-run loses nothing: its run fails as transient, and
// the next agent to connect runs it to completion.
func TestAgentKilledMidRunIsRetriedByTheNextAgent(t *testing.T) {
	st := newStack(t, hub.Config{})
	first := pythonAgent(t, st.path)
	eventually(t, "python agent connected", func() bool { return st.hub.Capacity() == 2 })
	ctx := context.Background()
	res, err := st.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "py-kill", Messages: []engine.Message{text("sleep 1500")}})
	if err != nil {
		t.Fatal(err)
	}
	waitDispatch(t, st.store, res.DispatchID, engine.StatusClaimed)
	// The run's start is recorded when it is claimed, before the hub sends
	// it: wait for the agent's own first event, so the agent has the run
	// when it dies (one killed before that is abandoned without spending
	// an attempt, once no agent comes within AgentWait).
	eventually(t, "the agent started the run", func() bool {
		log := st.mb.Reattach("py-kill")
		if log == nil {
			return false
		}
		evs, _, _, _ := log.Read(0, 1, nil)
		return len(evs) > 0
	})
	first.Process.Signal(syscall.SIGKILL)
	first.Wait()
	eventually(t, "agent gone", func() bool { return st.hub.Capacity() == 0 })
	d := waitDispatch(t, st.store, res.DispatchID, engine.StatusQueued)
	if d.AttemptCount != 1 || len(d.Errors) != 1 || !strings.Contains(d.Errors[0].Error, "agent connection lost") {
		t.Fatalf("after the agent died: %+v", d)
	}
	pythonAgent(t, st.path)
	waitDispatch(t, st.store, res.DispatchID, engine.StatusAcked)
	if run, _ := st.store.LoadRun(ctx, res.RunID); run.Status != engine.RunDone {
		t.Fatalf("run after retry %+v", run)
	}
}
