package badgerstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Group commit. Every mutating operation is a function run by the single
// writer goroutine. The writer takes all operations that are waiting (up to
// maxBatch), runs them one after another inside one Badger transaction and
// commits it once: that is one fsync for the whole batch (durable.go),
// and each caller is answered only after that commit. One writer also
// means no write-write conflicts: conflict detection is off.
//
// Isolation inside a batch: an operation writes into its own overlay
// (writeTx) and its writes reach the shared transaction only when it
// returns nil, so a failing operation leaves no trace and does not poison
// the others. Later operations of a batch see the writes of earlier ones.
//
// Pipelining: while one batch is being written and synced by Badger (it is
// "in flight"), the writer already runs the next batch's operations, which
// read the in-flight batch's writes from an overlay (prior) above a
// snapshot taken just before that batch was sent. The next batch is sent
// only once the in-flight one is durable; if that commit fails, the next
// batch is thrown away and run again on the state without it. Callers are
// answered only after their own batch is durable, so nothing is reported
// before it is synced, yet building and syncing overlap.

// maxBatch bounds how many operations share one transaction.
const maxBatch = 256

type opFunc func(w *writeTx) error

type op struct {
	fn   opFunc
	name string
	done chan error
}

var opPool = sync.Pool{New: func() any { return &op{done: make(chan error, 1)} }}

// writeTx is one operation's view of the batch transaction: reads see the
// operation's own pending writes first, then the transaction (earlier
// operations of the batch and committed data).
type writeTx struct {
	txn    *badger.Txn
	writes map[string]pending
	order  []string

	states     map[string]threadState // thread states this operation changed
	origStates map[string]threadState // and what they were before it

	snap    *badger.Txn      // read-only view of everything committed before the batch (and prior)
	reads   *metrics.Counter // reads that reach snap (storeMetrics.writerReads)
	cache   *recordCache     // committed records (cache.go), shared with readers
	flushed *writeSet        // writes of the batch so far: read before the cache, cached after commit
	prior   *writeSet        // writes of the batch in flight (not durable yet), or nil
	spare   *badger.Txn      // an update transaction made before prior was sent, or nil
	free    []*writeSet      // retired write sets (at most two), reused by the next batches
}

// recycle keeps ws (no longer read by anyone) for a later batch. Two are
// kept: a batch building while one is in flight takes one, and a writer
// gone idle recycles the one in flight too (one slot dropped a set at
// every idle commit, and the next batch grew a new map: 8 % of the
// sidecar's allocated bytes in DurableRuns/threads=64).
func (w *writeTx) recycle(ws *writeSet) {
	if ws != nil && len(w.free) < 2 {
		ws.reset()
		w.free = append(w.free, ws)
	}
}

// writeSet is the writes of one batch, by key and in key order.
type writeSet struct {
	m    map[string]kvWrite
	keys []string // sorted
}

func newWriteSet() *writeSet { return &writeSet{m: make(map[string]kvWrite)} }

func (ws *writeSet) get(key []byte) (kvWrite, bool) {
	if ws == nil {
		return kvWrite{}, false
	}
	f, ok := ws.m[string(key)]
	return f, ok
}

func (ws *writeSet) put(f kvWrite) {
	if _, ok := ws.m[f.k]; !ok {
		i, _ := slices.BinarySearch(ws.keys, f.k)
		ws.keys = slices.Insert(ws.keys, i, f.k)
	}
	ws.m[f.k] = f
}

// empty reports whether the set holds no write.
func (ws *writeSet) empty() bool { return ws == nil || len(ws.m) == 0 }

func (ws *writeSet) reset() {
	clear(ws.m)
	ws.keys = ws.keys[:0]
}

// readyMin is the lowest due time of a ready-index key the set writes
// (math.MaxInt64: none).
func (ws *writeSet) readyMin() int64 {
	for _, k := range ws.keysIn([]byte{pReady}, nil) {
		if f := ws.m[k]; !f.del && len(k) >= 1+tsBytes {
			return readTS([]byte(k[1 : 1+tsBytes]))
		}
	}
	return math.MaxInt64
}

