package badgerstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Repairing a data directory whose records went bad.
//
// A record that does not decode (engine.ErrCorrupt: bytes that went bad on
// the disk, say) stops its thread: the engine sets the thread aside at
// every claim (engine/README.md "A thread that cannot be claimed"), and
// interrupt and cancel read the record too. Verify names it; Repair, run
// by an operator on a stopped sidecar (`mailbox-sidecar repair`), puts in
// its place what the indexes still tell, and then makes every derived key
// agree with the records:
//
//   - a dispatch becomes a dead letter (thread, priority and creation time
//     from its listing entry; its run from the run record that names it),
//     with last_error saying so and what the indexes said it was; its run,
//     when open, is settled as the engine settles a dead letter's. An
//     operator can requeue it like any dead letter. One the indexes show
//     finished stays finished (acked, or cancelled when it never ran), so
//     that no requeue runs finished work again.
//   - a run record becomes a done run with an error termination (thread
//     and times from its index entries); queued or claimed dispatches of
//     it become dead letters: the request it held is gone.
//   - a message becomes a system message saying it was damaged, under its
//     id (from the id index) and sequence number, so the log keeps its
//     length and order; one that decodes with raw fields that are not
//     UTF-8 JSON gets U+FFFD for the bytes that are not UTF-8 (the
//     placeholder when that is not enough).
//   - a thread projection is rebuilt from the thread's runs and messages
//     (its resource_id, parent_thread_id and metadata are lost).
//   - a thread state is rebuilt from the thread's dispatches.
//
// A record whose thread no index names is deleted (and listed). Then every
// index entry, counter, marker, thread state, message counter and id index
// and projection that disagrees with the records is rewritten or deleted
// (a REINDEX): what Verify would call stray, missing or wrong. What the
// records themselves cannot decide is listed and left: two claimed
// dispatches on a thread, a gap in a message log.

// RepairReport says what Repair did.
type RepairReport struct {
	// Replaced lists each record that did not decode (or was otherwise
	// mended in place) and what took its place.
	Replaced []string
	// Rewritten counts the derived keys written or deleted to agree with
	// the records.
	Rewritten int
	// Changes describes the first MaxProblems of those writes.
	Changes []string
	// Left lists what Repair found and could not mend.
	Left []string
}

// repairNote is the text a placeholder carries.
const repairNote = "damaged on disk; replaced by mailbox-sidecar repair"

// repairWrite is one key Repair writes (del: deletes).
type repairWrite struct {
	k, v []byte
	del  bool
}

// repairPlan is one step's writes and what they do: each entry of the
// report is noted after the writes it needs, and reported only once they
// committed.
type repairPlan struct {
	writes            []repairWrite
	replaced, changes []plannedNote
	left              []string
}

// plannedNote is a report entry and the number of the plan's writes that
// must commit before it is true.
type plannedNote struct {
	text string
	upTo int
}

// replace notes a record replaced by the writes planned so far.
func (p *repairPlan) replace(format string, args ...any) {
	p.replaced = append(p.replaced, plannedNote{fmt.Sprintf(format, args...), len(p.writes)})
}

// change plans w, a derived key's write, and notes it.
func (p *repairPlan) change(w repairWrite, format string, args ...any) {
	p.writes = append(p.writes, w)
	p.changes = append(p.changes, plannedNote{fmt.Sprintf(format, args...), len(p.writes)})
}

// leave notes what the plan cannot mend.
func (p *repairPlan) leave(format string, args ...any) {
	p.left = append(p.left, fmt.Sprintf(format, args...))
}

// report adds to rep what the first done writes of the plan did.
func (p *repairPlan) report(rep *RepairReport, done int) {
	for _, n := range p.replaced {
		if n.upTo <= done {
			rep.Replaced = append(rep.Replaced, n.text)
		}
	}
	for _, n := range p.changes {
		if n.upTo <= done {
			rep.Rewritten++
			if len(rep.Changes) < MaxProblems {
				rep.Changes = append(rep.Changes, n.text)
			}
		}
	}
	rep.Left = append(rep.Left, p.left...)
}

// repairChunk and repairChunkBytes bound the writes of one commit (a
// chunk still too large for Badger's transaction is halved).
const (
	repairChunk      = 1000
	repairChunkBytes = 512 << 10
)

