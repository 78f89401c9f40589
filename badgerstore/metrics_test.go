package badgerstore_test

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The store's metrics count each commit, the operations it carried and
// its duration (and the part until Badger applied it), in step with
// BatchStats.
func TestMetricsCountCommitsAndOperations(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, badgerstore.Options{Dir: t.TempDir()})
	ctx := context.Background()
	for _, id := range []string{"a", "b", "c"} {
		c := engine.Checkpoint{ThreadID: "t-" + id, CreatedAt: 1000,
			Run:      &engine.RunRecord{RunID: "run-" + id, ThreadID: "t-" + id, AgentID: "a", Status: engine.RunCreated, CreatedAt: 1, UpdatedAt: 1},
			Messages: []engine.Message{{ID: "m-" + id, Role: engine.RoleUser, Content: []byte(`"hi"`)}}}
		if _, _, err := s.Submit(ctx, c, queued(id, "t-"+id, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	batches, ops := s.BatchStats()
	if batches < 1 || ops < 3 {
		t.Fatalf("BatchStats = %d commits, %d operations; want the 3 submits", batches, ops)
	}
	var b bytes.Buffer
	s.Metrics().WritePrometheus(&b)
	for _, want := range []string{
		`mailbox_store_commits_total{result="ok"} ` + strconv.FormatUint(batches, 10),
		`mailbox_store_committed_operations_total ` + strconv.FormatUint(ops, 10),
		`mailbox_store_commit_seconds_count ` + strconv.FormatUint(batches, 10),
		`mailbox_store_commit_apply_seconds_count ` + strconv.FormatUint(batches, 10),
		`mailbox_store_commits_total{result="error"} 0`,
		// A commit takes about a millisecond: the buckets must resolve it
		// (Prometheus's defaults begin at 5 ms).
		`mailbox_store_commit_seconds_bucket{le="5e-05"} `,
		`mailbox_store_commit_seconds_bucket{le="0.001"} `,
		`mailbox_store_commit_apply_seconds_bucket{le="0.0001"} `,
		`mailbox_store_commit_seconds_bucket{le="10"} ` + strconv.FormatUint(batches, 10),
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("metrics lack %q:\n%s", want, b.String())
		}
	}
}
