// Package proxy is the sidecar's client API (spec/http.md): HTTP/1.1 served
// by fasthttp on the API Unix socket, optionally on a TCP address behind a
// bearer token, and the probe and metrics endpoints on the admin address.
//
// # Model
//
// A Server is a thin translation layer over one engine.Mailbox. Every
// request is matched against a fixed route table (see routes.go), its path
// ids and body are decoded and validated completely before the engine is
// called — so a request that fails validation leaves nothing behind — and
// the engine's answer is written as JSON, or, for a foreground submit and
// a re-attachment, as a Server-Sent Events stream. Engine errors become
// one error shape, {"error":{"code","message"}}, through one table
// (errors.go): validation 400, not_found 404, conflict 409, too_large 413,
// unavailable 503, internal 500; the HTTP layer adds method_not_allowed
// 405 (with Allow) and unauthorized 401, and answers 503 unavailable to a
// request whose body found no room under Config.MaxBodyTotal (budget.go).
//
// # Streams
//
// An SSE stream follows a run's engine.EventLog, a bounded ring that the
// engine appends to without ever waiting for a reader. Each stream runs in
// the goroutine fasthttp starts for SetBodyStreamWriter and reads the ring
// at its own pace, in batches, flushing after each batch. It starts with
// the sidecar's `submitted` event (id 0) on a foreground submit, or with a
// replay from Last-Event-ID (or ?after=N) on re-attachment; a position
// older than the ring is answered with `event: reset` and the replay goes
// on from the oldest event kept. A stream that falls behind the ring
// while it is live is sent `event: reset` and disconnected (counted in
// mailbox_http_sse_dropped_total); the client re-attaches with its
// Last-Event-ID. Event ids are run-local and keep growing across a run's
// attempts, after a restart or a crash too: they come from the run's
// durable count of started attempts, the s-th start numbering its events
// from (s−1)·2^32 + 1 — the first attempt from 1, as spec/http.md says, a
// retry from 4294967297 (engine/README.md, "Event ids"; a deliberate
// reading of the spec's run-local sequence, whose ids used to restart at 1
// with each attempt whose predecessor's buffer was gone, so a client
// re-attaching with an earlier attempt's id was served the new attempt
// from the middle). A client that re-attaches with the id it last saw of
// an earlier attempt gets the current attempt from its first event held,
// preceded by `event: reset` (expired) unless this sidecar saw that
// attempt end at that id. A `: ping` comment every PingInterval keeps
// idle streams alive and detects clients that left (a failed flush); a
// client that stops reading is cut off once one write has been stuck for
// max(4×PingInterval, 10 s), from the stream's first write on, plus up to
// five ping intervals (the writes fasthttp's pipe to the connection takes
// meanwhile each move the bound on), and is counted with the slow
// subscribers; a stream reads 256 KiB of events at a time (one event past
// it), and fasthttp's pipe holds up to five writes more. A stream ends after the log closes (the run
// finished: its run_finish is the last event), when the client leaves, or
// at Shutdown. Closing a stream never cancels the run. After a stream
// that ended normally the connection serves the client's next request
// (HTTP keep-alive), so a client submitting run after run does not dial
// again each time. The stream's last bytes keep one stall bound after it
// ends (a client that stops reading then is still cut off); the next
// request on the connection clears it. Shutdown gives streams, and the
// connections of ended streams whose last bytes are still being written,
// 250 ms to finish, then cuts them off.
//
// # Decisions where spec/http.md is silent
//
//   - A path id may be percent-encoded: its segment is decoded, then
//     checked against the path rule (an escaped '/' is part of no id and
//     is refused).
//   - A request line and headers over 4 KiB are answered 431 too_large.
//   - Ids inside bodies that a client later uses in a path (thread_id,
//     run_id, dispatch_id, continue_run_id, parent_run_id,
//     parent_thread_id) follow the path rule ([A-Za-z0-9._:-], 1–256,
//     not "." or "..", which clients that normalise paths remove);
//     agent_id, dedupe_key, message ids, call ids and
//     transport_request_id follow the store's rule (engine.ValidateID).
//     A body thread_id that differs from the path's is a validation error.
//   - Unknown body fields are ignored; a known field of the wrong JSON type
//     is a validation error, as are frontend_tools that are not an array,
//     overrides that are not an object, an unknown origin or run_mode, a
//     message role other than system/user/assistant/tool, and two messages
//     with the same id in one request.
//   - The Idempotency-Key header overrides a body dedupe_key. A foreground
//     submit whose key matches a queued or running dispatch of the thread
//     answers that dispatch without interrupting anything: as JSON, or as
//     a stream that follows the run if it executes here and otherwise
//     ends after `submitted` (the client re-attaches once it runs).
//   - GET …/events of a thread whose run this sidecar has no log of — or
//     only the closed log of an attempt the client read to its end (its
//     Last-Event-ID is that log's last) — but whose dispatch the store
//     shows active — claimed (after a crash, by
//     the killed process until its lease is reclaimed; or by another
//     sidecar sharing the store), or, nothing claimed, the thread's next
//     queued dispatch had an attempt (a reclaim, a retry, an attempt a
//     shutdown released: its run is running) — is a stream
//     that follows the run's next attempt here (engine.Mailbox.Attach),
//     not 404. A Last-Event-ID of the run's earlier attempt is answered,
//     with that attempt's first event, by `event: reset` (expired) — none
//     when it is the end of the attempt just before, which this sidecar
//     ran: a client that read a failed attempt's run_finish (it names the
//     retry: retry_at) and re-attaches with its id follows the retry as
//     one stream. An id above the run's earlier attempts' gets unknown_id
//     and the attempt from its first event. If the run ends without running here, the stream ends
//     with a run_finish saying how: at once when this sidecar cancels,
//     supersedes or dead-letters it, else (it ran on another sidecar
//     sharing the store, whose events this one never sees) at the next
//     GC. 404 means no run of the thread is active or retained.
//   - An invalid traceparent header (not the W3C version-00 form) is
//     dropped, as W3C Trace Context asks, not refused.
//   - Write requests (every POST) are answered 503 unavailable while the
//     mailbox is not running (before Start finished, after Stop began) and
//     from the first moment of Shutdown; reads are served while the store
//     is. The probes and /metrics are never gated.
//   - Requeue answers 200 with the new dispatch record; interrupt answers
//     {new_dispatch_epoch, superseded_count, active_dispatch}. Dispatch
//     records never show their claim token.
//   - List pages: limit 1..∞ (capped at 1000, default 50), offset ≥ 0;
//     limit=0, a negative or non-numeric value is a validation error. The
//     message log pages by after_seq: its next_offset is the after_seq of
//     the next page (the last seq returned). A thread with no dispatches
//     or messages answers an empty page, not 404.
//   - `event: reset` carries no id (the client's Last-Event-ID stays) and
//     the data {"type":"reset","reason":…,"after":A,"oldest":F}: reason
//     "expired" (the replay position fell out of the ring, or is an id of
//     an earlier attempt of the run whose end this sidecar did not see;
//     the stream goes on from F; when the attempt has no event yet, the
//     reset is sent with its first one), "slow_subscriber" (the stream
//     fell behind the ring after it was served from it; it ends) or "unknown_id" (Last-Event-ID is
//     beyond the thread's current attempt — an id of an earlier run, or
//     of a log numbered apart; the replay restarts at the attempt's first
//     event). No Last-Event-ID, or 0 (the `submitted` event's), replays
//     the current attempt from its first event held, with a reset only if
//     some of its events were dropped. An id of an earlier run of the
//     thread that is not beyond the current run's last id is taken as the
//     current run's (runs number from 1), unless the request names the
//     run it followed (?run_id=): a thread now on another run then gets
//     an unknown_id reset and that run whole.
//   - A foreground run whose dispatch is withdrawn before it starts
//     (superseded, cancelled) ends its stream with a sidecar run_finish
//     (termination cancelled), id 2147483649 (2^31+1: an attempt that did
//     not reach the agent, of a run whose start count is not known —
//     apart from the ids of the run's started attempts, for the dispatch
//     may continue a waiting run; engine/README.md, "Event ids").
//   - Agent events that contain line breaks (pretty-printed JSON) are
//     compacted to one line; otherwise the data is the agent's bytes.
//   - Request metrics label requests by route pattern ("unmatched" for
//     unknown paths; a request refused for its token counts under the
//     route it asked for, and an unknown path without a token is refused
//     with 401, not told 404); for a stream the duration is the time to
//     the start of the stream.
package proxy
