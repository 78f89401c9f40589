package engine_test

// Seed-mirroring tests of run preparation (engine.md §2), dispatch
// building (§3), request extras and reconstruction (item 45), the
// suspension-aware sink (item 38), outcome handling (item 48), and the
// seed's worker thread-context cache tests, which in Go become tests that
// every step reads the durable store. Plus the project's own additions:
// concurrent same-thread submits (lessons.md B1) and the capped thread
// context (ipc.md). seedmap_prepare.md maps each seed test to its test.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// ---- helpers (prefixed sp to stay clear of other test files) ----

// spIdleRig is a rig whose executor has no slot: nothing ever runs, so
// preparation and queued state can be inspected at leisure.
func spIdleRig(t *testing.T, cfg engine.Config) *rig {
	t.Helper()
	return newRig(t, newFake(0, complete), cfg)
}

// spPrepare validates and prepares req like every submit path does.
func spPrepare(t *testing.T, mb *engine.Mailbox, req *engine.SubmitRequest) string {
	t.Helper()
	if err := engine.ValidateRunInputs(req); err != nil {
		t.Fatalf("validate: %v", err)
	}
	runID, err := mb.PrepareRun(context.Background(), req)
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	return runID
}

// spRunRecord mirrors the seed's make_run_record.
func spRunRecord(runID, thread string, status engine.RunStatus) engine.RunRecord {
	return engine.RunRecord{RunID: runID, ThreadID: thread, AgentID: "agent", Status: status, CreatedAt: 1, UpdatedAt: 1}
}

// spWaitingRun mirrors the seed's make_waiting_run_record.
func spWaitingRun(runID, thread, reason string) engine.RunRecord {
	r := spRunRecord(runID, thread, engine.RunWaiting)
	r.Waiting = &engine.RunWaitingState{Reason: reason}
	return r
}

// spCheckpoint appends msgs (ids assigned) and upserts run, the way the
// seed's thread_store.checkpoint seeds a thread.
func spCheckpoint(t *testing.T, r *rig, thread string, run *engine.RunRecord, msgs ...engine.Message) {
	t.Helper()
	ctx := context.Background()
	n, err := r.store.MessageCount(ctx, thread)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.store.Checkpoint(ctx, engine.Checkpoint{
		ThreadID: thread, ExpectedCount: n, Messages: engine.NormalizeMessageIDs(msgs), CreatedAt: time.Now().UnixMilli(), Run: run,
	}); err != nil {
		t.Fatalf("seed checkpoint: %v", err)
	}
}

func spLoadRun(t *testing.T, r *rig, runID string) *engine.RunRecord {
	t.Helper()
	run, err := r.store.LoadRun(context.Background(), runID)
	if err != nil || run == nil {
		t.Fatalf("load run %s: %v %v", runID, run, err)
	}
	return run
}

func spContents(recs []engine.MessageRecord) []string {
	out := make([]string, len(recs))
	for i := range recs {
		out[i] = string(recs[i].Message.Content)
	}
	return out
}

func spMsgContents(msgs []engine.Message) []string {
	out := make([]string, len(msgs))
	for i := range msgs {
		out[i] = string(msgs[i].Content)
	}
	return out
}

// spRuns copies the requests the fake executor received.
func spRuns(f *fakeExecutor) []engine.RunRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]engine.RunRequest(nil), f.runs...)
}

// spCounter reads one series of the mailbox's metrics (0 when absent).
func spCounter(t *testing.T, mb *engine.Mailbox, series string) float64 {
	t.Helper()
	var b bytes.Buffer
	mb.Metrics().WritePrometheus(&b)
	sc := bufio.NewScanner(&b)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return v
		}
	}
	return 0
}

// spDispatchOf builds the dispatch a prepared request would be queued
// as (for Reconstruct without a queue).
func spDispatchOf(t *testing.T, mb *engine.Mailbox, req *engine.SubmitRequest) *engine.Dispatch {
	t.Helper()
	d, err := mb.BuildDispatch(req, time.Now().UnixMilli())
	if err != nil {
		t.Fatal(err)
	}
	return &d
}

func spRecv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func spSend[T any](t *testing.T, ch chan<- T, v T, what string) {
	t.Helper()
	select {
	case ch <- v:
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out sending %s", what)
	}
}

// ---- §3 build_dispatch ----

func TestSeed_build_dispatch_sets_correct_fields(t *testing.T) {
	const now = int64(1_700_000_000_123)
	r := spIdleRig(t, engine.Config{Now: func() int64 { return now }})
	req := engine.SubmitRequest{ThreadID: "thread-42", RunIDHint: "run-42", Messages: []engine.Message{userMsg("test")}}
	d, err := r.mb.BuildDispatch(&req, now+5)
	if err != nil {
		t.Fatal(err)
	}
	if d.ThreadID != "thread-42" || d.RunID != "run-42" || d.Status != engine.StatusQueued {
		t.Errorf("identity/status %+v", d)
	}
	if d.AttemptCount != 0 || d.MaxAttempts != 5 || d.Priority != 128 || d.Epoch != 0 || d.DedupeKey != "" {
		t.Errorf("counters/priority %+v", d)
	}
	if d.ClaimToken != "" || d.ClaimedBy != "" || d.LeaseUntil != 0 || d.LastError != "" || len(d.Errors) != 0 || d.InstanceID != "" {
		t.Errorf("claim/trace fields set %+v", d)
	}
	if d.AvailableAt != now+5 || d.CreatedAt != now || d.UpdatedAt != now {
		t.Errorf("times %+v", d)
	}
	// engine.md item 19: dispatch_id = dispatch_id_hint or a new UUIDv7.
	if d.DispatchID == "" {
		t.Errorf("dispatch built without a dispatch_id_hint has no dispatch id (want a new UUIDv7)")
	} else {
		spAssertUUIDv7(t, d.DispatchID)
	}
	req.DispatchIDHint = "dispatch-hint"
	if d, err := r.mb.BuildDispatch(&req, now); err != nil || d.DispatchID != "dispatch-hint" {
		t.Errorf("dispatch id hint not used: %q %v", d.DispatchID, err)
	}
	// continue_run_id wins over run_id_hint.
	req.ContinueRunID = "run-continued"
	if d, err := r.mb.BuildDispatch(&req, now); err != nil || d.RunID != "run-continued" {
		t.Errorf("continue_run_id not preferred: %q %v", d.RunID, err)
	}
}

func TestSeed_build_dispatch_requires_prepared_run_id(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	req := engine.SubmitRequest{ThreadID: "thread-1", Messages: []engine.Message{userMsg("hi")}}
	_, err := r.mb.BuildDispatch(&req, 0)
	if err == nil || !strings.Contains(err.Error(), "run_id missing after preparation") || engine.Code(err) != "internal" {
		t.Fatalf("build without a run id: %v (code %q)", err, engine.Code(err))
	}
	// After preparation it builds, for the prepared run and dispatch ids.
	runID := spPrepare(t, r.mb, &req)
	d, err := r.mb.BuildDispatch(&req, 0)
	if err != nil || d.RunID != runID || d.DispatchID != req.DispatchIDHint || d.DispatchID == "" {
		t.Fatalf("build after prepare: %+v %v", d, err)
	}
}

func TestSeed_build_dispatch_extras_roundtrip_with_decisions(t *testing.T) {
	resume := json.RawMessage(`{"decision_id":"d-1","action":"resume","result":{"approved":true}}`)
	req := engine.SubmitRequest{ThreadID: "thread-dec", AgentID: "a1", Messages: []engine.Message{userMsg("hi")},
		Decisions: []engine.Decision{{CallID: "call-1", Resume: resume}}}
	x := engine.ExtrasOf(&req)
	if len(x.Decisions) != 1 || x.Decisions[0].CallID != "call-1" || !bytes.Equal(x.Decisions[0].Resume, resume) {
		t.Fatalf("extras decisions %+v", x.Decisions)
	}
	// Through the durable record and back to the executor's request.
	r := spIdleRig(t, engine.Config{})
	runID := spPrepare(t, r.mb, &req)
	snap := spLoadRun(t, r, runID).Request
	if len(snap.Decisions) != 1 || snap.Decisions[0].CallID != "call-1" {
		t.Fatalf("snapshot decisions %+v", snap.Decisions)
	}
	px, err := engine.ParseRequestExtras(snap.RequestExtras)
	if err != nil || len(px.Decisions) != 1 || px.Decisions[0].CallID != "call-1" {
		t.Fatalf("stored extras decisions %+v %v", px.Decisions, err)
	}
	rr, _, err := r.mb.Reconstruct(context.Background(), spDispatchOf(t, r.mb, &req))
	if err != nil || len(rr.Decisions) != 1 || rr.Decisions[0].CallID != "call-1" || !json.Valid(rr.Decisions[0].Resume) {
		t.Fatalf("reconstructed decisions %+v %v", rr, err)
	}
	var got, want any
	_ = json.Unmarshal(rr.Decisions[0].Resume, &got)
	_ = json.Unmarshal(resume, &want)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("resume payload %s, want %s", rr.Decisions[0].Resume, resume)
	}
}

