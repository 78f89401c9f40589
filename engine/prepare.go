package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"strings"
	"sync"
)

// maxAppendRetries bounds the retries of a version-guarded append that
// lost a race with another writer of the same thread (lessons.md B1).
const maxAppendRetries = 8

// threadLocks serialises the read-modify-write of one thread's log and
// run records within this process (a striped mutex: 256 stripes). The
// store's count guard covers writers in other processes.
type threadLocks struct {
	seed    maphash.Seed
	stripes [256]sync.Mutex
}

func newThreadLocks() *threadLocks { return &threadLocks{seed: maphash.MakeSeed()} }

func (l *threadLocks) lock(thread string) func() {
	m := &l.stripes[maphash.String(l.seed, thread)%uint64(len(l.stripes))]
	m.Lock()
	return m.Unlock
}

// reusableWaitingRun returns the run a new message on the thread should
// continue: the thread's open run, else its latest run, when that run
// waits for input. Store errors propagate (fail closed, lessons.md B9).
func (m *Mailbox) reusableWaitingRun(ctx context.Context, thread string) (string, error) {
	id, _, _, err := m.reusableWaitingRunAndLatest(ctx, thread)
	return id, err
}

// knownRun is a thread's latest run as read a moment ago under the
// thread's lock; run is nil when the thread had none.
type knownRun struct{ run *RunRecord }

// reusableWaitingRunAndLatest is reusableWaitingRun that also returns the
// thread's latest run when it learned it (nil otherwise), so prepare
// does not read it again, and the message count of the thread projection
// it read (0 when the thread has none: no messages either). A thread
// without a projection has no run (Store.LoadThread): its latest run is
// known without a walk of the run index, which costs a new thread's
// submit an iterator.
func (m *Mailbox) reusableWaitingRunAndLatest(ctx context.Context, thread string) (string, *knownRun, uint64, error) {
	t, err := m.store.LoadThread(ctx, thread)
	if err != nil {
		return "", nil, 0, fmt.Errorf("reusable waiting run of %s: %w", thread, err)
	}
	if t == nil {
		return "", &knownRun{}, 0, nil
	}
	count := t.MessageCount
	// Only a waiting open run can be continued (one created or running
	// cannot); an older projection without the status is read to see.
	if t.OpenRunID != "" && (t.OpenRunStatus == "" || t.OpenRunStatus == RunWaiting) {
		r, err := m.store.LoadRun(ctx, t.OpenRunID)
		if err != nil {
			return "", nil, 0, fmt.Errorf("reusable waiting run of %s: %w", thread, err)
		}
		if r != nil && r.ThreadID == thread && r.IsResumableWaiting() {
			ok, err := m.notYetContinued(ctx, r)
			if err != nil {
				return "", nil, 0, err
			}
			if ok {
				return r.RunID, nil, count, nil
			}
		}
	}
	r, err := m.store.LatestRun(ctx, thread)
	if err != nil {
		return "", nil, 0, fmt.Errorf("reusable waiting run of %s: %w", thread, err)
	}
	if r != nil && r.IsResumableWaiting() {
		ok, err := m.notYetContinued(ctx, r)
		if err != nil {
			return "", nil, 0, err
		}
		if ok {
			return r.RunID, &knownRun{r}, count, nil
		}
	}
	return "", &knownRun{r}, count, nil
}

// notYetContinued reports whether a waiting run has no dispatch pending:
// a second message arriving while the first continuation still waits in
// the queue starts a run of its own, instead of rewriting the request of
// the run that dispatch will execute (which would run the second message
// twice and the first never; found by the crash harness).
func (m *Mailbox) notYetContinued(ctx context.Context, r *RunRecord) (bool, error) {
	if r.DispatchID == "" {
		return true, nil
	}
	d, err := m.store.LoadDispatch(ctx, r.DispatchID)
	if err != nil {
		return false, fmt.Errorf("reusable waiting run %s: %w", r.RunID, err)
	}
	return d == nil || d.Status.Terminal(), nil
}

// prepareRun makes the durable run record for a request (engine.md §2)
// without enqueueing it; see persistRun.
func (m *Mailbox) prepareRun(ctx context.Context, r *SubmitRequest) (string, error) {
	runID, _, err := m.persistRun(ctx, r, nil, nil)
	return runID, err
}