// Repair replaces the records that do not decode (and messages whose
// raw fields are not UTF-8 JSON) and rewrites every derived key that
// disagrees with the records (see above). now (Unix ms, as dispatches
// keep time; run records get its seconds) stamps what it changes. It is
// for a stopped sidecar: nothing else may use the store meanwhile.
// Running it on a consistent store writes nothing. The report lists what
// was written, also when a commit fails (the error says how far the step
// got); running Repair again finishes the job (each step plans from what
// is stored).
func (s *Store) Repair(ctx context.Context, now int64) (RepairReport, error) {
	var rep RepairReport
	if now <= 0 {
		return rep, fmt.Errorf("repair: now is %d, not a time: %w", now, engine.ErrValidation)
	}
	if !s.opts.InMemory {
		// A scan of the records ends or skips silently at a table block
		// that does not read, and the plan would delete every index
		// entry and counter of the records it did not see: the next
		// appends then overwrote messages that were still on the disk
		// (found by review). Nothing is written.
		if err := s.verifyTables(); err != nil {
			return rep, fmt.Errorf("repair: table blocks fail their checksums, so records would be missed and their indexes deleted; nothing written (keep a copy of the directory; what still reads can be exported with the sidecar's API): %w", err)
		}
	}
	steps := []struct {
		name string
		plan func(r *reader, p *repairPlan) error
	}{
		{"replacing damaged records", func(r *reader, p *repairPlan) error { return planPlaceholders(r, now, p) }},
		{"rewriting derived keys", func(r *reader, p *repairPlan) error { return planDerived(r, now, p) }},
	}
	for _, st := range steps {
		var p repairPlan
		err := s.view(ctx, func(r *reader) error {
			r.ctx = ctx
			return st.plan(r, &p)
		})
		if err != nil {
			return rep, fmt.Errorf("repair: %s: %w", st.name, err)
		}
		done, err := s.applyRepair(ctx, p.writes)
		p.report(&rep, done)
		if err != nil {
			return rep, fmt.Errorf("repair: %s: %d of %d writes committed: %w", st.name, done, len(p.writes), err)
		}
	}
	return rep, nil
}

