package badgerstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// syncLog records the log files a store syncs, in order; fail, when set,
// decides which syncs fail (fault injection).
type syncLog struct {
	mu    sync.Mutex
	names []string
	fail  func(name string) error
}

func (l *syncLog) hook(name string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.names = append(l.names, name)
	if l.fail != nil {
		return l.fail(name)
	}
	return nil
}

// take returns the names recorded since the last take.
func (l *syncLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.names
	l.names = nil
	return out
}

func (l *syncLog) setFail(f func(string) error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.fail = f
}

// openSynced opens a store on dir whose log syncs are recorded in the
// returned log.
func openSynced(t *testing.T, opts Options) (*Store, *syncLog) {
	t.Helper()
	l := &syncLog{}
	opts.syncedHook = l.hook
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, l
}

// logFiles lists dir's files with extension ext.
func logFiles(t *testing.T, dir, ext string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ext) {
			out = append(out, e.Name())
		}
	}
	return out
}

func createRun(t *testing.T, s *Store, id string, stateBytes int) {
	t.Helper()
	r := engine.RunRecord{RunID: id, ThreadID: "t-" + id, AgentID: "a", Status: engine.RunRunning, State: bigText(stateBytes), CreatedAt: 1, UpdatedAt: 1}
	if err := s.CreateRun(context.Background(), r); err != nil {
		t.Fatal(err)
	}
}

// The tail follower syncs the file it follows and, when Badger has moved
// on to newer files, each of them in turn, ending on the newest.
func TestLogTailFollowsEveryFileBadgerMovesOnTo(t *testing.T) {
	dir := t.TempDir()
	touch := func(name string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	touch("00001.mem")
	touch("00002.mem")
	touch("000001.vlog")
	touch("000001.sst")
	l := &syncLog{}
	opts := Options{Dir: dir}
	if err := opts.validate(); err != nil {
		t.Fatal(err)
	}
	d, err := openDurability(opts, 0, l.hook)
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	if got, want := l.take(), []string{"000001.vlog", "00001.mem", "00002.mem"}; !slices.Equal(got, want) {
		t.Fatalf("open synced %v, want %v", got, want)
	}
	if err := d.afterCommit(batchReach{bytes: 100}); err != nil {
		t.Fatal(err)
	}
	if got := l.take(); !slices.Equal(got, []string{"00002.mem"}) {
		t.Fatalf("a commit synced %v, want the newest memtable log only", got)
	}
	touch("00003.mem")
	touch("00004.mem")
	touch("000002.vlog")
	if err := d.afterCommit(batchReach{values: true, bytes: 100}); err != nil {
		t.Fatal(err)
	}
	want := []string{"000001.vlog", "000002.vlog", "00002.mem", "00003.mem", "00004.mem"}
	if got := l.take(); !slices.Equal(got, want) {
		t.Fatalf("after Badger moved on, a commit with a large value synced %v, want %v", got, want)
	}
	if d.memFill != 100 {
		t.Fatalf("memtable fill after a new memtable %d, want the batch's 100", d.memFill)
	}
	// A large batch syncs every log from the followed ones on.
	touch("00005.mem")
	if err := d.afterCommit(batchReach{large: true}); err != nil {
		t.Fatal(err)
	}
	want = []string{"000002.vlog", "00004.mem", "00005.mem"}
	if got := l.take(); !slices.Equal(got, want) {
		t.Fatalf("a large batch synced %v, want %v", got, want)
	}
	if d.gcRoom() {
		t.Fatal("after a large batch the memtable's fill is unknown: no room for GC")
	}
}

// An operation is answered only once the memtable log holding its writes
// is synced; a failed sync fails the operation, and the store goes on.
func TestAnswerWaitsForTheMemtableLogSync(t *testing.T) {
	s, l := openSynced(t, Options{Dir: t.TempDir()})
	entered, release := make(chan string, 1), make(chan error)
	l.setFail(func(name string) error {
		if !strings.HasSuffix(name, memExt) {
			return nil
		}
		entered <- name
		return <-release
	})
	done := make(chan error, 1)
	go func() {
		done <- s.CreateRun(context.Background(), engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunRunning, CreatedAt: 1, UpdatedAt: 1})
	}()
	<-entered
	select {
	case err := <-done:
		t.Fatalf("answered (%v) while its memtable log was being synced", err)
	default:
	}
	release <- nil
	if err := await(t, "create run", done); err != nil {
		t.Fatal(err)
	}

	// A failed sync: the operation fails as unavailable.
	go func() {
		done <- s.CreateRun(context.Background(), engine.RunRecord{RunID: "r2", ThreadID: "t2", AgentID: "a", Status: engine.RunRunning, CreatedAt: 1, UpdatedAt: 1})
	}()
	<-entered
	release <- errors.New("injected: EIO")
	if err := await(t, "create run", done); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("a failed log sync answered %v, want ErrUnavailable", err)
	}
	l.setFail(nil)
	createRun(t, s, "r3", 10)
	if r, err := s.LoadRun(context.Background(), "r3"); err != nil || r == nil {
		t.Fatalf("after a failed sync the store goes on: %v %v", r, err)
	}
}

