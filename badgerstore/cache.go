package badgerstore

import (
	"encoding/binary"
	"sync"
)

// recordCache holds the committed values of record keys (dispatches,
// runs, thread states and projections, counters) that were written or
// read lately, for the writer and for readers alike, so a record touched
// a moment ago is not looked up in the LSM tree again (a point read there
// walks the memtables and every level: several µs, and a block to
// decompress).
//
// It never holds an uncommitted value. Each entry is the key's latest
// committed value, valid from commit `since` onward; commits are numbered
// as the published snapshots are (snapshot.go):
//
//   - a commit's writes enter it (apply) before the commit's snapshot is
//     published and before its callers are answered, with since = that
//     commit, replacing what was there;
//   - a reader holding the snapshot of commit r uses an entry only if
//     since ≤ r, so it sees exactly its snapshot (an index scanned in the
//     snapshot never names a record the cache says is gone);
//   - a reader that missed fills the entry from its snapshot only while no
//     later commit has been applied (seq == r), so a fill can never hide a
//     newer write;
//   - the writer reads any entry (it wants the latest committed value;
//     the batch in flight, which the cache may not hold yet, is read
//     before it), and fills from its own snapshot, whose value for a key
//     the batch in flight does not write is the latest committed one.
//
// It also knows the latest run of recently read threads: the entry keyed
// by a thread's run-latest prefix (T<seg thread>, never a whole key)
// holds the greatest key under it (nil: the thread has no run). A commit
// keeps a known entry right (its inserts can only raise it; deleting the
// greatest key without inserting a greater one makes it unknown); a
// reader's scan fills it, as for records.
//
// A failed commit clears it, and keeps it empty until the next commit is
// applied: Badger may have applied part of the failed one, so values read
// from the snapshot before it are not to be trusted next to the snapshots
// after it. Entries
// leave in insertion order once the cache holds more than its byte
// budget. A nil value caches "absent".
type recordCache struct {
	mu    sync.RWMutex
	m     map[string]cacheEntry
	fifo  []string // insertion order; fifo[head:] are live
	head  int
	bytes int64
	limit int64
	seq   uint64 // the last commit applied
	// void: a commit failed since the last one applied; nothing enters
	// until the next is applied, which starts from an empty cache.
	void bool
}

type cacheEntry struct {
	v     []byte
	since uint64
}

// entryOverhead approximates the map and queue bookkeeping per entry.
const entryOverhead = 96

func newRecordCache(limit int64) *recordCache {
	return &recordCache{m: make(map[string]cacheEntry), limit: limit}
}

// cachedFamily reports whether keys of the family (a key's first byte)
// are read one by one and so worth caching; index entries are only ever
// iterated, and message bodies have the engine's own cache. Message-id
// entries are not cached either: they are read only to check an id a
// caller supplied (ids the engine mints are not looked up, engine.Minted)
// while every run writes two, which pushed records that are read out of
// the cache (2 % of the sidecar's CPU per run, bench/README.md).
func cachedFamily(k string) bool {
	if k == "" {
		return false
	}
	switch k[0] {
	case pDispatch, pEpoch, pRun, pThread, pMsgCount, pCount, pDedupe, pThreadQ:
		return true
	}
	return false
}

// getAt returns the value of k as of commit r, if the cache knows it.
func (c *recordCache) getAt(k []byte, r uint64) ([]byte, bool) {
	if c == nil {
		return nil, false
	}
	c.mu.RLock()
	e, ok := c.m[string(k)]
	c.mu.RUnlock()
	if !ok || e.since > r {
		return nil, false
	}
	return e.v, true
}

// getLatest returns the latest committed value of k, if the cache knows
// it (the writer's read).
func (c *recordCache) getLatest(k []byte) ([]byte, bool) {
	c.mu.RLock()
	e, ok := c.m[string(k)]
	c.mu.RUnlock()
	return e.v, ok
}

// fillAt caches v, read from the snapshot of commit r, unless a later
// commit has been applied since or the key is cached already.
func (c *recordCache) fillAt(k []byte, v []byte, r uint64) {
	if c == nil || !cachedFamily(string(k[:min(len(k), 1)])) {
		return
	}
	c.fill(k, v, r)
}

// fillLatestRun caches the greatest run-latest key of the thread whose
// prefix is p (nil: none), as the snapshot of commit r has it.
func (c *recordCache) fillLatestRun(p, latest []byte, r uint64) {
	if c != nil {
		c.fill(p, latest, r)
	}
}

func (c *recordCache) fill(k []byte, v []byte, r uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seq != r || c.void {
		return
	}
	if _, ok := c.m[string(k)]; !ok {
		c.insert(string(k), v, r)
	}
}

