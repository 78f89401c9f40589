package badgerstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// contextExec runs each run at once, once opened, and keeps the context
// messages each thread's run was given.
type contextExec struct {
	oneSlotExec
	mu   sync.Mutex
	seen map[string][]engine.MessageRecord
}

func (e *contextExec) Run(ctx context.Context, r *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	e.mu.Lock()
	e.seen[r.ThreadID] = append([]engine.MessageRecord(nil), r.Context.Messages...)
	e.mu.Unlock()
	return e.oneSlotExec.Run(ctx, r, sink)
}

func (e *contextExec) contextOf(thread string) []engine.MessageRecord {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.seen[thread]
}

// Every kind of record that can go bad is put back by Repair, every
// derived key is made to agree, the store verifies clean, a second Repair
// writes nothing, and the threads whose records went bad run again.
func TestRepairPutsBackDamagedRecordsAndTheThreadsRunAgain(t *testing.T) {
	ex := &contextExec{oneSlotExec: oneSlotExec{changed: make(chan struct{}, 1)}, seen: map[string][]engine.MessageRecord{}}
	s, mb := openMailbox(t, Options{Dir: t.TempDir()}, ex) // closed: everything stays queued
	ctx := context.Background()
	submit := func(thread, text string) engine.SubmitResult {
		t.Helper()
		res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userText(text)}})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	badDispatch := submit("t-dispatch", "its record goes bad")
	behind := submit("t-dispatch", "queued behind it")
	badRun := submit("t-run", "its run record goes bad")
	submit("t-message", "this message goes bad")
	msgRun := submit("t-message", "runs after the repair")
	stateRun := submit("t-state", "its thread state goes bad")
	projRun := submit("t-projection", "its projection goes bad")
	good := submit("good", "nothing goes bad")
	claimed := submit("t-claimed", "claimed by a consumer, then its record goes bad")
	now := time.Now().UnixMilli()
	if d, err := s.ClaimStart(ctx, "t-claimed", "other", time.Minute, "instance-1", now); err != nil || d == nil || d.DispatchID != claimed.DispatchID {
		t.Fatalf("claim: %v, %+v", err, d)
	}
	if r, _ := s.LoadRun(ctx, claimed.RunID); r == nil || r.Status != engine.RunRunning {
		t.Fatalf("the claimed run is not running: %+v", r)
	}

	first, err := s.LoadMessageRange(ctx, "t-message", 1, 1)
	if err != nil || len(first) != 1 {
		t.Fatalf("t-message's first message: %v, %v", first, err)
	}
	garbage := []byte{binaryV1, 0xff, 0xff, 0xff}
	for _, k := range [][]byte{
		dispatchKey(badDispatch.DispatchID), dispatchKey(claimed.DispatchID), runKey(badRun.RunID),
		messageKey("t-message", 1), stateKey("t-state"), threadKey("t-projection"),
	} {
		if err := s.RawSet(k, garbage); err != nil {
			t.Fatal(err)
		}
	}
	// Derived keys gone wrong too: a stray lease entry, a missing queue
	// entry, a counter off by one, a message counter too low.
	stray := &engine.Dispatch{DispatchID: "nobody", LeaseUntil: now}
	if err := s.RawSet(leaseKey(stray), nil); err != nil {
		t.Fatal(err)
	}
	goodD, err := s.LoadDispatch(ctx, good.DispatchID)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.RawDelete(orderKey(pQueue, goodD)); err != nil {
		t.Fatal(err)
	}
	if err := s.RawSet(countKey(engine.StatusQueued), u64(99)); err != nil {
		t.Fatal(err)
	}
	if err := s.RawSet(msgCountKey("good"), u64(0)); err != nil {
		t.Fatal(err)
	}
	// A thread whose epoch an interrupt bumped past its dispatches' (it
	// has none), with a queued count the records do not bear out.
	if err := s.RawSet(stateKey("t-epoch"), encodeThreadState(threadState{epoch: 7, queued: 2})); err != nil {
		t.Fatal(err)
	}
	before, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(before.Problems) < 10 {
		t.Fatalf("Verify found %d problems before the repair; want every damage named: %v", len(before.Problems), before.Problems)
	}

	rep, err := s.Repair(ctx, now)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("replaced: %v\nrewritten %d: %v\nleft: %v", rep.Replaced, rep.Rewritten, rep.Changes, rep.Left)
	for _, want := range []string{badDispatch.DispatchID, claimed.DispatchID, badRun.RunID, "message 1 of thread t-message", "thread state of t-state", "thread projection of t-projection"} {
		if !slices.ContainsFunc(rep.Replaced, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("the report does not name %q among the replaced records: %v", want, rep.Replaced)
		}
	}
	if len(rep.Left) != 0 {
		t.Errorf("left unmended: %v", rep.Left)
	}
	after, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Problems) != 0 {
		t.Fatalf("Verify after the repair: %v", after.Problems)
	}
	again, err := s.Repair(ctx, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Replaced) != 0 || again.Rewritten != 0 || len(again.Left) != 0 {
		t.Fatalf("a second repair changed things: %+v", again)
	}

	if e, err := s.CurrentEpoch(ctx, "t-epoch"); err != nil || e != 7 {
		t.Fatalf("t-epoch's epoch after the repair: %d, %v; want 7 kept", e, err)
	}
	if n, _ := s.QueuedThreadIDs(ctx); slices.Contains(n, "t-epoch") {
		t.Fatalf("t-epoch still counts as queued: %v", n)
	}

	// What took the damaged records' places.
	d, err := s.LoadDispatch(ctx, badDispatch.DispatchID)
	if err != nil || d.Status != engine.StatusDeadLetter || d.ThreadID != "t-dispatch" || d.RunID != badDispatch.RunID || !strings.Contains(d.LastError, "it was queued") {
		t.Fatalf("the damaged queued dispatch reads %+v, %v; want a dead letter of t-dispatch naming its run", d, err)
	}
	d, err = s.LoadDispatch(ctx, claimed.DispatchID)
	if err != nil || d.Status != engine.StatusDeadLetter || !strings.Contains(d.LastError, "it was claimed") {
		t.Fatalf("the damaged claimed dispatch reads %+v, %v", d, err)
	}
	if r, _ := s.LoadRun(ctx, claimed.RunID); r == nil || r.Status != engine.RunDone || r.TerminationReason == nil || r.TerminationReason.Type != engine.TermError || r.FinishedAt != now/1000 {
		t.Fatalf("the run of the damaged claimed dispatch: %+v; want done with an error", r)
	}
	if th, _ := s.LoadThread(ctx, "t-claimed"); th == nil || th.ActiveRunID != "" || th.OpenRunID != "" {
		t.Fatalf("t-claimed's projection still names its closed run: %+v", th)
	}
	if r, _ := s.LoadRun(ctx, badRun.RunID); r == nil || r.Status != engine.RunDone || r.ThreadID != "t-run" || r.DispatchID != badRun.DispatchID || r.FinishedAt != now/1000 || r.UpdatedAt > now/1000 {
		t.Fatalf("the damaged run reads %+v", r)
	}
	if d, _ := s.LoadDispatch(ctx, badRun.DispatchID); d == nil || d.Status != engine.StatusDeadLetter || !strings.Contains(d.LastError, "run record") {
		t.Fatalf("the queued dispatch of the damaged run: %+v; want a dead letter", d)
	}
	if th, _ := s.LoadThread(ctx, "t-projection"); th == nil || th.MessageCount != 1 || th.LatestRunID != projRun.RunID || th.OpenRunID != projRun.RunID {
		t.Fatalf("the rebuilt projection: %+v", th)
	}
	if dl, _ := s.ListDeadLetters(ctx, 10, 0); len(dl) != 3 {
		t.Fatalf("%d dead letters; want the two damaged dispatches and the one of the damaged run", len(dl))
	}

	// The threads run again, on a mailbox started after the repair (as the
	// sidecar is: the first one's caches hold what the disk held before).
	mb, err = engine.New(s, ex, engine.Config{ConsumerID: "c2"})
	if err != nil {
		t.Fatal(err)
	}
	startMailbox(t, mb)
	ex.open.Store(true)
	ex.changed <- struct{}{}
	for _, id := range []string{behind.RunID, msgRun.RunID, stateRun.RunID, projRun.RunID, good.RunID} {
		waitFor(t, "run "+id+" to finish", func() bool {
			r, _ := s.LoadRun(ctx, id)
			return r != nil && r.Status == engine.RunDone
		})
	}
	msgs := ex.contextOf("t-message")
	if len(msgs) < 2 || msgs[0].Seq != 1 || msgs[0].MessageID != first[0].MessageID || msgs[0].Message.Role != engine.RoleSystem || !strings.Contains(string(msgs[0].Message.Content), "damaged") {
		t.Fatalf("t-message's context: %v; want the damaged message as a system message saying so, first", msgs)
	}
	final, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(final.Problems) != 0 {
		t.Fatalf("Verify after the runs: %v", final.Problems)
	}
}

