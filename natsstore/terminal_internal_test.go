package natsstore

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// terminalFixture opens a store on a fresh server with three cancelled
// dispatches (d-0, d-1, d-2, updated at now, now+10, now+20).
func terminalFixture(t *testing.T, stream string, now int64) *Store {
	t.Helper()
	srv := natstest.Start(t)
	ctx := context.Background()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: stream, Prefix: strings.ToLower(stream)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
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
	return s
}

// indexTerminal adds index entries of cancelled dispatches id-0, id-1 …
// updated at each of at, whatever their records hold.
func indexTerminal(s *Store, id string, now int64, at ...int64) {
	s.idx.mu.Lock()
	defer s.idx.mu.Unlock()
	for i, a := range at {
		s.idx.addDispatchLocked(&dEntry{id: fmt.Sprint(id, "-", i), thread: id, status: engine.StatusCancelled, created: now, updated: a})
	}
}

// listAllTerminal pages through ListTerminal two at a time until a short
// page and checks it listed d-0, d-1 and d-2 alone.
func listAllTerminal(t *testing.T, s *Store) {
	t.Helper()
	var got []string
	cursor := engine.TerminalCursor{}
	for range 10 {
		page, err := s.ListTerminal(context.Background(), cursor, 2)
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

// ListTerminal fills its pages past entries of its index whose records
// are gone (purged since), so that a short page is the end: a short page
// ended the start's reconciliation early (found by review).
func TestListTerminalFillsItsPagesPastMissingRecords(t *testing.T) {
	t.Parallel()
	const now = int64(1_000_000)
	s := terminalFixture(t, "TERM", now)
	if err := s.fresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Entries whose records are gone, before, between and after them.
	indexTerminal(s, "gone", now, now-5, now+5, now+6, now+100)
	listAllTerminal(t, s)
}

// ListTerminal skips an entry whose record does not decode (bytes that
// went bad, or a record of a later version) and still fills its pages:
// one such record ended the listing, and with it the reconciliation.
func TestListTerminalSkipsRecordsThatDoNotDecode(t *testing.T) {
	t.Parallel()
	const now = int64(1_000_000)
	s := terminalFixture(t, "TERMBAD", now)
	ctx := context.Background()
	// Records that do not decode, listed before, between and after them.
	for i := range 3 {
		if _, err := s.js.Publish(ctx, s.sub.dispatch(fmt.Sprint("bad-", i)), []byte("\x00not a record")); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.fresh(ctx); err != nil {
		t.Fatal(err)
	}
	indexTerminal(s, "bad", now, now-5, now+5, now+100)
	listAllTerminal(t, s)
}