// keysIn returns the keys with prefix at or after start, in order.
func (ws *writeSet) keysIn(prefix, start []byte) []string {
	if ws == nil {
		return nil
	}
	if string(start) < string(prefix) {
		start = prefix
	}
	i, _ := slices.BinarySearch(ws.keys, string(start))
	j := i
	for j < len(ws.keys) && strings.HasPrefix(ws.keys[j], string(prefix)) {
		j++
	}
	return ws.keys[i:j]
}

// kvWrite is one write that reached the batch transaction.
type kvWrite struct {
	k   string
	v   []byte
	del bool
}

type pending struct {
	val []byte
	del bool
	// gone: the operation changed the key and then put it back as it lies
	// below (the batch's earlier writes, the batch in flight, committed
	// data): set and then deleted over nothing, or set again to the value
	// below. It writes nothing for the key, not even a deletion marker,
	// and reads of it see what lies below.
	gone bool
}

// get returns the value of key, or nil and false.
func (w *writeTx) get(key []byte) ([]byte, bool, error) {
	if p, ok := w.writes[string(key)]; ok && !p.gone {
		if p.del {
			return nil, false, nil
		}
		return p.val, true, nil
	}
	return w.below(key)
}

// below returns the value of key as the operation found it: the batch's
// earlier writes, the batch in flight, committed data.
func (w *writeTx) below(key []byte) ([]byte, bool, error) {
	if f, ok := w.flushed.get(key); ok {
		if f.del {
			return nil, false, nil
		}
		return f.val(), true, nil
	}
	if f, ok := w.prior.get(key); ok {
		if f.del {
			return nil, false, nil
		}
		return f.val(), true, nil
	}
	if v, ok := w.cache.getLatest(key); ok {
		return v, v != nil, nil
	}
	w.reads.Inc()
	item, err := w.snap.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		w.cache.fillLatest(key, nil)
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read %q: %w", key, unavailable(err))
	}
	v, err := item.ValueCopy(nil)
	if err != nil {
		return nil, false, fmt.Errorf("read %q: %w", key, unavailable(err))
	}
	w.cache.fillLatest(key, v)
	return v, true, nil
}

func (w *writeTx) set(key, val []byte) {
	k := string(key)
	if _, ok := w.writes[k]; !ok {
		w.order = append(w.order, k)
	} else if cur, exists, err := w.below(key); err == nil && exists && bytes.Equal(cur, val) {
		// Written before by this operation, now put back as it was (a
		// counter down and up again: a complete that claims the thread's
		// next dispatch leaves the claimed count as it found it). Only a
		// key written twice by one operation is looked up (for a family
		// the record cache does not hold, a point read of the snapshot,
		// counted in writerReads): cheaper than the entry it may save.
		w.writes[k] = pending{gone: true}
		return
	}
	if val == nil {
		val = []byte{}
	}
	w.writes[k] = pending{val: val}
}

// setIfChanged is set, unless key already holds exactly val: a record
// rewritten unchanged (an agent's checkpoint within the second its run
// started rewrites the run and its thread projection byte for byte) costs
// no write, no memtable entry and nothing to compact.
func (w *writeTx) setIfChanged(key, val []byte) error {
	cur, ok, err := w.get(key)
	if err != nil {
		return err
	}
	if ok && bytes.Equal(cur, val) {
		return nil
	}
	w.set(key, val)
	return nil
}

func (w *writeTx) del(key []byte) {
	k := string(key)
	if _, ok := w.writes[k]; !ok {
		w.order = append(w.order, k)
	} else if _, exists, err := w.below(key); err == nil && !exists {
		// Set by this operation over nothing: a deletion marker would cost
		// a memtable entry and compactions for a key that never existed.
		// A foreground submit enqueues and claims its dispatch in one
		// operation: its queue entries and queued count were three of its
		// sixteen writes. (A failed read keeps the marker.)
		w.writes[k] = pending{gone: true}
		return
	}
	w.writes[k] = pending{del: true}
}

