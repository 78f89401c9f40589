package engine

import (
	"bytes"
	"sync"
	"sync/atomic"
)

// Event is one agent event of a run. Seq is its id on the wire: see
// "Event ids" in README.md (the first attempt of a run numbers from 1).
type Event struct {
	Seq  uint64
	Type string
	Data []byte
}

// eventOverhead is what a held event takes beside its data and its type:
// its slot in the ring (48 bytes) and the rounding of its data's
// allocation.
const eventOverhead = 64

// Size is what e counts against the event bounds (EventBufferBytes,
// EventBufferTotalBytes, EventRetentionBytes): its data, its type and 64
// bytes of bookkeeping. Data alone let tiny events take several times
// their budget (found by review: about seven times, in the heap), and an
// agent's event types of its own, a copy each, were not counted at all.
func (e Event) Size() int64 { return int64(len(e.Data)+len(e.Type)) + eventOverhead }

// held is what a ring slot counts: its event's Size, 0 once the event
// was dropped for its bytes (a zero slot).
func held(e Event) int64 {
	if e.Seq == 0 {
		return 0
	}
	return e.Size()
}

// Event ids. The attempt that is its run's s-th recorded start
// (RunRecord.StartCount, durable) numbers its events from
// (s-1)<<attemptIDShift + 1, so ids never repeat across a run's attempts,
// whichever process ran them and whatever it still holds. An attempt that
// ends without reaching the agent (its only event is the sidecar's
// run_finish) numbers it in the upper half of the band of the run's last
// recorded start, where no started attempt's ids fall.
const (
	attemptIDShift    = 32
	unstartedIDOffset = 1 << 31
)

// attemptBase is the first event id of the attempt that is its run's s-th
// recorded start.
func attemptBase(s uint32) uint64 {
	if s == 0 {
		return 1
	}
	return uint64(s-1)<<attemptIDShift + 1
}

// unstartedBase is the first event id of an attempt that did not reach
// the agent, when its run had s recorded starts (its own included, if its
// start was recorded).
func unstartedBase(s uint32) uint64 {
	band := uint64(0)
	if s > 0 {
		band = uint64(s - 1)
	}
	return band<<attemptIDShift + unstartedIDOffset + 1
}

// EventLog keeps the last events of one attempt of a run in a bounded
// ring so that a client can follow the run and re-attach after a
// disconnect without missing anything still buffered. Appends never
// block: a reader that falls further behind than the ring holds gets
// reset=true and resumes from the oldest event kept. Safe for concurrent
// use.
type EventLog struct {
	mu       sync.Mutex  // guards everything below
	limit    int         // most events kept
	maxBytes int64       // most bytes of event data kept (0: no bound); the newest event is always kept
	bytes    int64       // bytes of the events kept
	budget   *LiveBudget // shared by the open logs of a Mailbox (nil: none); left when closed
	ring     []Event     // grows to limit, then wraps: seq s lives at (s-base) % limit
	first    uint64      // seq of the oldest event kept (0 while empty)
	next     uint64      // seq the next event gets
	base     uint64      // seq of the log's first event (1 unless numbered)
	prev     uint64      // the last id of the run's previous attempt, when this process held its log (else 0)
	numbered bool        // number was applied
	// floor, while the log is not numbered, is the lowest id the attempt
	// that numbers it can use (above every id of the run's attempts that
	// started before; 0 when unknown): see NextSeqFloor.
	floor uint64
	// starts is the run's count of recorded starts after this log's
	// attempt (its own start included), when known (startsKnown): the
	// next attempt here tells from it whether this one was the run's
	// previous attempt.
	starts      uint32
	startsKnown bool
	run         string // the run whose attempt it follows; guarded by Mailbox.mu, not mu
	// pendingRun is the run of a log made for a dispatch whose attempt
	// has not started (attachPending), until run is set; guarded by
	// Mailbox.mu. Only AttachedRun reads it.
	pendingRun string
	// waitFrom is the dispatch's attempt count when this log began to
	// wait for it (a waiting log; guarded by Mailbox.mu): a higher count
	// read later is an attempt that failed elsewhere (endWaiting).
	waitFrom uint32
	handed   handedOn // set when handed on to the next attempt (handOnLog); guarded by Mailbox.mu
	closed   bool
	closedAt int64         // Unix ms, when closed
	wake     chan struct{} // closed on the next append or close; nil when nobody waits
}

