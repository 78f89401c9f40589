package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// t0 is the base dispatch timestamp (Unix ms) of these tests.
const t0 int64 = 1_700_000_000_000

// with returns a deep copy of d changed by f.
func with(d Dispatch, f func(*Dispatch)) Dispatch {
	c := d.Clone()
	if f != nil {
		f(&c)
	}
	return c
}

// Fixtures: one dispatch at each point of a normal life.
var (
	fxQueued = Dispatch{
		DispatchID: "d1", ThreadID: "t1", RunID: "r1", Priority: DefaultPriority, Epoch: 2,
		Status: StatusQueued, AvailableAt: t0, MaxAttempts: 3, CreatedAt: t0, UpdatedAt: t0,
	}
	fxClaimed = with(fxQueued, func(d *Dispatch) {
		d.Status = StatusClaimed
		d.ClaimToken, d.ClaimedBy, d.LeaseUntil = "tok-1", "consumer-1", t0+30_000
		d.UpdatedAt = t0 + 10
	})
	fxStarted = with(fxClaimed, func(d *Dispatch) {
		d.InstanceID, d.RunStatus, d.UpdatedAt = "inst-1", RunRunning, t0+20
	})
	fxResult = with(fxStarted, func(d *Dispatch) {
		d.RunStatus = RunDone
		d.Termination = &Termination{Type: TermNaturalEnd}
		d.RunResponse = "ok"
		d.RunError = "partial"
		d.CompletedAt, d.UpdatedAt = t0+30, t0+30
	})
	fxDead = with(fxClaimed, func(d *Dispatch) {
		d.Status = StatusDeadLetter
		d.AttemptCount = 3
		d.LastError = "boom-3"
		d.Errors = []AttemptError{{1, "boom-1", t0 + 1}, {2, "boom-2", t0 + 2}, {3, "boom-3", t0 + 3}}
		d.InstanceID, d.RunStatus, d.RunError = "inst-3", RunDone, "agent failed"
		d.ClaimToken, d.ClaimedBy, d.LeaseUntil = "", "", 0
		d.CompletedAt, d.UpdatedAt = t0+3, t0+3
	})
)

func TestFixturesAreValid(t *testing.T) {
	for name, d := range map[string]Dispatch{"queued": fxQueued, "claimed": fxClaimed, "started": fxStarted, "result": fxResult, "dead": fxDead} {
		if err := d.Validate(); err != nil {
			t.Errorf("fixture %s: Validate() = %v, want nil", name, err)
		}
	}
}

func TestDispatchStatusText(t *testing.T) {
	tests := []struct {
		status   DispatchStatus
		name     string
		terminal bool
	}{
		{StatusQueued, "queued", false},
		{StatusClaimed, "claimed", false},
		{StatusAcked, "acked", true},
		{StatusCancelled, "cancelled", true},
		{StatusSuperseded, "superseded", true},
		{StatusDeadLetter, "dead_letter", true},
	}
	if len(tests) != len(AllStatuses) {
		t.Fatalf("AllStatuses has %d entries, test covers %d", len(AllStatuses), len(tests))
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if AllStatuses[i] != tt.status {
				t.Errorf("AllStatuses[%d] = %v, want %v", i, AllStatuses[i], tt.status)
			}
			if !tt.status.Valid() {
				t.Errorf("Valid() = false")
			}
			if got := tt.status.String(); got != tt.name {
				t.Errorf("String() = %q, want %q", got, tt.name)
			}
			if got := tt.status.Terminal(); got != tt.terminal {
				t.Errorf("Terminal() = %v, want %v", got, tt.terminal)
			}
			b, err := tt.status.MarshalText()
			if err != nil || string(b) != tt.name {
				t.Errorf("MarshalText() = %q, %v; want %q, nil", b, err, tt.name)
			}
			var s DispatchStatus
			if err := s.UnmarshalText([]byte(tt.name)); err != nil || s != tt.status {
				t.Errorf("UnmarshalText(%q) = %v, %v; want %v, nil", tt.name, s, err, tt.status)
			}
			p, err := ParseDispatchStatus(tt.name)
			if err != nil || p != tt.status {
				t.Errorf("ParseDispatchStatus(%q) = %v, %v; want %v, nil", tt.name, p, err, tt.status)
			}
			// JSON goes through the text marshaller: snake_case on the wire.
			j, err := json.Marshal(tt.status)
			if err != nil || string(j) != `"`+tt.name+`"` {
				t.Errorf("json.Marshal = %s, %v; want %q", j, err, tt.name)
			}
			var back DispatchStatus
			if err := json.Unmarshal(j, &back); err != nil || back != tt.status {
				t.Errorf("json round trip = %v, %v; want %v", back, err, tt.status)
			}
		})
	}
}