// flush moves the overlay into the transaction.
func (w *writeTx) flush() error {
	for _, k := range w.order {
		p := w.writes[k]
		if p.gone {
			continue
		}
		var err error
		if p.del {
			err = w.txn.Delete([]byte(k))
		} else {
			err = w.txn.Set([]byte(k), p.val)
		}
		if err != nil {
			return err
		}
	}
	for _, k := range w.order {
		if p := w.writes[k]; !p.gone {
			w.flushed.put(kvWrite{k: k, v: p.val, del: p.del})
		}
	}
	return nil
}

func (w *writeTx) reset(txn *badger.Txn) {
	w.txn = txn
	clear(w.writes)
	w.order = w.order[:0]
	clear(w.states)
	clear(w.origStates)
}

// iterate calls fn for every key with prefix, from start (or the prefix)
// onward, until fn returns false, as the operation sees them: the
// committed snapshot merged with the batch's earlier writes and the
// operation's own. (An iterator on the batch's update transaction would
// sort all its pending writes each time it is made: quadratic in the
// batch.)
func (w *writeTx) iterate(prefix, start []byte, keysOnly bool, fn func(k, v []byte) (bool, error)) error {
	if start == nil {
		start = prefix
	}
	pend := w.pendingIn(prefix, start)
	i := 0
	stop := false
	err := iterate(w.snap, prefix, start, false, keysOnly, func(k, v []byte) (bool, error) {
		// Pending keys before this one come first.
		for ; i < len(pend) && pend[i].k < string(k); i++ {
			if pend[i].del {
				continue
			}
			more, err := fn([]byte(pend[i].k), pend[i].val())
			if err != nil || !more {
				stop = true
				return false, err
			}
		}
		if i < len(pend) && pend[i].k == string(k) {
			p := pend[i]
			i++
			if p.del {
				return true, nil
			}
			more, err := fn(k, p.val())
			if !more {
				stop = true
			}
			return more, err
		}
		more, err := fn(k, v)
		if !more {
			stop = true
		}
		return more, err
	})
	if err != nil || stop {
		return err
	}
	for ; i < len(pend); i++ {
		if pend[i].del {
			continue
		}
		more, err := fn([]byte(pend[i].k), pend[i].val())
		if err != nil || !more {
			return err
		}
	}
	return nil
}

// pendingIn returns the in-flight batch's, this batch's and this
// operation's writes of keys with prefix at or after start, sorted, the
// operation's own winning over the batch's, and the batch's over the
// in-flight one's.
func (w *writeTx) pendingIn(prefix, start []byte) []kvWrite {
	var out []kvWrite
	add := func(k string, p kvWrite) {
		if len(k) >= len(prefix) && k[:len(prefix)] == string(prefix) && k >= string(start) {
			out = append(out, p)
		}
	}
	for _, k := range w.prior.keysIn(prefix, start) {
		if p, own := w.writes[k]; own && !p.gone {
			continue
		}
		if _, batch := w.flushed.m[k]; batch {
			continue
		}
		out = append(out, w.prior.m[k])
	}
	for _, k := range w.flushed.keysIn(prefix, start) {
		if p, own := w.writes[k]; !own || p.gone {
			out = append(out, w.flushed.m[k])
		}
	}
	for k, p := range w.writes {
		if !p.gone {
			add(k, kvWrite{k: k, v: p.val, del: p.del})
		}
	}
	slices.SortFunc(out, func(a, b kvWrite) int { return strings.Compare(a.k, b.k) })
	return out
}

func iterate(txn *badger.Txn, prefix, start []byte, reverse, keysOnly bool, fn func(k, v []byte) (bool, error)) error {
	return iterateKeys(txn, prefix, start, reverse, keysOnly, true, fn)
}

