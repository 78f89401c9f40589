package storetest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The run-store half of the suite: store.md §1.8–§1.10 and §3, with the
// project decisions recorded on engine.RunStore (guarded appends instead of
// whole-list checkpoints, ListRuns paging order and clamp, LatestRun
// tie-break). Package-level names carry an rs prefix so they cannot clash
// with the dispatch half.

func runCases() []Case {
	return []Case{
		// Run records: create, load, latest (rules 103, 104, 110).
		{"S110_create_run_round_trips_every_field", rsCreateRoundTrip},
		{"S110_create_run_duplicate_id_already_exists", rsCreateDuplicate},
		{"S104_load_run_unknown_is_nil", rsLoadRunUnknown},
		{"S110_create_run_rejects_bad_ids", rsCreateBadIDs},
		{"S20_unknown_run_status_is_validation", rsUnknownRunStatus},
		{"S103_latest_run_greatest_updated_at", rsLatestGreatestUpdated},
		{"S103_latest_run_breaks_ties_deterministically", rsLatestTies},
		{"S103_latest_run_unknown_thread_is_nil", rsLatestUnknown},
		{"S103_latest_run_ignores_other_threads", rsLatestOtherThreads},
		{"S103_latest_run_follows_checkpoint_updates", rsLatestFollowsCheckpoint},

		// ListRuns (rule 107).
		{"S107_list_runs_filters_by_status_and_thread", rsListFilters},
		{"S107_list_runs_orders_by_created_at_then_run_id", rsListOrder},
		{"S107_list_runs_offset_paging_visits_each_once", rsListPaging},
		{"S107_list_runs_clamps_limit", rsListClamp},
		{"S107_list_runs_follows_status_change", rsListStatusChange},

		// Checkpoint (rules 29, 105, 106; lessons B1).
		{"S105_checkpoint_appends_with_sequential_seq", rsCheckpointAppends},
		{"S105_checkpoint_count_mismatch_conflicts_and_writes_nothing", rsCheckpointConflict},
		{"S105_checkpoint_empty_delta_upserts_run_only", rsCheckpointEmptyDelta},
		{"S105_checkpoint_empty_delta_with_stale_count_conflicts", rsCheckpointEmptyDeltaStale},
		{"S105_checkpoint_upserts_whole_run", rsCheckpointUpsertsRun},
		{"S105_checkpoint_rejects_run_of_other_thread", rsCheckpointOtherThreadRun},
		{"S105_checkpoint_duplicate_message_id_already_exists", rsCheckpointDuplicateMessage},
		{"S30_checkpoint_rejects_invalid_messages", rsCheckpointInvalidMessages},
		{"S105_checkpoint_rejects_bad_thread_ids", rsCheckpointBadThreadIDs},
		{"S29_checkpoint_projects_run_status_onto_thread", rsProjection},
		{"S29_checkpoint_inherits_parent_thread_id", rsProjectionParent},
		{"S106_load_thread_unknown_is_nil", rsLoadThreadUnknown},
		{"S106_a_created_run_has_a_thread_projection", rsCreatedRunProjection},
		{"S106_thread_message_count_tracks_log", rsThreadMessageCount},
		{"S105_concurrent_guarded_appends_lose_nothing", rsConcurrentAppends},

		// Message log reads (rules 102, 108, 109).
		{"S102_load_messages_order_and_seq", rsLoadMessagesOrder},
		{"S102_load_messages_unknown_thread_is_empty", rsLoadMessagesUnknown},
		{"S102_message_logs_are_per_thread", rsMessageLogsPerThread},
		{"S108_load_message_by_id", rsLoadMessageByID},
		{"S109_load_message_range_bounds", rsLoadMessageRange},

		// A terminal dispatch settles its run and the thread projection.
		{"S65_cancel_settles_run_and_thread_projection", rsSettleCancel},
		{"S72_interrupt_settles_superseded_run", rsSettleInterrupt},
		{"S59_nack_dead_letter_settles_run_with_error", rsSettleNackDeadLetter},
		{"S57_run_result_settles_run_and_dead_letter_keeps_it", rsSettleDeadLetterRunError},
		{"S65_settlement_skips_done_run_other_thread_and_later_dispatch", rsSettleSkips},
		{"Srequeue_reopens_settled_run", rsRequeueReopens},
		{"Srequeue_keeps_other_runs_in_the_thread_projection", rsRequeueProjection},
	}
}

// ---------------------------------------------------------------------------
// Helpers

const (
	rsSec int64 = 1_700_000_000     // base run timestamp, Unix seconds
	rsMs  int64 = 1_700_000_000_000 // base message / dispatch timestamp, Unix ms
)

func rsRun(id, thread string, status engine.RunStatus, created, updated int64) engine.RunRecord {
	return engine.RunRecord{RunID: id, ThreadID: thread, AgentID: "agent-1", Status: status, CreatedAt: created, UpdatedAt: updated}
}

// rsFullRun sets every field of a run record.
func rsFullRun(id, thread string) engine.RunRecord {
	return engine.RunRecord{
		RunID: id, ThreadID: thread, AgentID: "agent-x", ParentRunID: "run-parent",
		Request: &engine.RunRequestSnapshot{
			Origin: "A2A", SenderID: "sender-1", InputMessageIDs: []string{"m1", "m2"}, InputMessageCount: 2,
			RequestExtras:  json.RawMessage(`{"run_mode":"resume","adapter":"a2a","continue_run_id":"` + id + `"}`),
			Decisions:      []engine.Decision{{CallID: "call-1", Resume: json.RawMessage(`{"action":"approve","payload":{"x":1}}`)}},
			FrontendTools:  json.RawMessage(`[{"name":"pick","schema":{"type":"object"}}]`),
			ParentThreadID: "thread-parent", TransportRequestID: "tr-1",
		},
		Input: &engine.RunMessageInput{
			ThreadID: thread, Range: &engine.SeqRange{From: 1, To: 2},
			TriggerMessageIDs: []string{"m2"}, SelectedMessageIDs: []string{"m1", "m2"},
			ContextPolicy: json.RawMessage(`{"max_tokens":1000}`), CompactedSnapshotID: "snap-1",
		},
		Output:            json.RawMessage(`{"message_ids":["m3"]}`),
		Status:            engine.RunWaiting,
		TerminationReason: &engine.Termination{Type: engine.TermStopped, Value: json.RawMessage(`{"code":"max_steps","detail":"20"}`)},
		FinalOutput:       json.RawMessage(`"partial <b>&</b>"`),
		ErrorPayload:      json.RawMessage(`{"message":"none"}`),
		DispatchID:        "disp-1", SessionID: "sess-1", TransportRequestID: "tr-1",
		Waiting: &engine.RunWaitingState{
			Reason: engine.WaitToolPermission, TicketIDs: []string{"tk-1", "tk-2"},
			Tickets:         json.RawMessage(`[{"id":"tk-1","tool":"rm"},{"id":"tk-2","tool":"mv"}]`),
			SinceDispatchID: "disp-1", Message: "approve rm?",
		},
		Outcome:   json.RawMessage(`{"kind":"suspended"}`),
		CreatedAt: rsSec, StartedAt: rsSec + 1, FinishedAt: rsSec + 2, UpdatedAt: rsSec + 3,
		Steps: 7, InputTokens: 1234, OutputTokens: 567,
		State:      json.RawMessage(`{"nested":{"a":[1,2,{"b":null}],"big":9007199254740993},"unicode":"ünï 字"}`),
		StartCount: 2,
	}
}

func rsMsg(id string) engine.Message {
	return engine.Message{ID: id, Role: engine.RoleUser, Content: json.RawMessage(`[{"type":"text","text":"text of ` + id + `"}]`)}
}

// rsMsgs returns messages prefix-from … prefix-to.
func rsMsgs(prefix string, from, to int) []engine.Message {
	var out []engine.Message
	for i := from; i <= to; i++ {
		out = append(out, rsMsg(fmt.Sprintf("%s%d", prefix, i)))
	}
	return out
}

func rsMsgIDs(msgs []engine.Message) []string {
	ids := make([]string, len(msgs))
	for i, m := range msgs {
		ids[i] = m.ID
	}
	return ids
}

func rsRecIDs(recs []engine.MessageRecord) []string {
	ids := make([]string, len(recs))
	for i, r := range recs {
		ids[i] = r.MessageID
	}
	return ids
}

func rsRunIDs(runs []engine.RunRecord) []string {
	ids := make([]string, len(runs))
	for i, r := range runs {
		ids[i] = r.RunID
	}
	return ids
}

func rsCreate(t *testing.T, s engine.Store, r engine.RunRecord) {
	t.Helper()
	if err := s.CreateRun(t.Context(), r); err != nil {
		t.Fatalf("CreateRun(%s): %v", r.RunID, err)
	}
}

func rsCheckpoint(t *testing.T, s engine.Store, c engine.Checkpoint) []engine.MessageRecord {
	t.Helper()
	recs, err := s.Checkpoint(t.Context(), c)
	if err != nil {
		t.Fatalf("Checkpoint(thread %s, expected %d, %d messages): %v", c.ThreadID, c.ExpectedCount, len(c.Messages), err)
	}
	if len(recs) != len(c.Messages) {
		t.Fatalf("Checkpoint returned %d records for %d messages", len(recs), len(c.Messages))
	}
	return recs
}

// rsPutRun checkpoints run r onto its thread without messages.
func rsPutRun(t *testing.T, s engine.Store, r engine.RunRecord) {
	t.Helper()
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: r.ThreadID, ExpectedCount: rsCount(t, s, r.ThreadID), Run: &r})
}

// rsAppend appends messages to thread at its current count.
func rsAppend(t *testing.T, s engine.Store, thread string, msgs ...engine.Message) []engine.MessageRecord {
	t.Helper()
	return rsCheckpoint(t, s, engine.Checkpoint{ThreadID: thread, ExpectedCount: rsCount(t, s, thread), Messages: msgs, CreatedAt: rsMs})
}

func rsLoadRun(t *testing.T, s engine.Store, id string) *engine.RunRecord {
	t.Helper()
	r, err := s.LoadRun(t.Context(), id)
	if err != nil {
		t.Fatalf("LoadRun(%s): %v", id, err)
	}
	return r
}

func rsMustRun(t *testing.T, s engine.Store, id string) engine.RunRecord {
	t.Helper()
	r := rsLoadRun(t, s, id)
	if r == nil {
		t.Fatalf("LoadRun(%s) = nil, want the run", id)
	}
	return *r
}

func rsNoRun(t *testing.T, s engine.Store, id string) {
	t.Helper()
	if r := rsLoadRun(t, s, id); r != nil {
		t.Errorf("LoadRun(%s) = %+v, want nil", id, *r)
	}
}

