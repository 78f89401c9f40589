package badgerstore

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// appendLogEntry encodes an entry as Badger v4 writes it to a log file.
func appendLogEntry(b []byte, meta byte, key, value []byte) []byte {
	start := len(b)
	b = append(b, meta, 0)
	b = binary.AppendUvarint(b, uint64(len(key)))
	b = binary.AppendUvarint(b, uint64(len(value)))
	b = binary.AppendUvarint(b, 0)
	b = append(b, key...)
	b = append(b, value...)
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
}

// FuzzReadLogEntry: readLogEntry never panics or reads past the bytes it
// is given, and an entry it accepts is exactly its header, key, value and
// checksum.
func FuzzReadLogEntry(f *testing.F) {
	f.Add(appendLogEntry(nil, 0, []byte("k\x00\x00\x00\x00\x00\x00\x00\x01"), []byte("value")))
	f.Add(appendLogEntry(nil, bitValuePointer, []byte("key"), make([]byte, valuePtrSize)))
	f.Add(make([]byte, 32))
	f.Add([]byte{0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var buf []byte
		e, n, err := readLogEntry(bufio.NewReader(bytes.NewReader(b)), 0, int64(len(b)), &buf)
		if err != nil {
			return
		}
		if n > int64(len(b)) || n < int64(2+3+len(e.key)+len(e.value)+4) {
			t.Fatalf("read %d bytes of %d for a %d-byte key and %d-byte value", n, len(b), len(e.key), len(e.value))
		}
		if crc32.Checksum(b[:n-4], castagnoli) != binary.BigEndian.Uint32(b[n-4:n]) {
			t.Fatalf("accepted %x, whose checksum does not hold", b[:n])
		}
	})
}

// A log entry encoded here reads back, and a torn one (any prefix) or one
// whose length runs past the file is the log's end.
func TestReadLogEntryReadsBadgersFormat(t *testing.T) {
	key, value := []byte("Mthread\x00\x00\x00\x00\x00\x00\x00\x07"), []byte(`{"id":"m1"}`)
	b := appendLogEntry(nil, bitValuePointer, key, value)
	var buf []byte
	e, n, err := readLogEntry(bufio.NewReader(bytes.NewReader(b)), 20, int64(len(b)), &buf)
	if err != nil || n != int64(len(b)) || e.offset != 20 || e.meta != bitValuePointer || string(e.key) != string(key) || string(e.value) != string(value) {
		t.Fatalf("read %+v, %d, %v", e, n, err)
	}
	for i := range len(b) {
		if _, _, err := readLogEntry(bufio.NewReader(bytes.NewReader(b[:i])), 0, int64(len(b)), &buf); err != errLogEnd {
			t.Fatalf("a prefix of %d bytes: %v, want the log's end", i, err)
		}
	}
	if _, _, err := readLogEntry(bufio.NewReader(bytes.NewReader(b)), 0, int64(len(b))-1, &buf); err != errLogEnd {
		t.Fatalf("an entry past the limit: %v, want the log's end", err)
	}
	flipped := bytes.Clone(b)
	flipped[len(flipped)-6] ^= 1
	if _, _, err := readLogEntry(bufio.NewReader(bytes.NewReader(flipped)), 0, int64(len(b)), &buf); err != errLogEnd {
		t.Fatalf("a flipped bit: %v, want the log's end", err)
	}
}

// logFile is a Badger log file under construction: its 20-byte header,
// then entries.
type logFile struct{ b []byte }

func newLogFile() *logFile { return &logFile{b: make([]byte, logFileHeader)} }

// add appends an entry and returns its offset and length.
func (l *logFile) add(meta byte, key, value []byte) (uint32, uint32) {
	off := len(l.b)
	l.b = appendLogEntry(l.b, meta, key, value)
	return uint32(off), uint32(len(l.b) - off)
}

func pointer(fid, length, offset uint32) []byte {
	p := make([]byte, valuePtrSize)
	binary.NativeEndian.PutUint32(p[0:], fid)
	binary.NativeEndian.PutUint32(p[4:], length)
	binary.NativeEndian.PutUint32(p[8:], offset)
	return p
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// txnKey is key at version ts, as Badger writes it (y.KeyWithTs).
func txnKey(key string, ts uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(key), math.MaxUint64-ts)
}

