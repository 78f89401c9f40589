package engine

import (
	"fmt"
	"testing"
)

func TestEventLogReadsInOrderAndResetsPastTheRing(t *testing.T) {
	l := NewEventLog(4)
	for i := range 6 {
		if seq := l.Append(fmt.Appendf(nil, `{"type":"text_delta","n":%d}`, i)); seq != uint64(i+1) {
			t.Fatalf("append %d got seq %d", i, seq)
		}
	}
	evs, reset, closed, _ := l.Read(0, 10, nil)
	if !reset || closed || len(evs) != 4 || evs[0].Seq != 3 || evs[3].Seq != 6 {
		t.Fatalf("read from 0: reset=%v closed=%v %v", reset, closed, evs)
	}
	evs, reset, _, _ = l.Read(4, 10, nil)
	if reset || len(evs) != 2 || evs[0].Seq != 5 || string(evs[1].Data) != `{"type":"text_delta","n":5}` || evs[1].Type != "text_delta" {
		t.Fatalf("read after 4: reset=%v %v", reset, evs)
	}
	evs, _, closed, wait := l.Read(6, 10, nil)
	if len(evs) != 0 || closed || wait == nil {
		t.Fatalf("caught up: %v closed=%v wait=%v", evs, closed, wait)
	}
	l.Append([]byte(`{"type":"run_finish"}`))
	select {
	case <-wait:
	default:
		t.Fatal("append did not wake the reader")
	}
	l.Close(5)
	evs, _, closed, _ = l.Read(6, 10, nil)
	if len(evs) != 1 || evs[0].Type != "run_finish" || closed {
		t.Fatalf("after close, drain: %v closed=%v", evs, closed)
	}
	if _, _, closed, _ = l.Read(7, 10, nil); !closed {
		t.Fatal("drained closed log not reported closed")
	}
	if l.Append([]byte(`{}`)) != 0 {
		t.Fatal("append after close accepted")
	}
}

func TestEventTypeAndSuspension(t *testing.T) {
	cases := []struct {
		in      string
		typ     string
		suspend int
	}{
		{`{"type":"tool_call_done","outcome":"suspended"}`, "tool_call_done", 1},
		{`{"outcome":"suspended", "type" : "tool_call_done"}`, "tool_call_done", 1},
		{`{"type":"tool_call_done","outcome":"succeeded"}`, "tool_call_done", 0},
		{`{"type":"tool_call_resumed"}`, "tool_call_resumed", -1},
		{`{"data":{"type":"inner"},"type":"text_delta"}`, "text_delta", 0},
		{`{"data":"\"type\":\"x\"","type":"custom_\"q"}`, `custom_\"q`, 0},
		{`{"type":1}`, "", 0},
		{`not json`, "", 0},
		{`{"type":"tool_call_done","result":{"outcome":"suspended"}}`, "tool_call_done", 0},
	}
	for _, c := range cases {
		typ := eventType([]byte(c.in))
		if typ != c.typ {
			t.Errorf("eventType(%s) = %q, want %q", c.in, typ, c.typ)
		}
		if got := suspensionChange(typ, []byte(c.in)); got != c.suspend {
			t.Errorf("suspensionChange(%s) = %d, want %d", c.in, got, c.suspend)
		}
	}
}

func TestEventTypeKnownTypesDoNotAllocate(t *testing.T) {
	data := []byte(`{"type":"text_delta","delta":"hello"}`)
	if n := testing.AllocsPerRun(100, func() { _ = eventType(data) }); n != 0 {
		t.Fatalf("eventType allocates %v times", n)
	}
}

func FuzzEventType(f *testing.F) {
	for _, s := range []string{`{"type":"x"}`, `{"a":[{"type":"y"}],"type":"z"}`, `{"type":"\`, `"`, `{{{{`, `}}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		typ := eventType(b)
		_ = suspensionChange(typ, b)
	})
}
