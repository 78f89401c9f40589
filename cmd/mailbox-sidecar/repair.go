package main

import (
	"context"
	"fmt"
	"io"
	"time"
)

const repairUsage = `usage: mailbox-sidecar repair [--data-dir DIR] [--allow-cut]

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
Exit status: 0 repaired and consistent, 1 problems remain (verify's) or
the repair failed or was stopped, 2 bad usage.
`

// runRepair is `repair`; ctx ends it (an interrupt) between commits.
func runRepair(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	s, dir, code, _ := openStopped("repair", repairUsage, args, getenv, stdout, stderr, nil)
	if s == nil {
		return code
	}
	rep, err := s.Repair(ctx, time.Now().UnixMilli())
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
