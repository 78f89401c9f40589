package hub_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// An agent's connection is logged under one key for its name ("agent",
// as every later line of the connection), with the connection's id
// (found by review: "agent connected" and "agent disconnected" said
// "name", the rest "agent").
func TestAnAgentsLinesNameItUnderOneKey(t *testing.T) {
	var logs syncbuf.Buffer
	r := newRig(t, hub.Config{Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	a, _ := connect(t, r.path, ipc.Hello{Name: "writer-7", MaxRuns: 1})
	eventually(t, "the agent counted", func() bool { return r.hub.Capacity() == 1 })
	a.nc.Close()
	eventually(t, "the agent gone", func() bool { return r.hub.Capacity() == 0 })
	// An agent that says GOAWAY before it closes leaves at INFO.
	b, _ := connect(t, r.path, ipc.Hello{Name: "leaver", MaxRuns: 1})
	eventually(t, "the second agent counted", func() bool { return r.hub.Capacity() == 1 })
	b.send(ipc.TypeGoAway, 0, ipc.Status{Code: "shutdown"})
	eventually(t, "its GOAWAY taken", func() bool { return r.hub.Capacity() == 0 })
	b.nc.Close()
	eventually(t, "the second agent's line", func() bool {
		return strings.Contains(logs.String(), `"level":"INFO","msg":"agent disconnected","agent_conn":2,"agent":"leaver"`)
	})
	r.hub.Close()
	for _, msg := range []string{"agent connected", "agent disconnected"} {
		var line map[string]any
		for l := range strings.Lines(logs.String()) {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg && line == nil { // writer-7's: the first
				line = m
			}
		}
		if line == nil {
			t.Fatalf("no %q line in:\n%s", msg, logs.String())
		}
		if line["agent"] != "writer-7" || line["name"] != nil || line["agent_conn"] == nil {
			t.Fatalf("%q logged as %v, want agent=writer-7 with agent_conn and no name", msg, line)
		}
		// A connection closed without GOAWAY is a warning (found by
		// review: its runs failed at INFO).
		if msg == "agent disconnected" && (line["level"] != "WARN" || line["goaway"] != false) {
			t.Fatalf("%q logged as %v, want level WARN and goaway false", msg, line)
		}
	}
}

// Text the agent sends reaches the log clipped, and its ERRORs on run
// streams one line a second (found by review: 1 MB ERROR messages and a
// 1 MB name wrote 57 MB of log in 1.6 s).
func TestAnAgentsTextIsClippedInTheLog(t *testing.T) {
	var logs syncbuf.Buffer
	r := newRig(t, hub.Config{Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	name := strings.Repeat("n", 100<<10)
	a, _ := connect(t, r.path, ipc.Hello{Name: name, MaxRuns: 1})
	eventually(t, "the agent counted", func() bool { return r.hub.Capacity() == 1 })
	big := strings.Repeat("m", 1<<20)
	began := time.Now()
	for range 20 {
		a.send(ipc.TypeError, 7, ipc.Status{Code: "bad", Message: big})
	}
	a.send(ipc.TypeGoAway, 0, ipc.Status{Code: "shutdown", Message: big})
	eventually(t, "its GOAWAY taken", func() bool { return r.hub.Capacity() == 0 })
	took := time.Since(began)
	r.hub.Close()
	out := logs.String()
	// One line a second: 20 MiB of frames take more than one under the
	// race detector on a loaded machine.
	if n, most := strings.Count(out, "agent rejected a frame"), 1+int(took/time.Second); n > most || n >= 20 {
		t.Fatalf("%d lines for 20 ERRORs in %v; want at most %d", n, took, most)
	}
	if len(out) > 16<<10 {
		t.Fatalf("%d bytes of log for a 100 KiB name and 21 MiB of messages; want them clipped", len(out))
	}
	if !strings.Contains(out, "(102400 bytes)") || !strings.Contains(out, "(1048576 bytes)") {
		t.Fatalf("the clipped texts do not say how long they were:\n%.2000s", out)
	}
}

// Serves answers from a snapshot of the connections that take runs,
// kept as agents come, send GOAWAY and go.
func TestServesFollowsTheAgents(t *testing.T) {
	r := newRig(t, hub.Config{Logger: discardLogger()})
	if r.hub.Serves("writer") {
		t.Fatal("served with no agent")
	}
	a, _ := connect(t, r.path, ipc.Hello{Name: "a", AgentIDs: []string{"writer"}, MaxRuns: 1})
	eventually(t, "writer served", func() bool { return r.hub.Serves("writer") })
	if r.hub.Serves("reader") {
		t.Fatal("reader served by an agent of writer")
	}
	b, _ := connect(t, r.path, ipc.Hello{Name: "b", AgentIDs: []string{"*"}, MaxRuns: 1})
	eventually(t, "any id served", func() bool { return r.hub.Serves("reader") })
	b.send(ipc.TypeGoAway, 0, ipc.Status{Code: "shutdown"})
	eventually(t, "the GOAWAY taken", func() bool { return !r.hub.Serves("reader") })
	if !r.hub.Serves("writer") {
		t.Fatal("writer no longer served after another agent's GOAWAY")
	}
	a.nc.Close()
	eventually(t, "writer's agent gone", func() bool { return !r.hub.Serves("writer") })
}