func TestDispatchStatusRejectsUnknown(t *testing.T) {
	for _, name := range []string{"", "Queued", "QUEUED", "DeadLetter", "dead-letter", "deadletter", "queued ", " queued", "invalid(0)", "running", "unknown"} {
		t.Run(fmt.Sprintf("%q", name), func(t *testing.T) {
			if got, err := ParseDispatchStatus(name); !errors.Is(err, ErrValidation) || got != 0 {
				t.Errorf("ParseDispatchStatus = %v, %v; want 0, ErrValidation", got, err)
			}
			s := StatusClaimed
			if err := s.UnmarshalText([]byte(name)); !errors.Is(err, ErrValidation) {
				t.Errorf("UnmarshalText err = %v, want ErrValidation", err)
			}
			if s != StatusClaimed {
				t.Errorf("UnmarshalText changed the value to %v on error", s)
			}
			var d Dispatch
			if err := json.Unmarshal([]byte(`{"status":"`+name+`"}`), &d); err == nil {
				t.Errorf("json.Unmarshal accepted status %q as %v", name, d.Status)
			}
		})
	}
	for _, s := range []DispatchStatus{0, StatusDeadLetter + 1, 255} {
		t.Run(fmt.Sprintf("value_%d", uint8(s)), func(t *testing.T) {
			if s.Valid() || s.Terminal() {
				t.Errorf("Valid() = %v, Terminal() = %v; want false, false", s.Valid(), s.Terminal())
			}
			if got, want := s.String(), fmt.Sprintf("invalid(%d)", uint8(s)); got != want {
				t.Errorf("String() = %q, want %q", got, want)
			}
			if b, err := s.MarshalText(); !errors.Is(err, ErrValidation) || b != nil {
				t.Errorf("MarshalText() = %q, %v; want nil, ErrValidation", b, err)
			}
			if _, err := json.Marshal(Dispatch{Status: s}); err == nil {
				t.Errorf("json.Marshal accepted status %d", uint8(s))
			}
		})
	}
}

func TestValidateID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"a", true},
		{"0190b7a2-0000-7000-8000-000000000000", true},
		{"thread/with:punct", true},
		{"ünïcödé", true},
		{strings.Repeat("x", MaxIDLen), true},
		{"", false},
		{"   ", false},
		{"\t\n", false},
		{strings.Repeat("x", MaxIDLen+1), false},
		{"a\x00b", false},
		{"a\nb", false},
		{"a\x7fb", false},
		{"\xff\xfe", false},
	}
	for _, tt := range tests {
		name := fmt.Sprintf("%.20q", tt.id)
		t.Run(name, func(t *testing.T) {
			err := ValidateID("thread_id", tt.id)
			if tt.ok && err != nil {
				t.Errorf("ValidateID = %v, want nil", err)
			}
			if !tt.ok && !errors.Is(err, ErrValidation) {
				t.Errorf("ValidateID = %v, want ErrValidation", err)
			}
		})
	}
}

