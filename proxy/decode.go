package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"unicode/utf8"

	gojson "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// submitBody is the JSON body of the submit endpoints (spec/http.md), and
// of POST …/messages with expected_run_id. Unknown fields are ignored.
type submitBody struct {
	ThreadID           string            `json:"thread_id"`
	AgentID            string            `json:"agent_id"`
	Messages           []engine.Message  `json:"messages"`
	Decisions          []engine.Decision `json:"decisions"`
	FrontendTools      json.RawMessage   `json:"frontend_tools"`
	Overrides          json.RawMessage   `json:"overrides"`
	ContinueRunID      string            `json:"continue_run_id"`
	RunID              string            `json:"run_id"`
	DispatchID         string            `json:"dispatch_id"`
	ParentRunID        string            `json:"parent_run_id"`
	ParentThreadID     string            `json:"parent_thread_id"`
	TransportRequestID string            `json:"transport_request_id"`
	Origin             string            `json:"origin"`
	RunMode            string            `json:"run_mode"`
	Priority           *uint8            `json:"priority"`
	DedupeKey          string            `json:"dedupe_key"`
	ExpectedRunID      string            `json:"expected_run_id"`
}

// decisionBody is the body of POST /v1/runs/{id}/decisions. call_id is
// accepted as an alias of tool_call_id (the submit body's decisions use it).
type decisionBody struct {
	ToolCallID string          `json:"tool_call_id"`
	CallID     string          `json:"call_id"`
	Resume     json.RawMessage `json:"resume"`
}

// decodeSubmit decodes and validates a submit body. pathThread is the
// thread id of the path ("" for POST /v1/runs). Every error is an
// engine.ErrValidation.
func decodeSubmit(body []byte, pathThread string) (engine.SubmitRequest, error) {
	req, _, err := decodeRun(body, pathThread, false)
	return req, err
}

// decodeMessages decodes and validates the body of POST
// /v1/threads/{thread_id}/messages: a submit body with expected_run_id.
func decodeMessages(body []byte, thread string) (engine.SubmitRequest, string, error) {
	return decodeRun(body, thread, true)
}

func decodeRun(body []byte, pathThread string, live bool) (engine.SubmitRequest, string, error) {
	var b submitBody
	if err := decodeObject(body, &b); err != nil {
		return engine.SubmitRequest{}, "", err
	}
	req := engine.SubmitRequest{
		AgentID: b.AgentID, Messages: b.Messages, Decisions: b.Decisions,
		FrontendTools: nullToNil(b.FrontendTools), Overrides: nullToNil(b.Overrides),
		ContinueRunID: b.ContinueRunID, RunIDHint: b.RunID, DispatchIDHint: b.DispatchID,
		ParentRunID: b.ParentRunID, ParentThreadID: b.ParentThreadID,
		TransportRequestID: b.TransportRequestID, RunMode: b.RunMode, Priority: b.Priority,
		DedupeKey: b.DedupeKey,
	}
	thread := strings.TrimSpace(b.ThreadID)
	switch {
	case pathThread != "" && thread != "" && thread != pathThread:
		return req, "", engine.Validationf("thread_id %q in the body differs from %q in the path", thread, pathThread)
	case pathThread != "":
		thread = pathThread
	}
	req.ThreadID = thread
	if err := req.CheckPathIDs(); err != nil {
		return req, "", err
	}
	expected := ""
	if live {
		expected = b.ExpectedRunID
		if expected != "" && !validPathID(expected) {
			return req, "", badID("expected_run_id", expected)
		}
	}
	for _, f := range []struct{ name, v string }{
		{"agent_id", b.AgentID}, {"dedupe_key", b.DedupeKey}, {"transport_request_id", b.TransportRequestID},
	} {
		if f.v != "" {
			if err := engine.ValidateID(f.name, f.v); err != nil {
				return req, "", err
			}
		}
	}
	origin, err := canonicalOrigin(b.Origin)
	if err != nil {
		return req, "", err
	}
	req.Origin = origin
	switch b.RunMode {
	case "", engine.ModeForeground, engine.ModeScheduled, engine.ModeResume, engine.ModeInternalWake:
	default:
		return req, "", engine.Validationf("unknown run_mode %q (foreground, scheduled, resume or internal_wake)", b.RunMode)
	}
	if err := checkJSONKind("frontend_tools", req.FrontendTools, '['); err != nil {
		return req, "", err
	}
	if err := checkJSONKind("overrides", req.Overrides, '{'); err != nil {
		return req, "", err
	}
	if len(req.Messages) == 0 && len(req.Decisions) == 0 {
		return req, "", engine.Validationf("messages is required: at least one message (or a decision)")
	}
	if err := checkMessages(req.Messages); err != nil {
		return req, "", err
	}
	for i := range req.Decisions {
		if err := engine.ValidateID("decisions[].call_id", req.Decisions[i].CallID); err != nil {
			return req, "", err
		}
		if !hasValue(req.Decisions[i].Resume) {
			return req, "", engine.Validationf("decisions[%d].resume is required", i)
		}
	}
	return req, expected, nil
}

// hasValue reports whether a decision's resume holds a value: present
// and not null. One without reached the agent as null, which no agent can
// act on (found by review). Its JSON is checked with the rest of the
// request (engine.ValidateRawJSON).
func hasValue(raw json.RawMessage) bool {
	v := bytes.TrimSpace(raw)
	return len(v) > 0 && !bytes.Equal(v, []byte("null"))
}

