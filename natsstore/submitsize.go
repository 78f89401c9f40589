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
		rec := id + int64(len(m.Role)+len(m.Content)+len(m.ToolCalls)+len(m.ToolCallID)+len(m.Visibility)+len(m.Metadata)) + 104 + 512 // the record and the message's headers
		if rec > limit {
			return fmt.Errorf("message %d: about %d bytes with its headers, the server takes messages of at most %d (max_payload): %w", i, rec, limit, engine.ErrTooLarge)
		}
	}
	if run := 2*ids + int64(requestBytes) + 4096; run > limit {
		return fmt.Errorf("%d messages: the run record that lists them (about %d bytes) exceeds the server's max_payload (%d): send them in several requests: %w", len(msgs), run, limit, engine.ErrTooLarge)
	}
	return nil
}