func rsLoadThread(t *testing.T, s engine.Store, id string) *engine.Thread {
	t.Helper()
	th, err := s.LoadThread(t.Context(), id)
	if err != nil {
		t.Fatalf("LoadThread(%s): %v", id, err)
	}
	return th
}

func rsCount(t *testing.T, s engine.Store, thread string) uint64 {
	t.Helper()
	n, err := s.MessageCount(t.Context(), thread)
	if err != nil {
		t.Fatalf("MessageCount(%s): %v", thread, err)
	}
	return n
}

func rsMessages(t *testing.T, s engine.Store, thread string) []engine.MessageRecord {
	t.Helper()
	recs, err := s.LoadMessages(t.Context(), thread)
	if err != nil {
		t.Fatalf("LoadMessages(%s): %v", thread, err)
	}
	return recs
}

func rsRange(t *testing.T, s engine.Store, thread string, from, to uint64) []engine.MessageRecord {
	t.Helper()
	recs, err := s.LoadMessageRange(t.Context(), thread, from, to)
	if err != nil {
		t.Fatalf("LoadMessageRange(%s, %d, %d): %v", thread, from, to, err)
	}
	return recs
}

func rsLatest(t *testing.T, s engine.Store, thread string) *engine.RunRecord {
	t.Helper()
	r, err := s.LatestRun(t.Context(), thread)
	if err != nil {
		t.Fatalf("LatestRun(%s): %v", thread, err)
	}
	return r
}

func rsWantLatest(t *testing.T, s engine.Store, thread, want string) {
	t.Helper()
	r := rsLatest(t, s, thread)
	switch {
	case r == nil && want != "":
		t.Errorf("LatestRun(%s) = nil, want %s", thread, want)
	case r != nil && r.RunID != want:
		t.Errorf("LatestRun(%s) = %s (updated %d, created %d), want %q", thread, r.RunID, r.UpdatedAt, r.CreatedAt, want)
	case r != nil && r.ThreadID != thread:
		t.Errorf("LatestRun(%s) returned run %s of thread %s", thread, r.RunID, r.ThreadID)
	}
}

func rsList(t *testing.T, s engine.Store, q engine.RunQuery) engine.RunPage {
	t.Helper()
	p, err := s.ListRuns(t.Context(), q)
	if err != nil {
		t.Fatalf("ListRuns(%+v): %v", q, err)
	}
	return p
}

// rsWantPage checks a page's ids, total and has_more.
func rsWantPage(t *testing.T, q engine.RunQuery, p engine.RunPage, total int, hasMore bool, ids ...string) {
	t.Helper()
	if got := rsRunIDs(p.Items); !slices.Equal(got, ids) {
		t.Errorf("ListRuns(%+v) ids = %v, want %v", q, got, ids)
	}
	if p.Total != total || p.HasMore != hasMore {
		t.Errorf("ListRuns(%+v) total %d has_more %v, want %d %v", q, p.Total, p.HasMore, total, hasMore)
	}
}

func rsWantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: err = %v, want %v", what, err, target)
	}
}

func rsWantConflict(t *testing.T, what string, err error, expected, actual uint64) {
	t.Helper()
	if !errors.Is(err, engine.ErrVersionConflict) {
		t.Errorf("%s: err = %v, want a version conflict", what, err)
		return
	}
	var ce *engine.ConflictError
	if !errors.As(err, &ce) {
		t.Errorf("%s: err = %v (%T), want a *engine.ConflictError", what, err, err)
		return
	}
	if ce.What != "message_count" || ce.Expected != expected || ce.Actual != actual {
		t.Errorf("%s: conflict %+v, want message_count expected %d actual %d", what, *ce, expected, actual)
	}
}

// rsCanon decodes v's JSON into generic values, so two records compare
// equal when they encode the same JSON whatever the raw bytes' spacing.
func rsCanon(t *testing.T, v any) (any, string) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("json.Marshal(%T): %v", v, err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var x any
	if err := dec.Decode(&x); err != nil {
		t.Fatalf("json decode: %v", err)
	}
	return x, string(b)
}

func rsSameJSON(t *testing.T, what string, got, want any) {
	t.Helper()
	g, gs := rsCanon(t, got)
	w, ws := rsCanon(t, want)
	if !reflect.DeepEqual(g, w) {
		t.Errorf("%s differs\n got %s\nwant %s", what, gs, ws)
	}
}

// rsProj is the expected run projection of a thread.
type rsProj struct {
	active, open, latest, parent string
	count                        uint64
}

func rsWantThread(t *testing.T, s engine.Store, id string, want rsProj) {
	t.Helper()
	th := rsLoadThread(t, s, id)
	if th == nil {
		t.Errorf("LoadThread(%s) = nil, want %+v", id, want)
		return
	}
	got := rsProj{th.ActiveRunID, th.OpenRunID, th.LatestRunID, th.ParentThreadID, th.MessageCount}
	if th.ID != id || got != want {
		t.Errorf("LoadThread(%s) = id %q %+v, want %+v", id, th.ID, got, want)
	}
}

// rsWantLog checks the whole log: ids in order with seq 1, 2, …
func rsWantLog(t *testing.T, s engine.Store, thread string, ids ...string) []engine.MessageRecord {
	t.Helper()
	recs := rsMessages(t, s, thread)
	if got := rsRecIDs(recs); !slices.Equal(got, ids) {
		t.Errorf("LoadMessages(%s) ids = %v, want %v", thread, got, ids)
	}
	for i, r := range recs {
		if r.Seq != uint64(i+1) || r.ThreadID != thread || r.Message.ID != r.MessageID {
			t.Errorf("LoadMessages(%s)[%d] = seq %d thread %q message id %q/%q, want seq %d", thread, i, r.Seq, r.ThreadID, r.MessageID, r.Message.ID, i+1)
		}
	}
	if n := rsCount(t, s, thread); n != uint64(len(ids)) {
		t.Errorf("MessageCount(%s) = %d, want %d", thread, n, len(ids))
	}
	return recs
}

func rsParallel(n int, fn func(i int)) {
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { fn(i) })
	}
	wg.Wait()
}

// rsLoadDispatch loads a dispatch that must exist.
func rsLoadDispatch(t *testing.T, s engine.Store, id string) *engine.Dispatch {
	t.Helper()
	d, err := s.LoadDispatch(t.Context(), id)
	if err != nil || d == nil {
		t.Fatalf("LoadDispatch(%s) = %v, %v", id, d, err)
	}
	return d
}

func rsDispatch(id, thread, run string, maxAttempts uint32, now int64) engine.Dispatch {
	return engine.Dispatch{DispatchID: id, ThreadID: thread, RunID: run, Priority: engine.DefaultPriority,
		AvailableAt: now, MaxAttempts: maxAttempts, CreatedAt: now, UpdatedAt: now}
}

func rsEnqueue(t *testing.T, s engine.Store, d engine.Dispatch) engine.Dispatch {
	t.Helper()
	got, err := s.Enqueue(t.Context(), d)
	if err != nil {
		t.Fatalf("Enqueue(%s): %v", d.DispatchID, err)
	}
	return got
}

func rsClaim(t *testing.T, s engine.Store, thread string, now int64) engine.Dispatch {
	t.Helper()
	d, err := s.Claim(t.Context(), thread, "consumer-1", 30*time.Second, now)
	if err != nil || d == nil {
		t.Fatalf("Claim(%s) = %v, %v; want a dispatch", thread, d, err)
	}
	return *d
}

// rsWantSettled checks a run settled by dispatch dispatchID at nowMs.
func rsWantSettled(t *testing.T, s engine.Store, runID, dispatchID string, nowMs int64, term *engine.Termination, errPayload string) engine.RunRecord {
	t.Helper()
	r := rsMustRun(t, s, runID)
	if r.Status != engine.RunDone {
		t.Errorf("run %s status %q, want done", runID, r.Status)
	}
	rsSameJSON(t, "run "+runID+" termination_reason", r.TerminationReason, term)
	if errPayload == "" {
		if len(r.ErrorPayload) != 0 {
			t.Errorf("run %s error_payload %s, want none", runID, r.ErrorPayload)
		}
	} else {
		rsSameJSON(t, "run "+runID+" error_payload", r.ErrorPayload, json.RawMessage(errPayload))
	}
	if r.DispatchID != dispatchID {
		t.Errorf("run %s dispatch_id %q, want %q", runID, r.DispatchID, dispatchID)
	}
	if r.Waiting != nil {
		t.Errorf("run %s still has waiting state %+v", runID, *r.Waiting)
	}
	if r.FinishedAt != nowMs/1000 || r.UpdatedAt != nowMs/1000 {
		t.Errorf("run %s finished_at %d updated_at %d, want %d (Unix seconds)", runID, r.FinishedAt, r.UpdatedAt, nowMs/1000)
	}
	return r
}

// ---------------------------------------------------------------------------
// Run records

func rsCreateRoundTrip(t *testing.T, s engine.Store) {
	full := rsFullRun("run-full", "thread-full")
	rsCreate(t, s, full)
	rsSameJSON(t, "LoadRun(run-full)", rsMustRun(t, s, "run-full"), full)

	// A minimal record keeps its absent fields absent.
	minimal := rsRun("run-min", "thread-min", engine.RunCreated, rsSec, rsSec)
	minimal.AgentID = ""
	rsCreate(t, s, minimal)
	got := rsMustRun(t, s, "run-min")
	rsSameJSON(t, "LoadRun(run-min)", got, minimal)
	if got.Request != nil || got.Input != nil || got.Waiting != nil || got.TerminationReason != nil || got.State != nil {
		t.Errorf("minimal run gained fields: %+v", got)
	}

	// LoadRun is global: the run is found without naming its thread, and a
	// returned record is a copy.
	got = rsMustRun(t, s, "run-full")
	got.Request.InputMessageIDs[0] = "changed"
	got.Waiting.Reason = "changed"
	rsSameJSON(t, "LoadRun(run-full) after mutating an earlier result", rsMustRun(t, s, "run-full"), full)
}

func rsCreateDuplicate(t *testing.T, s engine.Store) {
	orig := rsRun("run-1", "thread-a", engine.RunCreated, rsSec, rsSec)
	rsCreate(t, s, orig)
	dup := rsRun("run-1", "thread-b", engine.RunRunning, rsSec+5, rsSec+5)
	dup.AgentID = "other-agent"
	rsWantErr(t, "CreateRun duplicate", s.CreateRun(t.Context(), dup), engine.ErrAlreadyExists)
	rsSameJSON(t, "run-1 after duplicate create", rsMustRun(t, s, "run-1"), orig)
	rsWantLatest(t, s, "thread-b", "")

	// A run first written by Checkpoint is just as taken.
	viaCk := rsRun("run-2", "thread-a", engine.RunCreated, rsSec, rsSec)
	rsPutRun(t, s, viaCk)
	rsWantErr(t, "CreateRun over a checkpointed run", s.CreateRun(t.Context(), rsRun("run-2", "thread-a", engine.RunDone, rsSec, rsSec+9)), engine.ErrAlreadyExists)
	if r := rsMustRun(t, s, "run-2"); r.Status != engine.RunCreated || r.UpdatedAt != rsSec {
		t.Errorf("run-2 changed by a failed create: %+v", r)
	}
}

