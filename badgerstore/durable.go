package badgerstore

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
)

// Durability without Badger's SyncWrites.
//
// With SyncWrites Badger makes every write batch durable with two syncs:
// the value log's current file (even when the batch wrote nothing to it,
// which is the common case here: values under ValueThreshold live in the
// LSM tree) and then the current memtable's write-ahead log. Each sync is
// a cache flush of the device, and under load the first one costs a fifth
// of a group commit. So the store opens Badger with SyncWrites off and
// syncs what a batch actually wrote itself, after Badger has applied it
// and before anyone is answered or the batch's snapshot is published:
//
//   - always the current memtable log (*.mem);
//   - before it, the value-log file (*.vlog), when the batch carried a
//     value large enough to go there (the order Badger keeps: a durable
//     pointer never points at a value that is not).
//
// Badger names both kinds of file by a number that grows by one for each
// new file, so following the newest by number (logTail) finds every file
// a batch can have written: when a file numbered one more exists, the
// followed one is synced a last time, the new one is followed and synced,
// and so is the directory (Badger creates its log files at full size, and
// its mmap helper syncs the directory only for empty files). A batch is
// one Badger request, which Badger writes into a single memtable (it
// starts a new one only before a request), and the next batch is sent
// only once this one is durable: no memtable holding a batch can be
// flushed before the batch's own sync.
//
// A failed sync is final: the kernel may have dropped the pages it could
// not write (a later sync would then succeed) and Badger has applied the
// batch, so going on could make durable a pointer to a value that never
// reached the disk. No later batch reaches Badger (each is refused before
// its commit) and no GC runs until the store is reopened, and Stalled
// reports it without waiting for a sync under way (a liveness probe
// restarts the process). Close still lets Badger flush its memtables
// (Badger has no close without it): a table written then may point at a
// value the failed sync lost.
//
// Value-log GC rewrites the live values of a value-log file through
// Badger's own write path, which no longer syncs them, and then deletes
// the file. So GC runs on the writer goroutine with no batch in flight
// (no commit syncs a memtable log holding GC's value pointers before the
// values), only while the current memtable has room for all GC can write
// (a memtable that fills up is flushed to a table file, synced, which
// would make the pointers durable first), holds an iterator open while it
// runs (Badger defers deleting value-log files while one is), and syncs
// every log file, then commits and syncs a marker, before it lets go of
// the iterator (Store.RunValueLogGC; the marker: repair.go).
// What GC can write is bounded because every value in a value-log file is
// at least ValueThreshold bytes (Open refuses a raised threshold): a file
// of n bytes holds at most n/ValueThreshold + 1 values. With NoSync GC
// syncs all the same; commits do not.
//
// Open syncs every log file and the directory before Badger's Open (what
// a crashed process left unsynced in the page cache is durable before
// Badger reads it back and, in the background, flushes the replayed
// memtables to table files) and once more after it (the files Badger's
// Open created).

const (
	memExt  = ".mem"
	vlogExt = ".vlog"

	// gcEntryBytes bounds what one entry a value-log GC rewrites adds to
	// a memtable: its key (ids are at most engine.MaxIDLen bytes, a key
	// holds two), version, value pointer and skiplist node.
	gcEntryBytes = 1 << 10
	// writeOverhead is added to each write's key and value in the
	// estimate of a memtable's fill: version, skiplist node, log header.
	writeOverhead = 200
	// valuePointerBytes is what a value that goes to the value log leaves
	// in the memtable.
	valuePointerBytes = 12
)

// durability syncs Badger's log files for the store (InMemory: none).
// Safe for concurrent use.
type durability struct {
	dir      string
	syncEach bool // sync after every commit (false with NoSync: only value-log GC syncs)

	memTableSize   int64
	valueThreshold int64

	mu sync.Mutex
	// failed is the first sync that failed: every later commit and GC
	// fails with it until the store is reopened. After a failed fsync the
	// kernel may have dropped the pages it could not write and a later
	// fsync report success, and Badger has applied the batch: going on
	// could make durable a pointer to a value that never reached the disk.
	failed atomic.Pointer[error] // set under mu, read without it (Stalled must not wait on a sync)
	mem    logTail
	vlog   logTail
	// memFill estimates the bytes in the current memtable: the batches
	// written since its log file appeared, plus GC's bound per file it
	// rewrote (the memtable size when unknown).
	memFill int64

	// synced, set only by tests, is told the name of every file about to
	// be synced ("." for the directory); an error fails the sync (fault
	// injection).
	synced func(name string) error
}

// logTail follows the newest of a numbered series of files (Badger's
// memtable logs or value-log files) and syncs it.
type logTail struct {
	dir  string
	ext  string
	fid  int      // the number of f; -1 before any file exists
	f    *os.File // nil before any file exists
	fd   int      // f's descriptor
	next string   // the name of file number fid+1
}

