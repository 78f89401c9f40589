package proxy

import (
	"fmt"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A page of dispatches ends early once it holds pageBytes of responses,
// reads large ones a few at a time, and pages small ones as before.
func TestBoundedPage(t *testing.T) {
	store := func(n, size int) (func(int, int) ([]engine.Dispatch, error), *int) {
		all := make([]engine.Dispatch, n)
		for i := range all {
			all[i] = engine.Dispatch{DispatchID: fmt.Sprint("d", i), RunResponse: strings.Repeat("r", size), ClaimToken: "secret"}
		}
		most := 0
		return func(k, at int) ([]engine.Dispatch, error) {
			most = max(most, k)
			if at >= len(all) {
				return nil, nil
			}
			return all[at:min(at+k, len(all))], nil
		}, &most
	}
	for _, c := range []struct {
		name                string
		n, size, limit, off int
		items               int
		next                int // -1: none
		mostRead            int // the largest read from the store, at most
	}{
		{"small, a full page", 100, 10, 50, 0, 50, 50, 256},
		{"small, the last page", 100, 10, 50, 80, 20, -1, 256},
		{"small, the page ends with them", 50, 10, 50, 0, 50, -1, 256},
		{"3 MiB responses", 20, 3 << 20, 1000, 0, 3, 3, pageChunk},
		{"3 MiB responses, further on", 20, 3 << 20, 1000, 18, 2, -1, pageChunk},
		{"one larger than the budget", 3, 16 << 20, 50, 0, 1, 1, pageChunk},
	} {
		list, most := store(c.n, c.size)
		p, err := boundedPage(c.limit, c.off, func(int) bool { return true }, list)
		if err != nil {
			t.Fatal(err)
		}
		next := -1
		if p.NextOffset != nil {
			next = int(*p.NextOffset)
		}
		if len(p.Items) != c.items || next != c.next || *most > c.mostRead {
			t.Errorf("%s: %d items, next %d, read %d at most; want %d, %d, at most %d", c.name, len(p.Items), next, *most, c.items, c.next, c.mostRead)
		}
		for _, d := range p.Items {
			if d.ClaimToken != "" {
				t.Fatalf("%s: a claim token in the page", c.name)
			}
		}
	}
}