// addTxn appends a transaction at version ts: its entries (a pointer
// where ptr is set) and its closing entry. It returns the offset of its
// first entry and of its pointer (0 if none).
func (l *logFile) addTxn(ts uint64, ptr []byte, keys ...string) (first, pointerAt uint32) {
	first = uint32(len(l.b))
	for _, k := range keys {
		if ptr != nil && k == "k" {
			pointerAt, _ = l.add(bitTxn|bitValuePointer, txnKey(k, ts), ptr)
			continue
		}
		l.add(bitTxn, txnKey(k, ts), []byte("v"))
	}
	l.add(bitFinTxn, txnKey("!badger!txn", ts), []byte(strconv.FormatUint(ts, 10)))
	return first, pointerAt
}

// A value-log directory for the synthetic logs: 000002.vlog empty (GC
// deleted it halfway: truncated, not unlinked), 000003.vlog the newest,
// holding an entry of key k at version 5 and one of key other.
type vlogDir struct {
	dir          string
	atK, nK      uint32
	atO, nO, end uint32
}

func newVlogDir(t *testing.T) vlogDir {
	dir := t.TempDir()
	vlog := newLogFile()
	atK, nK := vlog.add(0, txnKey("k", 5), make([]byte, 100))
	atO, nO := vlog.add(0, txnKey("other", 5), make([]byte, 100))
	writeFile(t, filepath.Join(dir, "000002.vlog"), nil)
	writeFile(t, filepath.Join(dir, "000003.vlog"), vlog.b)
	return vlogDir{dir: dir, atK: atK, nK: nK, atO: atO, nO: nO, end: uint32(len(vlog.b))}
}

// repairLog writes mem as the newest memtable log (and older as the one
// before it), runs the repair, and returns where it cut and the log after.
func repairLog(t *testing.T, d vlogDir, older, mem []byte) (int64, []byte) {
	t.Helper()
	whole := append(bytes.Clone(mem), make([]byte, 4096)...) // Badger's files are longer than their entries
	if older != nil {
		writeFile(t, filepath.Join(d.dir, "00007.mem"), older)
	}
	writeFile(t, filepath.Join(d.dir, "00008.mem"), whole)
	cut, err := repairDanglingPointers(d.dir, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(d.dir, "00008.mem"))
	if err != nil {
		t.Fatal(err)
	}
	if cut < 0 && !bytes.Equal(got, whole) {
		t.Fatal("no cut reported, but the log changed")
	}
	if cut >= 0 && (!bytes.Equal(got[:cut], whole[:cut]) || !bytes.Equal(got[cut:], make([]byte, len(whole)-int(cut)))) {
		t.Fatalf("cut at %d, but not everything before it kept and everything after it zeroed", cut)
	}
	return cut, got
}

// Which pointers of the last request in the newest log the repair takes
// as dangling. The request here is a run of entries outside transactions
// (value-log GC's moves): the log is cut at the dangling pointer itself.
// A pointer into a file GC deleted (missing, or emptied, and older than
// the newest) is superseded, not dangling.
func TestRepairTellsDanglingPointersFromSupersededOnes(t *testing.T) {
	for _, c := range []struct {
		name    string
		ptr     func(d vlogDir) []byte
		cutHere bool
	}{
		{"valid", func(d vlogDir) []byte { return pointer(3, d.nK, d.atK) }, false},
		{"into a file GC deleted", func(d vlogDir) []byte { return pointer(1, d.nK, d.atK) }, false},
		{"into a file GC emptied", func(d vlogDir) []byte { return pointer(2, d.nK, d.atK) }, false},
		{"past the end of the newest file", func(d vlogDir) []byte { return pointer(3, d.nK, d.end) }, true},
		{"into a file newer than the newest", func(d vlogDir) []byte { return pointer(4, d.nK, d.atK) }, true},
		{"at another key's entry", func(d vlogDir) []byte { return pointer(3, d.nO, d.atO) }, true},
		{"of a length that runs past the file", func(d vlogDir) []byte { return pointer(3, 1<<31, d.atK) }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newVlogDir(t)
			mem := newLogFile()
			mem.addTxn(4, nil, "a") // an earlier, acknowledged request
			mem.add(0, txnKey("x", 5), []byte("moved small"))
			suspect, _ := mem.add(bitValuePointer, txnKey("k", 5), c.ptr(d))
			mem.add(0, txnKey("y", 5), []byte("after"))
			cut, _ := repairLog(t, d, nil, mem.b)
			if want := map[bool]int64{true: int64(suspect), false: -1}[c.cutHere]; cut != want {
				t.Fatalf("cut at %d, want %d", cut, want)
			}
		})
	}
}

