package main

import (
	"context"
	"encoding/json"
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

const verifyUsage = `usage: mailbox-sidecar verify [--data-dir DIR] [--allow-cut] [--json]

Checks a stopped sidecar's Badger data directory: every record decodes,
every index entry matches its record, counters and message logs agree,
every table block and every value-log file below the newest hold their
checksums (badgerstore.Verify). It opens the directory as serve does —
replaying its logs, repairing what a restart repairs, and writing what a
start writes — so it is not a read-only check, and the sidecar must be
stopped (a running one holds the directory's lock).

Before it opens the directory it reads the newest value-log file, which
Badger's open cuts at its first bad entry: when whole entries follow
one, it stops there (exit 1) so that the directory can be copied first;
--allow-cut opens it all the same (as serve would).

The directory defaults to $MAILBOX_SIDECAR_DATA_DIR or ./data. An
interrupt (SIGINT, SIGTERM) stops the check and closes the directory;
a second one kills the process.
--json prints one JSON object instead of lines: dir, status
("consistent", "problems", "in_use", "no_data_directory",
"format_too_new", "not_opened": the newest value-log file is damaged and
--allow-cut was not given, "failed": the check did not open or finish),
counted (false when a table block does not read), dispatches, runs,
threads, messages, notes, problems and error; for scripts that must tell
these apart, which the exit status does not.
Exit status: 0 consistent, 1 problems found (listed) or the check failed
or was stopped, 2 bad usage.
`

// runVerify is `verify`; ctx ends the check (an interrupt).
func runVerify(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	var asJSON bool
	s, dir, code, fail := openStopped("verify", verifyUsage, args, getenv, stdout, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print one JSON object")
	})
	if s == nil {
		if asJSON && fail.status != "" {
			writeVerifyJSON(stdout, verifyJSON{Dir: dir, Status: fail.status, Error: fail.msg, Problems: fail.problems})
		}
		return code
	}
	rep, err := s.Verify(ctx)
	if cerr := s.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if asJSON {
		out := checkedJSON(dir, rep, err)
		writeVerifyJSON(stdout, out)
		return out.exitStatus()
	}
	return printVerify("verify", dir, rep, err, stdout, stderr)
}

// checkedJSON is the verifyJSON of a finished check: rep and its error.
func checkedJSON(dir string, rep badgerstore.Report, err error) verifyJSON {
	out := verifyJSON{Dir: dir, Status: "consistent", Counted: !rep.Unwalked, Dispatches: rep.Dispatches, Runs: rep.Runs,
		Threads: rep.Threads, Messages: rep.Messages, Notes: rep.Notes, Problems: rep.Problems}
	switch {
	case err != nil:
		out.Status, out.Error = "failed", err.Error()
	case len(rep.Problems) > 0:
		out.Status = "problems"
	}
	return out
}

// exitStatus is 0 for a consistent directory, else 1.
func (v verifyJSON) exitStatus() int {
	if v.Status == "consistent" {
		return 0
	}
	return 1
}

// verifyJSON is `verify --json`'s answer.
type verifyJSON struct {
	Dir        string   `json:"dir"`
	Status     string   `json:"status"`
	Counted    bool     `json:"counted"`
	Dispatches int      `json:"dispatches"`
	Runs       int      `json:"runs"`
	Threads    int      `json:"threads"`
	Messages   int      `json:"messages"`
	Notes      []string `json:"notes"`
	Problems   []string `json:"problems"`
	Error      string   `json:"error,omitempty"`
}

func writeVerifyJSON(w io.Writer, v verifyJSON) {
	if v.Notes == nil {
		v.Notes = []string{}
	}
	if v.Problems == nil {
		v.Problems = []string{}
	}
	b, _ := json.Marshal(v)
	fmt.Fprintf(w, "%s\n", b)
}

// openFailure is why openStopped opened nothing: a verify --json status
// ("" after -h or bad usage), its message, and a problem it found first.
type openFailure struct {
	status, msg string
	problems    []string
}

