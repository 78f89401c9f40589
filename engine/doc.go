// Package engine is the mailbox service of mailbox-sidecar and the home of
// its domain types.
//
// The model: every run a client asks for becomes a durable Dispatch in a
// per-thread queue. A dispatch is claimed under a lease by exactly one
// consumer at a time (one claimed dispatch per thread), handed to an agent,
// and settled with ack, nack (retry with backoff), dead letter, cancel,
// release or supersede. Each thread has a dispatch epoch; an interrupt bumps
// it and atomically supersedes the thread's queued work, and any dispatch
// still carrying an older epoch is superseded at its next store touch.
//
// Besides the queue the engine keeps run records (one per run, with the
// thread projection pointing at the open and latest runs) and an append-only
// message log per thread with 1-based sequence numbers.
//
// The engine declares the interfaces it consumes: DispatchStore and RunStore
// (implemented by badgerstore and checked by engine/storetest). All
// timestamps passed to a store are Unix milliseconds chosen by the caller;
// stores never read the wall clock to decide a transition. Run-record
// timestamps are Unix seconds.
package engine