// Across memtables: every memtable log Badger writes is synced (the
// follower moves on from each to the next), ending on the newest.
func TestLogSyncFollowsMemtableRotations(t *testing.T) {
	dir := t.TempDir()
	s, l := openSynced(t, Options{Dir: dir, MemTableSize: 1 << 20})
	l.take()
	for i := range 400 {
		createRun(t, s, fmt.Sprintf("r%03d", i), 8<<10) // in the LSM tree: 3 MiB in all
	}
	var fids []int
	for _, name := range l.take() {
		if fid, ok := logFid(name, memExt); ok && !slices.Contains(fids, fid) {
			fids = append(fids, fid)
		}
	}
	if len(fids) < 3 {
		t.Fatalf("synced memtable logs %v: expected the writes to span at least three memtables", fids)
	}
	for i := 1; i < len(fids); i++ {
		if fids[i] != fids[i-1]+1 {
			t.Fatalf("synced memtable logs %v: not every one in order", fids)
		}
	}
	for _, name := range logFiles(t, dir, memExt) {
		if fid, _ := logFid(name, memExt); fid > fids[len(fids)-1] {
			t.Fatalf("memtable log %s is newer than the last synced (%v)", name, fids)
		}
	}
}

// A value large enough for the value log has it synced before the
// memtable log that will point at it.
func TestLargeValueSyncsTheValueLogFirst(t *testing.T) {
	s, l := openSynced(t, Options{Dir: t.TempDir()})
	l.take()
	createRun(t, s, "small", 100)
	if got := l.take(); slices.ContainsFunc(got, func(n string) bool { return strings.HasSuffix(n, vlogExt) }) {
		t.Fatalf("a small record synced the value log: %v", got)
	}
	createRun(t, s, "large", 100<<10)
	got := l.take()
	v := slices.IndexFunc(got, func(n string) bool { return strings.HasSuffix(n, vlogExt) })
	m := slices.IndexFunc(got, func(n string) bool { return strings.HasSuffix(n, memExt) })
	if v < 0 || m < 0 || v > m {
		t.Fatalf("a large record synced %v: want the value log, then the memtable log", got)
	}
}

// gcGarbage leaves a value log whose files are mostly old versions of a
// large record, reopened with the returned log.
func gcGarbage(t *testing.T, opts Options) (*Store, *syncLog) {
	t.Helper()
	opts.ValueLogFileSize, opts.GCInterval, opts.compactL0OnClose = 2<<20, -1, true
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	run := engine.RunRecord{RunID: "r1", ThreadID: "t1", AgentID: "a", Status: engine.RunRunning, State: bigText(100 << 10), CreatedAt: 1, UpdatedAt: 1}
	for i := range 100 {
		run.UpdatedAt, run.Steps = int64(2+i), int64(i)
		upsertRun(t, s, run)
	}
	if err := s.Close(); err != nil { // flush + compaction: the value log learns its garbage
		t.Fatal(err)
	}
	return openSynced(t, opts)
}

// Value-log GC syncs every log file before Badger deletes the file it
// rewrote (an iterator holds the deletion back), so a power failure
// cannot lose the rewritten values with the old file gone: the syncs
// after the first file's rewrite see every file still there, those after
// the second see one gone, and so on.
func TestValueLogGCSyncsBeforeItDeletes(t *testing.T) {
	dir := t.TempDir()
	s, l := gcGarbage(t, Options{Dir: dir})
	l.take()
	before := logFiles(t, dir, vlogExt)
	var missing []int // at each sync during GC, how many of before are gone
	l.setFail(func(string) error {
		n := 0
		for _, name := range before {
			if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
				n++
			}
		}
		if len(missing) == 0 || missing[len(missing)-1] != n {
			missing = append(missing, n)
		}
		return nil
	})
	n := s.RunValueLogGC()
	l.setFail(nil)
	after := logFiles(t, dir, vlogExt)
	want := make([]int, n+1)
	for i := range want {
		want[i] = i
	}
	if n == 0 || len(before)-len(after) != n || !slices.Equal(missing, want) {
		t.Fatalf("GC rewrote %d files, value log %v → %v; files gone at the syncs during GC %v, want %v", n, before, after, missing, want)
	}
	r, err := s.LoadRun(context.Background(), "r1")
	if err != nil || r == nil || r.Steps != 99 {
		t.Fatalf("run after GC: %v %v", r, err)
	}
}

// GC does not start while the memtable may not have room for what it
// writes (see durability.gcRoom).
func TestValueLogGCWaitsForMemtableRoom(t *testing.T) {
	s, _ := gcGarbage(t, Options{Dir: t.TempDir()})
	s.dur.mu.Lock()
	s.dur.memFill = s.opts.MemTableSize / 2
	s.dur.mu.Unlock()
	if n := s.RunValueLogGC(); n != 0 {
		t.Fatalf("GC rewrote %d files into a half-full memtable", n)
	}
	s.dur.mu.Lock()
	s.dur.memFill = 0
	s.dur.mu.Unlock()
	if n := s.RunValueLogGC(); n == 0 {
		t.Fatal("GC rewrote nothing with the memtable empty")
	}
}

// Open syncs every log file it finds: what a crashed process left in the
// page cache unsynced is durable before anything is built on it.
func TestOpenSyncsEveryLogFile(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSynced(t, Options{Dir: dir})
	createRun(t, s, "small", 100)
	createRun(t, s, "large", 100<<10)
	// A copy of the open store's files is what a crash leaves behind:
	// its memtable log is replayed at Open.
	crashed := t.TempDir()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		copyFile(t, filepath.Join(dir, e.Name()), filepath.Join(crashed, e.Name()))
	}
	s2, l := openSynced(t, Options{Dir: crashed})
	synced := l.take()
	present := append(logFiles(t, crashed, memExt), logFiles(t, crashed, vlogExt)...)
	for _, name := range present {
		if !slices.Contains(synced, name) {
			t.Fatalf("Open synced %v, not %s", synced, name)
		}
	}
	if r, err := s2.LoadRun(context.Background(), "large"); err != nil || r == nil || !json.Valid(r.State) {
		t.Fatalf("the crashed copy's run: %v %v", r, err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
}
