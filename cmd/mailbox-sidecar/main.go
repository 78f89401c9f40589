// Command mailbox-sidecar is the per-host sidecar that fronts a local AI
// agent process: a durable dispatch queue on Badger, the client API over
// a Unix socket, and the agent protocol on another.
//
// Usage:
//
//	mailbox-sidecar serve [flags]   run the sidecar (flags: serve -h)
//	mailbox-sidecar demo            run a demo with the example agent
//	mailbox-sidecar ctl …           operator CLI over the API socket
//	mailbox-sidecar verify          check a stopped sidecar's data directory
//	mailbox-sidecar repair          repair a stopped sidecar's data directory
//	mailbox-sidecar version         print version information
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// version and commit are set at build time with -ldflags "-X main.version=…".
var (
	version = "dev"
	commit  = ""
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

const usage = `usage: mailbox-sidecar <command> [flags]

commands:
  serve     run the sidecar (mailbox-sidecar serve -h lists the flags)
  demo      run the sidecar with the example agent and show a few runs
  ctl       operator CLI over the API socket (mailbox-sidecar ctl -h)
  verify    check a stopped sidecar's data directory (mailbox-sidecar verify -h)
  repair    repair what verify found (mailbox-sidecar repair -h)
  version   print version, commit, Go and protocol versions
`

// run is main with its dependencies passed in; it returns the exit
// status: 0 ok, 1 failure, 2 bad usage or configuration.
func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "serve":
		return runServe(args[1:], getenv, stderr)
	case "demo":
		return runDemo(args[1:], getenv, stdout, stderr)
	case "ctl":
		return runCtl(args[1:], getenv, stdout, stderr)
	case "verify":
		// An interrupt stops the check and closes the store cleanly; a
		// second one, once the first has ended the context, kills the
		// process as usual (Badger's table check and its open take no
		// context).
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		context.AfterFunc(ctx, stop)
		return runVerify(ctx, args[1:], getenv, stdout, stderr)
	case "repair":
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		context.AfterFunc(ctx, stop)
		return runRepair(ctx, args[1:], getenv, stdout, stderr)
	case "version", "--version", "-version":
		if len(args) > 1 {
			fmt.Fprintf(stderr, "mailbox-sidecar: %s takes no arguments, got %q\n", args[0], args[1:])
			return 2
		}
		printVersion(stdout)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "mailbox-sidecar: unknown command %q\n%s", args[0], usage)
	return 2
}

func printVersion(w io.Writer) {
	v, c := versionInfo()
	fmt.Fprintf(w, "mailbox-sidecar %s\ncommit %s\n%s %s/%s\nagent protocol %d\n", v, c, runtime.Version(), runtime.GOOS, runtime.GOARCH, ipc.ProtocolVersion)
}

// versionInfo is the binary's version and commit: those set at build
// time, else what Go stamped in the build ("unknown" for no commit).
func versionInfo() (v, c string) {
	c, v = commit, version
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && c == "" {
				c = s.Value
			}
		}
		// A build without -ldflags: the module version Go stamped (a
		// pseudo-version from the VCS, or the tag of a go install).
		if v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
	}
	if c == "" {
		c = "unknown"
	}
	return v, c
}

// repeatedSignal is how soon the same signal again counts as the first
// one delivered twice rather than a second signal that forces the exit.
const repeatedSignal = time.Second

// drainSignals are the signals that start the drain: SIGTERM always;
// SIGINT and SIGHUP unless the process started with them ignored (nohup,
// a background job of a shell), which Notify would undo (found by
// review: under nohup, closing the terminal stopped the sidecar).
func drainSignals() []os.Signal {
	sigs := []os.Signal{syscall.SIGTERM}
	for _, s := range []os.Signal{syscall.SIGINT, syscall.SIGHUP} {
		if !signal.Ignored(s) {
			sigs = append(sigs, s)
		}
	}
	return sigs
}

// runServe is `serve`: configuration is checked before anything is
// opened (exit 2); then the sidecar runs until SIGTERM, SIGINT or SIGHUP
// and shuts down in stages (exit 0 when clean). A second signal forces the
// exit.
func runServe(args []string, getenv func(string) string, stderr io.Writer) int {
	cfg, err := parseServe(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		if cfg.LogFormat == "json" || getenv(envPrefix+"LOG_FORMAT") == "json" {
			// A log collector reading JSON lines got text (found by
			// review): one line, each problem an element of "errors".
			newLogger(stderr, "info", "json").Error("invalid configuration", "errors", strings.Split(err.Error(), "\n"))
		} else {
			fmt.Fprintf(stderr, "mailbox-sidecar serve: invalid configuration:\n%v\n", err)
		}
		return 2
	}
	log := newLogger(stderr, cfg.LogLevel, cfg.LogFormat)
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, drainSignals()...)
	defer signal.Stop(sig)

	s, err := startSidecar(cfg, log)
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	recovered := make(chan error, 1)
	go func() { recovered <- s.recoverRetrying(ctx) }()

	status := 0
	var first os.Signal
	var firstAt time.Time
	select {
	case first = <-sig:
		firstAt = time.Now()
		log.Info("signal received", "signal", first.String())
	case err := <-recovered:
		if err != nil {
			log.Error("cannot become ready", "err", err)
			status = 1
			break
		}
		select {
		case first = <-sig:
			firstAt = time.Now()
			log.Info("signal received", "signal", first.String())
		case err := <-s.errs:
			log.Error("listener failed", "err", err)
			status = 1
		}
	case err := <-s.errs:
		log.Error("listener failed", "err", err)
		status = 1
	}
	cancel() // stops a recovery still running
	done := make(chan struct{})
	go func() {
		for {
			select {
			case got := <-sig:
				if got == first && time.Since(firstAt) < repeatedSignal {
					// The same signal again at once is one delivered twice
					// (timeout(1) signals the process and its group), not
					// an operator's second Ctrl-C (found by review).
					log.Info("the same signal again at once: taken as one", "signal", got.String())
					continue
				}
				log.Warn("second signal: forcing the exit", "signal", got.String())
				os.Exit(1)
			case <-done:
				return
			}
		}
	}()
	s.shutdown(cfg.ShutdownGrace)
	close(done)
	return status
}
