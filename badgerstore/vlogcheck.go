package badgerstore

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Value-log GC drops the values after an entry that went bad on the disk.
// Badger's GC reads the file it rewrites entry by entry and stops at the
// first whose checksum fails, as if the file ended there; it then moves
// what it read and deletes the file, with every live value after that
// entry. One flipped bit in a value long dead would cost the live values
// written after it.
//
// So GC runs only once every value-log file it may pick — all but the
// newest, which Badger appends to — was read whole, off the writer
// goroutine (RunValueLogGC's caller). A file never changes after Badger
// moves on to the next one, so each is read once per process. Where an
// entry is torn or fails its checksum, the rest of the file is searched
// at every offset for whole entries of the kind the store writes there;
// if it holds one, the file is damaged and GC stays off for good (the
// store cannot tell a live value from a dead one by its place in the
// file: Badger does not expose its value pointers). A bad stretch with
// nothing whole after it is a torn tail: most often the batch that
// filled the file, cut by a crash or power loss before its sync (Badger
// opens the next file right after it), or a value at the file's end that
// went bad. GC may drop it: whatever was there reads as corrupt already.
// Reading a bad value itself reports corruption (Badger's value checksums
// are verified on every read from the value log, see Options.badger).

// ErrValueLogCorrupt marks a value-log file with whole entries after one
// that is torn or fails its checksum (see NewestValueLogDamage).
var ErrValueLogCorrupt = errors.New("value-log file corrupt")

// errTornTail marks a value-log file that ends in a torn or bad entry
// with nothing whole after it.
var errTornTail = errors.New("value-log file ends in a torn entry")

// errCheckStopped ends a check the store's Close interrupted.
var errCheckStopped = errors.New("value-log check stopped: the store is closing")

// errReadAgain reports an entry that failed once and read whole the
// second time: a read error, not a verdict.
var errReadAgain = errors.New("an entry read whole only the second time")

// vlogDamage is a value-log file with an entry torn or failing its
// checksum: damaged (ErrValueLogCorrupt) when whole entries follow it, a
// torn tail (errTornTail) when none does.
type vlogDamage struct {
	file     string
	at, size int64
	after    int // whole entries found after the bad one
}

func (d *vlogDamage) Error() string {
	if d.after == 0 {
		return fmt.Sprintf("%s: the entry at offset %d of %d is torn or fails its checksum, and nothing whole follows it", d.file, d.at, d.size)
	}
	return fmt.Sprintf("%s: the entry at offset %d of %d is torn or fails its checksum, and %d whole entries follow it", d.file, d.at, d.size, d.after)
}

func (d *vlogDamage) Unwrap() error {
	if d.after == 0 {
		return errTornTail
	}
	return ErrValueLogCorrupt
}

// vlogCheck remembers, per value-log file, whether it was read whole (nil)
// or not (*vlogDamage: damaged, or a torn tail).
type vlogCheck struct {
	dir string
	log *slog.Logger

	walking sync.Mutex // one check at a time

	mu      sync.Mutex
	verdict map[uint32]error
}

func newVlogCheck(dir string, log *slog.Logger) *vlogCheck {
	return &vlogCheck{dir: dir, log: log, verdict: map[uint32]error{}}
}

// check reads every value-log file below the newest that was not read
// yet, until stop is closed. A file that cannot be read (an I/O error) is
// tried again next time; a damaged one is logged once.
func (c *vlogCheck) check(stop <-chan struct{}) {
	c.walking.Lock()
	defer c.walking.Unlock()
	fids, err := rotatedValueLogs(c.dir)
	if err != nil {
		c.log.Warn("value-log check: cannot list the value-log files", "err", err)
		return
	}
	for _, fid := range fids {
		c.mu.Lock()
		_, done := c.verdict[fid]
		c.mu.Unlock()
		if done {
			continue
		}
		err := checkValueLog(filepath.Join(c.dir, vlogName(fid)), stop)
		switch {
		case errors.Is(err, errCheckStopped):
			return
		case errors.Is(err, fs.ErrNotExist):
			continue // GC deleted it meanwhile
		case errors.Is(err, errTornTail):
			c.log.Warn("value-log file ends in a torn or bad entry with nothing whole after it (a write a crash or power loss cut before its sync, or a value at the end that went bad: it reads as corrupt); value-log GC may drop it",
				"err", err)
		case errors.Is(err, ErrValueLogCorrupt):
			c.log.Error("value-log file corrupt: value-log GC stays off while it exists (rewriting it would drop the values after the bad entry); the store goes on, and reading a value stored there reports corruption",
				"err", err)
		case err != nil:
			c.log.Warn("value-log check: cannot read a value-log file; value-log GC waits for it", "file", vlogName(fid), "err", err)
			continue
		}
		c.mu.Lock()
		c.verdict[fid] = err
		c.mu.Unlock()
	}
}