// submitRun makes the durable run record and its queued dispatch
// (available at availableAt) in one commit.
func (m *Mailbox) submitRun(ctx context.Context, r *SubmitRequest, availableAt int64) (string, Dispatch, error) {
	return m.persistRun(ctx, r, &availableAt, nil)
}

// submitCommit writes a prepared run's checkpoint and dispatch; nil means
// the store's Submit.
type submitCommit func(ctx context.Context, c Checkpoint, d Dispatch) (Dispatch, error)

// persistRun appends the request's messages to the thread log and creates
// or updates the run in one guarded commit — with the run's dispatch when
// availableAt is set — retrying when another writer appended in between.
// It chooses the dispatch id up front and records it on the run
// (lessons.md B3), and returns the run id and the stored dispatch.
func (m *Mailbox) persistRun(ctx context.Context, r *SubmitRequest, availableAt *int64, commit submitCommit) (string, Dispatch, error) {
	if commit == nil {
		commit = func(ctx context.Context, c Checkpoint, d Dispatch) (Dispatch, error) {
			_, stored, err := m.store.Submit(ctx, c, d)
			return stored, err
		}
	}
	thread := r.ThreadID
	unlock := m.locks.lock(thread)
	defer unlock()

	var latest *knownRun   // the thread's latest run, when already known
	var knownCount *uint64 // the thread's message count, when already read
	implicit := false      // continuing a waiting run the request did not name
	if strings.TrimSpace(r.ContinueRunID) == "" && strings.TrimSpace(r.RunIDHint) == "" {
		waiting, l, n, err := m.reusableWaitingRunAndLatest(ctx, thread)
		if err != nil {
			return "", Dispatch{}, err
		}
		r.ContinueRunID, latest, knownCount = waiting, l, &n
		implicit = waiting != ""
	}
	runID := strings.TrimSpace(r.ContinueRunID)
	if runID == "" {
		runID = strings.TrimSpace(r.RunIDHint)
	}
	fresh := runID == "" // an id made here names no existing run
	if fresh {
		runID = newID()
	}
	if r.ContinueRunID == "" {
		r.RunIDHint = runID
	}
	if strings.TrimSpace(r.DispatchIDHint) == "" {
		r.DispatchIDHint, r.dispatchIDMinted = newID(), true
	}
	minted := Minted{RunID: fresh, DispatchID: r.dispatchIDMinted}
	if !r.messagesLogged {
		r.Messages, minted.MessageIDs = mintMessageIDs(r.Messages)
	}
	extras, err := json.Marshal(extrasOf(r))
	if err != nil {
		return "", Dispatch{}, fmt.Errorf("prepare run %s: encode request extras: %w", runID, err)
	}
	ids := messageIDs(r.Messages)

	for attempt := 0; ; attempt++ {
		// The projection's count, read a moment ago under the thread's
		// lock, serves the first try (the store keeps it in the commit
		// of every append; if another process appended since, the
		// guarded append fails and the retry reads the count afresh).
		var count uint64
		if knownCount != nil {
			count, knownCount = *knownCount, nil
		} else if count, err = m.store.MessageCount(ctx, thread); err != nil {
			return "", Dispatch{}, fmt.Errorf("prepare run %s: %w", runID, err)
		}
		total := count
		var appendMsgs []Message
		if !r.messagesLogged {
			appendMsgs = r.Messages
			total += uint64(len(appendMsgs))
		}
		snapshot := &RunRequestSnapshot{
			Origin:             r.Origin,
			InputMessageIDs:    ids,
			InputMessageCount:  len(ids),
			RequestExtras:      extras,
			Decisions:          r.Decisions,
			FrontendTools:      r.FrontendTools,
			ParentThreadID:     r.ParentThreadID,
			TransportRequestID: r.TransportRequestID,
		}
		input := &RunMessageInput{ThreadID: thread, TriggerMessageIDs: ids}
		if total > 0 {
			input.Range = &SeqRange{From: 1, To: total}
		}
		// ownRun gives the request a run of its own when the waiting run
		// chosen above is no longer open for dispatch: since it was read,
		// a dispatch of it is pending or the run moved on (a writer
		// outside this thread's lock: another sidecar sharing the store,
		// say; its store may find it only in the commit). The request
		// named no run, so it gets one of its own, as it would have had
		// it read that state.
		ownRun := func() error {
			implicit, fresh = false, true
			runID = newID()
			r.ContinueRunID, r.RunIDHint, minted.RunID = "", runID, true
			var err error
			if extras, err = json.Marshal(extrasOf(r)); err != nil {
				return fmt.Errorf("prepare run %s: encode request extras: %w", runID, err)
			}
			return nil
		}
		run, err := m.runForDispatch(ctx, r, runID, fresh, snapshot, input, latest)
		latest = nil // a retry reads afresh
		if implicit && errors.Is(err, ErrValidation) {
			if err := ownRun(); err != nil {
				return "", Dispatch{}, err
			}
			continue
		}
		if err != nil {
			return "", Dispatch{}, err
		}
		if r.ContinueRunID == "" && run.IsResumableWaiting() {
			// A run_id hint naming a waiting run continues it (the seed's
			// rebuild gives continue_run_id to a run still waiting). The
			// extras say so: the attempt's start may be recorded in its
			// claim's commit (IdleSubmitter, StartClaimer), and the rebuild
			// then reads the run running.
			x := extrasOf(r)
			x.ContinueRunID = runID
			if run.Request.RequestExtras, err = json.Marshal(x); err != nil {
				return "", Dispatch{}, fmt.Errorf("prepare run %s: encode request extras: %w", runID, err)
			}
		}
		cp := Checkpoint{ThreadID: thread, ExpectedCount: count, Messages: appendMsgs, CreatedAt: m.cfg.Now(), Run: run, Minted: minted}
		var stored Dispatch
		if availableAt == nil {
			_, err = m.store.Checkpoint(ctx, cp)
		} else {
			var d Dispatch
			if d, err = m.buildDispatch(r, *availableAt); err != nil {
				return "", Dispatch{}, err
			}
			stored, err = commit(ctx, cp, d)
		}
		var conflict *ConflictError
		if errors.As(err, &conflict) && conflict.What == "message_count" && attempt < maxAppendRetries {
			continue
		}
		if implicit && errors.Is(err, ErrValidation) {
			if err := ownRun(); err != nil {
				return "", Dispatch{}, err
			}
			continue
		}
		if err != nil {
			return "", Dispatch{}, fmt.Errorf("prepare run %s: %w", runID, err)
		}
		return runID, stored, nil
	}
}

