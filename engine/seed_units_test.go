package engine_test

// Seed-mirroring tests of the engine's constants, configuration, input
// normalisation, error kinds, submit-result shape, outcome classification
// and retry backoff (engine.md §0, §1, items 46 and 48). Each test is
// named after the seed test it mirrors; seedmap_prepare.md maps them.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// spBareMailbox builds a mailbox over an in-memory Badger store with cfg
// exactly as given (the rig fills in a short RetryDelay; these tests need
// the real defaults). Cleanup stops the mailbox and closes the store.
func spBareMailbox(t *testing.T, exec engine.Executor, cfg engine.Config) (*engine.Mailbox, *badgerstore.Store) {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	mb, err := engine.New(s, exec, cfg)
	if err != nil {
		_ = s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := mb.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return mb, s
}

// spMinimalExecutor implements only the engine.Executor interface: no
// agent runtime, no extra methods.
type spMinimalExecutor struct{ ch chan struct{} }

func (spMinimalExecutor) Run(context.Context, *engine.RunRequest, engine.EventSink) engine.RunOutcome {
	return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermNaturalEnd}}
}
func (spMinimalExecutor) Capacity() int                      { return 0 }
func (e spMinimalExecutor) CapacityChanged() <-chan struct{} { return e.ch }

// ---- §0 constants, config, errors ----

func TestSeed_mailbox_config_defaults(t *testing.T) {
	mb, _ := spBareMailbox(t, newFake(0, complete), engine.Config{})
	c := mb.Config()
	durations := []struct {
		name      string
		got, want time.Duration
	}{
		{"Lease (lease_ms 30 000)", c.Lease, 30 * time.Second},
		{"SuspendedLease (suspended_lease_ms 600 000)", c.SuspendedLease, 600 * time.Second},
		{"RenewInterval (lease_renewal_interval 10s)", c.RenewInterval, 10 * time.Second},
		{"SweepInterval (30s)", c.SweepInterval, 30 * time.Second},
		{"GCInterval (60s)", c.GCInterval, 60 * time.Second},
		{"GCTTL (24h)", c.GCTTL, 24 * time.Hour},
		{"RetryDelay (default_retry_delay_ms 250)", c.RetryDelay, 250 * time.Millisecond},
		{"MaxRetryDelay (max_retry_delay_ms 30 000)", c.MaxRetryDelay, 30 * time.Second},
		{"CancelWait (REMOTE_CANCEL_WAIT 5 000 ms)", c.CancelWait, 5 * time.Second},
		// engine.md item 4: signal-loop tuning defaults.
		{"SignalWait (fetch expires 500 ms)", c.SignalWait, 500 * time.Millisecond},
		{"SignalNackBase (500 ms)", c.SignalNackBase, 500 * time.Millisecond},
		{"SignalNackMax (30 000 ms)", c.SignalNackMax, 30 * time.Second},
	}
	for _, d := range durations {
		if d.got != d.want {
			t.Errorf("%s = %s, want %s", d.name, d.got, d.want)
		}
	}
	if c.MaxAttempts != 5 {
		t.Errorf("MaxAttempts (default_max_attempts) = %d, want 5", c.MaxAttempts)
	}
	if c.SignalBatch != 32 || c.SignalHandlers != 32 {
		t.Errorf("SignalBatch %d, SignalHandlers %d, want 32 and 32", c.SignalBatch, c.SignalHandlers)
	}
	// The exported defaults say the same.
	if engine.DefaultLease != 30*time.Second || engine.DefaultSuspendedLease != 10*time.Minute ||
		engine.DefaultRenewInterval != 10*time.Second || engine.DefaultSweepInterval != 30*time.Second ||
		engine.DefaultGCInterval != time.Minute || engine.DefaultGCTTL != 24*time.Hour ||
		engine.DefaultMaxAttempts != 5 || engine.DefaultRetryDelay != 250*time.Millisecond ||
		engine.DefaultMaxRetryDelay != 30*time.Second || engine.DefaultPriority != 128 {
		t.Errorf("exported defaults drifted from engine.md item 1")
	}
	if _, err := uuid.Parse(c.ConsumerID); err != nil || c.ConsumerID == "" {
		t.Errorf("default ConsumerID %q is not a generated UUID: %v", c.ConsumerID, err)
	}
}