func TestDispatchValidate(t *testing.T) {
	long := strings.Repeat("x", MaxIDLen+1)
	tests := []struct {
		name string
		d    Dispatch
		ok   bool
	}{
		{"queued clean", fxQueued, true},
		{"claimed", fxClaimed, true},
		{"claimed with projection", fxResult, true},
		{"attempt_count equals max_attempts", with(fxDead, nil), true},
		{"max_attempts 1", with(fxQueued, func(d *Dispatch) { d.MaxAttempts = 1 }), true},
		{"dedupe key set", with(fxQueued, func(d *Dispatch) { d.DedupeKey = "k" }), true},
		{"id of MaxIDLen bytes", with(fxQueued, func(d *Dispatch) { d.DispatchID = long[1:] }), true},

		{"queued with claim token", with(fxQueued, func(d *Dispatch) { d.ClaimToken = "tok" }), false},
		{"queued with claimed_by", with(fxQueued, func(d *Dispatch) { d.ClaimedBy = "c" }), false},
		{"queued with lease_until", with(fxQueued, func(d *Dispatch) { d.LeaseUntil = t0 }), false},
		{"queued with completed_at", with(fxQueued, func(d *Dispatch) { d.CompletedAt = t0 }), false},
		{"queued with instance id", with(fxQueued, func(d *Dispatch) { d.InstanceID = "i" }), false},
		{"queued with run_status", with(fxQueued, func(d *Dispatch) { d.RunStatus = RunRunning }), false},
		{"queued with termination", with(fxQueued, func(d *Dispatch) { d.Termination = &Termination{Type: TermCancelled} }), false},
		{"queued with run_response", with(fxQueued, func(d *Dispatch) { d.RunResponse = "x" }), false},
		{"queued with run_error", with(fxQueued, func(d *Dispatch) { d.RunError = "x" }), false},

		{"claimed without token", with(fxClaimed, func(d *Dispatch) { d.ClaimToken = "" }), false},
		{"claimed with blank token", with(fxClaimed, func(d *Dispatch) { d.ClaimToken = "  " }), false},
		{"claimed without owner", with(fxClaimed, func(d *Dispatch) { d.ClaimedBy = "" }), false},
		{"claimed with blank owner", with(fxClaimed, func(d *Dispatch) { d.ClaimedBy = " " }), false},
		{"claimed without lease", with(fxClaimed, func(d *Dispatch) { d.LeaseUntil = 0 }), false},

		{"invalid status 0", with(fxQueued, func(d *Dispatch) { d.Status = 0 }), false},
		{"invalid status 7", with(fxQueued, func(d *Dispatch) { d.Status = StatusDeadLetter + 1 }), false},
		{"unknown run_status", with(fxClaimed, func(d *Dispatch) { d.RunStatus = "exploded" }), false},
		{"blank dispatch_id", with(fxQueued, func(d *Dispatch) { d.DispatchID = "" }), false},
		{"whitespace dispatch_id", with(fxQueued, func(d *Dispatch) { d.DispatchID = " " }), false},
		{"blank thread_id", with(fxQueued, func(d *Dispatch) { d.ThreadID = "" }), false},
		{"blank run_id", with(fxQueued, func(d *Dispatch) { d.RunID = "" }), false},
		{"long dispatch_id", with(fxQueued, func(d *Dispatch) { d.DispatchID = long }), false},
		{"long thread_id", with(fxQueued, func(d *Dispatch) { d.ThreadID = long }), false},
		{"long run_id", with(fxQueued, func(d *Dispatch) { d.RunID = long }), false},
		{"control char in run_id", with(fxQueued, func(d *Dispatch) { d.RunID = "r\x001" }), false},
		{"blank dedupe key", with(fxQueued, func(d *Dispatch) { d.DedupeKey = "  " }), false},
		{"long dedupe key", with(fxQueued, func(d *Dispatch) { d.DedupeKey = long }), false},
		{"max_attempts 0", with(fxQueued, func(d *Dispatch) { d.MaxAttempts = 0 }), false},
		{"attempt_count above max_attempts", with(fxQueued, func(d *Dispatch) { d.AttemptCount = 4 }), false},
	}
	for _, s := range []DispatchStatus{StatusAcked, StatusCancelled, StatusSuperseded, StatusDeadLetter} {
		term := with(fxQueued, func(d *Dispatch) { d.Status, d.CompletedAt = s, t0+5 })
		tests = append(tests,
			struct {
				name string
				d    Dispatch
				ok   bool
			}{s.String() + " with completed_at", term, true},
			struct {
				name string
				d    Dispatch
				ok   bool
			}{s.String() + " without completed_at", with(term, func(d *Dispatch) { d.CompletedAt = 0 }), false},
			struct {
				name string
				d    Dispatch
				ok   bool
			}{s.String() + " with claim token", with(term, func(d *Dispatch) { d.ClaimToken = "tok" }), false},
			struct {
				name string
				d    Dispatch
				ok   bool
			}{s.String() + " with claimed_by", with(term, func(d *Dispatch) { d.ClaimedBy = "c" }), false},
			struct {
				name string
				d    Dispatch
				ok   bool
			}{s.String() + " with lease_until", with(term, func(d *Dispatch) { d.LeaseUntil = t0 }), false},
		)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.d.Validate()
			if tt.ok && err != nil {
				t.Errorf("Validate() = %v, want nil", err)
			}
			if !tt.ok && !errors.Is(err, ErrValidation) {
				t.Errorf("Validate() = %v, want ErrValidation", err)
			}
		})
	}
}

func TestPrepareEnqueue(t *testing.T) {
	bare := Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Priority: 7, AvailableAt: t0 + 60_000, CreatedAt: t0}
	tests := []struct {
		name    string
		in      Dispatch
		want    Dispatch
		wantErr error
	}{
		{
			name: "fills status, max attempts and updated_at; keeps priority and available_at",
			in:   bare,
			want: with(bare, func(d *Dispatch) { d.Status, d.MaxAttempts, d.UpdatedAt = StatusQueued, DefaultMaxAttempts, t0 }),
		},
		{
			name: "keeps given max attempts, priority 0 and updated_at",
			in:   with(bare, func(d *Dispatch) { d.Priority, d.MaxAttempts, d.UpdatedAt = 0, 9, t0+1 }),
			want: with(bare, func(d *Dispatch) { d.Priority, d.MaxAttempts, d.UpdatedAt, d.Status = 0, 9, t0+1, StatusQueued }),
		},
		{name: "claimed status", in: with(bare, func(d *Dispatch) { d.Status = StatusClaimed }), wantErr: ErrValidation},
		{name: "terminal status", in: with(bare, func(d *Dispatch) { d.Status, d.CompletedAt = StatusAcked, t0 }), wantErr: ErrValidation},
		{name: "last_error", in: with(bare, func(d *Dispatch) { d.LastError = "x" }), wantErr: ErrValidation},
		{name: "error history", in: with(bare, func(d *Dispatch) { d.Errors = []AttemptError{{1, "x", t0}} }), wantErr: ErrValidation},
		{name: "claim fields", in: with(bare, func(d *Dispatch) { d.ClaimToken = "tok" }), wantErr: ErrValidation},
		{name: "runtime projection", in: with(bare, func(d *Dispatch) { d.RunStatus = RunRunning }), wantErr: ErrValidation},
		{name: "completed_at", in: with(bare, func(d *Dispatch) { d.CompletedAt = t0 }), wantErr: ErrValidation},
		{name: "blank run id", in: with(bare, func(d *Dispatch) { d.RunID = "" }), wantErr: ErrValidation},
		{name: "attempt_count above max", in: with(bare, func(d *Dispatch) { d.MaxAttempts, d.AttemptCount = 2, 3 }), wantErr: ErrValidation},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.in.Clone()
			err := d.PrepareEnqueue()
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("PrepareEnqueue() = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("PrepareEnqueue() = %v", err)
			}
			if !reflect.DeepEqual(d, tt.want) {
				t.Errorf("PrepareEnqueue() record\n got %+v\nwant %+v", d, tt.want)
			}
		})
	}
}

