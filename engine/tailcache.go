package engine

import (
	"container/list"
	"context"
	"strings"
	"sync"
	"unsafe"
)

// tailCache keeps the newest decoded messages of recently run threads, so
// rebuilding a run request reads only the messages appended since the
// thread's last run instead of its whole context window. A thread's log is
// append-only and a message never changes once it has its sequence
// number (store.md §3), so a cached record stays valid for ever: only the
// log's length is read from the store each time. Records are shared with
// callers, who must not modify them. Threads are evicted least recently
// used first once the cached bytes exceed the budget.
type tailCache struct {
	mu      sync.Mutex
	budget  int64
	bytes   int64
	threads map[string]*list.Element // of *threadTail
	lru     list.List                // front: most recently used

	// Messages submits appended, until the run they activate reads them
	// (find): with a backlog a run's activation messages are older than
	// its thread's cached tail, and each read from the store costs two
	// point reads. Oldest dropped first beyond a quarter of the budget.
	activations      map[activationKey]*list.Element // of *activation
	activationOrder  list.List                       // front: oldest
	activationsBytes int64
}

type activationKey struct{ thread, id string }

type activation struct {
	key   activationKey
	rec   MessageRecord
	bytes int64
}

// threadTail is the cached suffix of one thread's log: seqs first … first+len(recs)−1.
type threadTail struct {
	thread string
	first  uint64
	recs   []MessageRecord
	// slots is the length of the array recs lies in, from its start: the
	// records dropped from the front of the tail and the room left for
	// appends hold memory too. A tail kept from a caller's slice counts
	// that array from the slice's first record on (keep): what lies
	// before it is not visible from the slice.
	slots int
	// bytes is what the tail holds: its records (recordBytes), its
	// array's other slots (recordSize each) and its bookkeeping
	// (threadOverhead and the thread id's copy).
	bytes int64
}

// recordSize is the memory of one slot of a []MessageRecord.
const recordSize = int64(unsafe.Sizeof(MessageRecord{}))

// What the cache's bookkeeping holds per entry besides its records (the
// thread id's copy aside): the entry's own struct, its list element and
// its map slot (mapSlotBytes: key, value and the map's spare room, an
// estimate).
const (
	mapSlotBytes       = 64
	threadOverhead     = int64(unsafe.Sizeof(threadTail{})+unsafe.Sizeof(list.Element{})) + mapSlotBytes
	activationOverhead = int64(unsafe.Sizeof(activation{})+unsafe.Sizeof(list.Element{})) - recordSize + mapSlotBytes
)

// spareBytes is the memory of the slots of t's array that hold no record
// of the tail.
func (t *threadTail) spareBytes() int64 { return int64(t.slots-len(t.recs)) * recordSize }

func newTailCache(budget int64) *tailCache {
	if budget <= 0 {
		return nil
	}
	return &tailCache{budget: budget, threads: make(map[string]*list.Element), activations: make(map[activationKey]*list.Element)}
}

// recordBytes estimates the memory a cached record holds: its slot and
// the bytes its strings and slices point to.
func recordBytes(r *MessageRecord) int64 {
	m := &r.Message
	return recordSize + int64(len(r.MessageID)+len(r.ThreadID)+len(r.ProducedByRunID)+len(r.ToolCallID)+
		len(m.ID)+len(m.Role)+len(m.Content)+len(m.ToolCalls)+len(m.ToolCallID)+len(m.Visibility)+len(m.Metadata))
}

// load is a store's LoadMessageRange.
type loadRange func(ctx context.Context, thread string, from, to uint64) ([]MessageRecord, error)

