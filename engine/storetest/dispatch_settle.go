package storetest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// dqOp is one claim-token operation, for the tables of the error cases.
type dqOp struct {
	name string
	call func(h *dq, id, token string, now int64) error
	// staleReason is the last_error a stale epoch leaves.
	staleReason string
}

func dqTokenOps() []dqOp {
	return []dqOp{
		{"Ack", func(h *dq, id, tok string, now int64) error { return h.s.Ack(h.ctx, id, tok, now) }, engine.ReasonStaleBeforeAck},
		{"Nack", func(h *dq, id, tok string, now int64) error {
			_, err := h.s.Nack(h.ctx, id, tok, now+1000, "transient", now)
			return err
		}, engine.ReasonStaleBeforeNack},
		{"DeadLetter", func(h *dq, id, tok string, now int64) error { return h.s.DeadLetter(h.ctx, id, tok, "fatal", now) }, engine.ReasonStaleBeforeDead},
		{"RecordDispatchStart", func(h *dq, id, tok string, now int64) error {
			return h.s.RecordDispatchStart(h.ctx, id, tok, "inst-x", now)
		}, engine.ReasonStaleBeforeStart},
		{"RecordRunResult", func(h *dq, id, tok string, now int64) error {
			return h.s.RecordRunResult(h.ctx, id, tok, engine.RunResult{RunID: "run-" + id, InstanceID: "inst-x", Status: engine.RunDone}, now)
		}, engine.ReasonStaleBeforeResult},
		{"Release", func(h *dq, id, tok string, now int64) error {
			_, err := h.s.Release(h.ctx, id, tok, now)
			return err
		}, engine.ReasonStaleBeforeRelease},
	}
}

// dqStaleRule names the store.md rule of each operation's stale-epoch path.
var dqStaleRule = map[string]string{
	"Ack":                 "S49_ack",
	"Nack":                "S58_nack",
	"DeadLetter":          "S63_dead_letter",
	"RecordDispatchStart": "S54_record_dispatch_start",
	"RecordRunResult":     "S56_record_run_result",
	"Release":             "Release",
}

// superseded returns what superseding claimed record c at now under the
// thread epoch leaves: the claim and projection cleared, the epoch raised.
func dqSuperseded(c engine.Dispatch, epoch uint64, reason string, now int64) engine.Dispatch {
	c.Status = engine.StatusSuperseded
	if epoch > c.Epoch {
		c.Epoch = epoch
	}
	c.LastError = reason
	c.ClaimToken, c.ClaimedBy, c.LeaseUntil = "", "", 0
	c.InstanceID, c.RunStatus, c.Termination, c.RunResponse, c.RunError = "", "", nil, "", ""
	c.CompletedAt = now
	c.UpdatedAt = now
	return c
}