// handedOn is what a log handed on by an attempt no agent took tells the
// attempt that numbers it: the log of the attempt before (from; nil when
// this process held none) and the starts recorded since by attempts no
// agent took (skipped).
type handedOn struct {
	from    *EventLog
	skipped uint32
}

// NewEventLog returns a log that keeps the last capacity events, numbered
// from 1.
func NewEventLog(capacity int) *EventLog { return NewBoundedEventLog(capacity, 0) }

// NewBoundedEventLog is NewEventLog keeping at most maxBytes of event data
// as well (0: no bound), the newest event always.
func NewBoundedEventLog(capacity int, maxBytes int64) *EventLog {
	if capacity < 1 {
		capacity = 1
	}
	return &EventLog{limit: capacity, maxBytes: max(maxBytes, 0), ring: make([]Event, 0, min(capacity, 16)), next: 1, base: 1}
}

// Append adds an event (data is copied) and returns its sequence number;
// after Close it does nothing and returns 0.
func (l *EventLog) Append(data []byte) uint64 { return l.appendTyped(eventType(data), data) }

func (l *EventLog) appendTyped(typ string, data []byte) uint64 {
	return l.appendWaking(typ, data, true)
}

// appendWaking is appendTyped; with wake false the readers waiting for
// the event are not woken (WakeReaders does it later).
func (l *EventLog) appendWaking(typ string, data []byte, wake bool) uint64 {
	cp := append([]byte(nil), data...)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return 0
	}
	seq := l.next
	l.next++
	e := Event{Seq: seq, Type: typ, Data: cp}
	if len(l.ring) < l.limit {
		l.ring = append(l.ring, e)
	} else {
		i := int((seq - l.base) % uint64(l.limit))
		l.addBytes(-held(l.ring[i])) // 0 when dropped for its bytes already
		l.ring[i] = e
	}
	l.addBytes(e.Size())
	l.first = max(l.first, seq-uint64(len(l.ring))+1)
	// The oldest events go while the log holds more than maxBytes: the
	// count alone let one run's large events hold gigabytes (found by
	// review: sixty 15 MiB events took the sidecar past its memory limit);
	// and, down to LiveBudgetFloor, while the open logs together hold more
	// than their budget (each run's bound times the agents' slots was no
	// bound: a 1 024-slot agent could make the sidecar hold 32 GiB).
	for l.first < seq && (l.maxBytes > 0 && l.bytes > l.maxBytes || l.bytes > LiveBudgetFloor && l.budget.over()) {
		i := int((l.first - l.base) % uint64(l.limit))
		l.addBytes(-held(l.ring[i]))
		l.ring[i] = Event{} // its type too: an agent's own type is a copy
		l.first++
	}
	if wake {
		l.wakeLocked()
	}
	return seq
}

// addBytes counts delta bytes of events (Event.Size) in the log and its
// budget.
func (l *EventLog) addBytes(delta int64) {
	l.bytes += delta
	if l.budget != nil {
		l.budget.used.Add(delta)
	}
}

// LiveBudget bounds the bytes of event data the open logs of a Mailbox
// (its running and waiting runs') hold together. Past it each log that
// grows drops its oldest events down to LiveBudgetFloor, as a log past
// its own bound does; a closed log leaves it (finished runs' logs are
// bounded by EventRetentionBytes). The open logs hold at most the limit
// plus, for each, LiveBudgetFloor and its newest event (a log keeps what
// it held when another filled the budget).
type LiveBudget struct {
	limit int64 // ≤ 0: no bound
	used  atomic.Int64
}

// LiveBudgetFloor is the event data a log keeps when the open logs are
// over their budget: a client a few events behind still follows without
// a reset.
const LiveBudgetFloor = 64 << 10

