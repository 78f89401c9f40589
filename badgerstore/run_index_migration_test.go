package badgerstore_test

import (
	"context"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A data directory written before the index of runs by status was
// narrowed to waiting runs (S keys for every run, no W keys) is migrated
// at Open: the waiting run is listed again by status, the old index is
// gone (Verify reports any S key), and the other statuses are still
// listed (from the records).
func TestOpenMigratesTheRunStatusIndex(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	runs := []engine.RunRecord{
		{RunID: "r-wait", ThreadID: "t-1", AgentID: "a", Status: engine.RunWaiting, CreatedAt: 100, UpdatedAt: 100},
		{RunID: "r-done", ThreadID: "t-1", AgentID: "a", Status: engine.RunDone, CreatedAt: 101, UpdatedAt: 101},
		{RunID: "r-run", ThreadID: "t-2", AgentID: "a", Status: engine.RunRunning, CreatedAt: 102, UpdatedAt: 102},
	}
	for _, r := range runs {
		if err := s.CreateRun(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	// Rewrite the indexes as the earlier version left them.
	for _, r := range runs {
		if err := s.RawSet(badgerstore.OldRunStatusKey(r.Status, r.CreatedAt, r.RunID), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.RawDelete(badgerstore.RunWaitingKey(100, "r-wait")); err != nil {
		t.Fatal(err)
	}
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) != 4 {
		t.Fatalf("the planted old layout: verify %v %v, want 3 stray S keys and a missing W key", rep.Problems, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if rep, err := s.Verify(ctx); err != nil || len(rep.Problems) > 0 {
		t.Fatalf("after the migration: verify %v %v", rep.Problems, err)
	}
	for status, want := range map[engine.RunStatus]string{engine.RunWaiting: "r-wait", engine.RunDone: "r-done", engine.RunRunning: "r-run"} {
		p, err := s.ListRuns(ctx, engine.RunQuery{Status: status})
		if err != nil || p.Total != 1 || len(p.Items) != 1 || p.Items[0].RunID != want {
			t.Fatalf("ListRuns(%s) = %+v %v, want %s alone", status, p, err, want)
		}
	}
}
