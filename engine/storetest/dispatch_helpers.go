package storetest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Helpers of the dispatch-queue half of the suite. Package-level names carry
// a dq prefix so they cannot clash with the run-store half.

// dqLease is the lease every case claims with; dqLeaseMs is the same in ms.
const (
	dqLease   = 30 * time.Second
	dqLeaseMs = int64(30_000)
)

// dqQueued returns a clean queued dispatch: run id "run-"+id, max attempts 5,
// created when it becomes available.
func dqQueued(id, thread string, prio uint8, avail int64) engine.Dispatch {
	return engine.Dispatch{
		DispatchID:  id,
		ThreadID:    thread,
		RunID:       "run-" + id,
		Priority:    prio,
		Status:      engine.StatusQueued,
		AvailableAt: avail,
		MaxAttempts: 5,
		CreatedAt:   avail,
	}
}

// dq wraps a store with fatal-on-error helpers for one test.
type dq struct {
	t   *testing.T
	s   engine.Store
	ctx context.Context
}

func newDQ(t *testing.T, s engine.Store) *dq {
	return &dq{t: t, s: s, ctx: context.Background()}
}

// enqueue stores d and returns the stored record, which must equal the one
// LoadDispatch reads back.
func (h *dq) enqueue(d engine.Dispatch) engine.Dispatch {
	h.t.Helper()
	got, err := h.s.Enqueue(h.ctx, d)
	if err != nil {
		h.t.Fatalf("Enqueue(%s): %v", d.DispatchID, err)
	}
	return got
}

// add enqueues dqQueued(id, thread, DefaultPriority, avail).
func (h *dq) add(id, thread string, avail int64) engine.Dispatch {
	h.t.Helper()
	return h.enqueue(dqQueued(id, thread, engine.DefaultPriority, avail))
}

// load returns the stored dispatch; it must exist.
func (h *dq) load(id string) engine.Dispatch {
	h.t.Helper()
	d, err := h.s.LoadDispatch(h.ctx, id)
	if err != nil {
		h.t.Fatalf("LoadDispatch(%s): %v", id, err)
	}
	if d == nil {
		h.t.Fatalf("LoadDispatch(%s) = nil, want a record", id)
	}
	return *d
}

// absent checks that no dispatch id is stored.
func (h *dq) absent(id string) {
	h.t.Helper()
	d, err := h.s.LoadDispatch(h.ctx, id)
	if err != nil {
		h.t.Fatalf("LoadDispatch(%s): %v", id, err)
	}
	if d != nil {
		h.t.Fatalf("LoadDispatch(%s) = %s record, want nil", id, d.Status)
	}
}

// status checks the stored status of id and returns the record.
func (h *dq) status(id string, want engine.DispatchStatus) engine.Dispatch {
	h.t.Helper()
	d := h.load(id)
	if d.Status != want {
		h.t.Fatalf("dispatch %s status = %s, want %s", id, d.Status, want)
	}
	return d
}

// claim claims the thread's next dispatch at now; there must be one.
func (h *dq) claim(thread, consumer string, now int64) engine.Dispatch {
	h.t.Helper()
	d, err := h.s.Claim(h.ctx, thread, consumer, dqLease, now)
	if err != nil {
		h.t.Fatalf("Claim(%s, now=%d): %v", thread, now, err)
	}
	if d == nil {
		h.t.Fatalf("Claim(%s, now=%d) = nil, want a dispatch", thread, now)
	}
	return *d
}

// claimNone checks that Claim on thread finds nothing at now.
func (h *dq) claimNone(thread string, now int64) {
	h.t.Helper()
	d, err := h.s.Claim(h.ctx, thread, "c-none", dqLease, now)
	if err != nil {
		h.t.Fatalf("Claim(%s, now=%d): %v", thread, now, err)
	}
	if d != nil {
		h.t.Fatalf("Claim(%s, now=%d) = %s, want nil", thread, now, d.DispatchID)
	}
}

// claimID claims one dispatch by id; it must succeed.
func (h *dq) claimID(id, consumer string, now int64) engine.Dispatch {
	h.t.Helper()
	d, err := h.s.ClaimDispatch(h.ctx, id, consumer, dqLease, now)
	if err != nil {
		h.t.Fatalf("ClaimDispatch(%s): %v", id, err)
	}
	if d == nil {
		h.t.Fatalf("ClaimDispatch(%s) = nil, want the dispatch", id)
	}
	return *d
}

