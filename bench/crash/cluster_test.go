package crash

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// proc is a child process whose output goes to a log file.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	started time.Time

	done     chan struct{} // closed when the process was reaped
	err      error         // Wait's error; read after done
	exitedNs int64         // when Wait returned; read after done
}

// startProc starts bin with args (and env added to the environment),
// its output appended to logPath. The test's cleanup kills it.
func startProc(t *testing.T, name, logPath string, env []string, bin string, args ...string) *proc {
	t.Helper()
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "=== %s %s: %s %v\n", time.Now().Format(time.RFC3339Nano), name, filepath.Base(bin), args)
	p := &proc{name: name, cmd: exec.Command(bin, args...), logPath: logPath, done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.started = time.Now()
	if err := p.cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		p.exitedNs = time.Now().UnixNano()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGCONT) // a stopped process dies only once continued
		<-p.done
	})
	return p
}

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL, waits for the process to be reaped and returns the
// time of its death (Unix ns): nothing it did can be later than that.
func (p *proc) kill(t *testing.T) int64 {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !p.exited() {
		t.Fatalf("kill %s: %v", p.name, err)
	}
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGCONT)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not die of SIGKILL", p.name)
	}
	return p.exitedNs
}

// terminate sends SIGTERM and waits up to timeout; it returns the exit
// status (-1 when killed by a signal).
func (p *proc) terminate(t *testing.T, timeout time.Duration) int {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Errorf("%s did not stop within %v of SIGTERM; killing it", p.name, timeout)
		p.kill(t)
	}
	var ee *exec.ExitError
	switch {
	case p.err == nil:
		return 0
	case errors.As(p.err, &ee):
		return ee.ExitCode()
	}
	return -1
}

// agentProc is one chaos agent process and its journal.
type agentProc struct {
	*proc
	journal string
	node    string  // the sidecar it serves (cluster.node)
	deathNs int64   // SIGKILL time; 0 unless killed
	stops   []int64 // SIGSTOP times
	conts   []int64 // SIGCONT times
}

// clusterOptions configures a cluster.
type clusterOptions struct {
	dataDir string   // default <dir>/data
	flags   []string // serve flags after the defaults (a later flag wins)
	maxRuns int      // agent --max-runs (default 8)
	// nats, when set, is a NATS server URL: the sidecar runs on the NATS
	// store (a stream and prefix of its own on that server) instead of
	// Badger in dataDir.
	nats string
	// join, when set, is another cluster's NATS store, shared with it
	// (several sidecars on one queue); nats is then ignored.
	join natsTarget
	// node names the sidecar among those sharing a store: its
	// --consumer-id, and the node its agents and kills belong to.
	node string
}

// cluster is a sidecar and its agents on one data directory, restarted as
// a test goes. Several clusters may share one NATS store (clusterOptions
// join), one per host.
type cluster struct {
	t                         *testing.T
	node                      string // clusterOptions.node
	dir                       string
	data, apiSock, agentSock  string
	nats                      natsTarget // set when the store is NATS
	flags                     []string
	maxRuns                   int
	api                       *api
	sidecar                   *proc
	mu                        sync.Mutex // guards the slices below
	sidecars                  []*proc
	agents                    []*agentProc
	recoveries                []time.Duration
	sidecarKills, agentKills  int
	sidecarKillNs             []int64 // when each SIGKILLed sidecar died
	sidecarCount, agentsCount int
}

// reclaimsOrphans reports whether a restarted sidecar reclaims the killed
// one's claims at once (--reclaim-orphans, Badger only) rather than
// letting them lapse.
func (c *cluster) reclaimsOrphans() bool {
	return c.nats.url == "" && !slices.Contains(c.flags, "--reclaim-orphans=false")
}

// defaultFlags are the serve flags of every cluster: short leases so
// that a killed sidecar's work is reclaimed within seconds.
var defaultFlags = []string{
	"--lease", "2s", "--lease-renewal", "500ms", "--sweep-interval", "500ms",
	"--suspended-lease", "3s", "--retry-delay", "20ms", "--max-retry-delay", "200ms",
	"--max-attempts", "10", "--shutdown-grace", "2s", "--event-retention", "5s",
	"--log-level", "warn",
}

