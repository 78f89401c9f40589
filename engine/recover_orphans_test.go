package engine_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
)

// A run claimed by a sidecar process that is gone runs again as soon as
// the next one has recovered, not when its lease lapses (found by review:
// after a SIGKILL the runs sat still for up to a lease, ten minutes for a
// suspended run's, and the log said nothing). The store's directory lock
// makes every claim it held at open an earlier process's.
func TestRecoverReclaimsTheClaimsOfAnEarlierProcessAtOnce(t *testing.T) {
	dir, res := orphanedClaim(t)
	ctx := context.Background()
	ran := make(chan string, 1)
	exec := newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		ran <- req.RunID
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone}
	})
	var logs syncbuf.Buffer
	s2 := startAgain(t, dir, exec, engine.Config{Lease: 30 * time.Second, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	select {
	case run := <-ran:
		if run != res.RunID {
			t.Fatalf("ran %s, want %s", run, res.RunID)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the earlier process's run did not run again; log:\n%s", logs.String())
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, s2, res.DispatchID) == engine.StatusAcked })
	d, err := s2.LoadDispatch(ctx, res.DispatchID)
	if err != nil || d == nil || len(d.Errors) != 1 || d.Errors[0].Error != engine.ReasonOrphaned {
		t.Fatalf("dispatch %+v %v, want one attempt spent as %q", d, err, engine.ReasonOrphaned)
	}
	for _, want := range []string{
		`msg=reclaimed thread_id=t1 run_id=` + res.RunID,
		`msg="claims of an earlier sidecar process reclaimed" count=1 dead_lettered=0 requeued=1`,
	} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log lacks %s:\n%s", want, logs.String())
		}
	}
}

// orphanedClaim leaves in a new data directory the claim of a process
// that is gone: its mailbox never started, its claim made as a suspended
// run's would be (a ten-minute lease).
func orphanedClaim(t *testing.T) (string, engine.SubmitResult) {
	t.Helper()
	dir := t.TempDir()
	ctx := context.Background()
	s1, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	idle := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone}
	}
	m1, err := engine.New(s1, newFake(0, idle), engine.Config{ConsumerID: "gone"}) // no slot: nothing claimed inline
	if err != nil {
		t.Fatal(err)
	}
	res, err := m1.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t1", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	if d, err := s1.Claim(ctx, "t1", "gone", 10*time.Minute, time.Now().UnixMilli()); err != nil || d == nil || d.DispatchID != res.DispatchID {
		cur, _ := s1.LoadDispatch(ctx, res.DispatchID)
		t.Fatalf("claim: %+v %v; dispatch %+v", d, err, cur)
	}
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	return dir, res
}

// KeepOrphanedClaims (--reclaim-orphans=false) leaves such a claim to its
// lease, as on a shared store: for agents whose runs may outlive their
// connection (found by review: the opt-out had no test).
func TestRecoverKeepsTheClaimsOfAnEarlierProcessWhenTold(t *testing.T) {
	dir, res := orphanedClaim(t)
	exec := newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		t.Errorf("run %s executed while its claim should hold", req.RunID)
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone}
	})
	s2 := startAgain(t, dir, exec, engine.Config{KeepOrphanedClaims: true}) // recovery is done when Start returns
	d, err := s2.LoadDispatch(context.Background(), res.DispatchID)
	if err != nil || d == nil || d.Status != engine.StatusClaimed || d.ClaimedBy != "gone" || len(d.Errors) != 0 {
		t.Fatalf("after recovery: %+v %v, want the earlier process's claim untouched", d, err)
	}
}

// startAgain opens the store in dir and starts a mailbox on it, as the
// next sidecar process would; both stop when the test ends.
func startAgain(t *testing.T, dir string, exec *fakeExecutor, cfg engine.Config) *badgerstore.Store {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	mb, err := engine.New(s, exec, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := mb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := mb.Stop(ctx); err != nil {
			t.Error(err)
		}
	})
	return s
}
