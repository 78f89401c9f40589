package engine

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"testing"
)

// logOf is a thread log of n messages with seqs 1..n, and a loader over it
// that records every range it was asked for.
func logOf(n int) ([]MessageRecord, *[][2]uint64, loadRange) {
	recs := make([]MessageRecord, n)
	for i := range recs {
		recs[i] = MessageRecord{MessageID: fmt.Sprintf("m%d", i+1), ThreadID: "t", Seq: uint64(i + 1), Message: Message{Role: RoleUser, Content: []byte(fmt.Sprintf(`"%d"`, i+1))}}
	}
	var asked [][2]uint64
	load := func(_ context.Context, _ string, from, to uint64) ([]MessageRecord, error) {
		asked = append(asked, [2]uint64{from, to})
		var out []MessageRecord
		for _, r := range recs {
			if r.Seq >= from && r.Seq <= to {
				out = append(out, r)
			}
		}
		return out, nil
	}
	return recs, &asked, load
}

func seqs(recs []MessageRecord) []uint64 {
	out := make([]uint64, len(recs))
	for i, r := range recs {
		out[i] = r.Seq
	}
	return out
}

func TestTailCacheReadsOnlyNewMessages(t *testing.T) {
	ctx := context.Background()
	c := newTailCache(1 << 20)
	_, asked, load := logOf(30)
	got, err := c.window(ctx, "t", 11, 20, 10, load)
	if err != nil || !slices.Equal(seqs(got), []uint64{11, 12, 13, 14, 15, 16, 17, 18, 19, 20}) {
		t.Fatalf("first window %v %v", seqs(got), err)
	}
	// The log grew by 5: only 21..25 are read; the window slides.
	got, _ = c.window(ctx, "t", 16, 25, 10, load)
	if !slices.Equal(seqs(got), []uint64{16, 17, 18, 19, 20, 21, 22, 23, 24, 25}) {
		t.Fatalf("second window %v", seqs(got))
	}
	// Nothing new: no read at all.
	got, _ = c.window(ctx, "t", 16, 25, 10, load)
	if len(got) != 10 {
		t.Fatalf("third window %v", seqs(got))
	}
	// A window reaching further back than the cache reads it whole.
	got, _ = c.window(ctx, "t", 1, 25, 10, load)
	if len(got) != 25 || got[0].Seq != 1 {
		t.Fatalf("wide window %v", seqs(got))
	}
	want := [][2]uint64{{11, 20}, {21, 25}, {1, 25}}
	if !slices.Equal(*asked, want) {
		t.Fatalf("store reads %v, want %v", *asked, want)
	}
}

func TestTailCacheEvictsAndNilCacheReadsAll(t *testing.T) {
	ctx := context.Background()
	_, asked, load := logOf(10)
	var off *tailCache // ContextCacheBytes < 0
	for range 2 {
		if got, _ := off.window(ctx, "t", 1, 10, 10, load); len(got) != 10 {
			t.Fatalf("uncached window %v", seqs(got))
		}
	}
	if len(*asked) != 2 {
		t.Fatalf("uncached: %d store reads, want 2", len(*asked))
	}
	// A budget of four threads' windows (~2.5 KB each): reading a fifth
	// evicts the least recently used.
	c := newTailCache(11000)
	*asked = nil
	for _, th := range []string{"a", "b", "c", "d", "e"} {
		c.window(ctx, th, 1, 10, 10, load)
	}
	c.window(ctx, "a", 1, 10, 10, load) // evicted by e: read again
	c.window(ctx, "a", 1, 10, 10, load) // cached
	c.window(ctx, "e", 1, 10, 10, load) // cached
	if len(*asked) != 6 {
		t.Fatalf("with eviction: %d store reads, want 6 (%v)", len(*asked), *asked)
	}
	if c.bytes > c.budget {
		t.Fatalf("cache holds %d bytes over its budget %d", c.bytes, c.budget)
	}
}

func TestTailCacheFindsCachedMessagesByID(t *testing.T) {
	ctx := context.Background()
	c := newTailCache(1 << 20)
	_, _, load := logOf(30)
	if _, ok := c.find("t", "m25"); ok {
		t.Fatal("found a message before anything was cached")
	}
	c.window(ctx, "t", 21, 30, 10, load)
	if r, ok := c.find("t", "m25"); !ok || r.Seq != 25 {
		t.Fatalf("find m25 = %v %v", r, ok)
	}
	if _, ok := c.find("t", "m5"); ok {
		t.Fatal("found a message outside the cached window")
	}
	var off *tailCache
	if _, ok := off.find("t", "m25"); ok {
		t.Fatal("a disabled cache found something")
	}
}

