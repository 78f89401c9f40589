package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

const verifyUsage = `usage: mailbox-sidecar verify [--data-dir DIR]

Checks a stopped sidecar's Badger data directory: every record decodes,
every index entry matches its record, counters and message logs agree,
every table block and every value-log file below the newest hold their
checksums (badgerstore.Verify). It opens the directory as serve does —
replaying its logs, repairing what a restart repairs, and writing what a
start writes — so it is not a read-only check, and the sidecar must be
stopped (a running one holds the directory's lock).

The directory defaults to $MAILBOX_SIDECAR_DATA_DIR or ./data.
Exit status: 0 consistent, 1 problems found (listed) or the check failed,
2 bad usage.
`

// runVerify is `verify`.
func runVerify(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, verifyUsage) }
	dir := getenv(envPrefix + "DATA_DIR")
	if dir == "" {
		dir = "./data"
	}
	fs.StringVar(&dir, "data-dir", dir, "Badger data directory")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mailbox-sidecar verify: takes no arguments, got %q\n\n%s", fs.Args(), verifyUsage)
		return 2
	}
	// A directory without Badger's manifest holds no store: opening it
	// would create one.
	if _, err := os.Stat(filepath.Join(dir, "MANIFEST")); err != nil {
		fmt.Fprintf(stderr, "mailbox-sidecar verify: no data directory at %s: %v\n", dir, err)
		return 1
	}
	// Badger's own messages and the store's at warn and above (a repair at
	// open, a value-log file that fails its check) go to stderr.
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir, GCInterval: -1, Logger: log})
	if err != nil {
		switch {
		case errors.Is(err, engine.ErrDataDirInUse):
			fmt.Fprintf(stderr, "mailbox-sidecar verify: data directory %s is in use (stop the sidecar first): %v\n", dir, err)
		case errors.Is(err, badgerstore.ErrFormatTooNew):
			fmt.Fprintf(stderr, "mailbox-sidecar verify: data directory %s was written by a later version of mailbox-sidecar: %v\n", dir, err)
		default:
			fmt.Fprintf(stderr, "mailbox-sidecar verify: %v\n", err)
		}
		return 1
	}
	rep, err := s.Verify(context.Background())
	if cerr := s.Close(); err == nil && cerr != nil {
		err = cerr
	}
	fmt.Fprintf(stdout, "%s: %d dispatches, %d runs, %d threads, %d messages\n", dir, rep.Dispatches, rep.Runs, rep.Threads, rep.Messages)
	for _, p := range rep.Problems {
		fmt.Fprintln(stdout, "problem:", p)
	}
	if err != nil {
		fmt.Fprintf(stderr, "mailbox-sidecar verify: the check did not finish: %v\n", err)
		return 1
	}
	switch n := len(rep.Problems); {
	case n == 0:
		fmt.Fprintln(stdout, "consistent")
		return 0
	case n >= badgerstore.MaxProblems:
		fmt.Fprintf(stdout, "%d problems or more (the report stops there)\n", n)
	default:
		fmt.Fprintf(stdout, "%d problems\n", n)
	}
	return 1
}