// ---- §2 prepare ----

func TestSeed_prepare_run_for_dispatch_precreates_created_run_and_thread_projection(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	before := time.Now().Unix()
	req := engine.SubmitRequest{ThreadID: "thread-created", AgentID: "agent-created", TransportRequestID: "transport-created",
		Messages: []engine.Message{userMsg("plan this")}}
	runID := spPrepare(t, r.mb, &req)
	after := time.Now().Unix()

	if req.RunIDHint != runID || req.ContinueRunID != "" {
		t.Fatalf("request hints: run_id %q continue %q, want run_id %q", req.RunIDHint, req.ContinueRunID, runID)
	}
	spAssertUUIDv7(t, runID)
	msgID := req.Messages[0].ID
	if msgID == "" {
		t.Fatal("prepared message has no id")
	}
	run := spLoadRun(t, r, runID)
	if run.Status != engine.RunCreated || run.AgentID != "agent-created" || run.ThreadID != "thread-created" {
		t.Fatalf("run %+v", run)
	}
	snap := run.Request
	if snap == nil || len(snap.InputMessageIDs) != 1 || snap.InputMessageIDs[0] != msgID || snap.InputMessageCount != 1 {
		t.Fatalf("snapshot references %+v, want [%s]", snap, msgID)
	}
	if snap.TransportRequestID != "transport-created" || run.TransportRequestID != "transport-created" || snap.SenderID != "" {
		t.Fatalf("transport/sender %+v / %q", snap, run.TransportRequestID)
	}
	in := run.Input
	if in == nil || in.ThreadID != "thread-created" || in.Range == nil || in.Range.From != 1 || in.Range.To != 1 ||
		len(in.TriggerMessageIDs) != 1 || in.TriggerMessageIDs[0] != msgID {
		t.Fatalf("input %+v", in)
	}
	if run.CreatedAt < before || run.CreatedAt > after || run.UpdatedAt != run.CreatedAt || run.Steps != 0 || run.InputTokens != 0 || run.OutputTokens != 0 {
		t.Fatalf("times/counters %+v (window %d..%d)", run, before, after)
	}
	// The dispatch id is chosen up front and recorded on the run (B3).
	if req.DispatchIDHint == "" || run.DispatchID != req.DispatchIDHint {
		t.Fatalf("run dispatch_id %q, request dispatch hint %q", run.DispatchID, req.DispatchIDHint)
	}
	th, err := r.store.LoadThread(context.Background(), "thread-created")
	if err != nil || th == nil {
		t.Fatal(th, err)
	}
	if th.OpenRunID != runID || th.LatestRunID != runID || th.ActiveRunID != "" || th.MessageCount != 1 {
		t.Fatalf("thread projection %+v", th)
	}
	// The body is in the thread log once, not duplicated in the run.
	msgs, _ := r.store.LoadMessages(context.Background(), "thread-created")
	if len(msgs) != 1 || msgs[0].MessageID != msgID || string(msgs[0].Message.Content) != `"plan this"` {
		t.Fatalf("thread log %v", msgs)
	}
	// Preparation alone queues nothing.
	if ds, _ := r.store.ListDispatches(context.Background(), "thread-created", nil, 0, 0); len(ds) != 0 {
		t.Fatalf("prepare enqueued %v", ds)
	}
}

func TestSeed_prepare_run_for_dispatch_inherits_previous_runtime_state(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	state := json.RawMessage(`{"revision":7,"extensions":{"remote":{"context_id":"remote-ctx-1"}}}`)
	prev := spWaitingRun("run-prev", "thread-state", engine.WaitBackgroundTasks)
	prev.AgentID = "agent-prev"
	prev.Status = engine.RunDone
	prev.State = state
	spCheckpoint(t, r, "thread-state", &prev, userMsg("first"))

	req := engine.SubmitRequest{ThreadID: "thread-state", Messages: []engine.Message{userMsg("second")}}
	runID := spPrepare(t, r.mb, &req)
	run := spLoadRun(t, r, runID)
	if run.Status != engine.RunCreated || run.AgentID != "agent-prev" {
		t.Fatalf("run %+v, want created with the previous agent", run)
	}
	if run.Input == nil || run.Input.Range == nil || run.Input.Range.From != 1 || run.Input.Range.To != 2 {
		t.Fatalf("input range %+v", run.Input)
	}
	var st struct {
		Revision   int `json:"revision"`
		Extensions map[string]struct {
			ContextID string `json:"context_id"`
		} `json:"extensions"`
	}
	if err := json.Unmarshal(run.State, &st); err != nil || st.Revision != 7 || st.Extensions["remote"].ContextID != "remote-ctx-1" {
		t.Fatalf("inherited state %s (%v)", run.State, err)
	}

	t.Run("a created previous run passes on nothing", func(t *testing.T) {
		r := spIdleRig(t, engine.Config{})
		prev := spRunRecord("run-created", "thread-fresh", engine.RunCreated)
		prev.AgentID = "agent-prev"
		prev.State = state
		spCheckpoint(t, r, "thread-fresh", &prev, userMsg("first"))
		req := engine.SubmitRequest{ThreadID: "thread-fresh", RunIDHint: "run-next", Messages: []engine.Message{userMsg("second")}}
		runID := spPrepare(t, r.mb, &req)
		run := spLoadRun(t, r, runID)
		if run.AgentID != "default" || run.State != nil {
			t.Fatalf("agent %q state %s, want default and none", run.AgentID, run.State)
		}
	})
	t.Run("an explicit agent wins over the previous run's", func(t *testing.T) {
		req := engine.SubmitRequest{ThreadID: "thread-state", AgentID: "agent-new", Messages: []engine.Message{userMsg("third")}}
		runID := spPrepare(t, r.mb, &req)
		if run := spLoadRun(t, r, runID); run.AgentID != "agent-new" || run.Input.Range.To != 3 {
			t.Fatalf("run %+v", run)
		}
	})
	t.Run("no agent and no previous run is default", func(t *testing.T) {
		req := engine.SubmitRequest{ThreadID: "thread-empty", Messages: []engine.Message{userMsg("x")}}
		runID := spPrepare(t, r.mb, &req)
		if run := spLoadRun(t, r, runID); run.AgentID != "default" || run.State != nil {
			t.Fatalf("run %+v", run)
		}
	})
}

func TestSeed_prepare_run_preserves_request_extras_on_run_snapshot(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	tools := json.RawMessage(`[{"id":"ft1","name":"FT1","description":"desc"}]`)
	overrides := json.RawMessage(`{"model":"m2"}`)
	req := engine.SubmitRequest{ThreadID: "thread-ext", AgentID: "a1", FrontendTools: tools, Overrides: overrides,
		Messages: []engine.Message{userMsg("hi")}}
	engine.NormalizeRunMode(&req, true)
	runID := spPrepare(t, r.mb, &req)
	snap := spLoadRun(t, r, runID).Request
	if snap == nil || len(snap.RequestExtras) == 0 {
		t.Fatalf("no request extras on the snapshot: %+v", snap)
	}
	var ft []map[string]string
	if err := json.Unmarshal(snap.FrontendTools, &ft); err != nil || len(ft) != 1 || ft[0]["id"] != "ft1" {
		t.Fatalf("snapshot frontend tools %s", snap.FrontendTools)
	}
	x, err := engine.ParseRequestExtras(snap.RequestExtras)
	if err != nil {
		t.Fatal(err)
	}
	if x.RunMode != engine.ModeScheduled || x.Adapter != engine.AdapterInternal || x.RunIDHint != runID ||
		x.DispatchIDHint != req.DispatchIDHint || !bytes.Equal(x.Overrides, overrides) || !bytes.Equal(x.FrontendTools, tools) {
		t.Fatalf("stored extras %+v", x)
	}
}