func rsLoadRunUnknown(t *testing.T, s engine.Store) {
	rsNoRun(t, s, "run-nope")
	rsCreate(t, s, rsRun("run-1", "thread-a", engine.RunCreated, rsSec, rsSec))
	for _, id := range []string{"run-", "run-10", "run-1 ", "RUN-1", "thread-a"} {
		rsNoRun(t, s, id)
	}
	if r := rsMustRun(t, s, "run-1"); r.RunID != "run-1" {
		t.Errorf("LoadRun(run-1) = %s", r.RunID)
	}
}

func rsCreateBadIDs(t *testing.T, s engine.Store) {
	long := strings.Repeat("x", engine.MaxIDLen+1)
	tests := []struct{ name, run, thread string }{
		{"blank run id", "", "thread-a"},
		{"whitespace run id", "   ", "thread-a"},
		{"long run id", long, "thread-a"},
		{"control char in run id", "run\x00x", "thread-a"},
		{"blank thread id", "run-a", ""},
		{"whitespace thread id", "run-b", " \t"},
		{"long thread id", "run-c", long},
	}
	for _, tt := range tests {
		err := s.CreateRun(t.Context(), rsRun(tt.run, tt.thread, engine.RunCreated, rsSec, rsSec))
		rsWantErr(t, "CreateRun with "+tt.name, err, engine.ErrValidation)
		if strings.TrimSpace(tt.run) != "" && len(tt.run) <= engine.MaxIDLen && !strings.ContainsRune(tt.run, 0) {
			rsNoRun(t, s, tt.run)
		}
	}
	page := rsList(t, s, engine.RunQuery{})
	rsWantPage(t, engine.RunQuery{}, page, 0, false)

	// Exactly MaxIDLen bytes is fine.
	maxID := long[1:]
	rsCreate(t, s, rsRun(maxID, maxID, engine.RunCreated, rsSec, rsSec))
	if r := rsMustRun(t, s, maxID); r.ThreadID != maxID {
		t.Errorf("run with %d-byte ids: thread %q", len(maxID), r.ThreadID)
	}
	rsWantLatest(t, s, maxID, maxID)
}

func rsUnknownRunStatus(t *testing.T, s engine.Store) {
	for i, st := range []engine.RunStatus{"", "finished", "Running", "DONE"} {
		id := fmt.Sprintf("run-%d", i)
		rsWantErr(t, fmt.Sprintf("CreateRun status %q", st), s.CreateRun(t.Context(), rsRun(id, "thread-a", st, rsSec, rsSec)), engine.ErrValidation)
		rsNoRun(t, s, id)

		r := rsRun(id, "thread-b", st, rsSec, rsSec)
		_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: "thread-b", Messages: []engine.Message{rsMsg(id + "-m")}, Run: &r})
		rsWantErr(t, fmt.Sprintf("Checkpoint run status %q", st), err, engine.ErrValidation)
		rsNoRun(t, s, id)
	}
	if n := rsCount(t, s, "thread-b"); n != 0 {
		t.Errorf("rejected checkpoints appended %d messages", n)
	}
	if th := rsLoadThread(t, s, "thread-b"); th != nil {
		t.Errorf("rejected checkpoints created thread %+v", *th)
	}
}

func rsLatestGreatestUpdated(t *testing.T, s engine.Store) {
	const th = "thread-a"
	steps := []struct {
		run              string
		created, updated int64
		want             string
	}{
		{"r-a", 1, 9, "r-a"},
		{"r-b", 2, 10, "r-b"}, // 10 > 9 also when a store compares digits
		{"r-c", 3, 2, "r-b"},
		{"r-d", rsSec, rsSec + 100, "r-d"},
		{"r-e", rsSec + 50, rsSec + 99, "r-d"},  // a later created_at does not beat a greater updated_at
		{"r-0", rsSec - 50, rsSec + 101, "r-0"}, // nor does a smaller run id lose to one
	}
	for _, st := range steps {
		rsCreate(t, s, rsRun(st.run, th, engine.RunRunning, st.created, st.updated))
		rsWantLatest(t, s, th, st.want)
	}
	got := rsLatest(t, s, th)
	if got == nil || got.UpdatedAt != rsSec+101 || got.CreatedAt != rsSec-50 || got.Status != engine.RunRunning {
		t.Errorf("LatestRun returned %+v, want the whole record of r-0", got)
	}
}

func rsLatestTies(t *testing.T, s engine.Store) {
	tests := []struct {
		thread string
		runs   []engine.RunRecord // inserted in this order
		want   string
	}{
		{
			// same updated_at: greatest created_at wins
			thread: "tie-created",
			runs: []engine.RunRecord{
				rsRun("r-1", "tie-created", engine.RunDone, rsSec+5, rsSec+50),
				rsRun("r-2", "tie-created", engine.RunDone, rsSec+7, rsSec+50),
				rsRun("r-3", "tie-created", engine.RunDone, rsSec+6, rsSec+50),
			},
			want: "r-2",
		},
		{
			// same updated_at and created_at: greatest run_id wins,
			// neither the first nor the last inserted
			thread: "tie-id",
			runs: []engine.RunRecord{
				rsRun("r-a", "tie-id", engine.RunDone, rsSec, rsSec+50),
				rsRun("r-c", "tie-id", engine.RunDone, rsSec, rsSec+50),
				rsRun("r-b", "tie-id", engine.RunDone, rsSec, rsSec+50),
			},
			want: "r-c",
		},
		{
			thread: "tie-id-2",
			runs: []engine.RunRecord{
				rsRun("x-10", "tie-id-2", engine.RunDone, rsSec, rsSec),
				rsRun("x-9", "tie-id-2", engine.RunDone, rsSec, rsSec),
				rsRun("x-1", "tie-id-2", engine.RunDone, rsSec, rsSec),
			},
			want: "x-9",
		},
		{
			// created_at decides before run_id
			thread: "tie-mixed",
			runs: []engine.RunRecord{
				rsRun("m-z", "tie-mixed", engine.RunDone, rsSec, rsSec+50),
				rsRun("m-a", "tie-mixed", engine.RunDone, rsSec+1, rsSec+50),
				rsRun("m-y", "tie-mixed", engine.RunDone, rsSec, rsSec+50),
			},
			want: "m-a",
		},
	}
	for _, tt := range tests {
		for _, r := range tt.runs {
			rsCreate(t, s, r)
		}
		// Asked twice: a deterministic answer is the same every time.
		rsWantLatest(t, s, tt.thread, tt.want)
		rsWantLatest(t, s, tt.thread, tt.want)
	}
}

func rsLatestUnknown(t *testing.T, s engine.Store) {
	rsWantLatest(t, s, "thread-nope", "")
	// A thread with messages but no run has no latest run either.
	rsAppend(t, s, "thread-msgs", rsMsg("m1"))
	rsWantLatest(t, s, "thread-msgs", "")
}

func rsLatestOtherThreads(t *testing.T, s engine.Store) {
	// Thread ids that prefix each other or contain separator-like bytes;
	// each thread's own run is the oldest, so a leak shows.
	threads := []string{"pfx", "pfx1", "pfx/1", "pfx:1", "pf", "pfx\u00a0", "PFX"}
	for i, th := range threads {
		rsCreate(t, s, rsRun(fmt.Sprintf("run-%d", i), th, engine.RunRunning, rsSec, rsSec+int64(i)))
	}
	for i, th := range threads {
		rsWantLatest(t, s, th, fmt.Sprintf("run-%d", i))
	}
	rsWantLatest(t, s, "pfx2", "")
	rsWantLatest(t, s, "p", "")
}

func rsLatestFollowsCheckpoint(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r1 := rsRun("run-1", th, engine.RunCreated, rsSec, rsSec+100)
	r2 := rsRun("run-2", th, engine.RunCreated, rsSec+1, rsSec+200)
	rsCreate(t, s, r1)
	rsCreate(t, s, r2)
	rsWantLatest(t, s, th, "run-2")

	r1.Status, r1.UpdatedAt = engine.RunRunning, rsSec+300
	rsPutRun(t, s, r1)
	rsWantLatest(t, s, th, "run-1")
	if got := rsLatest(t, s, th); got != nil && got.Status != engine.RunRunning {
		t.Errorf("LatestRun returned a stale copy of run-1: status %q", got.Status)
	}

	// Moving run-1 back below run-2 must not leave a stale index entry.
	r1.UpdatedAt = rsSec + 150
	rsPutRun(t, s, r1)
	rsWantLatest(t, s, th, "run-2")

	// A brand-new run written by Checkpoint takes over.
	rsPutRun(t, s, rsRun("run-3", th, engine.RunCreated, rsSec+2, rsSec+250))
	rsWantLatest(t, s, th, "run-3")
}

// ---------------------------------------------------------------------------
// ListRuns

// rsFixture stores runs and returns them for computing expectations.
func rsListFixture(t *testing.T, s engine.Store) []engine.RunRecord {
	statuses := []engine.RunStatus{engine.RunCreated, engine.RunRunning, engine.RunWaiting, engine.RunDone}
	threads := []string{"t-a", "t-b", "t-a1"}
	var runs []engine.RunRecord
	for i := range 24 {
		// created_at repeats so that run_id decides some ties; insertion
		// order is scrambled.
		j := (i * 7) % 24
		r := rsRun(fmt.Sprintf("run-%02d", j), threads[j%3], statuses[(j/3)%4], rsSec+int64(j%5), rsSec+int64(j))
		r.Steps = int64(j)
		rsCreate(t, s, r)
		runs = append(runs, r)
	}
	return runs
}

// rsExpect filters and orders runs as ListRuns must.
func rsExpect(runs []engine.RunRecord, status engine.RunStatus, thread string) []engine.RunRecord {
	var out []engine.RunRecord
	for _, r := range runs {
		if (status == "" || r.Status == status) && (thread == "" || r.ThreadID == thread) {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b engine.RunRecord) int {
		if a.CreatedAt != b.CreatedAt {
			if a.CreatedAt < b.CreatedAt {
				return -1
			}
			return 1
		}
		return strings.Compare(a.RunID, b.RunID)
	})
	return out
}

