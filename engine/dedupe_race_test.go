package engine_test

import (
	"context"
	"sync"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Foreground submits of one thread with one idempotency key at once make
// one dispatch, which every one of them is answered with: both found no
// dispatch with the key, and the second's interrupt superseded the
// first's, whose client was told it ran (found by review: 5 of 12 tries
// over HTTP left two dispatches).
func TestConcurrentForegroundRepeatsMakeOneDispatch(t *testing.T) {
	release := make(chan struct{})
	script := func(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
		select { // held until the test ends
		case <-release:
		case <-ctx.Done():
		}
		return execCancelled()
	}
	r := newRig(t, newFake(4, script), engine.Config{})
	r.start(t)
	defer close(release)
	ctx := context.Background()
	const n = 5
	ids := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			res, _, err := r.mb.Submit(ctx, engine.SubmitRequest{ThreadID: "t1", DedupeKey: "k1", Messages: []engine.Message{userMsg("x")}})
			if err != nil {
				t.Errorf("submit %d: %v", i, err)
			}
			ids[i] = res.DispatchID
		})
	}
	wg.Wait()
	ds, err := r.store.ListDispatches(ctx, "t1", nil, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 1 {
		t.Fatalf("%d dispatches for one key; want 1: %+v", len(ds), ds)
	}
	for i, id := range ids {
		if id != ds[0].DispatchID {
			t.Fatalf("submit %d answered dispatch %q; want the one made, %s", i, id, ds[0].DispatchID)
		}
	}
}