func dispatchTokenCases() []Case {
	var cases []Case
	cases = append(cases,
		Case{"S48_S53_S58_S63_unknown_dispatch_is_not_found", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.addClaimed("d1", "t1", 1000) // the store is not empty
			for _, op := range dqTokenOps() {
				err := op.call(h, "missing", "tok", 2000)
				dqWantErr(t, op.name+"(missing)", err, engine.ErrNotFound)
			}
			_, err := s.Requeue(h.ctx, "missing", "missing-r1", 2000)
			dqWantErr(t, "Requeue(missing)", err, engine.ErrNotFound)
			ok, err := s.ExtendLease(h.ctx, "missing", "tok", dqLease, 2000)
			if ok || err != nil {
				t.Fatalf("ExtendLease(missing) = %v, %v; want false, nil", ok, err)
			}
			d, err := s.SupersedeClaimed(h.ctx, "missing", "tok", "reason", 2000)
			if d != nil || err != nil {
				t.Fatalf("SupersedeClaimed(missing) = %v, %v; want nil, nil", d, err)
			}
			c, err := s.Cancel(h.ctx, "missing", 2000)
			if c != nil || err != nil {
				t.Fatalf("Cancel(missing) = %v, %v; want nil, nil", c, err)
			}
		}},
		Case{"S48_S53_S58_S63_wrong_token_is_stale_claim_and_changes_nothing", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			before := h.load("d1")
			for _, op := range dqTokenOps() {
				for _, tok := range []string{"wrong-token", ""} {
					err := op.call(h, "d1", tok, 2000)
					dqWantErr(t, fmt.Sprintf("%s(token %q)", op.name, tok), err, engine.ErrStaleClaim)
					dqWantErr(t, fmt.Sprintf("%s(token %q)", op.name, tok), err, engine.ErrVersionConflict)
					h.same(before)
				}
			}
			_, err := s.SupersedeClaimed(h.ctx, "d1", "wrong-token", "reason", 2000)
			dqWantErr(t, "SupersedeClaimed(wrong token)", err, engine.ErrStaleClaim)
			h.same(before)
		}},
		Case{"S51_token_operations_require_claimed_status", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// A queued dispatch has no token to match.
			q := h.add("q", "t1", 1000)
			// A dispatch that moved on leaves its old token dead.
			a := h.addClaimed("acked", "t2", 1000)
			h.ack("acked", a.ClaimToken, 2000)
			n := h.addClaimed("nacked", "t3", 1000)
			h.nack("nacked", n.ClaimToken, 1000, "transient", 2000)
			r := h.addClaimed("released", "t4", 1000)
			h.release("released", r.ClaimToken, 2000)
			dl := h.addClaimed("dead", "t5", 1000)
			h.deadLetter("dead", dl.ClaimToken, "fatal", 2000)
			tokens := map[string]string{"q": "", "acked": a.ClaimToken, "nacked": n.ClaimToken, "released": r.ClaimToken, "dead": dl.ClaimToken}
			for id, tok := range tokens {
				before := h.load(id)
				for _, op := range dqTokenOps() {
					err := op.call(h, id, tok, 3000)
					dqWantErr(t, fmt.Sprintf("%s(%s, old token)", op.name, id), err, engine.ErrStaleClaim)
					h.same(before)
				}
			}
			h.same(q)
		}},
		Case{"S52_I02_I03_late_ack_from_previous_owner_after_reclaim_fails", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("d1", "t1", 1000)
			old := h.claim("t1", "owner-1", 1000)
			dqWantIDs(t, "reclaimed", h.reclaim(old.LeaseUntil+1, 10), "d1")
			cur := h.claim("t1", "owner-2", old.LeaseUntil+1)
			if cur.ClaimToken == old.ClaimToken {
				t.Fatalf("re-claim reused the old token")
			}
			before := h.load("d1")
			for _, op := range dqTokenOps() {
				err := op.call(h, "d1", old.ClaimToken, old.LeaseUntil+2)
				dqWantErr(t, op.name+" with the previous owner's token", err, engine.ErrStaleClaim)
				h.same(before)
			}
			if ok, err := s.ExtendLease(h.ctx, "d1", old.ClaimToken, dqLease, old.LeaseUntil+2); ok || err != nil {
				t.Fatalf("ExtendLease with old token = %v, %v; want false, nil", ok, err)
			}
			h.same(before)
			if before.ClaimedBy != "owner-2" || before.ClaimToken != cur.ClaimToken {
				t.Fatalf("new claim lost: by=%q", before.ClaimedBy)
			}
			h.ack("d1", cur.ClaimToken, old.LeaseUntil+3)
			h.status("d1", engine.StatusAcked)
		}},
	)
	for _, op := range dqTokenOps() {
		cases = append(cases, Case{dqStaleRule[op.name] + "_stale_epoch_supersedes_and_conflicts", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			started := h.load("d1")
			h.add("other", "t2", 1000)
			h.interrupt("t1", 2000)
			err := op.call(h, "d1", c.ClaimToken, 3000)
			dqWantConflict(t, op.name+" after interrupt", err, 0, 1)
			got := h.load("d1")
			dqEqual(t, "stale "+op.name, got, dqSuperseded(started, 1, op.staleReason, 3000))
			// The superseded dispatch is dead for every later call.
			err = op.call(h, "d1", c.ClaimToken, 4000)
			dqWantErr(t, op.name+" again", err, engine.ErrVersionConflict)
			h.same(got)
			h.status("other", engine.StatusQueued)
		}})
	}
	return cases
}

func dispatchAckCases() []Case {
	return []Case{
		{"S50_A07_B07_ack_transitions_to_acked", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.ack("d1", c.ClaimToken, 2000)
			want := c
			want.Status = engine.StatusAcked
			want.ClaimToken, want.ClaimedBy, want.LeaseUntil = "", "", 0
			want.CompletedAt, want.UpdatedAt = 2000, 2000
			dqEqual(t, "acked", h.load("d1"), want)
		}},
		{"S50_C12_ack_keeps_runtime_projection", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			value, _ := json.Marshal("policy")
			res := engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: &engine.Termination{Type: engine.TermBlocked, Value: value}, Response: "partial", Error: "policy"}
			h.result("d1", c.ClaimToken, res, 2000)
			withResult := h.status("d1", engine.StatusClaimed)
			h.ack("d1", c.ClaimToken, 3000)
			want := withResult
			want.Status = engine.StatusAcked
			want.ClaimToken, want.ClaimedBy, want.LeaseUntil = "", "", 0
			want.CompletedAt, want.UpdatedAt = 3000, 3000
			dqEqual(t, "acked with projection", h.load("d1"), want)
		}},
		{"B5_ack_retry_after_recorded_result", func(t *testing.T, s engine.Store) {
			// lessons.md B5: after a recorded result the engine reloads the
			// dispatch when its ack failed; it must still find it claimed
			// under its token with run_status done, and the retried ack
			// must succeed and keep the result.
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			h.result("d1", c.ClaimToken, engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "ok"}, 1200)
			got := h.load("d1")
			if got.Status != engine.StatusClaimed || got.ClaimToken != c.ClaimToken || got.RunStatus != engine.RunDone {
				t.Fatalf("after result: %s token same %v run_status %q; want claimed, same token, done", got.Status, got.ClaimToken == c.ClaimToken, got.RunStatus)
			}
			h.ack("d1", c.ClaimToken, 20_000)
			got = h.status("d1", engine.StatusAcked)
			if got.RunStatus != engine.RunDone || got.RunResponse != "ok" || got.InstanceID != "inst-1" {
				t.Fatalf("acked projection: run_status %q response %q instance %q", got.RunStatus, got.RunResponse, got.InstanceID)
			}
			dqWantIDs(t, "reclaim after ack", h.reclaim(50_000, 10))
		}},
		{"S51_second_ack_fails", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.ack("d1", c.ClaimToken, 2000)
			acked := h.load("d1")
			err := s.Ack(h.ctx, "d1", c.ClaimToken, 3000)
			dqWantErr(t, "second Ack", err, engine.ErrStaleClaim)
			h.same(acked)
		}},
	}
}

