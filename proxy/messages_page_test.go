package proxy_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A page of messages ends early once its messages hold 8 MiB, and
// following next_offset reads every message once, in order: a page of the
// 1 000 allowed had no bound but the messages' count, and messages up to
// the agent frame limit each made answers of gigabytes.
func TestAPageOfLargeMessagesEndsEarly(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, diskPath: t.TempDir()}) // in memory, Badger keeps values to 64 KiB
	const n, size = 6, 2 << 20
	for i := range n {
		sc.call(req{method: "POST", path: "/v1/threads/big/dispatches", body: submitBody(fmt.Sprint(i, strings.Repeat("m", size)))}, 202, nil)
	}
	type mpage struct {
		Items      []engine.MessageRecord `json:"items"`
		NextOffset *uint64                `json:"next_offset"`
	}
	var sizes []int
	var seqs []uint64
	after := uint64(0)
	for pages := 1; ; pages++ {
		if pages > n {
			t.Fatalf("more pages than messages: %v", sizes)
		}
		var p mpage
		sc.call(req{method: "GET", path: fmt.Sprintf("/v1/threads/big/messages?after_seq=%d&limit=1000", after)}, 200, &p)
		sizes = append(sizes, len(p.Items))
		for _, r := range p.Items {
			var text string
			if err := json.Unmarshal(r.Message.Content, &text); err != nil || text != fmt.Sprint(len(seqs), strings.Repeat("m", size)) {
				t.Fatalf("message %d: %d bytes of content, %v", r.Seq, len(r.Message.Content), err)
			}
			seqs = append(seqs, r.Seq)
		}
		if p.NextOffset == nil {
			break
		}
		after = *p.NextOffset
	}
	if fmt.Sprint(sizes) != "[4 2]" {
		t.Errorf("pages of %v messages, want [4 2] (8 MiB a page)", sizes)
	}
	if fmt.Sprint(seqs) != "[1 2 3 4 5 6]" {
		t.Errorf("seqs %v", seqs)
	}
}

// Small messages are read a chunk at a time, more at each read: pages
// across the chunks' edges hold what they held when read at once.
func TestPagesOfSmallMessagesCrossTheReadsEdges(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true})
	msgs := make([]string, 300)
	for i := range msgs {
		msgs[i] = fmt.Sprintf(`{"role":"user","content":"m%d"}`, i)
	}
	sc.call(req{method: "POST", path: "/v1/threads/small/dispatches", body: `{"messages":[` + strings.Join(msgs, ",") + `]}`}, 202, nil)
	type mpage struct {
		Items      []engine.MessageRecord `json:"items"`
		NextOffset *uint64                `json:"next_offset"`
	}
	for _, c := range []struct {
		after, limit int
		first, n     int
		next         string
	}{
		{0, 1000, 1, 300, "none"},
		{0, 100, 1, 100, "100"},
		{7, 9, 8, 9, "16"},
		{250, 100, 251, 50, "none"},
		{299, 1, 300, 1, "none"},
		{300, 50, 0, 0, "none"},
	} {
		var p mpage
		sc.call(req{method: "GET", path: fmt.Sprintf("/v1/threads/small/messages?after_seq=%d&limit=%d", c.after, c.limit)}, 200, &p)
		next := "none"
		if p.NextOffset != nil {
			next = fmt.Sprint(*p.NextOffset)
		}
		if len(p.Items) != c.n || next != c.next {
			t.Errorf("after %d, limit %d: %d items, next %s; want %d, %s", c.after, c.limit, len(p.Items), next, c.n, c.next)
			continue
		}
		for i, r := range p.Items {
			if r.Seq != uint64(c.first+i) || string(r.Message.Content) != fmt.Sprintf(`"m%d"`, c.first+i-1) {
				t.Errorf("after %d: item %d is seq %d, %s", c.after, i, r.Seq, r.Message.Content)
				break
			}
		}
	}
}
