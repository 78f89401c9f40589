package badgerstore

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
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

// Which pointers repairDanglingPointers takes as dangling, on log files
// written here in Badger's format: one into a value-log file GC deleted
// (older than the newest) is superseded, not dangling; one past the end
// of a file, into a file newer than the newest, or at an entry of another
// key is dangling, and the log is cut there, in every log that has one.
func TestRepairTellsDanglingPointersFromSupersededOnes(t *testing.T) {
	key := func(s string) []byte { return append([]byte(s), 0, 0, 0, 0, 0, 0, 0, 1) }
	for _, c := range []struct {
		name    string
		ptr     func(vlogLen uint32, at, n uint32) []byte
		cutHere bool
	}{
		{"into a file GC deleted", func(_, at, n uint32) []byte { return pointer(1, n, at) }, false},
		{"valid", func(_, at, n uint32) []byte { return pointer(3, n, at) }, false},
		{"past the end of the newest file", func(l, _, n uint32) []byte { return pointer(3, n, l) }, true},
		{"into a file newer than the newest", func(_, at, n uint32) []byte { return pointer(4, n, at) }, true},
		{"at another key's entry", func(_, at, n uint32) []byte { return pointer(3, n, at) }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			vlog := newLogFile()
			vkey := key("k")
			if c.name == "at another key's entry" {
				vkey = key("other")
			}
			atK, nK := vlog.add(0, key("k"), make([]byte, 100))
			at, n := vlog.add(0, vkey, make([]byte, 100))
			writeFile(t, filepath.Join(dir, "000002.vlog"), newLogFile().b)
			writeFile(t, filepath.Join(dir, "000003.vlog"), vlog.b)

			older := newLogFile() // an older memtable log, with a valid pointer
			older.add(bitValuePointer, key("k"), pointer(3, nK, atK))
			mem := newLogFile()
			mem.add(0, key("a"), []byte("small"))
			suspect, _ := mem.add(bitValuePointer, key("k"), c.ptr(uint32(len(vlog.b)), at, n))
			mem.add(0, key("b"), []byte("after"))
			whole := append(bytes.Clone(mem.b), make([]byte, 4096)...) // Badger's files are longer than their entries
			writeFile(t, filepath.Join(dir, "00007.mem"), older.b)
			writeFile(t, filepath.Join(dir, "00008.mem"), whole)

			cut, err := repairDanglingPointers(dir, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(filepath.Join(dir, "00008.mem"))
			if err != nil {
				t.Fatal(err)
			}
			if !c.cutHere {
				if cut != -1 || !bytes.Equal(got, whole) {
					t.Fatalf("cut at %d; the log changed: %v", cut, !bytes.Equal(got, whole))
				}
				return
			}
			if cut != int64(suspect) || !bytes.Equal(got[:suspect], whole[:suspect]) ||
				!bytes.Equal(got[suspect:], make([]byte, len(whole)-int(suspect))) || len(got) != len(whole) {
				t.Fatalf("cut at %d, want %d, with everything before it kept and everything after it zeroed", cut, suspect)
			}
			if o, _ := os.ReadFile(filepath.Join(dir, "00007.mem")); !bytes.Equal(o, older.b) {
				t.Fatal("the older log changed")
			}
		})
	}
}

// A dangling pointer in a log older than the newest (possible with
// NoSync) cuts that log; the newer one is kept as it is.
func TestRepairCutsAnOlderLogAndKeepsTheNewer(t *testing.T) {
	key := func(s string) []byte { return append([]byte(s), 0, 0, 0, 0, 0, 0, 0, 1) }
	dir := t.TempDir()
	vlog := newLogFile()
	at, n := vlog.add(0, key("k"), make([]byte, 100))
	writeFile(t, filepath.Join(dir, "000003.vlog"), vlog.b)
	older := newLogFile()
	older.add(0, key("a"), []byte("small"))
	suspect, _ := older.add(bitValuePointer, key("k"), pointer(3, n, uint32(len(vlog.b))))
	older.add(0, key("b"), []byte("after"))
	newer := newLogFile()
	newer.add(bitValuePointer, key("k"), pointer(3, n, at))
	writeFile(t, filepath.Join(dir, "00007.mem"), older.b)
	writeFile(t, filepath.Join(dir, "00008.mem"), newer.b)
	cut, err := repairDanglingPointers(dir, slog.New(slog.DiscardHandler))
	if err != nil || cut != int64(suspect) {
		t.Fatalf("cut at %d (%v), want %d", cut, err, suspect)
	}
	o, _ := os.ReadFile(filepath.Join(dir, "00007.mem"))
	if !bytes.Equal(o[:suspect], older.b[:suspect]) || !bytes.Equal(o[suspect:], make([]byte, len(older.b)-int(suspect))) {
		t.Fatal("the older log was not cut at its dangling pointer")
	}
	if nw, _ := os.ReadFile(filepath.Join(dir, "00008.mem")); !bytes.Equal(nw, newer.b) {
		t.Fatal("the newer log changed")
	}
}