// window returns the records with from ≤ seq ≤ to (to at most the log's
// length), reading from the store only those the cache lacks, and keeps
// at most keep of the newest for next time. A nil cache reads them all.
func (c *tailCache) window(ctx context.Context, thread string, from, to uint64, keep int, load loadRange) ([]MessageRecord, error) {
	if c == nil || from > to {
		return load(ctx, thread, from, to)
	}
	c.mu.Lock()
	var have []MessageRecord
	if el, ok := c.threads[thread]; ok {
		t := el.Value.(*threadTail)
		last := t.first + uint64(len(t.recs)) - 1
		if len(t.recs) > 0 && t.first <= from && last >= from {
			// Shared, not copied (records are never modified); the capped
			// capacity makes an append below copy instead of writing into
			// the cached array.
			end := min(last, to) - t.first + 1
			have = t.recs[from-t.first : end : end]
			if last >= to {
				c.lru.MoveToFront(el)
				c.mu.Unlock()
				return have, nil
			}
		}
	}
	c.mu.Unlock()
	next := from + uint64(len(have))
	more, err := load(ctx, thread, next, to)
	if err != nil {
		return nil, err
	}
	have = append(have, more...)
	if contiguous(have, from) {
		c.keep(thread, have, keep)
	}
	return have, nil
}

// contiguous reports whether recs have the seqs from, from+1, …
func contiguous(recs []MessageRecord, from uint64) bool {
	for i := range recs {
		if recs[i].Seq != from+uint64(i) {
			return false
		}
	}
	return len(recs) > 0
}

