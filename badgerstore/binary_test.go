package badgerstore

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// fill sets every field reachable from v (a pointer) to a value that is
// not its zero value, distinct per field path, so that a codec which drops
// or swaps a field — or misses one added later — fails a round trip.
func fill(t *testing.T, v reflect.Value, path string) {
	t.Helper()
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		fill(t, v.Elem(), path)
	case reflect.Struct:
		for i := range v.NumField() {
			f := v.Type().Field(i)
			if !f.IsExported() {
				continue
			}
			fill(t, v.Field(i), path+"."+f.Name)
		}
	case reflect.String:
		v.SetString("s" + path)
	case reflect.Int, reflect.Int64, reflect.Int32:
		v.SetInt(-int64(len(path)) * 1_000_003) // negative: zig-zag must hold
	case reflect.Uint8:
		v.SetUint(uint64(len(path)%200 + 3))
	case reflect.Uint, reflect.Uint64, reflect.Uint32:
		v.SetUint(uint64(len(path)) * 70_001)
	case reflect.Slice:
		if v.Type() == reflect.TypeFor[json.RawMessage]() || v.Type().Elem().Kind() == reflect.Uint8 {
			v.SetBytes([]byte(fmt.Sprintf(`{"path":%q}`, path)))
			return
		}
		s := reflect.MakeSlice(v.Type(), 2, 2)
		for i := range 2 {
			fill(t, s.Index(i).Addr(), fmt.Sprintf("%s[%d]", path, i))
		}
		v.Set(s)
	default:
		t.Fatalf("fill: field %s of kind %s: teach the test (and check binary.go codes it)", path, v.Kind())
	}
}

func TestBinaryRecordsRoundTripEveryField(t *testing.T) {
	d := &engine.Dispatch{}
	fill(t, reflect.ValueOf(d), "d")
	d.DispatchID = "d1"
	b, err := encode(d)
	if err != nil || b[0] != binaryV1 {
		t.Fatalf("encode dispatch = %x, %v", b, err)
	}
	if strings.Contains(string(b), "d1") {
		t.Fatalf("the dispatch id is repeated in the value: %q", b)
	}
	d2, err := readDispatch("d1", b)
	if err != nil || !reflect.DeepEqual(d, d2) {
		t.Fatalf("dispatch round trip:\n%+v\n%+v\n%v", d, d2, err)
	}

	r := &engine.RunRecord{}
	fill(t, reflect.ValueOf(r), "r")
	r.RunID = "r1"
	b, _ = encode(r)
	r2, err := readRun("r1", b)
	if err != nil || !reflect.DeepEqual(r, r2) {
		t.Fatalf("run round trip:\n%+v\n%+v\n%v", r, r2, err)
	}

	th := &engine.Thread{}
	fill(t, reflect.ValueOf(th), "t")
	th.ID = "t1"
	b, _ = encode(th)
	th2, err := readThread("t1", b)
	if err != nil || !reflect.DeepEqual(th, th2) {
		t.Fatalf("thread round trip:\n%+v\n%+v\n%v", th, th2, err)
	}

	// A message record: its thread and seq come from the key; the message's
	// own id and tool call id, which fill makes differ from the record's,
	// are kept.
	m := &engine.MessageRecord{}
	fill(t, reflect.ValueOf(m), "m")
	m.ThreadID, m.Seq = "t1", 42
	b, _ = encode(m)
	if b[0] != binaryMessageV1 || strings.Contains(string(b), "t1") {
		t.Fatalf("encode message = %q: want binaryMessageV1 without the thread id", b)
	}
	for _, owned := range []bool{false, true} {
		m2, err := decodeMessage(messageKey("t1", 42), slices.Clone(b))
		if owned {
			m2, err = decodeMessageOf("t1", 42, messageKey("t1", 42), slices.Clone(b), true)
		}
		if err != nil || !reflect.DeepEqual(*m, m2) {
			t.Fatalf("message round trip (owned %v):\n%+v\n%+v\n%v", owned, *m, m2, err)
		}
	}
	// As a checkpoint writes it: the ids are not repeated.
	m.Message.ID, m.ToolCallID = m.MessageID, m.Message.ToolCallID
	b, _ = encode(m)
	if n := strings.Count(string(b), m.MessageID); n != 1 || strings.Count(string(b), m.ToolCallID) != 1 {
		t.Fatalf("the message id is written %d times: %q", n, b)
	}
	if m2, err := decodeMessage(messageKey("t1", 42), b); err != nil || !reflect.DeepEqual(*m, m2) {
		t.Fatalf("message round trip:\n%+v\n%+v\n%v", *m, m2, err)
	}
}