func TestSeed_mailbox_config_custom_values(t *testing.T) {
	custom := engine.Config{
		Lease:          5 * time.Second,
		SuspendedLease: 60 * time.Second,
		RenewInterval:  2 * time.Second,
		SweepInterval:  5 * time.Second,
		GCInterval:     10 * time.Second,
		GCTTL:          time.Hour,
		MaxAttempts:    3,
		RetryDelay:     500 * time.Millisecond,
		MaxRetryDelay:  60 * time.Second,
	}
	mb, _ := spBareMailbox(t, newFake(0, complete), custom)
	c := mb.Config()
	if c.Lease != 5*time.Second || c.SuspendedLease != 60*time.Second || c.RenewInterval != 2*time.Second ||
		c.SweepInterval != 5*time.Second || c.GCInterval != 10*time.Second || c.GCTTL != time.Hour ||
		c.MaxAttempts != 3 || c.RetryDelay != 500*time.Millisecond || c.MaxRetryDelay != 60*time.Second {
		t.Fatalf("custom config not kept: %+v", c)
	}
	// The custom attempt budget reaches the dispatches the engine builds.
	req := engine.SubmitRequest{ThreadID: "thread-custom", RunIDHint: "run-custom", DispatchIDHint: "d-custom"}
	d, err := mb.BuildDispatch(&req, 1)
	if err != nil || d.MaxAttempts != 3 {
		t.Fatalf("dispatch max_attempts %d (err %v), want the configured 3", d.MaxAttempts, err)
	}
	// Inconsistent values are refused rather than silently repaired.
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for name, bad := range map[string]engine.Config{
		"renew not shorter than lease":     {Lease: time.Second, RenewInterval: time.Second},
		"suspended lease below lease":      {Lease: 10 * time.Second, SuspendedLease: time.Second, RenewInterval: time.Second},
		"max retry delay below base":       {RetryDelay: time.Second, MaxRetryDelay: 500 * time.Millisecond},
		"negative sweep interval":          {SweepInterval: -time.Second},
		"consumer id with control char":    {ConsumerID: "bad\x01id"},
		"negative context bytes":           {ContextBytes: -1},
		"negative startup delay":           {StartupDelay: -time.Millisecond},
		"negative startup retry delay":     {StartupRetryDelay: -time.Millisecond},
		"negative gc ttl":                  {GCTTL: -time.Hour},
		"negative suspended lease (alone)": {SuspendedLease: -time.Second},
	} {
		if _, err := engine.New(s, newFake(0, complete), bad); !errors.Is(err, engine.ErrValidation) {
			t.Errorf("%s: New = %v, want a validation error", name, err)
		}
	}
}

func TestSeed_mailbox_lifecycle_config_defaults(t *testing.T) {
	mb, _ := spBareMailbox(t, newFake(0, complete), engine.Config{})
	c := mb.Config()
	if c.StartupDelay != 0 {
		t.Errorf("StartupDelay = %s, want 0", c.StartupDelay)
	}
	if c.StartupRecoveryAttempts != 1 {
		t.Errorf("StartupRecoveryAttempts = %d, want 1", c.StartupRecoveryAttempts)
	}
	if c.StartupRetryDelay != 250*time.Millisecond {
		t.Errorf("StartupRetryDelay = %s, want 250ms", c.StartupRetryDelay)
	}
	if c.MaintenanceCallback != nil {
		t.Errorf("MaintenanceCallback defaults to a function, want none")
	}
}

