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
	"math"
	"os"
	"path/filepath"
	"strconv"

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
// be unreadable (read back as empty), or, when the power loss undid the
// creation of the file the pointer names, read another record's bytes
// once Badger made a new file under that number.
//
// Such a pointer can only be in what the newest memtable log's last
// request wrote: a batch is one Badger request written into one memtable,
// the next batch is sent only once this one is durable, GC runs with no
// batch in flight and syncs every log before the next batch, and Badger
// starts a new memtable only before a request or at Open (after the store
// synced every log). So before Badger's Open the store reads the newest
// memtable log as Badger's replay will, finds the last request it applies
// (the last whole transaction, or the trailing run of entries written
// outside transactions: value-log GC's moves), and checks that request's
// value pointers against the value log (the entry a pointer names is
// whole, its checksum holds and its key is the pointer's). At the first
// that does not hold, it zeroes the log from there on (from the
// transaction's first entry; from the pointer itself among GC's moves).
// Badger's replay then ends there, as at any torn write: what is dropped
// was never acknowledged, and a GC move falls back to the value's old
// copy, which GC had not deleted yet (after its moves are synced, GC
// commits and syncs a marker before the file goes: collectValueLog, so
// a finished GC's moves are never the last request). The repair cannot
// tell a power loss from a value of the last request that went bad on
// the disk after it was synced: such a request is dropped too. An I/O
// error reading the value log leaves the log as it is. Nothing before the last request is
// checked or cut: a value there was synced before anything after it was
// acknowledged, and one that is bad now (a media error) is corruption,
// which reading that record reports (ErrCorrupt) without costing the
// writes that follow it.
//
// The format read here is Badger v4's log entry (memtable.go, structs.go
// in badger): a 20-byte file header, then entries of meta, user meta,
// varint key length, value length and expiry, the key (with its version),
// the value, and a big-endian CRC-32C of all that; a value pointer is the
// struct {Fid, Len, Offset uint32} in the machine's byte order.

const (
	logFileHeader   = 20     // badger's vlogHeaderSize
	bitValuePointer = 1 << 1 // badger's bitValuePointer
	bitTxn          = 1 << 6 // badger's bitTxn: an entry of a transaction
	bitFinTxn       = 1 << 7 // badger's bitFinTxn: the entry closing one
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
			if err != nil || shift > 63 || shift == 63 && c > 1 {
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
	files  map[uint32]*vlogFile
}

type vlogFile struct {
	f    *os.File // nil: missing
	size int64
}

func (v *valueLogs) close() {
	for _, f := range v.files {
		if f.f != nil {
			f.f.Close()
		}
	}
}

func (v *valueLogs) open(fid uint32) (*vlogFile, error) {
	if f, ok := v.files[fid]; ok {
		return f, nil
	}
	vf := &vlogFile{}
	f, err := os.Open(filepath.Join(v.dir, fmt.Sprintf("%06d%s", fid, vlogExt)))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, err
	default:
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		vf.f, vf.size = f, fi.Size()
	}
	v.files[fid] = vf
	return vf, nil
}

// holds reports whether the value log holds, whole, the entry a pointer
// of key names, or whether the pointer is one value-log GC superseded: it
// names a file older than the newest that is gone, or empty (Badger
// deletes a file by truncating it and then unlinking it, neither synced).
// GC deletes a file only after it moved the file's live values, with
// their versions, and synced the moves, so a memtable log may hold a
// pointer into a deleted file followed by the one that replaces it, and
// acknowledged writes after both. (Badger never takes the newest file for
// GC, and numbers new files above every one it has, so a missing file
// below the newest is one GC deleted; one above it is a file whose
// creation the power loss undid.)
func (v *valueLogs) holds(key, ptr []byte) (bool, error) {
	fid := binary.NativeEndian.Uint32(ptr[0:4])
	length := binary.NativeEndian.Uint32(ptr[4:8])
	offset := binary.NativeEndian.Uint32(ptr[8:12])
	f, err := v.open(fid)
	if err != nil {
		return false, err
	}
	if f.f == nil || f.size <= logFileHeader {
		return int64(fid) < int64(v.newest), nil
	}
	if offset < logFileHeader || length < 7 || int64(offset)+int64(length) > f.size {
		return false, nil
	}
	b := make([]byte, length)
	if _, err := f.f.ReadAt(b, int64(offset)); err != nil {
		return false, err
	}
	e, n, err := readLogEntry(bufio.NewReader(bytes.NewReader(b)), int64(offset), int64(length), new([]byte))
	if err != nil || n != int64(length) {
		return false, nil
	}
	return bytes.Equal(e.key, key), nil
}

// logPointer is a value pointer read from a memtable log.
type logPointer struct {
	offset   int64
	key, ptr []byte
}

// lastRequest reads a memtable log as Badger's replay does (memtable.go,
// logFile.iterate: a transaction's entries are applied at its closing
// entry; an entry outside a transaction at once; the replay stops at a
// torn, zeroed or empty-keyed entry, a transaction entry of another
// version inside a transaction, a closing entry that does not match, or an
// entry outside a transaction inside one) and returns the value pointers
// of the last request it applies: the last whole transaction (txn, from
// start), or the trailing run of entries outside transactions.
func lastRequest(path string) (ptrs []logPointer, start int64, txn bool, entries int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, false, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, false, 0, err
	}
	if _, err := f.Seek(logFileHeader, io.SeekStart); err != nil {
		return nil, 0, false, 0, err
	}
	r := bufio.NewReaderSize(f, 256<<10)
	var (
		buf       []byte
		lastTs    uint64 // the version of the transaction being read; 0 outside one
		txnStart  int64
		txnPtrs   []logPointer
		haveTail  bool
		tailIsTxn bool
	)
	pointer := func(e logEntry) (logPointer, bool) {
		if e.meta&bitValuePointer == 0 || len(e.value) != valuePtrSize {
			return logPointer{}, false
		}
		return logPointer{offset: e.offset, key: bytes.Clone(e.key), ptr: bytes.Clone(e.value)}, true
	}
	off := int64(logFileHeader)
