package badgerstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// A value-log file with one bad entry: value-log GC, which would stop
// reading the file at that entry and delete it with the live values
// after it, stays off; every live value reads whole, and Verify and the
// metrics name the files.
func TestValueLogGCStaysOffWhileAFileFailsItsChecksum(t *testing.T) {
	ctx := context.Background()
	_, opts, flipped, want := damagedValueLogs(t)
	var logs strings.Builder
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	s := mustOpen(t, opts)
	if n := s.RunValueLogGC(); n != 0 {
		t.Fatalf("value-log GC rewrote %d files with a corrupt one among them", n)
	}
	if got, want := metricLine(t, s, "mailbox_store_value_log_corrupt_files"), fmt.Sprintf("mailbox_store_value_log_corrupt_files %d", flipped); got != want {
		t.Fatalf("metric %q, want %q\nlogs:\n%s", got, want, logs.String())
	}
	if !strings.Contains(logs.String(), "value-log file corrupt") {
		t.Fatalf("no error logged:\n%s", logs.String())
	}
	got, err := s.LoadMessages(ctx, "t2")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%d messages after GC, want %d", len(got), len(want))
	}
	for i, m := range got {
		if m.Message.ID != want[i].ID || !bytes.Equal(m.Message.Content, want[i].Content) {
			t.Fatalf("message %d after GC: id %q, %d bytes; want %q, %d bytes", i, m.Message.ID, len(m.Message.Content), want[i].ID, len(want[i].Content))
		}
	}
	rep, err := s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bad := 0
	for _, p := range rep.Problems {
		if strings.Contains(p, "fails its checksum") {
			bad++
		}
	}
	if bad != flipped {
		t.Fatalf("Verify reported %d corrupt value-log files, want %d: %v", bad, flipped, rep.Problems)
	}
}

// A large value that went bad on the disk reads as corrupt, not as other
// bytes: Badger checks its checksum on every read from the value log.
// (m1 sits in a value-log file below the newest, which Badger's Open
// would cut at a bad entry on its own.)
func TestALargeValueThatWentBadReadsAsCorrupt(t *testing.T) {
	ctx := context.Background()
	dir, opts, s := openForGC(t)
	appendBigMessages(t, s, 40) // 3.2 MB: several value-log files
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	files := vlogFiles(t, dir)
	flipped := false
	for _, name := range files[:len(files)-1] {
		path := filepath.Join(dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.Index(b, []byte(`"m1m1m1m1`)); i >= 0 {
			b[i+1001] ^= 0x20 // 'm' becomes 'M': still a valid message
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			flipped = true
		}
	}
	if !flipped {
		t.Fatalf("m1's value not found in the value-log files below the newest, %v", files)
	}
	opts.Logger = slog.New(slog.NewTextHandler(new(strings.Builder), nil))
	s = mustOpen(t, opts)
	got, err := s.LoadMessages(ctx, "t1")
	if !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("reading the flipped message: %d messages, err %v; want engine.ErrCorrupt", len(got), err)
	}
}

// A value-log file whose last entry went bad, with nothing whole after
// it (as the torn tail a crash or power loss leaves when the batch that
// filled a file was cut before its sync) does not stop value-log GC: GC
// drops only that entry, which reads as corrupt already (here a dead
// one). The store warns, and Verify lists it as a note, not a problem.
func TestValueLogGCRewritesAFileWithATornTail(t *testing.T) {
	ctx := context.Background()
	dir, opts, s := openForGC(t)
	run := createLargeRun(t, s)
	for range 100 {
		checkpointRun(t, s, &run)
	}
	run.State = json.RawMessage(`"small"`) // every large state is garbage
	checkpointRun(t, s, &run)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	files := vlogFiles(t, dir)
	if len(files) < 3 {
		t.Fatalf("value-log files %v; want at least 3", files)
	}
	for _, name := range files[:len(files)-1] {
		path := filepath.Join(dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)-1000] ^= 0x01 // in the last entry's value
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var logs strings.Builder
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	s = mustOpen(t, opts)
	rewritten := 0
	for {
		n := s.RunValueLogGC()
		if n == 0 {
			break
		}
		rewritten += n
	}
	if rewritten == 0 {
		t.Fatalf("value-log GC rewrote nothing; logs:\n%s", logs.String())
	}
	if got := metricLine(t, s, "mailbox_store_value_log_corrupt_files"); got != "mailbox_store_value_log_corrupt_files 0" {
		t.Fatalf("metric %q", got)
	}
	if !strings.Contains(logs.String(), "ends in a torn or bad entry") {
		t.Fatalf("no warning logged:\n%s", logs.String())
	}
	got, err := s.LoadRun(ctx, "r1")
	if err != nil || got == nil || got.Steps != 101 || string(got.State) != `"small"` {
		t.Fatalf("run after GC: %v, %v", got, err)
	}
	verifyClean(t, s)
}

