package badgerstore

import (
	"fmt"

	"github.com/dgraph-io/badger/v4/skl"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

var _ engine.SubmitSizer = (*Store)(nil)

// Bounds of what one submit's commit writes besides its messages: the
// run, its thread's projection, the message count, the dispatch, the
// thread's state and their index entries.
const (
	submitFixedEntries = 32
	submitFixedBytes   = 16 << 10
	mintedIDBytes      = 40     // a message id the engine mints (a UUID, 36)
	badgerEntryBytes   = 2 + 10 // Badger's estimate per entry: metas, and the version in the key
)

// CheckSubmitSize implements engine.SubmitSizer. It bounds from above
// what Badger counts against one transaction for a submit of msgs to
// thread (Txn.checkSize: entries, and key plus value — or value pointer,
// for a value at or above ValueThreshold — plus 12 bytes each): two
// entries per message (its record and its id's index), the run record and
// the thread's projection (each charged ValueThreshold, the most a value
// costs inline), and a fixed allowance for the rest. On the in-memory
// store, which refuses any value above the threshold, a run record that
// may exceed it refuses the submit; one that a continued run's state
// makes larger is not foreseen there.
func (s *Store) CheckSubmitSize(thread string, msgs []engine.Message, requestBytes int) error {
	threshold := s.opts.ValueThreshold
	maxBytes := s.opts.MemTableSize * 15 / 100
	maxCount := maxBytes / int64(skl.MaxNodeSize)
	count := int64(submitFixedEntries + 2*len(msgs))
	size := int64(submitFixedBytes)
	ids := int64(0)     // the ids as the run record lists them
	largest := int64(0) // the largest value's bound (InMemory refuses one above the threshold)
	for i := range msgs {
		m := &msgs[i]
		id := int64(len(m.ID))
		if id == 0 {
			id = mintedIDBytes
		}
		ids += id + 4
		// The record (appendMessage): every field's bytes, and for the
		// rest (version, flags, eight lengths, the producing run's id, the
		// step and the time, each at its largest) 104 bytes.
		rec := id + int64(len(m.Role)+len(m.Content)+len(m.ToolCalls)+len(m.ToolCallID)+len(m.Visibility)+len(m.Metadata)) + 104
		largest = max(largest, rec)
		if int64(len(m.Content)) >= threshold {
			rec = valuePointerBytes // at least the threshold: in the value log
		} else {
			rec = min(rec, threshold)
		}
		key := int64(len(messageKey(thread, 0)))
		idKey := int64(len(threadPrefix(pMessageID, thread))) + id
		size += key + rec + badgerEntryBytes + idKey + 8 + badgerEntryBytes
	}
	// The run record lists the ids twice (its input and its snapshot),
	// with the request's other fields; the projection holds the latest
	// run's request. A continued run's record holds its state too, and
	// the projection its metadata, neither known here: each is charged
	// the most a value costs inline, the threshold (found by review).
	run := 2*ids + int64(requestBytes) + 1024
	largest = max(largest, run)
	size += 2 * (threshold + 64)
	if s.opts.InMemory && largest > threshold {
		// No value log: Badger refuses a value above the threshold.
		return fmt.Errorf("%d messages: a record of this submit may exceed the in-memory store's largest value (%d bytes): %w", len(msgs), threshold, engine.ErrTooLarge)
	}
	if count >= maxCount || size >= maxBytes {
		return fmt.Errorf("%d messages (%d bytes of content) need more than one commit holds (%d entries, %d bytes; about %d messages of under %d bytes): send them in several requests: %w",
			len(msgs), contentBytes(msgs), maxCount, maxBytes, (maxCount-submitFixedEntries)/2, threshold, engine.ErrTooLarge)
	}
	return nil
}

// contentBytes is the total of msgs' contents.
func contentBytes(msgs []engine.Message) int {
	n := 0
	for i := range msgs {
		n += len(msgs[i].Content)
	}
	return n
}