// batchReach is what a committed batch wrote, as far as Badger's logs go.
type batchReach struct {
	values bool  // a value large enough for the value log
	bytes  int64 // its estimated share of a memtable
	disk   int64 // what it writes to the logs, values in full
}

// openDurability syncs every log file and the directory, and starts
// following the newest memtable log and value-log file. fill is what the
// current memtable may already hold (Open's own writes).
func openDurability(o Options, fill int64, synced func(string) error) (*durability, error) {
	d := &durability{
		dir:            o.Dir,
		syncEach:       !o.NoSync,
		memTableSize:   o.MemTableSize,
		valueThreshold: o.ValueThreshold,
		mem:            logTail{dir: o.Dir, ext: memExt, fid: -1},
		vlog:           logTail{dir: o.Dir, ext: vlogExt, fid: -1},
		memFill:        fill,
		synced:         synced,
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.syncAll(true); err != nil {
		d.closeLocked()
		return nil, err
	}
	return d, nil
}

// afterCommit makes a batch Badger has just applied durable (with
// syncEach): the value log first when the batch reached it, then the
// memtable log. It also keeps the estimate of the current memtable's
// fill.
func (d *durability) afterCommit(r batchReach) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.broken(); err != nil {
		return err
	}
	return d.fail(d.commitLocked(r))
}

func (d *durability) commitLocked(r batchReach) error {
	if r.values && d.syncEach {
		if err := d.syncTail(&d.vlog); err != nil {
			return err
		}
	}
	fid := d.mem.fid
	if err := d.syncTail(&d.mem); err != nil {
		return err
	}
	if d.mem.fid != fid {
		// Badger starts a memtable before it applies a batch: this one
		// is the new memtable's first.
		d.memFill = 0
	}
	d.memFill += r.bytes
	return nil
}

// syncTail syncs t (without syncEach: only follows it) and, when it moved
// on to a newer file, the directory: Badger does not sync it when it
// creates a log file (it opens them at their full size, and its mmap
// helper syncs the directory only for empty files).
func (d *durability) syncTail(t *logTail) error {
	moved, err := t.sync(d.syncEach, d.synced)
	if err != nil || !moved || !d.syncEach {
		return err
	}
	return d.syncDir()
}

// fail records err, when not nil, as the store's sync failure.
func (d *durability) fail(err error) error {
	if err != nil && d.failed.Load() == nil {
		// The next Open writes the logs out again (syncfailed.go).
		if merr := markSyncFailed(d.dir, d.vlog.fid, err); merr != nil {
			err = fmt.Errorf("%w (the store must be reopened: a log sync failed; %v)", err, merr)
		} else {
			err = fmt.Errorf("%w (the store must be reopened: a log sync failed)", err)
		}
		d.failed.Store(&err)
	}
	return err
}

// broken returns the sync failure that stopped the store, or nil. It
// does not wait for a sync under way.
func (d *durability) broken() error {
	if p := d.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// syncLogFiles syncs every log file in dir and dir itself, following
// nothing (Open, before Badger's).
func syncLogFiles(dir string, synced func(string) error) error {
	d := &durability{dir: dir, mem: logTail{dir: dir, ext: memExt, fid: -1}, vlog: logTail{dir: dir, ext: vlogExt, fid: -1}, synced: synced}
	defer d.closeLocked()
	return d.syncAll(true)
}

// gcRoom reports whether the current memtable has room for the GC of any
// one value-log file with half of it still free, and what that GC can add
// to it at most (bound): a full memtable is flushed to a table file,
// synced, and a flush during GC could make value pointers durable before
// the rewritten values they point to are. Every entry of a value-log file
// holds a value of at least ValueThreshold bytes (Open refuses a raised
// threshold), so a file of n bytes has at most n/ValueThreshold + 1 of
// them, each adding at most gcEntryBytes. fits is false when even an
// empty memtable has no room: GC cannot run with these options.
func (d *durability) gcRoom() (bound int64, room, fits bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.broken(); err != nil {
		return 0, false, true, err
	}
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return 0, false, true, fmt.Errorf("value log gc: %w", err)
	}
	// GC never takes the file being written, the newest (the followed
	// one may lag: with NoSync commits do not follow the value log).
	newest := -1
	for _, e := range entries {
		if fid, ok := logFid(e.Name(), vlogExt); ok {
			newest = max(newest, fid)
		}
	}
	for _, e := range entries {
		fid, ok := logFid(e.Name(), vlogExt)
		if !ok || fid == newest {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // collected meanwhile
		}
		bound = max(bound, (info.Size()/d.valueThreshold+1)*gcEntryBytes)
	}
	half := d.memTableSize / 2
	return bound, d.memFill+bound <= half, bound <= half, nil
}

// afterGC syncs every log file GC may have written (always, with NoSync
// too: GC deletes the file it rewrote once this returns) and counts what
// it added to the memtable (at most bound).
func (d *durability) afterGC(bound int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.broken(); err != nil {
		return err
	}
	fid := d.mem.fid
	if err := d.fail(d.syncAll(true)); err != nil {
		return err
	}
	if d.mem.fid != fid {
		d.memFill = 0
	}
	d.memFill += bound
	return nil
}

