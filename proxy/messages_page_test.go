package proxy_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
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

// A client that asks for a large answer and does not read it is cut off
// once the answer's write bound passes: it held the page on the server
// until it closed its connection (review: 100 such clients, 914 MiB).
func TestAClientThatDoesNotReadItsAnswerIsCutOff(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, diskPath: t.TempDir(), proxy: proxy.Config{StallTimeout: 300 * time.Millisecond}})
	sc.srv.SetAnswerReadRate(1 << 30)
	for i := range 3 {
		sc.call(req{method: "POST", path: "/v1/threads/big/dispatches", body: submitBody(fmt.Sprint(i, strings.Repeat("m", 2<<20)))}, 202, nil)
	}
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /v1/threads/big/messages?limit=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
	// The raw connection and the client's own for /metrics; then the
	// client's alone.
	eventually(t, "the connection counted", func() bool {
		return metricLine(sc.metricsOf(), `mailbox_http_connections{listener="api"} `) == `mailbox_http_connections{listener="api"} 2`
	})
	eventually(t, "the connection that does not read cut off", func() bool {
		return metricLine(sc.metricsOf(), `mailbox_http_connections{listener="api"} `) == `mailbox_http_connections{listener="api"} 1`
	})
	// What reached the socket's buffers is read, then the end: the
	// answer was not written whole.
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	n, err := io.Copy(io.Discard, c)
	if n >= 6<<20 {
		t.Fatalf("read %d bytes, %v: the whole answer", n, err)
	}
}

// bigPage is a page of thread big's messages: two of 300 KiB, filled by
// answerNotRead.
const bigPage = "/v1/threads/big/messages?limit=1000"

// answerNotRead fills thread big with two messages of 300 KiB and asks
// for bigPage on a connection it does not read (the answer is more than
// the socket holds, so it stays charged); it returns the connection.
func answerNotRead(t *testing.T, sc *sidecar) net.Conn {
	t.Helper()
	for i := range 2 {
		sc.call(req{method: "POST", path: "/v1/threads/big/dispatches", body: submitBody(fmt.Sprint(i, strings.Repeat("m", 300<<10)))}, 202, nil)
	}
	c, err := net.Dial("unix", sc.apiPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", bigPage)
	eventually(t, "the answer charged", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_answer_budget_bytes ") != "mailbox_http_answer_budget_bytes 0"
	})
	return c
}

// Large answers being written share a budget: a GET whose answer does not
// fit beside those of clients still reading is answered 503, and room
// comes back once an answer is written.
func TestLargeAnswersBeingWrittenShareABudget(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, diskPath: t.TempDir(), proxy: proxy.Config{MaxBody: 1 << 20, MaxBodyTotal: 1 << 20}})
	c := answerNotRead(t, sc)
	resp, b := sc.do(req{method: "GET", path: bigPage})
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") != "1" || !strings.Contains(string(b), `"unavailable"`) {
		t.Fatalf("a second large answer beside the first: %d %q %.200s", resp.StatusCode, resp.Header.Get("Retry-After"), b)
	}
	if got := metricLine(sc.metricsOf(), "mailbox_http_answers_refused_total "); got != "mailbox_http_answers_refused_total 1" {
		t.Fatalf("refusals: %q", got)
	}
	// The first client reads its answer: the room comes back.
	hr, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := io.Copy(io.Discard, hr.Body)
	if hr.StatusCode != 200 || n < 600<<10 {
		t.Fatalf("the first answer: %d, %d bytes", hr.StatusCode, n)
	}
	eventually(t, "the budget given back", func() bool {
		return metricLine(sc.metricsOf(), "mailbox_http_answer_budget_bytes ") == "mailbox_http_answer_budget_bytes 0"
	})
	if resp, b := sc.do(req{method: "GET", path: bigPage}); resp.StatusCode != 200 || len(b) < 600<<10 {
		t.Fatalf("a large answer once room came back: %d, %d bytes", resp.StatusCode, len(b))
	}
}

// A page reserves its answer's room as it reads: beside an answer still
// being read it ends early where the room ends, at least one item.
func TestAPageEndsEarlyWhereTheAnswerBudgetEnds(t *testing.T) {
	t.Parallel()
	sc := newSidecar(t, options{noAgent: true, diskPath: t.TempDir(), proxy: proxy.Config{MaxBody: 1 << 20, MaxBodyTotal: 1200 << 10}})
	answerNotRead(t, sc)
	var p struct {
		Items      []engine.MessageRecord `json:"items"`
		NextOffset *uint64                `json:"next_offset"`
	}
	sc.call(req{method: "GET", path: bigPage}, 200, &p)
	if len(p.Items) != 1 || p.NextOffset == nil || *p.NextOffset != 1 {
		t.Fatalf("a page beside an answer being read: %d items, next %v", len(p.Items), p.NextOffset)
	}
	sc.call(req{method: "GET", path: fmt.Sprintf("/v1/threads/big/messages?after_seq=%d", *p.NextOffset)}, 200, &p)
	if len(p.Items) != 1 || p.Items[0].Seq != 2 || p.NextOffset != nil {
		t.Fatalf("the next page: %d items, next %v", len(p.Items), p.NextOffset)
	}
}