// TestTransitions applies each transition method to a fixture and compares
// the whole resulting record. A failing transition must leave the record
// untouched; a successful one must leave a record that passes Validate.
func TestTransitions(t *testing.T) {
	const now = t0 + 1_000
	tests := []struct {
		name    string
		start   Dispatch
		op      func(d *Dispatch) error
		wantErr error
		want    Dispatch // ignored when wantErr is set (then want = start)
	}{
		{
			name:  "claim queued",
			start: fxQueued,
			op:    func(d *Dispatch) error { return d.Claim("tok-9", "consumer-9", now+30_000, now) },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status, d.ClaimToken, d.ClaimedBy, d.LeaseUntil, d.UpdatedAt = StatusClaimed, "tok-9", "consumer-9", now+30_000, now
			}),
		},
		{
			name:    "claim claimed is stale",
			start:   fxClaimed,
			op:      func(d *Dispatch) error { return d.Claim("tok-9", "consumer-9", now+30_000, now) },
			wantErr: ErrStaleClaim,
		},
		{
			name:    "claim cancelled is stale",
			start:   with(fxQueued, func(d *Dispatch) { d.Status, d.CompletedAt = StatusCancelled, t0 }),
			op:      func(d *Dispatch) error { return d.Claim("tok-9", "consumer-9", now+30_000, now) },
			wantErr: ErrStaleClaim,
		},
		{
			name:    "claim with blank consumer",
			start:   fxQueued,
			op:      func(d *Dispatch) error { return d.Claim("tok-9", " ", now+30_000, now) },
			wantErr: ErrValidation,
		},
		{
			name:  "ack keeps the runtime projection",
			start: fxResult,
			op:    func(d *Dispatch) error { d.Ack(now); return nil },
			want: with(fxResult, func(d *Dispatch) {
				d.Status = StatusAcked
				d.ClaimToken, d.ClaimedBy, d.LeaseUntil = "", "", 0
				d.CompletedAt, d.UpdatedAt = now, now
			}),
		},
		{
			name:  "nack with attempts left requeues fresh",
			start: fxResult,
			op:    func(d *Dispatch) error { d.Nack(now+250, "boom", now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.AttemptCount = 1
				d.LastError = "boom"
				d.Errors = []AttemptError{{Attempt: 1, Error: "boom", At: now}}
				d.AvailableAt = now + 250
				d.UpdatedAt = now
			}),
		},
		{
			name:  "nack at max attempts dead-letters",
			start: with(fxClaimed, func(d *Dispatch) { d.AttemptCount = 2 }),
			op:    func(d *Dispatch) error { d.Nack(now+250, "boom", now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status = StatusDeadLetter
				d.AttemptCount = 3
				d.LastError = "boom"
				d.Errors = []AttemptError{{Attempt: 3, Error: "boom", At: now}}
				d.CompletedAt, d.UpdatedAt = now, now
				d.RunStatus, d.Termination, d.RunError = RunDone, ErrorTermination("boom"), "boom"
			}),
		},
		{
			name:  "dead letter does not spend an attempt",
			start: with(fxClaimed, func(d *Dispatch) { d.AttemptCount = 1 }),
			op:    func(d *Dispatch) error { d.DeadLetter("fatal", now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status = StatusDeadLetter
				d.AttemptCount = 1
				d.LastError = "fatal"
				// The second attempt's error (found by review: numbered 1).
				d.Errors = []AttemptError{{Attempt: 2, Error: "fatal", At: now}}
				d.CompletedAt, d.UpdatedAt = now, now
				// The failure is the attempt's projection (one commit).
				d.RunStatus, d.Termination, d.RunError = RunDone, ErrorTermination("fatal"), "fatal"
			}),
		},
		{
			name:  "dead letter keeps a recorded result",
			start: with(fxClaimed, func(d *Dispatch) { d.RunStatus, d.RunError = RunDone, "recorded" }),
			op:    func(d *Dispatch) error { d.DeadLetter("fatal", now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status = StatusDeadLetter
				d.LastError = "fatal"
				d.Errors = []AttemptError{{Attempt: 1, Error: "fatal", At: now}}
				d.CompletedAt, d.UpdatedAt = now, now
				d.RunStatus, d.RunError = RunDone, "recorded"
			}),
		},
		{
			name:  "cancel queued",
			start: fxQueued,
			op:    func(d *Dispatch) error { d.Cancel(now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status, d.CompletedAt, d.UpdatedAt = StatusCancelled, now, now
			}),
		},
		{
			name:  "release requeues at now without spending an attempt",
			start: with(fxResult, func(d *Dispatch) { d.AttemptCount, d.LastError = 1, "earlier" }),
			op:    func(d *Dispatch) error { d.Release(now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.AttemptCount, d.LastError = 1, "earlier"
				d.AvailableAt, d.UpdatedAt = now, now
			}),
		},
		{
			name:  "reclaim expired with attempts left",
			start: fxStarted,
			op:    func(d *Dispatch) error { d.ReclaimExpired(now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.AttemptCount = 1
				d.LastError = ReasonLeaseExpired
				d.Errors = []AttemptError{{Attempt: 1, Error: ReasonLeaseExpired, At: now}}
				d.UpdatedAt = now // available_at kept: it is in the past
			}),
		},
		{
			name:  "reclaim expired before an inline claim's guard: available at now",
			start: with(fxStarted, func(d *Dispatch) { d.AvailableAt = now + 60_000 }),
			op:    func(d *Dispatch) error { d.ReclaimExpired(now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.AttemptCount = 1
				d.LastError = ReasonLeaseExpired
				d.Errors = []AttemptError{{Attempt: 1, Error: ReasonLeaseExpired, At: now}}
				d.AvailableAt, d.UpdatedAt = now, now
			}),
		},
		{
			name:  "reclaim expired at max attempts dead-letters and clears projection",
			start: with(fxResult, func(d *Dispatch) { d.AttemptCount = 2 }),
			op:    func(d *Dispatch) error { d.ReclaimExpired(now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status = StatusDeadLetter
				d.AttemptCount = 3
				d.LastError = ReasonLeaseExpiredMax
				d.Errors = []AttemptError{{Attempt: 3, Error: ReasonLeaseExpiredMax, At: now}}
				d.CompletedAt, d.UpdatedAt = now, now
			}),
		},
		{
			name:  "reclaim expired with max_attempts 1 dead-letters at once",
			start: with(fxStarted, func(d *Dispatch) { d.MaxAttempts = 1 }),
			op:    func(d *Dispatch) error { d.ReclaimExpired(now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.MaxAttempts = 1
				d.Status = StatusDeadLetter
				d.AttemptCount = 1
				d.LastError = ReasonLeaseExpiredMax
				d.Errors = []AttemptError{{Attempt: 1, Error: ReasonLeaseExpiredMax, At: now}}
				d.CompletedAt, d.UpdatedAt = now, now
			}),
		},
		{
			name:  "record start replaces an old projection",
			start: fxResult,
			op:    func(d *Dispatch) error { return d.RecordStart("inst-2", now) },
			want: with(fxClaimed, func(d *Dispatch) {
				d.InstanceID, d.RunStatus, d.UpdatedAt = "inst-2", RunRunning, now
			}),
		},
		{
			name:    "record start with blank instance id",
			start:   fxClaimed,
			op:      func(d *Dispatch) error { return d.RecordStart(" ", now) },
			wantErr: ErrValidation,
		},
		{
			name:  "record result",
			start: fxStarted,
			op: func(d *Dispatch) error {
				return d.RecordResult(RunResult{RunID: "r1", InstanceID: "inst-1", Status: RunWaiting,
					Termination: &Termination{Type: TermSuspended}, Response: "later", Error: "e"}, now)
			},
			want: with(fxStarted, func(d *Dispatch) {
				d.RunStatus = RunWaiting
				d.Termination = &Termination{Type: TermSuspended}
				d.RunResponse, d.RunError = "later", "e"
				d.CompletedAt, d.UpdatedAt = now, now
			}),
		},
		{
			name:  "record result for another run",
			start: fxStarted,
			op: func(d *Dispatch) error {
				return d.RecordResult(RunResult{RunID: "r2", InstanceID: "inst-1", Status: RunDone}, now)
			},
			wantErr: ErrValidation,
		},
		{
			name:  "record result with unknown status",
			start: fxStarted,
			op: func(d *Dispatch) error {
				return d.RecordResult(RunResult{RunID: "r1", InstanceID: "inst-1", Status: "exploded"}, now)
			},
			wantErr: ErrValidation,
		},
		{
			name:  "supersede queued raises the epoch",
			start: fxQueued,
			op:    func(d *Dispatch) error { d.Supersede(5, ReasonInterrupt, now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status, d.Epoch, d.LastError = StatusSuperseded, 5, ReasonInterrupt
				d.CompletedAt, d.UpdatedAt = now, now
			}),
		},
		{
			name:  "supersede claimed clears claim and projection, never lowers the epoch",
			start: fxResult,
			op:    func(d *Dispatch) error { d.Supersede(1, ReasonStaleBeforeAck, now); return nil },
			want: with(fxQueued, func(d *Dispatch) {
				d.Status, d.Epoch, d.LastError = StatusSuperseded, 2, ReasonStaleBeforeAck
				d.CompletedAt, d.UpdatedAt = now, now
			}),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.start.Clone()
			err := tt.op(&d)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !reflect.DeepEqual(d, tt.start) {
					t.Errorf("failed transition changed the record\n got %+v\nwant %+v", d, tt.start)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if !reflect.DeepEqual(d, tt.want) {
				t.Errorf("record\n got %+v\nwant %+v", d, tt.want)
			}
			if err := d.Validate(); err != nil {
				t.Errorf("result fails Validate: %v", err)
			}
		})
	}
}

