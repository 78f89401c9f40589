package natsstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// The NATS store's size check never passes a submit its atomic batch
// refuses, and is not far below what fits: a foreground submit checks it
// before it interrupts a busy thread (engine.SubmitSizer).
func TestCheckSubmitSizeNeverPassesWhatDoesNotFitOnNATS(t *testing.T) {
	t.Parallel()
	st := openCfg(t, freshConfig())
	mb, err := engine.New(st, noopAgent{slots: 0}, engineConfig("sc1"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		mb.Stop(ctx)
	})
	ctx := context.Background()
	msgs := func(n int) []engine.Message {
		out := make([]engine.Message, n)
		for i := range out {
			out[i] = userMsg(fmt.Sprint("m", i))
		}
		return out
	}
	largest := func(hi int, ok func(int) bool) int {
		lo := 0
		for lo+1 < hi {
			if mid := (lo + hi) / 2; ok(mid) {
				lo = mid
			} else {
				hi = mid
			}
		}
		return lo
	}
	trial := 0
	fits := largest(2000, func(n int) bool {
		trial++
		_, err := mb.SubmitBackground(ctx, engine.SubmitRequest{ThreadID: fmt.Sprint("t", trial), Messages: msgs(n)})
		if err != nil && !errors.Is(err, engine.ErrTooLarge) {
			t.Fatalf("submit of %d: %v", n, err)
		}
		return err == nil
	})
	passes := largest(2000, func(n int) bool { return st.CheckSubmitSize("t", msgs(n), 1024) == nil })
	t.Logf("%d messages fit one atomic batch; the check passes %d", fits, passes)
	if fits == 0 || fits >= 1999 || passes > fits || passes < fits*8/10 {
		t.Fatalf("the check passes %d messages; %d fit: want at most that, and not far below", passes, fits)
	}
}

// Content the JSON record's encoder escapes (<, > and & become \u003c …,
// six bytes each) counts as escaped: 20 KiB of "<" is 120 KiB encoded,
// over a 64 KiB max_payload, and was passed (found by review). Content
// that fits as encoded passes.
func TestCheckSubmitSizeCountsEscapedBytesOnNATS(t *testing.T) {
	t.Parallel()
	cfg := freshConfig()
	cfg.URL = natstest.StartWithMaxPayload(t, limitedMaxPayload).URL()
	st := openCfg(t, cfg)
	for _, c := range []struct {
		name    string
		content string
		fits    bool
	}{
		{"20 KiB of <", `"` + strings.Repeat("<", 20<<10) + `"`, false},
		{"20 KiB of x", `"` + strings.Repeat("x", 20<<10) + `"`, true},
	} {
		msgs := []engine.Message{{ID: "m1", Role: "user", Content: []byte(c.content)}}
		_, err := st.Checkpoint(context.Background(), engine.Checkpoint{ThreadID: c.name, Messages: msgs, CreatedAt: 1000})
		if fits := err == nil; fits != c.fits {
			t.Fatalf("%s: checkpoint %v; the test assumed it fits: %v", c.name, err, c.fits)
		}
		if err := st.CheckSubmitSize("t", msgs, 1024); (err == nil) != c.fits {
			t.Fatalf("%s: CheckSubmitSize %v; it fits: %v", c.name, err, c.fits)
		}
	}
}
