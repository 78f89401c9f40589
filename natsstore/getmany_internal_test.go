package natsstore

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// getMany reads, in one batched direct get per 1 024 subjects, what a
// direct get of each subject reads: records, tombstones, subjects never
// written, a subject named twice, and a batch the server cuts short at
// its byte limit (finished with more batches). On a server whose
// max_payload is 4 KiB the requests are split to fit.
func TestGetManyReadsWhatPointReadsRead(t *testing.T) {
	t.Run("max_payload=8MiB", func(t *testing.T) { testGetMany(t, natstest.Start(t)) })
	t.Run("max_payload=4KiB", func(t *testing.T) { testGetMany(t, natstest.StartWithMaxPayload(t, 4096)) })
}

func testGetMany(t *testing.T, srv *natstest.Server) {
	ctx := context.Background()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: "MANY", Prefix: "many"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	const now = int64(1_000_000)
	for i := range 30 {
		id := fmt.Sprint("d-", i)
		d := engine.Dispatch{DispatchID: id, ThreadID: fmt.Sprint("t", i%7), RunID: "run-" + id, Priority: engine.DefaultPriority, AvailableAt: now, CreatedAt: now, MaxAttempts: 5}
		if _, err := s.Enqueue(ctx, d); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			if _, err := s.Cancel(ctx, id, now); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The cancelled ones older than now+1 are purged: tombstones.
	if n, err := s.PurgeTerminal(ctx, now+1); err != nil || n != 10 {
		t.Fatalf("purge: %d %v, want 10", n, err)
	}
	var subjs []string
	for i := range 1100 { // two batches: 1 024 and 76 subjects
		switch {
		case i < 29:
			subjs = append(subjs, s.sub.dispatch(fmt.Sprint("d-", i)))
		case i == 500:
			subjs = append(subjs, s.sub.dispatch("d-4")) // named twice in one batch
		case i == 1090:
			subjs = append(subjs, s.sub.dispatch("d-29")) // in the second batch
		default:
			subjs = append(subjs, s.sub.dispatch(fmt.Sprint("never-", i)))
		}
	}
	want := make([]rec, len(subjs))
	records, tombstones := 0, 0
	for i, subj := range subjs {
		if want[i], err = s.getLast(ctx, subj); err != nil {
			t.Fatal(err)
		}
		switch {
		case want[i].data != nil:
			records++
		case want[i].seq != 0:
			tombstones++
		}
	}
	if records != 21 || tombstones != 10 { // d-4 twice
		t.Fatalf("point reads found %d records and %d tombstones, want 21 and 10", records, tombstones)
	}
	check := func(name string) {
		t.Helper()
		got, err := s.getMany(ctx, subjs)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for i := range subjs {
			if got[i].seq != want[i].seq || !bytes.Equal(got[i].data, want[i].data) {
				t.Fatalf("%s: %s read seq %d %q, want seq %d %q", name, subjs[i], got[i].seq, got[i].data, want[i].seq, want[i].data)
			}
		}
	}
	check("one batch per 1 024")
	was := multiGetMaxBytes
	multiGetMaxBytes = 1 // every reply cut after its first record
	t.Cleanup(func() { multiGetMaxBytes = was })
	check("cut short")
}