// syncAll syncs (when sync) every value-log file and then every memtable
// log from the one followed on, then the directory, and follows the
// newest of each. At Open nothing is followed yet: every file.
func (d *durability) syncAll(sync bool) error {
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return fmt.Errorf("sync logs: %w", err)
	}
	// Value-log files before memtable logs, as Badger orders them; each
	// in the order of their numbers (not of their names: 100000.mem
	// comes after 99999.mem).
	for _, t := range []*logTail{&d.vlog, &d.mem} {
		var fids []int
		for _, e := range entries {
			if fid, ok := logFid(e.Name(), t.ext); ok && (fid > t.fid || (fid == t.fid && sync)) {
				fids = append(fids, fid)
			}
		}
		slices.Sort(fids)
		for _, fid := range fids {
			f, err := os.Open(t.path(fid))
			if errors.Is(err, fs.ErrNotExist) {
				continue // flushed (memtable) or collected (value log) meanwhile
			}
			if err != nil {
				return fmt.Errorf("sync logs: %w", err)
			}
			if sync {
				if err := fdatasync(f, int(f.Fd()), d.synced); err != nil {
					f.Close()
					return err
				}
			}
			if fid > t.fid {
				t.follow(fid, f)
			} else {
				f.Close()
			}
		}
	}
	if !sync {
		return nil
	}
	return d.syncDir()
}

// syncDir syncs the data directory (the names of new log files); the
// test hook sees it as ".".
func (d *durability) syncDir() error {
	if d.synced != nil {
		if err := d.synced("."); err != nil {
			return fmt.Errorf("sync logs: directory %s: %w", d.dir, err)
		}
	}
	if err := syncDir(d.dir); err != nil {
		return fmt.Errorf("sync logs: directory %s: %w", d.dir, err)
	}
	return nil
}

// close releases the followed files.
func (d *durability) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closeLocked()
}

func (d *durability) closeLocked() {
	d.mem.follow(-1, nil)
	d.vlog.follow(-1, nil)
}

// follow makes f (number fid) the followed file, closing the previous one.
func (t *logTail) follow(fid int, f *os.File) {
	if t.f != nil {
		t.f.Close()
	}
	t.fid, t.f = fid, f
	if f != nil {
		t.fd = int(f.Fd()) // a regular file: no poller, Fd changes nothing
		t.next = t.path(fid + 1)
	}
}

// sync syncs (when sync) the followed file; first, while a file numbered
// one more exists (Badger moved on to it), it syncs the followed file one
// last time and follows the next one. moved reports that it did.
func (t *logTail) sync(sync bool, hook func(string) error) (moved bool, err error) {
	if t.f == nil {
		return false, fmt.Errorf("sync %s: no %s file followed", t.dir, t.ext)
	}
	for {
		// Asked first without opening: the common answer is no, and a
		// failed open costs allocations on every commit.
		if err := syscall.Access(t.next, 0); err == syscall.ENOENT {
			break
		}
		next, err := os.Open(t.next)
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if err != nil {
			return moved, fmt.Errorf("sync logs: %w", err)
		}
		if sync {
			if err := t.fdatasync(hook); err != nil {
				next.Close()
				return moved, err
			}
		}
		t.follow(t.fid+1, next)
		moved = true
	}
	if !sync {
		return moved, nil
	}
	return moved, t.fdatasync(hook)
}

// fdatasync syncs the followed file.
func (t *logTail) fdatasync(hook func(string) error) error {
	return fdatasync(t.f, t.fd, hook)
}

// path is the name Badger gives file number fid of this series.
func (t *logTail) path(fid int) string {
	if t.ext == memExt {
		return filepath.Join(t.dir, fmt.Sprintf("%05d%s", fid, memExt))
	}
	return filepath.Join(t.dir, fmt.Sprintf("%06d%s", fid, vlogExt))
}

// logFid is the number of a log file named name with extension ext.
func logFid(name, ext string) (int, bool) {
	num, ok := strings.CutSuffix(name, ext)
	if !ok {
		return 0, false
	}
	fid, err := strconv.Atoi(num)
	return fid, err == nil && fid >= 0
}

// fdatasync flushes f's data (written through Badger's memory maps: the
// kernel writes a shared mapping's dirty pages back on fdatasync as it
// does on msync) to the device.
// f's descriptor is fd (f stays open meanwhile).
func fdatasync(f *os.File, fd int, hook func(string) error) error {
	if hook != nil {
		if err := hook(filepath.Base(f.Name())); err != nil {
			return fmt.Errorf("sync %s: %w", f.Name(), err)
		}
	}
	for {
		err := syscall.Fdatasync(fd)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("sync %s: %w", f.Name(), err)
		}
		return nil
	}
}