// claimIDNone checks that ClaimDispatch(id) returns nil without error.
func (h *dq) claimIDNone(id string, now int64) {
	h.t.Helper()
	d, err := h.s.ClaimDispatch(h.ctx, id, "c-none", dqLease, now)
	if err != nil {
		h.t.Fatalf("ClaimDispatch(%s): %v", id, err)
	}
	if d != nil {
		h.t.Fatalf("ClaimDispatch(%s) = %s record, want nil", id, d.Status)
	}
}

// addClaimed enqueues id on thread available at now and claims it by id.
func (h *dq) addClaimed(id, thread string, now int64) engine.Dispatch {
	h.t.Helper()
	h.add(id, thread, now)
	return h.claimID(id, "c1", now)
}

func (h *dq) ack(id, token string, now int64) {
	h.t.Helper()
	if err := h.s.Ack(h.ctx, id, token, now); err != nil {
		h.t.Fatalf("Ack(%s): %v", id, err)
	}
}

func (h *dq) nack(id, token string, retryAt int64, msg string, now int64) engine.Dispatch {
	h.t.Helper()
	d, err := h.s.Nack(h.ctx, id, token, retryAt, msg, now)
	if err != nil {
		h.t.Fatalf("Nack(%s): %v", id, err)
	}
	return d
}

func (h *dq) deadLetter(id, token, msg string, now int64) {
	h.t.Helper()
	if err := h.s.DeadLetter(h.ctx, id, token, msg, now); err != nil {
		h.t.Fatalf("DeadLetter(%s): %v", id, err)
	}
}

func (h *dq) cancel(id string, now int64) engine.Dispatch {
	h.t.Helper()
	d, err := h.s.Cancel(h.ctx, id, now)
	if err != nil {
		h.t.Fatalf("Cancel(%s): %v", id, err)
	}
	if d == nil {
		h.t.Fatalf("Cancel(%s) = nil, want the cancelled record", id)
	}
	return *d
}

func (h *dq) start(id, token, instance string, now int64) {
	h.t.Helper()
	if err := h.s.RecordDispatchStart(h.ctx, id, token, instance, now); err != nil {
		h.t.Fatalf("RecordDispatchStart(%s): %v", id, err)
	}
}

func (h *dq) result(id, token string, r engine.RunResult, now int64) {
	h.t.Helper()
	if err := h.s.RecordRunResult(h.ctx, id, token, r, now); err != nil {
		h.t.Fatalf("RecordRunResult(%s): %v", id, err)
	}
}

func (h *dq) interrupt(thread string, now int64) engine.InterruptResult {
	h.t.Helper()
	r, err := h.s.Interrupt(h.ctx, thread, now)
	if err != nil {
		h.t.Fatalf("Interrupt(%s): %v", thread, err)
	}
	return r
}

func (h *dq) epoch(thread string) uint64 {
	h.t.Helper()
	e, err := h.s.CurrentEpoch(h.ctx, thread)
	if err != nil {
		h.t.Fatalf("CurrentEpoch(%s): %v", thread, err)
	}
	return e
}

func (h *dq) reclaim(now int64, limit int) []engine.Dispatch {
	h.t.Helper()
	ds, err := h.s.ReclaimExpired(h.ctx, now, limit)
	if err != nil {
		h.t.Fatalf("ReclaimExpired(now=%d, limit=%d): %v", now, limit, err)
	}
	return ds
}

func (h *dq) release(id, token string, now int64) engine.Dispatch {
	h.t.Helper()
	d, err := h.s.Release(h.ctx, id, token, now)
	if err != nil {
		h.t.Fatalf("Release(%s): %v", id, err)
	}
	return d
}

func (h *dq) requeue(id, newID string, now int64) engine.Dispatch {
	h.t.Helper()
	d, err := h.s.Requeue(h.ctx, id, newID, now)
	if err != nil {
		h.t.Fatalf("Requeue(%s): %v", id, err)
	}
	return d
}

func (h *dq) purge(olderThan int64) int {
	h.t.Helper()
	n, err := h.s.PurgeTerminal(h.ctx, olderThan)
	if err != nil {
		h.t.Fatalf("PurgeTerminal(%d): %v", olderThan, err)
	}
	return n
}

func (h *dq) list(thread string, filter engine.StatusFilter, limit, offset int) []engine.Dispatch {
	h.t.Helper()
	ds, err := h.s.ListDispatches(h.ctx, thread, filter, limit, offset)
	if err != nil {
		h.t.Fatalf("ListDispatches(%s, %v, %d, %d): %v", thread, filter, limit, offset, err)
	}
	return ds
}

