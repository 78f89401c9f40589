package badgerstore

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// powerLossWatch keeps, for each value-log file, its content as of its
// last sync (the sync hook is told each file just before its fdatasync,
// when the page cache holds exactly what the sync makes durable), and
// takes copies of the data directory as a power loss at that moment
// leaves it: every memtable log and table as it is in the page cache (its
// pages all written back: the worst case for value pointers), every
// value-log file as it was last synced (the values written since lost).
type powerLossWatch struct {
	dir     string
	mu      sync.Mutex
	durable map[string][]byte
}

func (p *powerLossWatch) hook(name string) error {
	if !strings.HasSuffix(name, vlogExt) {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(p.dir, name))
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.durable[name] = b
	p.mu.Unlock()
	return nil
}

// snapshot copies the directory as a power loss now leaves it, and calls
// during (holding off every sync meanwhile) so that the caller can note
// what was acknowledged by then.
func (p *powerLossWatch) snapshot(t *testing.T, to string, during func()) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	during()
	if err := os.MkdirAll(to, 0o750); err != nil {
		t.Fatal(err)
	}
	es, err := os.ReadDir(p.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(p.dir, e.Name()))
		if err != nil {
			if os.IsNotExist(err) {
				continue // deleted meanwhile (a flushed memtable's log)
			}
			t.Fatal(err)
		}
		if strings.HasSuffix(e.Name(), vlogExt) {
			d, ok := p.durable[e.Name()]
			lost := make([]byte, len(b))
			copy(lost, b[:min(len(b), logFileHeader)]) // never synced: its header only
			if ok {
				copy(lost, d)
			}
			b = lost
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// Power losses at random moments of a workload of small and large (value
// log) messages: each copy opens, passes Verify, reads every message
// (none corrupt or cut short), and holds every message acknowledged
// before the power went, in order.
func TestPowerLossAtRandomMomentsLosesNothingAcknowledged(t *testing.T) {
	powerLossRun(t, false)
}

// The same with value-log GC running beside the workload, whose threads
// also rewrite a large run record (garbage for GC) after each message.
func TestPowerLossDuringValueLogGCLosesNothingAcknowledged(t *testing.T) {
	powerLossRun(t, true)
}

func powerLossRun(t *testing.T, gc bool) {
	const threads = 4
	dir := filepath.Join(t.TempDir(), "data")
	watch := &powerLossWatch{dir: dir, durable: make(map[string][]byte)}
	opts := Options{Dir: dir, GCInterval: -1, MemTableSize: 2 << 20, ValueLogFileSize: 2 << 20}
	content := func(id string) json.RawMessage {
		n := 40
		if id[len(id)-1]%2 == 0 {
			n = 70 << 10 // above the 64 KiB ValueThreshold: the value log
		}
		b, _ := json.Marshal(strings.Repeat(id+".", n/(len(id)+1)+1))
		return b
	}
	var (
		mu     sync.Mutex
		acked  [threads][]string
		gcRuns atomic.Int64
	)
	ctx := context.Background()
	// write appends message i of a thread and, with gc, rewrites the
	// thread's large run record (garbage for GC).
	write := func(s *Store, th, i int) (string, error) {
		thread := fmt.Sprintf("t%d", th)
		id := fmt.Sprintf("%s-m%d", thread, i)
		if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: thread, ExpectedCount: uint64(i), CreatedAt: int64(i),
			Messages: []engine.Message{{ID: id, Role: "user", Content: content(id)}}}); err != nil {
			return "", err
		}
		if gc {
			run := engine.RunRecord{RunID: "r-" + thread, ThreadID: thread, AgentID: "a", Status: engine.RunRunning,
				State: content(id + "0"), CreatedAt: 1, UpdatedAt: int64(i + 1), Steps: int64(i)}
			if _, err := s.Checkpoint(ctx, engine.Checkpoint{ThreadID: thread, ExpectedCount: uint64(i + 1), Run: &run}); err != nil {
				return "", err
			}
		}
		return id, nil
	}
	start := 0
	if gc {
		// Garbage that GC will find: flushed and compacted at Close.
		pre := opts
		pre.compactL0OnClose = true
		s, err := Open(pre)
		if err != nil {
			t.Fatal(err)
		}
		for start = 0; start < 12; start++ {
			for th := range threads {
				id, err := write(s, th, start)
				if err != nil {
					t.Fatal(err)
				}
				acked[th] = append(acked[th], id)
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	opts.syncedHook = watch.hook
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errc := make(chan error, threads)
	for th := range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := start; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id, err := write(s, th, i)
				if err != nil {
					errc <- err
					return
				}
				mu.Lock()
				acked[th] = append(acked[th], id)
				mu.Unlock()
			}
		}()
	}
	if gc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
				gcRuns.Add(int64(s.RunValueLogGC()))
			}
		}()
	}
	type snap struct {
		dir   string
		acked [threads][]string
	}
	var snaps []snap
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	for i := range 12 {
		time.Sleep(time.Duration(20+rng.IntN(60)) * time.Millisecond)
		sn := snap{dir: filepath.Join(t.TempDir(), fmt.Sprintf("power-loss-%d", i))}
		watch.snapshot(t, sn.dir, func() {
			mu.Lock()
			for th := range threads {
				sn.acked[th] = append([]string(nil), acked[th]...)
			}
			mu.Unlock()
		})
		snaps = append(snaps, sn)
	}
	close(stop)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	cuts := 0 // copies whose Open cut a tail
	for i, sn := range snaps {
		s2, err := Open(Options{Dir: sn.dir, GCInterval: -1, MemTableSize: 2 << 20, ValueLogFileSize: 2 << 20})
		if err != nil {
			t.Fatalf("power loss %d: open: %v", i, err)
		}
		cuts += int(s2.metrics.logCuts.Get())
		rep, err := s2.Verify(ctx)
		if err != nil || len(rep.Problems) > 0 {
			t.Fatalf("power loss %d: verify: %v %v", i, err, rep.Problems)
		}
		for th := range threads {
			msgs, err := s2.LoadMessages(ctx, fmt.Sprintf("t%d", th))
			if err != nil {
				t.Fatalf("power loss %d: thread t%d: %v", i, th, err)
			}
			if len(msgs) < len(sn.acked[th]) {
				t.Fatalf("power loss %d: thread t%d holds %d messages, %d were acknowledged", i, th, len(msgs), len(sn.acked[th]))
			}
			for j, m := range msgs {
				want := fmt.Sprintf("t%d-m%d", th, j)
				if m.MessageID != want || string(m.Message.Content) != string(content(want)) {
					t.Fatalf("power loss %d: thread t%d message %d is %s (%d bytes), want %s", i, th, j, m.MessageID, len(m.Message.Content), want)
				}
			}
		}
		if err := s2.Close(); err != nil {
			t.Fatal(err)
		}
	}
	var n int
	for th := range threads {
		n += len(snaps[len(snaps)-1].acked[th])
	}
	t.Logf("%d power losses, %d of them cut at Open; %d messages acknowledged before the last; value-log files GC rewrote: %d", len(snaps), cuts, n, gcRuns.Load())
	if gc && gcRuns.Load() == 0 {
		t.Fatal("GC rewrote no file: the test needs moves")
	}
}