// runForDispatch returns the run record a checkpoint should write: the
// existing run updated with the new request (it must be open for
// dispatch), or a new created run (engine.md items 15 and 16).
func (m *Mailbox) runForDispatch(ctx context.Context, r *SubmitRequest, runID string, fresh bool, snapshot *RunRequestSnapshot, input *RunMessageInput, latest *knownRun) (*RunRecord, error) {
	nowSec := m.cfg.Now() / 1000
	var existing *RunRecord
	if !fresh {
		var err error
		if existing, err = m.store.LoadRun(ctx, runID); err != nil {
			return nil, fmt.Errorf("prepare run %s: %w", runID, err)
		}
	}
	if existing != nil {
		if err := m.checkOpenForDispatch(ctx, existing, runID, r.ThreadID); err != nil {
			return nil, err
		}
		existing.Request, existing.Input = snapshot, input
		existing.DispatchID = r.DispatchIDHint
		existing.UpdatedAt = nowSec
		return existing, nil
	}
	var prev *RunRecord
	if latest != nil {
		prev = latest.run
	} else {
		var err error
		if prev, err = m.store.LatestRun(ctx, r.ThreadID); err != nil {
			return nil, fmt.Errorf("prepare run %s: %w", runID, err)
		}
	}
	agent := strings.TrimSpace(r.AgentID)
	if agent == "" && prev != nil && prev.Status != RunCreated && strings.TrimSpace(prev.AgentID) != "" {
		agent = prev.AgentID
	}
	if agent == "" {
		agent = DefaultAgentID
	}
	var state json.RawMessage
	if prev != nil && prev.Status != RunCreated {
		state = prev.State
	}
	return &RunRecord{
		RunID: runID, ThreadID: r.ThreadID, AgentID: agent, ParentRunID: r.ParentRunID,
		Request: snapshot, Input: input, Status: RunCreated, DispatchID: r.DispatchIDHint,
		TransportRequestID: r.TransportRequestID, CreatedAt: nowSec, UpdatedAt: nowSec, State: state,
	}, nil
}