func TestSeed_prepare_run_round_trips_parent_thread_id(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	spCheckpoint(t, r, "thread-parent", nil, userMsg("parent"))
	req := engine.SubmitRequest{ThreadID: "thread-child", AgentID: "agent", ParentThreadID: "thread-parent", Messages: []engine.Message{userMsg("hi")}}
	runID := spPrepare(t, r.mb, &req)
	if snap := spLoadRun(t, r, runID).Request; snap == nil || snap.ParentThreadID != "thread-parent" {
		t.Fatalf("snapshot parent thread %+v", snap)
	}
	if th, _ := r.store.LoadThread(context.Background(), "thread-child"); th == nil || th.ParentThreadID != "thread-parent" {
		t.Fatalf("child thread projection %+v", th)
	}
	rr, _, err := r.mb.Reconstruct(context.Background(), spDispatchOf(t, r.mb, &req))
	if err != nil || rr.ParentThreadID != "thread-parent" {
		t.Fatalf("reconstructed parent thread %+v %v", rr, err)
	}
}

func TestSeed_prepare_run_preserves_origin_metadata(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	req := engine.SubmitRequest{ThreadID: "thread-meta", AgentID: "a1", Origin: "a2a", ParentRunID: "parent-run-1", Messages: []engine.Message{userMsg("hi")}}
	runID := spPrepare(t, r.mb, &req)
	run := spLoadRun(t, r, runID)
	if run.Request == nil || run.Request.Origin != engine.OriginA2A || run.ParentRunID != "parent-run-1" {
		t.Fatalf("origin %+v parent run %q", run.Request, run.ParentRunID)
	}
}

func TestSeed_prepare_run_defaults_origin_to_user(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	req := engine.SubmitRequest{ThreadID: "thread-default", Messages: []engine.Message{userMsg("hi")}}
	runID := spPrepare(t, r.mb, &req)
	run := spLoadRun(t, r, runID)
	if run.Request == nil || run.Request.Origin != engine.OriginUser || run.ParentRunID != "" {
		t.Fatalf("origin %+v parent run %q", run.Request, run.ParentRunID)
	}
	rr, _, err := r.mb.Reconstruct(context.Background(), spDispatchOf(t, r.mb, &req))
	if err != nil || rr.Origin != engine.OriginUser || rr.ParentRunID != "" {
		t.Fatalf("reconstructed origin %+v %v", rr, err)
	}
	// An unknown origin is refused, not silently defaulted.
	bad := engine.SubmitRequest{ThreadID: "thread-default", Origin: "martian", Messages: []engine.Message{userMsg("hi")}}
	if err := engine.ValidateRunInputs(&bad); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("unknown origin: %v", err)
	}
}

func TestSeed_prepare_run_origin_a2a_roundtrip(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	req := engine.SubmitRequest{ThreadID: "thread-a2a", Origin: engine.OriginA2A, ParentRunID: "parent-123", Messages: []engine.Message{userMsg("hi")}}
	runID := spPrepare(t, r.mb, &req)
	run := spLoadRun(t, r, runID)
	if run.Request.Origin != engine.OriginA2A || run.ParentRunID != "parent-123" {
		t.Fatalf("run %+v", run)
	}
	rr, _, err := r.mb.Reconstruct(context.Background(), spDispatchOf(t, r.mb, &req))
	if err != nil || rr.Origin != engine.OriginA2A || rr.ParentRunID != "parent-123" {
		t.Fatalf("reconstructed %+v %v", rr, err)
	}
}

// ---- request extras ----

func TestSeed_run_request_extras_serde_roundtrip(t *testing.T) {
	x := engine.RequestExtras{FrontendTools: json.RawMessage(`[{"id":"ft1","name":"FT1","description":"desc"}]`), RunMode: engine.ModeScheduled, Adapter: "acp"}
	b, err := json.Marshal(x)
	if err != nil {
		t.Fatal(err)
	}
	for _, absent := range []string{"overrides", "decisions", "continue_run_id", "run_id_hint", "dispatch_id_hint", "parent_thread_id", "transport_request_id"} {
		if strings.Contains(string(b), `"`+absent+`"`) {
			t.Errorf("empty field %s serialized: %s", absent, b)
		}
	}
	p, err := engine.ParseRequestExtras(b)
	if err != nil {
		t.Fatal(err)
	}
	var ft []map[string]string
	if err := json.Unmarshal(p.FrontendTools, &ft); err != nil || len(ft) != 1 || ft[0]["id"] != "ft1" {
		t.Fatalf("frontend tools %s", p.FrontendTools)
	}
	if len(p.Decisions) != 0 || p.Overrides != nil || p.RunMode != engine.ModeScheduled || p.Adapter != "acp" {
		t.Fatalf("parsed %+v", p)
	}
}

func TestSeed_run_request_extras_empty_returns_none(t *testing.T) {
	// Go keeps run_mode/adapter in every extras; absent extras parse as
	// the defaults (foreground, internal) and nothing else.
	want := engine.RequestExtras{RunMode: engine.ModeForeground, Adapter: engine.AdapterInternal}
	for name, raw := range map[string]json.RawMessage{"nil": nil, "empty": {}, "null": json.RawMessage("null")} {
		got, err := engine.ParseRequestExtras(raw)
		if err != nil || fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
			t.Errorf("%s extras parse as %+v (%v), want %+v", name, got, err, want)
		}
	}
	// An extras object without run_mode/adapter takes the same defaults
	// (the seed's #[serde(default)]).
	got, err := engine.ParseRequestExtras(json.RawMessage(`{}`))
	if err != nil || got.RunMode != engine.ModeForeground || got.Adapter != engine.AdapterInternal {
		t.Errorf("{} extras parse as %+v (%v), want run_mode foreground and adapter internal", got, err)
	}
	// A default request's extras carry exactly the mode and adapter.
	req := engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userMsg("x")}}
	engine.NormalizeRunMode(&req, false)
	b, _ := json.Marshal(engine.ExtrasOf(&req))
	if string(b) != `{"run_mode":"foreground","adapter":"internal"}` {
		t.Errorf("default extras %s", b)
	}
}

func TestSeed_run_request_extras_apply_to_request(t *testing.T) {
	// A run whose snapshot carries its request fields only in the extras:
	// reconstruction applies them (engine.md item 45.6).
	r := spIdleRig(t, engine.Config{})
	extras, _ := json.Marshal(engine.RequestExtras{
		FrontendTools:      json.RawMessage(`[{"id":"ft1","name":"FT1","description":"desc"}]`),
		Overrides:          json.RawMessage(`{"temperature":0}`),
		Decisions:          []engine.Decision{{CallID: "call-9", Resume: json.RawMessage(`{"ok":true}`)}},
		RunIDHint:          "run-1",
		DispatchIDHint:     "dispatch-1",
		ParentThreadID:     "parent-thread",
		TransportRequestID: "transport-1",
		Traceparent:        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		RunMode:            engine.ModeResume,
		Adapter:            "ag_ui",
	})
	run := spRunRecord("run-1", "t1", engine.RunCreated)
	spCheckpoint(t, r, "t1", nil, engine.Message{ID: "m-hi", Role: engine.RoleUser, Content: json.RawMessage(`"hi"`)})
	run.Request = &engine.RunRequestSnapshot{Origin: engine.OriginUser, InputMessageIDs: []string{"m-hi"}, InputMessageCount: 1, RequestExtras: extras}
	run.Input = &engine.RunMessageInput{ThreadID: "t1", Range: &engine.SeqRange{From: 1, To: 1}, TriggerMessageIDs: []string{"m-hi"}}
	spCheckpoint(t, r, "t1", &run)

	rr, _, err := r.mb.Reconstruct(context.Background(), &engine.Dispatch{DispatchID: "dispatch-1", ThreadID: "t1", RunID: "run-1"})
	if err != nil {
		t.Fatal(err)
	}
	if rr.RunID != "run-1" || rr.DispatchID != "dispatch-1" || rr.RunMode != engine.ModeResume {
		t.Errorf("ids/mode %+v", rr)
	}
	if !bytes.Contains(rr.FrontendTools, []byte(`"ft1"`)) {
		t.Errorf("frontend tools from extras not applied: %s", rr.FrontendTools)
	}
	if rr.ParentThreadID != "parent-thread" {
		t.Errorf("parent_thread_id from extras not applied: %q", rr.ParentThreadID)
	}
	if rr.TransportRequestID != "transport-1" {
		t.Errorf("transport_request_id from extras not applied: %q", rr.TransportRequestID)
	}
	if !bytes.Equal(rr.Overrides, json.RawMessage(`{"temperature":0}`)) || len(rr.Decisions) != 1 || rr.Decisions[0].CallID != "call-9" {
		t.Errorf("overrides/decisions from extras %s %+v", rr.Overrides, rr.Decisions)
	}
	if rr.Traceparent == "" {
		t.Errorf("traceparent from extras not applied")
	}
	if len(rr.Messages) != 1 || string(rr.Messages[0].Content) != `"hi"` {
		t.Errorf("activation messages %v", spMsgContents(rr.Messages))
	}
}

