package badgerstore

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"unsafe"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Binary records. Dispatches, run records and thread projections, the
// records every run writes several times, are stored in a compact binary
// form: version byte binaryV1, then the fields in a fixed order — strings
// and raw JSON as a uvarint length and the bytes, integers as (zig-zag)
// varints, an optional struct as a presence byte and its fields, a list as
// a uvarint count and its items — and nothing after the last field. The id
// the key already holds (d<dispatch_id>, R<run_id>, H<thread_id>) is not
// repeated. Against the JSON of earlier versions this halves the bytes a
// run writes and the CPU spent coding them (docs/store.md, "Record
// encoding").
//
// Records written as JSON by earlier versions (first byte '{') still
// decode, and are rewritten in the binary form when next changed.
//
// Message records (binaryMessageV1, DataFormat 3) are binary too: a
// context window of a long thread reads hundreds of them for every RUN.
// Their thread and sequence number are the key's; their content and the
// other raw JSON fields are stored as received. Messages written as JSON
// by earlier versions are never rewritten (a message does not change) and
// decode as before.
//
// Run records are written as binaryRunV2: the fields of binaryV1, then
// StartCount. A binaryV1 run record (written before runs counted their
// started attempts) still decodes, with StartCount 0.

const (
	binaryV1        = 0x01
	binaryRunV2     = 0x02
	binaryMessageV1 = 0x01 // message records were JSON before: no earlier binary form
)

// encodeRecord returns the stored form of a dispatch, run record or thread
// projection.
func encodeRecord(v any) []byte {
	switch x := v.(type) {
	case *engine.Dispatch:
		return appendDispatch(make([]byte, 0, 96+len(x.ThreadID)+len(x.RunID)+len(x.ClaimToken)+len(x.ClaimedBy)+len(x.InstanceID)+len(x.LastError)), x)
	case *engine.RunRecord:
		return appendRun(make([]byte, 0, 160+len(x.ThreadID)+2*len(x.DispatchID)+len(x.Output)+len(x.State)+len(x.FinalOutput)), x)
	case *engine.Thread:
		return appendThread(make([]byte, 0, 48+len(x.ActiveRunID)+len(x.OpenRunID)+len(x.LatestRunID)+len(x.Metadata)), x)
	case *engine.MessageRecord:
		m := &x.Message
		n := 32 + len(x.MessageID) + len(m.Role) + len(m.Content) + len(m.ToolCalls) + len(m.ToolCallID) + len(m.Visibility) + len(m.Metadata) + len(x.ProducedByRunID)
		if m.ID != x.MessageID {
			n += len(m.ID)
		}
		if x.ToolCallID != m.ToolCallID {
			n += len(x.ToolCallID)
		}
		return appendMessage(make([]byte, 0, n), x)
	}
	return nil
}

type enc []byte

func (e enc) uvarint(v uint64) enc { return binary.AppendUvarint(e, v) }
func (e enc) varint(v int64) enc   { return binary.AppendVarint(e, v) }
func (e enc) str(s string) enc     { return append(e.uvarint(uint64(len(s))), s...) }
func (e enc) raw(b []byte) enc     { return append(e.uvarint(uint64(len(b))), b...) }
func (e enc) flag(ok bool) enc {
	if ok {
		return append(e, 1)
	}
	return append(e, 0)
}

func (e enc) strs(ss []string) enc {
	e = e.uvarint(uint64(len(ss)))
	for _, s := range ss {
		e = e.str(s)
	}
	return e
}

func (e enc) termination(t *engine.Termination) enc {
	e = e.flag(t != nil)
	if t != nil {
		e = e.str(t.Type).raw(t.Value)
	}
	return e
}

func appendDispatch(b []byte, d *engine.Dispatch) []byte {
	e := enc(append(b, binaryV1))
	e = e.str(d.ThreadID).str(d.RunID)
	e = append(e, d.Priority)
	e = e.str(d.DedupeKey).uvarint(d.Epoch)
	e = append(e, byte(d.Status))
	e = e.varint(d.AvailableAt).uvarint(uint64(d.AttemptCount)).uvarint(uint64(d.MaxAttempts))
	e = e.str(d.LastError).uvarint(uint64(len(d.Errors)))
	for _, ae := range d.Errors {
		e = e.uvarint(uint64(ae.Attempt)).str(ae.Error).varint(ae.At)
	}
	e = e.str(d.RequeuedAs).str(d.ClaimToken).str(d.ClaimedBy).varint(d.LeaseUntil)
	e = e.str(d.InstanceID).str(string(d.RunStatus)).termination(d.Termination)
	e = e.str(d.RunResponse).str(d.RunError)
	e = e.varint(d.CompletedAt).varint(d.CreatedAt).varint(d.UpdatedAt)
	return e
}

