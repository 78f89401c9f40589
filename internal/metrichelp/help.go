// Package metrichelp holds the HELP text of every metric family the
// sidecar serves on /metrics, and fills it into a scrape: the metrics
// library writes HELP lines with no text (metrics.ExposeMetadata).
package metrichelp

import "bytes"

// Help maps a metric family to its HELP text. The families of the Go
// runtime and the process (go_*, process_*) keep the library's lines.
var Help = map[string]string{
	// The client API (proxy).
	"mailbox_http_requests_total":            "HTTP requests answered, by route pattern (unmatched: unknown paths) and status code.",
	"mailbox_http_request_duration_seconds":  "Time to answer an HTTP request, by route pattern; for a stream, the time to its start.",
	"mailbox_http_sse_subscribers":           "Open SSE streams.",
	"mailbox_http_sse_dropped_total":         "SSE streams ended because the client fell behind the event buffer (slow_subscriber) or stopped reading while a write stayed stuck for the stall timeout.",
	"mailbox_http_connections":               "Open HTTP connections, by listener (api: the Unix socket, tcp, admin).",
	"mailbox_http_connections_refused_total": "New HTTP connections answered 503 and closed because their listener held its most open connections (--max-conns; admin: 256), by listener.",
	"mailbox_http_answer_budget_bytes":       "Bytes of large answers (over 64 KiB) being written to clients, bounded by --max-body-total.",
	"mailbox_http_answers_refused_total":     "GET answers over 64 KiB replaced by 503 because the answers being written filled --max-body-total.",
	"mailbox_http_body_budget_bytes":         "Bytes of large request bodies (over 16 KiB) being read or handled, bounded by --max-body-total.",
	"mailbox_http_body_waits_total":          "Requests whose body had to wait for room under --max-body-total before it was read.",
	"mailbox_http_body_refused_total":        "Requests answered 503 because their body found no room under --max-body-total within the wait (10 s).",
	"mailbox_http_accept_retries_total":      "Accepts on the HTTP listeners that failed for want of a resource (file descriptors, socket buffers, memory) and were retried after a backoff; new connections wait meanwhile.",

	// The engine.
	"mailbox_operations_total":                     "Store calls, by operation and result (ok, error, conflict, empty).",
	"mailbox_operation_duration_seconds":           "Duration of store calls, by operation and result.",
	"mailbox_dispatch_depth":                       "Dispatches in each status (read from the store at most once a second). dead_letter counts requeued dead letters too, until --gc-ttl purges them; GET /v1/dead-letters lists those not requeued, mailbox_dead_letters_total counts each as it happens.",
	"mailbox_queue_depth":                          "Queued dispatches (read from the store at most once a second).",
	"mailbox_queue_full_total":                     "Background submits refused (503, SUBMIT error unavailable) because --max-queued dispatches were queued.",
	"mailbox_dispatch_depth_errors_total":          "Failed reads of the dispatch counts or of the ready wait (the gauges keep their last values).",
	"mailbox_dispatch_ready_wait_seconds":          "How long the thread first in the ready order has waited for a slot (queue lag); 0 when none waits. A thread that is running is not in line: work queued behind a running thread shows in mailbox_dispatch_depth{status=\"queued\"}, not here.",
	"mailbox_dispatch_held_threads":                "Threads set aside by the dispatcher: their claims failed, or no agent took their run.",
	"mailbox_active_runs":                          "Attempts executing in this sidecar.",
	"mailbox_build_info":                           "1, labelled with the sidecar's version, commit, Go version and agent protocol.",
	"mailbox_suspended_runs":                       "Attempts executing in this sidecar whose run waits on a tool call's decision (counted in mailbox_active_runs too, under the suspended lease).",
	"mailbox_event_buffer_bytes":                   "Bytes of events the running and waiting runs' buffers hold for re-attachment (bounded by --event-buffer-total-bytes).",
	"mailbox_dispatch_enqueue_to_start_seconds":    "Time from a dispatch's creation to the start of its first attempt.",
	"mailbox_dispatch_eligible_to_start_seconds":   "Time from a dispatch falling due to the start of its attempt.",
	"mailbox_dispatch_claim_to_start_seconds":      "Time from a dispatch's claim to the recorded start of its attempt (the run's context loaded).",
	"mailbox_dispatch_enqueue_to_complete_seconds": "Time from a dispatch's creation to the end of an attempt, by outcome.",
	"mailbox_dispatch_runtime_seconds":             "Time from an attempt's start to its end, by outcome.",
	"mailbox_run_duration_seconds":                 "Duration of a run's attempt, by outcome.",
	"mailbox_runs_total":                           "Attempts ended, by outcome (completed, transient_error, permanent_error, abandoned, cancelled).",
	"mailbox_dead_letters_total":                   "Dispatches dead-lettered, by cause (permanent, attempts_spent, lease_expired, restart).",
	"mailbox_lease_renewals_total":                 "Lease renewals of running attempts, by result (ok, lost, error).",
	"mailbox_live_commands_total":                  "Live messages and tool decisions sent to running attempts, by kind and result.",
	"mailbox_dispatch_signal_pulled_total":         "Dispatch signals pulled from a shared store.",
	"mailbox_dispatch_signal_ack_total":            "Dispatch signals acknowledged.",
	"mailbox_dispatch_signal_nack_total":           "Dispatch signals given back, by whether with a delay.",
	"mailbox_dispatch_signal_redelivery_total":     "Dispatch signals delivered again.",

	// The agent hub.
	"mailbox_agent_connections":                 "Agent connections up.",
	"mailbox_agent_capacity":                    "Run slots of the connected agents (their max_runs together; after an agent's GOAWAY, the runs it still holds).",
	"mailbox_agent_free_slots":                  "Run slots of the connected agents not holding a run (0 while draining).",
	"mailbox_agent_connects_total":              "Agent connections accepted.",
	"mailbox_agent_connections_refused_total":   "Agent connections answered ERROR busy and closed because --max-agent-conns were open (handshakes included).",
	"mailbox_agent_protocol_errors_total":       "Agent connections failed for a protocol error.",
	"mailbox_agent_events_total":                "Run events received from agents.",
	"mailbox_agent_checkpoints_total":           "Agent checkpoints, by result (ok, error, refused).",
	"mailbox_agent_commands_total":              "Commands sent to agents for running runs — live messages, decisions and cancels — by the agent's answer (accepted, refused, timeout, failed).",
	"mailbox_agent_commands_late_total":         "Live commands an agent accepted after their timeout, when they had fallen back (counted as timeout too): the run may use queued messages twice.",
	"mailbox_agent_runs_total":                  "Runs given to agents, by how they ended at the hub (completed, transient_error, permanent_error, abandoned, cancelled): the agent's FINISH, or the hub's own outcome when the agent went away or stopped answering (a transient error, agent_lost).",
	"mailbox_agent_unknown_stream_frames_total": "Run frames from agents for a stream that is not open.",
	"mailbox_agent_submits_total":               "SUBMIT requests from agents.",
	"mailbox_agent_replies_dropped_total":       "Replies to agents dropped because the agent did not read them.",
	"mailbox_agent_cancel_overdue_total":        "Cancels an agent did not finish within its grace: the slot was taken back.",

	// The Badger store.
	"mailbox_store_commits_total":              "Store commits (each durable: fsynced, or acknowledged by the NATS server), by result.",
	"mailbox_store_committed_operations_total": "Store operations carried by successful commits.",
	"mailbox_store_committed_messages_total":   "NATS store: messages carried by successful publishes.",
	"mailbox_store_nats_connected":             "NATS store: 1 while connected to the server, else 0.",
	"mailbox_store_nats_disconnects_total":     "NATS store: connections to the server lost.",
	"mailbox_store_nats_reconnects_total":      "NATS store: connections to the server regained.",
	"mailbox_store_commit_seconds":             "Duration of a store commit, its sync included.",
	"mailbox_store_commit_apply_seconds":       "Duration of a store commit until Badger applied it, before the sync.",
	"mailbox_store_writer_lsm_reads_total":     "Point reads of the store's writer that its record cache did not answer.",
	"mailbox_store_value_log_gc_total":         "Value-log garbage collection, by result (rewritten, error).",
	"mailbox_store_value_log_corrupt_files":    "Value-log files that failed their check (value-log GC stays off while one exists).",
	"mailbox_store_open_log_cuts_total":        "Memtable-log tails cut by this process's open after a power loss.",
	"mailbox_store_open_log_rewrites_total":    "Log files written out again by this process's open because the last process's log sync failed.",
	"mailbox_store_refused_operations_total":   "Store writes refused, by reason (disk_full, sync_failed).",
	"mailbox_store_disk_free_bytes":            "Free bytes on the data directory's file system.",
	"mailbox_store_disk_min_free_bytes":        "Free bytes below which the store refuses writes.",

	// The Go runtime and the process, as the metrics library writes them
	// (metrics.WriteProcessMetrics). Two counters keep the library's
	// names without _total: go_cgo_calls_count and go_gc_forced_count.
	"go_sched_latencies_seconds":                    "Time goroutines spent runnable before they ran (Go runtime).",
	"go_mutex_wait_seconds_total":                   "Time goroutines spent blocked on sync.Mutex and sync.RWMutex (Go runtime).",
	"go_gc_mark_assist_cpu_seconds_total":           "CPU time goroutines spent helping the garbage collector mark (Go runtime).",
	"go_gc_cpu_seconds_total":                       "CPU time spent in the garbage collector (Go runtime).",
	"go_gc_pauses_seconds":                          "Stop-the-world pauses of the garbage collector (Go runtime).",
	"go_scavenge_cpu_seconds_total":                 "CPU time spent returning memory to the operating system (Go runtime).",
	"go_memlimit_bytes":                             "The Go runtime's soft memory limit (GOMEMLIMIT).",
	"go_memstats_alloc_bytes":                       "Bytes of allocated heap objects.",
	"go_memstats_alloc_bytes_total":                 "Bytes allocated for heap objects since the start.",
	"go_memstats_buck_hash_sys_bytes":               "Bytes in the profiling bucket hash table.",
	"go_memstats_frees_total":                       "Heap objects freed since the start.",
	"go_memstats_gc_cpu_fraction":                   "Fraction of the CPU time used by the garbage collector since the start.",
	"go_memstats_gc_sys_bytes":                      "Bytes of garbage collection metadata.",
	"go_memstats_heap_alloc_bytes":                  "Bytes of allocated heap objects.",
	"go_memstats_heap_idle_bytes":                   "Bytes in idle (unused) heap spans.",
	"go_memstats_heap_inuse_bytes":                  "Bytes in in-use heap spans.",
	"go_memstats_heap_objects":                      "Allocated heap objects.",
	"go_memstats_heap_released_bytes":               "Bytes of physical memory returned to the operating system.",
	"go_memstats_heap_sys_bytes":                    "Bytes of heap memory obtained from the operating system.",
	"go_memstats_last_gc_time_seconds":              "When the last garbage collection finished (Unix seconds).",
	"go_memstats_lookups_total":                     "Pointer lookups by the runtime since the start.",
	"go_memstats_mallocs_total":                     "Heap objects allocated since the start.",
	"go_memstats_mcache_inuse_bytes":                "Bytes of allocated mcache structures.",
	"go_memstats_mcache_sys_bytes":                  "Bytes of memory obtained for mcache structures.",
	"go_memstats_mspan_inuse_bytes":                 "Bytes of allocated mspan structures.",
	"go_memstats_mspan_sys_bytes":                   "Bytes of memory obtained for mspan structures.",
	"go_memstats_next_gc_bytes":                     "Heap size at which the next garbage collection starts.",
	"go_memstats_other_sys_bytes":                   "Bytes of other runtime memory.",
	"go_memstats_stack_inuse_bytes":                 "Bytes in stack spans.",
	"go_memstats_stack_sys_bytes":                   "Bytes of stack memory obtained from the operating system.",
	"go_memstats_sys_bytes":                         "Bytes of memory obtained from the operating system in all.",
	"go_cgo_calls_count":                            "Calls from Go to C since the start (a counter).",
	"go_cpu_count":                                  "Logical CPUs usable by the process.",
	"go_gc_duration_seconds":                        "Stop-the-world pauses of the garbage collector, as a summary.",
	"go_gc_forced_count":                            "Garbage collections forced by the application since the start (a counter).",
	"go_gomaxprocs":                                 "GOMAXPROCS: the processors that run Go code at once (--gomaxprocs).",
	"go_goroutines":                                 "Goroutines that exist.",
	"go_threads":                                    "Operating system threads created by the Go runtime.",
	"go_info":                                       "The Go version that built the binary (always 1).",
	"go_info_ext":                                   "The compiler, platform and GOROOT that built the binary (always 1).",
	"process_cpu_seconds_system_total":              "CPU time the process spent in the kernel.",
	"process_cpu_seconds_total":                     "CPU time the process spent, user and kernel.",
	"process_cpu_seconds_user_total":                "CPU time the process spent in user space.",
	"process_major_pagefaults_total":                "Page faults that read from disk.",
	"process_minor_pagefaults_total":                "Page faults served without reading from disk.",
	"process_num_threads":                           "Operating system threads of the process.",
	"process_resident_memory_bytes":                 "Resident memory (RSS).",
	"process_start_time_seconds":                    "When the process started (Unix seconds).",
	"process_virtual_memory_bytes":                  "Virtual memory size.",
	"process_virtual_memory_peak_bytes":             "Peak virtual memory size.",
	"process_resident_memory_peak_bytes":            "Peak resident memory (VmHWM).",
	"process_resident_memory_anon_bytes":            "Resident anonymous memory (RssAnon): the heap and stacks.",
	"process_resident_memory_file_bytes":            "Resident file-backed memory (RssFile): mapped store files among it.",
	"process_resident_memory_shared_bytes":          "Resident shared memory (RssShmem).",
	"process_io_read_bytes_total":                   "Bytes the process read, page cache included.",
	"process_io_written_bytes_total":                "Bytes the process wrote, page cache included.",
	"process_io_read_syscalls_total":                "Read system calls of the process.",
	"process_io_write_syscalls_total":               "Write system calls of the process.",
	"process_io_storage_read_bytes_total":           "Bytes the process caused to be read from storage.",
	"process_io_storage_written_bytes_total":        "Bytes the process caused to be written to storage.",
	"process_pressure_cpu_waiting_seconds_total":    "Time some of the process's cgroup waited for CPU (PSI).",
	"process_pressure_cpu_stalled_seconds_total":    "Time all of the process's cgroup waited for CPU (PSI).",
	"process_pressure_io_waiting_seconds_total":     "Time some of the process's cgroup waited for IO (PSI).",
	"process_pressure_io_stalled_seconds_total":     "Time all of the process's cgroup waited for IO (PSI).",
	"process_pressure_memory_waiting_seconds_total": "Time some of the process's cgroup waited for memory (PSI).",
	"process_pressure_memory_stalled_seconds_total": "Time all of the process's cgroup waited for memory (PSI).",
	"process_cgroup_cpu_throttled_seconds_total":    "Time the process's cgroup was throttled by its CPU limit.",
}