// Records a checkpoint or submit appended extend a cached tail they
// continue, so the next window reads nothing; records that do not continue
// it are ignored; a window shared from the cache cannot be appended into.
func TestTailCacheLearnsAppendedRecords(t *testing.T) {
	ctx := context.Background()
	c := newTailCache(1 << 20)
	recs, asked, load := logOf(30)
	if _, err := c.window(ctx, "t", 11, 20, 10, load); err != nil {
		t.Fatal(err)
	}
	c.appended("t", recs[20:22], 10) // seqs 21, 22 continue the tail
	c.appended("t", recs[23:24], 10) // seq 24 leaves a gap: ignored
	c.appended("u", recs[0:1], 10)   // an uncached thread: ignored
	n := len(*asked)
	got, err := c.window(ctx, "t", 13, 22, 10, load)
	if err != nil || !slices.Equal(seqs(got), []uint64{13, 14, 15, 16, 17, 18, 19, 20, 21, 22}) {
		t.Fatalf("window after appends %v %v", seqs(got), err)
	}
	if len(*asked) != n {
		t.Fatalf("read %v from the store; the appended records were not cached", (*asked)[n:])
	}
	// Seq 23 was never announced: read from the store, 24 with it.
	got, _ = c.window(ctx, "t", 15, 24, 10, load)
	if !slices.Equal(seqs(got), []uint64{15, 16, 17, 18, 19, 20, 21, 22, 23, 24}) || !slices.Equal((*asked)[n:], [][2]uint64{{23, 24}}) {
		t.Fatalf("window %v, reads %v", seqs(got), (*asked)[n:])
	}
	shared, _ := c.window(ctx, "t", 15, 20, 10, load)
	_ = append(shared, MessageRecord{Seq: 99})
	if again, _ := c.window(ctx, "t", 15, 24, 10, load); again[6].Seq != 21 {
		t.Fatalf("an append to a returned window wrote into the cache: %v", seqs(again))
	}
}

// Appends grow the tail in place and keep the newest n: windows handed
// out before keep their contents, and the byte count stays exact.
func TestTailCacheAppendsInPlaceKeepWindowsAndBytes(t *testing.T) {
	ctx := context.Background()
	c := newTailCache(1 << 20)
	recs, asked, load := logOf(200)
	first := make([]MessageRecord, 10, 32) // what a caller holds, with room
	copy(first, recs[:10])
	c.keep("t", first, 10)
	c.appended("t", recs[10:11], 10)
	_ = append(first, MessageRecord{Seq: 999}) // a caller may append to what it holds
	if w, _ := c.window(ctx, "t", 2, 11, 10, load); w[9].Seq != 11 {
		t.Fatalf("a caller's append reached the cache: %v", seqs(w))
	}
	var views [][]MessageRecord
	for s := 11; s < 200; s += 3 {
		end := min(s+3, 200)
		c.appended("t", recs[s:end], 10)
		w, err := c.window(ctx, "t", uint64(end-9), uint64(end), 10, load)
		if err != nil || len(w) != 10 || w[0].Seq != uint64(end-9) || w[9].Seq != uint64(end) {
			t.Fatalf("window up to %d: %v %v", end, seqs(w), err)
		}
		views = append(views, w)
	}
	if len(*asked) != 0 {
		t.Fatalf("store reads %v; want none (every window from the cache)", *asked)
	}
	for _, w := range views {
		if !contiguous(w, w[0].Seq) {
			t.Fatalf("an earlier window changed under its reader: %v", seqs(w))
		}
	}
	var sum int64
	for _, el := range c.threads {
		tt := el.Value.(*threadTail)
		if len(tt.recs) != 10 || tt.first != 191 {
			t.Fatalf("cached %d records from %d; want 10 from 191", len(tt.recs), tt.first)
		}
		if tt.slots < cap(tt.recs) {
			t.Fatalf("the tail counts %d slots; its array has %d from the tail's start", tt.slots, cap(tt.recs))
		}
		for i := range tt.recs {
			sum += recordBytes(&tt.recs[i])
		}
		sum += int64(tt.slots-len(tt.recs)) * recordSize // the room and the dropped front
		sum += threadOverhead + int64(len(tt.thread))    // the bookkeeping
		if sum != tt.bytes {
			t.Fatalf("thread bytes %d, records, spare slots and bookkeeping hold %d", tt.bytes, sum)
		}
	}
	if c.bytes != sum {
		t.Fatalf("cache bytes %d, records hold %d", c.bytes, sum)
	}
	// More new records at once than the tail keeps.
	c2 := newTailCache(1 << 20)
	if _, err := c2.window(ctx, "t", 1, 5, 4, load); err != nil {
		t.Fatal(err)
	}
	c2.appended("t", recs[5:15], 4)
	if got, _ := c2.window(ctx, "t", 12, 15, 4, load); !slices.Equal(seqs(got), []uint64{12, 13, 14, 15}) {
		t.Fatalf("after a large append %v", seqs(got))
	}
}