// A message decoded from bytes the caller gives up shares them for its
// raw fields, capped: appending to one does not overwrite the next.
func TestAnOwnedMessageRecordsRawFieldsAreCapped(t *testing.T) {
	m := engine.MessageRecord{MessageID: "m1", ThreadID: "t1", Seq: 1, CreatedAt: 5,
		Message: engine.Message{ID: "m1", Role: engine.RoleTool, Content: []byte(`"a"`), ToolCalls: []byte(`[1]`), Metadata: []byte(`{"k":2}`)}}
	b, _ := encode(&m)
	got, err := decodeMessageOf("t1", 1, messageKey("t1", 1), b, true)
	if err != nil || !reflect.DeepEqual(got, m) {
		t.Fatalf("decoded %+v, %v", got, err)
	}
	_ = append(got.Message.Content, "XXXXXXXX"...)
	_ = append(got.Message.ToolCalls, "XXXXXXXX"...)
	if string(got.Message.ToolCalls) != `[1]` || string(got.Message.Metadata) != `{"k":2}` {
		t.Fatalf("an append overwrote the next field: tool_calls %s metadata %s", got.Message.ToolCalls, got.Message.Metadata)
	}
}

// A run record in the binary form of earlier versions (binaryV1: no
// start_count) still decodes, with StartCount 0, and is rewritten in the
// current form.
func TestBinaryV1RunRecordsStillDecode(t *testing.T) {
	r := &engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunRunning, SessionID: "s1", CreatedAt: 7, StartedAt: 8, UpdatedAt: 9, Steps: 2}
	b, _ := encode(r)
	if b[0] != binaryRunV2 || b[len(b)-1] != 0 {
		t.Fatalf("run record = %x, want binaryRunV2 ending in start_count 0", b)
	}
	v1 := append([]byte{binaryV1}, b[1:len(b)-1]...)
	got, err := decodeRun(RunKey("r1"), v1)
	if err != nil || !reflect.DeepEqual(got, r) {
		t.Fatalf("binaryV1 run record decodes to\n%+v\n%v, want\n%+v", got, err, r)
	}
	r.StartCount = 300
	b, _ = encode(r)
	if got, err := decodeRun(RunKey("r1"), b); err != nil || got.StartCount != 300 {
		t.Fatalf("start_count round trip: %+v %v", got, err)
	}
}