func dispatchRecordCases() []Case {
	return []Case{
		{"S55_A31_record_dispatch_start_marks_running", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "attempt-1", 1500)
			want := c
			want.InstanceID, want.RunStatus, want.UpdatedAt = "attempt-1", engine.RunRunning, 1500
			dqEqual(t, "started", h.load("d1"), want)
		}},
		{"S55_record_dispatch_start_clears_previous_result", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.result("d1", c.ClaimToken, engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "ok", Error: "e"}, 1500)
			h.start("d1", c.ClaimToken, "inst-2", 2000)
			want := c
			want.InstanceID, want.RunStatus, want.UpdatedAt = "inst-2", engine.RunRunning, 2000
			dqEqual(t, "restarted", h.load("d1"), want)
		}},
		{"S53_C13_record_dispatch_start_rejects_bad_input", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			err := s.RecordDispatchStart(h.ctx, "d1", "stale-token", "inst-1", 1500)
			dqWantErr(t, "RecordDispatchStart(wrong token)", err, engine.ErrVersionConflict)
			err = s.RecordDispatchStart(h.ctx, "d1", c.ClaimToken, "", 1500)
			dqWantErr(t, "RecordDispatchStart(blank instance)", err, engine.ErrValidation)
			h.same(c)
			if d := h.load("d1"); d.RunStatus != "" || d.InstanceID != "" {
				t.Fatalf("run_status=%q instance=%q after rejected starts, want empty", d.RunStatus, d.InstanceID)
			}
		}},
		{"S57_A32_record_run_result_sets_projection", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1500)
			res := engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "ok"}
			h.result("d1", c.ClaimToken, res, 2000)
			want := c
			want.InstanceID, want.RunStatus, want.Termination, want.RunResponse = "inst-1", engine.RunDone, res.Termination, "ok"
			want.CompletedAt, want.UpdatedAt = 2000, 2000
			dqEqual(t, "with result", h.load("d1"), want)
		}},
		{"S57_record_run_result_without_instance_keeps_the_started_one", func(t *testing.T, s engine.Store) {
			// A result that names no instance (a cancel settling an
			// attempt before it knew its instance id) does not wipe the
			// instance the start recorded, in the dispatch or its run.
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1500)
			res := engine.RunResult{RunID: "run-d1", Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
			h.result("d1", c.ClaimToken, res, 2000)
			if d := h.load("d1"); d.InstanceID != "inst-1" || d.RunStatus != engine.RunDone {
				t.Fatalf("instance %q run status %q after a result without instance, want inst-1 and done", d.InstanceID, d.RunStatus)
			}
		}},
		{"S56_B10_record_run_result_rejects_bad_input", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			ok := engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone, Error: "boom"}
			err := s.RecordRunResult(h.ctx, "d1", "stale-token", ok, 1500)
			dqWantErr(t, "RecordRunResult(wrong token)", err, engine.ErrStaleClaim)
			other := ok
			other.RunID = "run-other"
			err = s.RecordRunResult(h.ctx, "d1", c.ClaimToken, other, 1500)
			dqWantErr(t, "RecordRunResult(other run id)", err, engine.ErrValidation)
			bad := ok
			bad.Status = "finished"
			err = s.RecordRunResult(h.ctx, "d1", c.ClaimToken, bad, 1500)
			dqWantErr(t, "RecordRunResult(unknown status)", err, engine.ErrValidation)
			h.same(c)
		}},
	}
}