// iterateKeys is iterate; with copyKeys false fn's k is Badger's own,
// valid only until fn returns (one allocation fewer per entry, for walks
// that read the key and keep nothing of it).
func iterateKeys(txn *badger.Txn, prefix, start []byte, reverse, keysOnly, copyKeys bool, fn func(k, v []byte) (bool, error)) error {
	opt := badger.DefaultIteratorOptions
	opt.Prefix = prefix
	opt.Reverse = reverse
	opt.PrefetchValues = false // values are small and mostly read one at a time
	it := txn.NewIterator(opt)
	defer it.Close()
	if start == nil {
		start = prefix
		if reverse {
			start = prefixEnd(prefix)
		}
	}
	for it.Seek(start); it.ValidForPrefix(prefix); it.Next() {
		item := it.Item()
		var v []byte
		if !keysOnly {
			var err error
			if v, err = item.ValueCopy(nil); err != nil {
				return fmt.Errorf("read %q: %w", item.Key(), unavailable(err))
			}
		}
		k := item.Key()
		if copyKeys {
			k = item.KeyCopy(nil)
		}
		more, err := fn(k, v)
		if err != nil || !more {
			return err
		}
	}
	return nil
}

// update runs fn as one operation of a group commit and returns its error,
// or the commit's. Once the operation is handed to the writer the call
// waits for the outcome even if ctx ends, so a success is never reported
// as a failure.
func (s *Store) update(ctx context.Context, name string, fn opFunc) error {
	o := opPool.Get().(*op)
	o.fn, o.name = fn, name
	s.closeMu.RLock()
	if s.closed {
		s.closeMu.RUnlock()
		opPool.Put(o)
		return fmt.Errorf("%s: store closed: %w", name, engine.ErrUnavailable)
	}
	select {
	case s.ops <- o:
	case <-ctx.Done():
		s.closeMu.RUnlock()
		opPool.Put(o)
		return fmt.Errorf("%s: %w", name, ctx.Err())
	}
	s.closeMu.RUnlock()
	err := <-o.done
	o.fn = nil
	opPool.Put(o)
	return err
}

// writer is the single writer goroutine; it exits when ops is closed and
// drained and the last batch is durable.
//
// It keeps at most one batch in flight (fl) and builds the next one (cur)
// meanwhile: every operation that arrives while fl is being synced joins
// cur, and cur is sent the moment fl is durable. With nothing in flight an
// operation is sent at once, with whatever else was already waiting.
// A value-log GC request waits for fl, runs with nothing in flight, and
// then cur is sent (see durability).
func (s *Store) writer() {
	defer close(s.writerDone)
	w := &writeTx{writes: make(map[string]pending), states: make(map[string]threadState), origStates: make(map[string]threadState), cache: s.reads.cache, reads: s.metrics.writerReads}
	cur := &building{}
	var fl *inflight // the batch Badger is writing, if any
	var carry []*op  // operations that did not fit cur: they open the next batch, in order
	// spill puts the operations a rebuild of cur took out of it (and then
	// o, when it did not fit cur either) at the head of carry.
	spill := func(o *op) {
		head := cur.spilled
		cur.spilled = nil
		if o != nil {
			head = append(head, o)
		}
		if len(head) > 0 {
			carry = append(head, carry...)
		}
	}
	open := true
	// A value-log GC waiting for the batch in flight. Answered at the top
	// of the loop once nothing is in flight, which is before the writer
	// can return: RunValueLogGC always gets its answer.
	var gc *gcRequest
	for {
		if gc != nil && fl == nil {
			gc.done <- s.collectValueLog()
			gc = nil
		}
		for len(carry) > 0 && !cur.full {
			o := carry[0]
			carry = carry[1:]
			if !s.add(cur, o, w) {
				spill(o) // cur was not empty: it goes into the next one
				break
			}
			spill(nil)
		}
		if fl == nil && len(cur.ops) > 0 {
			// Nothing in flight: take what is already waiting, then send.
			for open && !cur.full && len(carry) == 0 {
				select {
				case o, ok := <-s.ops:
					if !ok {
						open = false
						break
					}
					if !s.add(cur, o, w) {
						spill(o)
					} else {
						spill(nil)
					}
					continue
				default:
				}
				break
			}
			fl = s.send(cur, w)
			cur = &building{}
			continue
		}
		if !open && fl == nil && len(carry) == 0 && len(cur.ops) == 0 {
			s.release(w)
			return
		}
		var ops chan *op
		if open && !cur.full && len(carry) == 0 {
			ops = s.ops
		}
		var flDurable chan struct{}
		if fl != nil {
			flDurable = fl.durable
		}
		var gcReqs chan *gcRequest
		if gc == nil {
			gcReqs = s.gcReqs
		}
		select {
		case gc = <-gcReqs:
			// Run once nothing is in flight (at the top of the loop).
		case o, ok := <-ops:
			if !ok {
				open = false
				continue
			}
			if !s.add(cur, o, w) {
				spill(o)
			} else {
				spill(nil)
			}
		case <-flDurable:
			failed := fl.err != nil
			var next *inflight
			if !failed && len(cur.ops) > 0 && gc == nil {
				// Hand the next batch to Badger before fl's callers are
				// woken (see inflight.handedOn).
				next = s.send(cur, w)
				cur = &building{}
			}
			close(fl.handedOn)
			s.reap(fl, w, next != nil || cur.txn != nil)
			fl = next
			if failed && len(cur.ops) > 0 {
				// cur read the failed batch's writes: run it again.
				s.rebuild(cur, w)
				spill(nil)
			}
		}
	}
}