// A last request that is a transaction is cut at its first entry, so that
// Badger drops it whole; the transaction before it is kept.
func TestRepairCutsTheLastTransactionWhole(t *testing.T) {
	d := newVlogDir(t)
	mem := newLogFile()
	mem.addTxn(5, pointer(3, d.nK, d.atK), "a", "k") // the vlog holds k at version 5
	first, _ := mem.addTxn(6, pointer(3, d.nK, d.end), "b", "k", "c")
	if cut, _ := repairLog(t, d, nil, mem.b); cut != int64(first) {
		t.Fatalf("cut at %d, want %d (the last transaction's first entry)", cut, first)
	}
}

// Only the last request is checked: a bad value named by an earlier one
// (a media error, not a power loss: what came after it was acknowledged)
// cuts nothing, and neither does one in an older log; nor does a dangling
// pointer in a transaction Badger's replay drops anyway (no closing
// entry), the request before it being whole.
func TestRepairLeavesAllButTheLastRequestAlone(t *testing.T) {
	t.Run("an earlier transaction", func(t *testing.T) {
		d := newVlogDir(t)
		mem := newLogFile()
		mem.addTxn(5, pointer(3, d.nO, d.atO), "k") // key k, entry of other: bad
		mem.addTxn(6, nil, "b")
		if cut, _ := repairLog(t, d, nil, mem.b); cut != -1 {
			t.Fatalf("cut at %d", cut)
		}
	})
	t.Run("a transaction before GC's moves", func(t *testing.T) {
		d := newVlogDir(t)
		mem := newLogFile()
		mem.addTxn(5, pointer(3, d.nO, d.atO), "k") // key k, entry of other: bad
		mem.add(bitValuePointer, txnKey("k", 5), pointer(3, d.nK, d.atK))
		if cut, _ := repairLog(t, d, nil, mem.b); cut != -1 {
			t.Fatalf("cut at %d", cut)
		}
	})
	t.Run("an empty transaction after it", func(t *testing.T) {
		d := newVlogDir(t)
		mem := newLogFile()
		mem.addTxn(5, pointer(3, d.nK, d.end), "k") // dangling, but not last
		mem.add(bitFinTxn, txnKey("!badger!txn", 0), []byte("0"))
		if cut, _ := repairLog(t, d, nil, mem.b); cut != -1 {
			t.Fatalf("cut at %d", cut)
		}
	})
	t.Run("an older log", func(t *testing.T) {
		d := newVlogDir(t)
		older := newLogFile()
		older.addTxn(4, pointer(3, d.nK, d.end), "k")
		mem := newLogFile()
		mem.addTxn(6, nil, "b")
		if cut, _ := repairLog(t, d, older.b, mem.b); cut != -1 {
			t.Fatalf("cut at %d", cut)
		}
		if o, _ := os.ReadFile(filepath.Join(d.dir, "00007.mem")); !bytes.Equal(o, older.b) {
			t.Fatal("the older log changed")
		}
	})
	t.Run("an unclosed transaction", func(t *testing.T) {
		d := newVlogDir(t)
		mem := newLogFile()
		mem.addTxn(5, pointer(3, d.nK, d.atK), "k")
		mem.add(bitTxn|bitValuePointer, txnKey("k", 6), pointer(3, d.nK, d.end))
		if cut, _ := repairLog(t, d, nil, mem.b); cut != -1 {
			t.Fatalf("cut at %d", cut)
		}
	})
}