// fillLatest caches v, the latest committed value of k as the writer read
// it, unless the key is cached already.
func (c *recordCache) fillLatest(k []byte, v []byte) {
	if !cachedFamily(string(k[:min(len(k), 1)])) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.void {
		return
	}
	if _, ok := c.m[string(k)]; !ok {
		c.insert(string(k), v, c.seq)
	}
}

// apply enters the writes of commit seq.
func (c *recordCache) apply(ws *writeSet, seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq = seq
	if c.void {
		c.reset()
		c.void = false
	}
	if ws == nil {
		return
	}
	for _, k := range ws.keys {
		if !cachedFamily(k) {
			continue
		}
		f := ws.m[k]
		var v []byte
		if !f.del {
			v = f.val()
		}
		if old, ok := c.m[k]; ok {
			c.bytes += int64(len(v) - len(old.v))
			c.m[k] = cacheEntry{v: v, since: seq}
			continue
		}
		c.insert(k, v, seq)
	}
	c.applyLatestRuns(ws, seq)
	c.evict()
}

// applyLatestRuns keeps the known latest-run entries of the threads whose
// run-latest index the commit changed; c.mu is held.
func (c *recordCache) applyLatestRuns(ws *writeSet, seq uint64) {
	keys := ws.keysIn([]byte{pRunLatest}, nil)
	for i := 0; i < len(keys); {
		k := keys[i]
		n := 1
		if len(k) >= 3 {
			n = min(3+int(binary.BigEndian.Uint16([]byte(k[1:3]))), len(k))
		}
		p := k[:n]
		// keys[i:j] are this thread's (sorted: the last insert is the greatest).
		j := i
		var maxIns string
		for j < len(keys) && len(keys[j]) >= n && keys[j][:n] == p {
			if !ws.m[keys[j]].del {
				maxIns = keys[j]
			}
			j++
		}
		thread := keys[i:j]
		i = j
		e, ok := c.m[p]
		if !ok {
			continue // unknown: a reader fills it
		}
		latest := string(e.v)
		deleted := false
		for _, k := range thread {
			if k == latest && ws.m[k].del {
				deleted = true
			}
		}
		switch {
		case maxIns != "" && (e.v == nil || maxIns > latest):
			c.bytes += int64(len(maxIns) - len(e.v))
			c.m[p] = cacheEntry{v: []byte(maxIns), since: seq}
		case deleted:
			c.bytes -= int64(len(p) + len(e.v) + entryOverhead)
			delete(c.m, p)
		}
	}
}

// insert adds a new entry; c.mu is held.
func (c *recordCache) insert(k string, v []byte, since uint64) {
	c.m[k] = cacheEntry{v: v, since: since}
	c.fifo = append(c.fifo, k)
	c.bytes += int64(len(k) + len(v) + entryOverhead)
	c.evict()
}

// evict drops the oldest entries while over budget; c.mu is held.
func (c *recordCache) evict() {
	for c.bytes > c.limit && c.head < len(c.fifo) {
		k := c.fifo[c.head]
		c.fifo[c.head] = ""
		c.head++
		if e, ok := c.m[k]; ok {
			c.bytes -= int64(len(k) + len(e.v) + entryOverhead)
			delete(c.m, k)
		}
	}
	if c.head > 1024 && c.head > len(c.fifo)/2 {
		n := copy(c.fifo, c.fifo[c.head:])
		clear(c.fifo[n:])
		c.fifo = c.fifo[:n]
		c.head = 0
	}
	if len(c.fifo)-c.head > 2*len(c.m)+1024 {
		c.dedupeFIFO()
	}
}

// dedupeFIFO keeps each cached key once in the insertion queue, at its
// first place. A key deleted other than by eviction (a latest-run entry a
// commit made unknown) stays queued, and filling it again queues it a
// second time; under budget nothing would ever drop those. c.mu is held.
func (c *recordCache) dedupeFIFO() {
	seen := make(map[string]struct{}, len(c.m))
	n := 0
	for _, k := range c.fifo[c.head:] {
		if _, live := c.m[k]; !live {
			continue
		}
		if _, dup := seen[k]; dup {
			continue
		}
		seen[k] = struct{}{}
		c.fifo[n] = k
		n++
	}
	clear(c.fifo[n:])
	c.fifo = c.fifo[:n]
	c.head = 0
}

// clear empties the cache.
func (c *recordCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reset()
}

// voidUntilNextCommit empties the cache after a failed commit and keeps it
// empty until the next commit is applied.
func (c *recordCache) voidUntilNextCommit() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reset()
	c.void = true
}

// reset empties the cache; c.mu is held.
func (c *recordCache) reset() {
	clear(c.m)
	clear(c.fifo)
	c.fifo = c.fifo[:0]
	c.head = 0
	c.bytes = 0
}

// len reports the number of entries (tests).
func (c *recordCache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.m)
}
