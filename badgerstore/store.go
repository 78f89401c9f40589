package badgerstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Options configures a Store. The zero value of every field means its
// default.
type Options struct {
	// Dir is the data directory (created if absent). Required unless
	// InMemory.
	Dir string
	// InMemory keeps everything in memory (tests); nothing is durable.
	InMemory bool
	// NoSync turns fsync-before-acknowledge off. Risk: on power loss or a
	// kernel crash the last acknowledged operations may be lost; a crash
	// of the process alone loses nothing (the writes are in the page
	// cache). Default false: every acknowledged operation is fsynced.
	NoSync bool
	// Logger receives the store's and Badger's logs. Default: discard.
	Logger *slog.Logger
	// MemTableSize is the size of one memtable in bytes (default 16 MiB;
	// Badger's own default is 64 MiB). One transaction may hold at most
	// 15% of it (2.4 MiB by default), and at most 15% of it / 96 entries
	// (26 214), which bounds the largest single operation: an interrupt
	// of a thread with more than roughly 2 000–3 000 queued dispatches
	// fails with engine.ErrTooLarge, and so does a submit of more than
	// about 13 000 messages (CheckSubmitSize).
	MemTableSize int64
	// NumMemtables bounds the memtables kept in memory (default 2).
	NumMemtables int
	// BlockCacheSize is the block cache in bytes (default 16 MiB).
	BlockCacheSize int64
	// IndexCacheSize bounds the memory of table indexes and bloom filters
	// in bytes (default 16 MiB; Badger's default keeps all of them in
	// memory, which grows with the data).
	IndexCacheSize int64
	// ValueLogFileSize is the size of one value-log file (default 64 MiB,
	// less with a memtable under 4 MiB). Value-log GC rewrites a file only
	// while the memtable has room for 1 KiB per value the file can hold
	// (size/ValueThreshold + 1) with half of it still free (durable.go):
	// with more values per file than MemTableSize/2048 it never runs, and
	// warns.
	ValueLogFileSize int64
	// ValueThreshold: values of at least this many bytes go to the value
	// log (default 64 KiB); smaller ones live in the LSM tree. A data
	// directory refuses a threshold above the smallest it was opened with
	// (engine.ErrValidation; see durable.go).
	ValueThreshold int64
	// GCInterval is how often the value log is garbage-collected (default
	// 5m; negative disables).
	GCInterval time.Duration
	// GCDiscardRatio is the share of garbage a value-log file must hold to
	// be rewritten (default 0.5).
	GCDiscardRatio float64
	// RecordCacheBytes bounds the cache of recently written or read
	// records (dispatches, runs, thread states and projections) that
	// spares reads a lookup in the LSM tree (default 32 MiB).
	RecordCacheBytes int64
	// MinFreeBytes is the free space the data directory's file system must
	// keep; below it every write fails with engine.ErrUnavailable ("disk
	// full") instead of reaching Badger, whose memory-mapped files would
	// fault on a full disk. Default 2×MemTableSize + 16 MiB; negative
	// disables the check.
	MinFreeBytes int64

	compactL0OnClose bool                    // tests: leave a compacted tree behind on Close
	syncedHook       func(name string) error // tests: told every log file about to be synced; an error fails it
}

func (o *Options) validate() error {
	if !o.InMemory && strings.TrimSpace(o.Dir) == "" {
		return engine.Validationf("badgerstore: Dir is required unless InMemory")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	def := func(v *int64, d int64) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.MemTableSize, 16<<20)
	def(&o.BlockCacheSize, 16<<20)
	def(&o.IndexCacheSize, 16<<20)
	def(&o.ValueThreshold, 64<<10)
	// Small memtables get smaller files, so that value-log GC can run.
	def(&o.ValueLogFileSize, max(1<<20, min(64<<20, (o.MemTableSize/4/gcEntryBytes-2)*o.ValueThreshold)))
	def(&o.RecordCacheBytes, 32<<20)
	if o.NumMemtables <= 0 {
		o.NumMemtables = 2
	}
	if o.GCInterval == 0 {
		o.GCInterval = 5 * time.Minute
	}
	if o.GCDiscardRatio <= 0 || o.GCDiscardRatio >= 1 {
		o.GCDiscardRatio = 0.5
	}
	if o.MinFreeBytes == 0 {
		o.MinFreeBytes = 2*o.MemTableSize + 16<<20
	}
	if o.ValueThreshold > o.MemTableSize*15/100 {
		return engine.Validationf("badgerstore: ValueThreshold %d exceeds 15%% of MemTableSize %d", o.ValueThreshold, o.MemTableSize)
	}
	return nil
}