func TestSeed_run_request_extras_corrupt_json_returns_error(t *testing.T) {
	corrupt := json.RawMessage(`{"overrides":"not-an-object","decisions":42}`)
	if _, err := engine.ParseRequestExtras(corrupt); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("corrupt extras: %v, want a validation error", err)
	}
	if _, err := engine.ParseRequestExtras(json.RawMessage(`{"run_mode":`)); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("truncated extras: %v", err)
	}
	// Reconstruction of a run with corrupt extras fails permanently
	// (validation), it does not run with guessed values.
	r := spIdleRig(t, engine.Config{})
	run := spRunRecord("run-corrupt", "thread-corrupt", engine.RunCreated)
	run.Request = &engine.RunRequestSnapshot{RequestExtras: corrupt}
	spCheckpoint(t, r, "thread-corrupt", &run, userMsg("x"))
	_, _, err := r.mb.Reconstruct(context.Background(), &engine.Dispatch{DispatchID: "d", ThreadID: "thread-corrupt", RunID: "run-corrupt"})
	if !errors.Is(err, engine.ErrValidation) || !strings.Contains(err.Error(), "request_extras") {
		t.Fatalf("reconstruct with corrupt extras: %v", err)
	}
}

// ---- item 9 / 45 / 46.1: the run mode the executor receives ----

func TestSeed_submit_background_delivers_scheduled_policy_context(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	r.start(t)
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-policy-bg", AgentID: "agent-1", Adapter: "acp",
		Messages: []engine.Message{userMsg("hello")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "executor received the run", func() bool { return len(spRuns(r.exec)) > 0 })
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	runs := spRuns(r.exec)
	if len(runs) != 1 {
		t.Fatalf("%d runs", len(runs))
	}
	req := runs[0]
	if req.RunMode != engine.ModeScheduled {
		t.Errorf("run_mode %q, want scheduled", req.RunMode)
	}
	if req.DispatchID != res.DispatchID || req.RunID != res.RunID || req.AgentID != "agent-1" || req.Origin != engine.OriginUser {
		t.Errorf("request identity %+v (submit %+v)", req, res)
	}
	if req.SessionID == "" || req.SessionID == req.DispatchID || req.SessionID == req.RunID {
		t.Errorf("session id %q must be a fresh dispatch instance id", req.SessionID)
	}
	// The adapter is not part of the agent protocol: it stays on the run's
	// durable request snapshot.
	x, err := engine.ParseRequestExtras(spLoadRun(t, r, res.RunID).Request.RequestExtras)
	if err != nil || x.Adapter != "acp" || x.RunMode != engine.ModeScheduled {
		t.Errorf("stored extras %+v %v", x, err)
	}
}

func TestSeedItem46_run_mode_reaching_the_executor(t *testing.T) {
	ctx := context.Background()
	dec := []engine.Decision{{CallID: "c1", Resume: json.RawMessage(`{"approved":true}`)}}
	cases := []struct {
		name       string
		foreground bool
		waiting    bool
		req        engine.SubmitRequest
		want       string
		continues  bool
	}{
		{name: "background new run is scheduled", req: engine.SubmitRequest{Messages: []engine.Message{userMsg("x")}}, want: engine.ModeScheduled},
		{name: "internal origin is internal_wake", req: engine.SubmitRequest{Origin: engine.OriginInternal, Messages: []engine.Message{userMsg("x")}}, want: engine.ModeInternalWake},
		{name: "internal origin in API spelling is internal_wake", req: engine.SubmitRequest{Origin: "internal", Messages: []engine.Message{userMsg("x")}}, want: engine.ModeInternalWake},
		{name: "decisions resume", req: engine.SubmitRequest{Decisions: dec}, want: engine.ModeResume},
		// The mode is fixed at submit time, before preparation finds the
		// waiting run, so a background message continuing it stays
		// scheduled (as in the seed); it does carry continue_run_id.
		{name: "background message to a waiting run continues it as scheduled", waiting: true, req: engine.SubmitRequest{Messages: []engine.Message{userMsg("x")}}, want: engine.ModeScheduled, continues: true},
		{name: "foreground message to a waiting run resumes it", foreground: true, waiting: true, req: engine.SubmitRequest{Messages: []engine.Message{userMsg("x")}}, want: engine.ModeResume, continues: true},
		{name: "foreground new run stays foreground", foreground: true, req: engine.SubmitRequest{Messages: []engine.Message{userMsg("x")}}, want: engine.ModeForeground},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := spIdleRig(t, engine.Config{})
			thread := "thread-mode"
			if c.waiting {
				w := spWaitingRun("run-waiting", thread, engine.WaitUserInput)
				spCheckpoint(t, r, thread, &w, userMsg("before"))
			}
			req := c.req
			req.ThreadID = thread
			var res engine.SubmitResult
			var err error
			if c.foreground {
				res, _, err = r.mb.Submit(ctx, req)
			} else {
				res, err = r.mb.SubmitBackground(ctx, req)
			}
			if err != nil || res.Status != engine.SubmitQueued {
				t.Fatalf("submit %+v %v", res, err)
			}
			d, err := r.store.LoadDispatch(ctx, res.DispatchID)
			if err != nil || d == nil {
				t.Fatal(d, err)
			}
			rr, _, err := r.mb.Reconstruct(ctx, d)
			if err != nil {
				t.Fatal(err)
			}
			if rr.RunMode != c.want {
				t.Errorf("executor would receive run_mode %q, want %q", rr.RunMode, c.want)
			}
			if c.continues != (rr.ContinueRunID == "run-waiting") {
				t.Errorf("continue_run_id %q", rr.ContinueRunID)
			}
		})
	}
}

// ---- item 38: the suspension-aware sink ----

func TestSeed_suspension_aware_sink_sets_flag_on_suspended_tool_call(t *testing.T) {
	step := make(chan struct{})
	emitted := make(chan struct{})
	events := []string{
		`{"type":"tool_call_done","id":"c1","outcome":"succeeded","result":{"tool_name":"echo","status":"success"}}`,
		`{"type":"tool_call_done","id":"c2","outcome":"suspended","result":{"tool_name":"approve","status":"pending"}}`,
		`{"type":"tool_call_resumed","target_id":"c2","result":{"approved":true}}`,
	}
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		for i, ev := range events {
			if i > 0 {
				select {
				case <-step:
				case <-ctx.Done():
					return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "cancelled"}
				}
			}
			sink.Emit([]byte(ev))
			select {
			case emitted <- struct{}{}:
			case <-ctx.Done():
				return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "cancelled"}
			}
		}
		select {
		case <-step:
		case <-ctx.Done():
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "cancelled"}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{Lease: 400 * time.Millisecond, RenewInterval: 40 * time.Millisecond, SuspendedLease: 10 * time.Second})
	ctx := context.Background()
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-suspend", Messages: []engine.Message{userMsg("x")}})
	if err != nil || res.Status != engine.SubmitRunning {
		t.Fatalf("submit %+v %v", res, err)
	}
	const renewedOK = `mailbox_lease_renewals_total{result="ok"}`
	leaseAhead := func() int64 {
		d, err := r.store.LoadDispatch(ctx, res.DispatchID)
		if err != nil || d == nil || d.Status != engine.StatusClaimed {
			t.Fatalf("dispatch %+v %v", d, err)
		}
		return d.LeaseUntil - time.Now().UnixMilli()
	}
	// Two renewals that began after the event was emitted: the second one
	// certainly read the suspension state the event left.
	twoRenewalsAfter := func(what string) {
		c0 := spCounter(t, r.mb, renewedOK)
		eventually(t, what, func() bool { return spCounter(t, r.mb, renewedOK) >= c0+2 })
	}

	spRecv(t, emitted, "succeeded tool call emitted")
	twoRenewalsAfter("renewals after a succeeded tool call")
	if ahead := leaseAhead(); ahead > 2000 {
		t.Fatalf("a succeeded tool call renewed the lease %d ms ahead, want the normal 400 ms lease", ahead)
	}

	spSend(t, step, struct{}{}, "step")
	spRecv(t, emitted, "suspended tool call emitted")
	eventually(t, "lease renewed with the suspended lease", func() bool { return leaseAhead() > 5000 })

	spSend(t, step, struct{}{}, "step")
	spRecv(t, emitted, "resume emitted")
	twoRenewalsAfter("renewals after the resume")
	if ahead := leaseAhead(); ahead > 2000 {
		t.Fatalf("after tool_call_resumed the lease is %d ms ahead, want the normal 400 ms lease", ahead)
	}

	spSend(t, step, struct{}{}, "step")
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	// Every event was forwarded, unchanged and in order.
	evs, _, _, _ := r.mb.Reattach("thread-suspend").Read(0, 10, nil)
	if len(evs) != 5 {
		t.Fatalf("%d events forwarded, want 5", len(evs))
	}
	for i, ev := range events {
		if string(evs[i].Data) != ev {
			t.Errorf("event %d forwarded as %s, want %s", i, evs[i].Data, ev)
		}
	}
}