// blocked says why value-log GC may not run now: a file below the newest
// not read yet, or a damaged one; "" when it may.
func (c *vlogCheck) blocked() string {
	fids, err := rotatedValueLogs(c.dir)
	if err != nil {
		return fmt.Sprintf("cannot list the value-log files: %v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, fid := range fids {
		v, ok := c.verdict[fid]
		if !ok {
			return fmt.Sprintf("value-log file %s not checked yet", vlogName(fid))
		}
		if errors.Is(v, ErrValueLogCorrupt) {
			return v.Error()
		}
	}
	return ""
}

// corrupt is how many value-log files were found damaged (torn tails
// not counted).
func (c *vlogCheck) corrupt() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.verdict {
		if errors.Is(v, ErrValueLogCorrupt) {
			n++
		}
	}
	return n
}

func vlogName(fid uint32) string { return fmt.Sprintf("%06d.vlog", fid) }

// NewestValueLogDamage reads the newest value-log file of a Badger data
// directory as value-log GC's check reads the others; it only reads.
// Badger's Open cuts that file at its first entry that is torn or fails
// its checksum, as it cuts a torn write, and the whole entries after it
// are lost: their records then read as corrupt. The result wraps
// ErrValueLogCorrupt and says how many whole entries follow the bad one
// when there are any; nil when the file is whole or ends in a torn entry
// only (what a crash or power loss leaves; Badger's cut loses nothing
// acknowledged there), or when the directory holds no value-log file.
// NewestValueLogDamageStopped is NewestValueLogDamage for a directory no
// process may be using: it holds the directory's lock while it reads
// (engine.ErrDataDirInUse when a sidecar holds it). Read while a sidecar
// appends to it, the newest file can look damaged (found by review:
// verify on a live directory now and then said so instead of "in use").
func NewestValueLogDamageStopped(dir string) error {
	unlock, err := lockDir(dir)
	if errors.Is(err, engine.ErrDataDirInUse) {
		return err
	}
	if err != nil {
		return fmt.Errorf("check the newest value-log file: %w", err)
	}
	defer unlock()
	return NewestValueLogDamage(dir)
}

func NewestValueLogDamage(dir string) error {
	fids, err := valueLogFiles(dir)
	if err != nil || len(fids) == 0 {
		return err
	}
	err = checkValueLog(filepath.Join(dir, vlogName(fids[len(fids)-1])), nil)
	if errors.Is(err, errTornTail) || errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// removeEmptyLogs removes the value-log and memtable-log files of dir
// that hold nothing, not even their header, and syncs the directory.
// Badger deletes such a file (a value-log file GC rewrote, the log of a
// memtable flushed to a table) by truncating it to nothing and then
// unlinking it, and creates one by creating it empty and then sizing it;
// a crash between the two steps leaves an empty file, on which Badger's
// Open fails ("Create a new file") and the store would never start
// again. None holds anything: GC's moves were synced before the
// truncation (collectValueLog), a flushed memtable is in a table synced
// before its log is deleted, and a new file has nothing yet. It runs
// before Badger's Open with the directory's lock held.
func removeEmptyLogs(dir string, log *slog.Logger) error {
	es, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	removed := 0
	for _, e := range es {
		if _, vlog := logFid(e.Name(), vlogExt); !vlog {
			if _, mem := logFid(e.Name(), memExt); !mem {
				continue
			}
		}
		path := filepath.Join(dir, e.Name())
		st, err := os.Stat(path)
		if err != nil || st.Size() != 0 {
			continue
		}
		if err := os.Remove(path); err != nil {
			return err
		}
		removed++
		log.Warn("badgerstore: removed an empty log file (a crash between Badger's truncating and unlinking it, or between creating and sizing it)", "file", path)
	}
	if removed == 0 {
		return nil
	}
	return syncDir(dir)
}

// keepDamagedCopy copies the newest value-log file of dir, which Badger's
// Open is about to cut before whole entries, to <name>.damaged beside it
// (a name Badger ignores), unless that copy exists already, and syncs it
// and the directory: the values after the bad entry stay on the disk for
// whoever wants them by hand. It returns the copy's path.
func keepDamagedCopy(dir string) (string, error) {
	fids, err := valueLogFiles(dir)
	if err != nil || len(fids) == 0 {
		return "", err
	}
	src := filepath.Join(dir, vlogName(fids[len(fids)-1]))
	dst := src + ".damaged"
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return dst, nil
	}
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(dst)
		return "", err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		os.Remove(dst)
		return "", err
	}
	if err := out.Close(); err != nil {
		return "", err
	}
	return dst, syncDir(dir)
}

// syncDir syncs a directory, so that files created or removed in it stay
// so.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// rotatedValueLogs lists the value-log files of dir below the newest, by
// number.
func rotatedValueLogs(dir string) ([]uint32, error) {
	fids, err := valueLogFiles(dir)
	if len(fids) > 0 {
		fids = fids[:len(fids)-1]
	}
	return fids, err
}

