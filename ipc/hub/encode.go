package hub

import (
	"bytes"
	"slices"
	"strings"
	"sync"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// runHead is a RUN payload without its context (see encodeRun).
type runHead struct {
	DispatchID string   `json:"dispatch_id"`
	RunID      string   `json:"run_id"`
	ThreadID   string   `json:"thread_id"`
	AgentID    string   `json:"agent_id"`
	SessionID  string   `json:"session_id"`
	Attempt    uint32   `json:"attempt"`
	Request    runInput `json:"request"`
}

// contextTail is engine.ThreadContext without its messages.
type contextTail struct {
	FirstSeq      uint64            `json:"first_seq"`
	TotalMessages uint64            `json:"total_messages"`
	LatestRun     *engine.RunRecord `json:"latest_run,omitempty"`
}

// msgCache keeps the JSON of context messages encoded for earlier RUNs.
// Every RUN of a thread carries its recent history, so without it the
// same messages are encoded again for each run (162 µs for a 500-message
// window of 230 KB; BenchmarkEncodeRun). An entry is used only for a
// record equal to the one it was encoded from (sameRecord), so a
// thread's log rewritten under the same sequence numbers cannot be
// served stale. Two generations bound it: once the current one holds
// half the budget, the previous one is dropped; a hit in the previous one
// moves the entry back.
type msgCache struct {
	budget int64

	mu       sync.Mutex
	cur      map[msgKey]*cachedMsg
	prev     map[msgKey]*cachedMsg
	curBytes int64
}

type msgKey struct {
	thread string
	seq    uint64
}

type cachedMsg struct {
	rec  engine.MessageRecord
	json []byte
}

func newMsgCache(budget int64) *msgCache {
	if budget <= 0 {
		return nil
	}
	return &msgCache{budget: budget, cur: make(map[msgKey]*cachedMsg)}
}

// appendMessages appends msgs as a JSON array to dst.
func (c *msgCache) appendMessages(dst []byte, msgs []engine.MessageRecord) ([]byte, error) {
	dst = append(dst, '[')
	if c != nil {
		c.mu.Lock()
		defer c.mu.Unlock()
	}
	for i := range msgs {
		if i > 0 {
			dst = append(dst, ',')
		}
		m := &msgs[i]
		if e := c.lookup(m); e != nil {
			dst = append(dst, e...)
			continue
		}
		b, err := json.Marshal(m)
		if err != nil {
			return nil, err
		}
		dst = append(dst, b...)
		c.insert(m, b)
	}
	return append(dst, ']'), nil
}

// lookup returns m's cached JSON, or nil. Called with c.mu held.
func (c *msgCache) lookup(m *engine.MessageRecord) []byte {
	if c == nil {
		return nil
	}
	k := msgKey{m.ThreadID, m.Seq}
	e, ok := c.cur[k]
	if !ok {
		if e, ok = c.prev[k]; !ok {
			return nil
		}
		delete(c.prev, k)
		c.add(k, e)
	}
	if !sameRecord(&e.rec, m) {
		return nil
	}
	return e.json
}

// insert caches b as m's JSON. Called with c.mu held.
func (c *msgCache) insert(m *engine.MessageRecord, b []byte) {
	if c == nil || int64(len(b)) > c.budget/4 {
		return
	}
	c.add(msgKey{m.ThreadID, m.Seq}, &cachedMsg{rec: *m, json: b})
}

func (c *msgCache) add(k msgKey, e *cachedMsg) {
	if old, ok := c.cur[k]; ok {
		c.curBytes -= entryBytes(old)
	}
	c.cur[k] = e
	c.curBytes += entryBytes(e)
	if c.curBytes > c.budget/2 {
		c.prev, c.cur, c.curBytes = c.cur, make(map[msgKey]*cachedMsg), 0
	}
}

// entryBytes estimates what an entry holds: its JSON, the record it
// keeps for comparison (whose content it may be the last to reference)
// and the maps' overhead.
func entryBytes(e *cachedMsg) int64 {
	m := &e.rec.Message
	return int64(len(e.json)+len(m.Content)+len(m.ToolCalls)+len(m.Metadata)) + 256
}

// sameRecord reports whether a and b are equal in every field (the
// JSON of one is then the JSON of the other).
func sameRecord(a, b *engine.MessageRecord) bool {
	am, bm := &a.Message, &b.Message
	return a.MessageID == b.MessageID && a.ThreadID == b.ThreadID && a.Seq == b.Seq &&
		a.ProducedByRunID == b.ProducedByRunID && a.ToolCallID == b.ToolCallID && a.CreatedAt == b.CreatedAt &&
		(a.StepIndex == nil) == (b.StepIndex == nil) && (a.StepIndex == nil || *a.StepIndex == *b.StepIndex) &&
		am.ID == bm.ID && am.Role == bm.Role && am.ToolCallID == bm.ToolCallID && am.Visibility == bm.Visibility &&
		bytes.Equal(am.Content, bm.Content) && bytes.Equal(am.ToolCalls, bm.ToolCalls) && bytes.Equal(am.Metadata, bm.Metadata) &&
		(am.Content == nil) == (bm.Content == nil) && (am.ToolCalls == nil) == (bm.ToolCalls == nil) && (am.Metadata == nil) == (bm.Metadata == nil)
}

// runBufs holds RUN payload buffers between runs: a payload is not
// needed once its frame is written (putRunBuf).
var runBufs sync.Pool

// getRunBuf returns an empty buffer for a RUN payload.
func getRunBuf() []byte {
	if p, ok := runBufs.Get().(*[]byte); ok {
		return (*p)[:0]
	}
	return nil
}

// maxPooledRunBuf bounds the payload buffers kept for reuse: a thread
// with a very long context does not pin its buffer.
const maxPooledRunBuf = 1 << 20

// putRunBuf gives a payload buffer back once its frame is written.
func putRunBuf(b []byte) {
	if cap(b) == 0 || cap(b) > maxPooledRunBuf {
		return
	}
	runBufs.Put(&b)
}

// encodeRun appends the RUN payload of req to dst. Origins go on the wire
// in lower case (user, a2a, internal), as the protocol spells them. The
// context's messages come from cache when it has them (nil: none).
func encodeRun(dst []byte, req *engine.RunRequest, cache *msgCache) ([]byte, error) {
	head, err := json.Marshal(headOf(req))
	if err != nil {
		return nil, err
	}
	tail, err := json.Marshal(contextTail{FirstSeq: req.Context.FirstSeq, TotalMessages: req.Context.TotalMessages, LatestRun: req.Context.LatestRun})
	if err != nil {
		return nil, err
	}
	// {head…,"context":{"messages":[…],tail…}}
	out := slices.Grow(dst, len(head)+len(tail)+64+contextSizeHint(req.Context.Messages))
	out = append(out, head[:len(head)-1]...)
	out = append(out, `,"context":{"messages":`...)
	if out, err = cache.appendMessages(out, req.Context.Messages); err != nil {
		return nil, err
	}
	out = append(out, ',')
	out = append(out, tail[1:]...)
	return append(out, '}'), nil
}

// headOf is the RUN payload of req without its context.
func headOf(req *engine.RunRequest) runHead {
	msgs := req.Messages
	if msgs == nil {
		msgs = []engine.Message{}
	}
	return runHead{
		DispatchID: req.DispatchID, RunID: req.RunID, ThreadID: req.ThreadID, AgentID: req.AgentID,
		SessionID: req.SessionID, Attempt: req.Attempt,
		Request: runInput{
			Messages: msgs, RunMode: req.RunMode, Origin: strings.ToLower(req.Origin),
			ContinueRunID: req.ContinueRunID, ParentRunID: req.ParentRunID, ParentThreadID: req.ParentThreadID,
			TransportRequestID: req.TransportRequestID, Decisions: req.Decisions,
			FrontendTools: req.FrontendTools, Overrides: req.Overrides, Traceparent: req.Traceparent,
		},
	}
}

// contextSizeHint estimates the JSON of msgs (to size the payload once).
func contextSizeHint(msgs []engine.MessageRecord) int {
	n := 0
	for i := range msgs {
		m := &msgs[i].Message
		n += 200 + len(m.Content) + len(m.ToolCalls) + len(m.Metadata)
	}
	return n
}