func dispatchNackCases() []Case {
	return []Case{
		{"S59_B11_C08_nack_requeues_with_attempt_and_retry_at", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 3
			h.enqueue(d)
			c := h.claimID("d1", "c1", 1000)
			got := h.nack("d1", c.ClaimToken, 5000, "transient", 2000)
			want := c
			want.Status = engine.StatusQueued
			want.ClaimToken, want.ClaimedBy, want.LeaseUntil = "", "", 0
			want.AttemptCount = 1
			want.AvailableAt = 5000
			want.LastError = "transient"
			want.Errors = []engine.AttemptError{{Attempt: 1, Error: "transient", At: 2000}}
			want.UpdatedAt = 2000
			dqEqual(t, "returned record", got, want)
			dqEqual(t, "stored record", h.load("d1"), want)
		}},
		{"S59_C09_nack_dead_letters_at_max_attempts", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 1
			h.enqueue(d)
			c := h.claimID("d1", "c1", 1000)
			got := h.nack("d1", c.ClaimToken, 9000, "fatal", 2000)
			want := c
			want.Status = engine.StatusDeadLetter
			want.ClaimToken, want.ClaimedBy, want.LeaseUntil = "", "", 0
			want.AttemptCount = 1
			want.LastError = "fatal"
			want.Errors = []engine.AttemptError{{Attempt: 1, Error: "fatal", At: 2000}}
			want.CompletedAt, want.UpdatedAt = 2000, 2000
			// The projection says the run failed, as a DeadLetter's does
			// (docs/store.md; rule 59 lists no projection change).
			want.RunStatus, want.Termination, want.RunError = engine.RunDone, engine.ErrorTermination("fatal"), "fatal"
			dqEqual(t, "returned record", got, want) // available_at unchanged (1000)
			dqEqual(t, "stored record", h.load("d1"), want)
			h.claimNone("t1", 10_000)
		}},
		{"S60_nack_requeue_clears_projection_and_completed_at", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			h.result("d1", c.ClaimToken, engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: engine.ErrorTermination("boom"), Error: "boom"}, 1200)
			got := h.nack("d1", c.ClaimToken, 3000, "boom", 2000)
			stored := h.load("d1")
			dqEqual(t, "returned vs stored", got, stored)
			if stored.Status != engine.StatusQueued || stored.CompletedAt != 0 {
				t.Fatalf("status=%s completed_at=%d, want queued and 0", stored.Status, stored.CompletedAt)
			}
			dqNoProjection(t, stored)
			dqNoClaim(t, stored)
		}},
		{"S61_B12_nack_worked_example_max_attempts_2", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 2
			h.enqueue(d)
			c := h.claimID("d1", "c1", 1000)
			if got := h.nack("d1", c.ClaimToken, 1000, "e1", 1100); got.Status != engine.StatusQueued || got.AttemptCount != 1 {
				t.Fatalf("first nack: %s attempt %d, want queued attempt 1", got.Status, got.AttemptCount)
			}
			c = h.claim("t1", "c1", 1200)
			if got := h.nack("d1", c.ClaimToken, 1000, "e2", 1300); got.Status != engine.StatusDeadLetter || got.AttemptCount != 2 {
				t.Fatalf("second nack: %s attempt %d, want dead_letter attempt 2", got.Status, got.AttemptCount)
			}
			got := h.status("d1", engine.StatusDeadLetter)
			if got.AttemptCount != 2 || got.CompletedAt != 1300 || got.LastError != "e2" {
				t.Fatalf("stored attempt=%d completed_at=%d last_error=%q, want 2, 1300, e2", got.AttemptCount, got.CompletedAt, got.LastError)
			}
		}},
		{"S62_B34_nacked_dispatch_claimable_from_retry_at", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.nack("d1", c.ClaimToken, 5000, "transient", 2000)
			h.claimNone("t1", 4999)
			if got := h.claim("t1", "c1", 5000); got.DispatchID != "d1" || got.AttemptCount != 1 {
				t.Fatalf("claim at retry_at = %s attempt %d", got.DispatchID, got.AttemptCount)
			}
			// claim_dispatch ignores the retry window.
			c2 := h.addClaimed("d2", "t2", 1000)
			h.nack("d2", c2.ClaimToken, 9000, "transient", 2000)
			h.claimID("d2", "c1", 2001)
		}},
		{"ErrorHistory_grows_one_entry_per_nack_and_survives_dead_letter", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 4
			h.enqueue(d)
			var want []engine.AttemptError
			now := int64(1000)
			for i := 1; i <= 3; i++ {
				c := h.claim("t1", "c1", now)
				msg := fmt.Sprintf("error %d", i)
				got := h.nack("d1", c.ClaimToken, now+10, msg, now+5)
				want = append(want, engine.AttemptError{Attempt: uint32(i), Error: msg, At: now + 5})
				dqEqual(t, fmt.Sprintf("after nack %d", i), h.load("d1"), got)
				if got.LastError != msg || len(got.Errors) != i {
					t.Fatalf("after nack %d: last_error=%q history=%d entries", i, got.LastError, len(got.Errors))
				}
				now += 100
			}
			c := h.claim("t1", "c1", now)
			h.deadLetter("d1", c.ClaimToken, "permanent", now+5)
			// The fourth attempt's error: a dead letter spends no attempt,
			// but numbers the one that failed.
			want = append(want, engine.AttemptError{Attempt: 4, Error: "permanent", At: now + 5})
			got := h.status("d1", engine.StatusDeadLetter)
			if fmt.Sprint(got.Errors) != fmt.Sprint(want) {
				t.Fatalf("error history = %+v, want %+v", got.Errors, want)
			}
		}},
		{"ErrorHistory_keeps_the_last_32_entries", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 100
			h.enqueue(d)
			const n = engine.MaxErrorHistory + 8
			for i := 1; i <= n; i++ {
				now := int64(1000 + 10*i)
				c := h.claim("t1", "c1", now)
				h.nack("d1", c.ClaimToken, now, fmt.Sprintf("e%d", i), now+1)
			}
			got := h.load("d1")
			if len(got.Errors) != engine.MaxErrorHistory {
				t.Fatalf("history has %d entries, want %d", len(got.Errors), engine.MaxErrorHistory)
			}
			first, last := got.Errors[0], got.Errors[len(got.Errors)-1]
			if first.Attempt != n-engine.MaxErrorHistory+1 || last.Attempt != n || last.Error != fmt.Sprintf("e%d", n) {
				t.Fatalf("history spans attempts %d..%d (last %q), want %d..%d", first.Attempt, last.Attempt, last.Error, n-engine.MaxErrorHistory+1, n)
			}
			if got.AttemptCount != n {
				t.Fatalf("attempt_count = %d, want %d", got.AttemptCount, n)
			}
		}},
	}
}

