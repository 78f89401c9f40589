package badgerstore

import (
	"math"
	"sync"

	"github.com/dgraph-io/badger/v4"
)

// Shared read snapshots. A Badger read transaction made while a commit is
// being written waits for that commit to finish (its read timestamp must
// cover every assigned commit), and with pipelined group commits one is
// almost always in flight: a reader would wait a whole fsync for nothing.
// Instead the writer publishes one read-only transaction per commit point,
// made right after the commit is applied and before its callers are
// answered (so a caller's later reads see its writes), and readers share
// it. A snapshot is discarded once it is no longer current and its last
// reader is done.

// snapshot is one published read-only transaction.
type snapshot struct {
	txn  *badger.Txn
	seq  uint64 // the commit it shows
	refs int    // readers using it (guarded by snapshots.mu)
}

// snapshots holds the current snapshot, and the floor of the ready
// index: a due time below which the index holds no live key, only the
// deletion markers of keys that were claimed. Due times grow, so markers
// pile up at the low end until compaction drops them; ReadyThreads seeks
// to the floor instead of stepping over every one of them.
//
// The floor is lowered by every commit that inserts a ready key below it
// (before the commit's snapshot is published) and raised by a reader that
// saw the lowest live key, allowing for the keys inserted since its
// snapshot: insMin remembers the lowest key each recent commit inserted.
type snapshots struct {
	mu     sync.Mutex
	cache  *recordCache // committed records, numbered by the same commits
	cur    *snapshot
	seq    uint64             // commits published
	floor  int64              // no live ready key is due before this
	insMin [floorWindow]int64 // by seq % floorWindow: lowest ready key a commit inserted
	// noRaiseUpTo: scans of snapshots up to this commit may not raise the
	// floor (a commit after it failed, and Badger may have applied part).
	noRaiseUpTo uint64
}

// floorWindow is how many commits a ReadyThreads scan may span and still
// raise the floor.
const floorWindow = 64

// acquire returns the current snapshot with a reference held, or nil
// when none is published (then the caller makes its own transaction).
func (ss *snapshots) acquire() *snapshot {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.cur != nil {
		ss.cur.refs++
	}
	return ss.cur
}

// release drops a reference; the last reader of a retired snapshot
// discards it.
func (ss *snapshots) release(sn *snapshot) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	sn.refs--
	if sn.refs == 0 && sn != ss.cur {
		sn.txn.Discard()
	}
}

// publish makes txn the current snapshot (nil: none) and retires the old
// one; ws is the commit's writes (nil: none), which enter the record cache
// first; readyMin is the lowest due time of a ready key the commit
// inserted (math.MaxInt64: none).
func (ss *snapshots) publish(txn *badger.Txn, ws *writeSet, readyMin int64) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.seq++
	ss.cache.apply(ws, ss.seq)
	var sn *snapshot
	if txn != nil {
		sn = &snapshot{txn: txn, seq: ss.seq}
	}
	ss.insMin[ss.seq%floorWindow] = readyMin
	ss.floor = min(ss.floor, readyMin)
	old := ss.cur
	ss.cur = sn
	if old != nil && old.refs == 0 {
		old.txn.Discard()
	}
}

// acquireReady is acquire, with the ready-index floor valid for the
// snapshot and the snapshot's commit sequence.
func (ss *snapshots) acquireReady() (sn *snapshot, floor int64, seq uint64) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.cur != nil {
		ss.cur.refs++
	}
	return ss.cur, ss.floor, ss.seq
}

// dropFloor lowers the floor to the bottom after a failed commit: Badger
// may have applied part of it, ready keys included, and a failed commit's
// inserts are not recorded.
func (ss *snapshots) dropFloor() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.floor = math.MinInt64
	ss.noRaiseUpTo = ss.seq // a scan of an older snapshot cannot vouch for what it applied
}

// raiseFloor records that the snapshot of commit seq had no live ready key
// due before lowest (math.MaxInt64: none at all).
func (ss *snapshots) raiseFloor(seq uint64, lowest int64) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.seq-seq >= floorWindow || seq <= ss.noRaiseUpTo {
		return // too many commits since: their inserts are forgotten
	}
	for s := seq + 1; s <= ss.seq; s++ {
		lowest = min(lowest, ss.insMin[s%floorWindow])
	}
	if lowest > ss.floor && lowest != math.MaxInt64 {
		ss.floor = lowest
	}
}
