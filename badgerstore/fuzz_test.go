package badgerstore

import (
	"errors"
	"reflect"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// FuzzDecodeDispatch feeds arbitrary bytes to the record decoder: it must
// never panic, every failure must be ErrCorrupt, and whatever it accepts
// must satisfy the invariants and survive an encode/decode round trip.
func FuzzDecodeDispatch(f *testing.F) {
	seeds := []string{
		`{"dispatch_id":"d1","thread_id":"t1","run_id":"r1","priority":128,"dispatch_epoch":0,"status":"queued","available_at":1000,"attempt_count":0,"max_attempts":5,"created_at":1000,"updated_at":1000}`,
		`{"dispatch_id":"d1","thread_id":"t1","run_id":"r1","status":"claimed","claim_token":"tok","claimed_by":"c","lease_until":5,"max_attempts":5}`,
		`{"dispatch_id":"d1","thread_id":"t1","run_id":"r1","status":"dead_letter","completed_at":9,"max_attempts":1,"attempt_count":1,"errors":[{"attempt":1,"error":"x","at":9}]}`,
		`{"dispatch_id":"d1","thread_id":"t1","run_id":"r1","status":"acked","completed_at":9,"max_attempts":5,"run_status":"done","termination":{"type":"error","value":"boom"}}`,
		`{"status":"flying"}`, `{`, `null`, `[]`, ``,
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	key := dispatchKey("d1")
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := decodeDispatch(key, b)
		if err != nil {
			if !errors.Is(err, engine.ErrCorrupt) {
				t.Fatalf("decode error is not ErrCorrupt: %v", err)
			}
			return
		}
		if err := d.Validate(); err != nil {
			t.Fatalf("decoder accepted an invalid record: %v", err)
		}
		enc, err := encode(d)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		d2, err := decodeDispatch(key, enc)
		if err != nil {
			t.Fatalf("round trip decode: %v", err)
		}
		if !reflect.DeepEqual(d, d2) {
			t.Fatalf("round trip changed the record:\n%+v\n%+v", d, d2)
		}
		_ = dispatchIndex(d) // must not panic on any accepted record
	})
}

// FuzzDecodeRun does the same for run records.
func FuzzDecodeRun(f *testing.F) {
	for _, s := range []string{
		`{"run_id":"r1","thread_id":"t1","agent_id":"a","status":"created","created_at":1,"updated_at":1,"steps":0,"input_tokens":0,"output_tokens":0}`,
		`{"run_id":"r1","thread_id":"t1","status":"waiting","waiting":{"reason":"user_input"},"input":{"thread_id":"t1","range":{"from_seq":1,"to_seq":3}}}`,
		`{"run_id":"r1","status":"bogus"}`, `{"run_id":1}`, `{`,
	} {
		f.Add([]byte(s))
	}
	key := runKey("r1")
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRun(key, b)
		if err != nil {
			if !errors.Is(err, engine.ErrCorrupt) {
				t.Fatalf("decode error is not ErrCorrupt: %v", err)
			}
			return
		}
		if err := r.Validate(); err != nil {
			t.Fatalf("decoder accepted an invalid run: %v", err)
		}
		_ = runIndex(r)
	})
}

// FuzzDecodeThreadState: a thread-state record of any bytes decodes or is
// ErrCorrupt, never a panic, and a decoded state re-encodes to its bytes.
func FuzzDecodeThreadState(f *testing.F) {
	f.Add(encodeThreadState(threadState{}))
	f.Add(encodeThreadState(threadState{epoch: 3, queued: 2, due: 1700, claimed: "d1", floor: []byte{128, 1, 2}, vfloor: []byte{9, 9}}))
	f.Add([]byte{1, 2, 3})
	key := stateKey("t1")
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := decodeThreadState(key, b)
		if err != nil {
			if !errors.Is(err, engine.ErrCorrupt) {
				t.Fatalf("decode error is not ErrCorrupt: %v", err)
			}
			return
		}
		if got := encodeThreadState(st); string(got) != string(b) {
			t.Fatalf("round trip changed the record:\n%x\n%x", b, got)
		}
	})
}