// applyRepair writes ws through the writer (so its caches see them), a
// chunk per durable commit; done counts the writes committed.
func (s *Store) applyRepair(ctx context.Context, ws []repairWrite) (done int, err error) {
	limit := repairChunk
	for done < len(ws) {
		n, size := 0, 0
		for done+n < len(ws) && n < limit && (n == 0 || size < repairChunkBytes) {
			size += len(ws[done+n].k) + len(ws[done+n].v)
			n++
		}
		chunk := ws[done : done+n]
		err := s.update(ctx, "repair", func(w *writeTx) error {
			for _, x := range chunk {
				if x.del {
					w.del(x.k)
				} else {
					w.set(x.k, x.v)
				}
			}
			return nil
		})
		if errors.Is(err, engine.ErrTooLarge) && n > 1 {
			limit = max(n/2, 1)
			continue
		}
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// splitSeg splits <seg s><rest> (after the family byte).
func splitSeg(b []byte) (s string, rest []byte, ok bool) {
	if len(b) < 2 {
		return "", nil, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return "", nil, false
	}
	return string(b[2 : 2+n]), b[2+n:], true
}

// dispatchTrace is what the indexes still tell of a dispatch.
type dispatchTrace struct {
	thread           string
	priority         uint8
	created          int64
	queued           bool
	available        int64
	epoch            uint64
	claimed, settled bool
	dead             bool
}

func (t *dispatchTrace) was() string {
	switch {
	case t.dead:
		return "a dead letter"
	case t.settled:
		return "finished"
	case t.claimed:
		return "claimed"
	case t.queued:
		return "queued"
	}
	return "of unknown status"
}

// runTrace is what the indexes still tell of a run.
type runTrace struct {
	thread           string
	created, updated int64
}

// planPlaceholders finds the records that do not decode and returns the
// writes that replace them.
func planPlaceholders(r *reader, now int64, p *repairPlan) error {
	badDispatch := map[string]*dispatchTrace{}
	badRun := map[string]*runTrace{}
	badThread := map[string]bool{}
	type msgRef struct {
		thread string
		seq    uint64
	}
	var badMsg []msgRef
	var mended []engine.MessageRecord // decoded, with raw fields that are not UTF-8 JSON
	runs := map[string]*engine.RunRecord{}
	dispatchesOfRun := map[string][]*engine.Dispatch{}
	var settled []*engine.Dispatch
	err := r.iterate([]byte{pDispatch}, nil, false, false, func(k, v []byte) (bool, error) {
		d, err := decodeDispatch(k, v)
		if err != nil {
			badDispatch[string(k[1:])] = &dispatchTrace{}
			return true, nil
		}
		dispatchesOfRun[d.RunID] = append(dispatchesOfRun[d.RunID], d)
		switch d.Status {
		case engine.StatusCancelled, engine.StatusSuperseded, engine.StatusDeadLetter:
			settled = append(settled, d)
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	err = r.iterate([]byte{pRun}, nil, false, false, func(k, v []byte) (bool, error) {
		run, err := decodeRun(k, v)
		if err != nil {
			badRun[string(k[1:])] = &runTrace{}
			return true, nil
		}
		runs[run.RunID] = run
		return true, nil
	})
	if err != nil {
		return err
	}
	err = r.iterate([]byte{pThread}, nil, false, false, func(k, v []byte) (bool, error) {
		if _, err := decodeThread(k, v); err != nil {
			badThread[string(k[1:])] = true
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	err = r.iterate([]byte{pEpoch}, nil, false, false, func(k, v []byte) (bool, error) {
		if _, err := decodeThreadState(k, v); err != nil {
			// Deleted here, written again by the second step from the
			// thread's dispatches (which reports it).
			p.writes = append(p.writes, repairWrite{k: k, del: true})
			p.replace("thread state of %s: damaged, deleted; the second step writes it from its dispatches", k[1:])
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	err = r.iterate([]byte{pMessage}, nil, false, false, func(k, v []byte) (bool, error) {
		m, err := decodeMessage(k, v)
		thread, seq, ok := splitMessageKey(k)
		if !ok {
			p.left = append(p.left, fmt.Sprintf("malformed message key %q", k))
			return true, nil
		}
		if err == nil && validMessageFields(&m.Message) && m.ThreadID == thread && m.Seq == seq {
			return true, nil
		}
		if err == nil {
			// A record of an earlier version naming another place than
			// its key's (binary records take theirs from the key) is
			// rewritten under its key's.
			m.ThreadID, m.Seq = thread, seq
			mended = append(mended, m)
			return true, nil
		}
		badMsg = append(badMsg, msgRef{thread, seq})
		return true, nil
	})
	if err != nil {
		return err
	}
	put := func(k []byte, rec any) error {
		b, err := encode(rec)
		if err != nil {
			return err
		}
		p.writes = append(p.writes, repairWrite{k: k, v: b})
		return nil
	}

	// Dispatches: the indexes tell the thread, priority, creation time and
	// what became of them.
	if len(badDispatch) > 0 {
		if err := traceDispatches(r, badDispatch); err != nil {
			return err
		}
	}
	// The newest run naming each dispatch (a requeue reopens a run under
	// a new dispatch).
	runOf := map[string]*engine.RunRecord{}
	for _, run := range runs {
		if cur := runOf[run.DispatchID]; run.DispatchID != "" && (cur == nil || run.CreatedAt > cur.CreatedAt) {
			runOf[run.DispatchID] = run
		}
	}
	for _, id := range sortedKeys(badDispatch) {
		tr := badDispatch[id]
		if run := runOf[id]; tr.thread == "" && run != nil {
			// No listing entry, but its run names it: the run's thread,
			// and its creation time (seconds) for the dispatch's.
			tr.thread, tr.created = run.ThreadID, run.CreatedAt*1000
		}
		if tr.thread == "" {
			p.writes = append(p.writes, repairWrite{k: dispatchKey(id), del: true})
			p.replace("dispatch %s: no index names its thread; deleted", id)
			continue
		}
		runID := "unknown"
		run := runOf[id]
		if run != nil {
			runID = run.RunID
		}
		// A dispatch that had finished stays finished: a dead letter would
		// invite a requeue of work done (or of a dead letter requeued
		// already: its requeued_as is lost with the record).
		status := engine.StatusDeadLetter
		if tr.settled && !tr.dead {
			// Acked, unless its run never started and was cancelled: a
			// dispatch cancelled or superseded in the queue. (One cancelled
			// while it ran was acked, its run ended "cancelled".)
			status = engine.StatusAcked
			if run != nil && run.StartedAt == 0 && run.StartCount == 0 && run.TerminationReason != nil && run.TerminationReason.Type == engine.TermCancelled {
				status = engine.StatusCancelled
			}
		}
		d := &engine.Dispatch{
			DispatchID: id, ThreadID: tr.thread, RunID: runID, Priority: tr.priority, Epoch: tr.epoch,
			Status: status, AvailableAt: tr.created, MaxAttempts: 1,
			LastError:   fmt.Sprintf("dispatch record %s (it was %s)", repairNote, tr.was()),
			CompletedAt: now, CreatedAt: tr.created, UpdatedAt: now,
		}
		if tr.queued {
			d.AvailableAt = tr.available
		}
		if err := put(dispatchKey(id), d); err != nil {
			return err
		}
		what := fmt.Sprintf("dispatch %s of thread %s (%s): %s", id, tr.thread, tr.was(), status)
		if run != nil && run.ThreadID == tr.thread {
			closed := cloneRun(run)
			if closed.Settle(d, now/1000) { // as the engine settles the run of a dead letter
				runs[run.RunID] = closed
				if err := put(runKey(run.RunID), closed); err != nil {
					return err
				}
				what += fmt.Sprintf("; its run %s, %s, closed with an error", run.RunID, run.Status)
			}
		}
		p.replace("%s", what)
	}
	// A settled dispatch whose run is still open: a repair stopped
	// between the commit of a placeholder and that of its run's close (or
	// any other cause); closed as the engine would have closed it.
	for _, d := range settled {
		run := runs[d.RunID]
		if run == nil || run.ThreadID != d.ThreadID || run.Status == engine.RunDone || run.DispatchID != d.DispatchID {
			continue
		}
		closed := cloneRun(run)
		closed.Settle(d, now/1000)
		runs[run.RunID] = closed
		if err := put(runKey(run.RunID), closed); err != nil {
			return err
		}
		p.replace("run %s of thread %s: %s, but its dispatch %s is %s; closed as the engine closes it", run.RunID, run.ThreadID, run.Status, d.DispatchID, d.Status)
	}

	// Runs: the thread and times come from the run indexes.
	if len(badRun) > 0 {
		if err := traceRuns(r, badRun); err != nil {
			return err
		}
	}
	for _, id := range sortedKeys(badRun) {
		tr := badRun[id]
		if tr.thread == "" {
			p.writes = append(p.writes, repairWrite{k: runKey(id), del: true})
			p.replace("run %s: no index names its thread; deleted", id)
			continue
		}
		run := &engine.RunRecord{RunID: id, ThreadID: tr.thread, CreatedAt: tr.created, UpdatedAt: tr.updated}
		what := fmt.Sprintf("run %s of thread %s: a done run with an error termination", id, tr.thread)
		var newest int64
		for _, d := range dispatchesOfRun[id] {
			if d.ThreadID != tr.thread {
				continue
			}
			if run.DispatchID == "" || d.CreatedAt > newest {
				run.DispatchID, newest = d.DispatchID, d.CreatedAt
			}
			if d.Status.Terminal() {
				continue
			}
			dl := *d
			dl.Status, dl.ClaimToken, dl.ClaimedBy, dl.LeaseUntil = engine.StatusDeadLetter, "", "", 0
			dl.LastError = fmt.Sprintf("its run record was %s (the dispatch was %s)", repairNote, d.Status)
			dl.CompletedAt, dl.UpdatedAt = now, now
			if err := put(dispatchKey(d.DispatchID), &dl); err != nil {
				return err
			}
			what += fmt.Sprintf("; its %s dispatch %s a dead letter", d.Status, d.DispatchID)
		}
		why := "run record " + repairNote
		payload, err := encode(map[string]string{"message": why})
		if err != nil {
			return err
		}
		// Done as the engine leaves the run of a dead letter (Settle),
		// updated_at kept: its place in the thread's latest-run order.
		run.Status, run.TerminationReason, run.ErrorPayload, run.FinishedAt = engine.RunDone, engine.ErrorTermination(why), payload, now/1000
		if err := put(runKey(id), run); err != nil {
			return err
		}
		p.replace("%s", what)
	}

	// Projections are rebuilt with the derived keys: drop them here.
	for _, t := range sortedKeys(badThread) {
		p.writes = append(p.writes, repairWrite{k: threadKey(t), del: true})
		p.replace("thread projection of %s: damaged, deleted; the second step writes it from its runs and messages (its resource_id, parent_thread_id and metadata are lost)", t)
	}

	// Messages keep their id and place in the log.
	idsOf := map[string]map[uint64]string{} // thread → seq → id, read once per thread
	for _, m := range badMsg {
		ids, ok := idsOf[m.thread]
		if !ok {
			var err error
			if ids, err = messageIDsOf(r, m.thread); err != nil {
				return err
			}
			idsOf[m.thread] = ids
		}
		id := ids[m.seq]
		if id == "" {
			id = fmt.Sprintf("damaged-%s-%d", m.thread, m.seq)
		}
		rec := &engine.MessageRecord{
			MessageID: id, ThreadID: m.thread, Seq: m.seq,
			Message: engine.Message{ID: id, Role: engine.RoleSystem, Content: []byte(`"[this message was ` + repairNote + `]"`)},
		}
		if err := put(messageKey(m.thread, m.seq), rec); err != nil {
			return err
		}
		p.replace("message %d of thread %s (id %s): a system message saying it was damaged", m.seq, m.thread, id)
	}
	// Messages that decode but whose raw fields are not UTF-8 JSON (bytes
	// that went bad inside a record, or stored by a version that did not
	// check them): bytes that are not UTF-8 become U+FFFD, as the hub
	// sends them; what is still not JSON becomes a placeholder.
	for _, m := range mended {
		fixed := m
		fixed.Message.Content = bytes.ToValidUTF8(m.Message.Content, []byte("\uFFFD"))
		fixed.Message.ToolCalls = bytes.ToValidUTF8(m.Message.ToolCalls, []byte("\uFFFD"))
		fixed.Message.Metadata = bytes.ToValidUTF8(m.Message.Metadata, []byte("\uFFFD"))
		what := "rewritten under its key's thread and seq"
		if !validMessageFields(&m.Message) {
			what = "bytes that were not UTF-8 replaced by U+FFFD"
		}
		if !validMessageFields(&fixed.Message) {
			fixed = engine.MessageRecord{MessageID: m.MessageID, ThreadID: m.ThreadID, Seq: m.Seq, CreatedAt: m.CreatedAt,
				Message: engine.Message{ID: m.Message.ID, Role: engine.RoleSystem, Content: []byte(`"[this message was ` + repairNote + `]"`)}}
			what = "content, tool calls or metadata not JSON: a system message saying it was damaged"
		}
		if err := put(messageKey(m.ThreadID, m.Seq), &fixed); err != nil {
			return err
		}
		p.replace("message %d of thread %s (id %s): %s", m.Seq, m.ThreadID, m.MessageID, what)
	}
	return nil
}

// validMessageFields reports whether m's raw fields are UTF-8 JSON, as
// every append checks (engine.Message.Validate) and Verify does.
func validMessageFields(m *engine.Message) bool {
	return engine.ValidateStoredJSON(m.Content) == nil && engine.ValidateStoredJSON(m.ToolCalls) == nil && engine.ValidateStoredJSON(m.Metadata) == nil
}

// traceDispatches fills in what the indexes tell of the dispatches in bad.
func traceDispatches(r *reader, bad map[string]*dispatchTrace) error {
	// a and q: <seg thread><prio><created ts><id>.
	for _, fam := range []byte{pAll, pQueue} {
		err := r.iterate([]byte{fam}, nil, false, false, func(k, v []byte) (bool, error) {
			thread, rest, ok := splitSeg(k[1:])
			if !ok || len(rest) < 1+tsBytes {
				return true, nil
			}
			tr := bad[string(rest[1+tsBytes:])]
			if tr == nil {
				return true, nil
			}
			tr.thread, tr.priority, tr.created = thread, rest[0], readTS(rest[1:])
			if fam == pQueue && len(v) >= tsBytes+8 {
				tr.queued, tr.available, tr.epoch = true, readTS(v), binary.BigEndian.Uint64(v[tsBytes:])
			}
			return true, nil
		})
		if err != nil {
			return err
		}
	}
	// l: <lease ts><id>; x: <completed ts><id>; t: <updated ts><created ts><id>.
	for _, f := range []struct {
		fam  byte
		skip int
		mark func(*dispatchTrace)
	}{
		{pLease, tsBytes, func(t *dispatchTrace) { t.claimed = true }},
		{pDead, tsBytes, func(t *dispatchTrace) { t.dead = true }},
		{pTerminal, 2 * tsBytes, func(t *dispatchTrace) { t.settled = true }},
	} {
		err := r.iterate([]byte{f.fam}, nil, false, true, func(k, _ []byte) (bool, error) {
			if len(k) > 1+f.skip {
				if tr := bad[string(k[1+f.skip:])]; tr != nil {
					f.mark(tr)
				}
			}
			return true, nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// traceRuns fills in what the run indexes tell of the runs in bad: T
// (<seg thread><updated ts><created ts><id>), else U (<seg thread><created
// ts><id>).
func traceRuns(r *reader, bad map[string]*runTrace) error {
	err := r.iterate([]byte{pRunLatest}, nil, false, true, func(k, _ []byte) (bool, error) {
		thread, rest, ok := splitSeg(k[1:])
		if !ok || len(rest) < 2*tsBytes {
			return true, nil
		}
		if tr := bad[string(rest[2*tsBytes:])]; tr != nil {
			tr.thread, tr.updated, tr.created = thread, readTS(rest), readTS(rest[tsBytes:])
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	return r.iterate([]byte{pRunThread}, nil, false, true, func(k, _ []byte) (bool, error) {
		thread, rest, ok := splitSeg(k[1:])
		if !ok || len(rest) < tsBytes {
			return true, nil
		}
		if tr := bad[string(rest[tsBytes:])]; tr != nil && tr.thread == "" {
			tr.thread, tr.created = thread, readTS(rest)
			tr.updated = tr.created
		}
		return true, nil
	})
}

// messageIDsOf maps the seqs of thread's message-id index to their ids.
func messageIDsOf(r *reader, thread string) (map[uint64]string, error) {
	prefix := threadPrefix(pMessageID, thread)
	ids := map[uint64]string{}
	err := r.iterate(prefix, nil, false, false, func(k, v []byte) (bool, error) {
		if len(v) == 8 {
			ids[readU64(v)] = string(k[len(prefix):])
		}
		return true, nil
	})
	return ids, err
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// planDerived returns the writes that make every derived key agree with
// the records of r's snapshot.
func planDerived(r *reader, now int64, p *repairPlan) error {
	change := p.change
	left := p.leave
	dv, err := derive(r, now, left)
	if err != nil {
		return err
	}

	// Index families (a listing entry's value is not read: an earlier
	// version stored the status there).
	for _, fam := range derivedFamilies {
		if err := reconcile(r, []byte{fam}, dv.want[fam], fam != pAll, "index entry", p); err != nil {
			return err
		}
	}

	// Counters by status (absent is zero).
	for _, st := range engine.AllStatuses {
		k := countKey(st)
		b, _, err := r.get(k)
		if err != nil {
			return err
		}
		want := dv.counts[byte(st)]
		if got, cerr := counter(k, b); cerr == nil && got == want {
			continue
		}
		if want == 0 {
			change(repairWrite{k: k, del: true}, "count of %s → 0", st)
		} else {
			change(repairWrite{k: k, v: u64(want)}, "count of %s → %d", st, want)
		}
	}

	// Thread states, and the queued-thread markers with them.
	states := map[string]bool{}
	err = r.iterate([]byte{pEpoch}, nil, false, false, func(k, v []byte) (bool, error) {
		thread := string(k[1:])
		states[thread] = true
		tw := dv.threads[thread]
		if tw == nil {
			tw = &threadWant{}
		}
		st, derr := decodeThreadState(k, v)
		if derr == nil && stateAgrees(st, tw) && dueAgrees(st, tw, now) {
			return true, nil
		}
		want, ok := tw.stateFor(st.epoch) // st is zero when it does not decode
		switch {
		case !ok:
			left("thread %s has %d claimed dispatches (%v): its state is not rebuilt", thread, len(tw.claimed), tw.claimed)
		case want.zero():
			change(repairWrite{k: k, del: true}, "deleted the all-zero state of thread %s", thread)
		default:
			change(repairWrite{k: k, v: encodeThreadState(want)}, "rebuilt the state of thread %s (queued %d, claimed %q, epoch %d)", thread, want.queued, want.claimed, want.epoch)
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, thread := range sortedKeys(dv.threads) {
		if states[thread] {
			continue
		}
		want, ok := dv.threads[thread].stateFor(0)
		switch {
		case !ok:
			left("thread %s has %d claimed dispatches (%v): its state is not rebuilt", thread, len(dv.threads[thread].claimed), dv.threads[thread].claimed)
		case !want.zero():
			change(repairWrite{k: stateKey(thread), v: encodeThreadState(want)}, "wrote the missing state of thread %s (queued %d, claimed %q, epoch %d)", thread, want.queued, want.claimed, want.epoch)
		}
	}
	markers := map[string]bool{}
	err = r.iterate([]byte{pThreadQ}, nil, false, true, func(k, _ []byte) (bool, error) {
		thread := string(k[1:])
		markers[thread] = true
		if tw := dv.threads[thread]; tw == nil || tw.queued == 0 {
			change(repairWrite{k: k, del: true}, "deleted the queued-thread marker of %s", thread)
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, thread := range sortedKeys(dv.threads) {
		if dv.threads[thread].queued > 0 && !markers[thread] {
			change(repairWrite{k: threadQKey(thread), v: nil}, "wrote the queued-thread marker of %s", thread)
		}
	}

	if err := planMessageLogs(r, dv.runs, p); err != nil {
		return err
	}
	return nil
}

// reconcile makes the keys under prefix exactly want (key → value; with
// values false, only the keys): it deletes the others and writes the
// missing and, with values, the wrong ones. It empties want.
func reconcile(r *reader, prefix []byte, want map[string][]byte, values bool, what string, p *repairPlan) error {
	err := r.iterate(prefix, nil, false, false, func(k, v []byte) (bool, error) {
		wv, ok := want[string(k)]
		switch {
		case !ok:
			p.change(repairWrite{k: k, del: true}, "deleted stray %s %q", what, k)
		case values && !bytes.Equal(wv, v) && !(len(wv) == 0 && len(v) == 0):
			p.change(repairWrite{k: k, v: wv}, "%s %q: value %q → %q", what, k, v, wv)
		}
		delete(want, string(k))
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, k := range sortedKeys(want) {
		p.change(repairWrite{k: []byte(k), v: want[k]}, "wrote missing %s %q", what, k)
	}
	return nil
}

// stateAgrees reports whether a stored thread state passes Verify's checks
// against what the records imply.
func stateAgrees(st threadState, tw *threadWant) bool {
	want := ""
	if len(tw.claimed) == 1 {
		want = tw.claimed[0]
	}
	switch {
	case st.zero(), st.queued != tw.queued, st.claimed != want, st.epoch < tw.maxEpoch, len(tw.claimed) > 1:
		return false
	case tw.minQueue != nil && bytes.Compare(st.floor, tw.minQueue) > 0:
		return false
	case tw.minAvail != nil && bytes.Compare(st.vfloor, tw.minAvail) > 0:
		return false
	case st.dueStale && st.claimed == "":
		return false
	case tw.queued > 0 && !(st.dueStale && st.claimed != "") && st.due < tw.due:
		return false // above the records' may be a run's end (raisedDue checks it)
	}
	return true
}

// planMessageLogs makes each thread's message counter, id index and
// projection agree with its message records and runs.
func planMessageLogs(r *reader, runs map[string]*engine.RunRecord, p *repairPlan) error {
	change := p.change
	left := p.leave
	lastSeq := map[string]uint64{}
	count := map[string]uint64{}
	wantID := map[string][]byte{} // I key → seq
	err := r.iterate([]byte{pMessage}, nil, false, false, func(k, v []byte) (bool, error) {
		thread, seq, ok := splitMessageKey(k)
		if !ok {
			return true, nil
		}
		m, err := decodeMessageOf(thread, seq, k, v, false)
		if err != nil {
			left("%v", err)
			return true, nil
		}
		lastSeq[thread] = max(lastSeq[thread], seq)
		count[thread]++
		wantID[string(messageIDKey(thread, m.MessageID))] = u64(seq)
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, thread := range sortedKeys(lastSeq) {
		if count[thread] != lastSeq[thread] {
			left("thread %s message log holds %d messages up to seq %d: the gaps are not filled", thread, count[thread], lastSeq[thread])
		}
	}
	if err := reconcile(r, []byte{pMessageID}, wantID, true, "message-id entry", p); err != nil {
		return err
	}
	// The counter is the append guard: the next append takes seq n+1, so
	// it is the last seq, gaps or not.
	counted := map[string]bool{}
	err = r.iterate([]byte{pMsgCount}, nil, false, false, func(k, v []byte) (bool, error) {
		thread := string(k[1:])
		counted[thread] = true
		got, cerr := counter(k, v)
		switch want := lastSeq[thread]; {
		case want == 0: // a stray counter, even one of zero
			change(repairWrite{k: k, del: true}, "deleted the message counter of %s (no messages)", thread)
		case cerr == nil && got == want:
		default:
			change(repairWrite{k: k, v: u64(want)}, "message counter of %s → %d", thread, want)
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	for _, thread := range sortedKeys(lastSeq) {
		if !counted[thread] {
			change(repairWrite{k: msgCountKey(thread), v: u64(lastSeq[thread])}, "wrote the missing message counter of %s (%d)", thread, lastSeq[thread])
		}
	}

	// Projections: message_count and run pointers from the records.
	latest := map[string]*engine.RunRecord{}
	for _, run := range runs {
		if l := latest[run.ThreadID]; l == nil || bytes.Compare(runLatestKey(run), runLatestKey(l)) > 0 {
			latest[run.ThreadID] = run
		}
	}
	fix := func(k []byte, t *engine.Thread, what string) error {
		b, err := encode(t)
		if err != nil {
			return err
		}
		change(repairWrite{k: k, v: b}, "%s thread projection %s (messages %d, latest run %q)", what, t.ID, t.MessageCount, t.LatestRunID)
		return nil
	}
	projected := map[string]bool{}
	err = r.iterate([]byte{pThread}, nil, false, false, func(k, v []byte) (bool, error) {
		thread := string(k[1:])
		projected[thread] = true
		t, err := decodeThread(k, v)
		if err != nil {
			left("%v", err)
			return true, nil
		}
		if t.ID != thread {
			left("thread record %q names thread %q", k[1:], t.ID)
			return true, nil
		}
		if fixProjection(t, runs, latest[thread], lastSeq[thread], false) {
			return true, fix(k, t, "rewrote")
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	missing := map[string]bool{}
	for t := range latest {
		missing[t] = true
	}
	for t := range lastSeq {
		missing[t] = true
	}
	for _, thread := range sortedKeys(missing) {
		if projected[thread] {
			continue
		}
		t := &engine.Thread{ID: thread}
		fixProjection(t, runs, latest[thread], lastSeq[thread], true)
		if err := fix(threadKey(thread), t, "wrote missing"); err != nil {
			return err
		}
	}
	return nil
}

// fixProjection makes t's message count and run pointers agree with the
// records (Verify's checkProjection), and reports whether it changed t. A
// fresh projection (one rebuilt from nothing) names the latest run as
// ApplyRun would have left it: open while not done, active while running.
func fixProjection(t *engine.Thread, runs map[string]*engine.RunRecord, latest *engine.RunRecord, messages uint64, fresh bool) bool {
	before := *t
	t.MessageCount = messages
	of := func(id string) *engine.RunRecord {
		if run := runs[id]; run != nil && run.ThreadID == t.ID {
			return run
		}
		return nil
	}
	if run := of(t.ActiveRunID); run == nil || run.Status != engine.RunRunning {
		t.ActiveRunID = ""
	}
	if run := of(t.OpenRunID); run == nil || run.Status == engine.RunDone {
		t.OpenRunID, t.OpenRunStatus = "", ""
	} else if t.OpenRunStatus != "" {
		t.OpenRunStatus = run.Status
	}
	if of(t.LatestRunID) == nil {
		t.LatestRunID = ""
		if latest != nil {
			t.LatestRunID = latest.RunID
		}
	}
	if fresh && latest != nil && latest.Status != engine.RunDone {
		t.OpenRunID, t.OpenRunStatus = latest.RunID, latest.Status
		if latest.Status == engine.RunRunning {
			t.ActiveRunID = latest.RunID
		}
	}
	return t.MessageCount != before.MessageCount || t.ActiveRunID != before.ActiveRunID || t.OpenRunID != before.OpenRunID ||
		t.OpenRunStatus != before.OpenRunStatus || t.LatestRunID != before.LatestRunID
}
