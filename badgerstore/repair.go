package badgerstore

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Dangling value pointers after a power loss.
//
// With SyncWrites off, Badger writes a large value into the memory-mapped
// value log and its pointer into the memory-mapped memtable log, with no
// sync between them; the store syncs the value log first, then the
// memtable log (durable.go). The kernel may write a page of the memtable
// log back before that, though, and a power loss (not a process crash: the
// page cache survives those) in that window leaves a pointer on disk whose
// value is not: an unacknowledged batch's large record, or a record
// value-log GC moved. Badger would replay the pointer, and the record would
// be unreadable, or, once Badger truncated the value log to its last whole
// entry and wrote new values there, read another record's bytes.
//
// Such a pointer is always in the unsynced tail of the newest memtable log:
// a batch is one Badger request written into one memtable, the next batch
// is sent only once this one is durable, and GC runs with no batch in
// flight and syncs every log before the next batch. So before Badger's
// Open the store reads the memtable logs as Badger's replay will, checks
// every value pointer against the value log (the entry it names is whole,
// its checksum holds and its key is the pointer's), and at the first that
// does not hold, zeroes the log from that entry on. Badger's replay
// then ends there, as it would at any torn write: what is dropped was never
// acknowledged (a GC move falls back to the value's old copy, which GC had
// not deleted yet), and a transaction cut short is dropped whole. In an
// older log (possible only with NoSync) the log is cut all the same, the
// later logs kept, and the cut logged as an error.
//
// The format read here is Badger v4's log entry (memtable.go, structs.go
// in badger): a 20-byte file header, then entries of meta, user meta,
// varint key length, value length and expiry, the key (with its version),
// the value, and a big-endian CRC-32C of all that; a value pointer is the
// struct {Fid, Len, Offset uint32} in the machine's byte order.

