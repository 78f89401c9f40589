package badgerstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Regression tests for faults found in review: each failed before its fix.

// An operation whose writes the storage engine refuses part-way must leave
// no trace, alone or inside a batch with others.
func TestRefusedWriteLeavesNoTrace(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{Dir: t.TempDir(), ValueLogFileSize: 1 << 20})
	ctx := context.Background()
	small, _ := json.Marshal("hi")
	huge, _ := json.Marshal(strings.Repeat("x", 1100<<10)) // larger than a value-log file
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			thread := fmt.Sprintf("ok%d", w)
			if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: thread, Messages: []engine.Message{{ID: "m1", Role: engine.RoleUser, Content: small}}}); err != nil {
				t.Errorf("append to %s: %v", thread, err)
			}
		})
	}
	_, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{
		{ID: "m1", Role: engine.RoleUser, Content: small},
		{ID: "m2", Role: engine.RoleUser, Content: huge},
	}})
	wg.Wait()
	if !errors.Is(err, engine.ErrTooLarge) {
		t.Fatalf("oversized append: got %v, want ErrTooLarge", err)
	}
	if len(err.Error()) > 400 {
		t.Fatalf("error text is %d bytes long", len(err.Error()))
	}
	if n, _ := s.MessageCount(ctx, "t1"); n != 0 {
		t.Fatalf("message count %d after a refused append", n)
	}
	if m, _ := s.LoadMessage(ctx, "t1", "m1"); m != nil {
		t.Fatalf("m1 of a refused append was stored: %+v", m)
	}
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{{ID: "m1", Role: engine.RoleUser, Content: small}}}); err != nil {
		t.Fatalf("retry without the huge message: %v", err)
	}
	rep := verifyClean(t, s)
	if rep.Messages != 17 {
		t.Fatalf("messages %d, want 17", rep.Messages)
	}
}

// A backlog of lapsed leases larger than one transaction is reclaimed in
// chunks, all of it, in one call.
func TestReclaimLargeBacklogInChunks(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	const n = 1000
	bigErr := strings.Repeat("e", 1024)
	for i := range n {
		d := queued(fmt.Sprintf("d%04d", i), fmt.Sprintf("t%04d", i), 1000)
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			c, err := s.Claim(ctx, d.ThreadID, "c", time.Second, 1000)
			if err != nil || c == nil {
				t.Fatalf("claim: %v %v", c, err)
			}
			if _, err := s.Nack(ctx, c.DispatchID, c.ClaimToken, 1000, bigErr, 1000); err != nil {
				t.Fatal(err)
			}
		}
		if c, err := s.Claim(ctx, d.ThreadID, "c", time.Second, 1000); err != nil || c == nil {
			t.Fatalf("claim: %v %v", c, err)
		}
	}
	got, err := s.ReclaimExpired(ctx, 1_000_000, n)
	if err != nil {
		t.Fatalf("reclaim: %v", err)
	}
	if len(got) != n {
		t.Fatalf("reclaimed %d, want %d", len(got), n)
	}
	c, _ := s.CountByStatus(ctx)
	if c.Get(engine.StatusClaimed) != 0 || c.Get(engine.StatusQueued) != n {
		t.Fatalf("after reclaim: %v", c)
	}
	verifyClean(t, s)
}

// Each chunk of a reclaim walks the lease index on from where the chunk
// before it stopped. Index entries that name no lapsed claim (planted
// here: the public API never leaves them) sit below the lapsed leases; a
// walk from the start would step over them again in every chunk, and
// reclaim one lease per chunk.
func TestReclaimChunksWalkOnFromTheChunkBefore(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	const strays, lapsed = 63, 200
	var planted [][]byte
	for i := range strays {
		d := queued(fmt.Sprintf("q%03d", i), fmt.Sprintf("q%03d", i), 1000)
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
		k := badgerstore.LeaseKey(d.DispatchID, int64(1+i)) // below every real lease
		if err := s.RawSet(k, nil); err != nil {
			t.Fatal(err)
		}
		planted = append(planted, k)
	}
	for i := range lapsed {
		d := queued(fmt.Sprintf("d%03d", i), fmt.Sprintf("t%03d", i), 1000)
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
		if c, err := s.Claim(ctx, d.ThreadID, "c", time.Second, 1000); err != nil || c == nil {
			t.Fatalf("claim: %v %v", c, err)
		}
	}
	before := commitsOK(t, s)
	got, err := s.ReclaimExpired(ctx, 1_000_000, 1000)
	if err != nil {
		t.Fatalf("reclaim: %v", err)
	}
	if len(got) != lapsed {
		t.Fatalf("reclaimed %d, want %d", len(got), lapsed)
	}
	// 263 entries in chunks of 64: 5 commits (a walk from the start
	// takes one per lapsed lease).
	if n := commitsOK(t, s) - before; n > 5 {
		t.Fatalf("reclaim took %d commits, want at most 5", n)
	}
	for _, k := range planted {
		if err := s.RawDelete(k); err != nil {
			t.Fatal(err)
		}
	}
	c, _ := s.CountByStatus(ctx)
	if c.Get(engine.StatusClaimed) != 0 || c.Get(engine.StatusQueued) != strays+lapsed {
		t.Fatalf("after reclaim: %v", c)
	}
	verifyClean(t, s)
}