// Verify lists a torn tail as a note.
func TestVerifyNotesATornTail(t *testing.T) {
	dir, opts, s := openForGC(t)
	appendBigMessages(t, s, 40) // 3.2 MB: several value-log files
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// The first file loses its last 100 bytes' worth: zeros, as if the
	// tail of the write that filled it had not reached the disk.
	path := filepath.Join(dir, vlogFiles(t, dir)[0])
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	clear(b[len(b)-100:])
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	opts.Logger = slog.New(slog.NewTextHandler(new(strings.Builder), nil))
	s = mustOpen(t, opts)
	rep, err := s.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Notes) != 1 || !strings.Contains(rep.Notes[0], "nothing whole follows it") {
		t.Fatalf("notes %q, want one torn tail", rep.Notes)
	}
	// Its last message reads as corrupt: a problem.
	if len(rep.Problems) != 1 || !strings.Contains(rep.Problems[0], "decode message") {
		t.Fatalf("problems %q, want the one message that lost its end", rep.Problems)
	}
}

// flipFirstInEachOlderValueLog flips a byte 1000 bytes into the first
// occurrence of marker in every value-log file of dir but the newest, and
// returns how many it flipped (at least 2, or the test fails).
func flipFirstInEachOlderValueLog(t *testing.T, dir, marker string) int {
	t.Helper()
	files := vlogFiles(t, dir)
	flipped := 0
	for _, name := range files[:max(len(files), 1)-1] {
		path := filepath.Join(dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		i := bytes.Index(b, []byte(marker))
		if i < 0 {
			continue
		}
		b[i+1000] ^= 0x01
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		flipped++
	}
	if flipped < 2 {
		t.Fatalf("flipped a byte in %d of the value-log files %v; want at least 2", flipped, files)
	}
	return flipped
}

// createLargeRun creates run r1 on thread t1 with a 100 KiB state, above
// the value threshold: every later version of it leaves the one before
// as garbage in the value log.
func createLargeRun(t *testing.T, s *badgerstore.Store) engine.RunRecord {
	t.Helper()
	state, _ := json.Marshal(strings.Repeat("s", 100<<10))
	run := engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunRunning, State: state, CreatedAt: 1, UpdatedAt: 1}
	if err := s.CreateRun(context.Background(), run); err != nil {
		t.Fatal(err)
	}
	return run
}

// checkpointRun writes the next version of run (one step on).
func checkpointRun(t *testing.T, s *badgerstore.Store, run *engine.RunRecord) {
	t.Helper()
	run.UpdatedAt++
	run.Steps++
	if _, err := s.Checkpoint(context.Background(), engine.Checkpoint{ThreadID: run.ThreadID, Run: run}); err != nil {
		t.Fatal(err)
	}
}

// vlogFiles lists the value-log files of dir, oldest first.
func vlogFiles(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range es {
		if isVlog(e.Name()) {
			files = append(files, e.Name())
		}
	}
	slices.Sort(files)
	return files
}

