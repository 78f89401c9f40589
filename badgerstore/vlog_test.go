package badgerstore_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
)

func vlogBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".vlog") {
			fi, err := e.Info()
			if err != nil {
				t.Fatal(err)
			}
			n += fi.Size()
		}
	}
	return n
}

// TestValueLogGCReclaimsRewrittenRecords rewrites a run record whose state
// is larger than ValueThreshold (so it lives in the value log) many times,
// and checks that value-log GC gives the space of the old versions back.
func TestValueLogGCReclaimsRewrittenRecords(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "data")
	opts := badgerstore.CompactOnClose(badgerstore.Options{Dir: dir, ValueLogFileSize: 2 << 20, GCInterval: -1})
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	run := createLargeRun(t, s)
	for range 200 {
		checkpointRun(t, s, &run)
	}
	// Closing flushes the memtables and compacts level 0: the old versions
	// are dropped and the value log learns which entries are garbage.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustOpen(t, opts)
	before := vlogBytes(t, dir)
	rewritten := s.RunValueLogGC()
	after := vlogBytes(t, dir)
	if rewritten == 0 || after >= before {
		t.Fatalf("value-log GC rewrote %d files; value log %d → %d bytes", rewritten, before, after)
	}
	t.Logf("value-log GC rewrote %d files: %d → %d bytes", rewritten, before, after)
	if got, want := metricLine(t, s, `mailbox_store_value_log_gc_total{result="rewritten"}`), fmt.Sprintf(`mailbox_store_value_log_gc_total{result="rewritten"} %d`, rewritten); got != want {
		t.Fatalf("metric %q, want %q", got, want)
	}
	got, err := s.LoadRun(ctx, "r1")
	if err != nil || got == nil || got.Steps != 200 || !bytes.Equal(got.State, run.State) {
		t.Fatalf("run after GC: steps %v err %v", got, err)
	}
	verifyClean(t, s)
}
