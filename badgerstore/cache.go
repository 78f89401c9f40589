package badgerstore

// recordCache is the writer's read cache: the values of the keys the
// writer read or wrote lately, so the read-modify-write of a dispatch, a
// run or a thread state that was touched a moment ago does not go back to
// the LSM tree. Only the writer goroutine uses it, and it is coherent
// because the writer is the only writer: values enter it from committed
// batches (and from reads inside a batch, which commit with it); whenever
// a batch transaction is discarded or fails to commit the cache is
// cleared. A nil value caches "absent".
type recordCache struct {
	m    map[string][]byte
	ring []string // insertion order, for FIFO eviction
	next int
}

// cacheEntries bounds the cache (about a few MiB of records).
const cacheEntries = 8192

func newRecordCache() *recordCache {
	return &recordCache{m: make(map[string][]byte, cacheEntries), ring: make([]string, cacheEntries)}
}

func (c *recordCache) get(k string) ([]byte, bool) {
	v, ok := c.m[k]
	return v, ok
}

func (c *recordCache) put(k string, v []byte) {
	if _, ok := c.m[k]; !ok {
		if old := c.ring[c.next]; old != "" {
			delete(c.m, old)
		}
		c.ring[c.next] = k
		c.next = (c.next + 1) % len(c.ring)
	}
	c.m[k] = v
}

// cachedFamily reports whether keys of the family (a key's first byte)
// are read one by one by the writer and so worth caching; index entries
// are only ever iterated, and caching them would only evict records.
func cachedFamily(k string) bool {
	if k == "" {
		return false
	}
	switch k[0] {
	case pDispatch, pEpoch, pRun, pThread, pMsgCount, pCount, pDedupe, pMessageID, pThreadQ:
		return true
	}
	return false
}

func (c *recordCache) clear() {
	clear(c.m)
	clear(c.ring)
	c.next = 0
}
