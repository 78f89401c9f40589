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
	"strconv"
	"strings"
	"sync"
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
// if it holds one, GC stays off for good (the store cannot tell a live
// value from a dead one by its place in the file: Badger does not expose
// its value pointers). A bad stretch with nothing whole after it is a torn
// tail — a write a crash or power loss cut, never acknowledged, in a file
// Badger had moved on from — which Badger's GC may drop: nothing is lost.
// Reading a bad value itself reports corruption (Badger's value checksums
// are verified on every read from the value log, see Options.badger).

// errValueLogCorrupt marks a value-log file with whole entries after one
// that is torn or fails its checksum.
var errValueLogCorrupt = errors.New("value-log file corrupt")

// errCheckStopped ends a check the store's Close interrupted.
var errCheckStopped = errors.New("value-log check stopped: the store is closing")

// vlogDamage is a value-log file with an entry torn or failing its
// checksum and whole entries after it.
type vlogDamage struct {
	file     string
	at, size int64
	after    int // whole entries found after the bad one
}

func (d *vlogDamage) Error() string {
	return fmt.Sprintf("%s: the entry at offset %d of %d is torn or fails its checksum, and %d whole entries follow it", d.file, d.at, d.size, d.after)
}

func (d *vlogDamage) Unwrap() error { return errValueLogCorrupt }

// vlogCheck remembers, per value-log file, whether it was read whole (nil)
// or is damaged (*vlogDamage).
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
		case err != nil && !errors.Is(err, errValueLogCorrupt):
			c.log.Warn("value-log check: cannot read a value-log file; value-log GC waits for it", "file", vlogName(fid), "err", err)
			continue
		case err != nil:
			c.log.Error("value-log file corrupt: value-log GC stays off while it exists (rewriting it would drop the values after the bad entry); the store goes on, and reading a value stored there reports corruption",
				"err", err)
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
		if v != nil {
			return v.Error()
		}
	}
	return ""
}

// corrupt is how many value-log files were found damaged.
func (c *vlogCheck) corrupt() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.verdict {
		if v != nil {
			n++
		}
	}
	return n
}

func vlogName(fid uint32) string { return fmt.Sprintf("%06d.vlog", fid) }

// rotatedValueLogs lists the value-log files of dir below the newest, by
// number.
func rotatedValueLogs(dir string) ([]uint32, error) {
	es, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var fids []uint32
	for _, e := range es {
		num, ok := strings.CutSuffix(e.Name(), ".vlog")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(num, 10, 32)
		if err != nil {
			continue
		}
		fids = append(fids, uint32(n))
	}
	slices.Sort(fids)
	if len(fids) > 0 {
		fids = fids[:len(fids)-1]
	}
	return fids, nil
}

// checkValueLog reads a value-log file whole, until stop is closed (nil:
// never). Every entry after the header must be whole and hold its
// checksum, up to the end of the file or to zeros that run to it (a file
// Badger had not truncated yet), or to a torn tail: bytes in which no
// whole entry starts. Otherwise the file is a *vlogDamage
// (errValueLogCorrupt); an I/O error is returned as it is.
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
		after, err = entriesAfter(f, off+1, size, stop)
		if err == nil && after > 0 {
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

// entriesAfter counts the whole entries in f from off to size, trying
// every offset (the bad entry's own length may be what went bad).
func entriesAfter(f *os.File, off, size int64, stop <-chan struct{}) (int, error) {
	b := make([]byte, size-off)
	if _, err := f.ReadAt(b, off); err != nil {
		return 0, err
	}
	found := 0
	for o := 0; o < len(b); {
		if o%(1<<20) == 0 && stopped(stop) {
			return 0, errCheckStopped
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

// zerosFrom says whether f holds only zero bytes from off to size.
func zerosFrom(f *os.File, off, size int64) (bool, error) {
	buf := make([]byte, 64<<10)
	for off < size {
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
