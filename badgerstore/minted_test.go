package badgerstore_test

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Ids the engine marks as minted (engine.Minted) are not looked up: the
// write trusts that no record holds them. The test breaks that promise on
// purpose to show it: a duplicate marked minted is stored where the same
// duplicate unmarked is refused, and a run marked new replaces its stored
// version without reading it (the old version's index entries stay
// behind, which Verify finds). The stores are thrown away unverified.
func TestMintedIDsAreNotLookedUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	submit := func(dispatch, msgID string, minted engine.Minted) error {
		t.Helper()
		n, err := s.MessageCount(ctx, "t")
		if err != nil {
			t.Fatal(err)
		}
		d := queued(dispatch, "t", 1000)
		run := &engine.RunRecord{RunID: d.RunID, ThreadID: "t", AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
		c := engine.Checkpoint{ThreadID: "t", ExpectedCount: n, CreatedAt: 1000, Run: run, Minted: minted,
			Messages: []engine.Message{{ID: msgID, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
		_, _, err = s.Submit(ctx, c, d)
		return err
	}
	if err := submit("d1", "m1", engine.Minted{}); err != nil {
		t.Fatal(err)
	}
	// Unmarked, each duplicate is refused.
	if err := submit("d2", "m1", engine.Minted{}); !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("duplicate message id, unmarked: %v, want ErrAlreadyExists", err)
	}
	if err := submit("d1", "m2", engine.Minted{}); !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("duplicate dispatch id, unmarked: %v, want ErrAlreadyExists", err)
	}
	// Marked minted, nothing is looked up.
	if err := submit("d2", "m1", engine.Minted{MessageIDs: true}); err != nil {
		t.Fatalf("message id marked minted: %v, want it stored unchecked", err)
	}
	if err := submit("d1", "m3", engine.Minted{DispatchID: true}); err != nil {
		t.Fatalf("dispatch id marked minted: %v, want it stored unchecked", err)
	}

	// A run written again under a later created_at (its index keys
	// change): read first, its old index entries are replaced; marked
	// new, they are left behind.
	for _, tc := range []struct {
		minted    engine.Minted
		wantStray bool
	}{{engine.Minted{}, false}, {engine.Minted{RunID: true}, true}} {
		s := mustOpen(t, badgerstore.Options{InMemory: true})
		write := func(created int64, m engine.Minted) {
			t.Helper()
			run := &engine.RunRecord{RunID: "r1", ThreadID: "t", AgentID: "a", Status: engine.RunCreated, CreatedAt: created, UpdatedAt: created}
			if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t", Run: run, Minted: m}); err != nil {
				t.Fatal(err)
			}
		}
		write(1, engine.Minted{})
		write(5, tc.minted)
		rep, err := s.Verify(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stray := strings.Contains(strings.Join(rep.Problems, "\n"), "r1")
		if stray != tc.wantStray {
			t.Fatalf("run rewritten with %+v: problems %q, want stray index entries of r1: %v", tc.minted, rep.Problems, tc.wantStray)
		}
	}
}

// writerReads is mailbox_store_writer_lsm_reads_total.
func writerReads(t *testing.T, s *badgerstore.Store) int {
	t.Helper()
	var b bytes.Buffer
	s.Metrics().WritePrometheus(&b)
	for _, line := range strings.Split(b.String(), "\n") {
		if v, ok := strings.CutPrefix(line, "mailbox_store_writer_lsm_reads_total "); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no mailbox_store_writer_lsm_reads_total in\n%s", b.String())
	return 0
}

// Each minted id saves its read of the LSM tree, the run's included (its
// record is written without looking whether it changes): a submit on a
// new thread with one message, its run and its dispatch marked minted
// reads three keys fewer than the same submit unmarked.
func TestMintedIDsSaveTheirReads(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	reads := func(thread string, minted engine.Minted) int {
		t.Helper()
		before := writerReads(t, s)
		d := queued("d-"+thread, thread, 1000)
		run := &engine.RunRecord{RunID: d.RunID, ThreadID: thread, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
		c := engine.Checkpoint{ThreadID: thread, CreatedAt: 1000, Run: run, Minted: minted,
			Messages: []engine.Message{{ID: "m-" + thread, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
		if _, _, err := s.Submit(ctx, c, d); err != nil {
			t.Fatal(err)
		}
		return writerReads(t, s) - before
	}
	reads("warm-up", engine.Minted{}) // keys every submit shares (counters) into the cache
	unmarked := reads("a", engine.Minted{})
	marked := reads("b", engine.Minted{MessageIDs: true, RunID: true, DispatchID: true})
	if unmarked-marked != 3 {
		t.Fatalf("LSM reads of a submit: %d unmarked, %d with every id minted; want 3 fewer", unmarked, marked)
	}
}