loop:
	for ; ; entries++ {
		e, size, rerr := readLogEntry(r, off, fi.Size()-off, &buf)
		if rerr != nil || len(e.key) == 0 {
			break
		}
		switch {
		case e.meta&bitTxn != 0:
			ts := keyTs(e.key)
			if lastTs == 0 {
				lastTs, txnStart, txnPtrs = ts, off, txnPtrs[:0]
			}
			if ts != lastTs {
				break loop
			}
			if p, ok := pointer(e); ok {
				txnPtrs = append(txnPtrs, p)
			}
		case e.meta&bitFinTxn != 0:
			ts, perr := strconv.ParseUint(string(e.value), 10, 64)
			if perr != nil || ts != lastTs {
				break loop
			}
			if lastTs == 0 { // a closing entry of version 0 outside a transaction: Badger applies nothing
				txnStart, txnPtrs = off, txnPtrs[:0]
			}
			lastTs = 0
			ptrs, start, txn, haveTail, tailIsTxn = append(ptrs[:0:0], txnPtrs...), txnStart, true, true, true
			txnPtrs = txnPtrs[:0]
		default:
			if lastTs != 0 {
				break loop
			}
			if !haveTail || tailIsTxn {
				ptrs, start, txn, haveTail, tailIsTxn = nil, off, false, true, false
			}
			if p, ok := pointer(e); ok {
				ptrs = append(ptrs, p)
			}
		}
		off += size
	}
	return ptrs, start, txn, entries, nil
}

// keyTs is the version a Badger key carries (y.ParseTs).
func keyTs(key []byte) uint64 {
	if len(key) <= 8 {
		return 0
	}
	return math.MaxUint64 - binary.BigEndian.Uint64(key[len(key)-8:])
}

// repairDanglingPointers cuts the newest memtable log of dir before the
// value pointer of its last request whose value did not reach the disk
// (see the comment at the top of this file), and syncs it. It returns the
// offset it cut at, or -1.
//
// It holds the directory's lock meanwhile, the one Badger takes (a flock of
// the directory), so that it never cuts the log of another process using
// the directory; it lets go before Badger's Open takes it again. It also
// removes empty log files (removeEmptyLogs), and logs, as an
// error, a newest value-log file that Badger's Open will cut before whole
// entries (NewestValueLogDamage).
func repairDanglingPointers(dir string, log *slog.Logger) (int64, error) {
	unlock, err := lockDir(dir)
	if errors.Is(err, engine.ErrDataDirInUse) {
		return -1, err
	}
	if err != nil {
		return -1, fmt.Errorf("check memtable logs: %w", err)
	}
	defer unlock()
	if err := removeEmptyLogs(dir, log); err != nil {
		return -1, fmt.Errorf("remove empty log files: %w", err)
	}
	if err := NewestValueLogDamage(dir); errors.Is(err, ErrValueLogCorrupt) {
		kept, kerr := keepDamagedCopy(dir)
		log.Error("badgerstore: Badger's Open is about to cut the newest value-log file at an entry that went bad: the whole entries after it are lost to the store, and their records will read as corrupt; the file's bytes are kept aside (mailbox-sidecar verify finds this without opening the directory)",
			"err", err, "kept_as", kept, "keep_err", kerr)
	}
	return cutDanglingPointers(dir, log)
}

// cutDanglingPointers is repairDanglingPointers with the lock held.
func cutDanglingPointers(dir string, log *slog.Logger) (int64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return -1, fmt.Errorf("check memtable logs: %w", err)
	}
	newestMem, path := -1, ""
	vlogs := &valueLogs{dir: dir, newest: -1, files: make(map[uint32]*vlogFile)}
	defer vlogs.close()
	for _, e := range entries {
		if fid, ok := logFid(e.Name(), memExt); ok && fid > newestMem {
			newestMem, path = fid, filepath.Join(dir, e.Name())
		}
		if fid, ok := logFid(e.Name(), vlogExt); ok {
			vlogs.newest = max(vlogs.newest, fid)
		}
	}
	if path == "" {
		return -1, nil
	}
	ptrs, start, txn, read, err := lastRequest(path)
	if err != nil {
		return -1, fmt.Errorf("check memtable log %s: %w", path, err)
	}
	for _, p := range ptrs {
		ok, err := vlogs.holds(p.key, p.ptr)
		if err != nil {
			// An I/O error reading the value log: cutting could drop
			// acknowledged writes, and failing would keep the store from
			// ever opening; reading the record will report it instead.
			log.Error("badgerstore: cannot read the value a memtable log's last request points at; the log is left as it is",
				"file", path, "key", fmt.Sprintf("%q", p.key), "err", err)
			return -1, nil
		}
		if ok {
			continue
		}
		cut := p.offset
		if txn {
			cut = start
		}
		if err := zeroFrom(path, cut); err != nil {
			return -1, fmt.Errorf("repair memtable log %s: %w", path, err)
		}
		log.Warn("badgerstore: the last request in the newest memtable log points at a value the value log does not hold, and was dropped: a power loss before its sync (it was never acknowledged), or a value that went bad on the disk since",
			"file", path, "offset", cut, "dangling_key", fmt.Sprintf("%q", p.key), "entries_read", read)
		return cut, nil
	}
	return -1, nil
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