func TestSeed_inline_claim_guard_is_reasonable(t *testing.T) {
	if engine.InlineClaimGuard != 60*time.Second {
		t.Fatalf("InlineClaimGuard = %s, want 60 000 ms", engine.InlineClaimGuard)
	}
	// The guard is applied: an inline-claimed foreground dispatch was
	// enqueued available 60 s after its creation, so background claimers
	// would have skipped it.
	r := newRig(t, newFake(1, complete), engine.Config{})
	res, _, err := r.mb.Submit(context.Background(), engine.SubmitRequest{ThreadID: "thread-guard", Messages: []engine.Message{userMsg("now")}})
	if err != nil || res.Status != engine.SubmitRunning {
		t.Fatalf("foreground submit: %+v %v", res, err)
	}
	eventually(t, "inline run acked", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusAcked })
	d, err := r.store.LoadDispatch(context.Background(), res.DispatchID)
	if err != nil || d == nil {
		t.Fatal(d, err)
	}
	if gap := d.AvailableAt - d.CreatedAt; gap < 59_000 || gap > 61_000 {
		t.Fatalf("inline dispatch available_at - created_at = %d ms, want the 60 000 ms guard", gap)
	}
}

func TestSeed_mailbox_error_display(t *testing.T) {
	if got := engine.Validationf("test").Error(); got != "validation error: test" {
		t.Errorf("validation error text %q", got)
	}
	if got := engine.Validationf("at least %s", "one").Error(); got != "validation error: at least one" {
		t.Errorf("formatted validation error text %q", got)
	}
	// The engine's internal error (seed MailboxError::Internal): build
	// without a prepared run id.
	mb, _ := spBareMailbox(t, newFake(0, complete), engine.Config{})
	_, err := mb.BuildDispatch(&engine.SubmitRequest{ThreadID: "t"}, 0)
	if err == nil || err.Error() != "internal error: run_id missing after preparation" {
		t.Errorf("internal error text %v", err)
	}
	if engine.Code(err) != "internal" || errors.Is(err, engine.ErrValidation) {
		t.Errorf("internal error has code %q", engine.Code(err))
	}
	// The active-run conflict keeps the seed's exact text; Go classifies
	// it as a version conflict (code "conflict").
	if engine.ConflictActiveRun != "thread has an active run; cannot claim inline" {
		t.Errorf("ConflictActiveRun = %q", engine.ConflictActiveRun)
	}
	// Produce it: a dispatch of the thread is claimed by another process
	// (a store without live routing cannot cancel it), so a foreground
	// submit must refuse.
	r := newRig(t, newFake(0, complete), engine.Config{})
	ctx := context.Background()
	other, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-held", Messages: []engine.Message{userMsg("y")}})
	if err != nil {
		t.Fatal(err)
	}
	if d, err := r.store.ClaimDispatch(ctx, other.DispatchID, "other-process", time.Minute, time.Now().UnixMilli()); err != nil || d == nil {
		t.Fatalf("claim by another process: %v %v", d, err)
	}
	r.exec.setCapacity(1)
	_, _, err = r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "thread-held", Messages: []engine.Message{userMsg("z")}})
	if err == nil || !strings.Contains(err.Error(), engine.ConflictActiveRun) || engine.Code(err) != "conflict" {
		t.Fatalf("foreground submit against a run held elsewhere: %v (code %q)", err, engine.Code(err))
	}
}