// A gap in a message log is listed, not filled, and the counter is set
// past it: the next append takes the seq after the last record, and
// overwrites nothing.
func TestRepairLeavesAGapInALogButGuardsItsRecords(t *testing.T) {
	s, err := Open(Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	for i := range 3 {
		if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t", ExpectedCount: uint64(i), CreatedAt: int64(i + 1),
			Messages: []engine.Message{{ID: string(rune('a' + i)), Role: engine.RoleUser, Content: []byte(`"x"`)}}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.RawDelete(messageKey("t", 2)); err != nil {
		t.Fatal(err)
	}
	if err := s.RawSet(msgCountKey("t"), u64(1)); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Repair(ctx, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Left) != 1 || !strings.Contains(rep.Left[0], "2 messages up to seq 3") {
		t.Fatalf("left: %v; want the gap named", rep.Left)
	}
	if n, err := s.MessageCount(ctx, "t"); err != nil || n != 3 {
		t.Fatalf("message counter after the repair: %d, %v; want 3, past the gap", n, err)
	}
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t", ExpectedCount: 3, CreatedAt: 4,
		Messages: []engine.Message{{ID: "d", Role: engine.RoleUser, Content: []byte(`"y"`)}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := s.LoadMessage(ctx, "t", "c"); err != nil || m == nil || m.Seq != 3 {
		t.Fatalf("message c after the next append: %+v, %v; want seq 3 kept", m, err)
	}
}

// The cases a review of Repair proved (each fails without its mend).
func TestRepairReviewCases(t *testing.T) {
	ctx := context.Background()
	now := time.Now().UnixMilli()
	// repairClean runs Repair, wants Verify clean and a second Repair to
	// write nothing.
	repairClean := func(t *testing.T, s *Store) RepairReport {
		t.Helper()
		rep, err := s.Repair(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		after, err := s.Verify(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(after.Problems) != 0 {
			t.Fatalf("Verify after the repair (replaced %v, rewrote %v, left %v): %v", rep.Replaced, rep.Changes, rep.Left, after.Problems)
		}
		again, err := s.Repair(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		if len(again.Replaced) != 0 || again.Rewritten != 0 {
			t.Fatalf("a second repair changed things: %+v", again)
		}
		return rep
	}
	queued := func(t *testing.T) (*Store, engine.SubmitResult) {
		s, mb := idleMailbox(t)
		return s, submitTo(t, mb, "t")
	}

	t.Run("a repair stopped between a placeholder and its run's close", func(t *testing.T) {
		s, res := queued(t)
		if err := s.RawSet(dispatchKey(res.DispatchID), []byte{binaryV1, 0xff}); err != nil {
			t.Fatal(err)
		}
		var plan repairPlan
		if err := s.view(ctx, func(r *reader) error { return planPlaceholders(r, now, &plan) }); err != nil {
			t.Fatal(err)
		}
		writes := plan.writes
		if len(writes) != 2 {
			t.Fatalf("%d writes planned; want the placeholder and its run's close", len(writes))
		}
		if _, err := s.applyRepair(ctx, writes[:1]); err != nil { // the placeholder alone committed
			t.Fatal(err)
		}
		repairClean(t, s)
		if r, _ := s.LoadRun(ctx, res.RunID); r == nil || r.Status != engine.RunDone {
			t.Fatalf("the run of the dead letter: %+v; want it closed", r)
		}
	})

	t.Run("a message that decodes but whose content is not JSON, or not UTF-8", func(t *testing.T) {
		s, _ := queued(t)
		if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "m", ExpectedCount: 0, CreatedAt: 1,
			Messages: []engine.Message{{ID: "x", Role: engine.RoleUser, Content: []byte(`"fine"`)}}}); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct{ content, want string }{{`{"a":`, ""}, {"\"caf\xe9\"", "\"caf\uFFFD\""}} {
			rec := &engine.MessageRecord{MessageID: "x", ThreadID: "m", Seq: 1, Message: engine.Message{ID: "x", Role: engine.RoleUser, Content: []byte(c.content)}}
			if err := s.RawSet(messageKey("m", 1), appendMessage(nil, rec)); err != nil {
				t.Fatal(err)
			}
			rep := repairClean(t, s)
			if len(rep.Replaced) != 1 || !strings.Contains(rep.Replaced[0], "message 1 of thread m (id x)") {
				t.Fatalf("replaced: %v", rep.Replaced)
			}
			m, err := s.LoadMessage(ctx, "m", "x")
			if err != nil || m == nil {
				t.Fatal(m, err)
			}
			if c.want == "" && (m.Message.Role != engine.RoleSystem || !strings.Contains(string(m.Message.Content), "damaged")) {
				t.Fatalf("content %q became %+v; want the placeholder", c.content, m.Message)
			}
			if c.want != "" && (m.Message.Role != engine.RoleUser || string(m.Message.Content) != c.want) {
				t.Fatalf("content %q became %q; want %q", c.content, m.Message.Content, c.want)
			}
		}
	})

	t.Run("a stray message counter of zero", func(t *testing.T) {
		s, _ := queued(t)
		if err := s.RawSet(msgCountKey("z"), u64(0)); err != nil {
			t.Fatal(err)
		}
		repairClean(t, s)
	})

	t.Run("a finished dispatch stays finished", func(t *testing.T) {
		ex := &oneSlotExec{changed: make(chan struct{}, 1)}
		s, mb := openMailbox(t, Options{InMemory: true}, ex)
		startMailbox(t, mb)
		ex.open.Store(true)
		ex.changed <- struct{}{}
		res, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: "t", Messages: []engine.Message{userText("hi")}})
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the run to finish", func() bool {
			d, _ := s.LoadDispatch(ctx, res.DispatchID)
			return d != nil && d.Status == engine.StatusAcked
		})
		if err := s.RawSet(dispatchKey(res.DispatchID), []byte{binaryV1, 0xff}); err != nil {
			t.Fatal(err)
		}
		repairClean(t, s)
		if d, _ := s.LoadDispatch(ctx, res.DispatchID); d == nil || d.Status != engine.StatusAcked || !strings.Contains(d.LastError, "it was finished") {
			t.Fatalf("the finished dispatch after the repair: %+v; want acked, saying so", d)
		}
		if dl, _ := s.ListDeadLetters(ctx, 10, 0); len(dl) != 0 {
			t.Fatalf("dead letters: %v; want none (a requeue would run finished work again)", dl)
		}
	})

	t.Run("a chunk too large for one transaction is halved", func(t *testing.T) {
		s, err := Open(Options{InMemory: true, MemTableSize: 1 << 20}) // transactions of about 150 KB
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		var writes []repairWrite
		for i := range 100 {
			writes = append(writes, repairWrite{k: []byte(fmt.Sprintf("zbig%03d", i)), v: bytes.Repeat([]byte{'v'}, 20<<10)})
		}
		if done, err := s.applyRepair(ctx, writes); err != nil || done != len(writes) {
			t.Fatalf("applyRepair: %d of %d, %v", done, len(writes), err)
		}
		for _, w := range writes {
			if err := s.view(ctx, func(r *reader) error {
				if _, ok, err := r.get(w.k); err != nil || !ok {
					return fmt.Errorf("%s missing: %v", w.k, err)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("a time of zero is refused", func(t *testing.T) {
		s, _ := queued(t)
		if _, err := s.Repair(ctx, 0); !errors.Is(err, engine.ErrValidation) {
			t.Fatalf("Repair at time 0: %v; want a validation error", err)
		}
	})
}

// A damaged dispatch whose listing and queue entries are gone too is
// placed by the run record that names it, and that run is closed.
func TestRepairPlacesADispatchByItsRun(t *testing.T) {
	ctx := context.Background()
	s, mb := idleMailbox(t)
	res := submitTo(t, mb, "t")
	d, err := s.LoadDispatch(ctx, res.DispatchID)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range [][]byte{orderKey(pAll, d), orderKey(pQueue, d)} { // no index names its thread
		if err := s.RawDelete(k); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.RawSet(dispatchKey(res.DispatchID), []byte{binaryV1, 0xff}); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Repair(ctx, time.Now().UnixMilli())
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := s.LoadDispatch(ctx, res.DispatchID); got == nil || got.Status != engine.StatusDeadLetter || got.ThreadID != "t" {
		t.Fatalf("the dispatch after the repair: %+v (replaced %v)", got, rep.Replaced)
	}
	if r, _ := s.LoadRun(ctx, res.RunID); r == nil || r.Status != engine.RunDone {
		t.Fatalf("its run after the repair: %+v", r)
	}
	wantConsistent(t, s)
}

// A repair whose commit fails part-way reports exactly what committed, and
// the next run finishes the job and reports the rest.
func TestRepairReportsWhatCommittedBeforeAFailure(t *testing.T) {
	ctx := context.Background()
	s := memStore(t)
	const n = repairChunk + 1
	msgs := make([]engine.Message, n)
	for i := range msgs {
		msgs[i] = engine.Message{ID: fmt.Sprintf("x%d", i), Role: engine.RoleUser, Content: []byte(`"x"`)}
	}
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "m", ExpectedCount: 0, CreatedAt: 1, Messages: msgs}); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := s.RawSet(messageKey("m", uint64(i+1)), []byte{binaryMessageV1, 0xff}); err != nil {
			t.Fatal(err)
		}
	}
	commits := 0
	s.testCommit = func(txn *badger.Txn) func(cb func(error)) {
		commits++
		fail := commits == 2
		return func(cb func(error)) {
			if fail {
				txn.Discard()
				cb(errors.New("injected: the disk is full"))
				return
			}
			txn.CommitWith(cb)
		}
	}
	rep, err := s.Repair(ctx, time.Now().UnixMilli())
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("%d of %d writes committed", repairChunk, n)) {
		t.Fatalf("a repair whose second commit fails: %v", err)
	}
	if len(rep.Replaced) != repairChunk {
		t.Fatalf("%d replacements reported; want the %d that committed", len(rep.Replaced), repairChunk)
	}
	s.testCommit = nil
	rep, err = s.Repair(ctx, time.Now().UnixMilli())
	if err != nil || len(rep.Replaced) != 1 || !strings.Contains(rep.Replaced[0], fmt.Sprintf("message %d of thread m", n)) {
		t.Fatalf("the second repair: %v, %v", rep.Replaced, err)
	}
	wantConsistent(t, s)
}

// A dispatch acked after its run was cancelled while running stays acked;
// one cancelled in the queue (its run never started) stays cancelled.
func TestRepairKeepsHowADispatchFinished(t *testing.T) {
	ctx := context.Background()
	s, mb := idleMailbox(t)
	ran := submitTo(t, mb, "ran")
	now := time.Now().UnixMilli() // not before the submit: its dispatch is due from then
	d, err := s.ClaimStart(ctx, "ran", "c9", time.Minute, "i1", now)
	if err != nil || d == nil {
		t.Fatalf("claim: %v, %v", d, err)
	}
	res := engine.RunResult{RunID: ran.RunID, InstanceID: "i1", Status: engine.RunDone, Termination: &engine.Termination{Type: engine.TermCancelled}}
	if err := s.Complete(ctx, d.DispatchID, d.ClaimToken, res, now); err != nil {
		t.Fatal(err)
	}
	queued := submitTo(t, mb, "queued")
	if _, err := s.Cancel(ctx, queued.DispatchID, now); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		res  engine.SubmitResult
		want engine.DispatchStatus
	}{{ran, engine.StatusAcked}, {queued, engine.StatusCancelled}} {
		before, _ := s.LoadDispatch(ctx, c.res.DispatchID)
		r, _ := s.LoadRun(ctx, c.res.RunID)
		if before == nil || before.Status != c.want || r == nil || r.Status != engine.RunDone || r.TerminationReason == nil || r.TerminationReason.Type != engine.TermCancelled {
			t.Fatalf("before the damage: %+v, run %+v", before, r)
		}
		if err := s.RawSet(dispatchKey(c.res.DispatchID), []byte{binaryV1, 0xff}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Repair(ctx, now); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		id   string
		want engine.DispatchStatus
	}{{ran.DispatchID, engine.StatusAcked}, {queued.DispatchID, engine.StatusCancelled}} {
		if d, _ := s.LoadDispatch(ctx, c.id); d == nil || d.Status != c.want {
			t.Fatalf("dispatch %s after the repair: %+v; want %s", c.id, d, c.want)
		}
	}
	wantConsistent(t, s)
}

// A message record of an earlier version (JSON) naming another seq than
// its key's is rewritten under its key's.
func TestRepairRewritesAMessageUnderItsKey(t *testing.T) {
	ctx := context.Background()
	s := memStore(t)
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "m", ExpectedCount: 0, CreatedAt: 1,
		Messages: []engine.Message{{ID: "x", Role: engine.RoleUser, Content: []byte(`"kept"`)}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.RawSet(messageKey("m", 1), []byte(`{"message_id":"x","thread_id":"m","seq":7,"message":{"id":"x","role":"user","content":"kept"}}`)); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Repair(ctx, time.Now().UnixMilli())
	if err != nil || len(rep.Replaced) != 1 || !strings.Contains(rep.Replaced[0], "rewritten under its key") {
		t.Fatalf("repair: %v, %v", rep.Replaced, err)
	}
	if m, _ := s.LoadMessage(ctx, "m", "x"); m == nil || m.Seq != 1 || string(m.Message.Content) != `"kept"` {
		t.Fatalf("the message after the repair: %+v", m)
	}
	wantConsistent(t, s)
}

// memStore opens a store in memory, closed when the test ends.
func memStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(Options{InMemory: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// wantConsistent fails the test unless Verify finds nothing.
func wantConsistent(t *testing.T, s *Store) {
	t.Helper()
	v, err := s.Verify(context.Background())
	if err != nil || len(v.Problems) != 0 {
		t.Fatalf("Verify: %v, %v", v.Problems, err)
	}
}

// idleMailbox is a mailbox on a store in memory whose agent takes no run
// (it is not started): what is submitted stays queued.
func idleMailbox(t *testing.T) (*Store, *engine.Mailbox) {
	t.Helper()
	return openMailbox(t, Options{InMemory: true}, &oneSlotExec{changed: make(chan struct{}, 1)})
}

// submitTo submits a background run of one user message to thread.
func submitTo(t *testing.T, mb *engine.Mailbox, thread string) engine.SubmitResult {
	t.Helper()
	res, err := mb.SubmitBackground(context.Background(), engine.SubmitRequest{ThreadID: thread, Messages: []engine.Message{userText("hi")}})
	if err != nil {
		t.Fatal(err)
	}
	return res
}