func dispatchDeadLetterCancelCases() []Case {
	return []Case{
		{"S64_B13_C10_dead_letter_is_terminal_without_spending_attempt", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.nack("d1", c.ClaimToken, 1000, "transient", 1500)
			c = h.claim("t1", "c2", 2000)
			h.deadLetter("d1", c.ClaimToken, "fatal", 3000)
			want := c
			want.Status = engine.StatusDeadLetter
			want.ClaimToken, want.ClaimedBy, want.LeaseUntil = "", "", 0
			want.LastError = "fatal"
			want.Errors = append(want.Errors, engine.AttemptError{Attempt: 2, Error: "fatal", At: 3000})
			want.CompletedAt, want.UpdatedAt = 3000, 3000
			// Without a recorded result the failure is the projection.
			want.RunStatus, want.Termination, want.RunError = engine.RunDone, engine.ErrorTermination("fatal"), "fatal"
			dqEqual(t, "dead letter", h.load("d1"), want)
			if want.AttemptCount != 1 {
				t.Fatalf("attempt_count = %d, want 1 (dead_letter spends none)", want.AttemptCount)
			}
			h.claimNone("t1", 10_000)
			h.claimIDNone("d1", 10_000)
		}},
		{"S65_A11_B14_C14_cancel_queued_dispatch", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			q := h.add("d1", "t1", 1000)
			got := h.cancel("d1", 2000)
			want := q
			want.Status = engine.StatusCancelled
			want.CompletedAt, want.UpdatedAt = 2000, 2000
			dqEqual(t, "returned record", got, want)
			dqEqual(t, "stored record", h.load("d1"), want)
			// A delayed dispatch can be cancelled too.
			h.add("d2", "t1", 99_000)
			if got := h.cancel("d2", 2000); got.Status != engine.StatusCancelled {
				t.Fatalf("cancel of delayed dispatch: %s", got.Status)
			}
			h.claimNone("t1", 100_000)
		}},
		{"S66_C14_cancel_returns_nil_for_missing_claimed_or_terminal", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			claimed := h.addClaimed("claimed", "t1", 1000)
			h.add("cancelled", "t2", 1000)
			h.cancel("cancelled", 1500)
			a := h.addClaimed("acked", "t3", 1000)
			h.ack("acked", a.ClaimToken, 1500)
			h.add("superseded", "t4", 1000)
			h.interrupt("t4", 1500)
			dl := h.addClaimed("dead", "t5", 1000)
			h.deadLetter("dead", dl.ClaimToken, "fatal", 1500)
			h.same(claimed)
			for _, id := range []string{"missing", "claimed", "cancelled", "acked", "superseded", "dead"} {
				var before *engine.Dispatch
				if id != "missing" {
					b := h.load(id)
					before = &b
				}
				got, err := s.Cancel(h.ctx, id, 2000)
				if err != nil || got != nil {
					t.Fatalf("Cancel(%s) = %v, %v; want nil, nil", id, got, err)
				}
				if before != nil {
					h.same(*before)
				} else {
					h.absent(id)
				}
			}
		}},
		{"S67_C20_D25_cancel_frees_dedupe_key_and_queued_thread", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.DedupeKey = "k"
			h.enqueue(d)
			h.add("o1", "t2", 1000)
			h.cancel("d1", 2000)
			dqWantStrings(t, "QueuedThreadIDs", h.queuedThreads(), "t2")
			d2 := dqQueued("d2", "t1", 128, 3000)
			d2.DedupeKey = "k"
			h.enqueue(d2)
			dqWantStrings(t, "QueuedThreadIDs", h.queuedThreads(), "t1", "t2")
		}},
	}
}