func (o *Options) badger() badger.Options {
	bo := badger.DefaultOptions(o.Dir)
	if o.InMemory {
		bo = badger.DefaultOptions("").WithInMemory(true)
	}
	// Every table 2 MiB at every level (Badger doubles it per level by
	// default, up to 64 MiB): a compaction builds many tables at once and
	// holds each in memory until it is written, so small tables keep a
	// compaction burst from costing hundreds of MiB.
	bo.TableSizeMultiplier = 1
	return bo.
		WithCompactL0OnClose(o.compactL0OnClose).
		WithSyncWrites(false).      // the store syncs what a batch wrote itself (durable.go)
		WithDetectConflicts(false). // one writer goroutine: no write-write conflicts
		// A value read from the value log is checked against its
		// checksum: one that went bad on the disk reads as empty, which
		// no record decodes (engine.ErrCorrupt), rather than as other
		// bytes that might.
		WithVerifyValueChecksum(true).
		WithMemTableSize(o.MemTableSize).
		WithNumMemtables(o.NumMemtables).
		WithNumLevelZeroTables(4).
		WithNumLevelZeroTablesStall(12).
		WithBlockCacheSize(o.BlockCacheSize).
		WithIndexCacheSize(o.IndexCacheSize).
		WithValueLogFileSize(o.ValueLogFileSize).
		WithValueThreshold(o.ValueThreshold).
		WithBaseTableSize(2 << 20).
		WithNumCompactors(2).
		WithNumGoroutines(2).
		WithMetricsEnabled(false).
		// "subsystem", not a second "component": the store's logger has
		// one already, and a JSON line with a key twice is dropped or
		// refused by log pipelines (found by review).
		WithLogger(slogAdapter{o.Logger.With("subsystem", "badger")})
}

// Store is the Badger implementation of engine.Store. It is safe for
// concurrent use.
type Store struct {
	db   *badger.DB
	opts Options
	log  *slog.Logger

	ops        chan *op
	gcReqs     chan *gcRequest  // value-log GC, run by the writer
	gcHold     *badger.Iterator // kept open after a failed GC sync, never closed (see collectValueLog)
	gcUnfit    sync.Once        // warns once that value-log GC cannot run with these options
	vlogs      *vlogCheck       // value-log files read whole before GC may run (vlogcheck.go); nil InMemory
	writerDone chan struct{}
	gcStop     chan struct{}
	gcDone     chan struct{}

	closeMu   sync.RWMutex // guards closed and the send side of ops
	closed    bool
	closeOnce sync.Once
	closeErr  error

	batches    atomic.Uint64
	batchedOps atomic.Uint64
	metrics    storeMetrics
	// opSince and commitSince are the Unix ns since which the writer has
	// been running one operation, and since which a batch has been with
	// Badger (0: none), for Stalled.
	opSince, commitSince atomic.Int64

	orphans orphans // the claims held when the store was opened (orphans.go)

	dur   *durability // syncs Badger's logs (durable.go); nil InMemory
	space spaceGuard  // used by the writer goroutine only
	reads snapshots   // the shared read snapshot (snapshot.go)

	// testBeforeGCMark, set only by tests, runs after a value-log GC's
	// moves were written and synced and before their marker (to copy the
	// data directory as a power loss before the sync leaves it).
	testBeforeGCMark func()
	// testBeforeValueLogCheck, set only by tests, runs before Verify
	// reads each value-log file.
	testBeforeValueLogCheck func()

	// testCommit, set only by tests, replaces txn.CommitWith (to delay or
	// fail a commit).
	testCommit func(txn *badger.Txn) func(cb func(error))
	// testWriteSetMade, when set, is called for every write set the
	// writer makes instead of reusing one.
	testWriteSetMade func()
}

var _ engine.Store = (*Store)(nil)