// checkOpenForDispatch refuses a run that a request names (run hint,
// continue hint or a reused waiting run) but may not rewrite: a run of
// another thread, one neither created nor resumable-waiting (engine.md
// item 15), and one a dispatch of which has not started yet (queued, or
// claimed before its start was recorded). That dispatch executes
// whatever request the run holds when it starts: rewritten, it would
// execute the later request, and the later dispatch would then find the
// run done (or run it twice) while the earlier request never ran. The
// seed rewrites it; here it is refused with the seed's error for a run
// not open for dispatch.
func (m *Mailbox) checkOpenForDispatch(ctx context.Context, run *RunRecord, id, thread string) error {
	if run.ThreadID != thread {
		return Validationf("run_id '%s' belongs to thread '%s', not '%s'", id, run.ThreadID, thread)
	}
	if run.Status != RunCreated && !run.IsResumableWaiting() {
		return Validationf("run_id '%s' is not open for dispatch", id)
	}
	if run.DispatchID == "" {
		return nil
	}
	d, err := m.store.LoadDispatch(ctx, run.DispatchID)
	if err != nil {
		return fmt.Errorf("prepare run %s: %w", id, err)
	}
	if d != nil && d.RunID == run.RunID && (d.Status == StatusQueued || d.Status == StatusClaimed && d.RunStatus == "") {
		return Validationf("run_id '%s' is not open for dispatch", id)
	}
	return nil
}

// buildDispatch makes the queued dispatch of a prepared request
// (engine.md item 19).
func (m *Mailbox) buildDispatch(r *SubmitRequest, availableAt int64) (Dispatch, error) {
	runID := r.ContinueRunID
	if runID == "" {
		runID = r.RunIDHint
	}
	if runID == "" {
		return Dispatch{}, fmt.Errorf("internal error: run_id missing after preparation")
	}
	now := m.cfg.Now()
	prio := DefaultPriority
	if r.Priority != nil {
		prio = *r.Priority
	}
	id := r.DispatchIDHint
	if strings.TrimSpace(id) == "" {
		id = newID()
	}
	return Dispatch{
		DispatchID: id, ThreadID: r.ThreadID, RunID: runID, Priority: prio,
		DedupeKey: strings.TrimSpace(r.DedupeKey), Status: StatusQueued, AvailableAt: availableAt,
		MaxAttempts: m.cfg.MaxAttempts, CreatedAt: now, UpdatedAt: now,
	}, nil
}

// reconstruct rebuilds an attempt's request from the durable run record
// (engine.md item 45). A failure here is permanent.
func (m *Mailbox) reconstruct(ctx context.Context, d *Dispatch) (*RunRequest, *RunRecord, error) {
	run, err := m.store.LoadRun(ctx, d.RunID)
	if err != nil {
		return nil, nil, err
	}
	if run == nil {
		return nil, nil, Validationf("run '%s' not found for dispatch '%s'", d.RunID, d.DispatchID)
	}
	if run.ThreadID != d.ThreadID {
		return nil, nil, Validationf("run '%s' belongs to thread '%s', not dispatch thread '%s'", run.RunID, run.ThreadID, d.ThreadID)
	}
	snap := run.Request
	if snap == nil {
		return nil, nil, Validationf("run '%s' has no request snapshot", run.RunID)
	}
	extras, err := ParseRequestExtras(snap.RequestExtras)
	if err != nil {
		return nil, nil, err
	}
	// The context first: it brings the newest messages into the message
	// cache, where the activation usually finds its own.
	tc, err := m.threadContext(ctx, run.ThreadID)
	if err != nil {
		return nil, nil, err
	}
	msgs, err := m.activationMessages(ctx, run, snap)
	if err != nil {
		return nil, nil, err
	}
	origin := snap.Origin
	if origin == "" {
		origin = OriginUser
	}
	req := &RunRequest{
		DispatchID: d.DispatchID, RunID: run.RunID, ThreadID: run.ThreadID, AgentID: run.AgentID,
		Attempt: d.AttemptCount + 1, Messages: msgs, RunMode: extras.RunMode, Origin: origin,
		ParentRunID: run.ParentRunID, ParentThreadID: snap.ParentThreadID,
		TransportRequestID: snap.TransportRequestID, Decisions: snap.Decisions,
		FrontendTools: snap.FrontendTools, Overrides: extras.Overrides, Traceparent: extras.Traceparent,
	}
	// The extras win over the snapshot's copies (engine.md item 45.6).
	if len(extras.Decisions) > 0 {
		req.Decisions = extras.Decisions
	}
	if len(extras.FrontendTools) > 0 {
		req.FrontendTools = extras.FrontendTools
	}
	if extras.ParentThreadID != "" {
		req.ParentThreadID = extras.ParentThreadID
	}
	if extras.TransportRequestID != "" {
		req.TransportRequestID = extras.TransportRequestID
	}
	// The extras keep the continue hint prepare chose (seed apply_to), so
	// a retry of a continued run still continues it after its first
	// attempt marked the run running.
	if extras.ContinueRunID != "" || run.IsResumableWaiting() {
		req.ContinueRunID = run.RunID
	}
	// Re-normalise as a foreground request would be (item 46.1).
	sr := SubmitRequest{RunMode: req.RunMode, Origin: req.Origin, Decisions: req.Decisions, ContinueRunID: req.ContinueRunID, Adapter: extras.Adapter}
	normalizeRunMode(&sr, false)
	req.RunMode = sr.RunMode
	req.Context = tc
	return req, run, nil
}