func newCluster(t *testing.T, o clusterOptions) *cluster {
	t.Helper()
	dir, err := os.MkdirTemp("", "crash") // short: socket paths are limited to 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, node: o.node, dir: dir, data: o.dataDir, apiSock: filepath.Join(dir, "api.sock"),
		agentSock: filepath.Join(dir, "agent.sock"), maxRuns: o.maxRuns}
	if c.data == "" {
		c.data = filepath.Join(dir, "data")
	}
	if c.maxRuns == 0 {
		c.maxRuns = 8
	}
	store := []string{"--data-dir", c.data}
	switch {
	case o.join.url != "":
		c.nats = o.join
	case o.nats != "":
		// A stream and prefix of this test's own on the shared server.
		id := strings.ToUpper(strconv.FormatInt(time.Now().UnixNano(), 36))
		c.nats = natsTarget{url: o.nats, stream: "CRASH" + id, prefix: "c" + strings.ToLower(id)}
	}
	if c.nats.url != "" {
		store = []string{"--store", c.nats.url, "--nats-stream", c.nats.stream, "--nats-prefix", c.nats.prefix}
	}
	if o.node != "" {
		store = append(store, "--consumer-id", o.node)
	}
	c.flags = append(append(append([]string{"serve", "--api-socket", c.apiSock,
		"--agent-socket", c.agentSock}, store...), defaultFlags...), o.flags...)
	c.api = newAPI(c.apiSock, o.node)
	t.Cleanup(func() {
		c.api.close()
		if races := c.raceReports(); races != "" {
			t.Errorf("the race detector reported in a child process:\n%s", races)
		}
		if t.Failed() {
			c.dumpLogs()
		}
		os.RemoveAll(dir)
	})
	return c
}

// startSidecar starts the sidecar (env is added to its environment, for
// MAILBOX_SIDECAR_TEST_CLOCK_SKEW), waits for /readyz 200 and returns the
// recovery time: process start to ready.
func (c *cluster) startSidecar(env ...string) time.Duration {
	c.t.Helper()
	p := c.spawnSidecar(env...)
	d := c.waitReady(p, 60*time.Second)
	c.mu.Lock()
	c.recoveries = append(c.recoveries, d)
	c.mu.Unlock()
	return d
}

// spawnSidecar starts the sidecar without waiting for it.
func (c *cluster) spawnSidecar(env ...string) *proc {
	c.t.Helper()
	c.mu.Lock()
	c.sidecarCount++
	n := c.sidecarCount
	c.mu.Unlock()
	p := startProc(c.t, fmt.Sprintf("sidecar-%d", n), filepath.Join(c.dir, "sidecar.log"), env, sidecarBin, c.flags...)
	c.api.close() // connections to the previous process are dead
	c.mu.Lock()
	c.sidecar = p
	c.sidecars = append(c.sidecars, p)
	c.mu.Unlock()
	return p
}

// resetRecoveries forgets the recovery times so far (a first start is
// no recovery).
func (c *cluster) resetRecoveries() {
	c.mu.Lock()
	c.recoveries = nil
	c.mu.Unlock()
}

// waitReady polls /readyz until 200 and returns the time since p started.
func (c *cluster) waitReady(p *proc, timeout time.Duration) time.Duration {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		ok, _ := c.api.readiness(ctx)
		cancel()
		if ok {
			return time.Since(p.started)
		}
		if p.exited() {
			c.t.Fatalf("%s exited before it was ready: %v", p.name, p.err)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s not ready within %v", p.name, timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// killSidecar SIGKILLs the sidecar (its sockets stay behind) and returns
// the time of death.
func (c *cluster) killSidecar() int64 {
	c.t.Helper()
	ns := c.sidecar.kill(c.t)
	c.mu.Lock()
	c.sidecarKills++
	c.sidecarKillNs = append(c.sidecarKillNs, ns)
	c.mu.Unlock()
	if _, err := os.Lstat(c.apiSock); err != nil {
		c.t.Fatalf("a SIGKILLed sidecar leaves its socket behind: %v", err)
	}
	return ns
}

// startAgent starts a chaos agent with a journal of its own.
func (c *cluster) startAgent(extra ...string) *agentProc {
	c.t.Helper()
	c.mu.Lock()
	c.agentsCount++
	n := c.agentsCount
	c.mu.Unlock()
	journal := filepath.Join(c.dir, fmt.Sprintf("journal-%d.jsonl", n))
	args := append([]string{"--socket", c.agentSock, "--journal", journal, "--name", fmt.Sprintf("chaos-%d", n),
		"--max-runs", fmt.Sprint(c.maxRuns)}, extra...)
	a := &agentProc{proc: startProc(c.t, fmt.Sprintf("agent-%d", n), filepath.Join(c.dir, "agent.log"), nil, agentBin, args...), journal: journal, node: c.node}
	c.mu.Lock()
	c.agents = append(c.agents, a)
	c.mu.Unlock()
	return a
}

// killAgent SIGKILLs an agent; its runs without an end record end at its
// death.
func (c *cluster) killAgent(a *agentProc) int64 {
	c.t.Helper()
	ns := a.kill(c.t)
	c.mu.Lock()
	a.deathNs = ns
	c.agentKills++
	c.mu.Unlock()
	return ns
}

// stopAgent freezes an agent with SIGSTOP (no heartbeats, no progress).
func (c *cluster) stopAgent(a *agentProc) int64 {
	c.t.Helper()
	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		c.t.Fatal(err)
	}
	ns := time.Now().UnixNano()
	c.mu.Lock()
	a.stops = append(a.stops, ns)
	c.mu.Unlock()
	return ns
}

// contAgent resumes a stopped agent.
func (c *cluster) contAgent(a *agentProc) int64 {
	c.t.Helper()
	ns := time.Now().UnixNano()
	if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		c.t.Fatal(err)
	}
	c.mu.Lock()
	a.conts = append(a.conts, ns)
	c.mu.Unlock()
	return ns
}