// Open opens (or creates) the store. A data directory held by another
// process is engine.ErrDataDirInUse.
func Open(opts Options) (*Store, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if !opts.InMemory {
		// Before anything is written: a directory Badger would take for
		// a new store, or whose table would crash its open (opencheck.go).
		if err := CheckManifest(opts.Dir); err != nil {
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, err)
		}
		if err := checkTables(opts.Dir, opts.badger()); err != nil {
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, err)
		}
		if err := os.MkdirAll(opts.Dir, 0o750); err != nil {
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, unavailable(err))
		}
	}
	cut := int64(-1) // where Open's repair cut the newest memtable log (repair.go)
	rewrote := false // whether Open wrote the logs out again after a failed sync (syncfailed.go)
	var err error
	if !opts.InMemory {
		// Badger writes a new memtable's log through a memory map: on a
		// full file system that write is SIGBUS, not an error, and the
		// process crashed at every start (found by review).
		var g spaceGuard
		if err := g.check(opts); err != nil {
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, err)
		}
	}
	if !opts.InMemory {
		// A process whose log sync failed left pages the kernel marked
		// clean without writing them: written again first, they are dirty
		// for the sync below (syncfailed.go).
		if rewrote, err = rewriteAfterFailedSync(opts.Dir, opts.syncedHook, opts.Logger); err != nil {
			if errors.Is(err, engine.ErrDataDirInUse) {
				return nil, fmt.Errorf("open store %s: %w", opts.Dir, err)
			}
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, unavailable(err))
		}
		// What a crashed process wrote and did not sync is durable before
		// Badger reads it back: its Open flushes replayed memtables to
		// table files in the background, and their value pointers must not
		// become durable before the values (durable.go).
		if err := syncLogFiles(opts.Dir, opts.syncedHook); err != nil {
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, unavailable(openSyncFailed(opts.Dir, err)))
		}
		if cut, err = repairDanglingPointers(opts.Dir, opts.Logger); err != nil {
			if errors.Is(err, engine.ErrDataDirInUse) {
				return nil, fmt.Errorf("open store %s: %w", opts.Dir, err)
			}
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, unavailable(openSyncFailed(opts.Dir, err)))
		}
	}
	db, err := badger.Open(opts.badger())
	if err != nil {
		if strings.Contains(err.Error(), "Cannot acquire directory lock") {
			return nil, fmt.Errorf("open store %s: %w", opts.Dir, engine.ErrDataDirInUse)
		}
		return nil, fmt.Errorf("open store %s: %w", opts.Dir, unavailable(err))
	}
	if !opts.InMemory {
		// Before any migration: a later binary's directory is left as it is.
		if err := checkDataFormat(db); err != nil {
			return nil, closeAfter(db, fmt.Errorf("open store %s: %w", opts.Dir, err))
		}
	}
	migrated, err := migrateRunStatusIndex(db)
	if err != nil {
		return nil, closeAfter(db, fmt.Errorf("open store %s: %w", opts.Dir, unavailable(err)))
	}
	left, err := listOrphans(db, opts.Logger)
	if err != nil {
		return nil, closeAfter(db, fmt.Errorf("open store %s: %w", opts.Dir, err))
	}
	var dur *durability
	if !opts.InMemory {
		if err := checkValueThreshold(db, opts.ValueThreshold); err != nil {
			return nil, closeAfter(db, fmt.Errorf("open store %s: %w", opts.Dir, err))
		}
		fill := int64(2 * gcEntryBytes) // the writes of checkValueThreshold and checkDataFormat
		if migrated {
			fill = opts.MemTableSize // its writes: no value-log GC before the next memtable
		}
		if dur, err = openDurability(opts, fill, opts.syncedHook); err != nil {
			return nil, closeAfter(db, fmt.Errorf("open store %s: %w", opts.Dir, unavailable(openSyncFailed(opts.Dir, err))))
		}
	}
	s := &Store{
		orphans:    orphans{left: left},
		dur:        dur,
		db:         db,
		opts:       opts,
		log:        opts.Logger,
		ops:        make(chan *op, maxBatch),
		gcReqs:     make(chan *gcRequest),
		writerDone: make(chan struct{}),
		gcStop:     make(chan struct{}),
		gcDone:     make(chan struct{}),
	}
	s.metrics = newStoreMetrics()
	if cut >= 0 {
		s.metrics.logCuts.Inc()
	}
	if rewrote {
		s.metrics.logRewrites.Inc()
	}
	if !opts.InMemory {
		s.vlogs = newVlogCheck(opts.Dir, opts.Logger)
		s.metrics.set.NewGauge(`mailbox_store_value_log_corrupt_files`, func() float64 { return float64(s.vlogs.corrupt()) })
		// Free space as the writer's guard counts it (statfs at scrape
		// time; NaN when it fails): alert on it before MinFreeBytes.
		s.metrics.set.NewGauge(`mailbox_store_disk_free_bytes`, func() float64 {
			var st syscall.Statfs_t
			if syscall.Statfs(opts.Dir, &st) != nil {
				return math.NaN()
			}
			return float64(int64(st.Bavail) * int64(st.Bsize))
		})
		if opts.MinFreeBytes >= 0 { // a negative floor turns the guard off
			s.metrics.set.NewGauge(`mailbox_store_disk_min_free_bytes`, func() float64 { return float64(opts.MinFreeBytes) })
		}
	}
	s.reads.cache = newRecordCache(opts.RecordCacheBytes)
	s.reads.publish(db.NewTransaction(false), nil, math.MinInt64) // the floor starts at the bottom
	go s.writer()
	if opts.GCInterval > 0 && !opts.InMemory {
		go s.gcLoop(opts.GCInterval)
	} else {
		close(s.gcDone)
	}
	return s, nil
}

