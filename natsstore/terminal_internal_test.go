package natsstore

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// ListTerminal fills its pages past entries of its index whose records
// are gone (purged since), so that a short page is the end: a short page
// ended the start's reconciliation early (found by review).
func TestListTerminalFillsItsPagesPastMissingRecords(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	ctx := context.Background()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: "TERM", Prefix: "tm"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const now = int64(1_000_000)
	for i := range 3 {
		id := fmt.Sprint("d-", i)
		d := engine.Dispatch{DispatchID: id, ThreadID: fmt.Sprint("t", i), RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: now, CreatedAt: now, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Cancel(ctx, id, now+int64(10*i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.fresh(ctx); err != nil {
		t.Fatal(err)
	}
	// Entries whose records are gone, before, between and after them.
	s.idx.mu.Lock()
	for i, at := range []int64{now - 5, now + 5, now + 6, now + 100} {
		s.idx.addDispatchLocked(&dEntry{id: fmt.Sprint("gone-", i), thread: "gone", status: engine.StatusCancelled, created: now, updated: at})
	}
	s.idx.mu.Unlock()
	var got []string
	cursor := engine.TerminalCursor{}
	for range 10 {
		page, err := s.ListTerminal(ctx, cursor, 2)
		if err != nil {
			t.Fatal(err)
		}
		for i := range page {
			got = append(got, page[i].DispatchID)
		}
		if len(page) < 2 {
			break
		}
		cursor = engine.CursorAfter(&page[len(page)-1])
	}
	if want := []string{"d-0", "d-1", "d-2"}; !slices.Equal(got, want) {
		t.Fatalf("listed %v, want %v", got, want)
	}
}

// ListTerminal skips an entry whose record does not decode (bytes that
// went bad, or a record of a later version) and still fills its pages:
// one such record ended the listing, and with it the reconciliation.
func TestListTerminalSkipsRecordsThatDoNotDecode(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	ctx := context.Background()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: "TERMBAD", Prefix: "tb"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const now = int64(1_000_000)
	for i := range 3 {
		id := fmt.Sprint("d-", i)
		d := engine.Dispatch{DispatchID: id, ThreadID: fmt.Sprint("t", i), RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: now, CreatedAt: now, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Cancel(ctx, id, now+int64(10*i)); err != nil {
			t.Fatal(err)
		}
	}
	// Records that do not decode, listed before, between and after them.
	for i := range 3 {
		if _, err := s.js.Publish(ctx, s.sub.dispatch(fmt.Sprint("bad-", i)), []byte("\x00not a record")); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.fresh(ctx); err != nil {
		t.Fatal(err)
	}
	s.idx.mu.Lock()
	for i, at := range []int64{now - 5, now + 5, now + 100} {
		s.idx.addDispatchLocked(&dEntry{id: fmt.Sprint("bad-", i), thread: "bad", status: engine.StatusCancelled, created: now, updated: at})
	}
	s.idx.mu.Unlock()
	var got []string
	cursor := engine.TerminalCursor{}
	for range 10 {
		page, err := s.ListTerminal(ctx, cursor, 2)
		if err != nil {
			t.Fatalf("ListTerminal past records that do not decode: %v", err)
		}
		for i := range page {
			got = append(got, page[i].DispatchID)
		}
		if len(page) < 2 {
			break
		}
		cursor = engine.CursorAfter(&page[len(page)-1])
	}
	if want := []string{"d-0", "d-1", "d-2"}; !slices.Equal(got, want) {
		t.Fatalf("listed %v, want %v", got, want)
	}
}
