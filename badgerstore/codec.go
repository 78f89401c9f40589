package badgerstore

import (
	"fmt"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Dispatches, run records, thread projections and messages are stored in
// the binary form of binary.go; records written by earlier versions as
// JSON (snake_case, the same shape as on the API). A record that does not
// decode, or that breaks its invariants, is reported as engine.ErrCorrupt
// naming its key; it never panics.

// unmarshal decodes JSON, turning a decoder panic on hostile input into an
// error (go-json v0.10.5 panicked on some truncated documents; the fuzz
// corpus in testdata keeps one).
func unmarshal(b []byte, v any) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("json decoder panic: %v", r)
		}
	}()
	return json.Unmarshal(b, v)
}

func encode(v any) ([]byte, error) {
	if b := encodeRecord(v); b != nil {
		return b, nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode: %w: %w", engine.ErrCorrupt, err)
	}
	return b, nil
}

func decodeDispatch(key, b []byte) (*engine.Dispatch, error) {
	d, err := readDispatchAny(key, b)
	if err != nil {
		return nil, fmt.Errorf("decode dispatch %q: %w: %w", key, engine.ErrCorrupt, err)
	}
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("decode dispatch %q: %w: %w", key, engine.ErrCorrupt, err)
	}
	if string(key[1:]) != d.DispatchID {
		return nil, fmt.Errorf("decode dispatch %q: %w: record names dispatch %q", key, engine.ErrCorrupt, d.DispatchID)
	}
	return d, nil
}

func decodeRun(key, b []byte) (*engine.RunRecord, error) {
	var r *engine.RunRecord
	var err error
	if len(b) > 0 && (b[0] == binaryV1 || b[0] == binaryRunV2) {
		r, err = readRun(string(key[1:]), b)
	} else {
		r = new(engine.RunRecord)
		err = unmarshal(b, r)
	}
	if err != nil {
		return nil, fmt.Errorf("decode run %q: %w: %w", key, engine.ErrCorrupt, err)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("decode run %q: %w: %w", key, engine.ErrCorrupt, err)
	}
	if string(key[1:]) != r.RunID {
		return nil, fmt.Errorf("decode run %q: %w: record names run %q", key, engine.ErrCorrupt, r.RunID)
	}
	return r, nil
}

func decodeThread(key, b []byte) (*engine.Thread, error) {
	if len(b) > 0 && b[0] == binaryV1 {
		t, err := readThread(string(key[1:]), b)
		if err != nil {
			return nil, fmt.Errorf("decode thread %q: %w: %w", key, engine.ErrCorrupt, err)
		}
		return t, nil
	}
	t := new(engine.Thread)
	if err := unmarshal(b, t); err != nil {
		return nil, fmt.Errorf("decode thread %q: %w: %w", key, engine.ErrCorrupt, err)
	}
	return t, nil
}

// decodeMessage decodes the message record stored under key.
func decodeMessage(key, b []byte) (engine.MessageRecord, error) {
	if len(b) > 0 && b[0] == binaryMessageV1 {
		thread, seq, ok := splitMessageKey(key)
		if !ok {
			return engine.MessageRecord{}, fmt.Errorf("decode message %q: %w: malformed key", key, engine.ErrCorrupt)
		}
		return decodeMessageOf(thread, seq, key, b, false)
	}
	return decodeMessageOf("", 0, key, b, false)
}

// decodeMessageOf decodes the message record stored under key, whose
// thread and sequence number the caller has read from it already; owned
// as for readMessage.
func decodeMessageOf(thread string, seq uint64, key, b []byte, owned bool) (engine.MessageRecord, error) {
	if len(b) > 0 && b[0] == binaryMessageV1 {
		m, err := readMessage(thread, seq, b, owned)
		if err != nil {
			return engine.MessageRecord{}, fmt.Errorf("decode message %q: %w: %w", key, engine.ErrCorrupt, err)
		}
		return m, nil
	}
	m := new(engine.MessageRecord) // a separate variable: the binary path's record stays off the heap
	if err := unmarshal(b, m); err != nil {
		return engine.MessageRecord{}, fmt.Errorf("decode message %q: %w: %w", key, engine.ErrCorrupt, err)
	}
	return *m, nil
}

func readDispatchAny(key, b []byte) (*engine.Dispatch, error) {
	if len(b) > 0 && b[0] == binaryV1 {
		return readDispatch(string(key[1:]), b)
	}
	d := new(engine.Dispatch)
	return d, unmarshal(b, d)
}
