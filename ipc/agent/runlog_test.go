package agent

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// A run logs nothing at info level when it goes well (the run's logger is
// built only when used); what it does log carries the run's attributes.
func TestRunLogsCarryTheRunAndOnlyWhenNeeded(t *testing.T) {
	var logs syncbuf.Buffer
	handler := HandlerFunc(func(ctx context.Context, run *Run) Result {
		if run.RunID == "bad" {
			return Transient("flaky", "try again")
		}
		return Done("ok")
	})
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	sc := serveRaw(t, Config{Handler: handler, Logger: logger, ShutdownGrace: -1, MinBackoff: time.Hour, MaxBackoff: time.Hour}, 10*time.Second)
	for i, id := range []string{"good", "bad"} {
		sc.w.WriteFrame(ipc.TypeRun, 0, uint64(i+1), rawRun(id))
		for {
			f, err := sc.r.ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			if f.Type == ipc.TypeFinish {
				break
			}
		}
	}
	// The run logs its failure after its FINISH is written: wait for it.
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), `"msg":"run failed"`) && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
	out := logs.String()
	if strings.Contains(out, `"run_id":"good"`) {
		t.Fatalf("a run that went well logged at info level:\n%s", out)
	}
	for _, want := range []string{`"msg":"run failed"`, `"run_id":"bad"`, `"thread_id":"tbad"`, `"dispatch_id":"dbad"`, `"stream":2`} {
		if !strings.Contains(out, want) {
			t.Fatalf("logs lack %s:\n%s", want, out)
		}
	}
}
