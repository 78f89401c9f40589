package proxy_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/proxy"
)

// submitSeeds are real bodies, good and bad.
var submitSeeds = []string{
	`{"messages":[{"role":"user","content":"hello"}]}`,
	`{"thread_id":"t-1","agent_id":"a","messages":[{"id":"m1","role":"user","content":[{"type":"text","text":"hi"}]}],"origin":"a2a","run_mode":"scheduled","priority":3,"dedupe_key":"k","frontend_tools":[{"name":"x"}],"overrides":{"model":"m"}}`,
	`{"decisions":[{"call_id":"c1","resume":{"approved":true}}],"continue_run_id":"r1"}`,
	`{"messages":[],"decisions":[]}`,
	`{"messages":[{"role":"robot"}]}`,
	`{"messages":"hi"}`,
	`{"messages":[{"role":"user"}],"priority":300}`,
	`{"messages":[{"role":"user","id":"a\u0000"}]}`,
	`{"messages":[{"role":"user"}],"run_id":"a/b","expected_run_id":"x y"}`,
	`{"messages":[{"role":"user"}],"thread_id":"  "}`,
	`{"messages":[{"role":"user"}],"overrides":null,"frontend_tools":null}`,
	`{"messages":[{"role":"user"}]} trailing`,
	`{"messages":[{"role":"user","content":"\ud800"}]}`,
	`{"messages":[{"role":"user"}],"origin":"INTERNAL"}`,
	`[]`, `null`, ``, `{`, `{"a":1e999}`, `{"messages":[{"role":"user","metadata":{"deep":[[[[[[]]]]]]}}]}`,
	// Deeper than engine.MaxJSONDepth: refused by the decoder, as the
	// engine would.
	`{"messages":[{"role":"user","tool_calls":` + strings.Repeat("[", 101) + strings.Repeat("]", 101) + `}]}`,
	`{"messages":[{"role":"user","content":"\udc00 alone"}]}`,
}

// checkDecoded checks a decoder's contract: an error is a validation
// error; a decoded request passes the engine's and the store's rules.
func checkDecoded(t *testing.T, req engine.SubmitRequest, thread string, err error) {
	if err != nil {
		if !errors.Is(err, engine.ErrValidation) {
			t.Fatalf("non-validation error %v", err)
		}
		return
	}
	if thread != "" && req.ThreadID != thread {
		t.Fatalf("thread %q, want %q", req.ThreadID, thread)
	}
	if len(req.Messages) == 0 && len(req.Decisions) == 0 {
		t.Fatal("accepted a request with no messages and no decisions")
	}
	for _, id := range []string{req.ThreadID, req.RunIDHint, req.DispatchIDHint, req.ContinueRunID, req.ParentRunID, req.ParentThreadID} {
		if id != "" && !proxy.ValidPathID(id) {
			t.Fatalf("accepted id %q", id)
		}
	}
	seen := map[string]bool{}
	for _, m := range req.Messages {
		if m.ID == "" {
			m.ID = "generated"
		} else if seen[m.ID] {
			t.Fatalf("accepted duplicate id %q", m.ID)
		}
		seen[m.ID] = true
		if err := m.Validate(); err != nil {
			t.Fatalf("accepted message %+v: %v", m, err)
		}
	}
	for _, d := range req.Decisions {
		if engine.ValidateID("call_id", d.CallID) != nil {
			t.Fatalf("accepted decision %+v", d)
		}
	}
	switch req.Origin {
	case engine.OriginUser, engine.OriginA2A, engine.OriginInternal:
	default:
		t.Fatalf("origin %q", req.Origin)
	}
	for _, v := range []string{req.AgentID, req.DedupeKey, req.TransportRequestID} {
		if v != "" && engine.ValidateID("id", v) != nil {
			t.Fatalf("accepted %q", v)
		}
	}
}

func FuzzDecodeSubmit(f *testing.F) {
	for _, s := range submitSeeds {
		f.Add([]byte(s), "")
		f.Add([]byte(s), "thread-1")
	}
	f.Fuzz(func(t *testing.T, body []byte, thread string) {
		if thread != "" && !proxy.ValidPathID(thread) {
			return // the router never passes such a path id
		}
		req, err := proxy.DecodeSubmit(body, thread)
		checkDecoded(t, req, thread, err)
	})
}

func FuzzDecodeMessages(f *testing.F) {
	for _, s := range submitSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{"messages":[{"role":"user","content":"more"}],"expected_run_id":"run-1"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		req, expected, err := proxy.DecodeMessages(body, "thread-1")
		checkDecoded(t, req, "thread-1", err)
		if err == nil && expected != "" && !proxy.ValidPathID(expected) {
			t.Fatalf("accepted expected_run_id %q", expected)
		}
	})
}

func FuzzDecodeDecision(f *testing.F) {
	for _, s := range []string{
		`{"tool_call_id":"call-1","resume":{"approved":true}}`,
		`{"call_id":"c","resume":null}`,
		`{"tool_call_id":"","call_id":"c2","resume":[1,2]}`,
		`{"tool_call_id":5}`, `{"resume":true}`, `{}`, `[]`, ``, `{"tool_call_id":"a\u0007"}`,
		`{"tool_call_id":"` + strings.Repeat("x", 300) + `"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		d, err := proxy.DecodeDecision(body)
		if err != nil {
			if !errors.Is(err, engine.ErrValidation) {
				t.Fatalf("non-validation error %v", err)
			}
			return
		}
		if v := bytes.TrimSpace(d.Resume); engine.ValidateID("tool_call_id", d.CallID) != nil || len(v) == 0 || bytes.Equal(v, []byte("null")) {
			t.Fatalf("accepted %+v", d)
		}
	})
}
