// Package metrichelp holds the HELP text of every metric family the
// sidecar serves on /metrics, and fills it into a scrape: the metrics
// library writes HELP lines with no text (metrics.ExposeMetadata).
package metrichelp

import "bytes"

// Help maps a metric family to its HELP text. The families of the Go
// runtime and the process (go_*, process_*) keep the library's lines.
var Help = map[string]string{
	// The client API (proxy).
	"mailbox_http_requests_total":           "HTTP requests answered, by route pattern (unmatched: unknown paths) and status code.",
	"mailbox_http_request_duration_seconds": "Time to answer an HTTP request, by route pattern; for a stream, the time to its start.",
	"mailbox_http_sse_subscribers":          "Open SSE streams.",
	"mailbox_http_sse_dropped_total":        "SSE streams ended because the client fell behind the event buffer (slow_subscriber).",

	// The engine.
	"mailbox_operations_total":                     "Store calls, by operation and result (ok, error, conflict, empty).",
	"mailbox_operation_duration_seconds":           "Duration of store calls, by operation and result.",
	"mailbox_dispatch_depth":                       "Dispatches in each status (read from the store at most once a second).",
	"mailbox_queue_depth":                          "Queued dispatches (read from the store at most once a second).",
	"mailbox_dispatch_depth_errors_total":          "Failed reads of the dispatch counts or of the ready wait (the gauges keep their last values).",
	"mailbox_dispatch_ready_wait_seconds":          "How long the thread first in the ready order has waited (queue lag); 0 when none waits.",
	"mailbox_dispatch_held_threads":                "Threads set aside by the dispatcher: their claims failed, or no agent took their run.",
	"mailbox_active_runs":                          "Attempts executing in this sidecar.",
	"mailbox_dispatch_enqueue_to_start_seconds":    "Time from a dispatch's creation to the start of its attempt.",
	"mailbox_dispatch_eligible_to_start_seconds":   "Time from a dispatch falling due to the start of its attempt.",
	"mailbox_dispatch_claim_to_start_seconds":      "Time from a dispatch's claim to the start of its attempt.",
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
	"mailbox_agent_protocol_errors_total":       "Agent connections failed for a protocol error.",
	"mailbox_agent_events_total":                "Run events received from agents.",
	"mailbox_agent_checkpoints_total":           "Agent checkpoints, by result (ok, error, refused).",
	"mailbox_agent_commands_total":              "Live commands sent to agents, by result (accepted, refused, timeout, failed).",
	"mailbox_agent_runs_total":                  "Runs given to agents, by the outcome the agent reported (completed, transient_error, permanent_error, abandoned, cancelled).",
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
}

// Fill returns text (a Prometheus scrape) with the HELP text of Help on
// every "# HELP <family>" line that has none; it appends to dst.
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
		dst = append(dst, line...)
	}
	return dst
}