// TestRequeue: an operator's requeue builds a fresh queued dispatch for the
// same run and marks the dead letter, which stays terminal.
func TestRequeue(t *testing.T) {
	const now = t0 + 5_000
	d := fxDead.Clone()
	n, err := d.Requeue("d2", 9, now)
	if err != nil {
		t.Fatalf("Requeue: %v", err)
	}
	wantNew := with(fxQueued, func(x *Dispatch) {
		x.DispatchID = "d2"
		x.Epoch = 9
		x.AttemptCount = 0
		x.LastError = "boom-3"
		x.Errors = []AttemptError{{1, "boom-1", t0 + 1}, {2, "boom-2", t0 + 2}, {3, "boom-3", t0 + 3}}
		x.AvailableAt, x.CreatedAt, x.UpdatedAt = now, now, now
	})
	if !reflect.DeepEqual(n, wantNew) {
		t.Errorf("new dispatch\n got %+v\nwant %+v", n, wantNew)
	}
	if err := n.Validate(); err != nil {
		t.Errorf("new dispatch fails Validate: %v", err)
	}
	wantOld := with(fxDead, func(x *Dispatch) { x.RequeuedAs = "d2" })
	if !reflect.DeepEqual(d, wantOld) {
		t.Errorf("dead letter after requeue\n got %+v\nwant %+v", d, wantOld)
	}
	if err := d.Validate(); err != nil {
		t.Errorf("dead letter fails Validate: %v", err)
	}
	n.Errors[0].Error = "changed"
	if d.Errors[0].Error != "boom-1" {
		t.Errorf("new dispatch shares its error history with the dead letter")
	}

	// Twice: ErrAlreadyExists, nothing changes.
	before := d.Clone()
	if _, err := d.Requeue("d3", 10, now+1); !errors.Is(err, ErrAlreadyExists) {
		t.Errorf("second Requeue = %v, want ErrAlreadyExists", err)
	}
	if !reflect.DeepEqual(d, before) {
		t.Errorf("second Requeue changed the dead letter: %+v", d)
	}

	rejects := []struct {
		name  string
		start Dispatch
		newID string
		want  error
	}{
		{"queued", fxQueued, "d2", ErrValidation},
		{"claimed", fxClaimed, "d2", ErrValidation},
		{"acked", with(fxResult, func(x *Dispatch) { x.Ack(t0 + 40) }), "d2", ErrValidation},
		{"cancelled", with(fxQueued, func(x *Dispatch) { x.Cancel(t0 + 40) }), "d2", ErrValidation},
		{"blank new id", fxDead, " ", ErrValidation},
		{"long new id", fxDead, strings.Repeat("d", MaxIDLen+1), ErrValidation},
	}
	for _, tt := range rejects {
		t.Run(tt.name, func(t *testing.T) {
			x := tt.start.Clone()
			if _, err := x.Requeue(tt.newID, 9, now); !errors.Is(err, tt.want) {
				t.Errorf("Requeue = %v, want %v", err, tt.want)
			}
			if !reflect.DeepEqual(x, tt.start) {
				t.Errorf("failed Requeue changed the record: %+v", x)
			}
		})
	}
}