// building is the batch under construction: its operations have run into
// txn, on top of the batch in flight.
type building struct {
	txn     *badger.Txn
	ops     []*op
	results []error
	writes  *writeSet
	full    bool // no more operations fit
	// spilled are operations a rebuild took out of the batch because they
	// no longer fit it; the writer runs them again in the next batch.
	spilled []*op
}

// inflight is a batch handed to Badger and not yet durable.
//
// When it is durable its callback closes durable and waits for handedOn
// before it answers the batch's callers: meanwhile the writer sends the
// next batch. Sent after the answers, the next batch's hand-off to
// Badger's write goroutine would queue on the processor behind every
// caller just woken (Go runs a woken goroutine on the waker's processor,
// first in, first out), idling the disk for a millisecond or more.
type inflight struct {
	writes   *writeSet // its writes, read by the next batch
	ops      []*op
	results  []error
	err      error         // the commit's outcome, set before durable closes
	durable  chan struct{} // closed when the commit completed (err is set)
	handedOn chan struct{} // closed by the writer once the next batch is sent (or there is none)
	sent     atomic.Bool   // commit returned: the callback may wait for handedOn
	done     chan struct{} // closed once the ops are answered
}

// begin gives b a transaction; the read snapshot is shared by the batch.
func (s *Store) begin(b *building, w *writeTx) {
	if w.snap == nil {
		w.snap = s.db.NewTransaction(false)
	}
	b.txn = w.spare
	w.spare = nil
	if b.txn == nil {
		// Waits for a batch in flight to be applied: only on a retry.
		b.txn = s.db.NewTransaction(true)
	}
	if b.writes == nil {
		if n := len(w.free); n > 0 {
			b.writes = w.free[n-1]
			w.free = w.free[:n-1]
		} else {
			b.writes = newWriteSet()
			if s.testWriteSetMade != nil {
				s.testWriteSetMade()
			}
		}
	}
	w.flushed = b.writes
}

