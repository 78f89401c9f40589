package hub

import (
	"bytes"
	"slices"
	"strings"
	"sync"
	"unicode/utf8"

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

// appendMessages appends msgs as a JSON array to dst (appendMessageJSON).
// An earlier version kept the JSON of messages encoded for earlier RUNs
// in a cache; with the direct encoding a cold 500-message context costs
// about 1.5 × a cached one, a run costs hundreds of times that, and a
// backlog that visits more threads than a cache holds paid for every
// insert (bench/README.md, "The nineteenth session").
func appendMessages(dst []byte, msgs []engine.MessageRecord) []byte {
	dst = append(dst, '[')
	for i := range msgs {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendMessageJSON(dst, &msgs[i])
	}
	return append(dst, ']')
}

// runPayload is the RUN payload of req as it is sent: encodeRun's, with
// any bytes that are not UTF-8 replaced by U+FFFD (repaired then
// reports it). The agent refuses a frame that is not UTF-8
// (ipc.CheckPayload), and with it its connection and every run on it.
// Raw fields are checked when they come in (engine.ValidateRawJSON, the
// API's body check), but earlier versions let such bytes through inside
// JSON strings, and a stored message keeps them: in a thread's context
// they would break every run of the thread for as long as the message
// stays in its window. JSON's own syntax is ASCII, so such bytes can
// only sit inside strings, and the repaired payload is still JSON.
func runPayload(dst []byte, req *engine.RunRequest) (payload []byte, repaired bool, err error) {
	p, err := encodeRun(dst, req)
	if err != nil || utf8.Valid(p) {
		return p, false, err
	}
	fixed := bytes.ToValidUTF8(p, []byte("\uFFFD"))
	putRunBuf(p)
	return fixed, true, nil
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
// in lower case (user, a2a, internal), as the protocol spells them.
func encodeRun(dst []byte, req *engine.RunRequest) ([]byte, error) {
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
	out = appendMessages(out, req.Context.Messages)
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
