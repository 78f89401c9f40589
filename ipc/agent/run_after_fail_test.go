package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// "A lost connection cancels every run on it (context cause
// ErrConnectionLost)." A RUN that the reader had already buffered when the
// connection failed is still started afterwards, with a context nobody
// cancels: the handler runs to the end on a dead connection while the
// sidecar retries the run elsewhere.
func TestRunBufferedAtFailureIsCancelled(t *testing.T) {
	second := make(chan error, 1)
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "r1" { // emits until the connection breaks
			big := map[string]string{"type": "text_delta", "delta": strings.Repeat("x", 32<<10)}
			for run.Emit(big) == nil && ctx.Err() == nil {
			}
			return Cancelled()
		}
		select {
		case <-ctx.Done():
			second <- context.Cause(ctx)
		case <-time.After(2 * time.Second):
			second <- nil
		}
		return Cancelled()
	})
	sc := serveRaw(t, Config{Handler: handler, MaxRuns: 2, Logger: testLogger(), ShutdownGrace: -1, MinBackoff: time.Hour, MaxBackoff: time.Hour}, 10*time.Second)
	sc.w.WriteFrame(ipc.TypeRun, 0, 1, rawRun("r1"))
	time.Sleep(200 * time.Millisecond) // r1 fills the socket; its Emit blocks (we do not read)

	// PING and RUN 2 in one write: the SDK's reader buffers both, then
	// blocks answering the PING (the writer is busy with r1's Emit).
	var buf []byte
	buf = ipc.AppendFrame(buf, ipc.TypePing, 0, 0, make([]byte, 8))
	buf = ipc.AppendFrame(buf, ipc.TypeRun, 0, 2, rawRun("r2"))
	if _, err := sc.nc.Write(buf); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	sc.nc.Close() // the connection is lost

	select {
	case cause := <-second:
		if cause == nil {
			t.Fatal("run r2 arrived on a connection that was lost; its context was never cancelled (it ran to the end)")
		}
		t.Logf("r2 cancelled with %v", cause)
	case <-time.After(5 * time.Second):
		t.Log("r2 never started (fine)")
	}
}
