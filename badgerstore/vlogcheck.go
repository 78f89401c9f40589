package badgerstore

import (
	"bufio"
	"errors"
	"fmt"
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
// newest, which Badger appends to — was read whole, each entry's
// checksum holding, up to the end of the file. A file never changes
// after Badger moves on to the next one, so each is read once per
// process, off the writer goroutine (RunValueLogGC's caller). While one
// fails, GC stays off: the value log grows, and nothing is lost. Reading
// the bad value itself reports corruption (Badger's value checksums are
// verified on every read from the value log, see Options.badger).

// errValueLogCorrupt marks a value-log file whose entries do not all hold
// up to its end.
var errValueLogCorrupt = errors.New("value-log file corrupt")

// vlogCheck remembers, per value-log file, whether it was read whole and
// held (nil) or failed (errValueLogCorrupt naming where).
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
// yet. A file that cannot be read (an I/O error) is tried again next
// time; one that fails is logged once, and GC stays off while it exists.
func (c *vlogCheck) check() {
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
		err := checkValueLog(filepath.Join(c.dir, vlogName(fid)))
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue // GC deleted it meanwhile
		case err != nil && !errors.Is(err, errValueLogCorrupt):
			c.log.Warn("value-log check: cannot read a value-log file; value-log GC waits for it", "file", vlogName(fid), "err", err)
			continue
		case err != nil:
			c.log.Error("value-log file corrupt: value-log GC stays off while it exists (rewriting it would drop the values after the bad entry); the store goes on, and reading a value stored there reports corruption",
				"file", vlogName(fid), "err", err)
		}
		c.mu.Lock()
		c.verdict[fid] = err
		c.mu.Unlock()
	}
}

// blocked says why value-log GC may not run now: a file below the newest
// not read yet, or one that failed; "" when it may.
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

// corrupt is how many value-log files failed their check (the files GC
// deleted since are counted too: GC does not run while one is bad).
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

// checkValueLog reads a value-log file whole. Every entry after the
// header must be whole and hold its checksum, up to the end of the file
// or to zeros that run to it (a file Badger had not truncated yet). A
// file that fails is errValueLogCorrupt naming the offset; an I/O error
// is returned as it is.
func checkValueLog(path string) error {
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
	for off < size {
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
	if st, serr := os.Stat(path); serr != nil || st.Size() != size {
		// GC truncates a file it rewrote before it unlinks it.
		return fmt.Errorf("%s changed while read: %w", filepath.Base(path), fs.ErrNotExist)
	}
	if err != nil {
		return err
	}
	if zero {
		return nil
	}
	return fmt.Errorf("%s: the entry at offset %d of %d is torn or fails its checksum: %w", filepath.Base(path), off, size, errValueLogCorrupt)
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
