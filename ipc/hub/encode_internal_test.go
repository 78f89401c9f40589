package hub

import (
	"fmt"
	"reflect"
	"strings"
	"testing"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// plainRun is the RUN payload encoded in one piece, as before the message
// cache: encodeRun must produce the same JSON value.
type plainRun struct {
	runHead
	Context engine.ThreadContext `json:"context"`
}

func plainEncode(t *testing.T, req *engine.RunRequest) []byte {
	t.Helper()
	ctx := req.Context
	if ctx.Messages == nil {
		ctx.Messages = []engine.MessageRecord{}
	}
	b, err := json.Marshal(plainRun{runHead: headOf(req), Context: ctx})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sameJSON(t *testing.T, got, want []byte) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("encodeRun gave invalid JSON %s: %v", got, err)
	}
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Fatalf("encodeRun gave\n%s\nwant the value of\n%s", got, want)
	}
}

func contextRecords(thread string, n int, text string) []engine.MessageRecord {
	var out []engine.MessageRecord
	for i := range n {
		step := int64(i)
		out = append(out, engine.MessageRecord{
			MessageID: fmt.Sprintf("m-%d", i), ThreadID: thread, Seq: uint64(i + 1), CreatedAt: 1795918018485 + int64(i),
			Message:   engine.Message{ID: fmt.Sprintf("m-%d", i), Role: "user", Content: json.RawMessage(fmt.Sprintf("%q", fmt.Sprintf("%s %d", text, i)))},
			StepIndex: &step, ProducedByRunID: "r-0",
		})
	}
	return out
}

// encodeRun (head, cached messages and tail spliced together) gives the
// JSON value the payload encoded in one piece gives, with a cold cache, a
// warm one and none.
func TestEncodeRunMatchesThePlainEncoding(t *testing.T) {
	reqs := []*engine.RunRequest{
		{DispatchID: "d", RunID: "r", ThreadID: "t", AgentID: "a", SessionID: "s", RunMode: "scheduled", Origin: "User"},
		{DispatchID: "d", RunID: "r", ThreadID: "t", AgentID: "a", SessionID: "s", Attempt: 3, RunMode: "resume", Origin: "A2A",
			ContinueRunID: "r0", ParentRunID: "p", ParentThreadID: "pt", TransportRequestID: "x", Traceparent: "00-1-2-01",
			Messages:  []engine.Message{{ID: "in", Role: "user", Content: json.RawMessage(`"hi \u00e9 <b>"`)}},
			Decisions: []engine.Decision{{CallID: "c", Resume: json.RawMessage(`{"ok":true}`)}},
			Context: engine.ThreadContext{Messages: contextRecords("t", 30, "ctx <&> \"q\""), FirstSeq: 1, TotalMessages: 30,
				LatestRun: &engine.RunRecord{RunID: "r0", ThreadID: "t", Status: engine.RunWaiting, CreatedAt: 1, UpdatedAt: 2}},
			FrontendTools: json.RawMessage(`[{"name":"x"}]`), Overrides: json.RawMessage(`{"model":"m"}`)},
	}
	for _, cache := range []*msgCache{nil, newMsgCache(1 << 20)} {
		for i, req := range reqs {
			for pass := range 2 { // cold, then warm
				got, err := encodeRun(nil, req, cache)
				if err != nil {
					t.Fatal(err)
				}
				t.Run(fmt.Sprintf("cache=%v/req=%d/pass=%d", cache != nil, i, pass), func(t *testing.T) { sameJSON(t, got, plainEncode(t, req)) })
			}
		}
	}
}

// A cached encoding serves only a record equal to the one it came from:
// a record that differs under the same thread and sequence number is
// encoded afresh.
func TestMessageCacheServesOnlyEqualRecords(t *testing.T) {
	cache := newMsgCache(1 << 20)
	req := &engine.RunRequest{ThreadID: "t", Context: engine.ThreadContext{Messages: contextRecords("t", 3, "first"), TotalMessages: 3}}
	if _, err := encodeRun(nil, req, cache); err != nil {
		t.Fatal(err)
	}
	req.Context.Messages = contextRecords("t", 3, "second") // same thread and seqs, other content
	got, err := encodeRun(nil, req, cache)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(got), `"first `) || !strings.Contains(string(got), "second 2") {
		t.Fatalf("a changed record was served from the cache: %s", got)
	}
	sameJSON(t, got, plainEncode(t, req))
}

