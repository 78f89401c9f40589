package engine

import (
	"bytes"
	"encoding/json"
	"strings"

	"github.com/google/uuid"
)

// Run modes (request_extras.run_mode) and origins.
const (
	ModeForeground   = "foreground"
	ModeScheduled    = "scheduled"
	ModeResume       = "resume"
	ModeInternalWake = "internal_wake"

	OriginUser     = "User"
	OriginA2A      = "A2A"
	OriginInternal = "Internal"

	AdapterInternal = "internal"
)

// SubmitRequest is a request to run an agent on a thread: the body of the
// client API's submit endpoints, and of an agent's SUBMIT.
type SubmitRequest struct {
	ThreadID           string          `json:"thread_id,omitempty"`
	AgentID            string          `json:"agent_id,omitempty"`
	Messages           []Message       `json:"messages"`
	Decisions          []Decision      `json:"decisions,omitempty"`
	FrontendTools      json.RawMessage `json:"frontend_tools,omitempty"`
	Overrides          json.RawMessage `json:"overrides,omitempty"`
	ContinueRunID      string          `json:"continue_run_id,omitempty"`
	RunIDHint          string          `json:"run_id,omitempty"`
	DispatchIDHint     string          `json:"dispatch_id,omitempty"`
	ParentRunID        string          `json:"parent_run_id,omitempty"`
	ParentThreadID     string          `json:"parent_thread_id,omitempty"`
	TransportRequestID string          `json:"transport_request_id,omitempty"`
	Origin             string          `json:"origin,omitempty"`
	RunMode            string          `json:"run_mode,omitempty"`
	Adapter            string          `json:"adapter,omitempty"`
	Priority           *uint8          `json:"priority,omitempty"`
	DedupeKey          string          `json:"dedupe_key,omitempty"`
	Traceparent        string          `json:"-"`

	// messagesLogged: Messages are already in the thread log (the
	// live-then-queue fallback activates them by id, appending nothing).
	messagesLogged bool
	// dispatchIDMinted: the engine made DispatchIDHint for this request
	// (Minted.DispatchID), not the caller.
	dispatchIDMinted bool
}

// RequestExtras is the engine-private part of a request kept on the run's
// request snapshot (store.md rule 28) so an attempt can be rebuilt from
// the durable record alone.
type RequestExtras struct {
	Overrides          json.RawMessage `json:"overrides,omitempty"`
	Decisions          []Decision      `json:"decisions,omitempty"`
	FrontendTools      json.RawMessage `json:"frontend_tools,omitempty"`
	ContinueRunID      string          `json:"continue_run_id,omitempty"`
	RunIDHint          string          `json:"run_id_hint,omitempty"`
	DispatchIDHint     string          `json:"dispatch_id_hint,omitempty"`
	ParentThreadID     string          `json:"parent_thread_id,omitempty"`
	TransportRequestID string          `json:"transport_request_id,omitempty"`
	Traceparent        string          `json:"traceparent,omitempty"`
	RunMode            string          `json:"run_mode"`
	Adapter            string          `json:"adapter"`
}

func extrasOf(r *SubmitRequest) RequestExtras {
	return RequestExtras{
		Overrides: r.Overrides, Decisions: r.Decisions, FrontendTools: r.FrontendTools,
		ContinueRunID: r.ContinueRunID, RunIDHint: r.RunIDHint, DispatchIDHint: r.DispatchIDHint,
		ParentThreadID: r.ParentThreadID, TransportRequestID: r.TransportRequestID,
		Traceparent: r.Traceparent, RunMode: r.RunMode, Adapter: r.Adapter,
	}
}

// ParseRequestExtras decodes a snapshot's extras; corrupt extras are a
// validation error.
func ParseRequestExtras(raw json.RawMessage) (RequestExtras, error) {
	var x RequestExtras
	if len(raw) == 0 || string(raw) == "null" {
		return RequestExtras{RunMode: ModeForeground, Adapter: AdapterInternal}, nil
	}
	if err := json.Unmarshal(raw, &x); err != nil {
		return x, Validationf("corrupt request_extras: %v", err)
	}
	if x.RunMode == "" {
		x.RunMode = ModeForeground
	}
	if x.Adapter == "" {
		x.Adapter = AdapterInternal
	}
	return x, nil
}

// normalizeRunMode applies engine.md item 9: only a foreground request
// changes mode.
func normalizeRunMode(r *SubmitRequest, background bool) {
	if r.RunMode == "" {
		r.RunMode = ModeForeground
	}
	if r.Adapter == "" {
		r.Adapter = AdapterInternal
	}
	if r.RunMode != ModeForeground {
		return
	}
	switch {
	case len(r.Decisions) > 0 || r.ContinueRunID != "":
		r.RunMode = ModeResume
	case r.Origin == OriginInternal:
		r.RunMode = ModeInternalWake
	case background:
		r.RunMode = ModeScheduled
	}
}

// normalizeOrigin maps the API's lower-case origins to the record's.
func normalizeOrigin(o string) (string, error) {
	switch strings.ToLower(o) {
	case "", "user":
		return OriginUser, nil
	case "a2a":
		return OriginA2A, nil
	case "internal":
		return OriginInternal, nil
	}
	return "", Validationf("unknown origin %q", o)
}