// counters are families the metrics library declares gauges that only
// grow: Fill writes their TYPE as counter, so that rate() applies.
var counters = map[string]bool{
	"process_io_read_bytes_total":            true,
	"process_io_written_bytes_total":         true,
	"process_io_read_syscalls_total":         true,
	"process_io_write_syscalls_total":        true,
	"process_io_storage_read_bytes_total":    true,
	"process_io_storage_written_bytes_total": true,
}

// Fill returns text (a Prometheus scrape) with the HELP text of Help on
// every "# HELP <family>" line that has none, and the TYPE of counters
// mended; it appends to dst.
func Fill(dst, text []byte) []byte {
	for len(text) > 0 {
		line := text
		if i := bytes.IndexByte(text, '\n'); i >= 0 {
			line = text[:i+1]
		}
		text = text[len(line):]
		if rest, ok := bytes.CutPrefix(line, []byte("# HELP ")); ok {
			family := bytes.TrimSuffix(rest, []byte("\n"))
			if h, known := Help[string(family)]; known && bytes.IndexByte(family, ' ') < 0 {
				dst = append(dst, "# HELP "...)
				dst = append(dst, family...)
				dst = append(dst, ' ')
				dst = append(dst, h...)
				dst = append(dst, '\n')
				continue
			}
		}
		if rest, ok := bytes.CutPrefix(line, []byte("# TYPE ")); ok {
			if family, ok := bytes.CutSuffix(rest, []byte(" gauge\n")); ok && counters[string(family)] {
				dst = append(dst, "# TYPE "...)
				dst = append(dst, family...)
				dst = append(dst, " counter\n"...)
				continue
			}
		}
		dst = append(dst, line...)
	}
	return dst
}