func rsListFilters(t *testing.T, s engine.Store) {
	runs := rsListFixture(t, s)
	queries := []engine.RunQuery{
		{},
		{Status: engine.RunCreated},
		{Status: engine.RunWaiting},
		{Status: engine.RunDone},
		{ThreadID: "t-a"},
		{ThreadID: "t-a1"},
		{ThreadID: "t-b", Status: engine.RunRunning},
		{ThreadID: "t-a", Status: engine.RunWaiting},
		{ThreadID: "t-nope"},
		{ThreadID: "t-", Status: engine.RunDone},
	}
	for _, q := range queries {
		want := rsExpect(runs, q.Status, q.ThreadID)
		p := rsList(t, s, q)
		rsWantPage(t, q, p, len(want), false, rsRunIDs(want)...)
		if len(p.Items) == len(want) {
			for i := range want {
				rsSameJSON(t, fmt.Sprintf("ListRuns(%+v) item %d", q, i), p.Items[i], want[i])
			}
		}
	}
}

func rsListOrder(t *testing.T, s engine.Store) {
	in := []engine.RunRecord{
		rsRun("r-e", "t-1", engine.RunDone, 1_000_000_000_000, 1),
		rsRun("r-b", "t-1", engine.RunDone, 10, 1),
		rsRun("r-d", "t-2", engine.RunDone, 100, 1),
		rsRun("r-a", "t-1", engine.RunDone, 10, 500),
		rsRun("r-z", "t-2", engine.RunDone, 9, 2),
		rsRun("r-c", "t-1", engine.RunDone, 10, 1),
		rsRun("r-0", "t-2", engine.RunDone, 11, 1),
	}
	for _, r := range in {
		rsCreate(t, s, r)
	}
	want := []string{"r-z", "r-a", "r-b", "r-c", "r-0", "r-d", "r-e"}
	q := engine.RunQuery{}
	rsWantPage(t, q, rsList(t, s, q), len(want), false, want...)
	q = engine.RunQuery{Status: engine.RunDone}
	rsWantPage(t, q, rsList(t, s, q), len(want), false, want...)
	q = engine.RunQuery{ThreadID: "t-1"}
	rsWantPage(t, q, rsList(t, s, q), 4, false, "r-a", "r-b", "r-c", "r-e")
	q = engine.RunQuery{ThreadID: "t-2", Status: engine.RunDone}
	rsWantPage(t, q, rsList(t, s, q), 3, false, "r-z", "r-0", "r-d")
}

func rsListPaging(t *testing.T, s engine.Store) {
	runs := rsListFixture(t, s)
	for _, base := range []engine.RunQuery{{}, {Status: engine.RunRunning}, {ThreadID: "t-b"}, {ThreadID: "t-a", Status: engine.RunCreated}} {
		want := rsRunIDs(rsExpect(runs, base.Status, base.ThreadID))
		for _, limit := range []int{1, 2, 5, 7} {
			var got []string
			for page := 0; ; page++ {
				if page > len(want)+1 {
					t.Fatalf("ListRuns(%+v) limit %d: paging does not end", base, limit)
				}
				q := base
				q.Offset, q.Limit = len(got), limit
				p := rsList(t, s, q)
				end := min(len(want), q.Offset+limit)
				rsWantPage(t, q, p, len(want), end < len(want), want[q.Offset:end]...)
				got = append(got, rsRunIDs(p.Items)...)
				if !p.HasMore || len(p.Items) == 0 {
					break
				}
			}
			if !slices.Equal(got, want) {
				t.Errorf("ListRuns(%+v) limit %d visited %v, want %v", base, limit, got, want)
			}
		}
	}
	// An offset past the end: no items, the total still right.
	q := engine.RunQuery{Offset: 24}
	rsWantPage(t, q, rsList(t, s, q), 24, false)
	q = engine.RunQuery{Offset: 1000, Status: engine.RunDone}
	rsWantPage(t, q, rsList(t, s, q), len(rsExpect(runs, engine.RunDone, "")), false)
}

func rsListClamp(t *testing.T, s engine.Store) {
	const n = engine.MaxRunPage + 5
	ids := make([]string, n)
	for i := range n {
		ids[i] = fmt.Sprintf("run-%03d", i)
	}
	rsParallel(8, func(w int) {
		for i := w; i < n; i += 8 {
			if err := s.CreateRun(t.Context(), rsRun(ids[i], "thread-big", engine.RunWaiting, rsSec+int64(i), rsSec+int64(i))); err != nil {
				t.Errorf("CreateRun(%s): %v", ids[i], err)
			}
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	tests := []struct {
		q       engine.RunQuery
		want    []string
		hasMore bool
	}{
		{engine.RunQuery{}, ids[:200], true},
		{engine.RunQuery{Limit: 0, Status: engine.RunWaiting}, ids[:200], true},
		{engine.RunQuery{Limit: 500, ThreadID: "thread-big"}, ids[:200], true},
		{engine.RunQuery{Limit: engine.MaxRunPage + 1}, ids[:200], true},
		{engine.RunQuery{Limit: engine.MaxRunPage}, ids[:200], true},
		{engine.RunQuery{Limit: 1}, ids[:1], true},
		{engine.RunQuery{Limit: 1, Offset: n - 1}, ids[n-1:], false},
		{engine.RunQuery{Limit: 500, Offset: 200}, ids[200:], false},
		{engine.RunQuery{Offset: 3}, ids[3:203], true},
		{engine.RunQuery{Offset: 5}, ids[5:205], false},
	}
	for _, tt := range tests {
		rsWantPage(t, tt.q, rsList(t, s, tt.q), n, tt.hasMore, tt.want...)
	}
}

func rsListStatusChange(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r1 := rsRun("run-1", th, engine.RunCreated, rsSec, rsSec)
	r2 := rsRun("run-2", th, engine.RunCreated, rsSec+1, rsSec+1)
	rsCreate(t, s, r1)
	rsCreate(t, s, r2)
	want := func(status engine.RunStatus, ids ...string) {
		t.Helper()
		q := engine.RunQuery{Status: status}
		p := rsList(t, s, q)
		rsWantPage(t, q, p, len(ids), false, ids...)
		for _, r := range p.Items {
			if r.Status != status {
				t.Errorf("ListRuns(%s) returned run %s with status %q", status, r.RunID, r.Status)
			}
		}
	}
	want(engine.RunCreated, "run-1", "run-2")
	want(engine.RunRunning)

	for _, st := range []engine.RunStatus{engine.RunRunning, engine.RunWaiting, engine.RunRunning, engine.RunDone} {
		r1.Status = st
		r1.UpdatedAt++
		rsPutRun(t, s, r1)
		for _, other := range []engine.RunStatus{engine.RunCreated, engine.RunRunning, engine.RunWaiting, engine.RunDone} {
			switch other {
			case st:
				want(other, "run-1")
			case engine.RunCreated:
				want(other, "run-2")
			default:
				want(other)
			}
		}
		q := engine.RunQuery{ThreadID: th}
		rsWantPage(t, q, rsList(t, s, q), 2, false, "run-1", "run-2")
	}
}

// ---------------------------------------------------------------------------
// Checkpoint

func rsCheckpointAppends(t *testing.T, s engine.Store) {
	const th = "thread-a"
	batches := []struct {
		msgs  []engine.Message
		runID string
		at    int64
	}{
		{rsMsgs("m", 1, 3), "run-1", rsMs + 1},
		{rsMsgs("m", 4, 4), "", rsMs + 2},
		{rsMsgs("m", 5, 11), "run-2", rsMs + 3},
	}
	var count uint64
	var all []engine.MessageRecord
	for _, b := range batches {
		recs := rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: count, Messages: b.msgs, ProducedByRunID: b.runID, CreatedAt: b.at})
		for i, r := range recs {
			want := engine.MessageRecord{MessageID: b.msgs[i].ID, ThreadID: th, Seq: count + uint64(i) + 1, Message: b.msgs[i], ProducedByRunID: b.runID, CreatedAt: b.at}
			if r.MessageID != want.MessageID || r.ThreadID != th || r.Seq != want.Seq || r.ProducedByRunID != b.runID || r.CreatedAt != b.at {
				t.Errorf("Checkpoint record %d = %v run %q at %d, want %v run %q at %d", i, r, r.ProducedByRunID, r.CreatedAt, want, b.runID, b.at)
			}
			rsSameJSON(t, "returned message "+r.MessageID, r.Message, b.msgs[i])
		}
		count += uint64(len(b.msgs))
		all = append(all, recs...)
		if n := rsCount(t, s, th); n != count {
			t.Errorf("MessageCount = %d, want %d", n, count)
		}
	}
	log := rsWantLog(t, s, th, rsRecIDs(all)...)
	if len(log) == len(all) {
		for i := range all {
			rsSameJSON(t, fmt.Sprintf("LoadMessages[%d]", i), log[i], all[i])
		}
	}
}

func rsCheckpointConflict(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r1 := rsRun("run-1", th, engine.RunCreated, rsSec, rsSec)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, Messages: rsMsgs("m", 1, 2), Run: &r1, CreatedAt: rsMs})
	threadBefore := rsLoadThread(t, s, th)
	logBefore := rsMessages(t, s, th)

	r1Next := r1
	r1Next.Status, r1Next.UpdatedAt = engine.RunRunning, rsSec+10
	r2 := rsRun("run-2", th, engine.RunRunning, rsSec+1, rsSec+10)
	for _, tt := range []struct {
		expected uint64
		run      *engine.RunRecord
	}{
		{0, &r1Next}, {1, &r2}, {3, &r1Next}, {100, nil},
	} {
		recs, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: th, ExpectedCount: tt.expected, Messages: []engine.Message{rsMsg("m-new")}, Run: tt.run, CreatedAt: rsMs + 1})
		rsWantConflict(t, fmt.Sprintf("Checkpoint expecting %d of 2", tt.expected), err, tt.expected, 2)
		if len(recs) != 0 {
			t.Errorf("failed Checkpoint returned records %v", recs)
		}
	}
	// Nothing was written: log, run, new run, projection.
	rsSameJSON(t, "log after conflicts", rsMessages(t, s, th), logBefore)
	if m, err := s.LoadMessage(t.Context(), th, "m-new"); err != nil || m != nil {
		t.Errorf("LoadMessage(m-new) = %v, %v; want nil", m, err)
	}
	rsSameJSON(t, "run-1 after conflicts", rsMustRun(t, s, "run-1"), r1)
	rsNoRun(t, s, "run-2")
	rsSameJSON(t, "thread after conflicts", rsLoadThread(t, s, th), threadBefore)
	rsWantLatest(t, s, th, "run-1")

	// An unknown thread has count 0.
	r3 := rsRun("run-3", "thread-new", engine.RunCreated, rsSec, rsSec)
	_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: "thread-new", ExpectedCount: 1, Messages: rsMsgs("n", 1, 1), Run: &r3})
	rsWantConflict(t, "Checkpoint expecting 1 on an unknown thread", err, 1, 0)
	if th := rsLoadThread(t, s, "thread-new"); th != nil {
		t.Errorf("conflicting checkpoint created thread %+v", *th)
	}
	rsNoRun(t, s, "run-3")
	rsWantLog(t, s, "thread-new")

	// The right count still succeeds afterwards.
	recs := rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: 2, Messages: []engine.Message{rsMsg("m-new")}, Run: &r1Next})
	if recs[0].Seq != 3 {
		t.Errorf("seq after conflicts = %d, want 3", recs[0].Seq)
	}
}