// waitAgentConnected waits until /readyz says an agent is connected.
func (c *cluster) waitAgentConnected(timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		ok, agent := c.api.readiness(ctx)
		cancel()
		if ok && agent {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no agent connected within %v", timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitAgentDisconnected waits until /readyz says no agent is connected.
func (c *cluster) waitAgentDisconnected(timeout time.Duration) {
	c.t.Helper()
	if !waitFor(timeout, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		ok, agent := c.api.readiness(ctx)
		return ok && !agent
	}) {
		c.t.Fatalf("an agent is still connected after %v", timeout)
	}
}

// liveAgents are the agents still running.
func (c *cluster) liveAgents() []*agentProc {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*agentProc
	for _, a := range c.agents {
		if !a.exited() {
			out = append(out, a)
		}
	}
	return out
}

// stopAll stops the agents and the sidecar with SIGTERM; the sidecar must
// exit 0 (staged shutdown).
func (c *cluster) stopAll() {
	c.t.Helper()
	for _, a := range c.liveAgents() {
		for len(a.conts) < len(a.stops) {
			c.contAgent(a)
		}
		if code := a.terminate(c.t, 20*time.Second); code != 0 {
			c.t.Errorf("%s exit status %d after SIGTERM", a.name, code)
		}
	}
	if c.sidecar != nil && !c.sidecar.exited() {
		if code := c.sidecar.terminate(c.t, 30*time.Second); code != 0 {
			c.t.Errorf("%s exit status %d after SIGTERM", c.sidecar.name, code)
		}
	}
	c.api.close()
}

// journals reads every agent's journal, with the process each came from.
func (c *cluster) journals() ([]journalEntry, error) { return journalsOf(c) }

// journalsOf reads the journals of every agent of the clusters.
func journalsOf(cs ...*cluster) ([]journalEntry, error) {
	var agents []*agentProc
	for _, c := range cs {
		c.mu.Lock()
		agents = append(agents, c.agents...)
		c.mu.Unlock()
	}
	var out []journalEntry
	for _, a := range agents {
		recs, err := ReadJournal(a.journal)
		if err != nil {
			return nil, err
		}
		for _, r := range recs {
			out = append(out, journalEntry{Record: r, agent: a})
		}
	}
	return out, nil
}

// kills returns the SIGKILLs of the cluster's sidecar so far.
func (c *cluster) kills() []sidecarKill {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]sidecarKill, len(c.sidecarKillNs))
	for i, ns := range c.sidecarKillNs {
		out[i] = sidecarKill{ns: ns, node: c.node}
	}
	return out
}

// journalEntry is a journal record and the agent process that wrote it.
type journalEntry struct {
	Record
	agent *agentProc
}

// raceReports returns the race detector's reports in the child logs.
func (c *cluster) raceReports() string {
	var out bytes.Buffer
	for _, name := range []string{"sidecar.log", "agent.log"} {
		data, _ := os.ReadFile(filepath.Join(c.dir, name))
		for {
			i := bytes.Index(data, []byte("WARNING: DATA RACE"))
			if i < 0 {
				break
			}
			end := bytes.Index(data[i:], []byte("=================="))
			if end < 0 {
				end = min(len(data)-i, 8<<10)
			}
			out.Write(data[i : i+end])
			out.WriteString("\n")
			data = data[i+end:]
		}
	}
	return out.String()
}

// dumpLogs writes the tail of the child logs to the test log.
func (c *cluster) dumpLogs() {
	for _, name := range []string{"sidecar.log", "agent.log"} {
		data, _ := os.ReadFile(filepath.Join(c.dir, name))
		if len(data) > 24<<10 {
			data = data[len(data)-24<<10:]
		}
		c.t.Logf("--- tail of %s:\n%s", name, data)
	}
}