// Badger deletes a value-log file GC rewrote by truncating it to nothing
// and then unlinking it; a crash between the two leaves an empty file,
// on which Badger's Open fails ("Create a new file"). Open removes it
// first: its values were moved, and synced, before the truncation.
func TestOpenAfterGCTruncatedAFileItDidNotUnlink(t *testing.T) {
	ctx := context.Background()
	dir, opts, s := openForGC(t)
	appendBigMessages(t, s, 40) // 3.2 MB: several value-log files
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// An extra file, as GC leaves one it truncated: below the newest,
	// empty. (Its number is one Badger never used: the test keeps every
	// value it wrote.)
	files := vlogFiles(t, dir)
	if slices.Contains(files, "000000.vlog") {
		t.Fatalf("Badger used file number 0: %v", files)
	}
	if err := os.WriteFile(filepath.Join(dir, "000000.vlog"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s = mustOpen(t, opts)
	msgs, err := s.LoadMessages(ctx, "t1")
	if err != nil || len(msgs) != 40 {
		t.Fatalf("messages after Open: %d, %v", len(msgs), err)
	}
	if got := vlogFiles(t, dir); slices.Contains(got, "000000.vlog") || len(got) != len(files)+1 {
		t.Fatalf("value-log files %v after Open, before %v", got, files)
	}
}

// The same for a memtable log: Badger deletes one whose memtable it
// flushed to a table by truncating and then unlinking it, and an empty
// one fails Badger's Open too. Open removes it first.
func TestOpenAfterAFlushTruncatedAMemtableLogItDidNotUnlink(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data")
	opts := badgerstore.Options{Dir: dir, GCInterval: -1}
	s := mustOpen(t, opts)
	if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t1", Messages: []engine.Message{{ID: "m1", Role: "user", Content: json.RawMessage(`"hello"`)}}, CreatedAt: 1}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "00000.mem")); err == nil {
		t.Fatal("Badger used memtable log number 0")
	}
	if err := os.WriteFile(filepath.Join(dir, "00000.mem"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s = mustOpen(t, opts)
	if msgs, err := s.LoadMessages(ctx, "t1"); err != nil || len(msgs) != 1 {
		t.Fatalf("messages after Open: %d, %v", len(msgs), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "00000.mem")); !os.IsNotExist(err) {
		t.Fatalf("the empty memtable log is still there: %v", err)
	}
}

// appendBigMessages appends n large messages (above the value threshold)
// m1…mn to thread t1, one checkpoint each.
func appendBigMessages(t *testing.T, s *badgerstore.Store, n int) {
	t.Helper()
	for i := range n {
		if _, err := s.Checkpoint(context.Background(), engine.Checkpoint{ThreadID: "t1", ExpectedCount: uint64(i), CreatedAt: int64(i),
			Messages: []engine.Message{bigMessage(fmt.Sprintf("m%d", i+1))}}); err != nil {
			t.Fatal(err)
		}
	}
}

// errAfter is a context whose Err reports context.Canceled from its
// (after+1)-th call on: it ends a walk that checked it once before
// starting.
type errAfter struct {
	context.Context
	calls, after int
}

func (c *errAfter) Err() error {
	if c.calls++; c.calls > c.after {
		return context.Canceled
	}
	return nil
}

// Verify stops when its context ends: in its walk of the records (it
// reads every key) and in its read of the value-log files.
func TestVerifyStopsWhenItsContextEnds(t *testing.T) {
	t.Run("walk", func(t *testing.T) {
		s := mustOpen(t, badgerstore.Options{Dir: t.TempDir(), GCInterval: -1})
		ds := make([]engine.Dispatch, 3000)
		for i := range ds {
			ds[i] = queued(fmt.Sprintf("d%d", i), fmt.Sprintf("t%d", i%50), 1)
		}
		if err := s.EnqueueMany(ds); err != nil {
			t.Fatal(err)
		}
		ctx := &errAfter{Context: context.Background(), after: 1} // the check before the walk passes
		rep, err := s.Verify(ctx)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("verify with its context ended during the walk: %v (report %+v)", err, rep)
		}
		if rep.Dispatches >= len(ds) {
			t.Fatalf("the walk read all %d dispatches after its context ended", rep.Dispatches)
		}
		verifyClean(t, s)
	})
	t.Run("value log", func(t *testing.T) {
		_, _, s := openForGC(t)
		t.Cleanup(func() { s.Close() })
		appendBigMessages(t, s, 40) // 3.2 MB: several value-log files
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		files := 0
		s.BeforeValueLogCheck(func() {
			if files++; files == 1 {
				cancel()
			}
		})
		_, err := s.Verify(ctx)
		if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), ".vlog") {
			t.Fatalf("verify with its context ended before the value-log check: %v", err)
		}
		if files != 1 {
			t.Fatalf("verify went on to %d value-log files after its context ended", files)
		}
		s.BeforeValueLogCheck(nil)
		verifyClean(t, s)
	})
}

// damagedValueLogs is a closed store's directory whose older value-log
// files each hold one bad byte ahead of live messages, its options, how
// many files are damaged, and the live messages of thread t2.
func damagedValueLogs(t *testing.T) (string, badgerstore.Options, int, []engine.Message) {
	t.Helper()
	ctx := context.Background()
	dir, opts, s := openForGC(t)
	var want []engine.Message
	// Garbage in every value-log file: 100 KiB run states, each version
	// replaced by the next; between them live 80 KiB messages.
	run := createLargeRun(t, s)
	for i := range 40 {
		for range 3 {
			checkpointRun(t, s, &run)
		}
		m := bigMessage(fmt.Sprintf("m%02d-", i))
		if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: "t2", ExpectedCount: uint64(i), CreatedAt: int64(i), Messages: []engine.Message{m}}); err != nil {
			t.Fatal(err)
		}
		want = append(want, m)
	}
	run.State = json.RawMessage(`"small"`) // the live state is small: every large one is garbage
	checkpointRun(t, s, &run)
	if err := s.Close(); err != nil { // compacts: the value log learns its garbage
		t.Fatal(err)
	}
	// One byte flips in the first run state of every value-log file but
	// the newest, ahead of live messages in the same file. (The newest is
	// Badger's own to mend: its Open cuts that file at its first bad
	// entry, as it cuts a torn write.)
	return dir, opts, flipFirstInEachOlderValueLog(t, dir, `"ssssssssssssssss`), want
}

// The value-log files are read for damage soon after the start, not
// first at the first GC: the gauge read 0 for five minutes after a start
// on a damaged file (found by review).
func TestValueLogDamageIsFoundSoonAfterTheStart(t *testing.T) {
	_, opts, flipped, _ := damagedValueLogs(t)
	defer badgerstore.SetFirstValueLogCheck(50 * time.Millisecond)()
	opts.GCInterval = time.Hour
	s := mustOpen(t, opts)
	want := fmt.Sprintf("mailbox_store_value_log_corrupt_files %d", flipped)
	deadline := time.Now().Add(10 * time.Second)
	for metricLine(t, s, "mailbox_store_value_log_corrupt_files") != want {
		if time.Now().After(deadline) {
			t.Fatalf("metric %q, want %q", metricLine(t, s, "mailbox_store_value_log_corrupt_files"), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