// printVerify prints a Verify report and returns the exit status: 0
// consistent, 1 problems or a check that did not finish (err).
func printVerify(cmd, dir string, rep badgerstore.Report, err error, stdout, stderr io.Writer) int {
	if rep.Unwalked {
		// Not "0 dispatches …", which read as an empty queue (found by
		// review).
		fmt.Fprintf(stdout, "%s: records not counted (a table block does not read)\n", dir)
	} else {
		fmt.Fprintf(stdout, "%s: %d dispatches, %d runs, %d threads, %d messages\n", dir, rep.Dispatches, rep.Runs, rep.Threads, rep.Messages)
	}
	for _, n := range rep.Notes {
		fmt.Fprintln(stdout, "note:", n)
	}
	for _, p := range rep.Problems {
		fmt.Fprintln(stdout, "problem:", p)
	}
	if err != nil {
		fmt.Fprintf(stderr, "mailbox-sidecar %s: the check did not finish: %v\n", cmd, err)
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

// openStopped parses the flags of an offline command (verify, repair:
// --data-dir, --allow-cut) and opens the stopped sidecar's data directory;
// on failure it has said why and returns nil and the exit status (0 after
// -h).
func openStopped(cmd, usage string, args []string, getenv func(string) string, stdout, stderr io.Writer, flags func(*flag.FlagSet)) (s *badgerstore.Store, dir string, code int, fail openFailure) {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	dir = getenv(envPrefix + "DATA_DIR")
	if dir == "" {
		dir = "./data"
	}
	fs.StringVar(&dir, "data-dir", dir, "Badger data directory")
	allowCut := fs.Bool("allow-cut", false, "open the directory even when Badger will cut its newest value-log file before whole entries")
	if flags != nil {
		flags(fs)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, "", 0, fail
		}
		return nil, "", 2, fail
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mailbox-sidecar %s: takes no arguments, got %q\n\n%s", cmd, fs.Args(), usage)
		return nil, "", 2, fail
	}
	failed := func(status string, err error, format string, args ...any) (*badgerstore.Store, string, int, openFailure) {
		fmt.Fprintf(stderr, format, args...)
		fail.status, fail.msg = status, err.Error()
		return nil, dir, 1, fail
	}
	// A directory without Badger's manifest holds no store: opening it
	// would create one. One that holds tables or logs without it lost
	// its manifest, which no repair brings back (found by review: it was
	// "no data directory").
	if err := badgerstore.CheckManifest(dir); err != nil {
		return failed("failed", err, "mailbox-sidecar %s: %v\n", cmd, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "MANIFEST")); err != nil {
		return failed("no_data_directory", err, "mailbox-sidecar %s: no data directory at %s: %v\n", cmd, dir, err)
	}
	if err := badgerstore.NewestValueLogDamageStopped(dir); err != nil {
		if errors.Is(err, engine.ErrDataDirInUse) {
			return failed("in_use", err, "mailbox-sidecar %s: data directory %s is in use (stop the sidecar first): %v\n", cmd, dir, err)
		}
		if !errors.Is(err, badgerstore.ErrValueLogCorrupt) {
			return failed("failed", err, "mailbox-sidecar %s: reading the newest value-log file: %v\n", cmd, err)
		}
		fail.problems = append(fail.problems, err.Error())
		if fs.Lookup("json") == nil || fs.Lookup("json").Value.String() != "true" {
			fmt.Fprintln(stdout, "problem:", err)
		}
		if !*allowCut {
			return failed("not_opened", err, "mailbox-sidecar %s: not opened: opening %s (%s or serve) lets Badger cut its newest value-log file at the bad entry, and the whole entries after it are lost; copy the directory first, then run %s --allow-cut\n", cmd, dir, cmd, cmd)
		}
	}
	// Badger's own messages and the store's at warn and above (a repair at
	// open, a value-log file that fails its check) go to stderr.
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir, GCInterval: -1, Logger: log})
	if err != nil {
		switch {
		case errors.Is(err, engine.ErrDataDirInUse):
			return failed("in_use", err, "mailbox-sidecar %s: data directory %s is in use (stop the sidecar first): %v\n", cmd, dir, err)
		case errors.Is(err, badgerstore.ErrFormatTooNew):
			return failed("format_too_new", err, "mailbox-sidecar %s: data directory %s was written by a later version of mailbox-sidecar: %v\n", cmd, dir, err)
		default:
			return failed("failed", err, "mailbox-sidecar %s: %v\n", cmd, err)
		}
	}
	return s, dir, 0, fail
}