func TestStaleClaimIsVersionConflict(t *testing.T) {
	d := fxClaimed.Clone()
	err := d.Claim("x", "y", t0, t0)
	if !errors.Is(err, ErrStaleClaim) || !errors.Is(err, ErrVersionConflict) {
		t.Fatalf("err = %v, want ErrStaleClaim wrapping ErrVersionConflict", err)
	}
}

// TestNackWorkedExample is store.md rule 61: with max_attempts=2 the first
// nack requeues with attempt 1, the second dead-letters with attempt 2.
func TestNackWorkedExample(t *testing.T) {
	d := with(fxQueued, func(d *Dispatch) { d.MaxAttempts = 2 })
	steps := []struct {
		nackAt       int64
		wantStatus   DispatchStatus
		wantAttempts uint32
		wantAvail    int64
		wantDone     int64
	}{
		{t0 + 100, StatusQueued, 1, t0 + 350, 0},
		{t0 + 500, StatusDeadLetter, 2, t0 + 350, t0 + 500}, // available_at unchanged on dead letter
	}
	for i, st := range steps {
		if err := d.Claim(fmt.Sprintf("tok-%d", i), "consumer", st.nackAt+30_000, st.nackAt-1); err != nil {
			t.Fatalf("step %d: Claim: %v", i, err)
		}
		d.Nack(st.nackAt+250, fmt.Sprintf("err-%d", i), st.nackAt)
		if d.Status != st.wantStatus || d.AttemptCount != st.wantAttempts || d.AvailableAt != st.wantAvail || d.CompletedAt != st.wantDone {
			t.Fatalf("step %d: status %v attempts %d available_at %d completed_at %d; want %v %d %d %d",
				i, d.Status, d.AttemptCount, d.AvailableAt, d.CompletedAt, st.wantStatus, st.wantAttempts, st.wantAvail, st.wantDone)
		}
		if d.ClaimToken != "" || d.ClaimedBy != "" || d.LeaseUntil != 0 {
			t.Errorf("step %d: claim fields not cleared: %+v", i, d)
		}
		if err := d.Validate(); err != nil {
			t.Errorf("step %d: Validate: %v", i, err)
		}
	}
	want := []AttemptError{{1, "err-0", t0 + 100}, {2, "err-1", t0 + 500}}
	if !reflect.DeepEqual(d.Errors, want) || d.LastError != "err-1" {
		t.Errorf("errors = %+v last %q; want %+v last %q", d.Errors, d.LastError, want, "err-1")
	}
	if err := d.Claim("tok-x", "consumer", t0+99_999, t0+1_000); !errors.Is(err, ErrStaleClaim) {
		t.Errorf("claim of dead letter = %v, want ErrStaleClaim", err)
	}
}

