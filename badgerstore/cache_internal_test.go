package badgerstore

import (
	"context"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

func openCacheTest(t *testing.T, cacheBytes int64) *Store {
	t.Helper()
	s, err := Open(Options{InMemory: true, RecordCacheBytes: cacheBytes})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func runAt(id, thread string, status engine.RunStatus, updated int64) engine.RunRecord {
	return engine.RunRecord{RunID: id, ThreadID: thread, AgentID: "a", Status: status, CreatedAt: 1, UpdatedAt: updated}
}

// upsertRun writes r through a checkpoint without messages.
func upsertRun(t *testing.T, s *Store, r engine.RunRecord) {
	t.Helper()
	ctx := context.Background()
	n, err := s.MessageCount(ctx, r.ThreadID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: r.ThreadID, ExpectedCount: n, Run: &r}); err != nil {
		t.Fatal(err)
	}
}

// A reader keeps seeing its own snapshot although the cache already holds
// a newer commit's value of the key it reads.
func TestRecordCacheServesEachReaderItsSnapshot(t *testing.T) {
	s := openCacheTest(t, 0)
	ctx := context.Background()
	upsertRun(t, s, runAt("r1", "t1", engine.RunCreated, 10))
	if _, err := s.LoadRun(ctx, "r1"); err != nil { // cached
		t.Fatal(err)
	}
	err := s.view(ctx, func(r *reader) error {
		upsertRun(t, s, runAt("r1", "t1", engine.RunRunning, 20)) // commits while the reader holds its snapshot
		if v, ok := s.reads.cache.getLatest(runKey("r1")); !ok || len(v) == 0 {
			t.Fatal("the commit did not enter the cache")
		}
		old, err := loadRunTxn(r, "r1")
		if err != nil {
			return err
		}
		if old.Status != engine.RunCreated {
			t.Errorf("reader of the older snapshot saw %s, want created", old.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if now, err := s.LoadRun(ctx, "r1"); err != nil || now.Status != engine.RunRunning {
		t.Fatalf("a new reader saw %+v, %v; want running", now, err)
	}
}

// A reader that misses fills the cache only while no later commit has
// been applied: its older value must not settle over a newer one that
// was evicted in between.
func TestRecordCacheRefusesStaleFill(t *testing.T) {
	s := openCacheTest(t, 1) // every entry is evicted at once
	ctx := context.Background()
	upsertRun(t, s, runAt("r1", "t1", engine.RunCreated, 10))
	s.reads.cache.limit = 1 << 20 // from here on entries stay
	s.reads.cache.clear()
	err := s.view(ctx, func(r *reader) error {
		upsertRun(t, s, runAt("r1", "t1", engine.RunRunning, 20))
		s.reads.cache.clear() // the newer value was evicted
		old, err := loadRunTxn(r, "r1")
		if err != nil {
			return err
		}
		if old.Status != engine.RunCreated {
			t.Errorf("old reader saw %s", old.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if now, err := s.LoadRun(ctx, "r1"); err != nil || now.Status != engine.RunRunning {
		t.Fatalf("after a stale reader's miss a new reader saw %+v, %v; want running", now, err)
	}
}

// The cached latest run of a thread follows commits: a newer run raises
// it, an update moves it, and an update whose clock went back (its key
// moves below another run's) makes it unknown, so the next read scans.
func TestRecordCacheLatestRun(t *testing.T) {
	s := openCacheTest(t, 0)
	ctx := context.Background()
	latest := func(want string) {
		t.Helper()
		r, err := s.LatestRun(ctx, "t1")
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		if r != nil {
			got = r.RunID
		}
		if got != want {
			t.Fatalf("latest run %q, want %q", got, want)
		}
	}
	latest("") // caches "no run"
	upsertRun(t, s, runAt("a", "t1", engine.RunCreated, 100))
	latest("a")
	upsertRun(t, s, runAt("b", "t1", engine.RunCreated, 200))
	latest("b")
	upsertRun(t, s, runAt("a", "t1", engine.RunRunning, 300))
	latest("a")
	upsertRun(t, s, runAt("a", "t1", engine.RunDone, 50)) // the clock went back
	latest("b")
	if _, ok := s.reads.cache.getLatest(threadPrefix(pRunLatest, "t1")); !ok {
		t.Fatal("the scan did not fill the entry again")
	}
	upsertRun(t, s, runAt("c", "t2", engine.RunCreated, 999)) // another thread
	latest("b")
}

// A latest-run entry that commits keep making unknown (a clock going
// back) and reads keep filling again does not pile up in the insertion
// queue while the cache is under budget.
func TestRecordCacheQueueStaysBounded(t *testing.T) {
	c := newRecordCache(1 << 20)
	r := runAt("a", "t1", engine.RunCreated, 300)
	latest := runLatestKey(&r)
	p := threadPrefix(pRunLatest, "t1")
	for range 3000 {
		c.fillLatestRun(p, latest, c.seq) // a reader's scan found a
		ws := newWriteSet()
		ws.put(kvWrite{k: string(latest), del: true}) // a commit moved it below another run
		c.apply(ws, c.seq+1)
		if _, ok := c.getLatest(p); ok {
			t.Fatal("the entry survived the deletion of the key it names")
		}
	}
	if queued := len(c.fifo) - c.head; queued > 2*len(c.m)+1024 {
		t.Fatalf("%d keys queued for %d cached", queued, len(c.m))
	}
}

// The cache stays within its budget, dropping the oldest entries first.
func TestRecordCacheBudget(t *testing.T) {
	c := newRecordCache(10 * (entryOverhead + 8))
	c.seq = 1
	for i := range 100 {
		k := []byte{pRun, byte('a' + i%26), byte(i)}
		c.fillAt(k, []byte("12345"), 1)
	}
	if c.bytes > c.limit {
		t.Fatalf("%d bytes cached, limit %d", c.bytes, c.limit)
	}
	if n := c.len(); n < 5 || n > 10 {
		t.Fatalf("%d entries", n)
	}
	if _, ok := c.getAt([]byte{pRun, 'a' + 99%26, 99}, 1); !ok {
		t.Fatal("the newest entry was evicted")
	}
	if _, ok := c.getAt([]byte{pRun, 'a', 0}, 1); ok {
		t.Fatal("the oldest entry is still there")
	}
}

// After a failed commit nothing enters the cache until the next commit is
// applied, which starts from an empty cache: values read around a commit
// Badger may have applied in part are not kept.
func TestRecordCacheVoidAfterFailedCommit(t *testing.T) {
	c := newRecordCache(1 << 20)
	k := []byte{pRun, 'x'}
	c.seq = 5
	c.fillAt(k, []byte("old"), 5)
	c.voidUntilNextCommit()
	if _, ok := c.getLatest(k); ok {
		t.Fatal("an entry survived the failed commit")
	}
	c.fillAt(k, []byte("old"), 5)
	c.fillLatest(k, []byte("old"))
	if n := c.len(); n != 0 {
		t.Fatalf("%d entries filled while void", n)
	}
	ws := newWriteSet()
	ws.put(kvWrite{k: string([]byte{pRun, 'y'}), v: []byte("new")})
	c.apply(ws, 6)
	if v, ok := c.getAt([]byte{pRun, 'y'}, 6); !ok || string(v) != "new" {
		t.Fatalf("the next commit's write: %q %v", v, ok)
	}
	c.fillAt(k, []byte("fresh"), 6)
	if v, ok := c.getAt(k, 6); !ok || string(v) != "fresh" {
		t.Fatalf("fill after the next commit: %q %v", v, ok)
	}
}
