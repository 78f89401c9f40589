package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A raw JSON field that is not UTF-8 JSON is refused before anything is
// written: the RUN frame carries such fields as given, and the agent
// refuses a frame that is not UTF-8 JSON (its connection, with every run
// on it, would go at every run of the thread). Found by a review: the
// binary message records of format 3 no longer re-encoded content through
// json.Marshal, which had refused invalid JSON; invalid UTF-8 inside a
// JSON string had passed both.
func TestRawJSONFieldsMustBeUTF8JSON(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, newFake(1, complete), engine.Config{})
	bad := []struct {
		name string
		req  engine.SubmitRequest
	}{
		{"content not JSON", engine.SubmitRequest{Messages: []engine.Message{{Role: engine.RoleUser, Content: json.RawMessage(`not json`)}}}},
		{"content not UTF-8", engine.SubmitRequest{Messages: []engine.Message{{Role: engine.RoleUser, Content: json.RawMessage("\"a\xffb\"")}}}},
		{"tool_calls not JSON", engine.SubmitRequest{Messages: []engine.Message{{Role: engine.RoleAssistant, ToolCalls: json.RawMessage(`[1,`)}}}},
		{"metadata not UTF-8", engine.SubmitRequest{Messages: []engine.Message{{Role: engine.RoleUser, Metadata: json.RawMessage("{\"k\":\"\xc3\"}")}}}},
		{"overrides not JSON", engine.SubmitRequest{Messages: []engine.Message{userMsg("x")}, Overrides: json.RawMessage(`{`)}},
		{"frontend_tools not UTF-8", engine.SubmitRequest{Messages: []engine.Message{userMsg("x")}, FrontendTools: json.RawMessage("[\"\xff\"]")}},
		{"decision resume not JSON", engine.SubmitRequest{Decisions: []engine.Decision{{CallID: "c", Resume: json.RawMessage(`yes`)}}}},
		// A decision carries its resume (an agent's SUBMIT comes here
		// without the HTTP API's check; found by review).
		{"decision without resume", engine.SubmitRequest{Decisions: []engine.Decision{{CallID: "c"}}}},
		{"decision resume null", engine.SubmitRequest{Decisions: []engine.Decision{{CallID: "c", Resume: json.RawMessage(` null`)}}}},
		// An escape of half a surrogate pair is no character: the Python
		// example agent failed every attempt of such a run (found by
		// review).
		{"content with a lone high surrogate", engine.SubmitRequest{Messages: []engine.Message{{Role: engine.RoleUser, Content: json.RawMessage(`"a\ud800b"`)}}}},
		{"metadata with a lone low surrogate", engine.SubmitRequest{Messages: []engine.Message{{Role: engine.RoleUser, Metadata: json.RawMessage(`{"k":"\uDC00"}`)}}}},
		// Nesting deeper than agents decode (found by review: 2 000
		// levels took the Python example agent down at every run).
		{"content nested too deep", engine.SubmitRequest{Messages: []engine.Message{{Role: engine.RoleUser, Content: json.RawMessage(strings.Repeat("[", engine.MaxJSONDepth+1) + strings.Repeat("]", engine.MaxJSONDepth+1))}}}},
	}
	for _, c := range bad {
		c.req.ThreadID = "t1"
		if _, err := r.mb.SubmitBackground(ctx, c.req); !errors.Is(err, engine.ErrValidation) {
			t.Errorf("%s: submit = %v; want ErrValidation", c.name, err)
		}
	}
	if n, err := r.store.MessageCount(ctx, "t1"); err != nil || n != 0 {
		t.Fatalf("the refused submits left %d messages (%v)", n, err)
	}
	// A checkpoint (as an agent's, or an embedding caller's) is checked
	// by the store the same way.
	_, err := r.store.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t2", Messages: []engine.Message{{ID: "m1", Role: engine.RoleAssistant, Content: json.RawMessage("\"\xff\"")}}})
	if !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("checkpoint of content not UTF-8 = %v; want ErrValidation", err)
	}
	// A live decision from an embedding caller is checked as well.
	if _, err := r.mb.SendDecision(ctx, "r1", engine.Decision{CallID: "c", Resume: json.RawMessage(`nope`)}); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("live decision with a resume that is not JSON = %v; want ErrValidation", err)
	}
	// Valid raw fields pass, whitespace and all.
	if _, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t3", Messages: []engine.Message{{Role: engine.RoleUser, Content: json.RawMessage(` { "text" : "é <b>" } `)}}}); err != nil {
		t.Fatalf("valid content refused: %v", err)
	}
}

// HasLoneSurrogate tells escapes of half a surrogate pair from pairs,
// other escapes and escaped backslashes.
func TestHasLoneSurrogate(t *testing.T) {
	for _, c := range []struct {
		json string
		want bool
	}{
		{`"plain"`, false},
		{`"\u00e9 \n \" \\ \/"`, false},
		{`"\ud83d\ude00"`, false}, // a pair: U+1F600
		{`"\uD83D\uDE00 and \uD83D\uDE01"`, false},
		{`"\\ud800"`, false}, // an escaped backslash, then text
		{`"\ud800"`, true},
		{`"\ud800x"`, true},
		{`"\ud800\u0041"`, true}, // high, then no low
		{`"\ud800\ud800"`, true},
		{`"\udc00"`, true},
		{`["ok", {"k": "\uDFFF"}]`, true},
		{`"\\\ud800"`, true}, // an escaped backslash, then the escape
	} {
		if got := engine.HasLoneSurrogate([]byte(c.json)); got != c.want {
			t.Errorf("HasLoneSurrogate(%s) = %v, want %v", c.json, got, c.want)
		}
	}
}

// JSONDepth counts nesting outside strings only.
func TestJSONDepth(t *testing.T) {
	for _, c := range []struct {
		json string
		want int
	}{
		{`1`, 0}, {`"[[["`, 0}, {`[]`, 1}, {`{"a":[1,{"b":[]}]}`, 4},
		{`["\\", "]]]", [[ ]]]`, 3}, {`["\"[[", {}]`, 2},
	} {
		if got := engine.JSONDepth([]byte(c.json)); got != c.want {
			t.Errorf("JSONDepth(%s) = %d, want %d", c.json, got, c.want)
		}
	}
	ok := json.RawMessage(strings.Repeat("[", engine.MaxJSONDepth) + strings.Repeat("]", engine.MaxJSONDepth))
	if err := engine.ValidateRawJSON(ok); err != nil {
		t.Fatalf("%d levels: %v", engine.MaxJSONDepth, err)
	}
}
