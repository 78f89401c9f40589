package badgerstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A run record or thread projection rewritten byte for byte (an agent's
// checkpoint within the second its run started) is not written again:
// the key keeps its Badger version; a real change is written.
func TestUnchangedRecordIsNotRewritten(t *testing.T) {
	s := openInMemory(t)
	ctx := context.Background()
	version := func(key []byte) uint64 { return keyVersion(t, s, key) }
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

// A key an operation sets and then deletes, with nothing below it, leaves
// no deletion marker: a foreground submit on an idle thread enqueues and
// claims its dispatch in one operation, and its queue entries and queued
// count never reach Badger. A key that existed before the operation is
// deleted with a marker, as before.
func TestAKeySetAndDeletedByOneOperationLeavesNoMarker(t *testing.T) {
	s := openInMemory(t)
	ctx := context.Background()
	// entries lists every version Badger holds under prefix, deletion
	// markers included.
	entries := func(prefix []byte) (live, markers int) {
		t.Helper()
		if err := s.db.View(func(txn *badger.Txn) error {
			opts := badger.DefaultIteratorOptions
			opts.AllVersions, opts.Prefix = true, prefix
			it := txn.NewIterator(opts)
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				if it.Item().IsDeletedOrExpired() {
					markers++
				} else {
					live++
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return live, markers
	}
	run := &engine.RunRecord{RunID: "run-f1", ThreadID: "t1", AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1}
	c := engine.Checkpoint{ThreadID: "t1", CreatedAt: 1000, Run: run, Messages: []engine.Message{{ID: "m1", Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
	d := engine.Dispatch{DispatchID: "f1", ThreadID: "t1", RunID: "run-f1", Priority: engine.DefaultPriority, AvailableAt: 1000, CreatedAt: 1000, MaxAttempts: 5}
	if _, out, err := s.SubmitIdle(ctx, c, d, "me", time.Minute, "inst", 1000); err != nil || out == nil {
		t.Fatalf("SubmitIdle: %v %v", out, err)
	}
	for _, p := range [][]byte{{pQueue}, {pAvail}, countKey(engine.StatusQueued), {pReady}, {pThreadQ}} {
		if live, markers := entries(p); live != 0 || markers != 0 {
			t.Fatalf("prefix %q: %d live entries and %d deletion markers after an idle submit, want none", p, live, markers)
		}
	}
	if live, _ := entries(countKey(engine.StatusClaimed)); live != 1 {
		t.Fatalf("claimed count: %d entries, want 1", live)
	}
	verifyAll(t, s)

	// Queued in one commit, claimed in the next: the queue entry existed,
	// and its deletion is a marker.
	if _, err := s.Enqueue(ctx, engine.Dispatch{DispatchID: "f2", ThreadID: "t2", RunID: "run-f2", Priority: engine.DefaultPriority, AvailableAt: 1000, CreatedAt: 1000, MaxAttempts: 5}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Claim(ctx, "t2", "me", time.Minute, 1000); err != nil || got == nil {
		t.Fatalf("claim: %v %v", got, err)
	}
	// (All versions: the entry as enqueued, then its marker.)
	if live, markers := entries(threadPrefix(pQueue, "t2")); live != 1 || markers != 1 {
		t.Fatalf("t2's queue: %d live versions, %d markers; want the enqueued entry and its marker", live, markers)
	}
	verifyAll(t, s)
}

func verifyAll(t *testing.T, s *Store) {
	t.Helper()
	rep, err := s.Verify(context.Background())
	if err != nil || len(rep.Problems) > 0 {
		t.Fatalf("verify: %v %v", rep.Problems, err)
	}
}

// A key an operation changes and then puts back as it found it is not
// written: a complete that claims the thread's next dispatch takes the
// claimed count down and up again, and the count keeps its version.
func TestAKeyPutBackByOneOperationIsNotWritten(t *testing.T) {
	s := openInMemory(t)
	ctx := context.Background()
	version := func(key []byte) uint64 { return keyVersion(t, s, key) }
	for _, id := range []string{"d1", "d2"} {
		if _, err := s.Enqueue(ctx, engine.Dispatch{DispatchID: id, ThreadID: "t1", RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: 1000, CreatedAt: 1000, MaxAttempts: 5}); err != nil {
			t.Fatal(err)
		}
	}
	first, err := s.Claim(ctx, "t1", "me", time.Minute, 1000)
	if err != nil || first == nil {
		t.Fatalf("claim: %v %v", first, err)
	}
	claimedV := version(countKey(engine.StatusClaimed))
	next, err := s.CompleteAndClaim(ctx, first.DispatchID, first.ClaimToken, engine.RunResult{RunID: first.RunID, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}, 2000, "me", time.Minute)
	if err != nil || next == nil || next.DispatchID == first.DispatchID {
		t.Fatalf("complete and claim: %v %v", next, err)
	}
	if v := version(countKey(engine.StatusClaimed)); v != claimedV {
		t.Fatalf("the claimed count, put back to 1, was written again (version %d → %d)", claimedV, v)
	}
	c, err := s.CountByStatus(ctx)
	if err != nil || c.Get(engine.StatusClaimed) != 1 || c.Get(engine.StatusQueued) != 0 || c.Get(engine.StatusAcked) != 1 {
		t.Fatalf("counts %+v %v", c, err)
	}
	verifyAll(t, s)
}

// Inside the operation, a key put back reads as it lies below, in a
// lookup and in a walk, and one set and deleted over nothing reads as
// absent; after the commit neither was written.
func TestAKeyPutBackReadsAsBelowWithinItsOperation(t *testing.T) {
	s := openInMemory(t)
	ctx := context.Background()
	x, y, z := []byte("zx"), []byte("zy"), []byte("zz")
	if err := s.update(ctx, "seed", func(w *writeTx) error { w.set(x, []byte("a")); return nil }); err != nil {
		t.Fatal(err)
	}
	before := s.db.MaxVersion()
	err := s.update(ctx, "put back", func(w *writeTx) error {
		w.set(x, []byte("b"))
		w.set(x, []byte("a"))
		w.set(y, []byte("b"))
		w.del(y)
		w.set(z, []byte("v")) // an empty value over nothing is a write
		w.set(z, nil)
		if v, ok, err := w.get(z); err != nil || !ok || len(v) != 0 {
			t.Errorf("z within the operation: %q %v %v, want present and empty", v, ok, err)
		}
		if v, ok, err := w.get(x); err != nil || !ok || string(v) != "a" {
			t.Errorf("x within the operation: %q %v %v, want a", v, ok, err)
		}
		if _, ok, err := w.get(y); err != nil || ok {
			t.Errorf("y within the operation: %v %v, want absent", ok, err)
		}
		var seen []string
		if err := w.iterate([]byte("z"), nil, false, func(k, v []byte) (bool, error) {
			seen = append(seen, string(k)+"="+string(v))
			return true, nil
		}); err != nil {
			return err
		}
		if len(seen) != 2 || seen[0] != "zx=a" || seen[1] != "zz=" {
			t.Errorf("walk within the operation: %q, want [zx=a zz=]", seen)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if after := s.db.MaxVersion(); after != before+1 {
		t.Fatalf("max version %d → %d: want one commit, of zz alone", before, after)
	}
	if err := s.db.View(func(txn *badger.Txn) error {
		if _, err := txn.Get(y); !errors.Is(err, badger.ErrKeyNotFound) {
			t.Errorf("zy after the commit: %v, want not found", err)
		}
		item, err := txn.Get(z)
		if err != nil {
			return err
		}
		if item.Version() != before+1 || item.ValueSize() != 0 {
			t.Errorf("zz after the commit: version %d, %d bytes", item.Version(), item.ValueSize())
		}
		x1, err := txn.Get(x)
		if err == nil && x1.Version() > before {
			t.Errorf("zx was written again (version %d)", x1.Version())
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if v := valueOf(t, s, x); v != "a" {
		t.Fatalf("x after the commit: %q", v)
	}
}

// Put back over the batch in flight and over an earlier operation of the
// same batch: what lies below is their value, not the committed one. The
// operation walks and writes accordingly, whether the batch in flight
// then commits or fails (its successor then runs again without it).
func TestAKeyPutBackOverTheBatchInFlightAndTheBatch(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(fmt.Sprintf("in-flight batch fails=%v", fail), func(t *testing.T) {
			s := openInMemory(t)
			ctx := context.Background()
			za, zb, zf := []byte("za"), []byte("zb"), []byte("zf")
			if err := s.update(ctx, "seed", func(w *writeTx) error {
				w.set(za, []byte("S"))
				w.set(zb, []byte("S"))
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			release := make(chan error, 3)
			entered := make(chan struct{}, 3)
			s.HoldCommits(release, entered)
			// Batch 1, held in flight: za = zb = P.
			first := make(chan error, 1)
			go func() {
				first <- s.update(ctx, "in flight", func(w *writeTx) error {
					w.set(za, []byte("P"))
					w.set(zb, []byte("P"))
					return nil
				})
			}()
			<-entered
			// Batch 2: A writes zf = F; B, after it, puts zb and zf back
			// over the batch in flight and over A, and za back to the
			// committed value (which the batch in flight changed).
			ranA := make(chan struct{}, 2)
			opA := make(chan error, 1)
			go func() {
				opA <- s.update(ctx, "a", func(w *writeTx) error {
					w.set(zf, []byte("F"))
					ranA <- struct{}{}
					return nil
				})
			}()
			<-ranA
			var seen []string
			ranB := make(chan struct{}, 2)
			opB := make(chan error, 1)
			go func() {
				opB <- s.update(ctx, "b", func(w *writeTx) error {
					defer func() { ranB <- struct{}{} }()
					w.set(za, []byte("X"))
					w.set(za, []byte("S"))
					w.set(zb, []byte("B"))
					w.set(zb, []byte("P"))
					w.set(zf, []byte("X"))
					w.set(zf, []byte("F"))
					seen = seen[:0]
					return w.iterate([]byte("z"), nil, false, func(k, v []byte) (bool, error) {
						seen = append(seen, string(k)+"="+string(v))
						return true, nil
					})
				})
			}()
			<-ranB // B ran in batch 2, built over batch 1 in flight
			if fail {
				release <- errors.New("injected commit failure")
				if err := <-first; err == nil {
					t.Fatal("the in-flight batch committed, want the injected failure")
				}
			} else {
				release <- nil
				if err := <-first; err != nil {
					t.Fatal(err)
				}
			}
			<-entered
			release <- nil
			if err := <-opA; err != nil {
				t.Fatal(err)
			}
			if err := <-opB; err != nil {
				t.Fatal(err)
			}
			if want := []string{"za=S", "zb=P", "zf=F"}; !slices.Equal(seen, want) {
				t.Fatalf("B's walk: %q, want %q", seen, want)
			}
			for k, want := range map[string]string{"za": "S", "zb": "P", "zf": "F"} {
				if v := valueOf(t, s, []byte(k)); v != want {
					t.Errorf("%s = %q after the commits, want %q", k, v, want)
				}
			}
		})
	}
}

// openInMemory opens an in-memory store, closed when the test ends.
func openInMemory(t *testing.T) *Store {
	t.Helper()
	s, err := Open(Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// keyVersion is the Badger version of key's latest value.
func keyVersion(t *testing.T, s *Store, key []byte) uint64 {
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

// valueOf is key's latest value.
func valueOf(t *testing.T, s *Store, key []byte) string {
	t.Helper()
	var v []byte
	if err := s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key)
		if err != nil {
			return err
		}
		v, err = item.ValueCopy(nil)
		return err
	}); err != nil {
		t.Fatalf("read %q: %v", key, err)
	}
	return string(v)
}