func rsCheckpointEmptyDelta(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r1 := rsRun("run-1", th, engine.RunRunning, rsSec, rsSec)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, Messages: rsMsgs("m", 1, 3), Run: &r1, CreatedAt: rsMs})
	logBefore := rsMessages(t, s, th)

	r1.Status, r1.UpdatedAt = engine.RunDone, rsSec+5
	r1.TerminationReason = &engine.Termination{Type: engine.TermNaturalEnd}
	recs, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: th, ExpectedCount: 3, Run: &r1})
	if err != nil || len(recs) != 0 {
		t.Fatalf("empty-delta Checkpoint = %v, %v; want no records, nil", recs, err)
	}
	rsSameJSON(t, "run-1 after empty delta", rsMustRun(t, s, "run-1"), r1)
	rsSameJSON(t, "log after empty delta", rsMessages(t, s, th), logBefore)
	rsWantThread(t, s, th, rsProj{latest: "run-1", count: 3})

	// An empty delta with a run on a new thread creates the thread.
	r2 := rsRun("run-2", "thread-b", engine.RunCreated, rsSec, rsSec)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: "thread-b", Messages: []engine.Message{}, Run: &r2})
	rsWantThread(t, s, "thread-b", rsProj{open: "run-2", latest: "run-2"})
	rsWantLog(t, s, "thread-b")
}

func rsCheckpointEmptyDeltaStale(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r1 := rsRun("run-1", th, engine.RunRunning, rsSec, rsSec)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, Messages: rsMsgs("m", 1, 3), Run: &r1})
	before := rsLoadThread(t, s, th)

	done := r1
	done.Status, done.UpdatedAt = engine.RunDone, rsSec+5
	_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: th, ExpectedCount: 2, Run: &done})
	rsWantConflict(t, "empty-delta Checkpoint with a stale count", err, 2, 3)
	rsSameJSON(t, "run-1 after stale empty delta", rsMustRun(t, s, "run-1"), r1)
	rsSameJSON(t, "thread after stale empty delta", rsLoadThread(t, s, th), before)
}

func rsCheckpointUpsertsRun(t *testing.T, s engine.Store) {
	const th = "thread-full"
	full := rsFullRun("run-1", th)
	rsCreate(t, s, full)

	// The checkpointed record replaces the stored one; fields it leaves
	// out are gone, not merged — except start_count, which no write
	// lowers.
	next := rsRun("run-1", th, engine.RunRunning, full.CreatedAt, full.UpdatedAt+10)
	next.Steps, next.State = 8, json.RawMessage(`{"v":2}`)
	rsPutRun(t, s, next)
	next.StartCount = full.StartCount
	rsSameJSON(t, "run-1 after checkpoint", rsMustRun(t, s, "run-1"), next)

	// A new run is inserted and is then a duplicate for CreateRun.
	r2 := rsFullRun("run-2", th)
	r2.Status = engine.RunCreated
	rsPutRun(t, s, r2)
	rsSameJSON(t, "run-2 after checkpoint", rsMustRun(t, s, "run-2"), r2)
	rsWantErr(t, "CreateRun(run-2)", s.CreateRun(t.Context(), r2), engine.ErrAlreadyExists)
}

func rsCheckpointOtherThreadRun(t *testing.T, s engine.Store) {
	rb := rsRun("run-b", "thread-b", engine.RunRunning, rsSec, rsSec)
	_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: "thread-a", Messages: rsMsgs("m", 1, 2), Run: &rb})
	rsWantErr(t, "Checkpoint of thread-a with a run of thread-b", err, engine.ErrValidation)
	rsNoRun(t, s, "run-b")
	rsWantLog(t, s, "thread-a")
	for _, th := range []string{"thread-a", "thread-b"} {
		if got := rsLoadThread(t, s, th); got != nil {
			t.Errorf("rejected checkpoint wrote thread %+v", *got)
		}
	}

	// The same on an existing thread leaves it as it was.
	ra := rsRun("run-a", "thread-a", engine.RunRunning, rsSec, rsSec)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: "thread-a", Messages: rsMsgs("m", 1, 1), Run: &ra})
	_, err = s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: "thread-a", ExpectedCount: 1, Messages: rsMsgs("m", 2, 2), Run: &rb})
	rsWantErr(t, "second Checkpoint with a run of thread-b", err, engine.ErrValidation)
	rsWantLog(t, s, "thread-a", "m1")
	rsWantThread(t, s, "thread-a", rsProj{active: "run-a", open: "run-a", latest: "run-a", count: 1})
	rsNoRun(t, s, "run-b")
}

func rsCheckpointDuplicateMessage(t *testing.T, s engine.Store) {
	const th = "thread-a"
	rsAppend(t, s, th, rsMsgs("m", 1, 2)...)
	r1 := rsRun("run-1", th, engine.RunRunning, rsSec, rsSec)

	// Against the log.
	_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: th, ExpectedCount: 2, Messages: []engine.Message{rsMsg("m3"), rsMsg("m1")}, Run: &r1})
	rsWantErr(t, "Checkpoint repeating m1", err, engine.ErrAlreadyExists)
	// Within one batch.
	_, err = s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: th, ExpectedCount: 2, Messages: []engine.Message{rsMsg("m4"), rsMsg("m4")}, Run: &r1})
	if !errors.Is(err, engine.ErrAlreadyExists) && !errors.Is(err, engine.ErrValidation) {
		t.Errorf("Checkpoint with m4 twice: err = %v, want ErrAlreadyExists (or ErrValidation)", err)
	}
	rsWantLog(t, s, th, "m1", "m2")
	for _, id := range []string{"m3", "m4"} {
		if m, err := s.LoadMessage(t.Context(), th, id); err != nil || m != nil {
			t.Errorf("LoadMessage(%s) = %v, %v; want nil", id, m, err)
		}
	}
	rsNoRun(t, s, "run-1")
	rsWantThread(t, s, th, rsProj{count: 2})

	// Message ids are scoped to their thread.
	recs := rsAppend(t, s, "thread-b", rsMsg("m1"))
	if recs[0].Seq != 1 || recs[0].ThreadID != "thread-b" {
		t.Errorf("m1 on thread-b = %v", recs[0])
	}
	if m, err := s.LoadMessage(t.Context(), th, "m1"); err != nil || m == nil || m.ThreadID != th || m.Seq != 1 {
		t.Errorf("LoadMessage(thread-a, m1) = %v, %v after thread-b reused the id", m, err)
	}
}

func rsCheckpointInvalidMessages(t *testing.T, s engine.Store) {
	const th = "thread-a"
	rsAppend(t, s, th, rsMsg("m1"))
	long := strings.Repeat("m", engine.MaxIDLen+1)
	bad := []struct {
		name string
		msg  engine.Message
	}{
		{"blank id", engine.Message{Role: engine.RoleUser}},
		{"whitespace id", engine.Message{ID: "  ", Role: engine.RoleUser}},
		{"long id", engine.Message{ID: long, Role: engine.RoleUser}},
		{"control char in id", engine.Message{ID: "m\nx", Role: engine.RoleUser}},
		{"empty role", engine.Message{ID: "m-x"}},
		{"unknown role", engine.Message{ID: "m-x", Role: "robot"}},
		{"unknown visibility", engine.Message{ID: "m-x", Role: engine.RoleUser, Visibility: "secret"}},
	}
	for _, tt := range bad {
		r := rsRun("run-x", th, engine.RunRunning, rsSec, rsSec)
		_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: th, ExpectedCount: 1, Messages: []engine.Message{rsMsg("m2"), tt.msg}, Run: &r})
		rsWantErr(t, "Checkpoint with a message with "+tt.name, err, engine.ErrValidation)
	}
	rsWantLog(t, s, th, "m1")
	rsNoRun(t, s, "run-x")

	// Every role, both visibilities and an id of exactly MaxIDLen bytes.
	good := []engine.Message{
		{ID: "s1", Role: engine.RoleSystem, Content: json.RawMessage(`[{"type":"text","text":"sys"}]`)},
		{ID: "a1", Role: engine.RoleAssistant, ToolCalls: json.RawMessage(`[{"id":"c1","name":"ls","arguments":{}}]`), Visibility: "internal"},
		{ID: "t1", Role: engine.RoleTool, ToolCallID: "c1", Content: json.RawMessage(`[{"type":"text","text":"out"}]`), Metadata: json.RawMessage(`{"k":"v"}`)},
		{ID: long[1:], Role: engine.RoleUser, Visibility: "all"},
	}
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: 1, Messages: good})
	recs := rsWantLog(t, s, th, "m1", "s1", "a1", "t1", long[1:])
	if len(recs) == 5 {
		for i, m := range good {
			rsSameJSON(t, "stored "+m.ID[:2], recs[i+1].Message, m)
		}
	}
}

func rsCheckpointBadThreadIDs(t *testing.T, s engine.Store) {
	long := strings.Repeat("t", engine.MaxIDLen+1)
	for _, id := range []string{"", "   ", long, "t\x00x"} {
		_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: id, Messages: rsMsgs("m", 1, 1)})
		rsWantErr(t, fmt.Sprintf("Checkpoint to thread %.12q (%d bytes)", id, len(id)), err, engine.ErrValidation)
		r := rsRun("run-1", id, engine.RunCreated, rsSec, rsSec)
		_, err = s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: id, Run: &r})
		rsWantErr(t, fmt.Sprintf("run-only Checkpoint to thread %.12q (%d bytes)", id, len(id)), err, engine.ErrValidation)
	}
	rsNoRun(t, s, "run-1")
	// A blank run id in an otherwise good checkpoint.
	r := rsRun(" ", "thread-a", engine.RunCreated, rsSec, rsSec)
	_, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: "thread-a", Messages: rsMsgs("m", 1, 1), Run: &r})
	rsWantErr(t, "Checkpoint with a blank run id", err, engine.ErrValidation)
	rsWantLog(t, s, "thread-a")

	maxID := long[1:]
	r = rsRun("run-2", maxID, engine.RunCreated, rsSec, rsSec)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: maxID, Messages: rsMsgs("m", 1, 2), Run: &r})
	rsWantLog(t, s, maxID, "m1", "m2")
	rsWantThread(t, s, maxID, rsProj{open: "run-2", latest: "run-2", count: 2})
}