// validateRunInputs applies engine.md item 8: at least one message unless
// the request carries decisions; a blank thread id becomes a new UUIDv7;
// the thread id is trimmed.
func validateRunInputs(r *SubmitRequest) error {
	if len(r.Messages) == 0 && len(r.Decisions) == 0 {
		return Validationf("at least one message is required")
	}
	r.ThreadID = strings.TrimSpace(r.ThreadID)
	if r.ThreadID == "" {
		r.ThreadID = newID()
	}
	if err := ValidateID("thread_id", r.ThreadID); err != nil {
		return err
	}
	origin, err := normalizeOrigin(r.Origin)
	if err != nil {
		return err
	}
	r.Origin = origin
	for _, id := range []struct{ kind, v string }{
		{"agent_id", r.AgentID}, {"continue_run_id", r.ContinueRunID}, {"run_id", r.RunIDHint},
		{"dispatch_id", r.DispatchIDHint}, {"parent_run_id", r.ParentRunID},
		{"parent_thread_id", r.ParentThreadID}, {"dedupe_key", r.DedupeKey},
	} {
		if strings.TrimSpace(id.v) != "" {
			if err := ValidateID(id.kind, id.v); err != nil {
				return err
			}
		}
	}
	for i := range r.Messages {
		if r.Messages[i].ID != "" {
			if err := ValidateID("message id", r.Messages[i].ID); err != nil {
				return err
			}
		}
	}
	// Raw fields the RUN frame carries as given (the messages' own are
	// checked when they are appended: Message.Validate).
	for _, f := range []struct {
		name string
		v    json.RawMessage
	}{{"frontend_tools", r.FrontendTools}, {"overrides", r.Overrides}} {
		if err := ValidateRawJSON(f.v); err != nil {
			return Validationf("%s %v", f.name, err)
		}
	}
	for i := range r.Decisions {
		// Present and not null: one without reached the agent as null
		// (found by review; an agent's SUBMIT comes here without the HTTP
		// API's check).
		if v := bytes.TrimSpace(r.Decisions[i].Resume); len(v) == 0 || bytes.Equal(v, []byte("null")) {
			return Validationf("decision %s: resume is required", r.Decisions[i].CallID)
		}
		if err := ValidateRawJSON(r.Decisions[i].Resume); err != nil {
			return Validationf("decision %s: resume %v", r.Decisions[i].CallID, err)
		}
	}
	return nil
}

// normalizeMessageIDs gives every message without an id a new UUIDv7 id.
func normalizeMessageIDs(msgs []Message) []Message {
	out, _ := mintMessageIDs(msgs)
	return out
}

// mintMessageIDs is normalizeMessageIDs that also says whether it made
// every id (Minted.MessageIDs): true when no message carried one.
func mintMessageIDs(msgs []Message) ([]Message, bool) {
	out := make([]Message, len(msgs))
	all := true
	for i, m := range msgs {
		if strings.TrimSpace(m.ID) == "" {
			m.ID = newID()
		} else {
			all = false
		}
		out[i] = m
	}
	return out, all
}

func newID() string { return uuid.Must(uuid.NewV7()).String() }

func messageIDs(msgs []Message) []string {
	ids := make([]string, len(msgs))
	for i := range msgs {
		ids[i] = msgs[i].ID
	}
	return ids
}

// MaxPathIDLen is the longest id the HTTP API takes in a path.
const MaxPathIDLen = 256

// pathIDChars marks the bytes allowed in path ids: [A-Za-z0-9._:-].
var pathIDChars = func() (t [256]bool) {
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for _, c := range "._:-" {
		t[c] = true
	}
	return t
}()

// ValidPathID reports whether id can stand in a path of the HTTP API:
// 1–256 characters of [A-Za-z0-9._:-] (http.md), but not "." or "..",
// which clients that normalise paths take out of them (RFC 3986 §5.2.4:
// curl sent /v1/threads/../runs as /v1/runs; found by review).
func ValidPathID[T string | []byte](id T) bool {
	if len(id) == 0 || len(id) > MaxPathIDLen || string(id) == "." || string(id) == ".." {
		return false
	}
	for i := 0; i < len(id); i++ {
		if !pathIDChars[id[i]] {
			return false
		}
	}
	return true
}

// CheckPathIDs checks the ids of a submit that a client later uses in a
// path of the HTTP API (thread_id, run_id, dispatch_id, continue_run_id,
// parent_run_id, parent_thread_id) against ValidPathID; blank ones pass
// (each has its default). The HTTP API and the agents' SUBMIT apply it, so
// that no thread or run is made that no client can address.
func (r *SubmitRequest) CheckPathIDs() error {
	for _, f := range []struct{ name, v string }{
		{"thread_id", r.ThreadID}, {"run_id", r.RunIDHint}, {"dispatch_id", r.DispatchIDHint},
		{"continue_run_id", r.ContinueRunID}, {"parent_run_id", r.ParentRunID},
		{"parent_thread_id", r.ParentThreadID},
	} {
		if f.v != "" && !ValidPathID(f.v) {
			return Validationf("%s %q is not 1–%d characters of [A-Za-z0-9._:-]", f.name, f.v, MaxPathIDLen)
		}
	}
	return nil
}
