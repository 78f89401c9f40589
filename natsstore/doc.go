// Package natsstore implements engine.Store on NATS JetStream, so several
// sidecars can share one queue.
//
// One stream is used as a key-value table: every record (dispatch, thread
// state, dedupe lock, run, thread projection, message, message-id lock) is
// the single retained message of its own subject (subjects.go). Every
// operation is an optimistic transaction (txn.go): it reads the records it
// needs with their stream sequences, decides with the same rules as
// badgerstore, and writes every change in one atomic batch publish whose
// messages each expect the sequence their subject was read at; a batch
// that loses a race is retried from the reads. So all changes of one call
// commit together, and two sidecars claiming one thread cannot both win:
// the claim guard lives in the thread state written in the same batch as
// the dispatch.
//
// Listings are served by a per-process index fed by an ordered consumer
// (index.go); every control path validates its candidates against the
// records.
//
// The store is also an engine.SignalSource (signals.go): every transition
// of a dispatch into queued publishes a wake-up signal to a work-queue
// stream with one durable consumer shared by all sidecars, and a sweeper
// republishes signals that may have been lost. And it is an
// engine.LiveRouter (live.go): live commands for a run executing in
// another process travel over core NATS request/reply on the run's exact
// subject; ServeLive hands the commands routed here to the engine. README.md describes the layout, the consistency of the index,
// what the server must be configured for (every write fsynced before it is
// acknowledged) and where this store differs from badgerstore.
package natsstore
