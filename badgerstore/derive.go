package badgerstore

import (
	"bytes"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// threadWant is what one thread's dispatch records imply for its state.
type threadWant struct {
	queued   uint64
	minQueue []byte // the lowest queue suffix among its queued dispatches
	minAvail []byte // the lowest due-order suffix among them
	due      int64  // the available_at of minAvail
	claimed  []string
	maxEpoch uint64
	// ended is the latest updated_at of its acked or dead-lettered
	// dispatches: the latest a run of it ended, as far as records tell.
	ended int64
}

// dueAgrees reports whether a thread state's due agrees with its
// records: their earliest, or above it when raised to when the thread's
// last run ended (finishThreads) — no later than the latest run end its
// records show or, that record purged, than now. A due above both is
// damage: it would hide the thread's due work until then.
func dueAgrees(st threadState, tw *threadWant, now int64) bool {
	switch {
	case tw.queued == 0 || st.dueStale && st.claimed != "" || st.due == tw.due:
		return true
	case st.due < tw.due:
		return false
	}
	return st.due <= max(tw.ended, now)
}

// raisedDue is the raised due of an otherwise right thread state, which
// its ready entry is keyed by; ok false: the records' due.
func raisedDue(st threadState, tw *threadWant, now int64) (int64, bool) {
	if st.queued == 0 || st.due <= tw.due || !stateAgrees(st, tw) || !dueAgrees(st, tw, now) {
		return 0, false
	}
	return st.due, true
}

// derived is what the dispatch and run records imply for every key
// derived from them: index entries by family (key → value), the counters
// by status and each thread's state. Verify compares it with what is
// stored; Repair writes it.
type derived struct {
	want    map[byte]map[string][]byte
	counts  map[byte]uint64
	threads map[string]*threadWant
	// settled are the cancelled, superseded and dead-lettered dispatches
	// (their run is never left open).
	settled map[string]*engine.Dispatch
	runs    map[string]*engine.RunRecord
	// dispatches and runs count the records walked, decodable or not.
	dispatches, runCount int
}

// derivedFamilies are the index families derive fills (the retired S
// index among them: nothing implies an entry in it).
var derivedFamilies = []byte{pAll, pQueue, pAvail, pReady, pLease, pDedupe, pTerminal, pDead, pRunLatest, pRunStatus, pRunWaiting, pRunAll, pRunThread}

// derive walks every dispatch and run record of r's snapshot. A record
// that does not decode goes to problem (with its error) and implies
// nothing; so does an index key implied twice.
func derive(r *reader, now int64, problem func(string, ...any)) (*derived, error) {
	dv := &derived{
		want:    map[byte]map[string][]byte{},
		counts:  map[byte]uint64{},
		threads: map[string]*threadWant{},
		settled: map[string]*engine.Dispatch{},
		runs:    map[string]*engine.RunRecord{},
	}
	for _, p := range derivedFamilies {
		dv.want[p] = map[string][]byte{}
	}
	expect := func(k, v []byte) {
		fam := dv.want[k[0]]
		if old, dup := fam[string(k)]; dup {
			problem("index key %q implied twice (values %q and %q)", k, old, v)
		}
		fam[string(k)] = v
	}
	err := r.iterate([]byte{pDispatch}, nil, false, false, func(k, v []byte) (bool, error) {
		dv.dispatches++
		d, err := decodeDispatch(k, v)
		if err != nil {
			problem("%v", err)
			return true, nil
		}
		for _, e := range dispatchIndex(d) {
			expect(e.k, e.v)
		}
		dv.counts[byte(d.Status)]++
		tw := dv.threads[d.ThreadID]
		if tw == nil {
			tw = &threadWant{}
			dv.threads[d.ThreadID] = tw
		}
		switch d.Status {
		case engine.StatusQueued:
			tw.queued++
			if suf := queueSuffix(d); tw.minQueue == nil || bytes.Compare(suf, tw.minQueue) < 0 {
				tw.minQueue = suf
			}
			if vs := availSuffix(d); tw.minAvail == nil || bytes.Compare(vs, tw.minAvail) < 0 {
				tw.minAvail = vs
				tw.due = d.AvailableAt
			}
		case engine.StatusClaimed:
			tw.claimed = append(tw.claimed, d.DispatchID)
		case engine.StatusCancelled, engine.StatusSuperseded, engine.StatusDeadLetter:
			dv.settled[d.DispatchID] = d
		}
		if d.Status == engine.StatusAcked || d.Status == engine.StatusDeadLetter {
			tw.ended = max(tw.ended, d.UpdatedAt)
		}
		tw.maxEpoch = max(tw.maxEpoch, d.Epoch)
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	// The ready index holds one entry per claimable thread, keyed by its
	// earliest queued work, or by when its last run ended if its state
	// says that is later (round-robin, finishThreads).
	for thread, tw := range dv.threads {
		if tw.queued > 0 && len(tw.claimed) == 0 {
			due := tw.due
			b, _, err := r.get(stateKey(thread))
			if err != nil {
				return nil, err
			}
			if b != nil {
				if st, err := decodeThreadState(stateKey(thread), b); err == nil {
					if raised, ok := raisedDue(st, tw, now); ok {
						due = raised
					}
				}
			}
			expect(readyKey(thread, due), nil)
		}
	}
	err = r.iterate([]byte{pRun}, nil, false, false, func(k, v []byte) (bool, error) {
		dv.runCount++
		run, err := decodeRun(k, v)
		if err != nil {
			problem("%v", err)
			return true, nil
		}
		dv.runs[run.RunID] = run
		for _, ik := range runIndex(run) {
			expect(ik, nil)
		}
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	return dv, nil
}

// stateFor is the thread state the records imply, keeping the stored
// epoch when it is ahead of theirs (an interrupt bumps it with no
// dispatch to show). ok is false when the records do not decide it: two
// claimed dispatches.
func (tw *threadWant) stateFor(storedEpoch uint64) (st threadState, ok bool) {
	if len(tw.claimed) > 1 {
		return threadState{}, false
	}
	st = threadState{epoch: max(storedEpoch, tw.maxEpoch), queued: tw.queued, floor: tw.minQueue, vfloor: tw.minAvail}
	if tw.queued > 0 {
		st.due = tw.due
	}
	if len(tw.claimed) == 1 {
		st.claimed = tw.claimed[0]
	}
	return st, true
}
