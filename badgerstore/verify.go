package badgerstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"sort"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Report is the outcome of Verify.
type Report struct {
	Dispatches int
	Runs       int
	Threads    int
	Messages   int
	// Problems lists every mismatch found; empty when consistent.
	Problems []string
	// StorageProblems counts the problems of Problems that are in the
	// files under the records (table blocks that fail their checksums,
	// value-log files with a bad entry before whole ones), which Repair
	// does not mend.
	StorageProblems int
	// Unwalked: the records were not walked (a table block does not
	// read), so the counts above are not the store's.
	Unwalked bool
	// Notes lists what is worth knowing but not a mismatch: value-log
	// files that end in a torn entry (a write a crash or power loss cut
	// before its sync, or a value at the end that went bad: it reads as
	// corrupt, which Problems then reports).
	Notes []string
}

// MaxProblems bounds the report: Verify lists at most this many.
const MaxProblems = 100

// Verify walks every record and every index in one snapshot and reports
// any mismatch: an index entry without its record or with the wrong
// value, a record without its index entries, counters that disagree with
// the records, two claimed dispatches on one thread, an epoch behind a
// dispatch, gaps in a message log, a thread projection whose message
// count or run pointers disagree with the log and the run records (or a
// thread with runs or messages but no projection), and records that do
// not decode, table blocks whose checksums fail, and value-log files
// (below the newest) with whole entries after one that is torn or fails
// its checksum (one with nothing whole after it is a note). It is
// read-only and meant for tests and operators (after a crash, say); it
// reads the whole database.
func (s *Store) Verify(ctx context.Context) (Report, error) {
	var rep Report
	problem := func(format string, args ...any) {
		if len(rep.Problems) < MaxProblems {
			rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...))
		}
	}
	if !s.opts.InMemory {
		// The table blocks first: a walk of the records misses records or
		// crashes at a block that does not read (Badger reads them
		// unchecked), and whatever it listed then would follow from that
		// one damage. (Badger's check takes no context.)
		if err := s.verifyTables(); err != nil {
			rep.StorageProblems++
			problem("table checksums: %v", err)
			rep.Notes = append(rep.Notes, "the records were not walked: a table block does not read, and a walk misses records or stops at it (repair refuses to run too)")
			rep.Unwalked = true
			err := s.verifyValueLogs(ctx, &rep, problem)
			return rep, err
		}
	}
	err := s.view(ctx, func(r *reader) error {
		r.ctx = ctx // the walk reads every key: it stops when ctx is done
		now := time.Now().UnixMilli()
		dv, err := derive(r, now, problem)
		if err != nil {
			return err
		}
		rep.Dispatches, rep.Runs = dv.dispatches, dv.runCount
		want, counts, threads, runs := dv.want, dv.counts, dv.threads, dv.runs
		for _, st := range engine.AllStatuses {
			b, _, err := r.get(countKey(st))
			if err != nil {
				return err
			}
			got, cerr := counter(countKey(st), b)
			if cerr != nil {
				problem("%v", cerr)
			} else if got != counts[byte(st)] {
				problem("count of %s is %d, records say %d", st, got, counts[byte(st)])
			}
		}
		// Thread states against what the records imply.
		err = r.iterate([]byte{pEpoch}, nil, false, false, func(k, v []byte) (bool, error) {
			thread := string(k[1:])
			st, err := decodeThreadState(k, v)
			if err != nil {
				problem("%v", err)
				return true, nil
			}
			tw := threads[thread]
			if tw == nil {
				tw = &threadWant{}
			}
			delete(threads, thread)
			if st.zero() {
				problem("thread %s has an all-zero state record", thread)
			}
			if st.queued != tw.queued {
				problem("queued count of thread %s is %d, records say %d", thread, st.queued, tw.queued)
			}
			if tw.minQueue != nil && bytes.Compare(st.floor, tw.minQueue) > 0 {
				problem("queue floor of thread %s is above its first queued entry", thread)
			}
			if tw.minAvail != nil && bytes.Compare(st.vfloor, tw.minAvail) > 0 {
				problem("due floor of thread %s is above its first due entry", thread)
			}
			if st.dueStale && st.claimed == "" {
				problem("thread %s is claimable but its due time is unknown", thread)
			}
			if !dueAgrees(st, tw, now) {
				problem("thread %s state says due %d, records say %d (its last run ended at %d)", thread, st.due, tw.due, tw.ended)
			}

			want := ""
			if len(tw.claimed) > 0 {
				want = tw.claimed[0]
			}
			if len(tw.claimed) > 1 {
				problem("thread %s has %d claimed dispatches: %v", thread, len(tw.claimed), tw.claimed)
			}
			if st.claimed != want {
				problem("thread %s state names claimed dispatch %q, records say %q", thread, st.claimed, want)
			}
			if st.epoch < tw.maxEpoch {
				problem("thread %s epoch %d is behind dispatch epoch %d", thread, st.epoch, tw.maxEpoch)
			}
			return true, nil
		})
		if err != nil {
			return err
		}
		for thread, tw := range threads {
			if tw.queued > 0 || len(tw.claimed) > 0 || tw.maxEpoch > 0 {
				problem("thread %s has no state record but %d queued, %d claimed dispatches, epoch %d", thread, tw.queued, len(tw.claimed), tw.maxEpoch)
			}
		}
		// Queued-thread markers exist exactly for threads with queued work.
		markers := map[string]bool{}
		err = r.iterate([]byte{pThreadQ}, nil, false, true, func(k, _ []byte) (bool, error) {
			markers[string(k[1:])] = true
			return true, nil
		})
		if err != nil {
			return err
		}
		err = r.iterate([]byte{pEpoch}, nil, false, false, func(k, v []byte) (bool, error) {
			thread := string(k[1:])
			st, err := decodeThreadState(k, v)
			if err != nil {
				return true, nil // reported above
			}
			if (st.queued > 0) != markers[thread] {
				problem("thread %s: queued %d but queued-thread marker present=%v", thread, st.queued, markers[thread])
			}
			delete(markers, thread)
			return true, nil
		})
		if err != nil {
			return err
		}
		for thread := range markers {
			problem("stray queued-thread marker for %s", thread)
		}

		// A cancelled, superseded or dead-lettered dispatch never leaves
		// its run open (they commit together).
		for _, d := range dv.settled {
			if r := runs[d.RunID]; r != nil && r.ThreadID == d.ThreadID && r.Status != engine.RunDone && r.DispatchID == d.DispatchID {
				problem("dispatch %s is %s but its run %s is %s", d.DispatchID, d.Status, r.RunID, r.Status)
			}
		}

		// Compare every index family with what the records imply.
		for fam, exp := range want {
			err := r.iterate([]byte{fam}, nil, false, false, func(k, v []byte) (bool, error) {
				wv, ok := exp[string(k)]
				if !ok {
					problem("stray index entry %q", k)
					return true, nil
				}
				// A listing entry's value is not read (an earlier version
				// stored the status there).
				if fam != pAll && !bytes.Equal(wv, v) && !(len(wv) == 0 && len(v) == 0) {
					problem("index entry %q has value %q, record implies %q", k, v, wv)
				}
				delete(exp, string(k))
				return true, nil
			})
			if err != nil {
				return err
			}
			missing := make([]string, 0, len(exp))
			for k := range exp {
				missing = append(missing, k)
			}
			sort.Strings(missing)
			for _, k := range missing {
				problem("missing index entry %q", k)
			}
		}

		// Threads and message logs.
		projected := map[string]bool{}
		runOf := map[string]string{}
		for _, run := range runs {
			runOf[run.ThreadID] = run.RunID
		}
		err = r.iterate([]byte{pThread}, nil, false, false, func(k, v []byte) (bool, error) {
			rep.Threads++
			projected[string(k[1:])] = true
			t, err := decodeThread(k, v)
			if err != nil {
				problem("%v", err)
				return true, nil
			}
			if t.ID != string(k[1:]) {
				problem("thread record %q names thread %q", k[1:], t.ID)
			}
			checkProjection(t, runs, runOf, problem)
			ck := msgCountKey(t.ID)
			b, _, err := r.get(ck)
			if err != nil {
				return false, err
			}
			n, err := counter(ck, b)
			if err != nil {
				problem("%v", err)
			} else if n != t.MessageCount {
				problem("thread %s projection says %d messages, log counter %d", t.ID, t.MessageCount, n)
			}
			return true, nil
		})
		if err != nil {
			return err
		}
		// Every message record, whatever its thread's counter says.
		logged := map[string]uint64{}
		var cur string
		var seq uint64
		err = r.iterate([]byte{pMessage}, nil, false, false, func(mk, mv []byte) (bool, error) {
			rep.Messages++
			thread, got, ok := splitMessageKey(mk)
			if !ok {
				problem("malformed message key %q", mk)
				return true, nil
			}
			if thread != cur {
				cur, seq = thread, 0
			}
			seq++
			if got != seq {
				problem("thread %s message log has seq %d where %d belongs", thread, got, seq)
				seq = got
			}
			logged[thread]++
			m, err := decodeMessage(mk, mv)
			if err != nil {
				problem("%v", err)
				return true, nil
			}
			if m.Seq != got || m.ThreadID != thread {
				problem("message %q records seq %d thread %s", mk, m.Seq, m.ThreadID)
			}
			// Raw fields go into RUN frames as stored: bytes that are not
			// UTF-8 reach the agent as U+FFFD (the hub's repair), and one
			// that is not JSON would break every RUN of its thread.
			for _, f := range [...]struct {
				name string
				v    []byte
			}{{"content", m.Message.Content}, {"tool_calls", m.Message.ToolCalls}, {"metadata", m.Message.Metadata}} {
				if err := engine.ValidateStoredJSON(f.v); err != nil {
					problem("message %q: %s %v", mk, f.name, err)
				}
			}
			ib, ok, err := r.get(messageIDKey(thread, m.MessageID))
			if err != nil {
				return false, err
			}
			if !ok || readU64(ib) != got {
				problem("message id index of %s/%s does not point at seq %d", thread, m.MessageID, got)
			}
			return true, nil
		})
		if err != nil {
			return err
		}
		indexed := map[string]uint64{}
		err = r.iterate([]byte{pMessageID}, nil, false, true, func(k, _ []byte) (bool, error) {
			if len(k) < 3 || len(k) < 3+int(binary.BigEndian.Uint16(k[1:3])) {
				problem("malformed message-id index key %q", k)
				return true, nil
			}
			indexed[string(k[3:3+int(binary.BigEndian.Uint16(k[1:3]))])]++
			return true, nil
		})
		if err != nil {
			return err
		}
		counted := map[string]uint64{}
		err = r.iterate([]byte{pMsgCount}, nil, false, false, func(k, v []byte) (bool, error) {
			n, err := counter(k, v)
			if err != nil {
				problem("%v", err)
				return true, nil
			}
			counted[string(k[1:])] = n
			return true, nil
		})
		if err != nil {
			return err
		}
		// Every write of a run or a message log writes its thread's
		// projection.
		for thread, id := range runOf {
			if !projected[thread] {
				problem("run %s: its thread %s has no projection", id, thread)
			}
		}
		for t := range counted {
			if !projected[t] {
				problem("thread %s has a message counter but no projection", t)
			}
		}
		threadsSeen := map[string]bool{}
		for t := range logged {
			threadsSeen[t] = true
		}
		for t := range indexed {
			threadsSeen[t] = true
		}
		for t := range counted {
			threadsSeen[t] = true
		}
		for t := range threadsSeen {
			if logged[t] != counted[t] {
				problem("thread %s message counter %d, log holds %d", t, counted[t], logged[t])
			}
			if indexed[t] != logged[t] {
				problem("thread %s has %d message-id index entries for %d messages", t, indexed[t], logged[t])
			}
		}
		return nil
	})
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	if s.opts.InMemory {
		return rep, nil
	}
	err = s.verifyValueLogs(ctx, &rep, problem)
	return rep, err
}