func (h *dq) counts() engine.StatusCounts {
	h.t.Helper()
	c, err := h.s.CountByStatus(h.ctx)
	if err != nil {
		h.t.Fatalf("CountByStatus: %v", err)
	}
	return c
}

func (h *dq) terminal(after engine.TerminalCursor, limit int) []engine.Dispatch {
	h.t.Helper()
	ds, err := h.s.ListTerminal(h.ctx, after, limit)
	if err != nil {
		h.t.Fatalf("ListTerminal(%+v, %d): %v", after, limit, err)
	}
	return ds
}

func (h *dq) deadLetters(limit, offset int) []engine.Dispatch {
	h.t.Helper()
	ds, err := h.s.ListDeadLetters(h.ctx, limit, offset)
	if err != nil {
		h.t.Fatalf("ListDeadLetters(%d, %d): %v", limit, offset, err)
	}
	return ds
}

func (h *dq) queuedThreads() []string {
	h.t.Helper()
	ids, err := h.s.QueuedThreadIDs(h.ctx)
	if err != nil {
		h.t.Fatalf("QueuedThreadIDs: %v", err)
	}
	return ids
}

func (h *dq) ready(now int64, limit int) ([]string, int64) {
	h.t.Helper()
	es, next, err := h.s.ReadyThreads(h.ctx, now, engine.ReadyEntry{}, limit)
	if err != nil {
		h.t.Fatalf("ReadyThreads(now=%d, limit=%d): %v", now, limit, err)
	}
	// Every listing is checked in place: in ready order, and the same
	// listed on from each of its entries.
	ids := make([]string, len(es))
	for i, e := range es {
		ids[i] = e.ThreadID
		if i > 0 && !es[i-1].Before(e) {
			h.t.Fatalf("ReadyThreads(now=%d): %+v listed before %+v, out of ready order", now, es[i-1], e)
		}
		if e.Due > now {
			h.t.Fatalf("ReadyThreads(now=%d): %+v is not due", now, e)
		}
		rest, restNext, err := h.s.ReadyThreads(h.ctx, now, e, limit)
		if err != nil {
			h.t.Fatalf("ReadyThreads(now=%d, after %+v): %v", now, e, err)
		}
		want := es[i+1:]
		if len(rest) < len(want) || !slices.Equal(rest[:len(want)], want) || len(rest) > limit {
			h.t.Fatalf("ReadyThreads(now=%d, after %+v, limit %d) = %+v, want %+v first", now, e, limit, rest, want)
		}
		if restNext != next {
			h.t.Fatalf("ReadyThreads(now=%d, after %+v): nextDueAt = %d, from the start %d", now, e, restNext, next)
		}
	}
	return ids, next
}

// same checks that the stored record of d is still exactly d.
func (h *dq) same(d engine.Dispatch) {
	h.t.Helper()
	dqEqual(h.t, "stored "+d.DispatchID, h.load(d.DispatchID), d)
}

// wantErr checks errors.Is(err, target).
func dqWantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: error = %v, want %v", what, err, target)
	}
}

// dqWantConflict checks that err is a *ConflictError on dispatch_epoch with
// the given epochs, and a version conflict.
func dqWantConflict(t *testing.T, what string, err error, expected, actual uint64) {
	t.Helper()
	var ce *engine.ConflictError
	if !errors.As(err, &ce) {
		t.Fatalf("%s: error = %v, want a *engine.ConflictError", what, err)
	}
	if !errors.Is(err, engine.ErrVersionConflict) {
		t.Fatalf("%s: errors.Is(%v, ErrVersionConflict) = false", what, err)
	}
	want := engine.ConflictError{What: "dispatch_epoch", Expected: expected, Actual: actual}
	if *ce != want {
		t.Fatalf("%s: conflict = %+v, want %+v", what, *ce, want)
	}
}

// dqEqual compares two dispatches field by field (nil and empty error
// histories are equal; terminations compare by type and compacted value).
func dqEqual(t *testing.T, what string, got, want engine.Dispatch) {
	t.Helper()
	if diff := dqDiff(got, want); len(diff) > 0 {
		t.Fatalf("%s differs:\n  %s", what, strings.Join(diff, "\n  "))
	}
}

