// Command echo-agent is the example agent process for the mailbox sidecar,
// built on the Go SDK (package ipc/agent). It connects to the sidecar's
// agent socket and answers every text message of a run with
// "echo: <text>": a text_delta event, a checkpointed assistant message and
// a done result. Control words in the text drive it for tests and the demo
// ("sleep <ms>", "fail transient", "fail permanent", "suspend",
// "events <n>"; see echoAgent).
//
// Usage:
//
//	echo-agent [--socket path] [--name name] [--max-runs n] [--log-format text|json]
//
// Environment:
//
//	MAILBOX_AGENT_SOCKET  default of --socket (otherwise ./run/agent.sock)
//
// Logs go to stderr. SIGINT or SIGTERM stops it gracefully (GOAWAY, running
// runs finish within 10 s); a second signal exits at once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

func main() {
	if err := run(os.Args[1:], os.Getenv, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "echo-agent:", err)
		os.Exit(2)
	}
}

// options are the command-line settings.
type options struct {
	socket    string
	name      string
	maxRuns   int
	logFormat string
	logLevel  slog.Level
}

// parseFlags reads args, with getenv supplying the environment defaults.
func parseFlags(args []string, getenv func(string) string, stderr io.Writer) (options, error) {
	o := options{socket: "./run/agent.sock"}
	if s := getenv("MAILBOX_AGENT_SOCKET"); s != "" {
		o.socket = s
	}
	fs := flag.NewFlagSet("echo-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, controlWordsUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&o.socket, "socket", o.socket, "sidecar agent socket path (env MAILBOX_AGENT_SOCKET)")
	fs.StringVar(&o.name, "name", "echo-agent", "name announced to the sidecar")
	fs.IntVar(&o.maxRuns, "max-runs", 4, "runs executed at once")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "log level: debug (every run's start and finish), info, warn or error")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.logFormat != "text" && o.logFormat != "json" {
		return o, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
	}
	return o, nil
}

// controlWordsUsage heads -h: the flags, and the words a message's text
// may be to drive the agent (found by review: they were only in the
// source).
const controlWordsUsage = `usage: echo-agent [flags]

Answers every text message of a run with "echo: <text>". A message whose
whole text is one of these control words drives it instead:
  sleep <ms>       wait ms milliseconds (echoing live messages meanwhile)
  fail transient   fail the attempt, to be retried (error code echo_failure)
  fail permanent   fail the run, dead-lettered at once
  suspend          suspend on a tool call (call-1): the run waits for a decision
  events <n>       emit n text_delta events first (at most 1000000)

flags:
`

// newLogger logs to w in o's format, from o's level up.
func newLogger(o options, w io.Writer) *slog.Logger {
	ho := &slog.HandlerOptions{Level: o.logLevel}
	if o.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
}

// run parses the flags and serves until SIGINT or SIGTERM.
func run(args []string, getenv func(string) string, stderr io.Writer) error {
	o, err := parseFlags(args, getenv, stderr)
	if err != nil {
		return err
	}
	log := newLogger(o, stderr)

	client, err := agent.New(agent.Config{
		Socket:  o.socket,
		Name:    o.name,
		MaxRuns: o.maxRuns,
		Handler: &echoAgent{log: log},
		Logger:  log,
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills the process
	return client.Serve(ctx)
}