func TestNackWithEmptyErrorRecordsNoHistory(t *testing.T) {
	d := fxClaimed.Clone()
	d.LastError = "older"
	d.Nack(t0+500, "", t0+100)
	if d.LastError != "" || len(d.Errors) != 0 || d.AttemptCount != 1 {
		t.Errorf("got last_error %q errors %v attempts %d; want \"\", none, 1", d.LastError, d.Errors, d.AttemptCount)
	}
}

func TestErrorHistoryIsCapped(t *testing.T) {
	const n = MaxErrorHistory + 8
	d := with(fxQueued, func(d *Dispatch) { d.MaxAttempts = 1000 })
	for i := 1; i <= n; i++ {
		now := t0 + int64(i)
		if err := d.Claim("tok", "c", now+1000, now); err != nil {
			t.Fatalf("claim %d: %v", i, err)
		}
		d.Nack(now, fmt.Sprintf("err-%d", i), now)
	}
	if len(d.Errors) != MaxErrorHistory {
		t.Fatalf("len(Errors) = %d, want %d", len(d.Errors), MaxErrorHistory)
	}
	for i, e := range d.Errors {
		attempt := uint32(n - MaxErrorHistory + 1 + i)
		want := AttemptError{Attempt: attempt, Error: fmt.Sprintf("err-%d", attempt), At: t0 + int64(attempt)}
		if e != want {
			t.Fatalf("Errors[%d] = %+v, want %+v (the newest %d kept, oldest first)", i, e, want, MaxErrorHistory)
		}
	}
	if d.LastError != fmt.Sprintf("err-%d", n) || d.AttemptCount != n {
		t.Errorf("last_error %q attempts %d", d.LastError, d.AttemptCount)
	}
	// The capped history must not share storage with an earlier clone.
	c := d.Clone()
	if err := d.Claim("tok", "c", t0+20_000, t0+10_000); err != nil {
		t.Fatalf("claim: %v", err)
	}
	d.DeadLetter("final", t0+10_000)
	if c.Errors[MaxErrorHistory-1].Error != fmt.Sprintf("err-%d", n) {
		t.Errorf("clone's history changed by a later transition: %+v", c.Errors[MaxErrorHistory-1])
	}
	if len(d.Errors) != MaxErrorHistory || d.Errors[MaxErrorHistory-1].Error != "final" {
		t.Errorf("after dead letter: len %d last %+v", len(d.Errors), d.Errors[len(d.Errors)-1])
	}
}

func TestCheckOwner(t *testing.T) {
	tests := []struct {
		name  string
		d     Dispatch
		token string
		ok    bool
	}{
		{"claimed, same token", fxClaimed, "tok-1", true},
		{"claimed, other token", fxClaimed, "tok-2", false},
		{"claimed, empty token", fxClaimed, "", false},
		{"queued, empty token", fxQueued, "", false},
		{"queued, any token", fxQueued, "tok-1", false},
		{"acked, old token", with(fxClaimed, func(d *Dispatch) { d.Ack(t0 + 50) }), "tok-1", false},
		{"released, old token", with(fxClaimed, func(d *Dispatch) { d.Release(t0 + 50) }), "tok-1", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.d.CheckOwner(tt.token)
			if tt.ok && err != nil {
				t.Errorf("CheckOwner = %v, want nil", err)
			}
			if !tt.ok && (!errors.Is(err, ErrStaleClaim) || !errors.Is(err, ErrVersionConflict)) {
				t.Errorf("CheckOwner = %v, want ErrStaleClaim", err)
			}
		})
	}
}

