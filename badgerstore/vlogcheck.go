package badgerstore

import (
	"bufio"
	"bytes"
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
// newest, which Badger appends to — was read whole, off the writer
// goroutine (RunValueLogGC's caller). A file never changes after Badger
// moves on to the next one, so each is read once per process. Where an
// entry is torn or fails its checksum, the rest of the file is searched
// for whole entries (at every offset), and GC stays off while one of them
// holds the live version of its key: the value GC would drop. A bad
// stretch with nothing live after it — garbage, or the torn tail of a
// batch a power loss cut before it was acknowledged — does not stop GC.
// Reading a bad value itself reports corruption (Badger's value
// checksums are verified on every read from the value log, see
// Options.badger).

// errValueLogCorrupt marks a value-log file whose entries do not all hold
// up to its end.
var errValueLogCorrupt = errors.New("value-log file corrupt")

// vlogDamage is a value-log file with an entry torn or failing its
// checksum: where, and the entries found whole after it.
type vlogDamage struct {
	file     string
	at, size int64
	after    []versionedKey
}

// versionedKey is a user key and the version an entry holds.
type versionedKey struct {
	key     []byte
	version uint64
}

func (d *vlogDamage) Error() string {
	return fmt.Sprintf("%s: the entry at offset %d of %d is torn or fails its checksum (%d whole entries after it)", d.file, d.at, d.size, len(d.after))
}

func (d *vlogDamage) Unwrap() error { return errValueLogCorrupt }

// liveFunc says whether version is the live version of key (Store.isLive).
type liveFunc func(key []byte, version uint64) (bool, error)

// vlogCheck remembers, per value-log file, whether it was read whole and
// what it found.
type vlogCheck struct {
	dir  string
	log  *slog.Logger
	live liveFunc

	walking sync.Mutex // one check at a time

	mu    sync.Mutex
	files map[uint32]*vlogVerdict
}

// vlogVerdict is one file's check: damage nil when whole; liveKey names
// a key whose live value lies after the damage ("" when none: GC may
// rewrite the file).
type vlogVerdict struct {
	damage  *vlogDamage
	liveKey string
}

func newVlogCheck(dir string, log *slog.Logger, live liveFunc) *vlogCheck {
	return &vlogCheck{dir: dir, log: log, live: live, files: map[uint32]*vlogVerdict{}}
}

// check reads every value-log file below the newest that was not read
// yet, and looks again at the damaged files that held live values (a
// value rewritten since is no longer live there). A file that cannot be
// read (an I/O error) is tried again next time.
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
		v := c.files[fid]
		c.mu.Unlock()
		if v != nil && (v.damage == nil || v.liveKey == "") {
			continue
		}
		if v == nil {
			err := checkValueLog(filepath.Join(c.dir, vlogName(fid)))
			var d *vlogDamage
			switch {
			case err == nil:
				v = &vlogVerdict{}
			case errors.As(err, &d):
				v = &vlogVerdict{damage: d}
			case errors.Is(err, fs.ErrNotExist):
				continue // GC deleted it meanwhile
			default:
				c.log.Warn("value-log check: cannot read a value-log file; value-log GC waits for it", "file", vlogName(fid), "err", err)
				continue
			}
		}
		if v.damage != nil {
			was := v.liveKey
			key, err := c.liveAfter(v.damage)
			if err != nil {
				c.log.Warn("value-log check: cannot look up the values after a bad entry; value-log GC waits for it", "file", vlogName(fid), "err", err)
				continue
			}
			v = &vlogVerdict{damage: v.damage, liveKey: key}
			switch {
			case key != "" && was == "":
				c.log.Error("value-log file corrupt: value-log GC stays off while it holds live values after the bad entry (rewriting it would drop them); the store goes on, and reading a value stored there reports corruption",
					"err", v.damage, "live_key", key)
			case key == "":
				c.log.Warn("value-log file corrupt, with no live value after the bad entry: value-log GC may rewrite it; reading a value stored there reports corruption", "err", v.damage)
			}
		}
		c.mu.Lock()
		c.files[fid] = v
		c.mu.Unlock()
	}
}

// liveAfter is the first key whose live version lies after the damage
// ("" when none).
func (c *vlogCheck) liveAfter(d *vlogDamage) (string, error) {
	for _, e := range d.after {
		live, err := c.live(e.key, e.version)
		if err != nil {
			return "", err
		}
		if live {
			return string(e.key), nil
		}
	}
	return "", nil
}

// blocked says why value-log GC may not run now: a file below the newest
// not read yet, or one that holds live values after a bad entry; "" when
// it may.
func (c *vlogCheck) blocked() string {
	fids, err := rotatedValueLogs(c.dir)
	if err != nil {
		return fmt.Sprintf("cannot list the value-log files: %v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, fid := range fids {
		v := c.files[fid]
		switch {
		case v == nil:
			return fmt.Sprintf("value-log file %s not checked yet", vlogName(fid))
		case v.damage != nil && v.liveKey != "":
			return fmt.Sprintf("%v; the live value of %q lies after it", v.damage, v.liveKey)
		}
	}
	return ""
}

// corrupt is how many value-log files failed their check (the files GC
// deleted since are counted too).
func (c *vlogCheck) corrupt() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.files {
		if v.damage != nil {
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
// file that fails is a *vlogDamage (errValueLogCorrupt) naming the offset
// and the entries found whole after it; an I/O error is returned as it
// is.
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
	after, err := entriesAfter(f, off+1, size)
	if err != nil {
		return err
	}
	return &vlogDamage{file: filepath.Base(path), at: off, size: size, after: after}
}

// entriesAfter reads f from off to size for whole entries, trying every
// offset (an entry's length may itself be what went bad), and returns
// the key and version of each, Badger's own keys left out.
func entriesAfter(f *os.File, off, size int64) ([]versionedKey, error) {
	b := make([]byte, size-off)
	if _, err := f.ReadAt(b, off); err != nil {
		return nil, err
	}
	var found []versionedKey
	var buf []byte
	src := bytes.NewReader(nil)
	r := bufio.NewReaderSize(src, 16)
	for o := 0; o < len(b); {
		src.Reset(b[o:])
		r.Reset(src)
		e, n, err := readLogEntry(r, int64(o), int64(len(b)-o), &buf)
		if err != nil {
			o++
			continue
		}
		if len(e.key) > 8 && !bytes.HasPrefix(e.key, badgerPrefix) {
			found = append(found, versionedKey{key: bytes.Clone(e.key[:len(e.key)-8]), version: keyTs(e.key)})
		}
		o += int(n)
	}
	return found, nil
}

// badgerPrefix starts the keys Badger keeps for itself (transaction
// markers among them).
var badgerPrefix = []byte("!badger!")

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