func TestSeed_mailbox_error_store_variant(t *testing.T) {
	// Store errors keep their sentinel through the engine: errors.Is works
	// and Code gives the client-visible class.
	for _, c := range []struct {
		err  error
		code string
	}{
		{fmt.Errorf("load run x: %w", engine.ErrNotFound), "not_found"},
		{fmt.Errorf("key k: %w", engine.ErrCorrupt), "internal"},
		{fmt.Errorf("write: %w", engine.ErrUnavailable), "unavailable"},
		{fmt.Errorf("enqueue: %w", engine.ErrAlreadyExists), "already_exists"},
		{fmt.Errorf("batch: %w", engine.ErrTooLarge), "too_large"},
	} {
		if got := engine.Code(c.err); got != c.code {
			t.Errorf("Code(%v) = %q, want %q", c.err, got, c.code)
		}
	}
	if !strings.Contains(engine.ErrCorrupt.Error(), "serialization error") || !strings.Contains(engine.ErrUnavailable.Error(), "io error") {
		t.Errorf("store error texts %q, %q", engine.ErrCorrupt, engine.ErrUnavailable)
	}
	// A real store failure under a submit surfaces as a store error, not a
	// validation or internal error.
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	mb, err := engine.New(s, newFake(0, complete), engine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer mb.Stop(context.Background())
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "thread-closed", Messages: []engine.Message{userMsg("x")}})
	if err == nil || errors.Is(err, engine.ErrValidation) || engine.Code(err) != "unavailable" {
		t.Fatalf("submit on a closed store: %v (code %q), want an unavailable store error", err, engine.Code(err))
	}
}

func TestSeed_dispatch_status_enum_variants(t *testing.T) {
	if engine.SubmitRunning != "running" || engine.SubmitQueued != "queued" || engine.SubmitRunning == engine.SubmitQueued {
		t.Fatalf("submit statuses %q %q", engine.SubmitRunning, engine.SubmitQueued)
	}
	// Running iff the submit's own dispatch was claimed at once.
	r := newRig(t, newFake(1, func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		<-ctx.Done()
		return engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	}), engine.Config{})
	ctx := context.Background()
	first, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-status", Messages: []engine.Message{userMsg("a")}})
	if err != nil || first.Status != engine.SubmitRunning {
		t.Fatalf("first submit on an idle thread with a free slot: %+v %v", first, err)
	}
	second, err := r.mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "thread-status", Messages: []engine.Message{userMsg("b")}})
	if err != nil || second.Status != engine.SubmitQueued {
		t.Fatalf("second submit while the first runs: %+v %v", second, err)
	}
	if ok, err := r.mb.Cancel(ctx, first.RunID); err != nil || !ok {
		t.Fatalf("cancel first: %v %v", ok, err)
	}
	if ok, err := r.mb.Cancel(ctx, second.DispatchID); err != nil || !ok {
		// It may have started meanwhile; then cancel the run.
		if ok2, err2 := r.mb.Cancel(ctx, second.RunID); err2 != nil || !ok2 {
			t.Fatalf("cancel second: %v %v / %v %v", ok, err, ok2, err2)
		}
	}
	eventually(t, "nothing in flight", func() bool { return r.mb.InFlight() == 0 })
}

func TestSeed_dispatch_status_queued_zero(t *testing.T) {
	// Without an agent slot a submit is queued (never running, never an
	// error), and its dispatch waits queued with no attempt spent.
	r := newRig(t, newFake(0, complete), engine.Config{})
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "thread-q", Messages: []engine.Message{userMsg("x")}})
	if err != nil || res.Status != engine.SubmitQueued {
		t.Fatalf("submit without an agent: %+v %v", res, err)
	}
	d, err := r.store.LoadDispatch(context.Background(), res.DispatchID)
	if err != nil || d == nil || d.Status != engine.StatusQueued || d.AttemptCount != 0 {
		t.Fatalf("dispatch %+v %v", d, err)
	}
}

func TestSeed_mailbox_submit_result_fields(t *testing.T) {
	res := engine.SubmitResult{DispatchID: "dispatch-1", RunID: "run-1", ThreadID: "thread-1", Status: engine.SubmitRunning}
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `{"dispatch_id":"dispatch-1","run_id":"run-1","thread_id":"thread-1","status":"running"}` {
		t.Fatalf("submit result JSON %s", b)
	}
	var back engine.SubmitResult
	if err := json.Unmarshal(b, &back); err != nil || back != res {
		t.Fatalf("round trip %+v %v", back, err)
	}
}

