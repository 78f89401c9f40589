package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestRunStatusValid(t *testing.T) {
	for _, s := range []RunStatus{RunCreated, RunRunning, RunWaiting, RunDone} {
		if !s.Valid() {
			t.Errorf("%q.Valid() = false", s)
		}
	}
	for _, s := range []RunStatus{"", "Created", "RUNNING", "finished", "done "} {
		if s.Valid() {
			t.Errorf("%q.Valid() = true", s)
		}
	}
}

// TestRunStatusCanTransitionTo is store.md rule 21, the full matrix.
func TestRunStatusCanTransitionTo(t *testing.T) {
	all := []RunStatus{RunCreated, RunRunning, RunWaiting, RunDone}
	allowed := map[RunStatus][]RunStatus{
		RunCreated: {RunCreated, RunRunning, RunDone},
		RunRunning: {RunRunning, RunWaiting, RunDone},
		RunWaiting: {RunWaiting, RunRunning, RunDone},
		RunDone:    {RunDone},
	}
	for _, from := range all {
		for _, to := range all {
			want := false
			for _, a := range allowed[from] {
				want = want || a == to
			}
			t.Run(fmt.Sprintf("%s_to_%s", from, to), func(t *testing.T) {
				if got := from.CanTransitionTo(to); got != want {
					t.Errorf("%s.CanTransitionTo(%s) = %v, want %v", from, to, got, want)
				}
			})
		}
	}
	invalid := []struct{ from, to RunStatus }{
		{"", ""}, {"bogus", "bogus"}, {RunCreated, "bogus"}, {RunRunning, ""}, {"bogus", RunDone}, {"", RunRunning},
	}
	for _, tt := range invalid {
		if tt.from.CanTransitionTo(tt.to) {
			t.Errorf("%q.CanTransitionTo(%q) = true, want false", tt.from, tt.to)
		}
	}
}

