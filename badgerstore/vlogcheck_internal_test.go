package badgerstore

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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
		after   []string // keys of the whole entries found after the bad one
	}{
		{"whole", whole.b, false, nil},
		{"zeros after the last entry", append(append([]byte(nil), whole.b...), make([]byte, 300)...), false, nil},
		{"header only", whole.b[:logFileHeader], false, nil},
		{"empty (truncated by GC)", nil, false, nil},
		{"a flipped byte in the first entry", flip(logFileHeader + 8), true, []string{"b"}},
		{"a flipped byte in the first entry's length", flip(logFileHeader + 2), true, []string{"b"}},
		{"a flipped byte in the last entry", flip(second + 8), true, nil},
		{"a torn last entry", whole.b[:len(whole.b)-3], true, nil},
		{"bytes after zeros", append(append(append([]byte(nil), whole.b...), make([]byte, 10)...), 7), true, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "000001.vlog")
			writeFile(t, path, c.b)
			err := checkValueLog(path)
			if c.corrupt != errors.Is(err, errValueLogCorrupt) || !c.corrupt && err != nil {
				t.Fatalf("checkValueLog: %v; want corrupt %v", err, c.corrupt)
			}
			var d *vlogDamage
			if !c.corrupt || !errors.As(err, &d) {
				return
			}
			var keys []string
			for _, e := range d.after {
				if e.version != 1 {
					t.Errorf("entry %q after the damage: version %d, want 1", e.key, e.version)
				}
				keys = append(keys, string(e.key))
			}
			if !slices.Equal(keys, c.after) {
				t.Fatalf("entries after the damage %q, want %q", keys, c.after)
			}
		})
	}
}

// BenchmarkCheckValueLog: reading a full 64 MiB value-log file of 80 KiB
// text values, as the check does once per file before value-log GC may run;
// damaged: a byte flipped in its first entry, so that the rest is
// searched at every offset for whole entries.
func BenchmarkCheckValueLog(b *testing.B) {
	l := newLogFile()
	value := bytes.Repeat([]byte(`{"role":"user","content":"hello there"} `), 2000) // about 80 KiB of text
	for i := 0; len(l.b) < 64<<20; i++ {
		l.add(0, txnKey(strconv.Itoa(i), 1), value)
	}
	for _, damaged := range []bool{false, true} {
		b.Run(fmt.Sprintf("damaged=%v", damaged), func(b *testing.B) {
			f := append([]byte(nil), l.b...)
			if damaged {
				f[logFileHeader+8] ^= 0x01
			}
			path := filepath.Join(b.TempDir(), "000001.vlog")
			if err := os.WriteFile(path, f, 0o600); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(f)))
			for b.Loop() {
				if err := checkValueLog(path); damaged != (err != nil) {
					b.Fatal(err)
				}
			}
		})
	}
}