const (
	logFileHeader   = 20     // badger's vlogHeaderSize
	bitValuePointer = 1 << 1 // badger's bitValuePointer
	valuePtrSize    = 12     // badger's vptrSize
	maxLogKey       = 1 << 16
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// logEntry is one entry of a Badger log file.
type logEntry struct {
	offset int64
	meta   byte
	key    []byte
	value  []byte
}

// errLogEnd is where Badger's replay of a log ends: a zeroed, torn or
// corrupt entry.
var errLogEnd = errors.New("end of log")

// readLogEntry reads the entry at the reader's position, or errLogEnd;
// an entry longer than limit bytes (what is left of the file) is an end
// too, before anything is allocated for it. The entry's key and value are
// in buf (grown as needed), valid until the next call with it.
func readLogEntry(r *bufio.Reader, offset, limit int64, buf *[]byte) (logEntry, int64, error) {
	// The header: meta, user meta and three varints, kept as read (the
	// checksum covers the bytes, as Badger's replay reads them).
	var hdr [2 + 3*binary.MaxVarintLen64]byte
	if _, err := io.ReadFull(r, hdr[:2]); err != nil {
		return logEntry{}, 0, errLogEnd
	}
	n := 2
	var lens [3]uint64
	for i := range lens {
		var v uint64
		for shift := uint(0); ; shift += 7 {
			c, err := r.ReadByte()
			if err != nil || shift > 63 {
				return logEntry{}, 0, errLogEnd
			}
			hdr[n] = c
			n++
			v |= uint64(c&0x7f) << shift
			if c < 0x80 {
				break
			}
		}
		lens[i] = v
	}
	klen, vlen := lens[0], lens[1]
	if klen == 0 && vlen == 0 || klen > maxLogKey || vlen > 1<<32 || int64(n)+int64(klen+vlen)+4 > limit {
		return logEntry{}, 0, errLogEnd
	}
	if uint64(cap(*buf)) < klen+vlen {
		*buf = make([]byte, klen+vlen)
	}
	kv := (*buf)[:klen+vlen]
	if _, err := io.ReadFull(r, kv); err != nil {
		return logEntry{}, 0, errLogEnd
	}
	var sum [4]byte
	if _, err := io.ReadFull(r, sum[:]); err != nil {
		return logEntry{}, 0, errLogEnd
	}
	crc := crc32.Update(crc32.Update(0, castagnoli, hdr[:n]), castagnoli, kv)
	if binary.BigEndian.Uint32(sum[:]) != crc {
		return logEntry{}, 0, errLogEnd
	}
	return logEntry{offset: offset, meta: hdr[0], key: kv[:klen], value: kv[klen:]}, int64(n) + int64(len(kv)) + 4, nil
}

// valueLogs opens the value-log files a pointer names, once each.
type valueLogs struct {
	dir    string
	newest int // the newest value-log file's number, -1 if none
	files  map[uint32]*os.File
}

func (v *valueLogs) close() {
	for _, f := range v.files {
		f.Close()
	}
}

// holds reports whether the value log holds, whole, the entry a pointer
// of key names, or whether the pointer is one value-log GC superseded: it
// names a file older than the newest that is gone. GC deletes a file only
// after it moved the file's live values, with their versions, and synced
// the moves, so a memtable log may hold a pointer into a deleted file
// followed by the one that replaces it, and acknowledged writes after
// both. (Badger never takes the newest file for GC, and numbers new files
// above every one it has, so a missing file below the newest is one GC
// deleted; one above it is a file whose creation the power loss undid.)
func (v *valueLogs) holds(key, ptr []byte) (bool, error) {
	fid := binary.NativeEndian.Uint32(ptr[0:4])
	length := binary.NativeEndian.Uint32(ptr[4:8])
	offset := binary.NativeEndian.Uint32(ptr[8:12])
	f, ok := v.files[fid]
	if !ok {
		var err error
		f, err = os.Open(filepath.Join(v.dir, fmt.Sprintf("%06d%s", fid, vlogExt)))
		if errors.Is(err, os.ErrNotExist) {
			return int64(fid) < int64(v.newest), nil
		}
		if err != nil {
			return false, err
		}
		v.files[fid] = f
	}
	if offset < logFileHeader || length < 7 {
		return false, nil
	}
	b := make([]byte, length)
	if _, err := f.ReadAt(b, int64(offset)); err != nil {
		if errors.Is(err, io.EOF) {
			return false, nil // the file ends before the entry does
		}
		return false, err
	}
	e, n, err := readLogEntry(bufio.NewReader(bytes.NewReader(b)), int64(offset), int64(length), new([]byte))
	if err != nil || n != int64(length) {
		return false, nil
	}
	return bytes.Equal(e.key, key), nil
}

// dangling is the first value pointer of a memtable log whose value the
// value log does not hold.
type dangling struct {
	file   string
	offset int64
	key    []byte
}

// findDangling reads a memtable log as Badger's replay does and returns
// its first dangling pointer, if any, and how many entries it read.
func findDangling(path string, vlogs *valueLogs) (*dangling, int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	if _, err := f.Seek(logFileHeader, io.SeekStart); err != nil {
		return nil, 0, err
	}
	r := bufio.NewReaderSize(f, 256<<10)
	off := int64(logFileHeader)
	var buf []byte
	for n := 0; ; n++ {
		e, size, err := readLogEntry(r, off, fi.Size()-off, &buf)
		if errors.Is(err, errLogEnd) {
			return nil, n, nil
		}
		if e.meta&bitValuePointer != 0 && len(e.value) == valuePtrSize {
			ok, err := vlogs.holds(e.key, e.value)
			if err != nil {
				return nil, n, err
			}
			if !ok {
				return &dangling{file: path, offset: off, key: bytes.Clone(e.key)}, n, nil
			}
		}
		off += size
	}
}

// repairDanglingPointers cuts each memtable log of dir before its first
// value pointer whose value did not reach the disk (see the comment at the
// top of this file), and syncs it. It returns the offset of the last cut,
// or -1.
//
// It holds the directory's lock meanwhile, the one Badger takes (a flock of
// the directory), so that it never cuts the log of another process using
// the directory; it lets go before Badger's Open takes it again.
func repairDanglingPointers(dir string, log *slog.Logger) (int64, error) {
	lock, err := os.Open(dir)
	if err != nil {
		return -1, fmt.Errorf("check memtable logs: %w", err)
	}
	defer lock.Close() // releases the lock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return -1, engine.ErrDataDirInUse
		}
		return -1, fmt.Errorf("check memtable logs: lock %s: %w", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return -1, fmt.Errorf("check memtable logs: %w", err)
	}
	type memLog struct {
		fid  int
		path string
	}
	var logs []memLog
	vlogs := &valueLogs{dir: dir, newest: -1, files: make(map[uint32]*os.File)}
	for _, e := range entries {
		if fid, ok := logFid(e.Name(), memExt); ok {
			logs = append(logs, memLog{fid, filepath.Join(dir, e.Name())})
		}
		if fid, ok := logFid(e.Name(), vlogExt); ok {
			vlogs.newest = max(vlogs.newest, fid)
		}
	}
	slices.SortFunc(logs, func(a, b memLog) int { return a.fid - b.fid })
	defer vlogs.close()
	cut := int64(-1)
	for i, l := range logs {
		d, read, err := findDangling(l.path, vlogs)
		if err != nil {
			return -1, fmt.Errorf("check memtable log %s: %w", l.path, err)
		}
		if d == nil {
			continue
		}
		if err := zeroFrom(l.path, d.offset); err != nil {
			return -1, fmt.Errorf("repair memtable log %s: %w", l.path, err)
		}
		cut = d.offset
		if i == len(logs)-1 {
			log.Warn("badgerstore: a value pointer in the newest memtable log names a value that did not reach the disk (a power loss before the batch's sync); its unacknowledged tail was dropped",
				"file", l.path, "offset", d.offset, "entries_kept", read)
			continue
		}
		// Not the newest log: possible with NoSync, where an older log
		// may lose its tail while a newer one survives; with syncing on
		// it should not happen. The later logs are kept either way.
		log.Error("badgerstore: a value pointer in a memtable log that is not the newest names a value that did not reach the disk; the log's tail was dropped, the later logs kept",
			"file", l.path, "offset", d.offset, "entries_kept", read, "key", fmt.Sprintf("%q", d.key))
	}
	return cut, nil
}

// zeroFrom zeroes path from offset to its end and syncs it.
func zeroFrom(path string, offset int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	zeros := make([]byte, 1<<20)
	for off := offset; off < fi.Size(); off += int64(len(zeros)) {
		n := min(int64(len(zeros)), fi.Size()-off)
		if _, err := f.WriteAt(zeros[:n], off); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
