package badgerstore_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

func isConflict(err error) bool { return errors.Is(err, engine.ErrVersionConflict) }

// crashCycles is how many SIGKILL cycles TestCrashKillReopen runs; `make
// crash` raises it with MAILBOX_CRASH_CYCLES.
func crashCycles() int {
	if n, err := strconv.Atoi(os.Getenv("MAILBOX_CRASH_CYCLES")); err == nil && n > 0 {
		return n
	}
	return 20
}

// TestCrashKillReopen runs a child process that hammers the store on one
// data directory, kills it with SIGKILL at a random moment, reopens the
// directory and checks that every operation the child saw succeed is
// there, nothing is duplicated and Verify finds no mismatch.
func TestCrashKillReopen(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	var total struct{ enq, acks, nacks, msgs int }
	for cycle := range crashCycles() {
		lines := runAndKill(t, dir, cycle, time.Duration(30+rng.IntN(300))*time.Millisecond)
		s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
		if err != nil {
			t.Fatalf("cycle %d: reopen: %v", cycle, err)
		}
		ctx := context.Background()
		seenMsg := map[string]bool{}
		for _, l := range lines {
			f := strings.Fields(l)
			switch f[0] {
			case "E":
				total.enq++
				if d, err := s.LoadDispatch(ctx, f[1]); err != nil || d == nil {
					t.Errorf("cycle %d: enqueued dispatch %s lost (err %v)", cycle, f[1], err)
				}
			case "A":
				total.acks++
				d, err := s.LoadDispatch(ctx, f[1])
				if err != nil || d == nil || d.Status != engine.StatusAcked {
					t.Errorf("cycle %d: acked dispatch %s is %+v (err %v)", cycle, f[1], d, err)
				}
			case "N":
				total.nacks++
				att, _ := strconv.Atoi(f[2])
				d, err := s.LoadDispatch(ctx, f[1])
				if err != nil || d == nil || d.AttemptCount < uint32(att) {
					t.Errorf("cycle %d: nacked dispatch %s lost its attempt %d: %+v (err %v)", cycle, f[1], att, d, err)
				}
			case "M":
				total.msgs++
				if seenMsg[f[2]] {
					t.Errorf("cycle %d: message %s reported twice", cycle, f[2])
				}
				seenMsg[f[2]] = true
				if m, err := s.LoadMessage(ctx, f[1], f[2]); err != nil || m == nil {
					t.Errorf("cycle %d: appended message %s/%s lost (err %v)", cycle, f[1], f[2], err)
				}
			}
		}
		rep, err := s.Verify(ctx)
		if err != nil {
			t.Fatalf("cycle %d: verify: %v", cycle, err)
		}
		if len(rep.Problems) > 0 {
			t.Fatalf("cycle %d: verify found problems: %v", cycle, rep.Problems)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("cycle %d: close: %v", cycle, err)
		}
		if t.Failed() {
			return
		}
	}
	t.Logf("%d cycles: %d enqueues, %d acks, %d nacks, %d messages confirmed after SIGKILL", crashCycles(), total.enq, total.acks, total.nacks, total.msgs)
	if total.enq == 0 || total.acks == 0 || total.msgs == 0 {
		t.Fatalf("the child did too little work to prove anything: %+v", total)
	}
}

// runAndKill starts the crash child on dir, lets it work for d after it
// is ready, kills it with SIGKILL and returns every line it printed.
func runAndKill(t *testing.T, dir string, cycle int, d time.Duration) []string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashEnv+"="+dir, fmt.Sprintf("MAILBOX_CRASH_CYCLE=%d", cycle))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	var lines []string
	ready := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for sc.Scan() {
			if sc.Text() == "READY" {
				close(ready)
				continue
			}
			lines = append(lines, sc.Text())
		}
	}()
	select {
	case <-ready:
	case <-done:
		_ = cmd.Wait()
		t.Fatalf("cycle %d: child exited before ready: %s", cycle, stderr.String())
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("cycle %d: child not ready in 30s", cycle)
	}
	time.Sleep(d) // let it work; the kill lands at a random moment
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("cycle %d: kill: %v", cycle, err)
	}
	<-done
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("cycle %d: child did not die by SIGKILL: %v; stderr: %s", cycle, err, stderr.String())
	}
	return lines
}
