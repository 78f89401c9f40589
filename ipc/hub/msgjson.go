package hub

import (
	"strconv"
	"unicode/utf8"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// appendMessageJSON appends the JSON of a context message record: the
// fields and spelling of json.Marshal(m), written directly. Strings are
// escaped as encoding/json escapes them (HTML-safe); the raw JSON fields
// (content, tool calls, metadata) are copied as stored. Every path that
// stores them checked them to be JSON (the API's decoder, the agent
// protocol's frame check, the store's decoder), so this does not parse
// them again; the result is the same JSON value as json.Marshal's, whose
// only difference is that it re-compacts raw fields (BenchmarkEncodeRun:
// a cold 500-message context in a fraction of the time).
func appendMessageJSON(b []byte, m *engine.MessageRecord) []byte {
	b = append(b, `{"message_id":`...)
	b = appendJSONString(b, m.MessageID)
	b = append(b, `,"thread_id":`...)
	b = appendJSONString(b, m.ThreadID)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, m.Seq, 10)
	b = append(b, `,"message":{`...)
	msg := &m.Message
	if msg.ID != "" {
		b = append(b, `"id":`...)
		b = appendJSONString(b, msg.ID)
		b = append(b, ',')
	}
	b = append(b, `"role":`...)
	b = appendJSONString(b, msg.Role)
	if len(msg.Content) > 0 {
		b = append(append(b, `,"content":`...), msg.Content...)
	}
	if len(msg.ToolCalls) > 0 {
		b = append(append(b, `,"tool_calls":`...), msg.ToolCalls...)
	}
	if msg.ToolCallID != "" {
		b = appendJSONString(append(b, `,"tool_call_id":`...), msg.ToolCallID)
	}
	if msg.Visibility != "" {
		b = appendJSONString(append(b, `,"visibility":`...), msg.Visibility)
	}
	if len(msg.Metadata) > 0 {
		b = append(append(b, `,"metadata":`...), msg.Metadata...)
	}
	b = append(b, '}')
	if m.ProducedByRunID != "" {
		b = appendJSONString(append(b, `,"produced_by_run_id":`...), m.ProducedByRunID)
	}
	if m.StepIndex != nil {
		b = strconv.AppendInt(append(b, `,"step_index":`...), *m.StepIndex, 10)
	}
	if m.ToolCallID != "" {
		b = appendJSONString(append(b, `,"tool_call_id":`...), m.ToolCallID)
	}
	if m.CreatedAt != 0 {
		b = strconv.AppendInt(append(b, `,"created_at":`...), m.CreatedAt, 10)
	}
	return append(b, '}')
}

// jsonSafe marks the ASCII bytes a JSON string holds as they are, HTML
// safe: not a control character, '"', '\\', '<', '>' or '&'.
var jsonSafe = func() (t [utf8.RuneSelf]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
	}
	return t
}()

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string, escaped as encoding/json
// escapes it: HTML-safe, invalid UTF-8 as U+FFFD, U+2028 and U+2029
// escaped.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if jsonSafe[c] {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default: // other control characters, '<', '>', '&'
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(append(b, s[start:i]...), `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(append(b, s[start:i]...), '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	return append(append(b, s[start:]...), '"')
}
