// Package crash is the crash-recovery and fault harness of the whole
// sidecar (issue 6, "Crash and fault tests"). Its tests build the
// mailbox-sidecar binary and the recording chaos agent (bench/crash/agent)
// into a temporary directory, run both as child processes on a data
// directory, drive a mixed workload over the client API on the Unix socket
// and kill the processes with SIGKILL at random moments, restarting them on
// the same directory. They check, after every restart and at the end:
//
//   - nothing lost: every dispatch the API accepted (2xx with a
//     dispatch_id) exists after a restart and reaches a terminal state
//     within a bounded time once the workload stops; every message the API
//     accepted is in its thread's log exactly once;
//   - every attempt of a dispatch executed that dispatch's own request;
//     every acked dispatch carries the outcome of an attempt that really
//     ended that way (the agent's journal says so), and no run record is
//     created or running once its dispatch is terminal;
//   - two runs of one thread never executed at the same time (the agent's
//     journal; a run cut short by a kill ends at the kill);
//   - every checkpoint the agent saw acknowledged is in the thread log
//     exactly once; within one attempt (session) checkpoints are present
//     once each, in order, as a prefix; sessions appear in the log in the
//     order they ran;
//   - work superseded by an interrupt or a foreground submit, or
//     cancelled (cancelled:true), never starts after the interrupt, submit
//     or cancel returned — but for the one attempt that was already on its
//     way to the agent when a plain interrupt or a cancel landed (it
//     receives the CANCEL right after);
//   - the store's consistency check (badgerstore.Verify) passes.
//
// TestCrashKillSidecarNATS runs the kill-sidecar variant on the NATS store
// (an embedded JetStream server in the test process outlives the
// sidecars); there the last check is that every dispatch has the same
// status in the store as through the API. TestCrashKillOneOfTwoSidecarsNATS
// runs two sidecars, each with its own agent, on one NATS store, the
// workload over both APIs, and kills one of them at a time: the checks
// see both agents' journals (no two runs of a thread on the two hosts at
// once; live commands, interrupts and cancels answered by one sidecar
// reach the run on the other).
//
// Faults: a full disk (a small tmpfs; needs root, skipped otherwise), a
// stalled agent (SIGSTOP: no heartbeats) and clock jumps (the binary's
// MAILBOX_SIDECAR_TEST_CLOCK_SKEW hook).
//
// The agent writes one JSON line per run start, acknowledged checkpoint
// and run end to a journal (Record), appended and fsynced line by line, so
// the journal outlives a SIGKILL of the agent. The message text of a
// dispatch tells the agent what to do (Command).
//
// MAILBOX_SIDECAR_CRASH_CYCLES sets the kill cycles of each variant
// (default 5; `make crash` runs 60); MAILBOX_CRASH_REPORT names a file
// that receives the table of results.
package crash