// add runs o into b. It returns false, leaving o unanswered and b full,
// when o's writes do not fit b's transaction next to the others; o alone
// not fitting an empty batch is answered with the error.
func (s *Store) add(b *building, o *op, w *writeTx) bool {
	if err := s.broken(); err != nil {
		// A log sync failed: Badger holds the failed batch's writes,
		// unsynced, and nothing read now is to be trusted or answered
		// from (an operation's own error, "already exists" say, would be
		// computed from them).
		s.metrics.refusedBroken.Inc()
		s.answer(o, fmt.Errorf("%s: %w", o.name, unavailable(err)))
		return true
	}
	wasLow := s.space.low
	err := s.space.check(s.opts)
	if s.space.low != wasLow {
		// The change, once each way (found by review: only each refused
		// operation's own warnings told of a full disk, and nothing of
		// its end).
		if s.space.low {
			s.opts.Logger.Error("the disk is full: the store refuses writes (503) until space returns", "dir", s.opts.Dir, "free_bytes", s.space.free, "min_free_bytes", s.opts.MinFreeBytes)
		} else {
			s.opts.Logger.Warn("disk space returned: the store takes writes again", "dir", s.opts.Dir, "free_bytes", s.space.free)
		}
	}
	if err != nil {
		s.metrics.refusedFull.Inc()
		s.answer(o, fmt.Errorf("%s: %w", o.name, err))
		return true
	}
	if b.txn == nil {
		s.begin(b, w)
	}
	err, ferr := s.runInto(b, o, w)
	if ferr == nil {
		b.ops = append(b.ops, o)
		b.results = append(b.results, err)
		b.full = len(b.ops) >= maxBatch
		return true
	}
	// Part of o's writes may sit in the transaction: start it again
	// without o.
	b.txn.Discard()
	b.txn = nil
	if len(b.ops) == 0 {
		b.writes.reset()
		s.answer(o, flushError(o.name, ferr))
		return true
	}
	s.rebuild(b, w)
	b.full = len(b.ops) > 0 // an empty batch takes o next (the rebuild refused or spilled the rest)
	return false
}

// runInto runs one operation into b's transaction: err is the operation's
// own result, ferr a failure to add its writes to the transaction.
func (s *Store) runInto(b *building, o *op, w *writeTx) (err, ferr error) {
	w.reset(b.txn)
	s.opSince.Store(time.Now().UnixNano())
	err = runOp(o, w)
	s.opSince.Store(0)
	if err == nil {
		err = w.finishThreads()
	}
	if err == nil {
		ferr = w.flush()
	}
	return err, ferr
}

// rebuild runs b's operations again in a fresh transaction (after the
// batch they read failed, or after one did not fit). Run again, on another
// state, an operation may write more than it did: one whose writes do not
// fit a transaction on their own is answered with the error; one that no
// longer fits next to those before it ends the batch, and it and those
// after it go to b.spilled, to run again in the next batch.
func (s *Store) rebuild(b *building, w *writeTx) {
	ops := b.ops
	b.ops, b.results = make([]*op, 0, len(ops)), make([]error, 0, len(ops))
	s.restart(b, w)
	for i, o := range ops {
		err, ferr := s.runInto(b, o, w)
		if ferr == nil {
			b.ops, b.results = append(b.ops, o), append(b.results, err)
			continue
		}
		if len(b.ops) == 0 {
			// Too large on its own: refused, as add refuses it.
			s.answer(o, flushError(o.name, ferr))
			s.restart(b, w)
			continue
		}
		// Part of o's writes may sit in the transaction: run the ones
		// before it again, without it.
		rest := append([]*op(nil), ops[i:]...)
		s.rebuild(b, w)
		b.spilled = append(b.spilled, rest...)
		b.full = len(b.ops) > 0
		return
	}
	b.full = len(b.ops) >= maxBatch
	if len(b.ops) == 0 {
		b.txn.Discard()
		b.txn = nil
		b.writes.reset()
	}
}

// restart gives b a fresh transaction and write set (b's operations are
// to be run again).
func (s *Store) restart(b *building, w *writeTx) {
	if b.txn != nil {
		b.txn.Discard()
		b.txn = nil
	}
	b.writes.reset()
	s.begin(b, w)
}