// over reports whether the open logs hold more than the budget (false
// for a nil budget).
func (b *LiveBudget) over() bool {
	return b != nil && b.limit > 0 && b.used.Load() > b.limit
}

// Used is the event data the open logs hold (0 for a nil budget).
func (b *LiveBudget) Used() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}

// WakeReaders wakes the readers waiting for an event (Read's wait
// channel), as Append does.
func (l *EventLog) WakeReaders() {
	l.mu.Lock()
	l.wakeLocked()
	l.mu.Unlock()
}

func (l *EventLog) wakeLocked() {
	if l.wake != nil {
		close(l.wake)
		l.wake = nil
	}
}

// number sets the id of the log's first event (base ≥ 1) and prev, the
// last id of the run's previous attempt when this process still holds
// its log (0 when not): a reader at prev goes on here without a reset.
// It applies once, and only before the first append.
func (l *EventLog) number(base, prev uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.numbered || l.next != l.base || base == 0 {
		return
	}
	// Never below the floor Attach set: a client may hold an id of the
	// run's last started attempt, and an id under it would be skipped
	// without a reset (found by review).
	base = max(base, l.floor)
	l.numbered = true
	l.next, l.base, l.prev = base, base, prev
}

// unnumber forgets the log's numbering, so that the attempt it is handed
// to numbers it, when nothing was appended; it reports whether it did
// (false once events were appended, or the log is closed).
func (l *EventLog) unnumber() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.next != l.base {
		return false
	}
	l.numbered, l.next, l.base, l.prev = false, 1, 1, 0
	l.starts, l.startsKnown = 0, false
	return true
}

// noteStarts records the run's count of recorded starts after this log's
// attempt (its own start included).
func (l *EventLog) noteStarts(s uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.starts, l.startsKnown = s, true
}

// startsAfter returns what noteStarts recorded; ok is false when nothing
// was (the attempt did not learn its run's start count).
func (l *EventLog) startsAfter() (s uint32, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.starts, l.startsKnown
}

// Close marks the run finished at nowMs; readers drain what is left and
// then see closed.
func (l *EventLog) Close(nowMs int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.closed, l.closedAt = true, nowMs
	if l.budget != nil {
		l.budget.used.Add(-l.bytes)
		l.budget = nil
	}
	// Kept for re-attachment (EventRetention) but never appended to
	// again: a ring that did not wrap gives back the room it did not use
	// (most runs emit a few events into room for 16).
	if len(l.ring) < l.limit && len(l.ring) < cap(l.ring) {
		l.ring = append(make([]Event, 0, len(l.ring)), l.ring...)
	}
	l.wakeLocked()
}

// retained is the bytes of events a closed log keeps, and when it was
// closed (ok false while it is open).
func (l *EventLog) retained() (bytes, closedAt int64, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.bytes, l.closedAt, l.closed
}

// ClosedAt reports whether the log is closed and when.
func (l *EventLog) ClosedAt() (int64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closedAt, l.closed
}

// NextSeqFloor is the lowest id this log's next event can have: the one
// after LastSeq once numbered; before, the floor Attach knew (above every
// id of the run's earlier started attempts), else 1. A client position at
// or above it is of no attempt before this one (another run's, or a log
// numbered apart); one below it is an earlier attempt's of this run, which
// Read answers with a reset unless it was the previous attempt's end.
func (l *EventLog) NextSeqFloor() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.numbered && l.next == l.base && l.floor > 0 {
		return l.floor
	}
	return l.next
}

// LastSeq returns the sequence number of the newest event, or the one
// before the log's first when it has none (0 for a log not numbered yet).
func (l *EventLog) LastSeq() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.next - 1
}

// FirstSeq returns the id of the oldest event kept, or the id the next
// event gets when there is none.
func (l *EventLog) FirstSeq() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.first == 0 {
		return l.next
	}
	return l.first
}