func dispatchLeaseCases() []Case {
	return []Case{
		{"S68_A14_B16_C17_extend_lease_false_cases_change_nothing", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			q := h.add("q", "t2", 1000)
			a := h.addClaimed("acked", "t3", 1000)
			h.ack("acked", a.ClaimToken, 1500)
			acked := h.load("acked")
			for _, tc := range []struct{ id, tok string }{
				{"missing", "tok"}, {"d1", "wrong-token"}, {"d1", ""}, {"q", ""}, {"q", "tok"}, {"acked", a.ClaimToken},
			} {
				ok, err := s.ExtendLease(h.ctx, tc.id, tc.tok, 60*dqLease, 15_000)
				if ok || err != nil {
					t.Fatalf("ExtendLease(%s, %q) = %v, %v; want false, nil", tc.id, tc.tok, ok, err)
				}
			}
			h.same(c)
			h.same(q)
			h.same(acked)
			h.absent("missing")
		}},
		{"S69_extend_lease_stale_epoch_supersedes_and_returns_false", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.interrupt("t1", 2000)
			ok, err := s.ExtendLease(h.ctx, "d1", c.ClaimToken, dqLease, 3000)
			if ok || err != nil {
				t.Fatalf("ExtendLease after interrupt = %v, %v; want false, nil", ok, err)
			}
			dqEqual(t, "superseded", h.load("d1"), dqSuperseded(c, 1, engine.ReasonStaleDuringRenewal, 3000))
		}},
		{"S71_extend_lease_failure_is_an_error_not_false", func(t *testing.T, s engine.Store) {
			// A store that cannot serve the call must say so with an error;
			// false is reserved for "not yours" (rule 68). A cancelled
			// context is the one failure a caller can cause portably.
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			ctx, cancel := context.WithCancel(h.ctx)
			cancel()
			ok, err := s.ExtendLease(ctx, "d1", c.ClaimToken, 2*dqLease, 15_000)
			switch {
			case err != nil && ok:
				t.Fatalf("ExtendLease = true with error %v", err)
			case err != nil:
				h.same(c)
			case !ok:
				t.Fatalf("ExtendLease with a cancelled context = false, nil; want an error (or true if the store ignores the context)")
			default:
				if got := h.load("d1"); got.LeaseUntil != 75_000 {
					t.Fatalf("ExtendLease reported true but lease_until = %d, want 75000", got.LeaseUntil)
				}
			}
		}},
		{"S70_A13_B15_C17_extend_lease_sets_now_plus_extension", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			ok, err := s.ExtendLease(h.ctx, "d1", c.ClaimToken, 2*dqLease, 15_000)
			if !ok || err != nil {
				t.Fatalf("ExtendLease = %v, %v; want true, nil", ok, err)
			}
			want := c
			want.LeaseUntil, want.UpdatedAt = 75_000, 15_000
			dqEqual(t, "extended", h.load("d1"), want)
			// The lease can shorten: it is now + extension, not old + extension.
			ok, err = s.ExtendLease(h.ctx, "d1", c.ClaimToken, dqLease/30, 20_000)
			if !ok || err != nil {
				t.Fatalf("second ExtendLease = %v, %v; want true, nil", ok, err)
			}
			want.LeaseUntil, want.UpdatedAt = 21_000, 20_000
			dqEqual(t, "shortened", h.load("d1"), want)
			// The shortened lease is what reclaim sees.
			dqWantIDs(t, "reclaim(21001)", h.reclaim(21_001, 10), "d1")
		}},
	}
}

