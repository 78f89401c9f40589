package natsstore

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// A publish is counted by its outcome: a refusal because a record changed
// meanwhile (or the stream was busy) is a conflict the caller retries,
// not a failure; only a publish that was acknowledged counts its messages
// and its time.
func TestPublishesAreCountedByOutcome(t *testing.T) {
	m := newStoreMetrics(&nats.Conn{})
	m.published(3, time.Millisecond, nil)
	m.published(2, time.Millisecond, fmt.Errorf("publish: %w", errConflict))
	m.published(2, time.Millisecond, fmt.Errorf("publish: %w", errBusy))
	m.published(1, time.Millisecond, errors.New("io error"))
	got := map[string]uint64{"ok": m.commitsOK.Get(), "conflict": m.commitsConflict.Get(), "error": m.commitsFailed.Get(), "messages": m.messages.Get()}
	want := map[string]uint64{"ok": 1, "conflict": 2, "error": 1, "messages": 3}
	for name := range want {
		if got[name] != want[name] {
			t.Errorf("%s: %d, want %d", name, got[name], want[name])
		}
	}
}