// activationMessages returns the messages that start a run: its input
// message ids, else the last input_message_count records of its range.
func (m *Mailbox) activationMessages(ctx context.Context, run *RunRecord, snap *RunRequestSnapshot) ([]Message, error) {
	if len(snap.InputMessageIDs) > 0 {
		out := make([]Message, 0, len(snap.InputMessageIDs))
		for _, id := range snap.InputMessageIDs {
			if rec, ok := m.tails.find(run.ThreadID, id); ok {
				out = append(out, rec.Message)
				continue
			}
			rec, err := m.store.LoadMessage(ctx, run.ThreadID, id)
			if err != nil {
				return nil, err
			}
			if rec == nil {
				return nil, Validationf("message '%s' not found for run '%s'", id, run.RunID)
			}
			out = append(out, rec.Message)
		}
		return out, nil
	}
	if snap.InputMessageCount > 0 && run.Input != nil && run.Input.Range != nil {
		rg := run.Input.Range
		from := rg.From
		if n := uint64(snap.InputMessageCount); rg.To-rg.From+1 > n {
			from = rg.To - n + 1
		}
		recs, err := m.tails.window(ctx, run.ThreadID, from, rg.To, m.cfg.ContextMessages, m.store.LoadMessageRange)
		if err != nil {
			return nil, err
		}
		out := make([]Message, len(recs))
		for i := range recs {
			out[i] = recs[i].Message
		}
		return out, nil
	}
	return nil, nil
}

// threadContext loads the recent history of a thread, capped at
// ContextMessages messages and ContextBytes bytes of message content.
func (m *Mailbox) threadContext(ctx context.Context, thread string) (ThreadContext, error) {
	var tc ThreadContext
	total, err := m.store.MessageCount(ctx, thread)
	if err != nil {
		return tc, err
	}
	tc.TotalMessages = total
	if total > 0 && m.cfg.ContextMessages > 0 {
		from := uint64(1)
		if total > uint64(m.cfg.ContextMessages) {
			from = total - uint64(m.cfg.ContextMessages) + 1
		}
		recs, err := m.tails.window(ctx, thread, from, total, m.cfg.ContextMessages, m.store.LoadMessageRange)
		if err != nil {
			return tc, err
		}
		size, keep := 0, len(recs)
		for i := len(recs) - 1; i >= 0; i-- {
			size += len(recs[i].Message.Content) + len(recs[i].Message.ToolCalls) + 64
			if size > m.cfg.ContextBytes {
				break
			}
			keep = i
		}
		if size > m.cfg.ContextBytes && keep == len(recs) {
			keep = len(recs) // not even the newest message fits: send none
		}
		tc.Messages = recs[keep:]
		if len(tc.Messages) > 0 {
			tc.FirstSeq = tc.Messages[0].Seq
		}
	}
	tc.LatestRun, err = m.store.LatestRun(ctx, thread)
	return tc, err
}