// Records written as JSON by earlier versions decode as before, through
// the same entry points the store reads with.
func TestJSONRecordsOfEarlierVersionsStillDecode(t *testing.T) {
	d := &engine.Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Status: engine.StatusAcked, MaxAttempts: 5, AttemptCount: 1,
		Errors: []engine.AttemptError{{Attempt: 1, Error: "x", At: 9}}, Termination: &engine.Termination{Type: "error", Value: json.RawMessage(`"boom"`)}, CreatedAt: 7, UpdatedAt: 9, CompletedAt: 9}
	r := &engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunWaiting, Waiting: &engine.RunWaitingState{Reason: "user_input", TicketIDs: []string{"k"}},
		Input: &engine.RunMessageInput{ThreadID: "t1", Range: &engine.SeqRange{From: 1, To: 3}}, Request: &engine.RunRequestSnapshot{InputMessageIDs: []string{"m1"}}, CreatedAt: 1, UpdatedAt: 2}
	th := &engine.Thread{ID: "t1", OpenRunID: "r1", OpenRunStatus: engine.RunWaiting, LatestRunID: "r1", MessageCount: 3}
	msg := &engine.MessageRecord{MessageID: "m1", ThreadID: "t1", Seq: 3, Message: engine.Message{ID: "m1", Role: engine.RoleUser, Content: json.RawMessage(`"hi"`)}, ProducedByRunID: "r1", CreatedAt: 9}
	for _, c := range []struct {
		rec    any
		key    []byte
		decode func(k, b []byte) (any, error)
	}{
		{msg, messageKey("t1", 3), func(k, b []byte) (any, error) { m, err := decodeMessage(k, b); return &m, err }},
		{d, dispatchKey("d1"), func(k, b []byte) (any, error) { return decodeDispatch(k, b) }},
		{r, runKey("r1"), func(k, b []byte) (any, error) { return decodeRun(k, b) }},
		{th, threadKey("t1"), func(k, b []byte) (any, error) { return decodeThread(k, b) }},
	} {
		js, err := json.Marshal(c.rec)
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.decode(c.key, js)
		if err != nil || !reflect.DeepEqual(got, c.rec) {
			t.Fatalf("JSON %s decoded to %+v, %v; want %+v", js, got, err, c.rec)
		}
		bin, _ := encode(got)
		again, err := c.decode(c.key, bin)
		if err != nil || !reflect.DeepEqual(again, c.rec) {
			t.Fatalf("rewritten binary decoded to %+v, %v; want %+v", again, err, c.rec)
		}
	}
}

// Every truncation, a trailing byte and a bad presence byte are ErrCorrupt.
func TestBinaryRecordDamageIsCorrupt(t *testing.T) {
	m := &engine.MessageRecord{}
	fill(t, reflect.ValueOf(m), "m")
	mb, _ := encode(m)
	mkey := messageKey("t1", 1)
	for n := range len(mb) {
		if _, err := decodeMessage(mkey, mb[:n]); !errors.Is(err, engine.ErrCorrupt) {
			t.Fatalf("decode of the first %d of %d message bytes = %v; want ErrCorrupt", n, len(mb), err)
		}
	}
	if _, err := decodeMessage(mkey, append(slices.Clone(mb), 0)); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("a trailing byte after a message: %v; want ErrCorrupt", err)
	}
	if _, err := decodeMessage([]byte("Mx"), mb); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("a binary message under a malformed key: %v; want ErrCorrupt", err)
	}

	r := &engine.RunRecord{}
	fill(t, reflect.ValueOf(r), "r")
	r.RunID, r.Status = "r1", engine.RunDone
	b, _ := encode(r)
	key := runKey("r1")
	for n := range len(b) {
		if _, err := decodeRun(key, b[:n]); !errors.Is(err, engine.ErrCorrupt) {
			t.Fatalf("decode of the first %d of %d bytes = %v; want ErrCorrupt", n, len(b), err)
		}
	}
	if _, err := decodeRun(key, append(append([]byte(nil), b...), 0)); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("a trailing byte: %v; want ErrCorrupt", err)
	}
	th, _ := encode(&engine.Thread{ID: "t1"})
	if _, err := decodeThread(threadKey("t1"), th); err != nil {
		t.Fatal(err)
	}
	d, _ := encode(&engine.Dispatch{DispatchID: "d1", ThreadID: "t", RunID: "r", Status: engine.StatusAcked, MaxAttempts: 1, RunResponse: "x", RunError: "y", CreatedAt: 1, UpdatedAt: 2, CompletedAt: 2})
	if _, err := decodeDispatch(dispatchKey("d1"), d); err != nil {
		t.Fatal(err)
	}
	// The record ends: termination presence 0, 1 "x", 1 "y", three one-byte times.
	if i := len(d) - 8; d[i] != 0 || d[i+1] != 1 || d[i+2] != 'x' {
		t.Fatalf("unexpected layout %x", d)
	}
	d[len(d)-8] = 7
	if _, err := decodeDispatch(dispatchKey("d1"), d); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("bad presence byte: %v; want ErrCorrupt", err)
	}
}