// ---- item 48: outcomes the engine acts on ----

func TestSeed_classify_error_outcomes_drive_the_dispatch(t *testing.T) {
	completedWithError := func(msg string) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: engine.ErrorTermination(msg), Error: msg}
	}
	failure := func(kind, code, msg string) engine.RunOutcome {
		return engine.RunOutcome{Kind: engine.ClassifyFailure(kind, code), ErrorCode: code, Error: msg}
	}
	cases := []struct {
		seed     string
		outcome  engine.RunOutcome
		status   engine.DispatchStatus
		runs     int
		attempts uint32
		termType string
	}{
		{"classify_error_ok_is_completed", engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "done"},
			engine.StatusAcked, 1, 0, engine.TermNaturalEnd},
		{"classify_error_phase_error_is_completed", completedWithError("phase error: unknown key bad"), engine.StatusAcked, 1, 0, engine.TermError},
		{"classify_error_invalid_resume_is_completed", completedWithError("invalid resume: bad resume"), engine.StatusAcked, 1, 0, engine.TermError},
		{"classify_error_thread_already_running_is_permanent", failure("permanent", "thread_already_running", "thread t1 already running"), engine.StatusDeadLetter, 1, 0, engine.TermError},
		{"classify_error_agent_not_found_is_permanent", failure("permanent", "agent_not_found", "agent missing not found"), engine.StatusDeadLetter, 1, 0, engine.TermError},
		{"classify_error_resolve_failed_is_permanent", failure("permanent", "resolve_failed", "not found"), engine.StatusDeadLetter, 1, 0, engine.TermError},
		{"classify_error_storage_error_is_transient", failure("transient", "storage_error", "disk full"), engine.StatusDeadLetter, 2, 2, engine.TermError},
		{"classify_error_inference_failed_is_transient", failure("transient", "inference_failed", "timeout"), engine.StatusDeadLetter, 2, 2, engine.TermError},
	}
	for _, c := range cases {
		t.Run(c.seed, func(t *testing.T) {
			o := c.outcome
			r := newRig(t, newFake(1, func(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome { return o }), engine.Config{MaxAttempts: 2})
			r.start(t)
			res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "thread-classify", Messages: []engine.Message{userMsg("x")}})
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "dispatch settled", func() bool { return dispatchStatus(t, r.store, res.DispatchID).Terminal() })
			d, _ := r.store.LoadDispatch(context.Background(), res.DispatchID)
			if d.Status != c.status || d.AttemptCount != c.attempts {
				t.Fatalf("dispatch %s with %d attempts spent, want %s with %d", d.Status, d.AttemptCount, c.status, c.attempts)
			}
			if n, _, _ := r.exec.stats(); n != c.runs {
				t.Fatalf("executor ran %d times, want %d", n, c.runs)
			}
			eventually(t, "run settled", func() bool { return spLoadRun(t, r, res.RunID).Status == engine.RunDone })
			run := spLoadRun(t, r, res.RunID)
			if run.TerminationReason == nil || run.TerminationReason.Type != c.termType {
				t.Fatalf("run termination %+v, want %s", run.TerminationReason, c.termType)
			}
			if c.status == engine.StatusAcked && c.termType == engine.TermError && d.RunError != o.Error {
				t.Fatalf("agent-level error not recorded on the dispatch: %q", d.RunError)
			}
			if c.status == engine.StatusDeadLetter && !bytes.Contains(run.ErrorPayload, []byte(o.Error)) {
				t.Fatalf("dead-lettered run error payload %s, want %q", run.ErrorPayload, o.Error)
			}
		})
	}
}

// ---- the seed's worker thread-context cache, as durable-store reads ----

func TestSeed_thread_context_cache_used_by_reusable_waiting_run_id(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	const thread = "thread-ctx-reuse"
	w := spWaitingRun("run-waiting", thread, engine.WaitBackgroundTasks)
	spCheckpoint(t, r, thread, &w, userMsg("hi"))
	tc, err := r.mb.ThreadContextOf(ctx, thread)
	if err != nil || tc.LatestRun == nil || tc.LatestRun.RunID != "run-waiting" || len(tc.Messages) != 1 {
		t.Fatalf("thread context %+v %v", tc, err)
	}
	if got, err := r.mb.ReusableWaitingRun(ctx, thread); err != nil || got != "run-waiting" {
		t.Fatalf("reusable waiting run %q %v", got, err)
	}
	req := engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("again")}}
	if runID := spPrepare(t, r.mb, &req); runID != "run-waiting" || req.ContinueRunID != "run-waiting" {
		t.Fatalf("prepare chose %q (continue %q), want the waiting run", runID, req.ContinueRunID)
	}
	// Continuing keeps the waiting status and points the run at the new
	// request (engine.md item 15).
	run := spLoadRun(t, r, "run-waiting")
	if run.Status != engine.RunWaiting || run.Request == nil || len(run.Request.InputMessageIDs) != 1 ||
		run.Request.InputMessageIDs[0] != req.Messages[0].ID || run.Input.Range.To != 2 || run.DispatchID != req.DispatchIDHint {
		t.Fatalf("continued run %+v", run)
	}
}

func TestSeed_thread_context_cache_updated_after_prepare_checkpoint(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	const thread = "thread-ctx-checkpoint"
	prev := spRunRecord("run-prev", thread, engine.RunDone)
	spCheckpoint(t, r, thread, &prev, userMsg("first"))
	before, err := r.mb.ThreadContextOf(ctx, thread)
	if err != nil || len(before.Messages) != 1 {
		t.Fatalf("context before %+v %v", before, err)
	}
	req := engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("second")}}
	runID := spPrepare(t, r.mb, &req)
	after, err := r.mb.ThreadContextOf(ctx, thread)
	if err != nil {
		t.Fatal(err)
	}
	if got := spContents(after.Messages); len(got) != 2 || got[0] != `"first"` || got[1] != `"second"` {
		t.Fatalf("context after prepare has %v", got)
	}
	if after.LatestRun == nil || after.LatestRun.RunID != runID || after.TotalMessages != 2 || after.FirstSeq != 1 {
		t.Fatalf("context after prepare %+v", after)
	}
}

func TestSeed_prepare_run_falls_back_to_store_without_cache(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	const thread = "thread-no-cache"
	prev := spRunRecord("run-prev", thread, engine.RunDone)
	spCheckpoint(t, r, thread, &prev, userMsg("first"))
	req := engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("second")}}
	runID := spPrepare(t, r.mb, &req)
	if runID == "" || runID == "run-prev" {
		t.Fatalf("run id %q", runID)
	}
	msgs, err := r.store.LoadMessages(context.Background(), thread)
	if got := spContents(msgs); err != nil || len(got) != 2 || got[0] != `"first"` || got[1] != `"second"` {
		t.Fatalf("stored messages %v %v", got, err)
	}
	if run := spLoadRun(t, r, runID); run.Input.Range.From != 1 || run.Input.Range.To != 2 {
		t.Fatalf("input range %+v", run.Input.Range)
	}
}