// send hands b to Badger and returns it as the batch in flight; its
// operations are answered when the commit completes. The next batch
// reads this one's writes over a snapshot taken now, just before it.
func (s *Store) send(b *building, w *writeTx) *inflight {
	fl := &inflight{writes: b.writes, ops: b.ops, results: b.results, durable: make(chan struct{}), handedOn: make(chan struct{}), done: make(chan struct{})}
	// Nothing is in flight now, so these do not wait.
	if w.snap != nil {
		w.snap.Discard()
	}
	w.snap = s.db.NewTransaction(false)
	w.spare = s.db.NewTransaction(true)
	w.recycle(w.prior)
	w.prior = fl.writes
	w.flushed = nil
	commit := b.txn.CommitWith
	if s.testCommit != nil {
		commit = s.testCommit(b.txn)
	}
	if err := s.broken(); err != nil {
		// A log sync failed: nothing more reaches Badger (durable.go).
		// Answered at once, as Badger answers a commit it refuses.
		commit = func(cb func(error)) {
			b.txn.Discard()
			cb(err)
		}
	}
	reach := s.logReach(fl.writes)
	s.space.wrote(reach.disk)
	sent := time.Now()
	s.commitSince.Store(sent.UnixNano())
	commit(func(cerr error) {
		if cerr == nil {
			s.metrics.applySeconds.Update(time.Since(sent).Seconds())
		}
		if cerr == nil && s.dur != nil && !fl.writes.empty() {
			// Applied: durable once its logs are synced (durable.go). A
			// batch that wrote nothing (a claim that found no work, say)
			// has nothing to sync: it read only durable data, since it
			// was sent once the batch before it was durable.
			cerr = s.dur.afterCommit(reach)
		}
		s.commitSince.Store(0)
		s.metrics.committed(len(fl.ops), time.Since(sent), cerr)
		if cerr != nil {
			cerr = fmt.Errorf("commit: %w", unavailable(cerr))
			// Badger may have applied part of it, ready keys included:
			// before anyone is answered, the floor no longer trusts
			// what it knew.
			s.reads.dropFloor()
		} else {
			// Applied, and nothing else is in flight: this does not wait.
			// Published before anyone is answered (read-your-writes).
			s.reads.publish(s.db.NewTransaction(false), fl.writes, fl.writes.readyMin())
			s.batches.Add(1)
			s.batchedOps.Add(uint64(len(fl.ops)))
		}
		fl.err = cerr
		close(fl.durable)
		if fl.sent.Load() {
			// (Badger calls back at once, on the writer's goroutine,
			// when it refuses a commit before sending it: then the
			// writer cannot hand on, and must not be waited for.)
			<-fl.handedOn
		}
		// Once a log sync has failed, an operation's own result may
		// have been computed from a failed batch's unsynced writes (the
		// batch was built on them, or rebuilt on a snapshot holding
		// them): every operation gets the failure.
		broken := cerr != nil && s.broken() != nil
		for i, o := range fl.ops {
			if fl.results[i] == nil || broken {
				fl.results[i] = cerr
			}
			s.answer(o, fl.results[i])
		}
		close(fl.done)
	})
	fl.sent.Store(true)
	return fl
}

// logReach tells whether a batch of writes reaches the value log (see
// durability): when a value is large enough for it (from half of
// ValueThreshold on: a margin that costs one more sync for the rare batch
// near it); and its estimated share of a memtable.
func (s *Store) logReach(ws *writeSet) batchReach {
	var r batchReach
	if s.dur == nil {
		return r
	}
	r.bytes = writeOverhead // the transaction's own marker
	for _, k := range ws.keys {
		n := int64(len(ws.m[k].v))
		r.disk += int64(len(k)) + n + writeOverhead
		if n >= s.opts.ValueThreshold/2 {
			r.values = true
		}
		if n >= s.opts.ValueThreshold {
			n = valuePointerBytes
		}
		r.bytes += int64(len(k)) + n + writeOverhead
	}
	return r
}

// reap retires a completed in-flight batch (its writes entered the
// record cache when it was published; if it failed, Badger may have
// applied part of it, and the cache is dropped). A batch already building on top
// of it keeps its snapshot and overlay until it is sent (or rebuilt);
// otherwise the next batch starts from a fresh snapshot.
func (s *Store) reap(fl *inflight, w *writeTx, building bool) {
	<-fl.done
	if fl.err != nil {
		w.cache.voidUntilNextCommit()
		s.log.Error("badgerstore commit failed", "ops", len(fl.ops), "err", fl.err)
	}
	if building && fl.err == nil {
		return
	}
	w.recycle(w.prior)
	w.prior = nil
	if w.snap != nil {
		w.snap.Discard()
		w.snap = nil
	}
	if w.spare != nil {
		w.spare.Discard()
		w.spare = nil
	}
}

