package badgerstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Group commit. Every mutating operation is a function run by the single
// writer goroutine. The writer takes all operations that are waiting (up to
// maxBatch), runs them one after another inside one Badger transaction and
// commits it once: with SyncWrites that is one fsync for the whole batch,
// and each caller is answered only after that commit. One writer also
// means no write-write conflicts: conflict detection is off.
//
// Isolation inside a batch: an operation writes into its own overlay
// (writeTx) and its writes reach the shared transaction only when it
// returns nil, so a failing operation leaves no trace and does not poison
// the others. Later operations of a batch see the writes of earlier ones.

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

	snap    *badger.Txn        // read-only view of everything committed before the batch
	cache   *recordCache       // the writer's read cache (see cache.go)
	flushed map[string]kvWrite // writes of the batch so far: read before the cache, cached after commit
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
}

// get returns the value of key, or nil and false.
func (w *writeTx) get(key []byte) ([]byte, bool, error) {
	if p, ok := w.writes[string(key)]; ok {
		if p.del {
			return nil, false, nil
		}
		return p.val, true, nil
	}
	if f, ok := w.flushed[string(key)]; ok {
		if f.del {
			return nil, false, nil
		}
		return f.val(), true, nil
	}
	if w.cache != nil {
		if v, ok := w.cache.get(string(key)); ok {
			return v, v != nil, nil
		}
	}
	item, err := w.snap.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		if w.cache != nil {
			w.cache.put(string(key), nil)
		}
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read %q: %w", key, unavailable(err))
	}
	v, err := item.ValueCopy(nil)
	if err != nil {
		return nil, false, fmt.Errorf("read %q: %w", key, unavailable(err))
	}
	if w.cache != nil {
		w.cache.put(string(key), v)
	}
	return v, true, nil
}

func (w *writeTx) set(key, val []byte) {
	k := string(key)
	if _, ok := w.writes[k]; !ok {
		w.order = append(w.order, k)
	}
	if val == nil {
		val = []byte{}
	}
	w.writes[k] = pending{val: val}
}

func (w *writeTx) del(key []byte) {
	k := string(key)
	if _, ok := w.writes[k]; !ok {
		w.order = append(w.order, k)
	}
	w.writes[k] = pending{del: true}
}