// DataFormat is the layout of the data directory this version reads and
// writes. The directory records it (key "ofv") and it is raised whenever a
// change makes the directory unreadable to earlier versions; Open refuses
// a directory of a later format (ErrFormatTooNew) rather than misread
// it. Format 2, the first recorded: binary run records of version 0x02
// and the index of waiting runs. Format 3: binary message records. A
// directory without the key was written by a version before the key came,
// of format 2 or earlier, and Open migrates it; one of format 2 needs no
// migration (its JSON messages still decode).
const DataFormat = 3

// ErrFormatTooNew reports a data directory written by a later version
// of the store (see DataFormat). It is not retryable: run that version,
// or a fresh directory.
var ErrFormatTooNew = errors.New("data directory written by a later version")

// dataFormatKey records the directory's DataFormat.
var dataFormatKey = []byte{pOption, 'f', 'v'}

// checkDataFormat refuses a directory of a later DataFormat and records
// this one's when the directory has none or an earlier one.
func checkDataFormat(db *badger.DB) error {
	return db.Update(func(txn *badger.Txn) error {
		was, ok, err := optionUint(txn, dataFormatKey)
		switch {
		case err != nil:
			return err
		case ok && was > DataFormat:
			return fmt.Errorf("%w: its format is %d, this version reads formats up to %d", ErrFormatTooNew, was, DataFormat)
		case ok && was == DataFormat:
			return nil
		}
		return txn.Set(dataFormatKey, binary.BigEndian.AppendUint64(nil, DataFormat))
	})
}

// optionUint reads an 8-byte option; ok is false when it is absent.
func optionUint(txn *badger.Txn, key []byte) (v uint64, ok bool, err error) {
	item, err := txn.Get(key)
	switch {
	case errors.Is(err, badger.ErrKeyNotFound):
		return 0, false, nil
	case err != nil:
		return 0, false, unavailable(err)
	}
	b, err := item.ValueCopy(nil)
	if err != nil {
		return 0, false, unavailable(err)
	}
	if len(b) != 8 {
		return 0, false, fmt.Errorf("option %q is %d bytes: %w", key, len(b), engine.ErrCorrupt)
	}
	return binary.BigEndian.Uint64(b), true, nil
}

// closeAfter closes a database Open gives up on and returns err, with
// the close's own failure joined to it: a Badger that cannot close cleanly
// (its memtable not flushed, a file not synced) is worth knowing about
// before the next start.
func closeAfter(db *badger.DB, err error) error {
	if cerr := db.Close(); cerr != nil {
		return errors.Join(err, fmt.Errorf("and closing it: %w", cerr))
	}
	return err
}

