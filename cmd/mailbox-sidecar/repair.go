package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"
)

const repairUsage = `usage: mailbox-sidecar repair [--data-dir DIR] [--allow-cut] [--json]

Repairs a stopped sidecar's Badger data directory in which verify found
problems (badgerstore.Repair; docs/store.md "Repair"). A record that does
not decode is replaced by what its indexes still tell: a dispatch becomes
a dead letter saying so (requeue it like any other), a run record a done
run with an error termination (its queued or claimed dispatches dead
letters), a message a system message saying it was damaged, a thread
projection or state is rebuilt. Then every index entry, counter, marker,
thread state and message counter that disagrees with the records is
rewritten. A message that decodes but whose content, tool calls or
metadata are not UTF-8 JSON gets U+FFFD for the bytes that are not UTF-8,
or the placeholder when that is not enough. A finished dispatch stays
finished (acked, or cancelled when it never ran). It lists what it
replaced and rewrote (after a failure, what was written; the error says
how far it got: run it again), and what it
cannot mend (two claimed dispatches on a thread, a gap in a message
log), then runs verify. It does not rewrite the files under the records:
a value-log file with a bad entry stays listed by verify (the records
that pointed into it are mended), so the exit status stays 1. A table
block that fails its checksum stops it before it writes anything (exit
1): the walk of the records would miss those in that block, and repair
would delete their indexes and counters.

It writes to the directory: copy it first. The sidecar must be stopped (a
running one holds the directory's lock). --allow-cut is as for verify.
The directory defaults to $MAILBOX_SIDECAR_DATA_DIR or ./data.
--json prints one JSON object instead of lines: verify --json's fields
(dir, status, counted, dispatches, runs, threads, messages, notes,
problems, error: the check after the repair, or why nothing was opened)
and replaced, rewrote (lists), rewritten (the count of derived keys
rewritten) and left (what it cannot mend); status "failed" with error
when the repair itself failed or was stopped (the lists say how far it
got).
Exit status: 0 repaired and consistent, 1 problems remain (verify's) or
the repair failed or was stopped, 2 bad usage.
`

// repairJSON is `repair --json`'s answer.
type repairJSON struct {
	verifyJSON
	Replaced  []string `json:"replaced"`
	Rewrote   []string `json:"rewrote"`
	Rewritten int      `json:"rewritten"`
	Left      []string `json:"left"`
}

func writeRepairJSON(w io.Writer, v repairJSON) {
	for _, l := range []*[]string{&v.Notes, &v.Problems, &v.Replaced, &v.Rewrote, &v.Left} {
		if *l == nil {
			*l = []string{}
		}
	}
	b, _ := json.Marshal(v)
	fmt.Fprintf(w, "%s\n", b)
}

// runRepair is `repair`; ctx ends it (an interrupt) between commits.
func runRepair(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	var asJSON bool
	s, dir, code, fail := openStopped("repair", repairUsage, args, getenv, stdout, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print one JSON object")
	})
	if s == nil {
		if asJSON && fail.status != "" {
			writeRepairJSON(stdout, repairJSON{verifyJSON: verifyJSON{Dir: dir, Status: fail.status, Error: fail.msg, Problems: fail.problems}})
		}
		return code
	}
	rep, err := s.Repair(ctx, time.Now().UnixMilli())
	if asJSON {
		out := repairJSON{verifyJSON: verifyJSON{Dir: dir}, Replaced: rep.Replaced, Rewrote: rep.Changes, Rewritten: rep.Rewritten, Left: rep.Left}
		if err != nil {
			_ = s.Close()
			fmt.Fprintf(stderr, "mailbox-sidecar repair: %v\n", err)
			out.Status, out.Error = "failed", err.Error()
			writeRepairJSON(stdout, out)
			return 1
		}
		vrep, err := s.Verify(ctx)
		if cerr := s.Close(); err == nil && cerr != nil {
			err = cerr
		}
		out.verifyJSON = checkedJSON(dir, vrep, err)
		writeRepairJSON(stdout, out)
		return out.exitStatus()
	}
	for _, r := range rep.Replaced {
		fmt.Fprintln(stdout, "replaced:", r)
	}
	for _, c := range rep.Changes {
		fmt.Fprintln(stdout, "rewrote:", c)
	}
	if n := rep.Rewritten - len(rep.Changes); n > 0 {
		fmt.Fprintf(stdout, "rewrote %d more derived keys\n", n)
	}
	for _, l := range rep.Left {
		fmt.Fprintln(stdout, "left:", l)
	}
	if err != nil {
		_ = s.Close()
		fmt.Fprintf(stderr, "mailbox-sidecar repair: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "repair: %d records replaced, %d derived keys rewritten\n", len(rep.Replaced), rep.Rewritten)
	vrep, err := s.Verify(ctx)
	if cerr := s.Close(); err == nil && cerr != nil {
		err = cerr
	}
	code = printVerify("repair", dir, vrep, err, stdout, stderr)
	if err == nil && vrep.StorageProblems > 0 && vrep.StorageProblems == len(vrep.Problems) {
		fmt.Fprintln(stdout, "what remains is damage in the files under the records (value-log files with a bad entry, table blocks that fail their checksums), which repair does not rewrite; value-log GC stays off while such a file exists (docs/store.md, \"Bytes that go bad on the disk\")")
	}
	return code
}
