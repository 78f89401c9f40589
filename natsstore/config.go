package natsstore

import (
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Config configures a Store. The zero value of every field but URL means
// its default.
type Config struct {
	// URL is the NATS server URL (or a comma-separated list). Required.
	URL string
	// Stream is the JetStream stream holding every record (default
	// "MAILBOX"). It is created if absent; an existing stream's config is
	// updated to the one this package needs, unless its subjects or
	// replica count differ from this config's: Open refuses it then.
	Stream string
	// Prefix is the first subject token of every record (default "mbx");
	// the stream's subjects are "<Prefix>.>".
	Prefix string
	// Replicas is the stream's replica count (default 1). With 1 replica
	// the server must run with jetstream { sync_interval: always } for an
	// acknowledged write to survive a power loss (see README.md).
	Replicas int
	// Options are extra nats.Connect options (credentials, TLS, name…);
	// they are applied after this package's defaults.
	Options []nats.Option
	// RequestTimeout bounds one request to the server when the caller's
	// context has no deadline (default 5s).
	RequestTimeout time.Duration
	// MaxConflictRetries bounds how often one operation re-reads and
	// retries after another writer changed a record it read (default 16).
	MaxConflictRetries int
	// MaxInflightBatches bounds this store's concurrent atomic batches
	// (default 32; the server refuses more than 50 open batches per stream).
	MaxInflightBatches int
	// SignalSweepInterval is how often the signal sweeper looks for due
	// queued dispatches whose signal may be lost (default 5s; see
	// signals.go).
	SignalSweepInterval time.Duration
	// SignalRepublishAfter is how long after this store last signalled a
	// dispatch the sweeper signals it again while it stays due and
	// unclaimed (default 30s; at least 1ms).
	SignalRepublishAfter time.Duration
	// LiveTimeout bounds a live command's request (the caller's context
	// may end it sooner) and a received command's handler (default 5s). A
	// command nobody accepted within it is not delivered. Keep it above
	// the engine's CommandTimeout (the receiver waits that long for the
	// agent's receipt).
	LiveTimeout time.Duration
	// Logger receives the store's logs. Default: discard.
	Logger *slog.Logger
}

func (c *Config) validate() error {
	if strings.TrimSpace(c.URL) == "" {
		return engine.Validationf("natsstore: URL is required")
	}
	if c.Stream == "" {
		c.Stream = "MAILBOX"
	}
	if strings.ContainsAny(c.Stream, ".*> \t\r\n/\\") {
		return engine.Validationf("natsstore: stream name %q contains a character a stream name cannot hold", c.Stream)
	}
	if c.Prefix == "" {
		c.Prefix = "mbx"
	}
	for _, tok := range strings.Split(c.Prefix, ".") {
		if tok == "" || strings.ContainsAny(tok, "*> \t\r\n") {
			return engine.Validationf("natsstore: prefix %q is not a literal subject prefix", c.Prefix)
		}
	}
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = 5 * time.Second
	}
	if c.MaxConflictRetries <= 0 {
		c.MaxConflictRetries = 16
	}
	if c.MaxInflightBatches <= 0 {
		c.MaxInflightBatches = 32
	}
	if c.SignalSweepInterval <= 0 {
		c.SignalSweepInterval = 5 * time.Second
	}
	if c.SignalRepublishAfter <= 0 {
		c.SignalRepublishAfter = 30 * time.Second
	}
	c.SignalRepublishAfter = max(c.SignalRepublishAfter, time.Millisecond) // the sweeper counts windows in ms
	if c.LiveTimeout <= 0 {
		c.LiveTimeout = 5 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}