// TestTerminationRunStatus is store.md rule 23.
func TestTerminationRunStatus(t *testing.T) {
	tests := []struct {
		term *Termination
		want RunStatus
	}{
		{nil, RunDone},
		{&Termination{Type: TermSuspended}, RunWaiting},
		{&Termination{Type: TermNaturalEnd}, RunDone},
		{&Termination{Type: TermBehaviorRequested}, RunDone},
		{&Termination{Type: TermStopped, Value: json.RawMessage(`{"code":"max_steps"}`)}, RunDone},
		{&Termination{Type: TermCancelled}, RunDone},
		{&Termination{Type: TermBlocked, Value: json.RawMessage(`"policy"`)}, RunDone},
		{ErrorTermination("boom"), RunDone},
		{&Termination{Type: ""}, RunDone},
	}
	for _, tt := range tests {
		name := "nil"
		if tt.term != nil {
			name = tt.term.Type
		}
		t.Run(name, func(t *testing.T) {
			if got := tt.term.RunStatus(); got != tt.want {
				t.Errorf("RunStatus() = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestTerminationJSON is store.md rule 22 (adjacently tagged form).
func TestTerminationJSON(t *testing.T) {
	tests := []struct {
		term *Termination
		want string
	}{
		{&Termination{Type: TermNaturalEnd}, `{"type":"natural_end"}`},
		{&Termination{Type: TermCancelled}, `{"type":"cancelled"}`},
		{&Termination{Type: TermSuspended}, `{"type":"suspended"}`},
		{&Termination{Type: TermStopped, Value: json.RawMessage(`{"code":"max_steps","detail":"20"}`)}, `{"type":"stopped","value":{"code":"max_steps","detail":"20"}}`},
		{ErrorTermination("boom"), `{"type":"error","value":"boom"}`},
		{ErrorTermination(`say "hi"`), `{"type":"error","value":"say \"hi\""}`},
		{ErrorTermination(""), `{"type":"error","value":""}`},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			b, err := json.Marshal(tt.term)
			if err != nil || string(b) != tt.want {
				t.Fatalf("json.Marshal = %s, %v; want %s", b, err, tt.want)
			}
			var back Termination
			if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(&back, tt.term) {
				t.Errorf("round trip = %+v, %v; want %+v", back, err, tt.term)
			}
		})
	}
}

// TestRunWaitingHelpers is store.md rule 24.
func TestRunWaitingHelpers(t *testing.T) {
	tests := []struct {
		name       string
		run        RunRecord
		reason     string
		resumable  bool
		background bool
	}{
		{"waiting for user input", RunRecord{Status: RunWaiting, Waiting: &RunWaitingState{Reason: WaitUserInput}}, WaitUserInput, true, false},
		{"waiting for tool permission", RunRecord{Status: RunWaiting, Waiting: &RunWaitingState{Reason: WaitToolPermission}}, WaitToolPermission, true, false},
		{"waiting for background tasks", RunRecord{Status: RunWaiting, Waiting: &RunWaitingState{Reason: WaitBackgroundTasks}}, WaitBackgroundTasks, true, true},
		{"waiting for rate limit", RunRecord{Status: RunWaiting, Waiting: &RunWaitingState{Reason: WaitRateLimit}}, WaitRateLimit, true, false},
		{"waiting without state", RunRecord{Status: RunWaiting}, "", false, false},
		{"running with stale state", RunRecord{Status: RunRunning, Waiting: &RunWaitingState{Reason: WaitBackgroundTasks}}, "", false, false},
		{"done with stale state", RunRecord{Status: RunDone, Waiting: &RunWaitingState{Reason: WaitUserInput}}, "", false, false},
		{"created", RunRecord{Status: RunCreated}, "", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.run.WaitingReason(); got != tt.reason {
				t.Errorf("WaitingReason() = %q, want %q", got, tt.reason)
			}
			if got := tt.run.IsResumableWaiting(); got != tt.resumable {
				t.Errorf("IsResumableWaiting() = %v, want %v", got, tt.resumable)
			}
			if got := tt.run.IsBackgroundTaskWaiting(); got != tt.background {
				t.Errorf("IsBackgroundTaskWaiting() = %v, want %v", got, tt.background)
			}
		})
	}
}

func TestRunRecordValidate(t *testing.T) {
	base := RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: RunCreated, CreatedAt: 1, UpdatedAt: 1}
	mod := func(f func(r *RunRecord)) RunRecord { r := base; f(&r); return r }
	long := strings.Repeat("r", MaxIDLen+1)
	tests := []struct {
		name string
		run  RunRecord
		ok   bool
	}{
		{"valid", base, true},
		{"valid with dispatch id", mod(func(r *RunRecord) { r.DispatchID = "d1" }), true},
		{"run id of MaxIDLen bytes", mod(func(r *RunRecord) { r.RunID = long[1:] }), true},
		{"blank run id", mod(func(r *RunRecord) { r.RunID = "" }), false},
		{"whitespace run id", mod(func(r *RunRecord) { r.RunID = "  " }), false},
		{"long run id", mod(func(r *RunRecord) { r.RunID = long }), false},
		{"blank thread id", mod(func(r *RunRecord) { r.ThreadID = "" }), false},
		{"long thread id", mod(func(r *RunRecord) { r.ThreadID = long }), false},
		{"empty status", mod(func(r *RunRecord) { r.Status = "" }), false},
		{"unknown status", mod(func(r *RunRecord) { r.Status = "finished" }), false},
		{"blank dispatch id", mod(func(r *RunRecord) { r.DispatchID = " " }), false},
		{"long dispatch id", mod(func(r *RunRecord) { r.DispatchID = long }), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.run.Validate()
			if tt.ok && err != nil {
				t.Errorf("Validate() = %v, want nil", err)
			}
			if !tt.ok && !errors.Is(err, ErrValidation) {
				t.Errorf("Validate() = %v, want ErrValidation", err)
			}
		})
	}
}

func TestMessageValidate(t *testing.T) {
	long := strings.Repeat("m", MaxIDLen+1)
	tests := []struct {
		name string
		msg  Message
		ok   bool
	}{
		{"system", Message{ID: "m1", Role: RoleSystem}, true},
		{"user", Message{ID: "m1", Role: RoleUser, Content: json.RawMessage(`[{"type":"text","text":"hi"}]`)}, true},
		{"assistant", Message{ID: "m1", Role: RoleAssistant}, true},
		{"tool", Message{ID: "m1", Role: RoleTool, ToolCallID: "c1"}, true},
		{"visibility all", Message{ID: "m1", Role: RoleUser, Visibility: "all"}, true},
		{"visibility internal", Message{ID: "m1", Role: RoleUser, Visibility: "internal"}, true},
		{"id of MaxIDLen bytes", Message{ID: long[1:], Role: RoleUser}, true},
		{"blank id", Message{Role: RoleUser}, false},
		{"whitespace id", Message{ID: " ", Role: RoleUser}, false},
		{"long id", Message{ID: long, Role: RoleUser}, false},
		{"empty role", Message{ID: "m1"}, false},
		{"unknown role", Message{ID: "m1", Role: "robot"}, false},
		{"capitalised role", Message{ID: "m1", Role: "User"}, false},
		{"unknown visibility", Message{ID: "m1", Role: RoleUser, Visibility: "secret"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.msg.Validate()
			if tt.ok && err != nil {
				t.Errorf("Validate() = %v, want nil", err)
			}
			if !tt.ok && !errors.Is(err, ErrValidation) {
				t.Errorf("Validate() = %v, want ErrValidation", err)
			}
		})
	}
}

// TestThreadApplyRun is store.md rule 29.
func TestThreadApplyRun(t *testing.T) {
	run := func(id string, s RunStatus, parent string) *RunRecord {
		r := &RunRecord{RunID: id, ThreadID: "t1", Status: s}
		if parent != "" {
			r.Request = &RunRequestSnapshot{ParentThreadID: parent}
		}
		return r
	}
	base := Thread{ID: "t1", ResourceID: "res", Metadata: json.RawMessage(`{"k":1}`), MessageCount: 7}
	th := func(active, open, latest, parent string) Thread {
		t := base
		t.ActiveRunID, t.OpenRunID, t.LatestRunID, t.ParentThreadID = active, open, latest, parent
		return t
	}
	tests := []struct {
		name  string
		start Thread
		run   *RunRecord
		want  Thread
	}{
		{"created on a fresh thread", th("", "", "", ""), run("r1", RunCreated, ""), th("", "r1", "r1", "")},
		{"created clears another active run", th("r0", "r0", "r0", ""), run("r1", RunCreated, ""), th("", "r1", "r1", "")},
		{"running sets active and open", th("", "r1", "r1", ""), run("r1", RunRunning, ""), th("r1", "r1", "r1", "")},
		{"running replaces another run", th("r0", "r0", "r0", ""), run("r1", RunRunning, ""), th("r1", "r1", "r1", "")},
		{"waiting clears active, keeps open", th("r1", "r1", "r1", ""), run("r1", RunWaiting, ""), th("", "r1", "r1", "")},
		{"waiting of another run takes open", th("r0", "r0", "r0", ""), run("r1", RunWaiting, ""), th("", "r1", "r1", "")},
		{"done clears own active and open", th("r1", "r1", "r1", ""), run("r1", RunDone, ""), th("", "", "r1", "")},
		{"done clears own open only", th("", "r1", "r1", ""), run("r1", RunDone, ""), th("", "", "r1", "")},
		{"done leaves other runs' pointers", th("r0", "r0", "r0", ""), run("r1", RunDone, ""), th("r0", "r0", "r1", "")},
		{"done clears own active, keeps other open", th("r1", "r0", "r0", ""), run("r1", RunDone, ""), th("", "r0", "r1", "")},
		{"done clears own open, keeps other active", th("r0", "r1", "r1", ""), run("r1", RunDone, ""), th("r0", "", "r1", "")},
		{"parent inherited from request", th("", "", "", ""), run("r1", RunCreated, "p1"), th("", "r1", "r1", "p1")},
		{"parent inherited on done", th("", "", "", ""), run("r1", RunDone, "p1"), th("", "", "r1", "p1")},
		{"existing parent kept", th("", "", "", "p0"), run("r1", RunCreated, "p1"), th("", "r1", "r1", "p0")},
		{"no request keeps parent", th("", "", "", "p0"), run("r1", RunRunning, ""), th("r1", "r1", "r1", "p0")},
		{"request without parent keeps none", th("", "", "", ""), &RunRecord{RunID: "r1", ThreadID: "t1", Status: RunCreated, Request: &RunRequestSnapshot{Origin: "User"}}, th("", "r1", "r1", "")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.start
			got.ApplyRun(tt.run)
			if tt.want.OpenRunID != "" && tt.want.OpenRunID == tt.run.RunID {
				tt.want.OpenRunStatus = tt.run.Status // checked on its own below
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ApplyRun\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

// TestRunSettle is engine.md §9 items 51–53 as RunRecord.Settle.
func TestRunSettle(t *testing.T) {
	const nowSec = 1_700_000_100
	running := RunRecord{
		RunID: "r1", ThreadID: "t1", AgentID: "agent", Status: RunRunning,
		Waiting:      &RunWaitingState{Reason: WaitUserInput},
		ErrorPayload: json.RawMessage(`{"message":"old"}`),
		SessionID:    "old-session", DispatchID: "d0",
		CreatedAt: 1_700_000_000, StartedAt: 1_700_000_001, UpdatedAt: 1_700_000_002, Steps: 3,
	}
	modRun := func(f func(r *RunRecord)) RunRecord {
		r := running
		f(&r)
		return r
	}
	disp := func(s DispatchStatus, f func(d *Dispatch)) *Dispatch {
		d := Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Status: s, MaxAttempts: 3, CompletedAt: t0, UpdatedAt: t0}
		if f != nil {
			f(&d)
		}
		return &d
	}
	settled := func(term *Termination, payload string, session string) RunRecord {
		r := running
		r.Status = RunDone
		r.TerminationReason = term
		r.ErrorPayload = nil
		if payload != "" {
			r.ErrorPayload = json.RawMessage(payload)
		}
		r.DispatchID = "d1"
		r.SessionID = session
		r.Waiting = nil
		r.FinishedAt, r.UpdatedAt = nowSec, nowSec
		return r
	}
	errTerm := func(msg string) *Termination {
		return &Termination{Type: TermError, Value: json.RawMessage(`"` + msg + `"`)}
	}
	tests := []struct {
		name    string
		run     RunRecord
		d       *Dispatch
		changed bool
		want    RunRecord // ignored when !changed (then want = run)
	}{
		{
			name: "cancelled", run: running,
			d:       disp(StatusCancelled, nil),
			changed: true, want: settled(&Termination{Type: TermCancelled}, "", ""),
		},
		{
			name: "superseded carries the instance id", run: running,
			d:       disp(StatusSuperseded, func(d *Dispatch) { d.InstanceID = "inst-1"; d.LastError = ReasonInterrupt }),
			changed: true, want: settled(&Termination{Type: TermCancelled}, "", "inst-1"),
		},
		{
			name: "created run cancelled", run: modRun(func(r *RunRecord) { r.Status = RunCreated }),
			d:       disp(StatusCancelled, nil),
			changed: true, want: settled(&Termination{Type: TermCancelled}, "", ""),
		},
		{
			name: "dead letter prefers run_error", run: running,
			d: disp(StatusDeadLetter, func(d *Dispatch) {
				d.RunError, d.LastError, d.InstanceID = "agent exploded", "nack text", "inst-2"
			}),
			changed: true, want: settled(errTerm("agent exploded"), `{"message":"agent exploded"}`, "inst-2"),
		},
		{
			name:    "dead letter falls back to last_error",
			run:     modRun(func(r *RunRecord) { r.Status = RunWaiting }),
			d:       disp(StatusDeadLetter, func(d *Dispatch) { d.LastError = ReasonLeaseExpiredMax }),
			changed: true, want: settled(errTerm(ReasonLeaseExpiredMax), `{"message":"`+ReasonLeaseExpiredMax+`"}`, ""),
		},
		{
			name: "dead letter default text", run: running,
			d:       disp(StatusDeadLetter, nil),
			changed: true, want: settled(errTerm(ReasonDeadLetteredDefault), `{"message":"mailbox dispatch dead-lettered"}`, ""),
		},
		{
			name: "done run untouched",
			run: modRun(func(r *RunRecord) {
				r.Status, r.TerminationReason, r.FinishedAt = RunDone, &Termination{Type: TermNaturalEnd}, 1_700_000_050
			}),
			d: disp(StatusCancelled, nil),
		},
		{
			name: "done run untouched by dead letter",
			run:  modRun(func(r *RunRecord) { r.Status = RunDone }),
			d:    disp(StatusDeadLetter, func(d *Dispatch) { d.LastError = "x" }),
		},
		{
			name: "run of another thread untouched", run: running,
			d: disp(StatusCancelled, func(d *Dispatch) { d.ThreadID = "t2" }),
		},
		{name: "queued dispatch settles nothing", run: running, d: disp(StatusQueued, func(d *Dispatch) { d.CompletedAt = 0 })},
		{name: "claimed dispatch settles nothing", run: running, d: disp(StatusClaimed, nil)},
		{name: "acked dispatch settles nothing", run: running, d: disp(StatusAcked, func(d *Dispatch) { d.RunStatus = RunDone })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := tt.run
			if got := r.Settle(tt.d, nowSec); got != tt.changed {
				t.Errorf("Settle() = %v, want %v", got, tt.changed)
			}
			want := tt.want
			if !tt.changed {
				want = tt.run
			}
			if !reflect.DeepEqual(r, want) {
				t.Errorf("run after Settle\n got %+v\nwant %+v", r, want)
			}
			if tt.changed && r.Status.CanTransitionTo(RunDone) != true {
				t.Errorf("settled run in status %q", r.Status)
			}
		})
	}
}

func TestRunReopen(t *testing.T) {
	r := RunRecord{
		RunID: "r1", ThreadID: "t1", AgentID: "a", Status: RunDone,
		TerminationReason: ErrorTermination("boom"), ErrorPayload: json.RawMessage(`{"message":"boom"}`),
		Waiting: &RunWaitingState{Reason: WaitUserInput}, DispatchID: "d1", SessionID: "s1",
		Outcome: json.RawMessage(`{"ok":true}`), FinalOutput: json.RawMessage(`"done"`),
		Request: &RunRequestSnapshot{ParentThreadID: "p"}, State: json.RawMessage(`{"x":1}`),
		CreatedAt: 100, StartedAt: 101, FinishedAt: 102, UpdatedAt: 102, Steps: 4, InputTokens: 5, OutputTokens: 6,
	}
	want := r
	want.Status = RunCreated
	want.TerminationReason, want.ErrorPayload, want.Waiting = nil, nil, nil
	want.Outcome, want.FinalOutput, want.SessionID = nil, nil, ""
	want.StartedAt, want.FinishedAt = 0, 0
	want.StartCount = 1 // its start (of a version that did not count them) is counted, not lost with started_at
	want.DispatchID = "d2"
	want.UpdatedAt = 200
	r.Reopen("d2", 200)
	if !reflect.DeepEqual(r, want) {
		t.Errorf("Reopen\n got %+v\nwant %+v", r, want)
	}
	if err := r.Validate(); err != nil {
		t.Errorf("reopened run fails Validate: %v", err)
	}
}

// TestRunRecordJSON checks the snake_case wire shape of rule 1.10 for the
// fields the store and recovery rely on.
func TestRunRecordJSON(t *testing.T) {
	r := RunRecord{
		RunID: "r1", ThreadID: "t1", AgentID: "a", Status: RunWaiting,
		Request:   &RunRequestSnapshot{Origin: "A2A", InputMessageIDs: []string{"m1"}, InputMessageCount: 1, ParentThreadID: "p"},
		Input:     &RunMessageInput{ThreadID: "t1", Range: &SeqRange{From: 1, To: 3}},
		Waiting:   &RunWaitingState{Reason: WaitBackgroundTasks, TicketIDs: []string{"k1"}},
		CreatedAt: 10, UpdatedAt: 11,
	}
	b, err := json.Marshal(&r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	checks := map[string]any{
		"run_id": "r1", "thread_id": "t1", "agent_id": "a", "status": "waiting",
		"created_at": 10.0, "updated_at": 11.0, "steps": 0.0, "input_tokens": 0.0, "output_tokens": 0.0,
	}
	for k, want := range checks {
		if m[k] != want {
			t.Errorf("%s = %v, want %v (json %s)", k, m[k], want, b)
		}
	}
	for _, k := range []string{"termination_reason", "dispatch_id", "finished_at", "started_at", "error_payload"} {
		if _, ok := m[k]; ok {
			t.Errorf("zero %s not omitted: %s", k, b)
		}
	}
	if rng := m["input"].(map[string]any)["range"].(map[string]any); rng["from_seq"] != 1.0 || rng["to_seq"] != 3.0 {
		t.Errorf("input.range = %v", rng)
	}
	if w := m["waiting"].(map[string]any); w["reason"] != "background_tasks" {
		t.Errorf("waiting = %v", w)
	}
	if req := m["request"].(map[string]any); req["parent_thread_id"] != "p" || req["input_message_count"] != 1.0 {
		t.Errorf("request = %v", req)
	}
	var back RunRecord
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, r) {
		t.Errorf("round trip\n got %+v\nwant %+v (%v)", back, r, err)
	}
}

func TestMessageRecordString(t *testing.T) {
	if got, want := (MessageRecord{ThreadID: "t1", Seq: 3, MessageID: "m3"}).String(), "t1#3(m3)"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

// The projection remembers the open run's status, so a submit knows
// without reading the run whether it could continue it.
func TestThreadOpenRunStatus(t *testing.T) {
	var th Thread
	steps := []struct {
		run  RunRecord
		want RunStatus
	}{
		{RunRecord{RunID: "r1", Status: RunCreated}, RunCreated},
		{RunRecord{RunID: "r1", Status: RunRunning}, RunRunning},
		{RunRecord{RunID: "r1", Status: RunWaiting}, RunWaiting},
		{RunRecord{RunID: "r2", Status: RunDone}, RunWaiting}, // another run's end leaves it
		{RunRecord{RunID: "r1", Status: RunDone}, ""},
	}
	for i, st := range steps {
		th.ApplyRun(&st.run)
		if th.OpenRunStatus != st.want {
			t.Fatalf("step %d (%s %s): open run status %q, want %q", i, st.run.RunID, st.run.Status, th.OpenRunStatus, st.want)
		}
	}
}