func TestSeed_mailbox_construction_depends_on_runtime_boundary_not_agent_runtime(t *testing.T) {
	exec := spMinimalExecutor{ch: make(chan struct{})}
	mb, _ := spBareMailbox(t, exec, engine.Config{ConsumerID: "decoupled-consumer"})
	if mb.Config().ConsumerID != "decoupled-consumer" {
		t.Fatalf("consumer id %q", mb.Config().ConsumerID)
	}
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := engine.New(s, nil, engine.Config{}); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("New without an executor: %v", err)
	}
	if _, err := engine.New(nil, exec, engine.Config{}); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("New without a store: %v", err)
	}
}

func TestSeed_run_request_fields(t *testing.T) {
	req := engine.SubmitRequest{ThreadID: "t-1", AgentID: "agent-a", Messages: []engine.Message{userMsg("hello")}}
	engine.NormalizeRunMode(&req, false)
	if req.ThreadID != "t-1" || req.AgentID != "agent-a" || len(req.Messages) != 1 {
		t.Fatalf("request %+v", req)
	}
	if req.RunMode != engine.ModeForeground || req.Adapter != engine.AdapterInternal {
		t.Fatalf("defaults: run_mode %q adapter %q, want foreground/internal", req.RunMode, req.Adapter)
	}
	// The client API's field names.
	b, _ := json.Marshal(engine.SubmitRequest{ThreadID: "t", RunIDHint: "r", DispatchIDHint: "d", ContinueRunID: "c", Messages: []engine.Message{}})
	for _, k := range []string{`"thread_id":"t"`, `"run_id":"r"`, `"dispatch_id":"d"`, `"continue_run_id":"c"`, `"messages":[]`} {
		if !strings.Contains(string(b), k) {
			t.Errorf("submit request JSON %s lacks %s", b, k)
		}
	}
}

// ---- §1 input normalisation ----

func TestSeed_run_spec_validation_empty_messages_errors(t *testing.T) {
	req := engine.SubmitRequest{ThreadID: "thread-1"}
	err := engine.ValidateRunInputs(&req)
	if !errors.Is(err, engine.ErrValidation) || err.Error() != "validation error: at least one message is required" {
		t.Fatalf("empty messages: %v", err)
	}
	req = engine.SubmitRequest{ThreadID: "thread-1", Messages: []engine.Message{}}
	if err := engine.ValidateRunInputs(&req); !errors.Is(err, engine.ErrValidation) {
		t.Fatalf("empty (non-nil) messages: %v", err)
	}
}

func TestSeed_run_spec_validation_allows_decision_only_resume(t *testing.T) {
	req := engine.SubmitRequest{ThreadID: "thread-1", Decisions: []engine.Decision{{CallID: "c1", Resume: json.RawMessage(`{"approved":true}`)}}}
	if err := engine.ValidateRunInputs(&req); err != nil {
		t.Fatalf("decision-only request refused: %v", err)
	}
	if req.ThreadID != "thread-1" || len(req.Messages) != 0 {
		t.Fatalf("after validation %+v", req)
	}
}

func TestSeed_run_spec_validation_blank_thread_id_generates_new(t *testing.T) {
	req := engine.SubmitRequest{ThreadID: " ", Messages: []engine.Message{userMsg("hi")}}
	if err := engine.ValidateRunInputs(&req); err != nil {
		t.Fatal(err)
	}
	spAssertUUIDv7(t, req.ThreadID)
}

func TestSeed_run_spec_validation_trims_thread_id(t *testing.T) {
	req := engine.SubmitRequest{ThreadID: " my-thread ", Messages: []engine.Message{userMsg("hi")}}
	if err := engine.ValidateRunInputs(&req); err != nil || req.ThreadID != "my-thread" {
		t.Fatalf("thread id %q, err %v", req.ThreadID, err)
	}
	req = engine.SubmitRequest{ThreadID: "\t my-thread\n", Messages: []engine.Message{userMsg("hi")}}
	if err := engine.ValidateRunInputs(&req); err != nil || req.ThreadID != "my-thread" {
		t.Fatalf("thread id %q, err %v", req.ThreadID, err)
	}
}