func rsProjection(t *testing.T, s engine.Store) {
	const th = "thread-a"
	steps := []struct {
		run    string
		status engine.RunStatus
		msgs   int // messages appended in the same checkpoint
		want   rsProj
	}{
		{"run-1", engine.RunCreated, 1, rsProj{open: "run-1", latest: "run-1"}},
		{"run-1", engine.RunRunning, 2, rsProj{active: "run-1", open: "run-1", latest: "run-1"}},
		{"run-1", engine.RunWaiting, 0, rsProj{open: "run-1", latest: "run-1"}},
		{"run-1", engine.RunRunning, 1, rsProj{active: "run-1", open: "run-1", latest: "run-1"}},
		{"run-1", engine.RunDone, 1, rsProj{latest: "run-1"}},
		{"run-2", engine.RunCreated, 1, rsProj{open: "run-2", latest: "run-2"}},
		{"run-3", engine.RunRunning, 0, rsProj{active: "run-3", open: "run-3", latest: "run-3"}},
		// done of a run the pointers no longer name: only latest moves
		{"run-2", engine.RunDone, 0, rsProj{active: "run-3", open: "run-3", latest: "run-2"}},
		{"run-3", engine.RunWaiting, 1, rsProj{open: "run-3", latest: "run-3"}},
		{"run-4", engine.RunCreated, 0, rsProj{open: "run-4", latest: "run-4"}},
		// done of run-3 while run-4 is open keeps run-4 open
		{"run-3", engine.RunDone, 0, rsProj{open: "run-4", latest: "run-3"}},
		{"run-4", engine.RunRunning, 0, rsProj{active: "run-4", open: "run-4", latest: "run-4"}},
		{"run-4", engine.RunDone, 2, rsProj{latest: "run-4"}},
	}
	var count uint64
	for i, st := range steps {
		r := rsRun(st.run, th, st.status, rsSec, rsSec+int64(i))
		msgs := rsMsgs(fmt.Sprintf("s%d-", i), 1, st.msgs)
		rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: count, Messages: msgs, ProducedByRunID: st.run, Run: &r})
		count += uint64(st.msgs)
		want := st.want
		want.count = count
		rsWantThread(t, s, th, want)
		if t.Failed() {
			t.Fatalf("after step %d (%s %s)", i, st.run, st.status)
		}
	}
	// Messages-only checkpoints leave the run pointers alone.
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: count, Messages: rsMsgs("tail-", 1, 1)})
	rsWantThread(t, s, th, rsProj{latest: "run-4", count: count + 1})
}

func rsProjectionParent(t *testing.T, s engine.Store) {
	// Parents exist, in case a store checks the hierarchy.
	rsAppend(t, s, "parent-a", rsMsg("p1"))
	rsAppend(t, s, "parent-b", rsMsg("p1"))
	withParent := func(id, thread, parent string) engine.RunRecord {
		r := rsRun(id, thread, engine.RunCreated, rsSec, rsSec)
		r.Request = &engine.RunRequestSnapshot{Origin: "User", ParentThreadID: parent}
		return r
	}

	// Inherited from the first run's request, then kept.
	rsPutRun(t, s, withParent("run-1", "child-1", "parent-a"))
	rsWantThread(t, s, "child-1", rsProj{open: "run-1", latest: "run-1", parent: "parent-a"})
	rsPutRun(t, s, withParent("run-2", "child-1", "parent-b"))
	rsWantThread(t, s, "child-1", rsProj{open: "run-2", latest: "run-2", parent: "parent-a"})
	r3 := rsRun("run-3", "child-1", engine.RunRunning, rsSec, rsSec)
	rsPutRun(t, s, r3)
	rsWantThread(t, s, "child-1", rsProj{active: "run-3", open: "run-3", latest: "run-3", parent: "parent-a"})

	// A thread that began without a parent takes one from a later run.
	rsAppend(t, s, "child-2", rsMsg("c1"))
	rsPutRun(t, s, rsRun("run-4", "child-2", engine.RunCreated, rsSec, rsSec))
	rsPutRun(t, s, withParent("run-5", "child-2", ""))
	rsWantThread(t, s, "child-2", rsProj{open: "run-5", latest: "run-5", count: 1})
	rsPutRun(t, s, withParent("run-6", "child-2", "parent-b"))
	rsWantThread(t, s, "child-2", rsProj{open: "run-6", latest: "run-6", parent: "parent-b", count: 1})

	// Parents themselves stay parentless.
	rsWantThread(t, s, "parent-a", rsProj{count: 1})
}

// rsCreatedRunProjection: a run written by CreateRun alone, without a
// checkpoint, gives its thread a projection naming it (the engine reads
// a thread without a projection as a thread without runs).
func rsCreatedRunProjection(t *testing.T, s engine.Store) {
	rsCreate(t, s, rsRun("run-1", "thread-c", engine.RunCreated, rsSec, rsSec))
	rsWantThread(t, s, "thread-c", rsProj{open: "run-1", latest: "run-1"})
}

func rsLoadThreadUnknown(t *testing.T, s engine.Store) {
	if th := rsLoadThread(t, s, "thread-nope"); th != nil {
		t.Errorf("LoadThread(thread-nope) = %+v, want nil", *th)
	}
	rsAppend(t, s, "th-1", rsMsg("m1"))
	for _, id := range []string{"th-", "th-10", "th", "TH-1"} {
		if th := rsLoadThread(t, s, id); th != nil {
			t.Errorf("LoadThread(%s) = %+v, want nil", id, *th)
		}
	}
	rsWantThread(t, s, "th-1", rsProj{count: 1})
}

func rsThreadMessageCount(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r := rsRun("run-1", th, engine.RunRunning, rsSec, rsSec)
	steps := []struct {
		n   int
		run bool
	}{{2, false}, {0, true}, {3, true}, {1, false}, {0, true}, {5, true}}
	var count uint64
	var ids []string
	for i, st := range steps {
		msgs := rsMsgs(fmt.Sprintf("s%d-", i), 1, st.n)
		c := engine.Checkpoint{ThreadID: th, ExpectedCount: count, Messages: msgs}
		if st.run {
			r.UpdatedAt++
			c.Run = &r
		}
		rsCheckpoint(t, s, c)
		count += uint64(st.n)
		ids = append(ids, rsMsgIDs(msgs)...)
		want := rsProj{count: count}
		if i >= 1 {
			want.active, want.open, want.latest = "run-1", "run-1", "run-1"
		}
		rsWantThread(t, s, th, want)
		rsWantLog(t, s, th, ids...)
	}
}

func rsConcurrentAppends(t *testing.T, s engine.Store) {
	const (
		th      = "thread-hot"
		writers = 16
		per     = 20
	)
	var conflicts sync.Map
	rsParallel(writers, func(w int) {
		for i := range per {
			id := fmt.Sprintf("w%02d-m%02d", w, i)
			for attempt := 0; ; attempt++ {
				if attempt > 10_000 {
					t.Errorf("%s: no success after %d attempts", id, attempt)
					return
				}
				n, err := s.MessageCount(t.Context(), th)
				if err != nil {
					t.Errorf("MessageCount: %v", err)
					return
				}
				recs, err := s.Checkpoint(t.Context(), engine.Checkpoint{ThreadID: th, ExpectedCount: n, Messages: []engine.Message{rsMsg(id)}, CreatedAt: rsMs})
				if errors.Is(err, engine.ErrVersionConflict) {
					var ce *engine.ConflictError
					if !errors.As(err, &ce) || ce.Expected != n || ce.Actual <= n {
						t.Errorf("%s: conflict %v, want a *ConflictError with expected %d < actual", id, err, n)
						return
					}
					conflicts.Store(id, true)
					continue
				}
				if err != nil {
					t.Errorf("Checkpoint(%s): %v", id, err)
					return
				}
				if len(recs) != 1 || recs[0].Seq != n+1 || recs[0].MessageID != id {
					t.Errorf("Checkpoint(%s) expecting %d returned %v, want seq %d", id, n, recs, n+1)
				}
				break
			}
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	recs := rsMessages(t, s, th)
	if len(recs) != writers*per {
		t.Fatalf("LoadMessages has %d messages, want %d", len(recs), writers*per)
	}
	seen := map[string]int{}
	next := make([]int, writers) // each writer's messages stay in its order
	for i, r := range recs {
		if r.Seq != uint64(i+1) {
			t.Errorf("record %d has seq %d", i, r.Seq)
		}
		seen[r.MessageID]++
		var w, k int
		if _, err := fmt.Sscanf(r.MessageID, "w%02d-m%02d", &w, &k); err != nil || w >= writers {
			t.Errorf("unexpected message id %q", r.MessageID)
			continue
		}
		if k != next[w] {
			t.Errorf("writer %d: message %d at seq %d, want message %d next", w, k, r.Seq, next[w])
		}
		next[w] = k + 1
	}
	for w := range writers {
		for i := range per {
			if id := fmt.Sprintf("w%02d-m%02d", w, i); seen[id] != 1 {
				t.Errorf("message %s appears %d times", id, seen[id])
			}
		}
	}
	if n := rsCount(t, s, th); n != writers*per {
		t.Errorf("MessageCount = %d, want %d", n, writers*per)
	}
	rsWantThread(t, s, th, rsProj{count: writers * per})
	n := 0
	conflicts.Range(func(any, any) bool { n++; return true })
	t.Logf("%d of %d appends met at least one conflict", n, writers*per)
}

// ---------------------------------------------------------------------------
// Message log reads

func rsLoadMessagesOrder(t *testing.T, s engine.Store) {
	const th = "thread-a"
	msgs := []engine.Message{
		{ID: "0190-z", Role: engine.RoleSystem, Content: json.RawMessage(`[{"type":"text","text":"be brief"}]`)},
		{ID: "0190-a", Role: engine.RoleUser, Content: json.RawMessage(`[{"type":"text","text":"hi <there> & \"you\""}]`), Metadata: json.RawMessage(`{"lang":"en"}`)},
		{ID: "0190-m", Role: engine.RoleAssistant, ToolCalls: json.RawMessage(`[{"id":"c1","name":"ls","arguments":{"dir":"/"}}]`), Visibility: "internal"},
		{ID: "0190-b", Role: engine.RoleTool, ToolCallID: "c1", Content: json.RawMessage(`[{"type":"text","text":"a b c"}]`)},
	}
	msgs = append(msgs, rsMsgs("x", 1, 9)...) // 13 in all: seq 9 < 10 < 13 must sort numerically
	var want []engine.MessageRecord
	for _, b := range [][2]int{{0, 1}, {1, 4}, {4, 13}} {
		runID, at := fmt.Sprintf("run-%d", b[0]), rsMs+int64(b[0])
		rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: uint64(b[0]), Messages: msgs[b[0]:b[1]], ProducedByRunID: runID, CreatedAt: at})
		for i, m := range msgs[b[0]:b[1]] {
			want = append(want, engine.MessageRecord{MessageID: m.ID, ThreadID: th, Seq: uint64(b[0] + i + 1), Message: m, ProducedByRunID: runID, CreatedAt: at})
		}
	}
	got := rsWantLog(t, s, th, rsMsgIDs(msgs)...)
	if len(got) == len(want) {
		for i := range want {
			// tool_call_id of the record is the store's to derive; every
			// other field must come back as given.
			g := got[i]
			g.ToolCallID = ""
			rsSameJSON(t, fmt.Sprintf("record seq %d", i+1), g, want[i])
		}
	}
}

func rsLoadMessagesUnknown(t *testing.T, s engine.Store) {
	for _, th := range []string{"thread-nope", "thread-empty"} {
		if th == "thread-empty" {
			// A thread with a run but no messages.
			rsPutRun(t, s, rsRun("run-1", th, engine.RunCreated, rsSec, rsSec))
		}
		if recs := rsMessages(t, s, th); len(recs) != 0 {
			t.Errorf("LoadMessages(%s) = %v, want empty", th, recs)
		}
		if n := rsCount(t, s, th); n != 0 {
			t.Errorf("MessageCount(%s) = %d, want 0", th, n)
		}
		if recs := rsRange(t, s, th, 1, 10); len(recs) != 0 {
			t.Errorf("LoadMessageRange(%s, 1, 10) = %v, want empty", th, recs)
		}
		if m, err := s.LoadMessage(t.Context(), th, "m1"); err != nil || m != nil {
			t.Errorf("LoadMessage(%s, m1) = %v, %v; want nil, nil", th, m, err)
		}
	}
}

func rsMessageLogsPerThread(t *testing.T, s engine.Store) {
	threads := []string{"t", "t1", "t/1", "t:1", "t-", "tt"}
	for i, th := range threads {
		rsAppend(t, s, th, rsMsgs(fmt.Sprintf("%d-", i), 1, i+1)...)
	}
	for i, th := range threads {
		rsWantLog(t, s, th, rsMsgIDs(rsMsgs(fmt.Sprintf("%d-", i), 1, i+1))...)
		if recs := rsRange(t, s, th, 1, 100); len(recs) != i+1 {
			t.Errorf("LoadMessageRange(%s, 1, 100) has %d records, want %d", th, len(recs), i+1)
		}
		rsWantThread(t, s, th, rsProj{count: uint64(i + 1)})
	}
	rsWantLog(t, s, "t2")
}

func rsLoadMessageByID(t *testing.T, s engine.Store) {
	const th = "thread-a"
	msgs := rsMsgs("m", 1, 12)
	msgs[1].Metadata = json.RawMessage(`{"pinned":true}`)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, Messages: msgs[:5], ProducedByRunID: "run-1", CreatedAt: rsMs})
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: 5, Messages: msgs[5:], ProducedByRunID: "run-2", CreatedAt: rsMs + 1})
	rsAppend(t, s, "thread-b", rsMsg("b1"))

	for i, m := range msgs {
		rec, err := s.LoadMessage(t.Context(), th, m.ID)
		if err != nil || rec == nil {
			t.Errorf("LoadMessage(%s) = %v, %v", m.ID, rec, err)
			continue
		}
		wantRun, wantAt := "run-1", rsMs
		if i >= 5 {
			wantRun, wantAt = "run-2", rsMs+1
		}
		if rec.MessageID != m.ID || rec.ThreadID != th || rec.Seq != uint64(i+1) || rec.ProducedByRunID != wantRun || rec.CreatedAt != wantAt {
			t.Errorf("LoadMessage(%s) = %v run %q at %d, want seq %d run %q at %d", m.ID, rec, rec.ProducedByRunID, rec.CreatedAt, i+1, wantRun, wantAt)
		}
		rsSameJSON(t, "LoadMessage("+m.ID+").Message", rec.Message, m)
	}
	for _, q := range []struct{ thread, id string }{
		{th, "m"}, {th, "m13"}, {th, "m1 "}, {th, "b1"}, {"thread-b", "m1"}, {"thread-nope", "m1"},
	} {
		if rec, err := s.LoadMessage(t.Context(), q.thread, q.id); err != nil || rec != nil {
			t.Errorf("LoadMessage(%s, %s) = %v, %v; want nil, nil", q.thread, q.id, rec, err)
		}
	}
}