func appendRun(b []byte, r *engine.RunRecord) []byte {
	e := enc(append(b, binaryRunV2))
	e = e.str(r.ThreadID).str(r.AgentID).str(r.ParentRunID)
	e = e.flag(r.Request != nil)
	if q := r.Request; q != nil {
		e = e.str(q.Origin).str(q.SenderID).strs(q.InputMessageIDs).varint(int64(q.InputMessageCount))
		e = e.raw(q.RequestExtras).uvarint(uint64(len(q.Decisions)))
		for _, d := range q.Decisions {
			e = e.str(d.CallID).raw(d.Resume)
		}
		e = e.raw(q.FrontendTools).str(q.ParentThreadID).str(q.TransportRequestID)
	}
	e = e.flag(r.Input != nil)
	if in := r.Input; in != nil {
		e = e.str(in.ThreadID).flag(in.Range != nil)
		if in.Range != nil {
			e = e.uvarint(in.Range.From).uvarint(in.Range.To)
		}
		e = e.strs(in.TriggerMessageIDs).strs(in.SelectedMessageIDs).raw(in.ContextPolicy).str(in.CompactedSnapshotID)
	}
	e = e.raw(r.Output).str(string(r.Status)).termination(r.TerminationReason)
	e = e.raw(r.FinalOutput).raw(r.ErrorPayload).str(r.DispatchID).str(r.SessionID).str(r.TransportRequestID)
	e = e.flag(r.Waiting != nil)
	if w := r.Waiting; w != nil {
		e = e.str(w.Reason).strs(w.TicketIDs).raw(w.Tickets).str(w.SinceDispatchID).str(w.Message)
	}
	e = e.raw(r.Outcome)
	e = e.varint(r.CreatedAt).varint(r.StartedAt).varint(r.FinishedAt).varint(r.UpdatedAt)
	e = e.varint(r.Steps).varint(r.InputTokens).varint(r.OutputTokens).raw(r.State)
	return e.uvarint(uint64(r.StartCount))
}

func appendThread(b []byte, t *engine.Thread) []byte {
	e := enc(append(b, binaryV1))
	e = e.str(t.ResourceID).str(t.ParentThreadID).raw(t.Metadata)
	e = e.str(t.ActiveRunID).str(t.OpenRunID).str(string(t.OpenRunStatus)).str(t.LatestRunID)
	return e.uvarint(t.MessageCount)
}

// appendMessage writes a message record without its thread and sequence
// number (the key holds them). The message's own id and tool call id are
// written only where they differ from the record's (they are the same for
// every message a checkpoint appends).
func appendMessage(b []byte, r *engine.MessageRecord) []byte {
	m := &r.Message
	e := enc(append(b, binaryMessageV1))
	e = e.str(r.MessageID).flag(m.ID != r.MessageID)
	if m.ID != r.MessageID {
		e = e.str(m.ID)
	}
	e = e.str(m.Role).raw(m.Content).raw(m.ToolCalls).str(m.ToolCallID).str(m.Visibility).raw(m.Metadata)
	e = e.str(r.ProducedByRunID).flag(r.StepIndex != nil)
	if r.StepIndex != nil {
		e = e.varint(*r.StepIndex)
	}
	e = e.flag(r.ToolCallID != m.ToolCallID)
	if r.ToolCallID != m.ToolCallID {
		e = e.str(r.ToolCallID)
	}
	return e.varint(r.CreatedAt)
}

// dec reads a binary record. Strings are slices of one copy of the record
// (one allocation for all of them); raw JSON fields are copied, or, with
// owned set (message records, readMessage), slices of it too. The first
// malformed field sets bad and every later read returns zero values.
type dec struct {
	s     string
	i     int
	bad   string // what was wrong, "" while the record is well formed
	owned []byte // the record's bytes when the caller gives them up: raw fields then share them
}