func TestSeed_validate_run_inputs_preserves_normal_thread_id(t *testing.T) {
	req := engine.SubmitRequest{ThreadID: "my-thread", Messages: []engine.Message{userMsg("hi")}}
	if err := engine.ValidateRunInputs(&req); err != nil || req.ThreadID != "my-thread" || len(req.Messages) != 1 {
		t.Fatalf("%+v %v", req, err)
	}
}

func TestSeed_validate_run_inputs_multiple_messages(t *testing.T) {
	msgs := []engine.Message{userMsg("a"), userMsg("b"), userMsg("c")}
	msgs[1].ID = "keep-me"
	req := engine.SubmitRequest{ThreadID: "t", Messages: msgs}
	if err := engine.ValidateRunInputs(&req); err != nil {
		t.Fatal(err)
	}
	if len(req.Messages) != 3 {
		t.Fatalf("%d messages", len(req.Messages))
	}
	// Returned unchanged: order, content, ids (validation assigns none).
	for i, want := range []string{`"a"`, `"b"`, `"c"`} {
		if string(req.Messages[i].Content) != want {
			t.Errorf("message %d content %s, want %s", i, req.Messages[i].Content, want)
		}
	}
	if req.Messages[0].ID != "" || req.Messages[1].ID != "keep-me" || req.Messages[2].ID != "" {
		t.Errorf("validation changed message ids: %q %q %q", req.Messages[0].ID, req.Messages[1].ID, req.Messages[2].ID)
	}
}

func TestSeed_validate_run_inputs_empty_string_generates_uuid(t *testing.T) {
	a := engine.SubmitRequest{ThreadID: "", Messages: []engine.Message{userMsg("hi")}}
	b := engine.SubmitRequest{ThreadID: "", Messages: []engine.Message{userMsg("hi")}}
	if err := engine.ValidateRunInputs(&a); err != nil {
		t.Fatal(err)
	}
	if err := engine.ValidateRunInputs(&b); err != nil {
		t.Fatal(err)
	}
	spAssertUUIDv7(t, a.ThreadID)
	if a.ThreadID == b.ThreadID {
		t.Fatalf("two blank thread ids became the same id %q", a.ThreadID)
	}
}

func spAssertUUIDv7(t *testing.T, id string) {
	t.Helper()
	if len(id) != 36 {
		t.Fatalf("id %q has %d chars, want 36", id, len(id))
	}
	u, err := uuid.Parse(id)
	if err != nil || u.Version() != 7 {
		t.Fatalf("id %q is not a UUIDv7 (%v)", id, err)
	}
}

// engine.md item 9.
func TestSeedItem9_normalize_run_mode(t *testing.T) {
	dec := []engine.Decision{{CallID: "c", Resume: json.RawMessage(`{}`)}}
	cases := []struct {
		name       string
		req        engine.SubmitRequest
		background bool
		want       string
	}{
		{"foreground stays foreground", engine.SubmitRequest{}, false, engine.ModeForeground},
		{"background becomes scheduled", engine.SubmitRequest{}, true, engine.ModeScheduled},
		{"decisions resume", engine.SubmitRequest{Decisions: dec}, true, engine.ModeResume},
		{"continue_run_id resumes", engine.SubmitRequest{ContinueRunID: "r"}, false, engine.ModeResume},
		{"internal origin wakes", engine.SubmitRequest{Origin: engine.OriginInternal}, true, engine.ModeInternalWake},
		{"decisions win over internal origin", engine.SubmitRequest{Origin: engine.OriginInternal, Decisions: dec}, false, engine.ModeResume},
		{"explicit scheduled untouched", engine.SubmitRequest{RunMode: engine.ModeScheduled, Decisions: dec}, false, engine.ModeScheduled},
		{"explicit internal_wake untouched", engine.SubmitRequest{RunMode: engine.ModeInternalWake}, true, engine.ModeInternalWake},
		{"explicit resume untouched", engine.SubmitRequest{RunMode: engine.ModeResume}, true, engine.ModeResume},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req := c.req
			engine.NormalizeRunMode(&req, c.background)
			if req.RunMode != c.want {
				t.Fatalf("run_mode %q, want %q", req.RunMode, c.want)
			}
			if req.Adapter != engine.AdapterInternal {
				t.Fatalf("adapter %q, want internal", req.Adapter)
			}
		})
	}
	req := engine.SubmitRequest{Adapter: "acp"}
	engine.NormalizeRunMode(&req, true)
	if req.Adapter != "acp" {
		t.Fatalf("an explicit adapter was replaced by %q", req.Adapter)
	}
}

