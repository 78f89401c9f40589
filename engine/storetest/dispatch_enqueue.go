package storetest

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Enqueue: store.md rules 8 and 32–37, conformance B45, C01.
func dispatchEnqueueCases() []Case {
	return []Case{
		{"S32_A22_B19_D30_enqueue_dedupe_key_rejects_duplicate_on_same_thread", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d1 := dqQueued("d1", "t1", 128, 1000)
			d1.DedupeKey = "k"
			d1 = h.enqueue(d1)
			d2 := dqQueued("d2", "t1", 128, 1000)
			d2.DedupeKey = "k"
			_, err := s.Enqueue(h.ctx, d2)
			dqWantErr(t, "Enqueue(d2) with the key of queued d1", err, engine.ErrAlreadyExists)
			h.absent("d2")
			h.same(d1)
			dqWantIDs(t, "list(t1)", h.list("t1", nil, 10, 0), "d1")
		}},
		{"S32_enqueue_dedupe_key_is_scoped_per_thread", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d1 := dqQueued("d1", "t1", 128, 1000)
			d1.DedupeKey = "k"
			h.enqueue(d1)
			d2 := dqQueued("d2", "t2", 128, 1000)
			d2.DedupeKey = "k"
			got := h.enqueue(d2)
			if got.DedupeKey != "k" {
				t.Fatalf("stored dedupe_key = %q, want k", got.DedupeKey)
			}
			h.status("d2", engine.StatusQueued)
		}},
		{"S32_enqueue_dedupe_key_held_while_claimed_or_retried", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d1 := dqQueued("d1", "t1", 128, 1000)
			d1.DedupeKey = "k"
			h.enqueue(d1)
			c := h.claimID("d1", "c1", 1000)
			dup := dqQueued("d2", "t1", 128, 1000)
			dup.DedupeKey = "k"
			_, err := s.Enqueue(h.ctx, dup)
			dqWantErr(t, "Enqueue with the key of claimed d1", err, engine.ErrAlreadyExists)
			h.nack("d1", c.ClaimToken, 5000, "transient", 2000)
			dup.DispatchID = "d3"
			_, err = s.Enqueue(h.ctx, dup)
			dqWantErr(t, "Enqueue with the key of nacked (queued) d1", err, engine.ErrAlreadyExists)
			h.absent("d2")
			h.absent("d3")
		}},
		{"S32_enqueue_dedupe_key_freed_when_holder_terminal", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			// One thread per terminal path; each holder takes key k, reaches
			// its terminal status, then a second dispatch takes k.
			paths := map[string]func(id string){
				"acked": func(id string) {
					c := h.claimID(id, "c1", 1000)
					h.ack(id, c.ClaimToken, 2000)
				},
				"cancelled": func(id string) { h.cancel(id, 2000) },
				"superseded": func(id string) {
					h.interrupt(h.load(id).ThreadID, 2000)
				},
				"dead_letter": func(id string) {
					c := h.claimID(id, "c1", 1000)
					h.deadLetter(id, c.ClaimToken, "fatal", 2000)
				},
			}
			for name, finish := range paths {
				thread := "t-" + name
				d := dqQueued("hold-"+name, thread, 128, 1000)
				d.DedupeKey = "k"
				h.enqueue(d)
				finish(d.DispatchID)
				if got := h.load(d.DispatchID); !got.Status.Terminal() {
					t.Fatalf("%s: holder status %s, want terminal", name, got.Status)
				}
				next := dqQueued("next-"+name, thread, 128, 3000)
				next.DedupeKey = "k"
				h.enqueue(next)
				h.status(next.DispatchID, engine.StatusQueued)
			}
		}},
		{"S33_enqueue_stamps_thread_epoch_over_callers", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.Epoch = 999
			if got := h.enqueue(d); got.Epoch != 0 {
				t.Fatalf("returned epoch = %d, want 0 (caller passed 999)", got.Epoch)
			}
			if got := h.load("d1"); got.Epoch != 0 {
				t.Fatalf("stored epoch = %d, want 0", got.Epoch)
			}
			h.interrupt("t1", 2000)
			h.interrupt("t1", 2001)
			d2 := dqQueued("d2", "t1", 128, 3000)
			d2.Epoch = 0
			if got := h.enqueue(d2); got.Epoch != 2 {
				t.Fatalf("returned epoch after two interrupts = %d, want 2", got.Epoch)
			}
			if got := h.load("d2"); got.Epoch != 2 {
				t.Fatalf("stored epoch after two interrupts = %d, want 2", got.Epoch)
			}
			// Another thread is still at epoch 0.
			d3 := dqQueued("d3", "t2", 128, 3000)
			d3.Epoch = 7
			if got := h.enqueue(d3); got.Epoch != 0 {
				t.Fatalf("epoch on untouched thread = %d, want 0", got.Epoch)
			}
		}},
		{"S34_B45_enqueue_rejects_unclean_record", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			bad := map[string]func(d *engine.Dispatch){
				"status claimed": func(d *engine.Dispatch) {
					d.Status = engine.StatusClaimed
					d.ClaimToken, d.ClaimedBy, d.LeaseUntil = "tok", "c1", 5000
				},
				"status acked":       func(d *engine.Dispatch) { d.Status = engine.StatusAcked; d.CompletedAt = 1000 },
				"status dead_letter": func(d *engine.Dispatch) { d.Status = engine.StatusDeadLetter; d.CompletedAt = 1000 },
				"invalid status":     func(d *engine.Dispatch) { d.Status = 42 },
				"claim token":        func(d *engine.Dispatch) { d.ClaimToken = "tok" },
				"claimed by":         func(d *engine.Dispatch) { d.ClaimedBy = "c1" },
				"lease until":        func(d *engine.Dispatch) { d.LeaseUntil = 5000 },
				"completed at":       func(d *engine.Dispatch) { d.CompletedAt = 1000 },
				"instance id":        func(d *engine.Dispatch) { d.InstanceID = "inst" },
				"run status":         func(d *engine.Dispatch) { d.RunStatus = engine.RunRunning },
				"termination":        func(d *engine.Dispatch) { d.Termination = &engine.Termination{Type: engine.TermNaturalEnd} },
				"run response":       func(d *engine.Dispatch) { d.RunResponse = "ok" },
				"run error":          func(d *engine.Dispatch) { d.RunError = "boom" },
				"last error":         func(d *engine.Dispatch) { d.LastError = "boom" },
				"error history":      func(d *engine.Dispatch) { d.Errors = []engine.AttemptError{{Attempt: 1, Error: "boom", At: 900}} },
				"attempts over max":  func(d *engine.Dispatch) { d.MaxAttempts, d.AttemptCount = 2, 3 },
			}
			for name, mutate := range bad {
				d := dqQueued("d-"+strings.ReplaceAll(name, " ", "-"), "t1", 128, 1000)
				mutate(&d)
				_, err := s.Enqueue(h.ctx, d)
				dqWantErr(t, "Enqueue with "+name, err, engine.ErrValidation)
				h.absent(d.DispatchID)
			}
			h.wantCounts(nil)
		}},
		{"S34_enqueue_zero_status_becomes_queued", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.Status = 0
			if got := h.enqueue(d); got.Status != engine.StatusQueued {
				t.Fatalf("returned status = %s, want queued", got.Status)
			}
			h.status("d1", engine.StatusQueued)
		}},
		{"S08_enqueue_rejects_bad_ids", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			long := strings.Repeat("x", engine.MaxIDLen+1)
			bad := map[string]func(d *engine.Dispatch){
				"blank dispatch id":     func(d *engine.Dispatch) { d.DispatchID = "" },
				"spaces dispatch id":    func(d *engine.Dispatch) { d.DispatchID = "   " },
				"blank thread id":       func(d *engine.Dispatch) { d.ThreadID = "" },
				"blank run id":          func(d *engine.Dispatch) { d.RunID = " " },
				"long dispatch id":      func(d *engine.Dispatch) { d.DispatchID = long },
				"long thread id":        func(d *engine.Dispatch) { d.ThreadID = long },
				"long run id":           func(d *engine.Dispatch) { d.RunID = long },
				"long dedupe key":       func(d *engine.Dispatch) { d.DedupeKey = long },
				"control char thread":   func(d *engine.Dispatch) { d.ThreadID = "t\n1" },
				"invalid utf8 run id":   func(d *engine.Dispatch) { d.RunID = "run-\xff" },
				"control char dispatch": func(d *engine.Dispatch) { d.DispatchID = "d\x001" },
			}
			for name, mutate := range bad {
				d := dqQueued("d1", "t1", 128, 1000)
				mutate(&d)
				_, err := s.Enqueue(h.ctx, d)
				dqWantErr(t, "Enqueue with "+name, err, engine.ErrValidation)
			}
			h.wantCounts(nil)
			ids, err := s.QueuedThreadIDs(h.ctx)
			if err != nil || len(ids) != 0 {
				t.Fatalf("QueuedThreadIDs after rejected enqueues = %q, %v; want none", ids, err)
			}
			// Exactly MaxIDLen bytes is accepted.
			max := strings.Repeat("y", engine.MaxIDLen)
			d := dqQueued(max, max, 128, 1000)
			d.RunID, d.DedupeKey = max, max
			h.enqueue(d)
			if got := h.load(max); got.ThreadID != max || got.RunID != max || got.DedupeKey != max {
				t.Fatalf("256-byte ids not stored intact")
			}
		}},
		{"S35_enqueue_keeps_given_fields", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := engine.Dispatch{
				DispatchID:   "d1",
				ThreadID:     "t1",
				RunID:        "r-other",
				Priority:     0,
				DedupeKey:    "key-1",
				Status:       engine.StatusQueued,
				AvailableAt:  9000,
				AttemptCount: 2,
				MaxAttempts:  7,
				CreatedAt:    1234,
				UpdatedAt:    1500,
			}
			got := h.enqueue(d)
			dqEqual(t, "returned record", got, d)
			dqEqual(t, "stored record", h.load("d1"), d)
		}},
		{"S35_enqueue_defaults_max_attempts_and_updated_at", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", 128, 1000)
			d.MaxAttempts = 0
			got := h.enqueue(d)
			want := d
			want.MaxAttempts = engine.DefaultMaxAttempts
			want.UpdatedAt = d.CreatedAt
			dqEqual(t, "returned record", got, want)
			dqEqual(t, "stored record", h.load("d1"), want)
		}},
		{"S36_enqueue_duplicate_dispatch_id_already_exists", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			first := h.add("d1", "t1", 1000)
			for _, thread := range []string{"t1", "t2"} {
				dup := dqQueued("d1", thread, 1, 500)
				dup.RunID = "run-other"
				_, err := s.Enqueue(h.ctx, dup)
				dqWantErr(t, "Enqueue of duplicate id on "+thread, err, engine.ErrAlreadyExists)
			}
			h.same(first)
			dqWantIDs(t, "list(t2)", h.list("t2", nil, 10, 0))
			// A terminal holder still owns its id.
			c := h.claimID("d1", "c1", 1000)
			h.ack("d1", c.ClaimToken, 2000)
			acked := h.load("d1")
			_, err := s.Enqueue(h.ctx, dqQueued("d1", "t1", 128, 3000))
			dqWantErr(t, "Enqueue of the id of an acked dispatch", err, engine.ErrAlreadyExists)
			h.same(acked)
		}},
		{"S37_C01_enqueue_and_load", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			d := dqQueued("d1", "t1", engine.DefaultPriority, 1000)
			got := h.enqueue(d)
			want := d
			want.UpdatedAt = 1000
			dqEqual(t, "returned record", got, want)
			loaded := h.load("d1")
			dqEqual(t, "loaded record", loaded, want)
			if loaded.Epoch != 0 || loaded.Priority != 128 {
				t.Fatalf("epoch=%d priority=%d, want 0 and 128", loaded.Epoch, loaded.Priority)
			}
			if loaded.DispatchID == loaded.RunID {
				t.Fatalf("dispatch_id equals run_id")
			}
			h.absent("unknown")
			// The stored record survives a JSON round trip unchanged.
			raw, err := json.Marshal(loaded)
			if err != nil {
				t.Fatal(err)
			}
			var back engine.Dispatch
			if err := json.Unmarshal(raw, &back); err != nil {
				t.Fatal(err)
			}
			dqEqual(t, "JSON round trip", back, loaded)
		}},
		{"B44_enqueue_then_claim_preserves_dispatch_data", func(t *testing.T, s engine.Store) {
			h := newDQ(t, s)
			for i, p := range []struct {
				prio uint8
				max  uint32
			}{{0, 1}, {1, 2}, {127, 3}, {128, 5}, {200, 10}, {255, 100}} {
				thread := "t" + string(rune('a'+i))
				d := dqQueued("d-"+thread, thread, p.prio, 1000)
				d.MaxAttempts = p.max
				q := h.enqueue(d)
				c := h.claim(thread, "c1", 2000)
				dqEqual(t, "claimed "+thread, c, dqClaimed(q, c.ClaimToken, "c1", 2000))
				if c.Priority != p.prio || c.MaxAttempts != p.max {
					t.Fatalf("claimed priority/max = %d/%d, want %d/%d", c.Priority, c.MaxAttempts, p.prio, p.max)
				}
			}
		}},
	}
}