// Read returns up to max events with Seq > after, appended to buf.
// reset reports that events after `after` are not all served: some of
// this log's were already dropped (the returned ones start at the oldest
// kept), or after is an id from before this log's first event — of an
// earlier attempt of the run — other than the previous attempt's last id
// this process saw (then it goes on without a reset). after 0 (nothing of
// the run seen, the `submitted` event) starts at the log's first event.
// When nothing is available and the log is open, wait is a channel
// closed at the next append or close; closed reports that the log is
// closed and fully read.
func (l *EventLog) Read(after uint64, max int, buf []Event) (evs []Event, reset, closed bool, wait <-chan struct{}) {
	return l.ReadUpTo(after, max, 0, buf)
}

// ReadUpTo is Read that also stops once the events it returns hold
// maxBytes of data (0: no such bound); it returns at least one event
// when one is available. A reader that holds what it read while its
// client is slow holds that much at most, whatever the ring drops.
func (l *EventLog) ReadUpTo(after uint64, max, maxBytes int, buf []Event) (evs []Event, reset, closed bool, wait <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	evs = buf[:0]
	from := after + 1
	if from < l.base {
		reset = after != 0 && after != l.prev
		from = l.base
	}
	if l.first != 0 && from < l.first {
		reset = true
		from = l.first
	}
	n := 0
	for seq := from; seq < l.next && len(evs) < max && (maxBytes <= 0 || n < maxBytes); seq++ {
		e := l.ring[int((seq-l.base)%uint64(l.limit))]
		n += len(e.Data)
		evs = append(evs, e)
	}
	if len(evs) > 0 {
		return evs, reset, false, nil
	}
	if l.closed {
		return evs, reset, true, nil
	}
	if l.wake == nil {
		l.wake = make(chan struct{})
	}
	return evs, reset, false, l.wake
}

// Well-known event types, interned so the hot path does not allocate.
var knownEventTypes = []string{
	"run_start", "run_finish", "text_delta", "text_done", "reasoning_delta",
	"tool_call_start", "tool_call_delta", "tool_call_ready", "tool_call_done",
	"tool_call_resumed", "step_start", "step_end", "state_snapshot", "state_delta",
	"messages_snapshot", "activity", "error", "custom", "inference_complete",
}

// eventType returns the top-level "type" string of a JSON event object,
// or "" when there is none. It scans without decoding.
func eventType(data []byte) string {
	v := topLevelString(data, "type")
	if v == nil {
		return ""
	}
	for _, k := range knownEventTypes {
		if string(v) == k {
			return k
		}
	}
	return string(v)
}

// topLevelString finds key at depth 1 of a JSON object and returns its
// string value's raw bytes (escapes left as they are), or nil.
func topLevelString(data []byte, key string) []byte {
	depth := 0
	for i := 0; i < len(data); i++ {
		switch c := data[i]; c {
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case '"':
			end := stringEnd(data, i)
			if end < 0 {
				return nil
			}
			if depth == 1 && string(data[i+1:end]) == key {
				j := skipSpace(data, end+1)
				if j < len(data) && data[j] == ':' {
					j = skipSpace(data, j+1)
					if j < len(data) && data[j] == '"' {
						if e := stringEnd(data, j); e >= 0 {
							return data[j+1 : e]
						}
					}
					return nil
				}
			}
			i = end
		}
	}
	return nil
}

// stringEnd returns the index of the quote closing the string that starts
// at data[start] (a quote), or -1.
func stringEnd(data []byte, start int) int {
	for i := start + 1; i < len(data); i++ {
		switch data[i] {
		case '\\':
			i++
		case '"':
			return i
		}
	}
	return -1
}

func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

// suspensionChange reports how an event changes a run's suspension: +1 a
// tool call was suspended (tool_call_done with outcome "suspended"), -1 a
// suspended call resumed (tool_call_resumed), 0 otherwise.
func suspensionChange(typ string, data []byte) int {
	switch typ {
	case "tool_call_done":
		if bytes.Equal(topLevelString(data, "outcome"), []byte("suspended")) {
			return 1
		}
	case "tool_call_resumed":
		return -1
	}
	return 0
}
