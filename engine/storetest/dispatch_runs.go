package storetest

import (
	"encoding/json"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Settlement of run records by terminal dispatches (DispatchStore doc: a
// dispatch that becomes cancelled, superseded or dead_letter settles its run
// in the same commit; RunRecord.Settle). Every dispatch here has run id
// "run-"+dispatch id.
func dispatchSettleRunCases() []Case {
	return []Case{
		{"Settle_cancel_marks_run_done_cancelled", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunCreated))
			h.add("d1", "t1", 1000)
			h.cancel("d1", 5000)
			h.runSettled("run-d1", "d1", 5000, "")
		}},
		{"Settle_interrupt_marks_superseded_runs_done_cancelled", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunCreated))
			h.createRun(dqRun("run-d2", "t1", engine.RunCreated))
			h.createRun(dqRun("run-active", "t1", engine.RunCreated))
			h.add("active", "t1", 1000)
			h.claimID("active", "c1", 1000)
			h.add("d1", "t1", 1000)
			h.add("d2", "t1", 2000)
			active := h.loadRun("run-active")
			h.interrupt("t1", 7000)
			h.runSettled("run-d1", "d1", 7000, "")
			h.runSettled("run-d2", "d2", 7000, "")
			// The active dispatch stays claimed, and so its run stays open.
			h.runUnchanged(active)
		}},
		{"Settle_supersede_claimed_marks_run_done_cancelled", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			r := dqRun("run-d1", "t1", engine.RunWaiting)
			r.Waiting = &engine.RunWaitingState{Reason: engine.WaitToolPermission, TicketIDs: []string{"call-1"}}
			h.createRun(r)
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1100)
			if _, err := s.SupersedeClaimed(h.ctx, "d1", c.ClaimToken, "cancelled by user", 6000); err != nil {
				t.Fatalf("SupersedeClaimed: %v", err)
			}
			h.runSettled("run-d1", "d1", 6000, "")
		}},
		{"Settle_stale_epoch_supersede_marks_run_done_cancelled", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.interrupt("t1", 2000)
			err := s.Ack(h.ctx, "d1", c.ClaimToken, 8000)
			dqWantConflict(t, "Ack after interrupt", err, 0, 1)
			h.runSettled("run-d1", "d1", 8000, "")
		}},
		{"Settle_dead_letter_marks_run_done_error", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.deadLetter("d1", c.ClaimToken, "permanent failure", 9000)
			h.runSettled("run-d1", "d1", 9000, "permanent failure")
		}},
		{"Settle_dead_letter_after_an_error_result_keeps_the_result", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.result("d1", c.ClaimToken, engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: engine.ErrorTermination("context overflow"), Error: "context overflow"}, 1500)
			h.runSettled("run-d1", "d1", 1500, "context overflow")
			settled := h.loadRun("run-d1")
			h.deadLetter("d1", c.ClaimToken, "permanent", 9000)
			h.runUnchanged(settled)
		}},
		{"S55_record_start_marks_the_run_running", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunCreated))
			c := h.addClaimed("d1", "t1", 1000)
			if err := s.RecordDispatchStart(h.ctx, "d1", c.ClaimToken, "inst-1", 5000); err != nil {
				t.Fatal(err)
			}
			r := h.loadRun("run-d1")
			if r.Status != engine.RunRunning || r.DispatchID != "d1" || r.SessionID != "inst-1" || r.StartedAt != 5 || r.UpdatedAt != 5 {
				t.Fatalf("run after record start: %+v", r)
			}
			th, err := s.LoadThread(h.ctx, "t1")
			if err != nil || th == nil || th.ActiveRunID != "run-d1" || th.OpenRunID != "run-d1" {
				t.Fatalf("thread projection after start: %+v %v", th, err)
			}
		}},
		{"S55_record_start_counts_the_runs_started_attempts_and_no_write_lowers_the_count", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunCreated))
			c := h.addClaimed("d1", "t1", 1000)
			h.start("d1", c.ClaimToken, "inst-1", 1000)
			stale := h.loadRun("run-d1") // read by a writer racing the next start
			if stale.StartCount != 1 {
				t.Fatalf("start_count after the first start = %d, want 1", stale.StartCount)
			}
			h.nack("d1", c.ClaimToken, 2000, "transient", 1500)
			c = h.claim("t1", "c1", 2000)
			h.start("d1", c.ClaimToken, "inst-2", 2000)
			h.release("d1", c.ClaimToken, 2500) // a shutdown: no attempt spent, but a start counted
			c = h.claim("t1", "c1", 3000)
			h.start("d1", c.ClaimToken, "inst-3", 3000)
			if r := h.loadRun("run-d1"); r.StartCount != 3 || r.SessionID != "inst-3" {
				t.Fatalf("after three starts: start_count %d session %q, want 3 inst-3", r.StartCount, r.SessionID)
			}
			count, err := s.MessageCount(h.ctx, "t1")
			if err != nil {
				t.Fatal(err)
			}
			stale.Steps = 4
			if _, err := s.Checkpoint(h.ctx, engine.Checkpoint{ThreadID: "t1", ExpectedCount: count, Run: &stale}); err != nil {
				t.Fatal(err)
			}
			if r := h.loadRun("run-d1"); r.StartCount != 3 || r.Steps != 4 {
				t.Fatalf("after a write of the run read before two starts: start_count %d steps %d, want 3 (kept) and 4", r.StartCount, r.Steps)
			}
		}},
		{"S57_run_result_waiting_records_the_waiting_state", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			w := &engine.RunWaitingState{Reason: engine.WaitToolPermission, TicketIDs: []string{"call-1"}}
			h.result("d1", c.ClaimToken, engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunWaiting,
				Termination: &engine.Termination{Type: engine.TermSuspended}, Waiting: w}, 2000)
			r := h.loadRun("run-d1")
			if r.Status != engine.RunWaiting || r.Waiting == nil || r.Waiting.Reason != engine.WaitToolPermission || r.FinishedAt != 0 || !r.IsResumableWaiting() {
				t.Fatalf("run after a waiting result: %+v", r)
			}
			d := h.load("d1")
			if d.RunStatus != engine.RunWaiting || d.Status != engine.StatusClaimed {
				t.Fatalf("dispatch after a waiting result: %+v", d)
			}
		}},
		{"Settle_nack_to_dead_letter_marks_run_done_error", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunCreated))
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 2
			h.enqueue(d)
			c := h.claimID("d1", "c1", 1000)
			h.nack("d1", c.ClaimToken, 1000, "try 1", 1100)
			// A requeueing nack is not terminal: the run is untouched.
			h.runUnchanged(dqRun("run-d1", "t1", engine.RunCreated))
			c = h.claim("t1", "c1", 1200)
			h.nack("d1", c.ClaimToken, 1000, "try 2", 4000)
			h.runSettled("run-d1", "d1", 4000, "try 2")
		}},
		{"Settle_reclaim_to_dead_letter_marks_run_done_error", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			h.createRun(dqRun("run-d2", "t2", engine.RunRunning))
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 1
			h.enqueue(d)
			h.claimID("d1", "c1", 1000)
			h.addClaimed("d2", "t2", 1000) // max attempts 5: requeued, not settled
			h.reclaim(40_000, 10)
			h.runSettled("run-d1", "d1", 40_000, engine.ReasonLeaseExpiredMax)
			h.runUnchanged(dqRun("run-d2", "t2", engine.RunRunning))
		}},
		{"Settle_ack_does_not_settle_the_run", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunRunning))
			c := h.addClaimed("d1", "t1", 1000)
			h.result("d1", c.ClaimToken, engine.RunResult{RunID: "run-d1", InstanceID: "inst-1", Status: engine.RunDone,
				Termination: &engine.Termination{Type: engine.TermNaturalEnd}, Response: "ok"}, 1500)
			before := h.loadRun("run-d1")
			if before.Status != engine.RunDone || string(before.FinalOutput) != `"ok"` || before.TerminationReason.Type != engine.TermNaturalEnd {
				t.Fatalf("run after a completed result: %+v", before)
			}
			h.ack("d1", c.ClaimToken, 2000)
			h.runUnchanged(before)
			// Release and requeue leave it alone too.
			c2 := h.addClaimed("d2", "t1", 3000)
			h.createRun(dqRun("run-d2", "t1", engine.RunCreated))
			h.release("d2", c2.ClaimToken, 3100)
			h.runUnchanged(dqRun("run-d2", "t1", engine.RunCreated))
		}},
		{"Settle_skips_a_run_of_another_thread_or_already_done", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			foreign := dqRun("run-d1", "other-thread", engine.RunCreated)
			h.createRun(foreign)
			done := dqRun("run-d2", "t1", engine.RunDone)
			done.TerminationReason = &engine.Termination{Type: engine.TermNaturalEnd}
			done.FinishedAt = 1
			done.DispatchID = "earlier"
			h.createRun(done)
			h.add("d1", "t1", 1000)
			h.cancel("d1", 5000)
			c := h.addClaimed("d2", "t1", 1000)
			h.deadLetter("d2", c.ClaimToken, "fatal", 6000)
			h.runUnchanged(foreign)
			h.runUnchanged(done)
			// No run at all: the dispatch still settles.
			c = h.addClaimed("d3", "t1", 1000)
			h.deadLetter("d3", c.ClaimToken, "fatal", 6000)
			h.status("d3", engine.StatusDeadLetter)
			if r, err := s.LoadRun(h.ctx, "run-d3"); err != nil || r != nil {
				t.Fatalf("LoadRun(run-d3) = %v, %v; want nil (no run is created)", r, err)
			}
		}},
		{"Settle_error_payload_is_a_message_object", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			h.createRun(dqRun("run-d1", "t1", engine.RunCreated))
			c := h.addClaimed("d1", "t1", 1000)
			msg := `quote " and \ backslash`
			h.deadLetter("d1", c.ClaimToken, msg, 9000)
			r := h.loadRun("run-d1")
			var payload struct {
				Message string `json:"message"`
			}
			if err := json.Unmarshal(r.ErrorPayload, &payload); err != nil || payload.Message != msg {
				t.Fatalf("error_payload = %s (%v), want message %q", r.ErrorPayload, err, msg)
			}
		}},
	}
}
