package badgerstore

import (
	"context"
	"testing"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A run record or thread projection rewritten byte for byte (an agent's
// checkpoint within the second its run started) is not written again:
// the key keeps its Badger version; a real change is written.
func TestUnchangedRecordIsNotRewritten(t *testing.T) {
	s, err := Open(Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	version := func(key []byte) uint64 {
		t.Helper()
		var v uint64
		if err := s.db.View(func(txn *badger.Txn) error {
			item, err := txn.Get(key)
			if err != nil {
				return err
			}
			v = item.Version()
			return nil
		}); err != nil {
			t.Fatalf("read %q: %v", key, err)
		}
		return v
	}
	run := engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunRunning, CreatedAt: 1, UpdatedAt: 5}
	if err := s.CreateRun(ctx, run); err != nil {
		t.Fatal(err)
	}
	runV, threadV := version(runKey("r1")), version(threadKey("t1"))
	same := run
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", CreatedAt: 5000, Run: &same}); err != nil {
		t.Fatal(err)
	}
	if v, tv := version(runKey("r1")), version(threadKey("t1")); v != runV || tv != threadV {
		t.Fatalf("an unchanged run rewrote its record (version %d → %d) or its projection (%d → %d)", runV, v, threadV, tv)
	}
	changed := run
	changed.Steps = 2
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", CreatedAt: 6000, Run: &changed}); err != nil {
		t.Fatal(err)
	}
	if v := version(runKey("r1")); v <= runV {
		t.Fatalf("a changed run was not written (version %d → %d)", runV, v)
	}
	if got, err := s.LoadRun(ctx, "r1"); err != nil || got == nil || got.Steps != 2 {
		t.Fatalf("run after the change: %+v %v", got, err)
	}
}