// checkValueThreshold refuses a ValueThreshold above the smallest the
// data directory was opened with, and records the new one when smaller.
// Raised, it would let value-log GC rewrite values between the two into
// the memtable, which then could fill up while GC runs (see durability).
func checkValueThreshold(db *badger.DB, threshold int64) error {
	key := []byte{pOption, 'v', 't'}
	return db.Update(func(txn *badger.Txn) error {
		v, ok, err := optionUint(txn, key)
		switch {
		case err != nil:
			return err
		case ok:
			was := int64(v)
			if threshold > was {
				return engine.Validationf("badgerstore: ValueThreshold %d is above %d, the smallest this data directory was opened with (value-log GC would rewrite the values between them into memtables)", threshold, was)
			}
			if threshold == was {
				return nil
			}
		}
		return txn.Set(key, binary.BigEndian.AppendUint64(nil, uint64(threshold)))
	})
}

// migrateRunStatusIndex replaces the index of runs by every status (S,
// written up to the seventh session) with the index of waiting runs (W):
// it writes a W key for each waiting run the old index lists, then drops
// the old index. A crash in between repeats it at the next Open (the W
// writes are idempotent); a data directory without S keys costs one seek.
func migrateRunStatusIndex(db *badger.DB) (migrated bool, err error) {
	var found bool
	var waiting [][]byte
	err = db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{pRunStatus}})
		defer it.Close()
		it.Rewind()
		found = it.Valid()
		prefix := runStatusPrefix(engine.RunWaiting)
		for it.Seek(prefix); it.ValidForPrefix(prefix); it.Next() {
			k := it.Item().Key()
			waiting = append(waiting, append([]byte{pRunWaiting}, k[len(prefix):]...))
		}
		return nil
	})
	if err != nil || !found {
		return false, err
	}
	for len(waiting) > 0 {
		n := min(len(waiting), 1000)
		if err := db.Update(func(txn *badger.Txn) error {
			for _, k := range waiting[:n] {
				if err := txn.Set(k, nil); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return true, fmt.Errorf("migrate run status index: %w", err)
		}
		waiting = waiting[n:]
	}
	if err := db.DropPrefix([]byte{pRunStatus}); err != nil {
		return true, fmt.Errorf("migrate run status index: drop: %w", err)
	}
	return true, nil
}

// Close stops the writer after the operations already handed to it,
// stops value-log GC and closes Badger. Safe to call twice and from
// several goroutines: every call returns once the store is closed.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closeMu.Lock()
		s.closed = true
		close(s.ops)
		s.closeMu.Unlock()
		<-s.writerDone
		close(s.gcStop)
		<-s.gcDone
		s.reads.publish(nil, nil, math.MaxInt64) // no reader is left: view holds closeMu
		if err := s.db.Close(); err != nil {
			s.closeErr = fmt.Errorf("close store: %w", unavailable(err))
		}
		if s.dur != nil {
			s.dur.close()
		}
	})
	return s.closeErr
}

// BatchStats reports how many group commits ran and how many operations
// they carried (ops/batches is the mean batch size).
func (s *Store) BatchStats() (batches, ops uint64) {
	return s.batches.Load(), s.batchedOps.Load()
}

// gcLoop runs Badger's value-log GC every interval until Close.
func (s *Store) gcLoop(every time.Duration) {
	defer close(s.gcDone)
	t := time.NewTicker(every)
	defer t.Stop()
	// The value-log files are read for damage soon after the start, not
	// first at the first GC: mailbox_store_value_log_corrupt_files read 0
	// for five minutes after a start on a damaged file (found by review).
	first := time.NewTimer(min(every, firstValueLogCheck))
	defer first.Stop()
	for {
		select {
		case <-s.gcStop:
			return
		case <-first.C:
			if s.vlogs != nil {
				s.vlogs.check(s.gcStop)
			}
		case <-t.C:
			s.RunValueLogGC()
		}
	}
}

// firstValueLogCheck is how long after the start the value-log files are
// first read for damage (past the start's recovery, which reads the
// store).
var firstValueLogCheck = 30 * time.Second

// gcRequest asks the writer for a value-log GC; it answers on done with
// the number of files rewritten.
type gcRequest struct{ done chan int }

// RunValueLogGC rewrites value-log files while at least GCDiscardRatio of
// one is garbage; it returns how many files it rewrote. It runs on the
// writer goroutine between two batches (see durability): commits wait
// for it, one file's rewrite at a time. First, on the caller's goroutine,
// it reads whole every value-log file not read yet; GC does not run while
// one has whole entries after a bad one (vlogcheck.go).
func (s *Store) RunValueLogGC() int {
	if s.vlogs != nil {
		s.vlogs.check(s.gcStop) // here, not on the writer goroutine: it reads whole files
	}
	req := &gcRequest{done: make(chan int, 1)}
	select {
	case s.gcReqs <- req:
		return <-req.done
	case <-s.writerDone:
		return 0
	}
}

