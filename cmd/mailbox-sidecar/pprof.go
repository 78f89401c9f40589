//go:build pprof

package main

// Profiling build (go build -tags pprof): serves net/http/pprof on
// MAILBOX_SIDECAR_PPROF_ADDR (e.g. 127.0.0.1:6060) for performance work
// on the real binary under load. Release builds do not contain it.

import (
	"log/slog"
	"net/http"
	_ "net/http/pprof"
	"os"
	"runtime"
)

func init() {
	addr := os.Getenv("MAILBOX_SIDECAR_PPROF_ADDR")
	if addr == "" {
		return
	}
	runtime.SetBlockProfileRate(100_000) // one sample per 100 µs blocked
	runtime.SetMutexProfileFraction(100)
	go func() {
		if err := http.ListenAndServe(addr, nil); err != nil {
			slog.Error("pprof listener", "addr", addr, "err", err)
		}
	}()
}