func dqDiff(got, want engine.Dispatch) []string {
	var diff []string
	gv, wv := reflect.ValueOf(got), reflect.ValueOf(want)
	typ := gv.Type()
	for i := range typ.NumField() {
		name := typ.Field(i).Name
		g, w := gv.Field(i).Interface(), wv.Field(i).Interface()
		switch name {
		case "Errors":
			if len(got.Errors) == 0 && len(want.Errors) == 0 {
				continue
			}
		case "Termination":
			if dqSameTermination(got.Termination, want.Termination) {
				continue
			}
			diff = append(diff, fmt.Sprintf("Termination: got %s, want %s", dqTermString(got.Termination), dqTermString(want.Termination)))
			continue
		}
		if !reflect.DeepEqual(g, w) {
			diff = append(diff, fmt.Sprintf("%s: got %#v, want %#v", name, g, w))
		}
	}
	return diff
}

func dqSameTermination(a, b *engine.Termination) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return a.Type == b.Type && bytes.Equal(dqCompact(a.Value), dqCompact(b.Value))
}

func dqCompact(v json.RawMessage) []byte {
	if len(v) == 0 {
		return nil
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, v); err != nil {
		return v
	}
	return buf.Bytes()
}

func dqTermString(x *engine.Termination) string {
	if x == nil {
		return "nil"
	}
	return fmt.Sprintf("{%s %s}", x.Type, x.Value)
}

// dqClaimed returns what claiming q under got's token at now must store.
func dqClaimed(q engine.Dispatch, token, consumer string, now int64) engine.Dispatch {
	q.Status = engine.StatusClaimed
	q.ClaimToken = token
	q.ClaimedBy = consumer
	q.LeaseUntil = now + dqLeaseMs
	q.UpdatedAt = now
	return q
}

// dqNoClaim checks that the claim fields are cleared.
func dqNoClaim(t *testing.T, d engine.Dispatch) {
	t.Helper()
	if d.ClaimToken != "" || d.ClaimedBy != "" || d.LeaseUntil != 0 {
		t.Fatalf("dispatch %s (%s) keeps claim fields token=%q by=%q lease=%d", d.DispatchID, d.Status, d.ClaimToken, d.ClaimedBy, d.LeaseUntil)
	}
}

// dqNoProjection checks that the runtime projection is cleared.
func dqNoProjection(t *testing.T, d engine.Dispatch) {
	t.Helper()
	if d.InstanceID != "" || d.RunStatus != "" || d.Termination != nil || d.RunResponse != "" || d.RunError != "" {
		t.Fatalf("dispatch %s (%s) keeps a runtime projection: instance=%q run_status=%q termination=%s response=%q error=%q",
			d.DispatchID, d.Status, d.InstanceID, d.RunStatus, dqTermString(d.Termination), d.RunResponse, d.RunError)
	}
}

// dqIDs returns the dispatch ids in order.
func dqIDs(ds []engine.Dispatch) []string {
	ids := make([]string, len(ds))
	for i, d := range ds {
		ids[i] = d.DispatchID
	}
	return ids
}

// dqWantIDs checks the ids of ds in order (nil and empty are equal).
func dqWantIDs(t *testing.T, what string, ds []engine.Dispatch, want ...string) {
	t.Helper()
	if got := dqIDs(ds); !slices.Equal(got, want) {
		t.Fatalf("%s = %q, want %q", what, got, want)
	}
}

// dqWantIDSet checks the ids of ds in any order.
func dqWantIDSet(t *testing.T, what string, ds []engine.Dispatch, want ...string) {
	t.Helper()
	got := dqIDs(ds)
	sort.Strings(got)
	w := slices.Clone(want)
	sort.Strings(w)
	if !slices.Equal(got, w) {
		t.Fatalf("%s = %q (sorted), want %q", what, got, w)
	}
}

// dqWantStrings compares string lists (nil and empty are equal).
func dqWantStrings(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("%s = %q, want %q", what, got, want)
	}
}

// dqCounts builds a StatusCounts from status/count pairs.
func dqCounts(pairs map[engine.DispatchStatus]int64) engine.StatusCounts {
	var c engine.StatusCounts
	for s, n := range pairs {
		c[s] = n
	}
	return c
}

// dqWantCounts compares CountByStatus with want.
func (h *dq) wantCounts(want map[engine.DispatchStatus]int64) {
	h.t.Helper()
	got, w := h.counts(), dqCounts(want)
	if got != w {
		var parts []string
		for _, s := range engine.AllStatuses {
			parts = append(parts, fmt.Sprintf("%s=%d/%d", s, got.Get(s), w.Get(s)))
		}
		h.t.Fatalf("CountByStatus (got/want): %s", strings.Join(parts, " "))
	}
}

// dqRun returns a fresh run record for dispatch d.
func dqRun(runID, thread string, status engine.RunStatus) engine.RunRecord {
	return engine.RunRecord{
		RunID:     runID,
		ThreadID:  thread,
		AgentID:   "agent-1",
		Status:    status,
		CreatedAt: 1,
		UpdatedAt: 1,
	}
}