func newDec(b []byte) *dec { return &dec{s: string(b), i: 1} }

func (d *dec) fail(what string) {
	if d.bad == "" {
		d.bad = fmt.Sprintf("%s at byte %d", what, d.i)
	}
	d.i = len(d.s)
}

func (d *dec) uvarint() uint64 {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		if d.i >= len(d.s) {
			d.fail("truncated number")
			return 0
		}
		c := d.s[d.i]
		d.i++
		if shift == 63 && c > 1 {
			break
		}
		v |= uint64(c&0x7f) << shift
		if c < 0x80 {
			return v
		}
	}
	d.fail("number overflows 64 bits")
	return 0
}

func (d *dec) varint() int64 {
	u := d.uvarint()
	v := int64(u >> 1)
	if u&1 != 0 {
		v = ^v
	}
	return v
}

func (d *dec) u32() uint32 {
	v := d.uvarint()
	if v > math.MaxUint32 {
		d.fail("number overflows 32 bits")
		return 0
	}
	return uint32(v)
}

func (d *dec) byte1() byte {
	if d.i >= len(d.s) {
		d.fail("truncated")
		return 0
	}
	c := d.s[d.i]
	d.i++
	return c
}

func (d *dec) flag() bool {
	switch d.byte1() {
	case 0:
		return false
	case 1:
		return true
	}
	d.fail("bad presence byte")
	return false
}

// n reads a length or count that must fit in the bytes left (every item
// takes at least one byte).
func (d *dec) n() int {
	v := d.uvarint()
	if v > uint64(len(d.s)-d.i) {
		d.fail("length beyond the record")
		return 0
	}
	return int(v)
}

func (d *dec) str() string {
	n := d.n()
	s := d.s[d.i : d.i+n]
	d.i += n
	return s
}

func (d *dec) raw() json.RawMessage {
	n := d.n()
	if n == 0 {
		return nil
	}
	var b []byte
	if d.owned != nil {
		b = d.owned[d.i : d.i+n : d.i+n] // capped: an append copies
	} else {
		b = []byte(d.s[d.i : d.i+n])
	}
	d.i += n
	return b
}

func (d *dec) strs() []string {
	n := d.n()
	if n == 0 {
		return nil
	}
	out := make([]string, n)
	for i := range out {
		out[i] = d.str()
	}
	return out
}

func (d *dec) termination() *engine.Termination {
	if !d.flag() {
		return nil
	}
	return &engine.Termination{Type: d.str(), Value: d.raw()}
}

// end reports the first problem, or trailing bytes.
func (d *dec) end() error {
	if d.bad == "" && d.i != len(d.s) {
		d.bad = fmt.Sprintf("%d bytes after the last field", len(d.s)-d.i)
	}
	if d.bad != "" {
		return fmt.Errorf("binary record: %s", d.bad)
	}
	return nil
}

func readDispatch(id string, b []byte) (*engine.Dispatch, error) {
	d := newDec(b)
	x := &engine.Dispatch{DispatchID: id}
	x.ThreadID, x.RunID = d.str(), d.str()
	x.Priority = d.byte1()
	x.DedupeKey, x.Epoch = d.str(), d.uvarint()
	x.Status = engine.DispatchStatus(d.byte1())
	x.AvailableAt, x.AttemptCount, x.MaxAttempts = d.varint(), d.u32(), d.u32()
	x.LastError = d.str()
	if n := d.n(); n > 0 {
		x.Errors = make([]engine.AttemptError, n)
		for i := range x.Errors {
			x.Errors[i] = engine.AttemptError{Attempt: d.u32(), Error: d.str(), At: d.varint()}
		}
	}
	x.RequeuedAs, x.ClaimToken, x.ClaimedBy, x.LeaseUntil = d.str(), d.str(), d.str(), d.varint()
	x.InstanceID, x.RunStatus, x.Termination = d.str(), engine.RunStatus(d.str()), d.termination()
	x.RunResponse, x.RunError = d.str(), d.str()
	x.CompletedAt, x.CreatedAt, x.UpdatedAt = d.varint(), d.varint(), d.varint()
	return x, d.end()
}

