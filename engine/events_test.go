package engine

import (
	"fmt"
	"strings"
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

// The ids of a run's attempts (README, "Event ids"): each recorded start
// has a band of its own, and an attempt that did not reach the agent
// numbers its lone run_finish above the band's started ids and below the
// next band.
func TestAttemptIDBands(t *testing.T) {
	if attemptBase(0) != 1 || attemptBase(1) != 1 || attemptBase(2) != 1<<32+1 || attemptBase(3) != 2<<32+1 {
		t.Fatalf("attemptBase: %d %d %d %d", attemptBase(0), attemptBase(1), attemptBase(2), attemptBase(3))
	}
	if unstartedBase(0) != 1<<31+1 || unstartedBase(1) != 1<<31+1 || unstartedBase(3) != 2<<32+1<<31+1 {
		t.Fatalf("unstartedBase: %d %d %d", unstartedBase(0), unstartedBase(1), unstartedBase(3))
	}
	for s := uint32(1); s < 5; s++ {
		if !(attemptBase(s)+1<<31-1 < unstartedBase(s) && unstartedBase(s) < attemptBase(s+1)) {
			t.Fatalf("start %d: attempt %d, unstarted %d, next attempt %d", s, attemptBase(s), unstartedBase(s), attemptBase(s+1))
		}
	}
	if last := attemptBase(1<<21) + 1<<31; last >= 1<<53 {
		t.Fatalf("the ids of the first 2^21 starts reach %d, not below 2^53 (exact in a JavaScript number)", last)
	}
}

// A log numbered after an earlier attempt: a reader at 0 or at the
// previous attempt's last id this process saw goes on without a reset;
// any other id from before the log gets one; a reader inside the log is
// served as before, and one behind the ring gets a reset.
func TestEventLogNumberedAfterAnEarlierAttempt(t *testing.T) {
	base := attemptBase(2)
	l := NewEventLog(4)
	l.number(base, 7)
	l.number(99, 0) // once only
	if l.LastSeq() != base-1 {
		t.Fatalf("empty numbered log: LastSeq %d, want %d", l.LastSeq(), base-1)
	}
	for i := range 3 {
		if seq := l.Append([]byte(`{"type":"text_delta"}`)); seq != base+uint64(i) {
			t.Fatalf("append %d: seq %d, want %d", i, seq, base+uint64(i))
		}
	}
	l.number(5, 0) // after an append: no effect
	for _, c := range []struct {
		after    uint64
		reset    bool
		first, n uint64
		what     string
	}{
		{0, false, base, 3, "nothing seen"},
		{7, false, base, 3, "the previous attempt's last id, seen here"},
		{6, true, base, 3, "an earlier id of the previous attempt"},
		{unstartedBase(1), true, base, 3, "an id of another log"},
		{base, false, base + 1, 2, "inside the log"},
		{base + 2, false, 0, 0, "caught up"},
	} {
		evs, reset, closed, _ := l.Read(c.after, 10, nil)
		if reset != c.reset || closed || uint64(len(evs)) != c.n || c.n > 0 && evs[0].Seq != c.first {
			t.Errorf("%s: Read(%d) = %v reset=%v closed=%v, want %d events from %d reset=%v", c.what, c.after, evs, reset, closed, c.n, c.first, c.reset)
		}
	}
	for range 3 {
		l.Append([]byte(`{"type":"text_delta"}`))
	}
	for _, after := range []uint64{0, 7, base} { // base+1, base+2 fell out of the ring
		evs, reset, _, _ := l.Read(after, 10, nil)
		if !reset || len(evs) != 4 || evs[0].Seq != base+2 {
			t.Errorf("after the ring wrapped: Read(%d) = %v reset=%v, want a reset and 4 events from %d", after, evs, reset, base+2)
		}
	}
}

// A run's sink can append without waking the log's readers (QuietSink):
// they are woken by WakeReaders, and see every event appended before it.
func TestRunSinkEmitQuietWakesOnlyOnWakeReaders(t *testing.T) {
	e := &execution{events: NewEventLog(8)}
	var s QuietSink = runSink{e}
	_, _, _, wait := e.events.Read(0, 10, nil)
	s.EmitQuiet([]byte(`{"type":"run_start"}`))
	s.EmitQuiet([]byte(`{"type":"text_delta"}`))
	select {
	case <-wait:
		t.Fatal("EmitQuiet woke the reader")
	default:
	}
	s.WakeReaders()
	select {
	case <-wait:
	default:
		t.Fatal("WakeReaders did not wake the reader")
	}
	evs, _, _, _ := e.events.Read(0, 10, nil)
	if len(evs) != 2 || evs[0].Type != "run_start" || evs[1].Type != "text_delta" {
		t.Fatalf("events %v", evs)
	}
	_, _, _, wait = e.events.Read(2, 10, nil)
	s.Emit([]byte(`{"type":"run_finish"}`))
	select {
	case <-wait:
	default:
		t.Fatal("Emit did not wake the reader")
	}
}

// A closed log that did not wrap keeps its events in an array of their
// number, not in the ring's spare room (a finished run's log stays for
// EventRetention), and reads them as before; one that wrapped is left as
// it is.
func TestEventLogGivesBackItsSpareRoomWhenClosed(t *testing.T) {
	l := NewEventLog(100)
	for i := range 3 {
		l.Append([]byte(fmt.Sprintf(`{"type":"text_delta","n":%d}`, i)))
	}
	l.Close(1)
	if cap(l.ring) != 3 {
		t.Fatalf("closed log of 3 events keeps room for %d", cap(l.ring))
	}
	evs, reset, closed, _ := l.Read(1, 10, nil)
	if reset || closed || len(evs) != 2 || evs[0].Seq != 2 || string(evs[1].Data) != `{"type":"text_delta","n":2}` {
		t.Fatalf("read after close: %+v reset=%v closed=%v", evs, reset, closed)
	}
	if _, _, closed, _ := l.Read(3, 10, nil); !closed {
		t.Fatal("fully read closed log not reported closed")
	}

	w := NewEventLog(4)
	for i := range 6 {
		w.Append([]byte(fmt.Sprintf(`{"type":"text_delta","n":%d}`, i)))
	}
	w.Close(1)
	evs, reset, _, _ = w.Read(0, 10, nil)
	if !reset || len(evs) != 4 || evs[0].Seq != 3 || evs[3].Seq != 6 {
		t.Fatalf("wrapped log after close: %+v reset=%v", evs, reset)
	}
}

// A log keeps at most maxBytes of event data besides its count: the
// oldest events go, a reader behind them gets a reset, and the newest
// event is kept even when it alone is larger (found by review: one run's
// large events held the sidecar past its memory limit). Dropped for their
// bytes or overwritten in the ring, an event's bytes are counted once.
func TestEventLogKeepsAtMostItsBytes(t *testing.T) {
	event := func(n, size int) []byte {
		return fmt.Appendf(nil, `{"type":"text_delta","n":%d,"pad":"%0*d"}`, n, size, 0)
	}
	l := NewBoundedEventLog(4, 1000)
	for i := range 10 {
		l.Append(event(i, 300)) // about 340 bytes each: two fit
	}
	evs, reset, _, _ := l.Read(0, 100, nil)
	if !reset || len(evs) != 2 || evs[0].Seq != 9 || evs[1].Seq != 10 {
		t.Fatalf("read from 0: reset=%v %d events from %d; want the last two with a reset", reset, len(evs), evs[0].Seq)
	}
	if l.bytes > 1000 || l.bytes != evs[0].Size()+evs[1].Size() {
		t.Fatalf("%d bytes counted for two events of %d and %d", l.bytes, evs[0].Size(), evs[1].Size())
	}
	l.Append(event(10, 5000)) // larger than the bound alone: kept alone
	if evs, _, _, _ = l.Read(0, 100, nil); len(evs) != 1 || evs[0].Seq != 11 || l.FirstSeq() != 11 {
		t.Fatalf("after a large event: %d events from %d; want it alone", len(evs), evs[0].Seq)
	}
	for i := 11; i < 20; i++ { // small ones: the count bounds them again
		l.Append(event(i, 10))
	}
	if evs, _, _, _ = l.Read(0, 100, nil); len(evs) != 4 || evs[0].Seq != 17 || l.bytes != 4*evs[0].Size() {
		t.Fatalf("after small events: %d events from %d, %d bytes; want the last four", len(evs), evs[0].Seq, l.bytes)
	}
	unbounded := NewEventLog(4)
	for i := range 10 {
		unbounded.Append(event(i, 300))
	}
	if evs, _, _, _ := unbounded.Read(0, 100, nil); len(evs) != 4 {
		t.Fatalf("a log without a byte bound kept %d events, want its count, 4", len(evs))
	}
}

// An event counts its type and its bookkeeping too, and one dropped for
// its bytes lets its type go: tiny events once held several times their
// budget, and an agent's event types of its own (a copy each) were not
// counted and outlived their events' data.
func TestEventLogCountsTypesAndBookkeeping(t *testing.T) {
	const maxBytes = 64 << 10
	l := NewBoundedEventLog(10000, maxBytes)
	tiny := []byte(`{"type":"text_delta"}`)
	for range 5000 {
		l.Append(tiny)
	}
	want := Event{Type: "text_delta", Data: tiny}.Size()
	if kept := int64(l.LastSeq() - l.FirstSeq() + 1); l.bytes > maxBytes || kept*want != l.bytes || kept > maxBytes/want {
		t.Fatalf("%d tiny events kept in %d bytes under a bound of %d", kept, l.bytes, maxBytes)
	}
	own := fmt.Appendf(nil, `{"type":"%s"}`, strings.Repeat("k", 4<<10))
	for range 200 {
		l.Append(own)
	}
	kept := int64(l.LastSeq() - l.FirstSeq() + 1)
	if e := (Event{Type: string(own[9 : len(own)-2]), Data: own}); l.bytes != kept*e.Size() || kept > 8 {
		t.Fatalf("%d events with a 4 KiB type of their own kept in %d bytes", kept, l.bytes)
	}
	var types int
	for _, e := range l.ring {
		types += len(e.Type)
	}
	if types > int(kept)*(4<<10)+len("text_delta")*len(l.ring) {
		t.Fatalf("the ring holds %d bytes of types for %d events kept", types, kept)
	}
}

// ReadUpTo stops once the events it returns hold maxBytes, and returns
// one event even when that one alone holds more.
func TestEventLogReadUpToBoundsTheBytesItReturns(t *testing.T) {
	l := NewEventLog(16)
	pad := strings.Repeat("x", 100)
	for i := range 8 {
		l.Append(fmt.Appendf(nil, `{"type":"text_delta","n":%d,"pad":%q}`, i, pad))
	}
	size := len(fmt.Appendf(nil, `{"type":"text_delta","n":%d,"pad":%q}`, 0, pad))
	evs, _, _, _ := l.ReadUpTo(0, 64, 3*size, nil)
	if len(evs) != 3 || evs[0].Seq != 1 || evs[2].Seq != 3 {
		t.Fatalf("read of %d bytes: %d events %v, want 1..3", 3*size, len(evs), evs)
	}
	if evs, _, _, _ = l.ReadUpTo(3, 64, 1, nil); len(evs) != 1 || evs[0].Seq != 4 {
		t.Fatalf("read of 1 byte: %v, want event 4 alone", evs)
	}
	if evs, _, _, _ = l.ReadUpTo(4, 64, 0, nil); len(evs) != 4 {
		t.Fatalf("read without a byte bound: %d events, want 4", len(evs))
	}
}