// keep caches the newest (at most n) of recs, a contiguous run of the
// thread's log, unless the cache already holds newer messages.
func (c *tailCache) keep(thread string, recs []MessageRecord, n int) {
	if n <= 0 {
		return
	}
	// The caller's array from recs[0] on (the records before the newest n
	// included) stays alive while the tail does: counted whole, or, when
	// it is more than twice the records kept, left behind for an array of
	// their size.
	slots := cap(recs)
	if len(recs) > n {
		recs = recs[len(recs)-n:]
	}
	if slots > 2*len(recs) {
		recs = append(make([]MessageRecord, 0, len(recs)), recs...)
		slots = len(recs)
	}
	recs = recs[:len(recs):len(recs)] // never appended into: it may be a caller's
	t := &threadTail{thread: thread, first: recs[0].Seq, recs: recs, slots: slots, bytes: threadOverhead + int64(len(thread))}
	t.bytes += t.spareBytes()
	for i := range recs {
		t.bytes += recordBytes(&recs[i])
	}
	if t.bytes > c.budget/4 {
		return // one thread may not take the whole cache
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.threads[thread]; ok {
		old := el.Value.(*threadTail)
		if old.first+uint64(len(old.recs)) > t.first+uint64(len(t.recs)) {
			c.lru.MoveToFront(el)
			return // a concurrent reader cached a longer log
		}
		c.bytes -= old.bytes
		t.thread = old.thread // the cache's own copy of the id
		el.Value = t
		c.lru.MoveToFront(el)
	} else {
		// A copy of the id: the caller's may be a slice of a whole
		// decoded run record, which the key would keep alive.
		t.thread = strings.Clone(thread)
		c.threads[t.thread] = c.lru.PushFront(t)
	}
	c.bytes += t.bytes
	c.evictLocked()
}

// evictLocked drops least recently used threads until the cache fits its
// budget; c.mu is held.
func (c *tailCache) evictLocked() {
	for c.bytes > c.budget {
		el := c.lru.Back()
		old := el.Value.(*threadTail)
		c.lru.Remove(el)
		delete(c.threads, old.thread)
		c.bytes -= old.bytes
	}
}

// appended extends a cached thread's tail with records just appended to
// its log (a checkpoint's or a submit's own, durable once returned) when
// they continue it, so the next run request of that thread reads none of
// its messages from the store. Records that do not continue the cached
// tail (another writer got there first) are left for window to load; the
// first records of a new log (seq 1 on) start a tail of their own.
//
// The tail grows in place, in an array only the cache writes to: windows
// handed out are capped at their length and keep stores its records
// capped too, so no caller's slice reaches the part written here.
func (c *tailCache) appended(thread string, recs []MessageRecord, n int) {
	if c == nil || n <= 0 || len(recs) == 0 || !contiguous(recs, recs[0].Seq) {
		return
	}
	c.mu.Lock()
	el, ok := c.threads[thread]
	if !ok {
		c.mu.Unlock()
		if recs[0].Seq == 1 {
			// A new log: these records are all of it (the first run of a
			// new thread then reads none of its messages).
			c.keep(thread, recs, n)
		}
		return
	}
	defer c.mu.Unlock()
	t := el.Value.(*threadTail)
	if t.first+uint64(len(t.recs)) != recs[0].Seq {
		return
	}
	before := t.bytes
	t.bytes -= t.spareBytes() // counted again below, for the array the tail ends in
	all := t.recs
	// Drop the oldest records the new ones push out of the newest n.
	if drop := min(len(all), len(all)+len(recs)-n); drop > 0 {
		for i := range all[:drop] {
			t.bytes -= recordBytes(&all[i])
		}
		t.first += uint64(drop)
		all = all[drop:]
	}
	if len(all)+len(recs) > cap(all) {
		// A cache-owned array with room, so the next appends copy
		// nothing: twice what the tail holds, up to 2n (a full window
		// then slides n records before it is copied again). A fixed 2n
		// gave every thread with a second message room for a thousand
		// records (n = 500): 224 KB each, which the budget did not see.
		room := min(max(2*(len(all)+len(recs)), 8), 2*n+len(recs))
		all = append(make([]MessageRecord, 0, room), all...)
		t.slots = room
	}
	all = append(all, recs...)
	for i := range recs {
		t.bytes += recordBytes(&recs[i])
	}
	if drop := len(all) - n; drop > 0 { // more new records than n
		for i := range all[:drop] {
			t.bytes -= recordBytes(&all[i])
		}
		t.first += uint64(drop)
		all = all[drop:]
	}
	t.recs = all
	t.bytes += t.spareBytes()
	c.bytes += t.bytes - before
	if t.bytes > c.budget/4 {
		c.lru.Remove(el) // one thread may not take the whole cache
		delete(c.threads, thread)
		c.bytes -= t.bytes
		return
	}
	c.lru.MoveToFront(el)
	c.evictLocked()
}

// submitted keeps the messages a submit appended (durable once returned)
// for the run they activate.
func (c *tailCache) submitted(thread string, recs []MessageRecord) {
	if c == nil || len(recs) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range recs {
		a := &activation{key: activationKey{thread, recs[i].MessageID}, rec: recs[i],
			bytes: recordBytes(&recs[i]) + activationOverhead + int64(len(thread))}
		if a.bytes > c.budget/16 {
			continue
		}
		if old, ok := c.activations[a.key]; ok {
			c.dropActivationLocked(old)
		}
		a.key.thread = strings.Clone(thread) // not a slice of a caller's record
		c.activations[a.key] = c.activationOrder.PushBack(a)
		c.activationsBytes += a.bytes
	}
	for c.activationsBytes > c.budget/4 {
		c.dropActivationLocked(c.activationOrder.Front())
	}
}

func (c *tailCache) dropActivationLocked(el *list.Element) {
	a := c.activationOrder.Remove(el).(*activation)
	delete(c.activations, a.key)
	c.activationsBytes -= a.bytes
}

// find returns the cached record of message id in thread: one a submit
// appended and no run has read yet (it is forgotten as it is returned),
// or one the thread's cached window holds.
func (c *tailCache) find(thread, id string) (MessageRecord, bool) {
	if c == nil {
		return MessageRecord{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.activations[activationKey{thread, id}]; ok {
		rec := el.Value.(*activation).rec
		c.dropActivationLocked(el)
		return rec, true
	}
	el, ok := c.threads[thread]
	if !ok {
		return MessageRecord{}, false
	}
	recs := el.Value.(*threadTail).recs
	for i := len(recs) - 1; i >= 0; i-- { // activations are usually the newest
		if recs[i].MessageID == id {
			return recs[i], true
		}
	}
	return MessageRecord{}, false
}
