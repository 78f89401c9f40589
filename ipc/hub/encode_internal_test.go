package hub

import (
	stdjson "encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
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

// encodeRun (head, messages and tail spliced together) gives the JSON
// value the payload encoded in one piece gives.
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
	for i, req := range reqs {
		got, err := encodeRun(nil, req)
		if err != nil {
			t.Fatal(err)
		}
		t.Run(fmt.Sprintf("req=%d", i), func(t *testing.T) { sameJSON(t, got, plainEncode(t, req)) })
	}
}

// appendMessageJSON writes every field json.Marshal writes: a field added
// to engine.MessageRecord or engine.Message must be added to it too. Each
// field is also left empty in turn (the omitempty fields then go).
func TestAppendMessageJSONWritesEveryField(t *testing.T) {
	var base engine.MessageRecord
	fill(t, reflect.ValueOf(&base).Elem(), 1)
	base.Message.Content = json.RawMessage(` { "text" : "a <b>" } `) // raw fields go as stored
	var leaves []string
	walk(reflect.ValueOf(&base).Elem(), "", &leaves)
	for _, path := range append([]string{""}, leaves...) {
		c := base
		if path != "" {
			f := fieldAt(reflect.ValueOf(&c).Elem(), path)
			f.Set(reflect.Zero(f.Type()))
		}
		want, err := json.Marshal(&c)
		if err != nil {
			t.Fatal(err)
		}
		got := appendMessageJSON([]byte("x"), &c)
		if got[0] != 'x' {
			t.Fatalf("appendMessageJSON overwrote what it appends to: %s", got)
		}
		t.Run("empty="+path, func(t *testing.T) { sameJSON(t, got[1:], want) })
	}
}

// appendJSONString escapes exactly as encoding/json does, byte for byte.
func TestAppendJSONStringEscapesAsEncodingJSON(t *testing.T) {
	for _, s := range jsonStringSeeds {
		checkJSONString(t, s)
	}
}

var jsonStringSeeds = []string{
	"", "plain", `quote " and \ backslash`, "<script>&amp;</script>", "tab\tnl\ncr\rff\fbs\b",
	"\x00\x01\x1f\x7f", "é ü ß 日本 🎉", "bad \xff utf8 \xc3", "line \u2028 para \u2029 sep", "\xe2\x80",
}

func checkJSONString(t *testing.T, s string) {
	t.Helper()
	want, err := stdjson.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if got := appendJSONString(nil, s); string(got) != string(want) {
		t.Fatalf("appendJSONString(%q) = %s, want %s", s, got, want)
	}
}

// FuzzAppendJSONString compares appendJSONString with encoding/json on
// any string.
func FuzzAppendJSONString(f *testing.F) {
	for _, s := range jsonStringSeeds {
		f.Add(s)
	}
	f.Fuzz(checkJSONString)
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

// BenchmarkEncodeRun: the RUN payload of a run whose context carries 20
// or 500 messages of about 300 bytes; "marshal" encodes the same messages
// with json.Marshal one by one, as the payload's messages were encoded
// before appendMessageJSON (the baseline of the same run).
func BenchmarkEncodeRun(b *testing.B) {
	for _, n := range []int{20, 500} {
		req := &engine.RunRequest{DispatchID: "d", RunID: "r", ThreadID: "t", AgentID: "a", SessionID: "s", RunMode: "scheduled", Origin: "User",
			Messages: []engine.Message{{Role: "user", Content: json.RawMessage(`"go"`)}},
			Context:  engine.ThreadContext{Messages: contextRecords("t", n, strings.Repeat("lorem ipsum dolor sit amet ", 10)), FirstSeq: 1, TotalMessages: uint64(n)}}
		b.Run(fmt.Sprintf("messages=%d/direct", n), func(b *testing.B) {
			b.ReportAllocs()
			var size int
			for b.Loop() {
				p, err := encodeRun(getRunBuf(), req)
				if err != nil {
					b.Fatal(err)
				}
				size = len(p)
				putRunBuf(p)
			}
			b.SetBytes(int64(size))
		})
		b.Run(fmt.Sprintf("messages=%d/marshal", n), func(b *testing.B) {
			b.ReportAllocs()
			var size int
			for b.Loop() {
				p := append(getRunBuf(), '[')
				for i := range req.Context.Messages {
					m, err := json.Marshal(&req.Context.Messages[i])
					if err != nil {
						b.Fatal(err)
					}
					p = append(append(p, m...), ',')
				}
				size = len(p)
				putRunBuf(p)
			}
			b.SetBytes(int64(size))
		})
	}
}

// A RUN whose messages hold bytes that are not UTF-8 (stored by an earlier
// version) is sent with U+FFFD in their place, a frame the agent accepts,
// instead of one it refuses with its connection. A context message and
// the activation message alike (a review found the first version checked
// the context alone, and failed the run).
func TestRunPayloadReplacesBytesThatAreNotUTF8(t *testing.T) {
	for i, bad := range []func(req *engine.RunRequest){
		func(req *engine.RunRequest) { req.Context.Messages[1].Message.Content = json.RawMessage("\"a\xffb\"") },
		func(req *engine.RunRequest) {
			req.Context.Messages[1].Message.ToolCalls = json.RawMessage("[\"\xc3\"]")
		},
		func(req *engine.RunRequest) {
			req.Context.Messages[1].Message.Metadata = json.RawMessage("{\"k\":\"\xe2\x80\"}")
		},
		func(req *engine.RunRequest) { req.Messages[0].Content = json.RawMessage("\"in \xff\"") },
	} {
		req := &engine.RunRequest{DispatchID: "d", RunID: "r", ThreadID: "t", Messages: []engine.Message{{Role: "user", Content: json.RawMessage(`"go"`)}},
			Context: engine.ThreadContext{Messages: contextRecords("t", 3, "fine")}}
		clean, repaired, err := runPayload(nil, req)
		if err != nil || repaired {
			t.Fatalf("a clean request: repaired %v, %v", repaired, err)
		}
		bad(req)
		p, repaired, err := runPayload(nil, req)
		if err != nil || !repaired {
			t.Fatalf("case %d: repaired %v, %v", i, repaired, err)
		}
		if err := ipc.CheckPayload(ipc.TypeRun, p); err != nil {
			t.Fatalf("case %d: the agent would refuse %q: %v", i, p, err)
		}
		if !strings.Contains(string(p), "\uFFFD") || len(p) == len(clean) && string(p) == string(clean) {
			t.Fatalf("case %d: no replacement in %q", i, p)
		}
	}
}