// engine.md item 10.
func TestSeedItem10_normalize_message_ids(t *testing.T) {
	in := []engine.Message{userMsg("a"), {ID: "given", Role: engine.RoleUser}, {ID: "  ", Role: engine.RoleUser}}
	out := engine.NormalizeMessageIDs(in)
	if len(out) != 3 || out[1].ID != "given" {
		t.Fatalf("normalized %+v", out)
	}
	spAssertUUIDv7(t, out[0].ID)
	spAssertUUIDv7(t, out[2].ID)
	if out[0].ID == out[2].ID {
		t.Fatal("two messages got the same id")
	}
	if in[0].ID != "" {
		t.Fatal("NormalizeMessageIDs changed its input slice")
	}
}

// ---- item 48: classification ----

func TestSeed_classify_error(t *testing.T) {
	cases := []struct {
		seed       string
		kind, code string
		want       engine.OutcomeKind
	}{
		{"classify_error_thread_already_running_is_permanent", "permanent", "thread_already_running", engine.OutcomePermanent},
		{"classify_error_thread_already_running_is_permanent (code alone)", "transient", "thread_already_running", engine.OutcomePermanent},
		{"classify_error_agent_not_found_is_permanent", "", "agent_not_found", engine.OutcomePermanent},
		{"classify_error_resolve_failed_is_permanent", "", "resolve_failed", engine.OutcomePermanent},
		{"permanent kind with any code", "permanent", "whatever", engine.OutcomePermanent},
		{"classify_error_storage_error_is_transient", "transient", "storage_error", engine.OutcomeTransient},
		{"classify_error_inference_failed_is_transient", "transient", "inference_failed", engine.OutcomeTransient},
		{"other runtime error is transient", "transient", "some_runtime_error", engine.OutcomeTransient},
		{"unknown kind and code is transient", "", "", engine.OutcomeTransient},
	}
	for _, c := range cases {
		t.Run(c.seed, func(t *testing.T) {
			if got := engine.ClassifyFailure(c.kind, c.code); got != c.want {
				t.Fatalf("ClassifyFailure(%q, %q) = %s, want %s", c.kind, c.code, got, c.want)
			}
		})
	}
}

func TestSeed_mailbox_run_outcome_debug(t *testing.T) {
	for _, c := range []struct {
		o    engine.RunOutcome
		want []string
	}{
		{engine.RunOutcome{Kind: engine.OutcomeCompleted}, []string{"completed"}},
		{engine.RunOutcome{Kind: engine.OutcomeTransient, Error: "oops"}, []string{"transient_error", "oops"}},
		{engine.RunOutcome{Kind: engine.OutcomePermanent, Error: "fatal"}, []string{"permanent_error", "fatal"}},
	} {
		s := fmt.Sprintf("%+v", c.o)
		for _, w := range c.want {
			if !strings.Contains(s, w) {
				t.Errorf("%s lacks %q", s, w)
			}
		}
	}
}

func TestSeed_mailbox_run_outcome_metric_labels_are_stable(t *testing.T) {
	for k, want := range map[engine.OutcomeKind]string{
		engine.OutcomeCompleted: "completed",
		engine.OutcomeTransient: "transient_error",
		engine.OutcomePermanent: "permanent_error",
		engine.OutcomeAbandoned: "abandoned",
		engine.OutcomeKind(200): "unknown",
	} {
		if got := k.String(); got != want {
			t.Errorf("OutcomeKind(%d).String() = %q, want %q", uint8(k), got, want)
		}
	}
}