// gcBudget bounds how long one value-log GC keeps the writer: it starts
// no file after this much time (a file under way is finished).
const gcBudget = 100 * time.Millisecond

// collectValueLog is RunValueLogGC on the writer goroutine, nothing in
// flight. Each file: only while the memtable has room for what its GC
// can write; with an iterator open, so that Badger keeps the rewritten
// file until every log file is synced. If that sync fails the iterator
// stays open until Close: the old file stays, and so does every later
// one (value-log space is not reclaimed until a restart; Close leaves
// the iterator and its transaction as they are).
func (s *Store) collectValueLog() int {
	n := 0
	start := time.Now()
	s.opSince.Store(start.UnixNano()) // Stalled sees a GC that does not end
	defer s.opSince.Store(0)
	for n < 16 && time.Since(start) < gcBudget && s.gcHold == nil {
		if s.vlogs != nil {
			if why := s.vlogs.blocked(); why != "" {
				s.log.Debug("value log gc not run", "why", why)
				break
			}
		}
		var bound int64
		if s.dur != nil {
			b, room, fits, err := s.dur.gcRoom()
			if err != nil {
				s.log.Error("value log gc: not run", "err", err)
				break
			}
			if !fits {
				s.gcUnfit.Do(func() {
					s.log.Warn("value log gc cannot run: a value-log file holds more values than half a memtable takes while GC rewrites them; raise MemTableSize or ValueThreshold or lower ValueLogFileSize", "bound_bytes", b, "memtable_bytes", s.opts.MemTableSize)
				})
				break
			}
			if !room {
				s.log.Debug("value log gc deferred: the memtable is too full", "bound_bytes", b)
				break
			}
			bound = b
		}
		hold := s.db.NewTransaction(false)
		it := hold.NewIterator(badger.IteratorOptions{Prefix: []byte{pDispatch}})
		err := s.db.RunValueLogGC(s.opts.GCDiscardRatio)
		if s.dur != nil && !errors.Is(err, badger.ErrRejected) {
			if serr := s.dur.afterGC(bound); serr != nil {
				s.metrics.gcFailed.Inc()
				s.log.Error("value log gc: sync failed: the rewritten file is kept until restart", "err", serr)
				s.gcHold = it
				break
			}
		}
		if err == nil && s.testBeforeGCMark != nil {
			s.testBeforeGCMark()
		}
		if err == nil && s.dur != nil {
			// A marker after the synced moves, synced too, before Badger
			// deletes the file they came from: the moves of a finished
			// GC are then never the last request of the memtable log,
			// which Open's repair checks and may cut (repair.go) — it
			// cuts moves only while their old copies still exist.
			if merr := s.markGCDone(); merr != nil {
				s.metrics.gcFailed.Inc()
				s.log.Error("value log gc: marking it done failed: the rewritten file is kept until restart", "err", merr)
				s.gcHold = it
				break
			}
		}
		it.Close() // Badger deletes the rewritten file now
		hold.Discard()
		if err != nil {
			if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) {
				s.metrics.gcFailed.Inc()
				s.log.Warn("value log gc failed", "err", err)
			}
			break
		}
		s.metrics.gcRewritten.Inc()
		n++
	}
	if n > 0 {
		s.log.Info("value log gc", "files_rewritten", n)
	}
	return n
}

// gcDoneKey is written, and synced, after each value-log GC's moves were
// synced and before the file they came from is deleted (see
// collectValueLog and repair.go).
var gcDoneKey = []byte{pOption, 'g', 'c'}

// markGCDone commits the GC marker (the time, Unix ns) and syncs the logs.
func (s *Store) markGCDone() error {
	if err := s.db.Update(func(txn *badger.Txn) error {
		return txn.Set(gcDoneKey, binary.BigEndian.AppendUint64(nil, uint64(time.Now().UnixNano())))
	}); err != nil {
		return err
	}
	return s.dur.afterGC(0)
}

