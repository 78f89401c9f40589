package badgerstore_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The claims a store held when it was opened are the earlier process's:
// ReclaimOrphans settles each as a lapse would, at once, whatever its
// lease (a suspended run's is ten minutes), and leaves alone the claims
// made since the open and those settled since.
func TestReclaimOrphansTakesOnlyTheClaimsHeldAtOpen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := context.Background()
	const now = int64(1_000_000)
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	last := queued("last", "t-last", now)
	last.MaxAttempts = 1
	for _, d := range []engine.Dispatch{queued("plain", "t-plain", now), last, queued("stale", "t-stale", now), queued("settled", "t-settled", now), queued("again", "t-again", now)} {
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	tokens := map[string]string{}
	for _, thread := range []string{"t-plain", "t-last", "t-stale", "t-settled", "t-again"} {
		lease := 10 * time.Minute
		if thread == "t-again" {
			lease = time.Millisecond
		}
		c, err := s.Claim(ctx, thread, "gone-process", lease, now)
		if err != nil || c == nil {
			t.Fatalf("claim %s: %v %v", thread, c, err)
		}
		tokens[c.DispatchID] = c.ClaimToken
	}
	if _, err := s.Interrupt(ctx, "t-stale", now+1); err != nil { // its claim's epoch is behind now
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = mustOpen(t, badgerstore.Options{Dir: dir})
	// Settled after the open: acked by the new process.
	if err := s.Ack(ctx, "settled", tokens["settled"], now+2); err != nil {
		t.Fatal(err)
	}
	// Lapsed, reclaimed by a sweep and claimed again: the new process's.
	if got, err := s.ReclaimExpired(ctx, now+2, 100); err != nil || len(got) != 1 || got[0].DispatchID != "again" {
		t.Fatalf("sweep: %+v %v", got, err)
	}
	if c, err := s.Claim(ctx, "t-again", "gone-process", time.Minute, now+2); err != nil || c == nil {
		t.Fatalf("claim again: %v %v", c, err)
	}
	// Claimed after the open: the new process's own.
	if _, err := s.Enqueue(ctx, queued("mine", "t-mine", now)); err != nil {
		t.Fatal(err)
	}
	mine, err := s.Claim(ctx, "t-mine", "gone-process", time.Minute, now+2)
	if err != nil || mine == nil {
		t.Fatalf("claim mine: %v %v", mine, err)
	}

	got, err := s.ReclaimOrphans(ctx, now+3, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].DispatchID == got[1].DispatchID {
		t.Fatalf("reclaimed %+v, want plain and last", got)
	}
	for _, c := range []struct {
		id     string
		status engine.DispatchStatus
		reason string
	}{
		{"plain", engine.StatusQueued, engine.ReasonOrphaned},
		{"last", engine.StatusDeadLetter, engine.ReasonOrphanedMax},
		{"stale", engine.StatusSuperseded, engine.ReasonOrphanedStale},
		{"settled", engine.StatusAcked, ""},
		{"mine", engine.StatusClaimed, ""},
		{"again", engine.StatusClaimed, engine.ReasonLeaseExpired},
	} {
		d, err := s.LoadDispatch(ctx, c.id)
		if err != nil || d == nil {
			t.Fatalf("load %s: %v %v", c.id, d, err)
		}
		if d.Status != c.status || c.reason != "" && d.LastError != c.reason {
			t.Errorf("%s: %s %q, want %s %q", c.id, d.Status, d.LastError, c.status, c.reason)
		}
		if c.id == "plain" && (d.AttemptCount != 1 || d.AvailableAt != now) {
			t.Errorf("plain: attempts %d, available at %d; want an attempt spent and its place kept (%d)", d.AttemptCount, d.AvailableAt, now)
		}
	}
	if again, err := s.ReclaimOrphans(ctx, now+4, 100); err != nil || len(again) != 0 {
		t.Fatalf("second call: %+v %v, want nothing", again, err)
	}
	verifyClean(t, s)
}

// The limit counts reclaims, and the rest are taken by the next call.
func TestReclaimOrphansKeepsItsLimit(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := context.Background()
	const now = int64(1_000_000)
	var threads []string
	for i := range 150 {
		threads = append(threads, "t"+string(rune('a'+i%26))+string(rune('a'+i/26)))
	}
	leaveClaims(t, dir, now, threads, nil)
	s := mustOpen(t, badgerstore.Options{Dir: dir})
	seen := map[string]bool{}
	for _, want := range []int{100, 50, 0} {
		got, err := s.ReclaimOrphans(ctx, now+1, 100)
		if err != nil || len(got) != want {
			t.Fatalf("reclaimed %d (%v), want %d", len(got), err, want)
		}
		for _, d := range got {
			if seen[d.DispatchID] {
				t.Fatalf("%s reclaimed twice", d.DispatchID)
			}
			seen[d.DispatchID] = true
		}
	}
	verifyClean(t, s)
}

// A claimed dispatch whose record does not decode does not keep the
// directory from opening: verify and repair open it first, and repair
// exists for that damage (found by review: Open failed on it).
func TestOpenSkipsAClaimedDispatchThatDoesNotDecode(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := context.Background()
	const now = int64(1_000_000)
	leaveClaims(t, dir, now, []string{"t1", "t2"}, func(s *badgerstore.Store) {
		if err := s.RawSet(badgerstore.DispatchKey("d-t1"), []byte{0x01, 0xff, 0xff, 0xff}); err != nil {
			t.Fatal(err)
		}
	})
	s := mustOpen(t, badgerstore.Options{Dir: dir, GCInterval: -1})
	got, err := s.ReclaimOrphans(ctx, now+1, 100)
	if err != nil || len(got) != 1 || got[0].DispatchID != "d-t2" {
		t.Fatalf("reclaimed %+v %v, want d-t2 alone", got, err)
	}
	rep, err := s.Repair(ctx, now+2)
	if err != nil {
		t.Fatalf("repair: %v", err)
	}
	if d, err := s.LoadDispatch(ctx, "d-t1"); err != nil || d == nil || d.Status != engine.StatusDeadLetter {
		t.Fatalf("after repair (%+v): %+v %v, want the damaged record a dead letter", rep, d, err)
	}
}

// leaveClaims leaves in dir a dispatch d-<thread> for each thread,
// claimed by a process that is gone, and closes the store (after then,
// when set, has run on it).
func leaveClaims(t *testing.T, dir string, now int64, threads []string, then func(*badgerstore.Store)) {
	t.Helper()
	ctx := context.Background()
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	for _, th := range threads {
		if _, err := s.Enqueue(ctx, queued("d-"+th, th, now)); err != nil {
			t.Fatal(err)
		}
		if c, err := s.Claim(ctx, th, "gone-process", time.Minute, now); err != nil || c == nil {
			t.Fatalf("claim %s: %v %v", th, c, err)
		}
	}
	if then != nil {
		then(s)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// A finished dispatch whose record does not decode is skipped by
// ListTerminal, which lists the others, pages included: the start's
// reconciliation failed on it, and the sidecar could not start (found by
// review: a crash loop over one damaged record).
func TestListTerminalSkipsARecordThatDoesNotDecode(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const now = int64(1_000_000)
	s := mustOpen(t, badgerstore.Options{InMemory: true})
	for i := range 6 {
		id := fmt.Sprintf("d-%d", i)
		if _, err := s.Enqueue(ctx, queued(id, fmt.Sprint("t", i), now+int64(i))); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Cancel(ctx, id, now+int64(10+i)); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"d-1", "d-2"} {
		if err := s.RawSet(badgerstore.DispatchKey(id), []byte{0x01, 0xff, 0xff, 0xff}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.RawDelete(badgerstore.DispatchKey("d-4")); err != nil {
		t.Fatal(err)
	}
	// Pages of two, as the engine walks them: the three good records,
	// each once, the last page short.
	var got []string
	cursor := engine.TerminalCursor{}
	for range 10 {
		page, err := s.ListTerminal(ctx, cursor, 2)
		if err != nil {
			t.Fatalf("ListTerminal after %v: %v", got, err)
		}
		for i := range page {
			got = append(got, page[i].DispatchID)
		}
		if len(page) < 2 {
			break
		}
		cursor = engine.CursorAfter(&page[len(page)-1])
	}
	if want := []string{"d-0", "d-3", "d-5"}; !slices.Equal(got, want) {
		t.Fatalf("listed %v, want %v", got, want)
	}
}