// A thread's tail counts the whole array it lies in, and takes no more
// room than it needs: many threads of two messages each, under the
// default 500-message window, stay within the budget in counted bytes
// and on the heap. (Each such tail had room for 1 001 records, 224 KB,
// of which the budget counted the two records only: a backlog over
// 100 000 threads took 24 GB.)
func TestTailCacheCountsTheArrayItsTailLiesIn(t *testing.T) {
	// Large enough that what other goroutines of the test binary allocate
	// meanwhile (tens of KB) is lost in the measurement.
	const budget, threads, window = 8 << 20, 40000, 500
	c := newTailCache(budget)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range threads {
		thread := fmt.Sprintf("t%d", i)
		for seq := uint64(1); seq <= 2; seq++ {
			c.appended(thread, []MessageRecord{{MessageID: fmt.Sprintf("m%d", seq), ThreadID: thread, Seq: seq,
				Message: Message{Role: RoleUser, Content: []byte(`"hi"`)}}}, window)
		}
		if i == 0 { // fail before the loop takes gigabytes
			tt := c.threads[thread].Value.(*threadTail)
			if int64(cap(tt.recs))*recordSize > tt.bytes {
				t.Fatalf("an array of %d slots (%d bytes) counted as %d bytes", cap(tt.recs), int64(cap(tt.recs))*recordSize, tt.bytes)
			}
		}
	}
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	if c.bytes > budget {
		t.Fatalf("cache counts %d bytes, over its budget %d", c.bytes, budget)
	}
	var counted int64
	for _, el := range c.threads {
		tt := el.Value.(*threadTail)
		if int64(cap(tt.recs))*recordSize > tt.bytes {
			t.Fatalf("thread %s: an array of %d slots (%d bytes) counted as %d bytes", tt.thread, cap(tt.recs), int64(cap(tt.recs))*recordSize, tt.bytes)
		}
		counted += tt.bytes
	}
	if counted != c.bytes {
		t.Fatalf("threads count %d bytes, the cache %d", counted, c.bytes)
	}
	// Room for a few more records, not for a whole window: a thread of two
	// takes about 2 KB, so the budget keeps thousands of them.
	if len(c.threads) < 3000 {
		t.Fatalf("the budget keeps %d threads of two messages; want thousands", len(c.threads))
	}
	// The heap grew by about what the cache counts (allocation size
	// classes and the map's spare room aside: 1.09–1.15 ×, the race
	// detector's runs included), not by the 9 GB that 40 000 arrays of
	// 1 001 slots take; spare slots left uncounted would make it 3–4 ×.
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); float64(grew) > 1.3*float64(c.bytes) {
		t.Fatalf("the heap grew by %d KB for a cache that counts %d KB", grew>>10, c.bytes>>10)
	}
	runtime.KeepAlive(c)
}

// A tail kept from a caller's slice (a window read from the store) counts
// the caller's array it lies in; one in an array more than twice its
// length is copied out of it, so the cache neither pins nor counts the
// rest. (Before, the slice's length was counted: 10 of 1 000 slots.)
func TestTailCacheCountsTheCallersArrayItKeeps(t *testing.T) {
	for _, tc := range []struct {
		name          string
		len, cap, n   int // the caller's slice; the window kept
		slots         int
		sharesCallers bool
	}{
		{"room for a few more", 10, 15, 500, 15, true},
		{"a large array", 10, 1000, 500, 10, false},
		{"the newest of a few more", 15, 15, 10, 15, true},
		{"the newest of many", 30, 30, 10, 10, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTailCache(1 << 20)
			recs, _, _ := logOf(tc.len)
			caller := append(make([]MessageRecord, 0, tc.cap), recs...)
			c.keep("t", caller, tc.n)
			kept := recs[max(0, tc.len-tc.n):]
			tt := c.threads["t"].Value.(*threadTail)
			if tt.slots != tc.slots || len(tt.recs) != len(kept) {
				t.Fatalf("%d records in %d slots, want %d in %d", len(tt.recs), tt.slots, len(kept), tc.slots)
			}
			want := threadOverhead + int64(len("t")) + int64(tc.slots-len(kept))*recordSize
			for i := range kept {
				want += recordBytes(&kept[i])
			}
			if tt.bytes != want || c.bytes != want {
				t.Fatalf("tail counts %d bytes, the cache %d; want %d", tt.bytes, c.bytes, want)
			}
			if shares := &tt.recs[0] == &caller[tc.len-len(kept)]; shares != tc.sharesCallers {
				t.Fatalf("tail shares the caller's array: %v, want %v", shares, tc.sharesCallers)
			}
			first := kept[0].Seq
			if got, err := c.window(context.Background(), "t", first, uint64(tc.len), tc.n, nil); err != nil || len(got) != len(kept) || got[0].Seq != first {
				t.Fatalf("window after keep: %d records, %v", len(got), err)
			}
		})
	}
}