func TestSeed_prepare_run_uses_durable_messages_when_active_cache_is_stale(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	const thread = "thread-stale-cache"
	active := spRunRecord("run-active", thread, engine.RunRunning)
	spCheckpoint(t, r, thread, &active, userMsg("first"))
	stale, err := r.mb.ThreadContextOf(ctx, thread)
	if err != nil || len(stale.Messages) != 1 {
		t.Fatalf("stale snapshot %+v %v", stale, err)
	}
	// The active run checkpoints output after that snapshot was taken.
	spCheckpoint(t, r, thread, &active, engine.Message{Role: engine.RoleAssistant, Content: json.RawMessage(`"active output"`)})

	req := engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("second")}}
	runID := spPrepare(t, r.mb, &req)
	msgs, _ := r.store.LoadMessages(ctx, thread)
	if got := spContents(msgs); len(got) != 3 || got[0] != `"first"` || got[1] != `"active output"` || got[2] != `"second"` {
		t.Fatalf("stored messages %v, want first, active output, second", got)
	}
	run := spLoadRun(t, r, runID)
	if run.Input.Range.To != 3 || len(run.Request.InputMessageIDs) != 1 || run.Request.InputMessageIDs[0] != msgs[2].MessageID {
		t.Fatalf("run input %+v / %+v", run.Input, run.Request)
	}
	rr, _, err := r.mb.Reconstruct(ctx, spDispatchOf(t, r.mb, &req))
	if err != nil {
		t.Fatal(err)
	}
	if got := spMsgContents(rr.Messages); len(got) != 1 || got[0] != `"second"` {
		t.Fatalf("activation messages %v", got)
	}
	if got := spContents(rr.Context.Messages); len(got) != 3 || got[1] != `"active output"` {
		t.Fatalf("context sent with the run %v", got)
	}
}

func TestSeed_reusable_waiting_run_id_ignores_stale_worker_cache(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	const thread = "thread-stale-waiting-cache"
	w := spWaitingRun("run-waiting", thread, engine.WaitBackgroundTasks)
	spCheckpoint(t, r, thread, &w, userMsg("hi"))
	stale, err := r.mb.ThreadContextOf(ctx, thread)
	if err != nil || stale.LatestRun == nil || !stale.LatestRun.IsResumableWaiting() {
		t.Fatalf("snapshot %+v %v", stale, err)
	}
	done := spRunRecord("run-waiting", thread, engine.RunDone)
	done.UpdatedAt = 2
	spCheckpoint(t, r, thread, &done, engine.Message{Role: engine.RoleAssistant, Content: json.RawMessage(`"done"`)})
	if got, err := r.mb.ReusableWaitingRun(ctx, thread); err != nil || got != "" {
		t.Fatalf("reusable waiting run %q %v, want none (the run is done now)", got, err)
	}
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("new")}})
	if err != nil || res.RunID == "run-waiting" {
		t.Fatalf("a message after the run finished continued it: %+v %v", res, err)
	}
}

func TestSeed_reusable_waiting_run_id_returns_none_for_done_cached_run(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	const thread = "thread-done-run"
	done := spRunRecord("run-done", thread, engine.RunDone)
	spCheckpoint(t, r, thread, &done, userMsg("hi"))
	if _, err := r.mb.ThreadContextOf(ctx, thread); err != nil {
		t.Fatal(err)
	}
	if got, err := r.mb.ReusableWaitingRun(ctx, thread); err != nil || got != "" {
		t.Fatalf("reusable waiting run %q %v, want none", got, err)
	}
	// A waiting run without a reason is not resumable either.
	odd := spRunRecord("run-reasonless", "thread-reasonless", engine.RunWaiting)
	spCheckpoint(t, r, "thread-reasonless", &odd, userMsg("hi"))
	if got, err := r.mb.ReusableWaitingRun(ctx, "thread-reasonless"); err != nil || got != "" {
		t.Fatalf("reasonless waiting run reused: %q %v", got, err)
	}
	// An unknown thread has none.
	if got, err := r.mb.ReusableWaitingRun(ctx, "thread-unknown"); err != nil || got != "" {
		t.Fatalf("unknown thread: %q %v", got, err)
	}
}

func TestSeed_thread_context_load_populates_run_cache(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	const thread = "thread-load-test"
	r1 := spRunRecord("r1", thread, engine.RunDone)
	spCheckpoint(t, r, thread, &r1, userMsg("msg"))
	tc, err := r.mb.ThreadContextOf(ctx, thread)
	if err != nil {
		t.Fatal(err)
	}
	if len(tc.Messages) != 1 || tc.FirstSeq != 1 || tc.TotalMessages != 1 || tc.LatestRun == nil || tc.LatestRun.RunID != "r1" {
		t.Fatalf("thread context %+v", tc)
	}
	// Runs are looked up in the store: a known run without a request
	// snapshot and an unknown run both fail reconstruction by name.
	_, _, err = r.mb.Reconstruct(ctx, &engine.Dispatch{DispatchID: "d-1", ThreadID: thread, RunID: "r1"})
	if !errors.Is(err, engine.ErrValidation) || !strings.Contains(err.Error(), "run 'r1' has no request snapshot") {
		t.Fatalf("reconstruct r1: %v", err)
	}
	_, _, err = r.mb.Reconstruct(ctx, &engine.Dispatch{DispatchID: "d-2", ThreadID: thread, RunID: "unknown"})
	if !errors.Is(err, engine.ErrValidation) || !strings.Contains(err.Error(), "run 'unknown' not found for dispatch 'd-2'") {
		t.Fatalf("reconstruct unknown: %v", err)
	}
	_, _, err = r.mb.Reconstruct(ctx, &engine.Dispatch{DispatchID: "d-3", ThreadID: "other-thread", RunID: "r1"})
	if !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("reconstruct for another thread: %v", err)
	}
	// An empty thread has an empty context.
	empty, err := r.mb.ThreadContextOf(ctx, "thread-never-written")
	if err != nil || len(empty.Messages) != 0 || empty.TotalMessages != 0 || empty.FirstSeq != 0 || empty.LatestRun != nil {
		t.Fatalf("empty thread context %+v %v", empty, err)
	}
}

func TestSeed_thread_context_cache_cleared_on_idle_transition(t *testing.T) {
	// Nothing of a finished run lingers: the next run's context is read
	// afresh and includes what the previous run checkpointed.
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if string(req.Messages[0].Content) == `"first"` {
			if err := req.Checkpoint(ctx, engine.RunCheckpoint{Messages: []engine.Message{{Role: engine.RoleAssistant, Content: json.RawMessage(`"answer 1"`)}}}); err != nil {
				return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: err.Error()}
			}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	const thread = "thread-ctx-clear"
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("first")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "first acked", func() bool { return dispatchStatus(t, r.store, first.DispatchID) == engine.StatusAcked })
	eventually(t, "worker idle", func() bool { return r.mb.InFlight() == 0 })
	second, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg("second")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "second acked", func() bool { return dispatchStatus(t, r.store, second.DispatchID) == engine.StatusAcked })
	runs := spRuns(r.exec)
	if len(runs) != 2 || runs[1].RunID != second.RunID {
		t.Fatalf("runs %d", len(runs))
	}
	tc := runs[1].Context
	if got := spContents(tc.Messages); len(got) != 3 || got[0] != `"first"` || got[1] != `"answer 1"` || got[2] != `"second"` {
		t.Fatalf("second run's context %v", got)
	}
	if tc.TotalMessages != 3 || tc.LatestRun == nil {
		t.Fatalf("second run's context %+v", tc)
	}
	if got := spMsgContents(runs[1].Messages); len(got) != 1 || got[0] != `"second"` {
		t.Fatalf("second run activated %v", got)
	}
}

// ---- reuse of waiting runs by incoming messages (item 11) ----