func rsLoadMessageRange(t *testing.T, s engine.Store) {
	const th = "thread-a"
	msgs := rsMsgs("m", 1, 12)
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, Messages: msgs[:7]})
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, ExpectedCount: 7, Messages: msgs[7:]})
	rsAppend(t, s, "thread-a1", rsMsgs("z", 1, 3)...)
	tests := []struct {
		from, to uint64
		wantFrom uint64 // 0: want empty
		wantTo   uint64
	}{
		{1, 12, 1, 12},
		{3, 5, 3, 5},
		{5, 5, 5, 5},
		{9, 10, 9, 10},
		{0, 2, 1, 2},
		{0, 0, 0, 0},
		{10, 100, 10, 12},
		{12, 12, 12, 12},
		{13, 20, 0, 0},
		{6, 4, 0, 0},
		{100, 1, 0, 0},
		{1, ^uint64(0), 1, 12},
		{0, ^uint64(0), 1, 12},
	}
	for _, tt := range tests {
		recs := rsRange(t, s, th, tt.from, tt.to)
		var want []string
		if tt.wantFrom != 0 {
			want = rsMsgIDs(msgs[tt.wantFrom-1 : tt.wantTo])
		}
		if got := rsRecIDs(recs); !slices.Equal(got, want) {
			t.Errorf("LoadMessageRange(%d, %d) = %v, want %v", tt.from, tt.to, got, want)
			continue
		}
		for i, r := range recs {
			if r.Seq != tt.wantFrom+uint64(i) || r.ThreadID != th {
				t.Errorf("LoadMessageRange(%d, %d)[%d] = %v", tt.from, tt.to, i, r)
			}
		}
	}
}

// ---------------------------------------------------------------------------
// Settlement: a terminal dispatch settles its run, and the run's thread
// projection as a done checkpoint would (rule 29).

func rsSettleCancel(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r := rsRun("run-1", th, engine.RunCreated, rsSec, rsSec)
	r.DispatchID = "disp-1"
	rsCheckpoint(t, s, engine.Checkpoint{ThreadID: th, Messages: rsMsgs("m", 1, 1), Run: &r})
	rsWantThread(t, s, th, rsProj{open: "run-1", latest: "run-1", count: 1})

	rsEnqueue(t, s, rsDispatch("disp-1", th, "run-1", 3, rsMs))
	now := rsMs + 4_321
	d, err := s.Cancel(t.Context(), "disp-1", now)
	if err != nil || d == nil || d.Status != engine.StatusCancelled {
		t.Fatalf("Cancel = %v, %v; want the cancelled dispatch", d, err)
	}
	got := rsWantSettled(t, s, "run-1", "disp-1", now, &engine.Termination{Type: engine.TermCancelled}, "")
	if got.AgentID != r.AgentID || got.CreatedAt != r.CreatedAt {
		t.Errorf("settlement rewrote other fields: %+v", got)
	}
	rsWantThread(t, s, th, rsProj{latest: "run-1", count: 1})
	rsWantLog(t, s, th, "m1")
	q := engine.RunQuery{Status: engine.RunDone}
	rsWantPage(t, q, rsList(t, s, q), 1, false, "run-1")
	q = engine.RunQuery{Status: engine.RunCreated}
	rsWantPage(t, q, rsList(t, s, q), 0, false)
}

func rsSettleInterrupt(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r := rsRun("run-1", th, engine.RunWaiting, rsSec, rsSec)
	r.Waiting = &engine.RunWaitingState{Reason: engine.WaitUserInput}
	rsPutRun(t, s, r)
	rsEnqueue(t, s, rsDispatch("disp-1", th, "run-1", 3, rsMs))
	now := rsMs + 9_000
	res, err := s.Interrupt(t.Context(), th, now)
	if err != nil || len(res.Superseded) != 1 {
		t.Fatalf("Interrupt = %+v, %v; want one superseded dispatch", res, err)
	}
	rsWantSettled(t, s, "run-1", "disp-1", now, &engine.Termination{Type: engine.TermCancelled}, "")
	rsWantThread(t, s, th, rsProj{latest: "run-1"})
}

func rsSettleNackDeadLetter(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r := rsRun("run-1", th, engine.RunRunning, rsSec, rsSec)
	rsPutRun(t, s, r)
	rsWantThread(t, s, th, rsProj{active: "run-1", open: "run-1", latest: "run-1"})
	rsEnqueue(t, s, rsDispatch("disp-1", th, "run-1", 1, rsMs))
	c := rsClaim(t, s, th, rsMs+1)
	now := rsMs + 7_000
	d, err := s.Nack(t.Context(), c.DispatchID, c.ClaimToken, now+1_000, "rate limited", now)
	if err != nil || d.Status != engine.StatusDeadLetter {
		t.Fatalf("Nack at max attempts = %+v, %v; want dead_letter", d, err)
	}
	// The dispatch's projection says what the run record says (it said
	// run_status running, the attempt's start, before).
	for _, got := range []*engine.Dispatch{&d, rsLoadDispatch(t, s, "disp-1")} {
		if got.RunStatus != engine.RunDone || got.Termination == nil || got.Termination.Type != engine.TermError || got.RunError != "rate limited" || got.CompletedAt != now {
			t.Fatalf("dead letter's projection = %+v; want run_status done, termination error, run_error, completed_at %d", got, now)
		}
	}
	rsWantSettled(t, s, "run-1", "disp-1", now, engine.ErrorTermination("rate limited"), `{"message":"rate limited"}`)
	rsWantThread(t, s, th, rsProj{latest: "run-1"})
}

func rsSettleDeadLetterRunError(t *testing.T, s engine.Store) {
	const th = "thread-a"
	rsPutRun(t, s, rsRun("run-1", th, engine.RunRunning, rsSec, rsSec))
	rsEnqueue(t, s, rsDispatch("disp-1", th, "run-1", 3, rsMs))
	c := rsClaim(t, s, th, rsMs+1)
	if err := s.RecordDispatchStart(t.Context(), c.DispatchID, c.ClaimToken, "inst-1", rsMs+2); err != nil {
		t.Fatalf("RecordDispatchStart: %v", err)
	}
	res := engine.RunResult{RunID: "run-1", InstanceID: "inst-1", Status: engine.RunDone, Termination: engine.ErrorTermination("agent exploded"), Error: "agent exploded"}
	if err := s.RecordRunResult(t.Context(), c.DispatchID, c.ClaimToken, res, rsMs+3); err != nil {
		t.Fatalf("RecordRunResult: %v", err)
	}
	now := rsMs + 8_000
	if err := s.DeadLetter(t.Context(), c.DispatchID, c.ClaimToken, "permanent failure", now); err != nil {
		t.Fatalf("DeadLetter: %v", err)
	}
	// The result settled the run in its own commit (RunRecord.ApplyResult);
	// the dead letter that follows leaves it as it is.
	got := rsWantSettled(t, s, "run-1", "disp-1", rsMs+3, engine.ErrorTermination("agent exploded"), `{"message":"agent exploded"}`)
	if got.SessionID != "inst-1" {
		t.Errorf("run session_id %q, want the dispatch instance id inst-1", got.SessionID)
	}
	rsWantThread(t, s, th, rsProj{latest: "run-1"})
}