// flush moves the overlay into the transaction.
func (w *writeTx) flush() error {
	for _, k := range w.order {
		p := w.writes[k]
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
		p := w.writes[k]
		w.flushed[k] = kvWrite{k: k, v: p.val, del: p.del}
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

// pendingIn returns this batch's and this operation's writes of keys with
// prefix at or after start, sorted, the operation's own winning.
func (w *writeTx) pendingIn(prefix, start []byte) []kvWrite {
	var out []kvWrite
	add := func(k string, p kvWrite) {
		if len(k) >= len(prefix) && k[:len(prefix)] == string(prefix) && k >= string(start) {
			out = append(out, p)
		}
	}
	for k, f := range w.flushed {
		if _, own := w.writes[k]; !own {
			add(k, f)
		}
	}
	for k, p := range w.writes {
		add(k, kvWrite{k: k, v: p.val, del: p.del})
	}
	slices.SortFunc(out, func(a, b kvWrite) int { return strings.Compare(a.k, b.k) })
	return out
}

func iterate(txn *badger.Txn, prefix, start []byte, reverse, keysOnly bool, fn func(k, v []byte) (bool, error)) error {
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
		more, err := fn(item.KeyCopy(nil), v)
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
// drained.
func (s *Store) writer() {
	defer close(s.writerDone)
	batch := make([]*op, 0, maxBatch)
	w := &writeTx{writes: make(map[string]pending), states: make(map[string]threadState), origStates: make(map[string]threadState), cache: newRecordCache(), flushed: make(map[string]kvWrite)}
	for {
		o, ok := <-s.ops
		if !ok {
			return
		}
		batch = append(batch[:0], o)
	drain:
		for len(batch) < maxBatch {
			select {
			case o, ok := <-s.ops:
				if !ok {
					break drain
				}
				batch = append(batch, o)
			default:
				break drain
			}
		}
		s.runBatch(batch, w)
	}
}

// runBatch runs ops in as few transactions as fit and answers each.
func (s *Store) runBatch(batch []*op, w *writeTx) {
	if err := s.space.check(s.opts); err != nil {
		for _, o := range batch {
			s.answer(o, fmt.Errorf("%s: %w", o.name, err))
		}
		return
	}
	for len(batch) > 0 {
		n := s.commitPrefix(batch, w)
		batch = batch[n:]
	}
}

// commitPrefix commits the longest prefix of batch that fits one
// transaction (at least one operation) and answers its operations. It
// returns how many operations it answered.
func (s *Store) commitPrefix(batch []*op, w *writeTx) int {
	results := make([]error, len(batch))
	n := len(batch)
	for attempt := 0; ; attempt++ {
		txn := s.db.NewTransaction(true)
		w.snap = s.db.NewTransaction(false)
		clear(w.flushed)
		failed, ferr := -1, error(nil)
		for i := 0; i < n; i++ {
			w.reset(txn)
			err := runOp(batch[i], w)
			if err == nil {
				err = w.finishThreads()
			}
			if err == nil {
				if ferr = w.flush(); ferr != nil {
					// Part of this operation may already sit in the
					// transaction: it must not be committed.
					failed = i
					break
				}
			}
			results[i] = err
		}
		w.snap.Discard() // the operations are done reading
		if failed == 0 {
			txn.Discard()
			w.cache.clear() // it may hold this transaction's pending writes
			s.answer(batch[0], flushError(batch[0].name, ferr))
			return 1
		}
		if failed > 0 {
			// Re-run the operations before it in a fresh transaction; the
			// failing one goes first into the next, and alone fails there.
			txn.Discard()
			w.cache.clear()
			n = failed
			continue
		}
		cerr := txn.Commit()
		if errors.Is(cerr, badger.ErrConflict) && attempt < 3 {
			w.cache.clear()
			continue // cannot happen with one writer; bounded retry all the same
		}
		if cerr != nil {
			w.cache.clear()
			cerr = fmt.Errorf("commit: %w", unavailable(cerr))
			s.log.Error("badgerstore commit failed", "ops", n, "err", cerr)
		} else {
			for _, f := range w.flushed {
				if f.del {
					w.cache.put(f.k, nil)
				} else {
					w.cache.put(f.k, f.val())
				}
			}
		}
		for i := 0; i < n; i++ {
			if results[i] == nil {
				results[i] = cerr
			}
			s.answer(batch[i], results[i])
		}
		s.batches.Add(1)
		s.batchedOps.Add(uint64(n))
		return n
	}
}

// flushError explains why an operation's writes could not join a
// transaction on their own. Badger's own message may quote the whole
// value, so only its first line, cut short, is kept.
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
	return fmt.Errorf("%s: write refused by the storage engine: %s: %w", name, msg, engine.ErrTooLarge)
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
// and before every batch once it is low.
type spaceGuard struct {
	checked time.Time
	low     bool
	free    int64
}

const spaceCheckEvery = 250 * time.Millisecond

func (g *spaceGuard) check(o Options) error {
	if o.InMemory || o.MinFreeBytes < 0 {
		return nil
	}
	if !g.low && time.Since(g.checked) < spaceCheckEvery {
		return nil
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(o.Dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", o.Dir, unavailable(err))
	}
	g.checked = time.Now()
	g.free = int64(st.Bavail) * int64(st.Bsize)
	g.low = g.free < o.MinFreeBytes
	if g.low {
		return fmt.Errorf("disk full: %d bytes free in %s, %d needed: %w", g.free, o.Dir, o.MinFreeBytes, engine.ErrUnavailable)
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
