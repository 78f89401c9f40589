package badgerstore

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// checkValueLog accepts a file whose entries all hold up to its end, or
// up to zeros that run to it; one that ends in a bad entry with nothing
// whole after it is a torn tail; one with whole entries after a bad one
// is damaged.
func TestCheckValueLogReadsTheFileToItsEnd(t *testing.T) {
	wholeFile := newLogFile()
	wholeFile.add(0, txnKey("a", 1), []byte("first value"))
	second, _ := wholeFile.add(0, txnKey("b", 1), []byte("second value"))
	flip := func(at uint32) []byte {
		b := append([]byte(nil), wholeFile.b...)
		b[at] ^= 0x01
		return b
	}
	third := newLogFile()
	third.add(0, txnKey("c", 1), []byte("third value"))
	entryC := third.b[logFileHeader:]
	const whole = -1 // after: the file reads whole
	cases := []struct {
		name  string
		b     []byte
		after int // whole entries after the bad one (0: a torn tail)
	}{
		{"whole", wholeFile.b, whole},
		{"zeros after the last entry", cat(wholeFile.b, make([]byte, 300)), whole},
		{"header only", wholeFile.b[:logFileHeader], whole},
		{"empty (truncated by GC)", nil, whole},
		{"a flipped byte in the first entry", flip(logFileHeader + 8), 1},
		{"a flipped byte in the first entry's length", flip(logFileHeader + 2), 1},
		{"a flipped byte in the last entry: a torn tail", flip(second + 8), 0},
		{"a torn last entry", wholeFile.b[:len(wholeFile.b)-3], 0},
		{"bytes after zeros: a torn tail", cat(wholeFile.b, make([]byte, 10), []byte{7}), 0},
		{"a whole entry after zeros (pages written back out of order)", cat(wholeFile.b, make([]byte, 100), entryC), 1},
		{"a whole entry after a torn one", cat(wholeFile.b[:len(wholeFile.b)-3], entryC), 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "000001.vlog")
			writeFile(t, path, c.b)
			err := checkValueLog(path, nil)
			var d *vlogDamage
			switch {
			case c.after == whole && err != nil:
				t.Fatalf("checkValueLog: %v; want the file whole", err)
			case c.after == 0 && !errors.Is(err, errTornTail):
				t.Fatalf("checkValueLog: %v; want a torn tail", err)
			case c.after > 0 && (!errors.As(err, &d) || !errors.Is(err, ErrValueLogCorrupt)):
				t.Fatalf("checkValueLog: %v; want damage", err)
			case c.after > 0 && d.after != c.after:
				t.Fatalf("damage %v: %d whole entries after it, want %d", d, d.after, c.after)
			}
		})
	}
}

// An entry that failed once and reads whole the second time is a read
// error, not a verdict.
func TestEntriesAfterAWholeEntryIsAReadError(t *testing.T) {
	l := newLogFile()
	l.add(0, txnKey("a", 1), []byte("first value"))
	path := filepath.Join(t.TempDir(), "000001.vlog")
	writeFile(t, path, l.b)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := entriesAfter(f, logFileHeader, int64(len(l.b)), nil); !errors.Is(err, errReadAgain) {
		t.Fatalf("entriesAfter at a whole entry: %v, want errReadAgain", err)
	}
}

// A check the store's Close stops ends without a verdict.
func TestCheckValueLogStops(t *testing.T) {
	l := newLogFile()
	for i := range 100 {
		l.add(0, txnKey(strconv.Itoa(i), 1), make([]byte, 1000))
	}
	path := filepath.Join(t.TempDir(), "000001.vlog")
	writeFile(t, path, l.b)
	stop := make(chan struct{})
	close(stop)
	if err := checkValueLog(path, stop); !errors.Is(err, errCheckStopped) {
		t.Fatalf("checkValueLog with stop closed: %v", err)
	}
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// BenchmarkCheckValueLog: reading a full 64 MiB value-log file of 80 KiB
// random values, as the check does once per file before value-log GC may
// run; damaged: a byte flipped in its first entry, so that the rest is
// searched at every offset for whole entries (random bytes are the
// search's worst case).
func BenchmarkCheckValueLog(b *testing.B) {
	rng := rand.NewChaCha8([32]byte{1})
	l := newLogFile()
	value := make([]byte, 80<<10)
	for i := 0; len(l.b) < 64<<20; i++ {
		_, _ = rng.Read(value)
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
				if err := checkValueLog(path, nil); damaged != (err != nil) {
					b.Fatal(err)
				}
			}
		})
	}
}

// FuzzWholeEntryAt: the search for entries after a bad one never panics,
// and an entry it accepts is one readLogEntry reads whole, of the same
// length, with a versioned key and no pointer or transaction bits.
func FuzzWholeEntryAt(f *testing.F) {
	f.Add(appendLogEntry(nil, 0, txnKey("k", 1), []byte("value")))
	f.Add(appendLogEntry(nil, bitTxn, txnKey("k", 1), []byte("value")))
	f.Add(append([]byte{0, 0}, make([]byte, 30)...))
	f.Add([]byte{0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		n := wholeEntryAt(b)
		if n == 0 {
			return
		}
		if n > len(b) {
			t.Fatalf("an entry of %d bytes in %d", n, len(b))
		}
		var buf []byte
		e, m, err := readLogEntry(bufio.NewReader(bytes.NewReader(b)), 0, int64(len(b)), &buf)
		if err != nil || m != int64(n) {
			t.Fatalf("wholeEntryAt took %d bytes; readLogEntry read %d, %v", n, m, err)
		}
		if len(e.key) <= 8 || e.meta&(bitValuePointer|bitTxn|bitFinTxn) != 0 {
			t.Fatalf("accepted key %q, meta %x", e.key, e.meta)
		}
	})
}
