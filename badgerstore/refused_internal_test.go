package badgerstore

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
)

// Operations the writer refuses without a commit — the disk below
// MinFreeBytes — are counted, and the free space is a gauge (found by
// review: with the disk full every submit failed and no failure showed in
// the metrics).
func TestRefusedWritesAndFreeSpaceAreMetrics(t *testing.T) {
	var logs syncbuf.Buffer
	s, err := Open(Options{Dir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	d := engine.Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Priority: engine.DefaultPriority, Status: engine.StatusQueued, AvailableAt: 1, CreatedAt: 1, MaxAttempts: 5}
	if _, err := s.Enqueue(ctx, d); err != nil {
		t.Fatal(err)
	}
	s.opts.MinFreeBytes = 1 << 62 // the writer's goroutine reads it at its next check
	s.space.checked = time.Time{} // checked at once, not after spaceCheckEvery
	d.DispatchID = "d2"
	if _, err := s.Enqueue(ctx, d); !errors.Is(err, engine.ErrUnavailable) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("enqueue on a full disk: %v", err)
	}
	var b strings.Builder
	s.Metrics().WritePrometheus(&b)
	out := b.String()
	for _, want := range []string{
		`mailbox_store_refused_operations_total{reason="disk_full"} 1`,
		`mailbox_store_refused_operations_total{reason="sync_failed"} 0`,
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("missing %s", want)
		}
	}
	// The change is logged once each way (found by review: nothing told
	// of a full disk but each refused operation's own warning).
	if want := `level=ERROR msg="the disk is full: the store refuses writes (503) until space returns"`; strings.Count(logs.String(), want) != 1 {
		t.Errorf("want one %s in:\n%s", want, logs.String())
	}
	d.DispatchID = "d3"
	if _, err := s.Enqueue(ctx, d); err == nil {
		t.Fatal("a second enqueue on a full disk taken")
	}
	if strings.Count(logs.String(), "level=ERROR") != 1 {
		t.Errorf("the full disk logged at every refusal:\n%s", logs.String())
	}
	s.opts.MinFreeBytes = 0 // space returns (the guard rereads statfs while low)
	d.DispatchID = "d4"
	if _, err := s.Enqueue(ctx, d); err != nil {
		t.Fatalf("enqueue after space returned: %v", err)
	}
	if want := `level=WARN msg="disk space returned: the store takes writes again"`; !strings.Contains(logs.String(), want) {
		t.Errorf("want %s in:\n%s", want, logs.String())
	}
	if !strings.Contains(out, "mailbox_store_disk_min_free_bytes ") || !strings.Contains(out, "mailbox_store_disk_free_bytes ") || strings.Contains(out, "mailbox_store_disk_free_bytes 0\n") || strings.Contains(out, "mailbox_store_disk_free_bytes NaN") {
		t.Errorf("no free space gauge:\n%s", out)
	}
}