// commitsOK reads mailbox_store_commits_total{result="ok"}.
func commitsOK(t *testing.T, s *badgerstore.Store) int {
	t.Helper()
	var b bytes.Buffer
	s.Metrics().WritePrometheus(&b)
	for line := range strings.Lines(b.String()) {
		if v, ok := strings.CutPrefix(line, `mailbox_store_commits_total{result="ok"} `); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no commit counter in %s", b.String())
	return 0
}

func TestLongErrorTextsAreCut(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if _, err := s.Enqueue(ctx, queued("d1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	c, _ := s.Claim(ctx, "t1", "c", time.Second, 1000)
	n, err := s.Nack(ctx, c.DispatchID, c.ClaimToken, 1000, strings.Repeat("é", 100_000), 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(n.LastError) > engine.MaxErrorLen || !strings.HasSuffix(n.LastError, "…") || len(n.Errors[0].Error) > engine.MaxErrorLen {
		t.Fatalf("error kept at %d bytes", len(n.LastError))
	}
	verifyClean(t, s)
}

func TestVerifyFindsOrphanMessages(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	if err := s.RawSet(badgerstore.MessageKey("t1", 1), []byte(`{"message_id":"m1","thread_id":"t1","seq":1,"message":{"id":"m1","role":"user"}}`)); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(rep.Problems, "\n"), "thread t1 message counter 0, log holds 1") {
		t.Fatalf("orphan message not reported: %v", rep.Problems)
	}
}

func TestCorruptCounterIsAnError(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if err := s.RawSet(badgerstore.MessageCountKey("t1"), []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.MessageCount(ctx, "t1"); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("message count: got %v, want ErrCorrupt", err)
	}
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", ExpectedCount: 0, Messages: []engine.Message{{ID: "m", Role: engine.RoleUser}}}); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("checkpoint over a corrupt counter: got %v, want ErrCorrupt", err)
	}
}

func TestConcurrentCloseWaitsForTheFirst(t *testing.T) {
	t.Parallel()
	s, err := badgerstore.Open(badgerstore.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			if err := s.Close(); err != nil {
				t.Error(err)
			}
			// Every Close returns only once the store is closed.
			if _, err := s.LoadDispatch(context.Background(), "x"); !errors.Is(err, engine.ErrUnavailable) {
				t.Errorf("load after Close returned: %v", err)
			}
		})
	}
	wg.Wait()
}

func TestRequeueOfNonDeadLetterIsValidationFirst(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	for _, id := range []string{"d1", "d2"} {
		if _, err := s.Enqueue(ctx, queued(id, "t-"+id, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Requeue(ctx, "d1", "d2", 2000); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("requeue of a queued dispatch onto a taken id: got %v, want ErrValidation", err)
	}
}

// A stored message whose raw fields are not UTF-8 JSON (written by an
// earlier version, which let bytes that are not UTF-8 through inside JSON
// strings) is a problem Verify names: every RUN of its thread would carry
// it.
func TestVerifyFindsMessageContentThatIsNotUTF8(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{{ID: "m1", Role: engine.RoleUser, Content: []byte(`"fine"`)}}}); err != nil {
		t.Fatal(err)
	}
	verifyClean(t, s)
	if err := s.RawSet(badgerstore.MessageKey("t1", 1), []byte("{\"message_id\":\"m1\",\"thread_id\":\"t1\",\"seq\":1,\"message\":{\"id\":\"m1\",\"role\":\"user\",\"content\":\"a\xffb\"}}")); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(rep.Problems, "\n"), "content is not valid UTF-8") {
		t.Fatalf("content that is not UTF-8 not reported: %v", rep.Problems)
	}
}

// A message an earlier version took — valid UTF-8 JSON with an escape of
// a lone surrogate and nested 150 levels deep, both refused on intake
// since — is neither reported by Verify nor replaced by Repair: they hold
// stored records to what a RUN needs (engine.ValidateStoredJSON). They
// reported it and replaced it with the "damaged" placeholder (found by
// review).
func TestRepairKeepsAMessageTakenBeforeTheIntakeRules(t *testing.T) {
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	ctx := context.Background()
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{{ID: "m1", Role: engine.RoleUser, Content: []byte(`"fine"`)}}}); err != nil {
		t.Fatal(err)
	}
	deep := strings.Repeat("[", 150) + strings.Repeat("]", 150)
	legacy := `{"message_id":"m1","thread_id":"t1","seq":1,"message":{"id":"m1","role":"user","content":"emoji half \ud83d","metadata":` + deep + `}}`
	if err := s.RawSet(badgerstore.MessageKey("t1", 1), []byte(legacy)); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Verify(ctx)
	if err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify: %v %q; want no problem", err, rep.Problems)
	}
	rr, err := s.Repair(ctx, 1000)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := s.LoadMessages(ctx, "t1")
	if err != nil || len(msgs) != 1 || string(msgs[0].Message.Content) != `"emoji half \ud83d"` {
		t.Fatalf("after repair (%+v): %v %v; want the message as it was", rr, msgs, err)
	}
}