func TestSeed_waiting_thread_is_reactivated_by_incoming_message(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	ctx := context.Background()
	w := spWaitingRun("run-waiting", "thread-waiting", engine.WaitBackgroundTasks)
	w.Steps = 2
	if err := r.store.CreateRun(ctx, w); err != nil {
		t.Fatal(err)
	}
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-waiting", AgentID: "agent", Messages: []engine.Message{userMsg("poke")}})
	if err != nil {
		t.Fatal(err)
	}
	if res.RunID != "run-waiting" {
		t.Fatalf("submit created run %q, want the waiting run continued", res.RunID)
	}
	eventually(t, "dispatch acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	latest, err := r.store.LatestRun(ctx, "thread-waiting")
	if err != nil || latest == nil || latest.RunID != "run-waiting" || latest.Status != engine.RunDone || latest.UpdatedAt <= 1 || latest.DispatchID != res.DispatchID {
		t.Fatalf("latest run %+v %v", latest, err)
	}
	runs := spRuns(r.exec)
	if len(runs) != 1 || runs[0].ContinueRunID != "run-waiting" || runs[0].RunMode != engine.ModeScheduled ||
		len(runs[0].Messages) != 1 || string(runs[0].Messages[0].Content) != `"poke"` {
		t.Fatalf("executor request %+v", runs)
	}
}

func TestSeed_structured_user_input_waiting_thread_is_reused_by_incoming_message(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	w := spWaitingRun("run-user-input", "thread-user-input", engine.WaitUserInput)
	w.Waiting.Message = "waiting for user input"
	if err := r.store.CreateRun(ctx, w); err != nil {
		t.Fatal(err)
	}
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-user-input", AgentID: "agent", Messages: []engine.Message{userMsg("continue")}})
	if err != nil || res.RunID != "run-user-input" {
		t.Fatalf("submit %+v %v, want the user-input run continued", res, err)
	}
	d, _ := r.store.LoadDispatch(ctx, res.DispatchID)
	if d == nil || d.RunID != "run-user-input" {
		t.Fatalf("dispatch %+v", d)
	}
}

func TestSeed_reusable_waiting_run_prefers_thread_open_run_projection_over_latest_run(t *testing.T) {
	r := newRig(t, newFake(1, complete), engine.Config{})
	ctx := context.Background()
	const thread = "thread-open-projection"
	newer := spWaitingRun("run-newer-latest", thread, engine.WaitBackgroundTasks)
	newer.UpdatedAt = 20
	open := spWaitingRun("run-open", thread, engine.WaitUserInput)
	open.Waiting.Message = "waiting for explicit input"
	open.UpdatedAt = 10
	// Written in this order the projection's open run is run-open while
	// the latest run by updated_at is run-newer-latest.
	if err := r.store.CreateRun(ctx, newer); err != nil {
		t.Fatal(err)
	}
	if err := r.store.CreateRun(ctx, open); err != nil {
		t.Fatal(err)
	}
	th, _ := r.store.LoadThread(ctx, thread)
	latest, _ := r.store.LatestRun(ctx, thread)
	if th == nil || th.OpenRunID != "run-open" || latest == nil || latest.RunID != "run-newer-latest" {
		t.Fatalf("precondition: projection %+v, latest %+v", th, latest)
	}
	// No Start: recovery would wake the background-task run first and
	// make it the open run. The free slot claims inline.
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, AgentID: "agent", Messages: []engine.Message{userMsg("continue open")}})
	if err != nil || res.RunID != "run-open" {
		t.Fatalf("submit %+v %v: thread.open_run_id must win over latest_run()", res, err)
	}
	eventually(t, "dispatched", func() bool { return len(spRuns(r.exec)) > 0 })
	if got := spRuns(r.exec)[0].ContinueRunID; got != "run-open" {
		t.Fatalf("continue_run_id %q", got)
	}
	eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	if run := spLoadRun(t, r, "run-newer-latest"); run.Status != engine.RunWaiting {
		t.Fatalf("the other waiting run was touched: %+v", run)
	}
}

// ---- items 12 and 15: which run a request prepares ----

func TestSeedItem12_run_id_choice(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	// An explicit run id names the new run.
	req := engine.SubmitRequest{ThreadID: "thread-ids", RunIDHint: "run-explicit", Messages: []engine.Message{{ID: "m-explicit", Role: engine.RoleUser, Content: json.RawMessage(`"x"`)}}}
	if runID := spPrepare(t, r.mb, &req); runID != "run-explicit" || req.RunIDHint != "run-explicit" {
		t.Fatalf("run id %q", runID)
	}
	// Explicit message ids are kept (item 13).
	run := spLoadRun(t, r, "run-explicit")
	if run.Request.InputMessageIDs[0] != "m-explicit" {
		t.Fatalf("input ids %v", run.Request.InputMessageIDs)
	}
	if m, _ := r.store.LoadMessage(ctx, "thread-ids", "m-explicit"); m == nil {
		t.Fatal("explicit message id not stored")
	}
	// Blank hints are ignored: a fresh run id.
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-ids", RunIDHint: "   ", ContinueRunID: " ", Messages: []engine.Message{userMsg("y")}})
	if err != nil {
		t.Fatalf("blank hints: %v", err)
	}
	spAssertUUIDv7(t, res.RunID)
	// A decision-only request on an empty thread has no input range.
	dreq := engine.SubmitRequest{ThreadID: "thread-decisions-only", Decisions: []engine.Decision{{CallID: "c1", Resume: json.RawMessage(`{}`)}}}
	runID := spPrepare(t, r.mb, &dreq)
	drun := spLoadRun(t, r, runID)
	if drun.Input == nil || drun.Input.Range != nil || len(drun.Request.InputMessageIDs) != 0 || drun.Request.InputMessageCount != 0 ||
		len(drun.Request.Decisions) != 1 || drun.Request.Decisions[0].CallID != "c1" {
		t.Fatalf("decision-only run %+v / %+v", drun.Input, drun.Request)
	}
}

func TestSeedItem15_existing_run_must_be_open_for_dispatch(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	ctx := context.Background()
	foreign := spRunRecord("run-foreign", "thread-a", engine.RunCreated)
	spCheckpoint(t, r, "thread-a", &foreign, userMsg("a"))
	done := spRunRecord("run-finished", "thread-b", engine.RunDone)
	spCheckpoint(t, r, "thread-b", &done, userMsg("b"))

	_, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-b", RunIDHint: "run-foreign", Messages: []engine.Message{userMsg("x")}})
	if !errors.Is(err, engine.ErrValidation) || !strings.Contains(err.Error(), "run_id 'run-foreign' belongs to thread 'thread-a', not 'thread-b'") {
		t.Fatalf("run of another thread: %v", err)
	}
	_, err = r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-b", ContinueRunID: "run-finished", Messages: []engine.Message{userMsg("x")}})
	if !errors.Is(err, engine.ErrValidation) || !strings.Contains(err.Error(), "run_id 'run-finished' is not open for dispatch") {
		t.Fatalf("done run: %v", err)
	}
	// Refused requests wrote nothing.
	if n, _ := r.store.MessageCount(ctx, "thread-b"); n != 1 {
		t.Fatalf("thread-b has %d messages after refused submits, want 1", n)
	}
	if ds, _ := r.store.ListDispatches(ctx, "thread-b", nil, 0, 0); len(ds) != 0 {
		t.Fatalf("refused submits enqueued %v", ds)
	}
	// A created (prepared, never dispatched) run may be dispatched by id;
	// its status stays created.
	res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-a", RunIDHint: "run-foreign", Messages: []engine.Message{userMsg("go")}})
	if err != nil || res.RunID != "run-foreign" {
		t.Fatalf("dispatch of a created run: %+v %v", res, err)
	}
	if run := spLoadRun(t, r, "run-foreign"); run.Status != engine.RunCreated || run.Input.Range.To != 2 || run.DispatchID != res.DispatchID {
		t.Fatalf("created run after dispatch %+v", run)
	}
}

// ---- project additions ----

