package badgerstore

import (
	"errors"
	"reflect"
	"slices"
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
	for _, d := range []engine.Dispatch{
		{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Priority: 128, Status: engine.StatusQueued, AvailableAt: 1000, MaxAttempts: 5, CreatedAt: 1000, UpdatedAt: 1000},
		{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Status: engine.StatusDeadLetter, CompletedAt: 9, MaxAttempts: 1, AttemptCount: 1, Errors: []engine.AttemptError{{Attempt: 1, Error: "x", At: 9}}, Termination: &engine.Termination{Type: "error", Value: []byte(`"boom"`)}},
	} {
		b, _ := encode(&d)
		f.Add(b)
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
		// A binary record decodes to exactly what it held; JSON may spell
		// an empty list as [] where the binary form has none, so its
		// round trip is compared in the binary form.
		if enc2, _ := encode(d2); string(enc2) != string(enc) || (b[0] == binaryV1 && !reflect.DeepEqual(d, d2)) {
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
	for _, r := range []engine.RunRecord{
		{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1, Request: &engine.RunRequestSnapshot{InputMessageIDs: []string{"m1"}, Decisions: []engine.Decision{{CallID: "c", Resume: []byte(`{}`)}}}},
		{RunID: "r1", ThreadID: "t1", Status: engine.RunWaiting, Waiting: &engine.RunWaitingState{Reason: "user_input", TicketIDs: []string{"k"}}, Input: &engine.RunMessageInput{ThreadID: "t1", Range: &engine.SeqRange{From: 1, To: 3}}},
	} {
		b, _ := encode(&r)
		f.Add(b)
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
		enc, _ := encode(r)
		r2, err := decodeRun(key, enc)
		if err != nil {
			t.Fatalf("round trip decode: %v", err)
		}
		if enc2, _ := encode(r2); string(enc2) != string(enc) || ((b[0] == binaryV1 || b[0] == binaryRunV2) && !reflect.DeepEqual(r, r2)) {
			t.Fatalf("round trip changed the run:\n%+v\n%+v", r, r2)
		}
	})
}

// FuzzDecodeThread does the same for thread projections.
func FuzzDecodeThread(f *testing.F) {
	f.Add([]byte(`{"id":"t1","open_run_id":"r1","message_count":3}`))
	for _, th := range []engine.Thread{{ID: "t1"}, {ID: "t1", ActiveRunID: "r1", OpenRunID: "r1", OpenRunStatus: engine.RunRunning, LatestRunID: "r1", MessageCount: 9, Metadata: []byte(`{"a":1}`)}} {
		b, _ := encode(&th)
		f.Add(b)
	}
	key := threadKey("t1")
	f.Fuzz(func(t *testing.T, b []byte) {
		th, err := decodeThread(key, b)
		if err != nil {
			if !errors.Is(err, engine.ErrCorrupt) {
				t.Fatalf("decode error is not ErrCorrupt: %v", err)
			}
			return
		}
		enc, _ := encode(th)
		th2, err := decodeThread(key, enc)
		if err != nil {
			t.Fatalf("round trip decode: %v", err)
		}
		if enc2, _ := encode(th2); string(enc2) != string(enc) || (b[0] == binaryV1 && !reflect.DeepEqual(th, th2)) {
			t.Fatalf("round trip changed the thread:\n%+v\n%+v", th, th2)
		}
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

// FuzzDecodeMessage: a message record of any bytes decodes or is
// ErrCorrupt, never a panic; what decodes survives a round trip through
// the binary form (a JSON record's thread and seq become the key's).
func FuzzDecodeMessage(f *testing.F) {
	f.Add([]byte(`{"message_id":"m1","thread_id":"t1","seq":1,"message":{"id":"m1","role":"user","content":"hi"},"created_at":5}`))
	f.Add([]byte(`{"message_id":1}`))
	step := int64(2)
	for _, m := range []engine.MessageRecord{
		{MessageID: "m1", ThreadID: "t1", Seq: 1, Message: engine.Message{ID: "m1", Role: engine.RoleUser, Content: []byte(`"hi"`)}, CreatedAt: 5},
		{MessageID: "m1", ThreadID: "t1", Seq: 1, Message: engine.Message{ID: "x", Role: engine.RoleTool, ToolCallID: "c1", Metadata: []byte(`{}`)}, StepIndex: &step, ToolCallID: "c2", ProducedByRunID: "r1"},
	} {
		b, _ := encode(&m)
		f.Add(b)
	}
	key := messageKey("t1", 1)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMessage(key, b)
		// Decoded from bytes handed over (as a context window reads them),
		// the record is the same.
		owned, oerr := decodeMessageOf("t1", 1, key, slices.Clone(b), true)
		if len(b) > 0 && b[0] == binaryMessageV1 && ((err == nil) != (oerr == nil) || !reflect.DeepEqual(m, owned)) {
			t.Fatalf("decoded from handed-over bytes:\n%+v %v\nwant\n%+v %v", owned, oerr, m, err)
		}
		if err != nil {
			if !errors.Is(err, engine.ErrCorrupt) {
				t.Fatalf("decode error is not ErrCorrupt: %v", err)
			}
			return
		}
		enc, _ := encode(&m)
		m2, err := decodeMessage(key, enc)
		if err != nil {
			t.Fatalf("round trip decode: %v", err)
		}
		if enc2, _ := encode(&m2); string(enc2) != string(enc) || (b[0] == binaryMessageV1 && !reflect.DeepEqual(m, m2)) {
			t.Fatalf("round trip changed the message:\n%+v\n%+v", m, m2)
		}
	})
}