func (h *dq) createRun(r engine.RunRecord) {
	h.t.Helper()
	if err := h.s.CreateRun(h.ctx, r); err != nil {
		h.t.Fatalf("CreateRun(%s): %v", r.RunID, err)
	}
}

func (h *dq) loadRun(id string) engine.RunRecord {
	h.t.Helper()
	r, err := h.s.LoadRun(h.ctx, id)
	if err != nil {
		h.t.Fatalf("LoadRun(%s): %v", id, err)
	}
	if r == nil {
		h.t.Fatalf("LoadRun(%s) = nil", id)
	}
	return *r
}

// runUnchanged checks that the stored run still has the status, termination,
// error payload, dispatch id and times of before.
func (h *dq) runUnchanged(before engine.RunRecord) {
	h.t.Helper()
	got := h.loadRun(before.RunID)
	if got.Status != before.Status || !dqSameTermination(got.TerminationReason, before.TerminationReason) ||
		!bytes.Equal(dqCompact(got.ErrorPayload), dqCompact(before.ErrorPayload)) || got.DispatchID != before.DispatchID ||
		got.FinishedAt != before.FinishedAt || got.UpdatedAt != before.UpdatedAt || got.ThreadID != before.ThreadID {
		h.t.Fatalf("run %s changed: got status=%s termination=%s error_payload=%s dispatch=%q finished=%d updated=%d, want status=%s termination=%s error_payload=%s dispatch=%q finished=%d updated=%d",
			before.RunID, got.Status, dqTermString(got.TerminationReason), got.ErrorPayload, got.DispatchID, got.FinishedAt, got.UpdatedAt,
			before.Status, dqTermString(before.TerminationReason), before.ErrorPayload, before.DispatchID, before.FinishedAt, before.UpdatedAt)
	}
}

// runSettled checks that the run was settled by dispatch id at nowMs:
// done, finished and updated at nowMs/1000, with termination cancelled (no
// error payload) when errMsg is empty, else termination error with value
// errMsg and error_payload {"message": errMsg}.
func (h *dq) runSettled(runID, dispatchID string, nowMs int64, errMsg string) {
	h.t.Helper()
	r := h.loadRun(runID)
	if r.Status != engine.RunDone {
		h.t.Fatalf("run %s status = %s, want done", runID, r.Status)
	}
	if r.DispatchID != dispatchID {
		h.t.Fatalf("run %s dispatch_id = %q, want %q", runID, r.DispatchID, dispatchID)
	}
	if r.FinishedAt != nowMs/1000 || r.UpdatedAt != nowMs/1000 {
		h.t.Fatalf("run %s finished_at=%d updated_at=%d, want both %d (Unix seconds)", runID, r.FinishedAt, r.UpdatedAt, nowMs/1000)
	}
	if r.Waiting != nil {
		h.t.Fatalf("run %s keeps waiting state %+v", runID, *r.Waiting)
	}
	if errMsg == "" {
		if !dqSameTermination(r.TerminationReason, &engine.Termination{Type: engine.TermCancelled}) {
			h.t.Fatalf("run %s termination = %s, want {cancelled}", runID, dqTermString(r.TerminationReason))
		}
		if len(r.ErrorPayload) != 0 && string(dqCompact(r.ErrorPayload)) != "null" {
			h.t.Fatalf("run %s error_payload = %s, want none", runID, r.ErrorPayload)
		}
		return
	}
	if !dqSameTermination(r.TerminationReason, engine.ErrorTermination(errMsg)) {
		h.t.Fatalf("run %s termination = %s, want %s", runID, dqTermString(r.TerminationReason), dqTermString(engine.ErrorTermination(errMsg)))
	}
	var payload map[string]string
	if err := json.Unmarshal(r.ErrorPayload, &payload); err != nil {
		h.t.Fatalf("run %s error_payload %s: %v", runID, r.ErrorPayload, err)
	}
	if len(payload) != 1 || payload["message"] != errMsg {
		h.t.Fatalf("run %s error_payload = %s, want {\"message\":%q}", runID, r.ErrorPayload, errMsg)
	}
}

// dqParallel runs fn(i) for i in [0,n) on n goroutines released together.
func dqParallel(n int, fn func(i int)) {
	start := make(chan struct{})
	done := make(chan struct{}, n)
	for i := range n {
		go func() {
			defer func() { done <- struct{}{} }()
			<-start
			fn(i)
		}()
	}
	close(start)
	for range n {
		<-done
	}
}