func readRun(id string, b []byte) (*engine.RunRecord, error) {
	d := newDec(b)
	r := &engine.RunRecord{RunID: id}
	r.ThreadID, r.AgentID, r.ParentRunID = d.str(), d.str(), d.str()
	if d.flag() {
		q := &engine.RunRequestSnapshot{}
		q.Origin, q.SenderID, q.InputMessageIDs, q.InputMessageCount = d.str(), d.str(), d.strs(), int(d.varint())
		q.RequestExtras = d.raw()
		if n := d.n(); n > 0 {
			q.Decisions = make([]engine.Decision, n)
			for i := range q.Decisions {
				q.Decisions[i] = engine.Decision{CallID: d.str(), Resume: d.raw()}
			}
		}
		q.FrontendTools, q.ParentThreadID, q.TransportRequestID = d.raw(), d.str(), d.str()
		r.Request = q
	}
	if d.flag() {
		in := &engine.RunMessageInput{ThreadID: d.str()}
		if d.flag() {
			in.Range = &engine.SeqRange{From: d.uvarint(), To: d.uvarint()}
		}
		in.TriggerMessageIDs, in.SelectedMessageIDs = d.strs(), d.strs()
		in.ContextPolicy, in.CompactedSnapshotID = d.raw(), d.str()
		r.Input = in
	}
	r.Output, r.Status, r.TerminationReason = d.raw(), engine.RunStatus(d.str()), d.termination()
	r.FinalOutput, r.ErrorPayload = d.raw(), d.raw()
	r.DispatchID, r.SessionID, r.TransportRequestID = d.str(), d.str(), d.str()
	if d.flag() {
		r.Waiting = &engine.RunWaitingState{Reason: d.str(), TicketIDs: d.strs(), Tickets: d.raw(), SinceDispatchID: d.str(), Message: d.str()}
	}
	r.Outcome = d.raw()
	r.CreatedAt, r.StartedAt, r.FinishedAt, r.UpdatedAt = d.varint(), d.varint(), d.varint(), d.varint()
	r.Steps, r.InputTokens, r.OutputTokens, r.State = d.varint(), d.varint(), d.varint(), d.raw()
	if b[0] == binaryRunV2 {
		r.StartCount = d.u32()
	}
	return r, d.end()
}

func readThread(id string, b []byte) (*engine.Thread, error) {
	d := newDec(b)
	t := &engine.Thread{ID: id}
	t.ResourceID, t.ParentThreadID, t.Metadata = d.str(), d.str(), d.raw()
	t.ActiveRunID, t.OpenRunID, t.OpenRunStatus, t.LatestRunID = d.str(), d.str(), engine.RunStatus(d.str()), d.str()
	t.MessageCount = d.uvarint()
	return t, d.end()
}

// readMessage decodes a binaryMessageV1 record of the given thread and
// sequence number. Its strings and raw JSON fields share one copy of b —
// b itself with owned set, which the caller must not use or change
// afterwards: a record read in a context window then costs no allocation
// beyond the value's copy the window's reads make anyway. Either way it
// holds its bytes once (a string copy of the record for its ids would
// have kept its content a second time).
func readMessage(thread string, seq uint64, b []byte, owned bool) (engine.MessageRecord, error) {
	if !owned {
		b = append([]byte(nil), b...)
	}
	// Strings and raw fields are disjoint slices of b, which nobody changes
	// afterwards: the record keeps b alone, its bytes once.
	d := &dec{s: unsafe.String(unsafe.SliceData(b), len(b)), i: 1, owned: b}
	r := engine.MessageRecord{ThreadID: thread, Seq: seq, MessageID: d.str()}
	m := &r.Message
	m.ID = r.MessageID
	if d.flag() {
		m.ID = d.str()
	}
	m.Role, m.Content, m.ToolCalls, m.ToolCallID, m.Visibility, m.Metadata = d.str(), d.raw(), d.raw(), d.str(), d.str(), d.raw()
	r.ProducedByRunID = d.str()
	if d.flag() {
		step := d.varint()
		r.StepIndex = &step
	}
	r.ToolCallID = m.ToolCallID
	if d.flag() {
		r.ToolCallID = d.str()
	}
	r.CreatedAt = d.varint()
	if err := d.end(); err != nil {
		return engine.MessageRecord{}, err
	}
	return r, nil
}
