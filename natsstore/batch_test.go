package natsstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// The transaction scheme rests on two server behaviours, checked here
// against a real server: every message of an atomic batch is held to its
// Nats-Expected-Last-Subject-Sequence (also when it names another subject
// through Nats-Expected-Last-Subject-Sequence-Subject), and one failed
// expectation refuses the whole batch.
func TestAtomicBatchEnforcesEveryExpectedSequence(t *testing.T) {
	srv := natstest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: "B", Prefix: "b"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	get := func(subj string) rec {
		t.Helper()
		r, err := s.getLast(ctx, subj)
		if err != nil {
			t.Fatalf("get %s: %v", subj, err)
		}
		return r
	}
	// Two records written alone (a one-message write is a plain publish).
	a1, err := s.publish(ctx, []outMsg{{subj: "b.t.a", data: []byte("a1")}})
	if err != nil {
		t.Fatalf("publish a: %v", err)
	}
	if _, err := s.publish(ctx, []outMsg{{subj: "b.t.a", data: []byte("again")}}); !errors.Is(err, errConflict) {
		t.Fatalf("second create of a = %v, want errConflict", err)
	}
	c1, err := s.publish(ctx, []outMsg{{subj: "b.t.c", data: []byte("c1")}})
	if err != nil {
		t.Fatalf("publish c: %v", err)
	}

	cases := []struct {
		name string
		msgs []outMsg
	}{
		{"stale expectation on the first message", []outMsg{
			{subj: "b.t.a", data: []byte("a2"), expect: a1 - 1},
			{subj: "b.t.b", data: []byte("b1")},
		}},
		{"stale expectation on the commit", []outMsg{
			{subj: "b.t.b", data: []byte("b1")},
			{subj: "b.t.a", data: []byte("a2"), expect: a1 + 1},
		}},
		{"create of an existing subject in the middle", []outMsg{
			{subj: "b.t.b", data: []byte("b1")},
			{subj: "b.t.a", data: []byte("a2"), expect: 0},
			{subj: "b.t.d", data: []byte("d1")},
		}},
		{"stale check of a subject the batch does not write", []outMsg{
			{checkSubj: "b.t.c", expect: c1 + 7},
			{subj: "b.t.b", data: []byte("b1")},
			{subj: "b.t.a", data: []byte("a2"), expect: a1},
		}},
		{"check of a missing subject that exists", []outMsg{
			{checkSubj: "b.t.c", expect: 0},
			{subj: "b.t.b", data: []byte("b1")},
		}},
	}
	for _, c := range cases {
		if _, err := s.publish(ctx, c.msgs); !errors.Is(err, errConflict) {
			t.Fatalf("%s: publish = %v, want errConflict", c.name, err)
		}
		if r := get("b.t.b"); r.seq != 0 {
			t.Fatalf("%s: b.t.b written (seq %d) by a refused batch", c.name, r.seq)
		}
		if r := get("b.t.a"); r.seq != a1 || string(r.data) != "a1" {
			t.Fatalf("%s: b.t.a = %d %q, want %d a1", c.name, r.seq, r.data, a1)
		}
	}

	// All expectations right: every message lands, in order, and the
	// acknowledged sequence is the last one's.
	last, err := s.publish(ctx, []outMsg{
		{checkSubj: "b.t.c", expect: c1},
		{subj: "b.t.b", data: []byte("b1")},
		{subj: "b.t.a", data: []byte("a2"), expect: a1},
		{subj: "b.t.a2", del: true},
	})
	if err != nil {
		t.Fatalf("good batch: %v", err)
	}
	if r := get("b.t.b"); r.seq != last-2 || string(r.data) != "b1" {
		t.Fatalf("b.t.b = %d %q, want %d b1", r.seq, r.data, last-2)
	}
	if r := get("b.t.a"); r.seq != last-1 || string(r.data) != "a2" {
		t.Fatalf("b.t.a = %d %q, want %d a2", r.seq, r.data, last-1)
	}
	if r := get("b.t.a2"); r.seq != last || r.data != nil {
		t.Fatalf("tombstone b.t.a2 = %d %q, want %d and no body", r.seq, r.data, last)
	}
	if r := get("b.t.c"); r.seq != c1 {
		t.Fatalf("checked b.t.c moved to %d", r.seq)
	}
}

func TestSegmentsRoundTrip(t *testing.T) {
	for _, id := range []string{"t1", "a.b", "*", ">", "a b", "ünï 字", "h", ""} {
		got, err := unseg(seg(id))
		if err != nil || got != id {
			t.Fatalf("unseg(seg(%q)) = %q, %v", id, got, err)
		}
	}
	if _, err := unseg("x41"); err == nil {
		t.Fatal("unseg of a token without the h prefix succeeded")
	}
}

// Concurrent transactions are merged into one atomic batch; a member whose
// expectation is stale makes the merged batch fail, and then every member
// publishes alone: the others commit, it alone is refused, and each learns
// the sequences of its own messages.
func TestGroupCommitIsolatesAConflictingMember(t *testing.T) {
	srv := natstest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Open(ctx, Config{URL: srv.URL(), Stream: "G", Prefix: "g"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.publish(ctx, []outMsg{{subj: "g.t.taken", data: []byte("x")}}); err != nil {
		t.Fatal(err)
	}
	for round := range 5 {
		const members = 24
		lasts := make([]uint64, members)
		errs := make([]error, members)
		var wg sync.WaitGroup
		for i := range members {
			wg.Add(1)
			go func() {
				defer wg.Done()
				msgs := []outMsg{
					{subj: fmt.Sprintf("g.t.%d.%d.a", round, i), data: []byte("a")},
					{subj: fmt.Sprintf("g.t.%d.%d.b", round, i), data: []byte("b")},
				}
				if i == 7 {
					msgs = append(msgs, outMsg{subj: "g.t.taken", data: []byte("y")}) // expects it absent
				}
				lasts[i], errs[i] = s.commit(ctx, msgs)
			}()
		}
		wg.Wait()
		for i := range members {
			a, _ := s.getLast(ctx, fmt.Sprintf("g.t.%d.%d.a", round, i))
			b, _ := s.getLast(ctx, fmt.Sprintf("g.t.%d.%d.b", round, i))
			if i == 7 {
				if !errors.Is(errs[i], errConflict) || a.seq != 0 || b.seq != 0 {
					t.Fatalf("round %d: stale member: err %v, a %d b %d", round, errs[i], a.seq, b.seq)
				}
				continue
			}
			if errs[i] != nil {
				t.Fatalf("round %d: member %d: %v", round, i, errs[i])
			}
			if b.seq != lasts[i] || a.seq != lasts[i]-1 {
				t.Fatalf("round %d: member %d told last %d, stored a %d b %d", round, i, lasts[i], a.seq, b.seq)
			}
		}
	}
}
