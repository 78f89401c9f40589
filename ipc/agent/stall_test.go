package agent

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// A sidecar that stalls (stops reading and sends nothing more, its socket
// still open: a hung or SIGSTOPped process) is silent: after 3 heartbeats
// the SDK must treat it as dead and cancel the run (ErrConnectionLost).
// Here the run is emitting when the stall happens, so the socket buffer
// fills and a write blocks.
func TestStalledSidecarIsDetected(t *testing.T) {
	const hb = 100 * time.Millisecond
	ended := make(chan error, 1)
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		big := map[string]string{"type": "text_delta", "delta": strings.Repeat("x", 32<<10)}
		for {
			if err := run.Emit(big); err != nil {
				ended <- err
				return Transient("emit", err.Error())
			}
			if ctx.Err() != nil {
				ended <- context.Cause(ctx)
				return Cancelled()
			}
		}
	})
	sc := serveRaw(t, Config{Handler: handler, Logger: testLogger(), ShutdownGrace: -1, MaxBackoff: time.Hour, MinBackoff: time.Hour}, hb)
	sc.w.WriteFrame(ipc.TypeRun, 0, 1, rawRun("r"))
	// The sidecar stalls now: it reads nothing and sends nothing.

	start := time.Now()
	select {
	case err := <-ended:
		if !errors.Is(err, ErrConnectionLost) {
			t.Fatalf("run ended with %v, want ErrConnectionLost", err)
		}
		t.Logf("stall detected after %v", time.Since(start))
	case <-time.After(20 * hb):
		t.Fatalf("sidecar silent for %v (heartbeat %v): the run is still blocked, the connection not declared dead", 20*hb, hb)
	}
}