// BenchmarkRecordCodec compares the binary form with the JSON it replaced
// for a run record as a finished background run leaves it.
func BenchmarkRecordCodec(b *testing.B) {
	r := &engine.RunRecord{RunID: "0197a4a2-5c0e-7d3e-9f3b-6c1e2a9b8f10", ThreadID: "thread-42", AgentID: "agent", Status: engine.RunDone,
		Request:           &engine.RunRequestSnapshot{Origin: "User", InputMessageIDs: []string{"0197a4a2-5c0e-7d3e-9f3b-6c1e2a9b8f11"}, InputMessageCount: 1},
		Input:             &engine.RunMessageInput{ThreadID: "thread-42", Range: &engine.SeqRange{From: 1, To: 20}, TriggerMessageIDs: []string{"0197a4a2-5c0e-7d3e-9f3b-6c1e2a9b8f11"}},
		TerminationReason: &engine.Termination{Type: engine.TermNaturalEnd}, DispatchID: "0197a4a2-5c0e-7d3e-9f3b-6c1e2a9b8f12", SessionID: "0197a4a2-5c0e-7d3e-9f3b-6c1e2a9b8f13",
		CreatedAt: 1_790_000_000, StartedAt: 1_790_000_000, FinishedAt: 1_790_000_001, UpdatedAt: 1_790_000_001, Steps: 1}
	key := runKey(r.RunID)
	js, _ := json.Marshal(r)
	bin, _ := encode(r)
	b.Run("binary", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			v, _ := encode(r)
			if _, err := decodeRun(key, v); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(bin)), "bytes")
	})
	b.Run("json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			v, _ := json.Marshal(r)
			if _, err := decodeRun(key, v); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(js)), "bytes")
	})
}

// A decoded message keeps its bytes once, however it was read: the engine's
// context cache counts a record by its fields' length (found by a review:
// the ids, slices of a string copy of the whole record, kept the content a
// second time).
func TestADecodedMessageKeepsItsBytesOnce(t *testing.T) {
	const n, size = 200, 64 << 10
	content, _ := json.Marshal(strings.Repeat("x", size))
	rec := engine.MessageRecord{MessageID: "m1", ThreadID: "t1", Seq: 1, Message: engine.Message{ID: "m1", Role: engine.RoleUser, Content: content}, CreatedAt: 1}
	bin, _ := encode(&rec)
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	for _, owned := range []bool{true, false} {
		keep := make([]engine.MessageRecord, n)
		before := heap()
		for i := range keep {
			var err error
			keep[i], err = decodeMessageOf("t1", 1, messageKey("t1", 1), slices.Clone(bin), owned)
			if err != nil {
				t.Fatal(err)
			}
		}
		per := float64(heap()-before) / n
		runtime.KeepAlive(keep)
		if per > 1.5*size {
			t.Errorf("owned %v: a %d-byte message keeps %.0f bytes", owned, size, per)
		}
	}
}

// A context window's read allocates once per message (the value copy its
// record keeps), not once more for a copy of each key, which the walk
// reads and drops.
func TestAWindowReadAllocatesOncePerMessage(t *testing.T) {
	s := memStore(t)
	ctx := context.Background()
	const n = 200
	msgs := make([]engine.Message, n)
	for i := range msgs {
		msgs[i] = engine.Message{ID: fmt.Sprintf("m%d", i), Role: engine.RoleUser, Content: []byte(`"a message of the window"`)}
	}
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t", ExpectedCount: 0, CreatedAt: 1, Messages: msgs}); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(20, func() {
		got, err := s.LoadMessageRange(ctx, "t", 1, n)
		if err != nil || len(got) != n {
			t.Fatalf("%d messages, %v", len(got), err)
		}
	})
	if allocs > 1.5*n {
		t.Fatalf("a window of %d messages: %.0f allocations; want about one per message", n, allocs)
	}
}
