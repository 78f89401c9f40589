package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// natsNode is one sidecar of a NATS-backed group, with its echo agent.
type natsNode struct {
	node
	name    string
	sidecar *proc
	agent   *proc
	api     *apiClient
}

// startNATSNodes starts n sidecars on one NATS server (--store), each
// with its own sockets and echo agent, with short leases so that a dead
// sidecar's work moves on within seconds.
func startNATSNodes(t *testing.T, url string, n int) []*natsNode {
	t.Helper()
	var out []*natsNode
	for i := range n {
		nn := &natsNode{node: newNode(t), name: fmt.Sprintf("sc%d", i+1)}
		nn.sidecar = nn.serve(t, "--store", url, "--consumer-id", nn.name,
			"--lease", "1500ms", "--lease-renewal", "400ms", "--sweep-interval", "300ms")
		out = append(out, nn)
	}
	for _, nn := range out {
		nn.api = nn.ready(t)
		nn.agent = nn.echoAgent(t)
		waitAgent(t, nn.api)
	}
	return out
}

// pollDispatch polls a dispatch until cond holds (at most 30s).
func pollDispatch(t *testing.T, c *apiClient, id, what string, cond func(engine.Dispatch) bool) engine.Dispatch {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var d engine.Dispatch
		err := c.do(context.Background(), http.MethodGet, "/v1/dispatches/"+id, nil, &d)
		if err == nil && cond(d) {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("dispatch %s never %s: %+v %v", id, what, d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Three sidecars (real binaries) with echo agents share one NATS server.
// Runs on several threads are submitted through all of them; the sidecar
// executing a long run is SIGKILLed (with its agent) mid-run: its lease
// lapses and another sidecar runs the work to completion. Every run ends
// acked, and no thread ever ran twice at once: the echo agent checkpoints
// its reply after sleeping, so on each thread consecutive replies to
// "sleep N" are at least N ms apart. Last, a cancel sent to one sidecar
// reaches the run executing on another (live routing between processes).
func TestNATSSidecarsShareTheQueueAndSurviveASIGKILL(t *testing.T) {
	srv := natstest.Start(t)
	nodes := startNATSNodes(t, srv.URL(), 3)
	submitRun := func(nn *natsNode, thread, text string) engine.SubmitResult {
		t.Helper()
		var res engine.SubmitResult
		if err := nn.api.do(context.Background(), http.MethodPost, "/v1/threads/"+thread+"/dispatches", map[string]any{"messages": []any{textMessage(text)}}, &res); err != nil {
			t.Fatalf("submit through %s: %v", nn.name, err)
		}
		return res
	}
	submit := func(nn *natsNode, thread, text string) string { return submitRun(nn, thread, text).DispatchID }

	const longMs, shortMs = 4000, 300
	target := submit(nodes[0], "tk", fmt.Sprintf("sleep %d", longMs))
	sleeps := map[string]int{"tk": longMs}
	// The long run executes somewhere. The short runs are submitted while
	// it does, at once: one after another, on a loaded machine, they took
	// longer than the long run (a stress run of the suite).
	first := pollDispatch(t, nodes[1].api, target, "running", func(d engine.Dispatch) bool {
		return d.Status == engine.StatusClaimed && d.RunStatus == engine.RunRunning
	})
	ids := make([]string, 9)
	var submits sync.WaitGroup
	for i := range ids {
		thread := fmt.Sprintf("w%d", i%3)
		sleeps[thread] = shortMs
		submits.Go(func() {
			var res engine.SubmitResult
			if err := nodes[i%3].api.do(context.Background(), http.MethodPost, "/v1/threads/"+thread+"/dispatches", map[string]any{"messages": []any{textMessage(fmt.Sprintf("sleep %d", shortMs))}}, &res); err != nil {
				t.Errorf("submit through %s: %v", nodes[i%3].name, err)
			}
			ids[i] = res.DispatchID
		})
	}
	submits.Wait()
	if t.Failed() {
		t.FailNow()
	}

	// Kill the sidecar running the long run, and its agent.
	var victim *natsNode
	for _, nn := range nodes {
		if nn.name == first.ClaimedBy {
			victim = nn
		}
	}
	if victim == nil {
		t.Fatalf("the long run is claimed by %q, not one of the sidecars", first.ClaimedBy)
	}
	victim.sidecar.cmd.Process.Signal(syscall.SIGKILL)
	victim.agent.cmd.Process.Signal(syscall.SIGKILL)
	victim.sidecar.wait(t, 10*time.Second)
	victim.agent.wait(t, 10*time.Second)
	var survivor *natsNode
	for _, nn := range nodes {
		if nn != victim {
			survivor = nn
			break
		}
	}

	// The dead sidecar's claim as it left it (nobody renews it any more).
	var last engine.Dispatch
	if err := survivor.api.do(context.Background(), http.MethodGet, "/v1/dispatches/"+target, nil, &last); err != nil {
		t.Fatal(err)
	}
	if last.Status != engine.StatusClaimed || last.ClaimedBy != victim.name {
		t.Fatalf("right after the kill the long run is %s by %q", last.Status, last.ClaimedBy)
	}

	// Another sidecar claims it, only once the dead one's lease lapsed.
	second := pollDispatch(t, survivor.api, target, "claimed by a survivor", func(d engine.Dispatch) bool {
		return d.Status == engine.StatusClaimed && d.ClaimedBy != victim.name
	})
	done := pollDispatch(t, survivor.api, target, "acked", func(d engine.Dispatch) bool { return d.Status == engine.StatusAcked })
	if done.AttemptCount != 1 || !strings.Contains(done.RunResponse, fmt.Sprintf("echo: sleep %d", longMs)) {
		t.Errorf("the long run after the failover: attempts %d, response %q", done.AttemptCount, done.RunResponse)
	}
	reclaimed := false
	for _, e := range done.Errors {
		if e.Error == engine.ReasonLeaseExpired {
			reclaimed = true
			if e.At <= last.LeaseUntil {
				t.Errorf("reclaimed at %d, before the dead sidecar's lease ran out at %d", e.At, last.LeaseUntil)
			}
		}
	}
	if !reclaimed {
		t.Errorf("the long run was not reclaimed after its lease: errors %+v", done.Errors)
	}
	for _, id := range ids {
		pollDispatch(t, survivor.api, id, "acked", func(d engine.Dispatch) bool { return d.Status == engine.StatusAcked })
	}

	// No thread ran twice at once.
	for thread, ms := range sleeps {
		var page struct {
			Items []engine.MessageRecord `json:"items"`
		}
		if err := survivor.api.do(context.Background(), http.MethodGet, "/v1/threads/"+thread+"/messages?limit=100", nil, &page); err != nil {
			t.Fatal(err)
		}
		var replies []int64
		for _, m := range page.Items {
			var text string
			if m.Message.Role == engine.RoleAssistant && json.Unmarshal(m.Message.Content, &text) == nil && strings.HasPrefix(text, "echo: sleep") {
				replies = append(replies, m.CreatedAt)
			}
		}
		if thread == "tk" && len(replies) != 1 {
			t.Errorf("thread tk has %d replies, want 1 (the killed attempt never answered)", len(replies))
		}
		if thread != "tk" && len(replies) < 3 {
			t.Errorf("thread %s has %d replies, want at least 3", thread, len(replies))
		}
		for i := 1; i < len(replies); i++ {
			if gap := replies[i] - replies[i-1]; gap < int64(ms) {
				t.Errorf("thread %s: replies %d and %d are %d ms apart, less than one run's %d ms sleep: two runs overlapped", thread, i, i+1, gap, ms)
			}
		}
	}
	t.Logf("killed %s mid-run; %s re-ran it after its lease (attempts %d)", victim.name, second.ClaimedBy, done.AttemptCount)

	// Live routing between the binaries: a cancel sent to one sidecar
	// stops the run executing on another.
	long := submitRun(survivor, "tl", "sleep 60000")
	on := pollDispatch(t, survivor.api, long.DispatchID, "running", func(d engine.Dispatch) bool {
		return d.Status == engine.StatusClaimed && d.RunStatus == engine.RunRunning
	})
	var sender *natsNode
	for _, nn := range nodes {
		if nn != victim && nn.name != on.ClaimedBy {
			sender = nn
		}
	}
	var cancel struct {
		Cancelled bool `json:"cancelled"`
	}
	if err := sender.api.do(context.Background(), http.MethodPost, "/v1/cancel/"+long.RunID, nil, &cancel); err != nil || !cancel.Cancelled {
		t.Fatalf("cancel through %s of the run on %s: %+v %v", sender.name, on.ClaimedBy, cancel, err)
	}
	stopped := pollDispatch(t, sender.api, long.DispatchID, "acked", func(d engine.Dispatch) bool { return d.Status == engine.StatusAcked })
	if stopped.Termination == nil || stopped.Termination.Type != engine.TermCancelled {
		t.Errorf("the run cancelled through %s ended with %+v", sender.name, stopped.Termination)
	}
}

// serve validates the NATS flags before it opens anything: every problem
// at once, exit 2.
func TestServeRefusesBadNATSFlags(t *testing.T) {
	p := start(t, sidecarBin, "serve", "--store", "http://x:1", "--nats-user", "u", "--nats-token", "tok", "--nats-replicas", "7", "--nats-stream", "a.b")
	if code := p.wait(t, 10*time.Second); code != 2 {
		t.Fatalf("exit %d\n%s", code, p.out.String())
	}
	out := p.out.String()
	for _, want := range []string{"--store \"http://x:1\"", "exclude each other", "--nats-user and --nats-password", "--nats-replicas 7", "stream name \"a.b\""} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