// The messages submits appended, kept for their runs, count their
// bookkeeping too: a quarter of the budget full of them is about a
// quarter of the budget on the heap. (Counted as records alone, 16 MiB of
// them took 30 MB.)
func TestTailCacheCountsWhatActivationsHold(t *testing.T) {
	c := newTailCache(16 << 20)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range 50000 {
		thread := fmt.Sprintf("t%06d", i)
		c.submitted(thread, []MessageRecord{{MessageID: fmt.Sprintf("019ad1c0-%027d", i), ThreadID: thread, Seq: 1,
			Message: Message{Role: RoleUser, Content: []byte(`"queued work 123456"`)}}})
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if c.activationsBytes > c.budget/4 || c.activationsBytes < c.budget/5 {
		t.Fatalf("activations count %d bytes; want the quarter of the budget, %d", c.activationsBytes, c.budget/4)
	}
	// 1.30–1.35 × (allocation size classes); 1.84 × with no bookkeeping
	// counted.
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); float64(grew) > 1.5*float64(c.activationsBytes) {
		t.Fatalf("the heap grew by %d KB for activations that count %d KB", grew>>10, c.activationsBytes>>10)
	}
	runtime.KeepAlive(c)
}

// Messages a submit appended are found by id until the run they activate
// reads them, whatever the thread's cached window holds (a backlog makes
// them older than it); each is forgotten as it is found, and the oldest
// go first beyond a quarter of the budget.
func TestTailCacheKeepsSubmittedMessagesUntilRead(t *testing.T) {
	recs, _, _ := logOf(40)
	per := recordBytes(&recs[19]) + activationOverhead + 1 // the largest of those used, and its bookkeeping
	c := newTailCache(4 * 10 * per)                        // room for 10 activations
	c.submitted("t", recs[:5])
	c.submitted("other", []MessageRecord{{MessageID: "m1", ThreadID: "other", Seq: 1}})
	for _, id := range []string{"m3", "m1"} {
		rec, ok := c.find("t", id)
		if !ok || rec.MessageID != id || rec.ThreadID != "t" {
			t.Fatalf("find(t, %s) = %+v %v", id, rec, ok)
		}
		if _, ok := c.find("t", id); ok {
			t.Fatalf("find(t, %s) again: found, want forgotten once read", id)
		}
	}
	if rec, ok := c.find("other", "m1"); !ok || rec.ThreadID != "other" {
		t.Fatalf("find(other, m1) = %+v %v: activations are per thread", rec, ok)
	}
	// 3 of t left; 10 more push the oldest out.
	c.submitted("t", recs[10:20])
	if c.activationsBytes > c.budget/4 {
		t.Fatalf("activations hold %d bytes, budget %d", c.activationsBytes, c.budget/4)
	}
	for _, id := range []string{"m2", "m4", "m5"} {
		if _, ok := c.find("t", id); ok {
			t.Fatalf("find(t, %s): the oldest should have been dropped", id)
		}
	}
	for _, r := range recs[10:20] {
		if _, ok := c.find("t", r.MessageID); !ok {
			t.Fatalf("find(t, %s): newest dropped", r.MessageID)
		}
	}
	if len(c.activations) != 0 || c.activationOrder.Len() != 0 || c.activationsBytes != 0 {
		t.Fatalf("after reading all: %d entries, %d in order, %d bytes", len(c.activations), c.activationOrder.Len(), c.activationsBytes)
	}
	var nilCache *tailCache
	nilCache.submitted("t", recs[:1])
	if _, ok := nilCache.find("t", "m1"); ok {
		t.Fatal("a nil cache found something")
	}
}

// The first records of a new log start its cached tail: the first run of
// a new thread reads none of its messages from the store; records of an
// uncached thread that do not start at seq 1 are not cached.
func TestTailCacheStartsANewLogsTail(t *testing.T) {
	recs, asked, load := logOf(3)
	c := newTailCache(1 << 20)
	c.appended("t", recs[:2], 10)
	c.appended("u", recs[1:3], 10) // seq 2 on: not the whole log of u
	got, err := c.window(context.Background(), "t", 1, 2, 10, load)
	if err != nil || len(got) != 2 || got[0].Seq != 1 || got[1].Seq != 2 || len(*asked) != 0 {
		t.Fatalf("window of the new log: %d records %v, store asked %v", len(got), err, *asked)
	}
	if _, ok := c.threads["u"]; ok {
		t.Fatal("a log's later records started a tail")
	}
}