// lessons.md B1: concurrent submits on one thread lose no message, and
// each run activates exactly its own message, even while runs of the
// thread checkpoint their own output.
func TestProject_concurrent_submit_background_same_thread_loses_no_message(t *testing.T) {
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		var reply []engine.Message
		for _, m := range req.Messages {
			var s string
			_ = json.Unmarshal(m.Content, &s)
			b, _ := json.Marshal("reply to " + s)
			reply = append(reply, engine.Message{Role: engine.RoleAssistant, Content: b})
		}
		if err := req.Checkpoint(ctx, engine.RunCheckpoint{Messages: reply}); err != nil {
			return engine.RunOutcome{Kind: engine.OutcomeTransient, Error: err.Error()}
		}
		return complete(ctx, req, sink)
	}
	r := newRig(t, newFake(1, script), engine.Config{})
	r.start(t)
	ctx := context.Background()
	const thread, n = "thread-concurrent", 16
	type sub struct {
		res  engine.SubmitResult
		text string
		err  error
	}
	out := make(chan sub, n)
	startGate := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-startGate
			text := fmt.Sprintf("msg-%02d", i)
			res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg(text)}})
			out <- sub{res, text, err}
		}()
	}
	close(startGate)
	wg.Wait()
	close(out)
	byRun := map[string]string{}
	dispatches := map[string]bool{}
	for s := range out {
		if s.err != nil {
			t.Fatalf("submit %s: %v", s.text, s.err)
		}
		if _, dup := byRun[s.res.RunID]; dup || dispatches[s.res.DispatchID] {
			t.Fatalf("two submits share run %s / dispatch %s", s.res.RunID, s.res.DispatchID)
		}
		byRun[s.res.RunID] = `"` + s.text + `"`
		dispatches[s.res.DispatchID] = true
	}
	eventually(t, "all 16 acked", func() bool {
		for id := range dispatches {
			if dispatchStatus(t, r.store, id) != engine.StatusAcked {
				return false
			}
		}
		return true
	})
	msgs, err := r.store.LoadMessages(ctx, thread)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2*n {
		t.Fatalf("thread log has %d messages, want %d (16 submits + 16 replies)", len(msgs), 2*n)
	}
	seen := map[string]int{}
	for i, m := range msgs {
		if m.Seq != uint64(i+1) {
			t.Fatalf("seq gap: record %d has seq %d", i, m.Seq)
		}
		seen[string(m.Message.Content)]++
	}
	for i := range n {
		for _, text := range []string{fmt.Sprintf(`"msg-%02d"`, i), fmt.Sprintf(`"reply to msg-%02d"`, i)} {
			if seen[text] != 1 {
				t.Errorf("%s appears %d times in the log", text, seen[text])
			}
		}
	}
	runs := spRuns(r.exec)
	if len(runs) != n {
		t.Fatalf("executor ran %d runs, want %d", len(runs), n)
	}
	for _, rr := range runs {
		if got := spMsgContents(rr.Messages); len(got) != 1 || got[0] != byRun[rr.RunID] {
			t.Errorf("run %s activated %v, want only its own %s", rr.RunID, got, byRun[rr.RunID])
		}
		run := spLoadRun(t, r, rr.RunID)
		if len(run.Request.InputMessageIDs) != 1 {
			t.Errorf("run %s input ids %v", rr.RunID, run.Request.InputMessageIDs)
			continue
		}
		m, _ := r.store.LoadMessage(ctx, thread, run.Request.InputMessageIDs[0])
		if m == nil || string(m.Message.Content) != byRun[rr.RunID] || run.Input.Range.To < m.Seq {
			t.Errorf("run %s input %+v points at %+v", rr.RunID, run.Input, m)
		}
	}
	if _, _, overlap := r.exec.stats(); overlap {
		t.Fatal("two runs of the thread executed at once")
	}
}

// The same across two mailboxes on one store (two processes): the
// per-process lock does not cover this; the store's count guard does.
func TestProject_concurrent_submits_from_two_mailboxes_lose_no_message(t *testing.T) {
	r := spIdleRig(t, engine.Config{})
	other, err := engine.New(r.store, newFake(0, complete), engine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Stop(context.Background()) })
	ctx := context.Background()
	const thread, n = "thread-two-procs", 16
	var mu sync.Mutex
	byRun := map[string]string{}
	var errs []error
	startGate := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		mb := r.mb
		if i%2 == 1 {
			mb = other
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-startGate
			text := fmt.Sprintf("p-%02d", i)
			res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userMsg(text)}})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", text, err))
				return
			}
			byRun[res.RunID] = `"` + text + `"`
		}()
	}
	close(startGate)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("submits failed: %v", errs)
	}
	msgs, _ := r.store.LoadMessages(ctx, thread)
	seen := map[string]int{}
	for _, m := range msgs {
		seen[string(m.Message.Content)]++
	}
	if len(msgs) != n || len(seen) != n || len(byRun) != n {
		t.Fatalf("log has %d messages (%d distinct), %d runs; want %d of each", len(msgs), len(seen), len(byRun), n)
	}
	ds, _ := r.store.ListDispatches(ctx, thread, nil, 0, 0)
	if len(ds) != n {
		t.Fatalf("%d dispatches, want %d", len(ds), n)
	}
	for i := range ds {
		rr, _, err := r.mb.Reconstruct(ctx, &ds[i])
		if err != nil {
			t.Fatalf("reconstruct %s: %v", ds[i].RunID, err)
		}
		if got := spMsgContents(rr.Messages); len(got) != 1 || got[0] != byRun[ds[i].RunID] {
			t.Errorf("run %s would activate %v, want %s", ds[i].RunID, got, byRun[ds[i].RunID])
		}
	}
}

// ipc.md: the history sent with a run is capped by ContextMessages and
// ContextBytes; FirstSeq and TotalMessages say where it starts and how
// long the log is.
func TestProject_thread_context_is_capped(t *testing.T) {
	ctx := context.Background()
	filler := func(seq, size int) engine.Message {
		b, _ := json.Marshal(fmt.Sprintf("%03d", seq) + strings.Repeat("x", size-5))
		return engine.Message{Role: engine.RoleUser, Content: b} // len(b) == size
	}
	t.Run("by message count", func(t *testing.T) {
		r := spIdleRig(t, engine.Config{ContextMessages: 3})
		for i := 1; i <= 10; i++ {
			spCheckpoint(t, r, "thread-cap", nil, filler(i, 20))
		}
		tc, err := r.mb.ThreadContextOf(ctx, "thread-cap")
		if err != nil {
			t.Fatal(err)
		}
		if len(tc.Messages) != 3 || tc.Messages[0].Seq != 8 || tc.Messages[2].Seq != 10 || tc.FirstSeq != 8 || tc.TotalMessages != 10 {
			t.Fatalf("context: %d messages from seq %d (first_seq %d) of %d", len(tc.Messages), spFirstSeqOf(tc), tc.FirstSeq, tc.TotalMessages)
		}
	})
	t.Run("by bytes", func(t *testing.T) {
		r := spIdleRig(t, engine.Config{ContextBytes: 2500})
		for i := 1; i <= 5; i++ {
			spCheckpoint(t, r, "thread-cap", nil, filler(i, 1000))
		}
		tc, err := r.mb.ThreadContextOf(ctx, "thread-cap")
		if err != nil {
			t.Fatal(err)
		}
		size := 0
		for _, m := range tc.Messages {
			size += len(m.Message.Content)
		}
		if len(tc.Messages) != 2 || tc.Messages[1].Seq != 5 || tc.FirstSeq != 4 || tc.TotalMessages != 5 || size > 2500 {
			t.Fatalf("context: %d messages (%d bytes) from seq %d (first_seq %d) of %d; want the newest 2 within 2500 bytes",
				len(tc.Messages), size, spFirstSeqOf(tc), tc.FirstSeq, tc.TotalMessages)
		}
	})
	t.Run("newest message alone too large", func(t *testing.T) {
		r := spIdleRig(t, engine.Config{ContextBytes: 500})
		spCheckpoint(t, r, "thread-cap", nil, filler(1, 1000))
		tc, err := r.mb.ThreadContextOf(ctx, "thread-cap")
		if err != nil {
			t.Fatal(err)
		}
		if len(tc.Messages) != 0 || tc.FirstSeq != 0 || tc.TotalMessages != 1 {
			t.Fatalf("context %d messages, first_seq %d, total %d; want none of 1", len(tc.Messages), tc.FirstSeq, tc.TotalMessages)
		}
	})
	t.Run("the executor receives the capped context", func(t *testing.T) {
		r := newRig(t, newFake(1, complete), engine.Config{ContextMessages: 2})
		for i := 1; i <= 4; i++ {
			spCheckpoint(t, r, "thread-cap", nil, filler(i, 20))
		}
		r.start(t)
		res, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-cap", Messages: []engine.Message{userMsg("now")}})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
		tc := spRuns(r.exec)[0].Context
		if len(tc.Messages) != 2 || tc.FirstSeq != 4 || tc.TotalMessages != 5 || string(tc.Messages[1].Message.Content) != `"now"` || tc.LatestRun == nil {
			t.Fatalf("run context: %d messages, first_seq %d, total %d", len(tc.Messages), tc.FirstSeq, tc.TotalMessages)
		}
	})
}

func spFirstSeqOf(tc engine.ThreadContext) uint64 {
	if len(tc.Messages) == 0 {
		return 0
	}
	return tc.Messages[0].Seq
}
