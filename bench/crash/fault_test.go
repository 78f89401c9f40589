package crash

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// waitFor polls cond every 20 ms until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startsOf returns the journal start records of dispatch id, oldest first.
func (c *cluster) startsOf(id string) []journalEntry {
	entries, err := c.journals()
	if err != nil {
		c.t.Fatal(err)
	}
	var out []journalEntry
	for _, e := range entries {
		if e.Event == EventStart && e.DispatchID == id {
			out = append(out, e)
		}
	}
	return out
}

// submitLong submits one long command on each of n fresh threads and
// waits until the agents started them all; it returns the dispatches.
func submitLong(t *testing.T, c *cluster, w *workload, n int, cmd func() Command) []*accepted {
	t.Helper()
	var out []*accepted
	for i := range n {
		thread := fmt.Sprintf("%s-long%d-%d", w.o.prefix, len(w.rec.all()), i)
		if err := w.background(thread, cmd()); err != nil {
			t.Fatalf("submit: %v", err)
		}
		all := w.rec.all()
		out = append(out, all[len(all)-1])
	}
	for _, a := range out {
		if !waitFor(10*time.Second, func() bool { return len(c.startsOf(a.ID)) > 0 }) {
			t.Fatalf("dispatch %s never started", a.ID)
		}
	}
	return out
}

// leaseUntil reads a claimed dispatch's lease expiry (Unix ms of the
// sidecar's clock).
func leaseUntil(t *testing.T, c *cluster, id string) int64 {
	t.Helper()
	var d dispatch
	if err := c.api.get("/v1/dispatches/"+url.PathEscape(id), &d); err != nil {
		t.Fatal(err)
	}
	if d.Status != "claimed" || d.LeaseUntil == 0 {
		t.Fatalf("dispatch %s is %s with lease_until %d, want claimed", id, d.Status, d.LeaseUntil)
	}
	return d.LeaseUntil
}

// smallWorkload is a background workload for the fault tests.
func smallWorkload(prefix string) workloadOptions {
	o := defaultWorkload(prefix)
	o.threads, o.workers = 12, 3
	return o
}