// ---- item 46: retry backoff ----

func TestSeed_nack_backoff_progression(t *testing.T) {
	base, limit := engine.DefaultRetryDelay.Milliseconds(), engine.DefaultMaxRetryDelay.Milliseconds()
	for _, c := range []struct {
		attempt uint32
		want    int64
	}{{1, 250}, {2, 500}, {3, 1000}, {4, 2000}, {5, 4000}, {6, 8000}, {7, 16000}} {
		if got := engine.RetryDelayMs(c.attempt, base, limit); got != c.want {
			t.Errorf("attempt_count=%d: %d ms, want %d", c.attempt, got, c.want)
		}
	}
}

func TestSeed_nack_backoff_caps_at_max(t *testing.T) {
	if got := engine.RetryDelayMs(4, 1000, 5000); got != 5000 {
		t.Fatalf("base 1000 · 2^3 capped at 5000: got %d", got)
	}
}

func TestSeed_nack_backoff_zero_attempt_is_base_delay(t *testing.T) {
	if got := engine.RetryDelayMs(0, engine.DefaultRetryDelay.Milliseconds(), engine.DefaultMaxRetryDelay.Milliseconds()); got != 250 {
		t.Fatalf("attempt 0: %d ms, want 250", got)
	}
}

func TestSeed_nack_backoff_high_attempt_stays_capped(t *testing.T) {
	base := engine.DefaultRetryDelay.Milliseconds()
	if got := engine.RetryDelayMs(100, base, engine.DefaultMaxRetryDelay.Milliseconds()); got != 16000 {
		t.Fatalf("attempt 100 with defaults: %d ms, want 16 000 (exponent capped at 6)", got)
	}
	if got := engine.RetryDelayMs(100, base, 10_000); got != 10_000 {
		t.Fatalf("attempt 100 with max 10 000: %d ms", got)
	}
}

// The engine applies that backoff to its nacks: each retry becomes
// available RetryDelayMs(pre-increment attempt_count) after the nack.
func TestSeed_nack_backoff_progression_applied_by_engine(t *testing.T) {
	type seen struct {
		attempt uint32
		gap     int64
	}
	gaps := make(chan seen, 8)
	var r *rig
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		if req.Attempt > 1 {
			d, err := r.store.LoadDispatch(ctx, req.DispatchID)
			if err == nil && d != nil && len(d.Errors) > 0 {
				gaps <- seen{req.Attempt, d.AvailableAt - d.Errors[len(d.Errors)-1].At}
			}
		}
		return engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: "inference_failed", Error: "model overloaded"}
	}
	r = newRig(t, newFake(1, script), engine.Config{RetryDelay: 40 * time.Millisecond, MaxRetryDelay: 60 * time.Millisecond, MaxAttempts: 4})
	r.start(t)
	res, err := r.mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: "thread-backoff", Messages: []engine.Message{userMsg("x")}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "dead-lettered after 4 attempts", func() bool { return dispatchStatus(t, r.store, res.DispatchID) == engine.StatusDeadLetter })
	close(gaps)
	want := map[uint32]int64{2: 40, 3: 40, 4: 60} // after attempt_count 0, 1 (base), 2 (2·base capped at 60)
	n := 0
	for g := range gaps {
		n++
		if g.gap != want[g.attempt] {
			t.Errorf("attempt %d became available %d ms after the nack, want %d", g.attempt, g.gap, want[g.attempt])
		}
	}
	if n != 3 {
		t.Fatalf("saw %d retries, want 3", n)
	}
	d, _ := r.store.LoadDispatch(context.Background(), res.DispatchID)
	if d.AttemptCount != 4 || d.LastError != "model overloaded" {
		t.Fatalf("dead letter %+v", d)
	}
}