// decodeDecision decodes and validates the body of POST
// /v1/runs/{id}/decisions.
func decodeDecision(body []byte) (engine.Decision, error) {
	var b decisionBody
	if err := decodeObject(body, &b); err != nil {
		return engine.Decision{}, err
	}
	id := b.ToolCallID
	if id == "" {
		id = b.CallID
	}
	if id == "" {
		return engine.Decision{}, engine.Validationf("tool_call_id is required")
	}
	if err := engine.ValidateID("tool_call_id", id); err != nil {
		return engine.Decision{}, err
	}
	if !hasValue(b.Resume) {
		return engine.Decision{}, engine.Validationf("resume is required")
	}
	return engine.Decision{CallID: id, Resume: b.Resume}, nil
}

// checkMessages applies the store's message rules before anything is
// written: a known role and visibility, a valid id when one is given, no
// id twice in one request.
func checkMessages(msgs []engine.Message) error {
	var seen map[string]bool
	for i := range msgs {
		m := &msgs[i]
		switch m.Role {
		case engine.RoleSystem, engine.RoleUser, engine.RoleAssistant, engine.RoleTool:
		case "":
			return engine.Validationf("messages[%d]: role is required", i)
		default:
			return engine.Validationf("messages[%d]: unknown role %q (system, user, assistant or tool)", i, m.Role)
		}
		switch m.Visibility {
		case "", "all", "internal":
		default:
			return engine.Validationf("messages[%d]: unknown visibility %q", i, m.Visibility)
		}
		// The raw fields as the engine takes them (engine.ValidateRawJSON:
		// no lone surrogate escape, at most MaxJSONDepth levels), so that
		// what this decoder accepts the engine does (FuzzDecodeSubmit).
		for _, f := range [...]struct {
			name string
			v    json.RawMessage
		}{{"content", m.Content}, {"tool_calls", m.ToolCalls}, {"metadata", m.Metadata}} {
			if err := engine.ValidateRawJSON(f.v); err != nil {
				return engine.Validationf("messages[%d]: %s %v", i, f.name, err)
			}
		}
		if m.ID == "" {
			continue
		}
		if err := engine.ValidateID("message id", m.ID); err != nil {
			return err
		}
		if seen == nil {
			seen = make(map[string]bool, len(msgs))
		}
		if seen[m.ID] {
			return engine.Validationf("messages[%d]: id %q appears twice", i, m.ID)
		}
		seen[m.ID] = true
	}
	return nil
}

// canonicalOrigin maps the API's origins (user, a2a, internal; blank is
// user) to the run record's.
func canonicalOrigin(o string) (string, error) {
	switch strings.ToLower(o) {
	case "", "user":
		return engine.OriginUser, nil
	case "a2a":
		return engine.OriginA2A, nil
	case "internal":
		return engine.OriginInternal, nil
	}
	return "", engine.Validationf("unknown origin %q (user, a2a or internal)", o)
}

// decodeObject decodes a JSON object body into v. Syntax errors, a body
// that is not an object and fields of the wrong type are validation errors.
func decodeObject(body []byte, v any) error {
	i := skipSpace(body, 0)
	switch {
	case i == len(body):
		return engine.Validationf("request body is empty: a JSON object is expected")
	case body[i] != '{':
		return engine.Validationf("request body is not a JSON object")
	case !utf8.Valid(body):
		// JSON is UTF-8 (RFC 8259); the decoder passes other bytes inside
		// strings, and a RUN frame carrying them would be refused by the
		// agent (ipc.CheckPayload).
		return engine.Validationf("request body is not valid UTF-8")
	}
	if err := gojson.Unmarshal(body, v); err != nil {
		return decodeError(err)
	}
	return nil
}

// decodeError turns a JSON decoder error into a validation error that
// names the field and the JSON types (not Go types).
func decodeError(err error) error {
	var te *gojson.UnmarshalTypeError
	if errors.As(err, &te) {
		field := te.Field
		if field == "" {
			field = "value"
		}
		return engine.Validationf("field %s: expected %s, got %s", field, jsonKind(te.Type), te.Value)
	}
	var se *gojson.SyntaxError
	if errors.As(err, &se) {
		return engine.Validationf("malformed JSON at offset %d: %s", se.Offset, se.Error())
	}
	return engine.Validationf("malformed JSON: %v", err)
}

// jsonKind names the JSON type a Go type decodes from.
func jsonKind(t reflect.Type) string {
	if t == nil {
		return "another type"
	}
	if t == reflect.TypeFor[json.RawMessage]() {
		return "JSON"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "an integer"
	case reflect.Uint8:
		return "an integer from 0 to 255"
	case reflect.Uint, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a non-negative integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return "another type"
}

// checkJSONKind checks that raw JSON, when present, starts with open ('['
// for an array, '{' for an object).
func checkJSONKind(name string, raw json.RawMessage, open byte) error {
	if len(raw) == 0 {
		return nil
	}
	i := skipSpace(raw, 0)
	if i < len(raw) && raw[i] == open {
		return nil
	}
	kind := "an array"
	if open == '{' {
		kind = "an object"
	}
	return engine.Validationf("field %s: expected %s", name, kind)
}

// nullToNil drops an explicit JSON null.
func nullToNil(raw json.RawMessage) json.RawMessage {
	i := skipSpace(raw, 0)
	if len(raw)-i >= 4 && string(raw[i:i+4]) == "null" {
		return nil
	}
	return raw
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

func badID(name, v string) error {
	if len(v) > 64 {
		v = v[:64] + "…"
	}
	return engine.Validationf("%s %q is not 1–%d characters of [A-Za-z0-9._:-]", name, v, engine.MaxPathIDLen)
}