// view runs fn in a read-only snapshot.
func (s *Store) view(ctx context.Context, fn func(r *reader) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closed {
		return fmt.Errorf("store closed: %w", engine.ErrUnavailable)
	}
	sn := s.reads.acquire()
	if sn == nil {
		return s.db.View(func(txn *badger.Txn) error { return fn(&reader{txn: txn}) })
	}
	defer s.reads.release(sn)
	return fn(&reader{txn: sn.txn, seq: sn.seq, cache: s.reads.cache})
}

// viewReady is view for ReadyThreads: fn gets the ready-index floor of its
// snapshot and returns the lowest due time it saw in the index
// (math.MaxInt64: none), which may raise the floor.
func (s *Store) viewReady(ctx context.Context, fn func(r *reader, floor int64) (int64, error)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closed {
		return fmt.Errorf("store closed: %w", engine.ErrUnavailable)
	}
	sn, floor, seq := s.reads.acquireReady()
	if sn == nil {
		return s.db.View(func(txn *badger.Txn) error {
			_, err := fn(&reader{txn: txn}, math.MinInt64)
			return err
		})
	}
	defer s.reads.release(sn)
	lowest, err := fn(&reader{txn: sn.txn, seq: sn.seq, cache: s.reads.cache}, floor)
	if err == nil {
		s.reads.raiseFloor(seq, lowest)
	}
	return err
}

// slogAdapter adapts slog to badger.Logger.
type slogAdapter struct{ l *slog.Logger }

func (a slogAdapter) Errorf(f string, v ...any) {
	a.l.Error(strings.TrimSpace(fmt.Sprintf(f, v...)))
}
func (a slogAdapter) Warningf(f string, v ...any) {
	a.l.Warn(strings.TrimSpace(fmt.Sprintf(f, v...)))
}
func (a slogAdapter) Infof(f string, v ...any) {
	a.l.Debug(strings.TrimSpace(fmt.Sprintf(f, v...))) // Badger's info is chatty: keep it at debug
}
func (a slogAdapter) Debugf(f string, v ...any) {
	if a.l.Enabled(context.Background(), slog.LevelDebug-4) {
		a.l.Log(context.Background(), slog.LevelDebug-4, strings.TrimSpace(fmt.Sprintf(f, v...)))
	}
}

// Writable reports whether the store takes writes now: nil, or why not
// (closed, a log sync failed and only a reopen clears it, or the data
// directory's file system below MinFreeBytes). It costs one statfs;
// readiness probes call it.
func (s *Store) Writable() error {
	s.closeMu.RLock()
	closed := s.closed
	s.closeMu.RUnlock()
	if closed {
		return fmt.Errorf("store closed: %w", engine.ErrUnavailable)
	}
	if err := s.broken(); err != nil {
		// Every write is refused until a reopen (found by review: the
		// readiness probe said writable while every write failed).
		return err
	}
	var g spaceGuard
	return g.check(s.opts)
}

// Closable reports whether Close can flush Badger's memtables to tables
// now: nil, or why not. After a failed log sync the flush fails and
// Badger retries it for ever (a SIGTERM never ended); on a file system
// below MinFreeBytes Badger's table writes through memory maps are SIGBUS
// (found by review). A process that exits without Close loses nothing it
// acknowledged: that is in the synced logs, which the next Open replays.
func (s *Store) Closable() error {
	if err := s.broken(); err != nil {
		return err
	}
	var g spaceGuard
	return g.check(s.opts)
}

// broken is the log-sync failure that stopped the store's writes, or nil.
func (s *Store) broken() error {
	if s.dur == nil {
		return nil
	}
	return s.dur.broken()
}

// Stalled implements engine.StallReporter: an error when one operation
// has been running in the writer, or one batch has been with Badger
// (written and synced), for longer than limit at now — a hung disk or an
// operation that never returns, after which nothing is written again —
// and at once when a log sync has failed (durability.failed): only a
// reopen clears that.
func (s *Store) Stalled(now time.Time, limit time.Duration) error {
	if err := s.broken(); err != nil {
		return err
	}
	for _, w := range []struct {
		what  string
		since int64
	}{{"an operation (or value-log GC) has been running in the writer", s.opSince.Load()}, {"a commit has been in flight", s.commitSince.Load()}} {
		if w.since == 0 {
			continue
		}
		if d := now.Sub(time.Unix(0, w.since)); d > limit {
			return fmt.Errorf("%s for %v (limit %v)", w.what, d.Round(time.Millisecond), limit)
		}
	}
	return nil
}