func dispatchReleaseRequeueCases() []Case {
	return []Case{
		{"Release_returns_claimed_to_queued_without_spending_attempt", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// An inline dispatch guarded 60 s into the future.
			q := h.add("d1", "t1", 61_000)
			c := h.claimID("d1", "c1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			got := h.release("d1", c.ClaimToken, 2000)
			want := q
			want.AvailableAt, want.UpdatedAt = 2000, 2000
			dqEqual(t, "returned record", got, want)
			dqEqual(t, "stored record", h.load("d1"), want)
			err := s.Ack(h.ctx, "d1", c.ClaimToken, 2100)
			dqWantErr(t, "Ack with the released token", err, engine.ErrStaleClaim)
			again := h.claim("t1", "c2", 2000)
			if again.DispatchID != "d1" || again.ClaimToken == c.ClaimToken || again.AttemptCount != 0 {
				t.Fatalf("re-claim = %s attempt %d (token reused: %v)", again.DispatchID, again.AttemptCount, again.ClaimToken == c.ClaimToken)
			}
		}},
		{"Requeue_creates_a_fresh_queued_dispatch_for_the_dead_letter", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			d := dqQueued("d1", "t1", 9, 1000)
			d.MaxAttempts = 2
			d.DedupeKey = "k"
			h.enqueue(d)
			c := h.claimID("d1", "c1", 1000)
			h.nack("d1", c.ClaimToken, 1000, "e1", 1100)
			c = h.claim("t1", "c1", 1200)
			h.start("d1", c.ClaimToken, "inst-2", 1250)
			dead := h.nack("d1", c.ClaimToken, 1000, "e2", 1300)
			if dead.Status != engine.StatusDeadLetter {
				t.Fatalf("status %s, want dead_letter", dead.Status)
			}
			h.runSettled("run-d1", "d1", 1300, "e2")
			h.interrupt("t1", 1400) // requeue stamps the current epoch
			got := h.requeue("d1", "d1-r1", 5000)
			want := dead
			want.DispatchID = "d1-r1"
			want.Status = engine.StatusQueued
			want.AttemptCount = 0
			want.Epoch = 1
			want.CreatedAt, want.AvailableAt, want.UpdatedAt, want.CompletedAt = 5000, 5000, 5000, 0
			want.InstanceID, want.RunStatus, want.Termination, want.RunResponse, want.RunError = "", "", nil, "", ""
			dqEqual(t, "returned record", got, want)
			dqEqual(t, "stored record", h.load("d1-r1"), want)
			if len(got.Errors) != 2 || got.LastError != "e2" || got.RunID != "run-d1" {
				t.Fatalf("requeued: %d history entries, last_error %q, run %q; want 2, e2, run-d1", len(got.Errors), got.LastError, got.RunID)
			}
			// The dead letter stays terminal, marked, and leaves the listing.
			marked := dead
			marked.RequeuedAs = "d1-r1"
			dqEqual(t, "old dead letter", h.load("d1"), marked)
			dqWantIDs(t, "ListDeadLetters", h.deadLetters(10, 0))
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusDeadLetter: 1, engine.StatusQueued: 1})
			// The run is reopened for the new dispatch.
			r := h.loadRun("run-d1")
			if r.Status != engine.RunCreated || r.TerminationReason != nil || len(r.ErrorPayload) != 0 || r.FinishedAt != 0 ||
				r.DispatchID != "d1-r1" || r.UpdatedAt != 5 {
				t.Fatalf("run after requeue: status %s termination %s error_payload %s finished %d dispatch %q updated %d; want created, none, none, 0, d1-r1, 5",
					r.Status, dqTermString(r.TerminationReason), r.ErrorPayload, r.FinishedAt, r.DispatchID, r.UpdatedAt)
			}
			// The new dispatch holds the dedupe key.
			dup := dqQueued("d2", "t1", 128, 5000)
			dup.DedupeKey = "k"
			_, err := s.Enqueue(h.ctx, dup)
			dqWantErr(t, "Enqueue with the key of the requeued dispatch", err, engine.ErrAlreadyExists)
			// Claimable at once, with a fresh attempt budget; a second dead
			// letter settles the run again.
			c = h.claim("t1", "c1", 5000)
			if c.DispatchID != "d1-r1" {
				t.Fatalf("claimed %s, want d1-r1", c.DispatchID)
			}
			if got := h.nack("d1-r1", c.ClaimToken, 5000, "e3", 5100); got.Status != engine.StatusQueued || got.AttemptCount != 1 || len(got.Errors) != 3 {
				t.Fatalf("nack after requeue: %s attempt %d history %d, want queued attempt 1 history 3", got.Status, got.AttemptCount, len(got.Errors))
			}
			c = h.claim("t1", "c1", 6000)
			h.deadLetter("d1-r1", c.ClaimToken, "e4", 7000)
			h.runSettled("run-d1", "d1-r1", 7000, "e4")
		}},
		{"Requeue_refuses_a_dead_letter_whose_run_moved_on", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// The run was taken over by a later dispatch (a continuation)
			// before d1 dead-lettered, so d1's dead letter left it alone.
			run := dqRun("run-x", "t1", engine.RunRunning)
			run.DispatchID = "later"
			h.createRun(run)
			d := dqQueued("d1", "t1", 128, 1000)
			d.RunID = "run-x"
			h.enqueue(d)
			c := h.claimID("d1", "c1", 1000)
			h.deadLetter("d1", c.ClaimToken, "fatal", 1500)
			before, runBefore := h.load("d1"), h.loadRun("run-x")
			if runBefore.Status != engine.RunRunning || runBefore.DispatchID != "later" {
				t.Fatalf("the dead letter touched the run of a later dispatch: %s, dispatch %q", runBefore.Status, runBefore.DispatchID)
			}
			_, err := s.Requeue(h.ctx, "d1", "d1-r1", 2000)
			dqWantErr(t, "Requeue of a dead letter whose run moved on", err, engine.ErrVersionConflict)
			h.same(before)
			h.absent("d1-r1")
			h.runUnchanged(runBefore)
			h.wantCounts(map[engine.DispatchStatus]int64{engine.StatusDeadLetter: 1})
		}},
		{"Requeue_rejects_bad_requests", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.add("queued", "t1", 1000)
			h.addClaimed("claimed", "t2", 1000)
			a := h.addClaimed("acked", "t3", 1000)
			h.ack("acked", a.ClaimToken, 1500)
			h.add("cancelled", "t4", 1000)
			h.cancel("cancelled", 1500)
			h.add("superseded", "t5", 1000)
			h.interrupt("t5", 1500)
			for _, id := range []string{"queued", "claimed", "acked", "cancelled", "superseded"} {
				before := h.load(id)
				_, err := s.Requeue(h.ctx, id, id+"-r1", 2000)
				dqWantErr(t, "Requeue("+id+")", err, engine.ErrValidation)
				h.same(before)
				h.absent(id + "-r1")
			}
			_, err := s.Requeue(h.ctx, "missing", "missing-r1", 2000)
			dqWantErr(t, "Requeue(missing)", err, engine.ErrNotFound)
			h.absent("missing-r1")

			d := dqQueued("dead", "t6", 128, 1000)
			d.DedupeKey = "k"
			h.enqueue(d)
			c := h.claimID("dead", "c1", 1000)
			h.deadLetter("dead", c.ClaimToken, "fatal", 1500)
			dead := h.load("dead")
			for _, bad := range []string{"", "  ", strings.Repeat("n", engine.MaxIDLen+1)} {
				_, err := s.Requeue(h.ctx, "dead", bad, 2000)
				dqWantErr(t, fmt.Sprintf("Requeue to new id %q", bad), err, engine.ErrValidation)
			}
			// The new id must be new.
			for _, taken := range []string{"dead", "queued", "acked"} {
				_, err := s.Requeue(h.ctx, "dead", taken, 2000)
				dqWantErr(t, "Requeue to existing id "+taken, err, engine.ErrAlreadyExists)
			}
			// The dedupe key must be free.
			holder := dqQueued("holder", "t6", 128, 1600)
			holder.DedupeKey = "k"
			h.enqueue(holder)
			_, err = s.Requeue(h.ctx, "dead", "dead-r1", 2000)
			dqWantErr(t, "Requeue while the dedupe key is held", err, engine.ErrAlreadyExists)
			h.absent("dead-r1")
			h.same(dead)
			h.cancel("holder", 1700)
			h.requeue("dead", "dead-r1", 2000)
			h.status("dead-r1", engine.StatusQueued)
			// Only once (a dispatch without a dedupe key, so only the
			// requeued mark can refuse it), even after the copy finished.
			c = h.addClaimed("once", "t7", 1000)
			h.deadLetter("once", c.ClaimToken, "fatal", 1500)
			first := h.requeue("once", "once-r1", 2000)
			_, err = s.Requeue(h.ctx, "once", "once-r2", 2100)
			dqWantErr(t, "second Requeue", err, engine.ErrAlreadyExists)
			h.absent("once-r2")
			h.cancel(first.DispatchID, 2200)
			_, err = s.Requeue(h.ctx, "once", "once-r3", 2300)
			dqWantErr(t, "Requeue after the copy was cancelled", err, engine.ErrAlreadyExists)
			h.absent("once-r3")
		}},
	}
}