// release drops the writer's transactions when it stops.
func (s *Store) release(w *writeTx) {
	for _, t := range []*badger.Txn{w.snap, w.spare} {
		if t != nil {
			t.Discard()
		}
	}
	w.snap, w.spare = nil, nil
}

// flushError explains why an operation's writes could not join a
// transaction on their own: too large (a transaction, a key or a value
// over Badger's limits) is engine.ErrTooLarge; any other refusal (a key
// Badger reserves or bans, a transaction already discarded) is not the
// caller's doing and is engine.ErrUnavailable. Badger's own message may
// quote the whole value, so only its first line, cut short, is kept.
func flushError(name string, err error) error {
	if errors.Is(err, badger.ErrTxnTooBig) {
		return fmt.Errorf("%s: operation too large for one transaction: %w", name, engine.ErrTooLarge)
	}
	msg := err.Error()
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	if len(msg) > 200 {
		msg = msg[:200] + "…"
	}
	kind := engine.ErrUnavailable
	if strings.Contains(msg, " exceeded ") && strings.Contains(msg, " limit") { // Badger's exceedsSize
		kind = engine.ErrTooLarge
	}
	return fmt.Errorf("%s: write refused by the storage engine: %s: %w", name, msg, kind)
}

func (s *Store) answer(o *op, err error) { o.done <- err }

func (f kvWrite) val() []byte {
	if f.v == nil {
		return []byte{}
	}
	return f.v
}

// spaceGuard refuses writes when the data directory's file system runs
// low. It asks statfs at most every spaceCheckEvery while space is ample,
// and before every batch once it is low, or once the batches sent since
// it last asked wrote half the room there was above MinFreeBytes (a burst
// of large values between two checks, 250 ms apart, could otherwise fill
// the disk first: Badger's memory-mapped files then fault).
type spaceGuard struct {
	checked time.Time
	low     bool
	free    int64
	written int64 // bytes the batches sent since the last statfs wrote
}

// wrote counts a sent batch's bytes.
func (g *spaceGuard) wrote(n int64) { g.written += n }

const spaceCheckEvery = 250 * time.Millisecond

func (g *spaceGuard) check(o Options) error {
	if o.InMemory || o.MinFreeBytes < 0 {
		return nil
	}
	if !g.low && time.Since(g.checked) < spaceCheckEvery && g.written < (g.free-o.MinFreeBytes)/2 {
		return nil
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(o.Dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", o.Dir, unavailable(err))
	}
	g.checked = time.Now()
	g.written = 0
	g.free = int64(st.Bavail) * int64(st.Bsize)
	// Once low, it stays low until a tenth more than the floor is free:
	// space hovering at the floor would flip it, and its logged change,
	// every check (found by review).
	g.low = g.free < o.MinFreeBytes || g.low && g.free < o.MinFreeBytes+o.MinFreeBytes/10
	if g.low {
		need := o.MinFreeBytes
		if g.free >= need {
			need += need / 10 // recovering: the floor and a tenth
		}
		return fmt.Errorf("disk full: %d bytes free in %s, %d needed: %w", g.free, o.Dir, need, engine.ErrUnavailable)
	}
	return nil
}

// runOp runs one operation, turning a panic into an error so one bad
// operation cannot take the writer down.
func runOp(o *op, w *writeTx) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%s: panic: %v", o.name, r)
		}
	}()
	return o.fn(w)
}

// unavailable wraps a Badger failure as engine.ErrUnavailable.
func unavailable(err error) error {
	if err == nil || errors.Is(err, engine.ErrUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %w", engine.ErrUnavailable, err)
}