// TestFaultDiskFull fills the data directory's file system (a 256 MiB
// tmpfs) under the workload: writes fail with 503 unavailable and
// /readyz turns 503; a sidecar killed and restarted on the full disk
// fails closed (or comes up not ready); once the ballast is removed the
// sidecar recovers and every acknowledged dispatch, message and
// checkpoint is there.
func TestFaultDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the full-disk test mounts a tmpfs: it needs root (CI runs as root)")
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", mnt).Run() })

	c := newCluster(t, clusterOptions{dataDir: filepath.Join(mnt, "data")})
	c.startSidecar()
	c.resetRecoveries()
	c.startAgent()
	c.waitAgentConnected(20 * time.Second)
	rec := newRecorder()
	w := newWorkload(rec, smallWorkload("disk"), c.api)
	w.start()
	defer w.halt()
	time.Sleep(time.Second)

	// Fill the file system until less than the store's minimum (48 MiB by
	// default) is free.
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	ballast := filepath.Join(mnt, "ballast")
	fill := int64(st.Bavail)*int64(st.Bsize) - 24<<20
	if out, err := exec.Command("fallocate", "-l", fmt.Sprint(fill), ballast).CombinedOutput(); err != nil {
		t.Fatalf("fallocate: %v: %s", err, out)
	}
	probe := func() error {
		return w.background(w.threads[0], Command{Nonce: w.newNonce(), Verb: VerbDone})
	}
	var err error
	if !waitFor(5*time.Second, func() bool { err = probe(); return statusOf(err) == 503 }) {
		t.Fatalf("a submit on a full disk: %v, want 503", err)
	}
	if ae := err.(*apiError); ae.Code != "unavailable" || !strings.Contains(ae.Message, "disk full") {
		t.Errorf("a submit on a full disk: %v, want code unavailable naming the full disk", err)
	}
	if ok, _ := c.api.readiness(context.Background()); ok {
		t.Error("/readyz is 200 on a full disk")
	}
	// Full for longer than a lease: runs that cannot record their result
	// keep their claim until it lapses, and the sweep cannot reclaim yet.
	fullUntil := time.Now().Add(2500 * time.Millisecond)
	for time.Now().Before(fullUntil) {
		if err := probe(); statusOf(err) != 503 {
			t.Errorf("a submit while the disk is full: %v, want 503", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Killed and restarted on the full disk, the sidecar must not come up
	// ready: it fails closed (startup recovery cannot write) or stays not
	// ready.
	rec.sidecarKilled(c.api)
	c.killSidecar()
	rec.sidecarKilled(c.api) // a request sent between the two saw the kill too
	p := c.spawnSidecar()
	upNotReady := false
	waitFor(15*time.Second, func() bool {
		if p.exited() {
			return true
		}
		resp, err := c.api.send(context.Background(), "GET", "/readyz", nil)
		if err == nil {
			resp.Body.Close()
			t.Errorf("a sidecar restarted on a full disk answers /readyz 200")
			return true
		}
		upNotReady = statusOf(err) == 503
		return false
	})
	failedClosed := p.exited()
	if failedClosed {
		log, _ := os.ReadFile(p.logPath)
		if p.err == nil || !strings.Contains(string(log), "disk full") {
			t.Errorf("the sidecar restarted on a full disk exited with %v, its log not naming the full disk", p.err)
		}
	} else if !upNotReady {
		t.Errorf("the sidecar restarted on a full disk neither exited nor answered /readyz 503")
	}

	// Space returns: the sidecar recovers.
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	spaceBack := time.Now()
	if failedClosed {
		c.startSidecar()
	} else {
		c.waitReady(p, 30*time.Second)
	}
	recovery := time.Since(spaceBack)
	c.waitAgentConnected(20 * time.Second)
	if !waitFor(5*time.Second, func() bool { return probe() == nil }) {
		t.Fatalf("submits still fail after space returned")
	}
	time.Sleep(time.Second)
	w.halt()

	r := finish(t, c, rec, checkOptions{})
	r.name, r.cycles = "disk full", 1
	r.recoveries = []time.Duration{recovery}
	t.Logf("restart on the full disk: failed closed %v; space back → ready %v", failedClosed, recovery.Round(time.Millisecond))
	record(t, r)
}

// TestFaultAgentStall freezes the agent with SIGSTOP (no heartbeats):
// the sidecar fails its runs after three missed heartbeats and retries
// them — on the same agent once it is continued, and on a second agent
// while it stays frozen. A frozen attempt counts as ended when it was
// frozen (its connection is gone; nothing it does later is accepted).
func TestFaultAgentStall(t *testing.T) {
	const hb = 200 * time.Millisecond
	c := newCluster(t, clusterOptions{flags: []string{"--heartbeat", hb.String()}, maxRuns: 4})
	c.startSidecar()
	c.resetRecoveries()
	a := c.startAgent()
	c.waitAgentConnected(20 * time.Second)
	rec := newRecorder()
	w := newWorkload(rec, smallWorkload("stall"), c.api)
	long := func() Command { return Command{Nonce: w.newNonce(), Verb: VerbCheckpoint, Arg: 6, Arg2: 300} }

	// stallFailed waits until every dispatch of ds had its first attempt
	// failed, and checks that it failed for the silence: no sooner than
	// the heartbeat allows, within seconds.
	stallFailed := func(ds []*accepted, stop int64) {
		t.Helper()
		for _, d := range ds {
			var got dispatch
			ok := waitFor(10*time.Second, func() bool {
				got = dispatch{}
				if err := c.api.get("/v1/dispatches/"+url.PathEscape(d.ID), &got); err != nil {
					return false
				}
				return len(got.Errors) > 0
			})
			if !ok {
				t.Fatalf("dispatch %s: no failed attempt 10 s after its agent froze: %+v", d.ID, got)
			}
			e := got.Errors[0]
			after := time.Duration(e.At*int64(time.Millisecond) - stop)
			t.Logf("dispatch %s: attempt %d failed %v after the agent froze: %s", d.ID, e.Attempt, after.Round(time.Millisecond), e.Error)
			if after < 2*hb || after > 5*time.Second {
				t.Errorf("dispatch %s failed %v after its agent froze; want between %v and 5s (three missed heartbeats of %v)", d.ID, after, 2*hb, hb)
			}
		}
	}

	// Phase 1: frozen, then continued: the same agent retries.
	ds := submitLong(t, c, w, 4, long)
	stop := c.stopAgent(a)
	stallFailed(ds, stop)
	cont := c.contAgent(a)
	for _, d := range ds {
		if !waitFor(10*time.Second, func() bool {
			for _, s := range c.startsOf(d.ID) {
				if s.StartNs > cont && s.agent == a {
					return true
				}
			}
			return false
		}) {
			t.Fatalf("dispatch %s not retried by the continued agent", d.ID)
		}
	}

	// Phase 2: frozen; a second agent takes the retries.
	ds2 := submitLong(t, c, w, 4, long)
	stop2 := c.stopAgent(a)
	b := c.startAgent()
	stallFailed(ds2, stop2)
	for _, d := range ds2 {
		if !waitFor(10*time.Second, func() bool {
			for _, s := range c.startsOf(d.ID) {
				if s.agent == b {
					return true
				}
			}
			return false
		}) {
			t.Fatalf("dispatch %s not retried by the second agent", d.ID)
		}
	}
	c.contAgent(a)
	// Some mixed work over both agents, then the checks.
	w.start()
	time.Sleep(1500 * time.Millisecond)
	w.halt()

	entries, err := c.journals()
	if err != nil {
		t.Fatal(err)
	}
	r := finish(t, c, rec, checkOptions{stallCut: true})
	// The frozen attempts never completed: the sidecar had closed their
	// connection. Once continued, each ends lost — or transient when the
	// agent's handler saw its checkpoint fail on the closed connection
	// before the SDK saw the connection drop (a race inside the agent:
	// either way no FINISH reached the sidecar).
	frozen := 0
	final, _ := c.journals()
	for _, e := range entries {
		if e.Event != EventStart || e.agent != a {
			continue
		}
		for _, stopNs := range []int64{stop, stop2} {
			for _, f := range final {
				if f.Event == EventEnd && f.SessionID == e.SessionID && e.StartNs < stopNs && f.EndNs > stopNs {
					frozen++
					if f.Outcome != OutcomeLost && f.Outcome != OutcomeTransient {
						t.Errorf("attempt %s of %s was frozen by SIGSTOP, yet ended %s (its connection should have been closed)", e.SessionID, e.DispatchID, f.Outcome)
					}
				}
			}
		}
	}
	if frozen < len(ds)+len(ds2) {
		t.Errorf("%d frozen attempts in the journals, want at least %d", frozen, len(ds)+len(ds2))
	}
	r.name, r.cycles = "agent stall (SIGSTOP)", 2
	record(t, r)
}

// TestFaultClockJumpForward restarts a killed sidecar with its clock 10
// minutes ahead while runs are claimed: their leases count as expired at
// once and the runs are retried well before the leases would have lapsed
// in real time; nothing is lost and no runs overlap.
func TestFaultClockJumpForward(t *testing.T) {
	// The killed sidecar's claims are left to lapse (not reclaimed at the
	// restart, the default on Badger): it is their leases under the
	// jumped clock that this tests.
	c := newCluster(t, clusterOptions{flags: []string{"--lease", "5s", "--lease-renewal", "1s", "--suspended-lease", "6s", "--reclaim-orphans=false"}})
	c.startSidecar()
	c.resetRecoveries()
	c.startAgent()
	c.waitAgentConnected(20 * time.Second)
	rec := newRecorder()
	w := newWorkload(rec, smallWorkload("fwd"), c.api)
	ds := submitLong(t, c, w, 4, func() Command { return Command{Nonce: w.newNonce(), Verb: VerbSleep, Arg: 3000} })
	w.start()
	time.Sleep(300 * time.Millisecond)
	leases := map[string]int64{}
	for _, d := range ds {
		leases[d.ID] = leaseUntil(t, c, d.ID)
	}
	rec.sidecarKilled(c.api)
	kill := c.killSidecar()
	rec.sidecarKilled(c.api) // a request sent between the two saw the kill too
	c.startSidecar("MAILBOX_SIDECAR_TEST_CLOCK_SKEW=10m")
	for _, d := range ds {
		var again journalEntry
		if !waitFor(15*time.Second, func() bool {
			for _, s := range c.startsOf(d.ID) {
				if s.StartNs > kill {
					again = s
					return true
				}
			}
			return false
		}) {
			t.Fatalf("claimed dispatch %s not retried after the restart with the clock 10 min ahead", d.ID)
		}
		if lease := leases[d.ID] * int64(time.Millisecond); again.StartNs >= lease {
			t.Errorf("dispatch %s retried at %v, not before its lease lapsed in real time (%v): the forward clock did not expire it",
				d.ID, ts(again.StartNs), ts(lease))
		}
	}
	time.Sleep(time.Second)
	w.halt()
	r := finish(t, c, rec, checkOptions{leasesJumped: true})
	r.name, r.cycles = "clock +10m at restart", 1
	record(t, r)
}

// TestFaultClockJumpBackward restarts a killed sidecar with its clock 3 s
// behind while runs are claimed: their leases last 3 s longer (no retry
// before lease + 3 s), and then the runs are retried; nothing is lost.
func TestFaultClockJumpBackward(t *testing.T) {
	const skew = 3 * time.Second
	c := newCluster(t, clusterOptions{flags: []string{"--reclaim-orphans=false"}}) // as in TestFaultClockJumpForward
	c.startSidecar()
	c.resetRecoveries()
	c.startAgent()
	c.waitAgentConnected(20 * time.Second)
	rec := newRecorder()
	w := newWorkload(rec, smallWorkload("back"), c.api)
	ds := submitLong(t, c, w, 4, func() Command { return Command{Nonce: w.newNonce(), Verb: VerbSleep, Arg: 4000} })
	w.start()
	time.Sleep(300 * time.Millisecond)
	leases := map[string]int64{}
	for _, d := range ds {
		leases[d.ID] = leaseUntil(t, c, d.ID)
	}
	rec.sidecarKilled(c.api)
	kill := c.killSidecar()
	rec.sidecarKilled(c.api) // a request sent between the two saw the kill too
	c.startSidecar("MAILBOX_SIDECAR_TEST_CLOCK_SKEW=-" + skew.String())
	for _, d := range ds {
		var again journalEntry
		if !waitFor(20*time.Second, func() bool {
			for _, s := range c.startsOf(d.ID) {
				if s.StartNs > kill {
					again = s
					return true
				}
			}
			return false
		}) {
			t.Fatalf("claimed dispatch %s not retried after the restart with the clock %v behind", d.ID, skew)
		}
		// The lease read before the kill is a lower bound of the last one
		// written; the skewed clock passes it skew later.
		if earliest := leases[d.ID]*int64(time.Millisecond) + int64(skew); again.StartNs < earliest {
			t.Errorf("dispatch %s retried at %v, before its lease (%v) plus the backward jump (%v) had passed",
				d.ID, ts(again.StartNs), ts(leases[d.ID]*int64(time.Millisecond)), skew)
		}
	}
	time.Sleep(time.Second)
	w.halt()
	r := finish(t, c, rec, checkOptions{})
	r.name, r.cycles = "clock -3s at restart", 1
	record(t, r)
}