func dispatchSupersedeCases() []Case {
	return []Case{
		{"S78_supersede_claimed_nil_for_missing_or_not_claimed", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			q := h.add("q", "t1", 1000)
			a := h.addClaimed("acked", "t2", 1000)
			h.ack("acked", a.ClaimToken, 1500)
			acked := h.load("acked")
			for _, tc := range []struct{ id, tok string }{{"missing", "tok"}, {"q", ""}, {"q", "tok"}, {"acked", a.ClaimToken}} {
				got, err := s.SupersedeClaimed(h.ctx, tc.id, tc.tok, "reason", 2000)
				if got != nil || err != nil {
					t.Fatalf("SupersedeClaimed(%s) = %v, %v; want nil, nil", tc.id, got, err)
				}
			}
			h.same(q)
			h.same(acked)
		}},
		{"S79_supersede_claimed_terminalizes_and_raises_epoch", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			started := h.load("d1")
			h.interrupt("t1", 1500)
			got, err := s.SupersedeClaimed(h.ctx, "d1", c.ClaimToken, "cancelled by interrupt", 2000)
			if err != nil || got == nil {
				t.Fatalf("SupersedeClaimed = %v, %v", got, err)
			}
			want := dqSuperseded(started, 1, "cancelled by interrupt", 2000)
			dqEqual(t, "returned record", *got, want)
			dqEqual(t, "stored record", h.load("d1"), want)
			// Without an interrupt the epoch stays where it was.
			c2 := h.addClaimed("d2", "t2", 1000)
			got, err = s.SupersedeClaimed(h.ctx, "d2", c2.ClaimToken, "operator", 2000)
			if err != nil || got == nil {
				t.Fatalf("SupersedeClaimed(d2) = %v, %v", got, err)
			}
			dqEqual(t, "d2", h.load("d2"), dqSuperseded(c2, 0, "operator", 2000))
			// The thread is free again.
			h.add("d3", "t2", 1000)
			h.claim("t2", "c1", 3000)
		}},
	}
}