func TestClone(t *testing.T) {
	orig := with(fxResult, func(d *Dispatch) { d.Errors = []AttemptError{{1, "a", t0}} })
	c := orig.Clone()
	if !reflect.DeepEqual(c, orig) {
		t.Fatalf("clone differs: %+v vs %+v", c, orig)
	}
	c.Errors[0].Error = "changed"
	c.Termination.Type = TermError
	if orig.Errors[0].Error != "a" || orig.Termination.Type != TermNaturalEnd {
		t.Errorf("Clone shares storage with the original: %+v %+v", orig.Errors, orig.Termination)
	}
}

func TestRetryDelayMs(t *testing.T) {
	tests := []struct {
		attempt     uint32
		base, limit int64
		want        int64
	}{
		{0, 250, 16_000, 250},
		{1, 250, 16_000, 250},
		{2, 250, 16_000, 500},
		{3, 250, 16_000, 1_000},
		{4, 250, 16_000, 2_000},
		{5, 250, 16_000, 4_000},
		{6, 250, 16_000, 8_000},
		{7, 250, 16_000, 16_000},
		{8, 250, 16_000, 16_000},
		{1_000_000, 250, 16_000, 16_000},
		// capped by max
		{4, 250, 1_500, 1_500},
		{3, 250, 1_000, 1_000},
		{1, 250, 100, 100},
		// the exponent stops at 6 even when max is far away
		{7, 250, 1 << 40, 16_000},
		{8, 250, 1 << 40, 16_000},
		{64, 250, 1 << 40, 16_000},
		{^uint32(0), 250, 1 << 40, 16_000},
		{3, 100, 1 << 40, 400},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("attempt%d_base%d_max%d", tt.attempt, tt.base, tt.limit), func(t *testing.T) {
			if got := RetryDelayMs(tt.attempt, tt.base, tt.limit); got != tt.want {
				t.Errorf("RetryDelayMs(%d, %d, %d) = %d, want %d", tt.attempt, tt.base, tt.limit, got, tt.want)
			}
		})
	}
}

func TestCode(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"nil", nil, ""},
		{"validation", ErrValidation, "validation"},
		{"validationf", Validationf("bad %s", "id"), "validation"},
		{"not found", ErrNotFound, "not_found"},
		{"wrapped not found", fmt.Errorf("load d1: %w", ErrNotFound), "not_found"},
		{"already exists", ErrAlreadyExists, "already_exists"},
		{"wrapped already exists", fmt.Errorf("enqueue: %w", ErrAlreadyExists), "already_exists"},
		{"version conflict", ErrVersionConflict, "conflict"},
		{"stale claim", ErrStaleClaim, "conflict"},
		{"queue full (an agent's SUBMIT answers it so)", fmt.Errorf("submit to t: %w", ErrQueueFull), "unavailable"},
		{"wrapped stale claim", fmt.Errorf("ack: %w", ErrStaleClaim), "conflict"},
		{"conflict error", &ConflictError{What: "message_count", Expected: 3, Actual: 4}, "conflict"},
		{"wrapped conflict error", fmt.Errorf("checkpoint: %w", &ConflictError{What: "dispatch_epoch", Expected: 1, Actual: 2}), "conflict"},
		{"corrupt", ErrCorrupt, "internal"},
		{"wrapped corrupt", fmt.Errorf("key x: %w", ErrCorrupt), "internal"},
		{"unavailable", ErrUnavailable, "unavailable"},
		{"wrapped unavailable", fmt.Errorf("disk: %w", ErrUnavailable), "unavailable"},
		{"data dir in use", ErrDataDirInUse, "unavailable"},
		{"plain error", errors.New("something else"), "internal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Code(tt.err); got != tt.want {
				t.Errorf("Code(%v) = %q, want %q", tt.err, got, tt.want)
			}
		})
	}
}

func TestConflictError(t *testing.T) {
	var err error = fmt.Errorf("append: %w", &ConflictError{What: "message_count", Expected: 3, Actual: 5})
	if !errors.Is(err, ErrVersionConflict) {
		t.Errorf("errors.Is(ConflictError, ErrVersionConflict) = false")
	}
	for _, other := range []error{ErrValidation, ErrNotFound, ErrAlreadyExists, ErrStaleClaim, ErrCorrupt, ErrUnavailable} {
		if errors.Is(err, other) {
			t.Errorf("errors.Is(ConflictError, %v) = true", other)
		}
	}
	var ce *ConflictError
	if !errors.As(err, &ce) || ce.What != "message_count" || ce.Expected != 3 || ce.Actual != 5 {
		t.Fatalf("errors.As = %+v", ce)
	}
	if got, want := ce.Error(), "version conflict: message_count expected 3, actual 5"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !strings.HasPrefix(Validationf("x %d", 1).Error(), "validation error: x 1") {
		t.Errorf("Validationf text = %q", Validationf("x %d", 1).Error())
	}
}
