package natsstore

import (
	"fmt"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

var _ engine.SubmitSizer = (*Store)(nil)

// serverBatchMessages is the server's default limit of messages in one
// atomic batch (JetStream's max atomic batch size).
const serverBatchMessages = 1000

// submitFixedMsgs bounds the messages one submit's batch writes besides
// two per thread message: the run, the thread's projection, the
// dispatch, its indexes and signal.
const submitFixedMsgs = 16

// CheckSubmitSize implements engine.SubmitSizer: a submit publishes two
// messages per thread message and a few more in one atomic batch, each
// within the server's max_payload, and the run record lists the
// messages' ids (twice) with the request's other fields.
func (s *Store) CheckSubmitSize(thread string, msgs []engine.Message, requestBytes int) error {
	if n := 2*len(msgs) + submitFixedMsgs; n > serverBatchMessages {
		return fmt.Errorf("%d messages need %d records in one atomic batch, more than the server takes (%d by default; about %d messages): send them in several requests: %w",
			len(msgs), n, serverBatchMessages, (serverBatchMessages-submitFixedMsgs)/2, engine.ErrTooLarge)
	}
	limit := s.nc.MaxPayload()
	if limit <= 0 {
		return nil
	}
	ids := int64(0)
	for i := range msgs {
		m := &msgs[i]
		id := int64(len(m.ID))
		if id == 0 {
			id = 40 // a minted id
		}
		ids += id + 4
		// The record and the message's headers. The record is JSON, whose
		// encoder escapes <, > and & (six bytes each) and U+2028/U+2029
		// in raw fields too (found by review: 20 KiB of "<" passed a
		// 64 KiB limit and was refused at 123 KB).
		raw := int64(0)
		for _, f := range [...][]byte{m.Content, m.ToolCalls, m.Metadata} {
			raw += escapedLen(f)
		}
		rec := id + int64(len(m.Role)+len(m.ToolCallID)+len(m.Visibility)) + raw + 104 + 512
		if rec > limit {
			return fmt.Errorf("message %d: about %d bytes with its headers, the server takes messages of at most %d (max_payload): %w", i, rec, limit, engine.ErrTooLarge)
		}
	}
	if run := 2*ids + int64(requestBytes) + 4096; run > limit {
		return fmt.Errorf("%d messages: the run record that lists them (about %d bytes) exceeds the server's max_payload (%d): send them in several requests: %w", len(msgs), run, limit, engine.ErrTooLarge)
	}
	return nil
}

// escapedLen bounds the length of raw JSON b as the record's encoder
// writes it: <, > and & become \u003c (6 bytes), U+2028 and U+2029 (3
// bytes each) \u2028.
func escapedLen(b []byte) int64 {
	n := int64(len(b))
	for i, c := range b {
		switch {
		case c == '<' || c == '>' || c == '&':
			n += 5
		case c == 0xE2 && i+2 < len(b) && b[i+1] == 0x80 && (b[i+2] == 0xA8 || b[i+2] == 0xA9):
			n += 3
		}
	}
	return n
}