// valueLogFiles lists the value-log files of dir by number.
func valueLogFiles(dir string) ([]uint32, error) {
	es, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var fids []uint32
	for _, e := range es {
		if fid, ok := logFid(e.Name(), vlogExt); ok {
			fids = append(fids, uint32(fid))
		}
	}
	slices.Sort(fids)
	return fids, nil
}

// checkValueLog reads a value-log file whole, until stop is closed (nil:
// never). Every entry after the header must be whole and hold its
// checksum, up to the end of the file or to zeros that run to it (a file
// Badger had not truncated yet). Otherwise it is a *vlogDamage: a torn
// tail (errTornTail) when no whole entry starts in the bytes after the bad
// one, else damaged (ErrValueLogCorrupt). An I/O error is returned as it
// is.
func checkValueLog(path string, stop <-chan struct{}) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if size <= logFileHeader {
		return nil // no entries (a file GC truncated before unlinking it, say)
	}
	r := bufio.NewReaderSize(io.NewSectionReader(f, logFileHeader, size-logFileHeader), 256<<10)
	off := int64(logFileHeader)
	var buf []byte
	for i := 0; off < size; i++ {
		if i%64 == 0 && stopped(stop) {
			return errCheckStopped
		}
		_, n, err := readLogEntry(r, off, size-off, &buf)
		if err != nil {
			break
		}
		off += n
	}
	if off == size {
		return nil
	}
	zero, err := zerosFrom(f, off, size)
	if err == nil && !zero {
		var after int
		after, err = entriesAfter(f, off, size, stop)
		if err == nil {
			err = &vlogDamage{file: filepath.Base(path), at: off, size: size, after: after}
		}
	}
	if st, serr := os.Stat(path); serr != nil || st.Size() != size {
		// GC truncates a file it rewrote before it unlinks it.
		return fmt.Errorf("%s changed while read: %w", filepath.Base(path), fs.ErrNotExist)
	}
	return err
}

func stopped(stop <-chan struct{}) bool {
	select {
	case <-stop:
		return true
	default:
		return false
	}
}

// entriesAfter counts the whole entries in f after the bad one at off,
// up to size, trying every offset (the bad entry's own length may be what
// went bad). If the entry at off reads whole this time, the first read
// failed, not the entry: errReadAgain.
func entriesAfter(f *os.File, off, size int64, stop <-chan struct{}) (int, error) {
	b := make([]byte, size-off)
	if _, err := f.ReadAt(b, off); err != nil {
		return 0, err
	}
	if wholeEntryAt(b) > 0 {
		return 0, errReadAgain
	}
	found := 0
	for o, checked := 1, 0; o < len(b); {
		if o-checked >= 1<<20 {
			if stopped(stop) {
				return 0, errCheckStopped
			}
			checked = o
		}
		if n := wholeEntryAt(b[o:]); n > 0 {
			found++
			o += n
			continue
		}
		o++
	}
	return found, nil
}

// wholeEntryAt is the length of the whole value-log entry b starts with,
// or 0. Only entries of the kind Badger writes to the value log for this
// store count: no pointer or transaction bits in the meta (Badger clears
// them there), no user meta, no expiry, a key with its version; and the
// checksum must hold. A random offset passes the header's checks about
// once in half a million, so the search is cheap and seldom fooled.
func wholeEntryAt(b []byte) int {
	if len(b) < 2 || b[0]&(bitValuePointer|bitTxn|bitFinTxn) != 0 || b[1] != 0 {
		return 0
	}
	h := 2
	var lens [3]uint64
	for i := range lens {
		v, n := binary.Uvarint(b[h:])
		if n <= 0 {
			return 0
		}
		lens[i], h = v, h+n
	}
	klen, vlen, expires := lens[0], lens[1], lens[2]
	if expires != 0 || klen <= 8 || klen > maxLogKey || vlen > uint64(len(b)) || uint64(h)+klen+vlen+4 > uint64(len(b)) {
		return 0
	}
	end := h + int(klen+vlen)
	if crc32.Checksum(b[:end], castagnoli) != binary.BigEndian.Uint32(b[end:]) {
		return 0
	}
	return end + 4
}

// zerosFrom says whether f holds only zero bytes from off to size. The
// holes of a sparse file (Badger creates its files at full size) are
// skipped without reading them.
func zerosFrom(f *os.File, off, size int64) (bool, error) {
	buf := make([]byte, 64<<10)
	for off < size {
		data, err := f.Seek(off, seekData)
		switch {
		case errors.Is(err, syscall.ENXIO):
			return true, nil // only holes from off on
		case err == nil && data > off:
			off = data
			continue
		}
		n, err := f.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		for _, b := range buf[:n] {
			if b != 0 {
				return false, nil
			}
		}
		off += int64(n)
		if err != nil && !(errors.Is(err, io.EOF) && off >= size) {
			return false, err
		}
	}
	return true, nil
}

// seekData is lseek's SEEK_DATA: the next offset at or after the one
// given that is not in a hole.
const seekData = 3
