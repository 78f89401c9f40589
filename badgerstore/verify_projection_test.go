package badgerstore_test

import (
	"context"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// TestVerifyChecksThreadProjections: Verify compares each thread
// projection with the run records and the message log, and reports each
// kind of damage a planted projection (or a deleted one) carries.
func TestVerifyChecksThreadProjections(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	run := func(id, thread string, st engine.RunStatus) *engine.RunRecord {
		return &engine.RunRecord{RunID: id, ThreadID: thread, AgentID: "a", Status: st, CreatedAt: 1, UpdatedAt: 1}
	}
	checkpoint := func(c engine.Checkpoint) {
		t.Helper()
		if _, err := s.Checkpoint(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	// t1: two messages, run r2 done, then r1 running (active, open, latest).
	checkpoint(engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{{ID: "m1", Role: engine.RoleUser}, {ID: "m2", Role: engine.RoleUser}}, Run: run("r2", "t1", engine.RunDone)})
	checkpoint(engine.Checkpoint{ThreadID: "t1", ExpectedCount: 2, Run: run("r1", "t1", engine.RunRunning)})
	// t2: run r3 waiting (open, latest).
	checkpoint(engine.Checkpoint{ThreadID: "t2", Run: run("r3", "t2", engine.RunWaiting)})
	verifyClean(t, s)
	good, ok, err := s.RawGet(badgerstore.ThreadKey("t1"))
	if err != nil || !ok {
		t.Fatalf("thread t1 projection: %v %v", ok, err)
	}

	for _, c := range []struct {
		name, projection, want string
	}{
		{"thread id", `{"id":"t9","active_run_id":"r1","open_run_id":"r1","open_run_status":"running","latest_run_id":"r1","message_count":2}`,
			`thread record "t1" names thread "t9"`},
		{"message count", `{"id":"t1","active_run_id":"r1","open_run_id":"r1","open_run_status":"running","latest_run_id":"r1","message_count":3}`,
			"thread t1 projection says 3 messages, log counter 2"},
		{"active run missing", `{"id":"t1","active_run_id":"r9","open_run_id":"r1","open_run_status":"running","latest_run_id":"r1","message_count":2}`,
			"thread t1 active_run_id names missing run r9"},
		{"active run of another thread", `{"id":"t1","active_run_id":"r3","latest_run_id":"r1","message_count":2}`,
			"thread t1 active_run_id names run r3 of thread t2"},
		{"active run not running", `{"id":"t1","active_run_id":"r2","open_run_id":"r1","open_run_status":"running","latest_run_id":"r1","message_count":2}`,
			"thread t1 active_run_id names run r2, which is done, not running"},
		{"open run missing", `{"id":"t1","active_run_id":"r1","open_run_id":"r9","open_run_status":"running","latest_run_id":"r1","message_count":2}`,
			"thread t1 open_run_id names missing run r9"},
		{"open run of another thread", `{"id":"t1","active_run_id":"r1","open_run_id":"r3","open_run_status":"waiting","latest_run_id":"r1","message_count":2}`,
			"thread t1 open_run_id names run r3 of thread t2"},
		{"open run done", `{"id":"t1","open_run_id":"r2","open_run_status":"done","latest_run_id":"r1","message_count":2}`,
			"thread t1 open_run_id names run r2, which is done"},
		{"open run status", `{"id":"t1","active_run_id":"r1","open_run_id":"r1","open_run_status":"waiting","latest_run_id":"r1","message_count":2}`,
			"thread t1 open_run_status is waiting, its open run r1 is running"},
		{"open run status without open run", `{"id":"t1","open_run_status":"created","latest_run_id":"r1","message_count":2}`,
			"thread t1 has open_run_status created but no open run"},
		{"latest run missing", `{"id":"t1","active_run_id":"r1","open_run_id":"r1","open_run_status":"running","latest_run_id":"r9","message_count":2}`,
			"thread t1 latest_run_id names missing run r9"},
		{"latest run of another thread", `{"id":"t1","active_run_id":"r1","open_run_id":"r1","open_run_status":"running","latest_run_id":"r3","message_count":2}`,
			"thread t1 latest_run_id names run r3 of thread t2"},
		{"no latest run", `{"id":"t1","active_run_id":"r1","open_run_id":"r1","open_run_status":"running","message_count":2}`,
			"but no latest_run_id"},
		{"no projection", "",
			"its thread t1 has no projection"},
		{"no projection of a message log", "",
			"thread t1 has a message counter but no projection"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var err error
			if c.projection == "" {
				err = s.RawDelete(badgerstore.ThreadKey("t1"))
			} else {
				err = s.RawSet(badgerstore.ThreadKey("t1"), []byte(c.projection))
			}
			if err != nil {
				t.Fatal(err)
			}
			rep, err := s.Verify(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(strings.Join(rep.Problems, "\n"), c.want) {
				t.Errorf("damaged projection %s: %q not reported: %v", c.projection, c.want, rep.Problems)
			}
			if err := s.RawSet(badgerstore.ThreadKey("t1"), good); err != nil {
				t.Fatal(err)
			}
			verifyClean(t, s)
		})
	}
}
