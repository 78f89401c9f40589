package badgerstore

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"hash/crc32"
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