func rsSettleSkips(t *testing.T, s engine.Store) {
	// A done run keeps its outcome.
	done := rsRun("run-done", "thread-a", engine.RunDone, rsSec, rsSec+1)
	done.TerminationReason = &engine.Termination{Type: engine.TermNaturalEnd}
	done.FinishedAt = rsSec + 1
	rsPutRun(t, s, done)
	rsEnqueue(t, s, rsDispatch("disp-1", "thread-a", "run-done", 3, rsMs))
	if d, err := s.Cancel(t.Context(), "disp-1", rsMs+5_000); err != nil || d == nil {
		t.Fatalf("Cancel(disp-1) = %v, %v", d, err)
	}
	rsSameJSON(t, "done run after cancel", rsMustRun(t, s, "run-done"), done)

	// A run of another thread is not touched, nor is its thread.
	other := rsRun("run-other", "thread-b", engine.RunCreated, rsSec, rsSec)
	rsPutRun(t, s, other)
	before := rsLoadThread(t, s, "thread-b")
	rsEnqueue(t, s, rsDispatch("disp-2", "thread-a", "run-other", 3, rsMs))
	if d, err := s.Cancel(t.Context(), "disp-2", rsMs+6_000); err != nil || d == nil {
		t.Fatalf("Cancel(disp-2) = %v, %v", d, err)
	}
	rsSameJSON(t, "other thread's run after cancel", rsMustRun(t, s, "run-other"), other)
	rsSameJSON(t, "other thread after cancel", rsLoadThread(t, s, "thread-b"), before)

	// A dispatch whose run does not exist cancels without creating one.
	rsEnqueue(t, s, rsDispatch("disp-3", "thread-a", "run-missing", 3, rsMs))
	if d, err := s.Cancel(t.Context(), "disp-3", rsMs+7_000); err != nil || d == nil {
		t.Fatalf("Cancel(disp-3) = %v, %v", d, err)
	}
	rsNoRun(t, s, "run-missing")
	rsWantThread(t, s, "thread-a", rsProj{latest: "run-done"})

	// A run that has moved on to another dispatch (a continuation, an
	// operator's requeue) is that dispatch's: ending an older dispatch of
	// it leaves it, and its thread, alone (the newer dispatch would find
	// the run done and be acked without running).
	moved := rsRun("run-moved", "thread-c", engine.RunCreated, rsSec, rsSec)
	moved.DispatchID = "disp-new"
	rsPutRun(t, s, moved)
	before = rsLoadThread(t, s, "thread-c")
	rsEnqueue(t, s, rsDispatch("disp-4", "thread-c", "run-moved", 3, rsMs))
	if d, err := s.Cancel(t.Context(), "disp-4", rsMs+8_000); err != nil || d == nil {
		t.Fatalf("Cancel(disp-4) = %v, %v", d, err)
	}
	rsSameJSON(t, "run of a later dispatch after cancel", rsMustRun(t, s, "run-moved"), moved)
	rsSameJSON(t, "its thread after cancel", rsLoadThread(t, s, "thread-c"), before)
}

// rsRequeueReopens: an operator's requeue of a dead letter reopens the run
// it settled (project decision on DispatchStore.Requeue).
func rsRequeueReopens(t *testing.T, s engine.Store) {
	const th = "thread-a"
	r := rsRun("run-1", th, engine.RunRunning, rsSec, rsSec)
	rsPutRun(t, s, r)
	rsEnqueue(t, s, rsDispatch("disp-1", th, "run-1", 1, rsMs))
	c := rsClaim(t, s, th, rsMs+1)
	if _, err := s.Nack(t.Context(), c.DispatchID, c.ClaimToken, rsMs+2_000, "boom", rsMs+1_000); err != nil {
		t.Fatalf("Nack: %v", err)
	}
	rsWantSettled(t, s, "run-1", "disp-1", rsMs+1_000, engine.ErrorTermination("boom"), `{"message":"boom"}`)

	now := rsMs + 60_000
	n, err := s.Requeue(t.Context(), "disp-1", "disp-2", now)
	if err != nil || n.DispatchID != "disp-2" || n.Status != engine.StatusQueued || n.RunID != "run-1" {
		t.Fatalf("Requeue = %+v, %v; want queued disp-2 for run-1", n, err)
	}
	got := rsMustRun(t, s, "run-1")
	if got.Status != engine.RunCreated || got.TerminationReason != nil || len(got.ErrorPayload) != 0 || got.FinishedAt != 0 || got.Waiting != nil {
		t.Errorf("run after requeue: status %q termination %+v error_payload %s finished_at %d; want created with the outcome cleared",
			got.Status, got.TerminationReason, got.ErrorPayload, got.FinishedAt)
	}
	if got.DispatchID != "disp-2" || got.UpdatedAt != now/1000 {
		t.Errorf("run after requeue: dispatch_id %q updated_at %d, want disp-2 %d", got.DispatchID, got.UpdatedAt, now/1000)
	}
	q := engine.RunQuery{Status: engine.RunCreated}
	rsWantPage(t, q, rsList(t, s, q), 1, false, "run-1")
	q = engine.RunQuery{Status: engine.RunDone}
	rsWantPage(t, q, rsList(t, s, q), 0, false)
}

// rsDeadLetter enqueues dispatch id for run on thread (one attempt),
// claims it and nacks it into the dead letters at nowMs.
func rsDeadLetter(t *testing.T, s engine.Store, id, thread, run string, nowMs int64) {
	t.Helper()
	rsEnqueue(t, s, rsDispatch(id, thread, run, 1, nowMs))
	c := rsClaim(t, s, thread, nowMs+1)
	if c.DispatchID != id {
		t.Fatalf("Claim(%s) = %s, want %s", thread, c.DispatchID, id)
	}
	d, err := s.Nack(t.Context(), c.DispatchID, c.ClaimToken, nowMs+2_000, "boom", nowMs+2)
	if err != nil || d.Status != engine.StatusDeadLetter {
		t.Fatalf("Nack(%s) = %+v, %v; want dead_letter", id, d, err)
	}
}

// rsRequeueProjection: an operator's requeue reopens its run as created
// but is no checkpoint of it (store.md rule 29 as docs/store.md applies
// it to a requeue): active_run_id is cleared only when it named the
// requeued run, open_run_id moves to the requeued run only when no other
// run is open, and latest_run_id names the requeued run (it is the run
// updated last, as LatestRun sees it).
func rsRequeueProjection(t *testing.T, s engine.Store) {
	requeue := func(old, n string, nowMs int64) {
		t.Helper()
		if d, err := s.Requeue(t.Context(), old, n, nowMs); err != nil || d.Status != engine.StatusQueued {
			t.Fatalf("Requeue(%s) = %+v, %v", old, d, err)
		}
	}

	// Another run of the thread is running: it stays active and open.
	rsPutRun(t, s, rsRun("run-1", "thread-a", engine.RunRunning, rsSec, rsSec))
	rsDeadLetter(t, s, "disp-1", "thread-a", "run-1", rsMs)
	rsPutRun(t, s, rsRun("run-2", "thread-a", engine.RunRunning, rsSec+10, rsSec+10))
	rsWantThread(t, s, "thread-a", rsProj{active: "run-2", open: "run-2", latest: "run-2"})
	requeue("disp-1", "disp-1b", rsMs+60_000)
	rsWantThread(t, s, "thread-a", rsProj{active: "run-2", open: "run-2", latest: "run-1"})
	rsWantLatest(t, s, "thread-a", "run-1")
	if th := rsLoadThread(t, s, "thread-a"); th != nil && th.OpenRunStatus != engine.RunRunning {
		t.Errorf("open_run_status %q after requeue, want running (run-2's)", th.OpenRunStatus)
	}

	// Another run waits for input: it stays open (a new message continues
	// it), with its status.
	rsPutRun(t, s, rsRun("run-3", "thread-b", engine.RunRunning, rsSec, rsSec))
	rsDeadLetter(t, s, "disp-3", "thread-b", "run-3", rsMs)
	rsPutRun(t, s, rsRun("run-4", "thread-b", engine.RunWaiting, rsSec+10, rsSec+10))
	requeue("disp-3", "disp-3b", rsMs+60_000)
	rsWantThread(t, s, "thread-b", rsProj{open: "run-4", latest: "run-3"})
	if th := rsLoadThread(t, s, "thread-b"); th != nil && th.OpenRunStatus != engine.RunWaiting {
		t.Errorf("open_run_status %q after requeue, want waiting (run-4's)", th.OpenRunStatus)
	}

	// The dead letter's run had moved on to another dispatch id (its dead
	// letter did not settle it; it is still active): the requeue is
	// refused and the projection stays (until the seventh session the run
	// was reopened under the dispatch that owned it).
	r5 := rsRun("run-5", "thread-c", engine.RunRunning, rsSec, rsSec)
	r5.DispatchID = "disp-other"
	rsPutRun(t, s, r5)
	rsDeadLetter(t, s, "disp-5", "thread-c", "run-5", rsMs)
	rsWantThread(t, s, "thread-c", rsProj{active: "run-5", open: "run-5", latest: "run-5"})
	if _, err := s.Requeue(t.Context(), "disp-5", "disp-5b", rsMs+60_000); !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("Requeue(disp-5) of a run that moved on: %v, want a version conflict", err)
	}
	rsWantThread(t, s, "thread-c", rsProj{active: "run-5", open: "run-5", latest: "run-5"})
	if th := rsLoadThread(t, s, "thread-c"); th != nil && th.OpenRunStatus != engine.RunRunning {
		t.Errorf("open_run_status %q after a refused requeue, want running", th.OpenRunStatus)
	}

	// No other run is open: the reopened run is.
	rsPutRun(t, s, rsRun("run-6", "thread-d", engine.RunRunning, rsSec, rsSec))
	rsDeadLetter(t, s, "disp-6", "thread-d", "run-6", rsMs)
	rsWantThread(t, s, "thread-d", rsProj{latest: "run-6"})
	requeue("disp-6", "disp-6b", rsMs+60_000)
	rsWantThread(t, s, "thread-d", rsProj{open: "run-6", latest: "run-6"})
}