// verifyValueLogs adds to rep what the check of every value-log file
// below the newest finds (vlogcheck.go).
func (s *Store) verifyValueLogs(ctx context.Context, rep *Report, problem func(string, ...any)) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	fids, err := rotatedValueLogs(s.opts.Dir)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	for _, fid := range fids {
		if s.testBeforeValueLogCheck != nil {
			s.testBeforeValueLogCheck()
		}
		err := checkValueLog(filepath.Join(s.opts.Dir, vlogName(fid)), ctx.Done())
		switch {
		case errors.Is(err, errCheckStopped):
			return fmt.Errorf("verify %s: %w", vlogName(fid), ctx.Err())
		case errors.Is(err, fs.ErrNotExist): // GC deleted it meanwhile
		case errors.Is(err, ErrValueLogCorrupt):
			if len(rep.Problems) < MaxProblems { // counted as listed
				rep.StorageProblems++
			}
			problem("%v", err)
		case errors.Is(err, errTornTail):
			rep.Notes = append(rep.Notes, err.Error())
		case err != nil:
			return fmt.Errorf("verify: %w", err)
		}
	}
	return nil
}

// checkProjection reports where the run pointers of thread t's projection
// disagree with the run records (store.md rule 29; an operator's requeue,
// Thread.ApplyReopen): every run write updates the projection of its
// thread in the same commit, so latest_run_id names a run of the thread
// (and is set once the thread has a run: runOf maps each thread with runs
// to one of them), active_run_id a run of it that
// is running, and open_run_id one that is not done, of the status
// open_run_status records (when recorded: older projections lack it).
func checkProjection(t *engine.Thread, runs map[string]*engine.RunRecord, runOf map[string]string, problem func(string, ...any)) {
	pointer := func(field, id string) *engine.RunRecord {
		if id == "" {
			return nil
		}
		run := runs[id]
		switch {
		case run == nil:
			problem("thread %s %s names missing run %s", t.ID, field, id)
			return nil
		case run.ThreadID != t.ID:
			problem("thread %s %s names run %s of thread %s", t.ID, field, id, run.ThreadID)
			return nil
		}
		return run
	}
	if run := pointer("active_run_id", t.ActiveRunID); run != nil && run.Status != engine.RunRunning {
		problem("thread %s active_run_id names run %s, which is %s, not running", t.ID, run.RunID, run.Status)
	}
	if run := pointer("open_run_id", t.OpenRunID); run != nil {
		if run.Status == engine.RunDone {
			problem("thread %s open_run_id names run %s, which is done", t.ID, run.RunID)
		} else if t.OpenRunStatus != "" && t.OpenRunStatus != run.Status {
			problem("thread %s open_run_status is %s, its open run %s is %s", t.ID, t.OpenRunStatus, run.RunID, run.Status)
		}
	} else if t.OpenRunID == "" && t.OpenRunStatus != "" {
		problem("thread %s has open_run_status %s but no open run", t.ID, t.OpenRunStatus)
	}
	pointer("latest_run_id", t.LatestRunID)
	if id, ok := runOf[t.ID]; ok && t.LatestRunID == "" {
		problem("thread %s has run %s but no latest_run_id", t.ID, id)
	}
}

// verifyTables checks every table block's checksum (Badger's
// DB.VerifyChecksum). Badger's check panics where a block fails to read
// (its error path names the offset of the block it did not get): that is
// a damaged block too, listed as such, where verify crashed (found by
// review).
func (s *Store) verifyTables() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("a table block does not read (badger: %v): %w", r, engine.ErrCorrupt)
		}
	}()
	return s.db.VerifyChecksum()
}
