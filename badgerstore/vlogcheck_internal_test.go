package badgerstore

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// checkValueLog accepts a file whose entries all hold up to its end, or
// up to zeros that run to it, and no other.
func TestCheckValueLogReadsTheFileToItsEnd(t *testing.T) {
	whole := newLogFile()
	whole.add(0, txnKey("a", 1), []byte("first value"))
	second, _ := whole.add(0, txnKey("b", 1), []byte("second value"))
	flip := func(at uint32) []byte {
		b := append([]byte(nil), whole.b...)
		b[at] ^= 0x01
		return b
	}
	cases := []struct {
		name    string
		b       []byte
		corrupt bool
	}{
		{"whole", whole.b, false},
		{"zeros after the last entry", append(append([]byte(nil), whole.b...), make([]byte, 300)...), false},
		{"header only", whole.b[:logFileHeader], false},
		{"empty (truncated by GC)", nil, false},
		{"a flipped byte in the first entry", flip(logFileHeader + 8), true},
		{"a flipped byte in the last entry", flip(second + 8), true},
		{"a torn last entry", whole.b[:len(whole.b)-3], true},
		{"bytes after zeros", append(append(append([]byte(nil), whole.b...), make([]byte, 10)...), 7), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "000001.vlog")
			writeFile(t, path, c.b)
			err := checkValueLog(path)
			if c.corrupt != errors.Is(err, errValueLogCorrupt) || !c.corrupt && err != nil {
				t.Fatalf("checkValueLog: %v; want corrupt %v", err, c.corrupt)
			}
		})
	}
}

// BenchmarkCheckValueLog: reading a full 64 MiB value-log file of 80 KiB
// values, as the check does once per file before value-log GC may run.
func BenchmarkCheckValueLog(b *testing.B) {
	l := newLogFile()
	value := make([]byte, 80<<10)
	for i := 0; len(l.b) < 64<<20; i++ {
		l.add(0, txnKey(strconv.Itoa(i), 1), value)
	}
	path := filepath.Join(b.TempDir(), "000001.vlog")
	if err := os.WriteFile(path, l.b, 0o600); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(l.b)))
	for b.Loop() {
		if err := checkValueLog(path); err != nil {
			b.Fatal(err)
		}
	}
}