// sameRecord compares every field: a field added to engine.MessageRecord
// or engine.Message must be compared too, or a cached encoding could
// serve a record that differs in it.
func TestSameRecordComparesEveryField(t *testing.T) {
	var base engine.MessageRecord
	fill(t, reflect.ValueOf(&base).Elem(), 1)
	var leaves []string
	walk(reflect.ValueOf(&base).Elem(), "", &leaves)
	for _, path := range leaves {
		c := base
		c.Message = base.Message
		step := *base.StepIndex
		c.StepIndex = &step
		fill(t, fieldAt(reflect.ValueOf(&c).Elem(), path), 2)
		if sameRecord(&base, &c) {
			t.Errorf("records that differ in %s compare equal", path)
		}
	}
	c := base
	step := *base.StepIndex
	c.StepIndex = &step
	if !sameRecord(&base, &c) {
		t.Error("equal records compare different")
	}
}

// fill sets every leaf of v to a value derived from n.
func fill(t *testing.T, v reflect.Value, n int) {
	t.Helper()
	switch v.Kind() {
	case reflect.String:
		v.SetString(fmt.Sprintf("v%d", n))
	case reflect.Int, reflect.Int64:
		v.SetInt(int64(n))
	case reflect.Uint64:
		v.SetUint(uint64(n))
	case reflect.Slice: // json.RawMessage
		v.SetBytes([]byte(fmt.Sprintf(`"v%d"`, n)))
	case reflect.Pointer:
		p := reflect.New(v.Type().Elem())
		fill(t, p.Elem(), n)
		v.Set(p)
	case reflect.Struct:
		for i := range v.NumField() {
			fill(t, v.Field(i), n)
		}
	default:
		t.Fatalf("fill: unhandled kind %s", v.Kind())
	}
}

// walk lists the dotted paths of v's leaves.
func walk(v reflect.Value, prefix string, out *[]string) {
	for i := range v.NumField() {
		name := prefix + v.Type().Field(i).Name
		if f := v.Field(i); f.Kind() == reflect.Struct {
			walk(f, name+".", out)
		} else {
			*out = append(*out, name)
		}
	}
}

func fieldAt(v reflect.Value, path string) reflect.Value {
	for _, name := range strings.Split(path, ".") {
		v = v.FieldByName(name)
	}
	return v
}

// The cache stays within its budget: two generations of at most half.
func TestMessageCacheStaysWithinItsBudget(t *testing.T) {
	const budget = 64 << 10
	cache := newMsgCache(budget)
	for i := range 200 {
		req := &engine.RunRequest{ThreadID: "t", Context: engine.ThreadContext{Messages: contextRecords(fmt.Sprintf("t%d", i), 20, strings.Repeat("x", 100))}}
		if _, err := encodeRun(nil, req, cache); err != nil {
			t.Fatal(err)
		}
	}
	var held int64
	for _, m := range []map[msgKey]*cachedMsg{cache.cur, cache.prev} {
		for _, e := range m {
			held += entryBytes(e)
		}
	}
	if held > budget+budget/4 {
		t.Fatalf("the cache holds %d bytes, budget %d", held, budget)
	}
	if len(cache.cur) == 0 {
		t.Fatal("nothing cached")
	}
}

// BenchmarkEncodeRun: the RUN payload of a run whose context carries 20
// or 500 messages of about 300 bytes, with the message cache warm (as for
// every run of a thread after its first) and without it.
func BenchmarkEncodeRun(b *testing.B) {
	for _, n := range []int{20, 500} {
		for _, cached := range []bool{false, true} {
			b.Run(fmt.Sprintf("messages=%d/cache=%v", n, cached), func(b *testing.B) {
				req := &engine.RunRequest{DispatchID: "d", RunID: "r", ThreadID: "t", AgentID: "a", SessionID: "s", RunMode: "scheduled", Origin: "User",
					Messages: []engine.Message{{Role: "user", Content: json.RawMessage(`"go"`)}},
					Context:  engine.ThreadContext{Messages: contextRecords("t", n, strings.Repeat("lorem ipsum dolor sit amet ", 10)), FirstSeq: 1, TotalMessages: uint64(n)}}
				var cache *msgCache
				if cached {
					cache = newMsgCache(DefaultMessageCacheBytes)
				}
				b.ReportAllocs()
				var size int
				for b.Loop() {
					p, err := encodeRun(getRunBuf(), req, cache)
					if err != nil {
						b.Fatal(err)
					}
					size = len(p)
					putRunBuf(p)
				}
				b.SetBytes(int64(size))
			})
		}
	}
}
