package engine

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/google/uuid"
)

// Config configures a Mailbox. Zero fields take the defaults named in
// their comments (engine.md §0).
type Config struct {
	// ConsumerID names this process in claims (claimed_by). Default: a
	// fresh UUIDv7.
	ConsumerID string
	// KeepOrphanedClaims leaves the claims an earlier process left in a
	// store of one process (OrphanReclaimer) to lapse with their leases,
	// as on a shared store, instead of reclaiming them at Recover: for
	// agents whose runs may outlive a lost connection by much.
	KeepOrphanedClaims bool
	// Lease is how long a claim holds without renewal. Default 30s.
	Lease time.Duration
	// SuspendedLease is the lease while a run waits on a suspended tool
	// call. Default 10m.
	SuspendedLease time.Duration
	// RenewInterval is how often a running dispatch's lease is renewed.
	// Default 10s; must be shorter than Lease.
	RenewInterval time.Duration
	// SweepInterval is how often expired leases are reclaimed. Default 30s.
	SweepInterval time.Duration
	// GCInterval is how often terminal dispatches and idle workers are
	// collected. Default 60s.
	GCInterval time.Duration
	// GCTTL is the age after which terminal dispatches are purged.
	// Default 24h.
	GCTTL time.Duration
	// MaxAttempts is the attempt budget of new dispatches. Default 5.
	MaxAttempts uint32
	// MaxQueued bounds the dispatches waiting in the queue: past it a
	// background submit (over HTTP, or an agent's SUBMIT) is refused
	// with ErrQueueFull, unless it repeats an earlier one by its dedupe
	// key. The count is the store's, at most a second old: a burst may
	// pass the bound by a second's submits. Foreground submits are not
	// refused (they run at once, and supersede their thread's queue),
	// nor are live-then-queue messages (logged before they are queued).
	// 0, the default: no bound.
	MaxQueued int64
	// RetryDelay is the base of the exponential retry backoff. Default 250ms.
	RetryDelay time.Duration
	// MaxRetryDelay caps the backoff. Default 30s.
	MaxRetryDelay time.Duration
	// CancelWait bounds how long a foreground submit waits for the active
	// run of its thread to release its claim. Default 5s.
	CancelWait time.Duration
	// CommandTimeout bounds how long a live command waits for the agent's
	// receipt before it counts as not delivered. Default 2s.
	CommandTimeout time.Duration
	// EventBuffer is how many events of a run are kept for re-attachment.
	// Default 10 000.
	EventBuffer int
	// EventBufferBytes bounds the bytes of a run's events kept as well
	// (the newest is always kept); an event counts Event.Size, here and
	// in the two bounds below. Default 32 MiB: two events of the
	// largest frame, so that one large event does not cut off a client
	// following the run live a few events behind.
	EventBufferBytes int64
	// EventBufferTotalBytes bounds the bytes of events the running (and
	// waiting) runs keep together: past it each run's log that grows
	// drops its oldest events down to LiveBudgetFloor. Default 256 MiB.
	// (EventBufferBytes times the agents' slots was no bound: an agent
	// declaring 1 024 slots could make the sidecar hold 32 GiB; found by
	// review.)
	EventBufferTotalBytes int64
	// EventRetention is how long a finished run's events stay
	// re-attachable. Default 60s.
	EventRetention time.Duration
	// EventRetentionBytes bounds the bytes of events the finished runs of
	// every thread keep for re-attachment: past it the runs that finished
	// first are forgotten before EventRetention. Default 256 MiB. (Each
	// run's events were bounded, their sum was not: twenty runs that
	// finished within a minute held 700 MB; found by review.)
	EventRetentionBytes int64
	// ContextMessages and ContextBytes cap the thread history sent with a
	// run. Defaults 500 and 4 MiB.
	ContextMessages int
	ContextBytes    int
	// ContextCacheBytes bounds the engine's cache of the newest decoded
	// messages of recently run threads (tailcache.go), which spares
	// re-reading a thread's whole context window for every run, and of
	// the messages submits appended until their run reads them (a quarter
	// of it). Default 64 MiB; negative turns it off.
	ContextCacheBytes int64
	// StartupDelay postpones recovery and the loops after Start. Default 0.
	StartupDelay time.Duration
	// StartupRecoveryAttempts is how often Start tries recovery before it
	// fails (at least 1). Default 1.
	StartupRecoveryAttempts int
	// StartupRetryDelay separates those attempts. Default 250ms.
	StartupRetryDelay time.Duration
	// MaintenanceCallback, when set, runs after every GC pass.
	MaintenanceCallback func()

	// SignalBatch, SignalWait, SignalNackBase, SignalNackMax and
	// SignalHandlers tune the dispatch-signal loop of stores that offer
	// signals (engine.md §13). Defaults 32, 500ms, 500ms, 30s, 32.
	SignalBatch    int
	SignalWait     time.Duration
	SignalNackBase time.Duration
	SignalNackMax  time.Duration
	SignalHandlers int
	// SharedClaimGrace: on a store shared between processes (one that
	// offers signals), the dispatcher leaves work that fell due less than
	// this long ago to the sidecar that submitted it and to the one that
	// takes its signal, instead of every sidecar racing to claim it (each
	// lost race is a refused transaction on the shared store). Default
	// 500ms; negative turns it off.
	SharedClaimGrace time.Duration

	// Logger receives the engine's logs. Default: discard.
	Logger *slog.Logger
	// Now is the clock (Unix milliseconds). Default: the wall clock. Tests
	// inject their own.
	Now func() int64
}

// Defaults of Config.
const (
	DefaultLease          = 30 * time.Second
	DefaultSuspendedLease = 10 * time.Minute
	DefaultRenewInterval  = 10 * time.Second
	DefaultSweepInterval  = 30 * time.Second
	DefaultGCInterval     = 60 * time.Second
	DefaultGCTTL          = 24 * time.Hour
	DefaultRetryDelay     = 250 * time.Millisecond
	DefaultMaxRetryDelay  = 30 * time.Second
	DefaultCancelWait     = 5 * time.Second
	DefaultCommandTimeout = 2 * time.Second
	DefaultEventBuffer    = 10_000
	// DefaultEventBufferBytes is the default EventBufferBytes.
	DefaultEventBufferBytes = 32 << 20
	DefaultEventRetention   = 60 * time.Second
	// DefaultEventBufferTotalBytes is the default EventBufferTotalBytes.
	DefaultEventBufferTotalBytes = 256 << 20
	// DefaultEventRetentionBytes is the default EventRetentionBytes.
	DefaultEventRetentionBytes = 256 << 20
	DefaultContextMessages     = 500
	DefaultContextBytes        = 4 << 20
	// DefaultContextCacheBytes is the default ContextCacheBytes.
	DefaultContextCacheBytes = 64 << 20
	// InlineClaimGuard is how far in the future a foreground submit's
	// dispatch is enqueued, so background claimers leave it to the inline
	// claim.
	InlineClaimGuard = 60 * time.Second
)

// withDefaults returns c with every zero field set to its default, or an
// error naming the first invalid field.
func (c Config) withDefaults() (Config, error) {
	dur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	dur(&c.Lease, DefaultLease)
	dur(&c.SuspendedLease, DefaultSuspendedLease)
	dur(&c.RenewInterval, DefaultRenewInterval)
	dur(&c.SweepInterval, DefaultSweepInterval)
	dur(&c.GCInterval, DefaultGCInterval)
	dur(&c.GCTTL, DefaultGCTTL)
	dur(&c.RetryDelay, DefaultRetryDelay)
	dur(&c.MaxRetryDelay, DefaultMaxRetryDelay)
	dur(&c.CancelWait, DefaultCancelWait)
	dur(&c.CommandTimeout, DefaultCommandTimeout)
	dur(&c.EventRetention, DefaultEventRetention)
	dur(&c.StartupRetryDelay, 250*time.Millisecond)
	dur(&c.SignalWait, 500*time.Millisecond)
	dur(&c.SharedClaimGrace, 500*time.Millisecond)
	dur(&c.SignalNackBase, 500*time.Millisecond)
	dur(&c.SignalNackMax, 30*time.Second)
	if c.StartupRecoveryAttempts <= 0 {
		c.StartupRecoveryAttempts = 1
	}
	if c.SignalBatch <= 0 {
		c.SignalBatch = 32
	}
	if c.SignalHandlers <= 0 {
		c.SignalHandlers = 32
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultMaxAttempts
	}
	if c.EventBuffer == 0 {
		c.EventBuffer = DefaultEventBuffer
	}
	if c.EventRetentionBytes == 0 {
		c.EventRetentionBytes = DefaultEventRetentionBytes
	}
	if c.EventBufferTotalBytes == 0 {
		c.EventBufferTotalBytes = DefaultEventBufferTotalBytes
	}
	if c.EventBufferBytes == 0 {
		c.EventBufferBytes = DefaultEventBufferBytes
	}
	if c.ContextMessages == 0 {
		c.ContextMessages = DefaultContextMessages
	}
	if c.ContextBytes == 0 {
		c.ContextBytes = DefaultContextBytes
	}
	if c.ContextCacheBytes == 0 {
		c.ContextCacheBytes = DefaultContextCacheBytes
	}
	if c.ConsumerID == "" {
		c.ConsumerID = uuid.Must(uuid.NewV7()).String()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = func() int64 { return time.Now().UnixMilli() }
	}
	for name, d := range map[string]time.Duration{
		"Lease": c.Lease, "SuspendedLease": c.SuspendedLease, "RenewInterval": c.RenewInterval,
		"SweepInterval": c.SweepInterval, "GCInterval": c.GCInterval, "GCTTL": c.GCTTL,
		"RetryDelay": c.RetryDelay, "MaxRetryDelay": c.MaxRetryDelay, "CancelWait": c.CancelWait,
		"CommandTimeout": c.CommandTimeout, "EventRetention": c.EventRetention,
		"StartupDelay": c.StartupDelay, "StartupRetryDelay": c.StartupRetryDelay,
		"SignalWait": c.SignalWait, "SignalNackBase": c.SignalNackBase, "SignalNackMax": c.SignalNackMax,
	} {
		if d < 0 {
			return c, Validationf("config: %s is negative (%s)", name, d)
		}
	}
	if c.MaxQueued < 0 {
		return c, Validationf("config: MaxQueued %d is negative", c.MaxQueued)
	}
	switch {
	case c.RenewInterval >= c.Lease:
		return c, Validationf("config: RenewInterval %s must be shorter than Lease %s", c.RenewInterval, c.Lease)
	case c.SuspendedLease < c.Lease:
		return c, Validationf("config: SuspendedLease %s must be at least Lease %s", c.SuspendedLease, c.Lease)
	case c.MaxRetryDelay < c.RetryDelay:
		return c, Validationf("config: MaxRetryDelay %s is below RetryDelay %s", c.MaxRetryDelay, c.RetryDelay)
	case c.EventBuffer < 0 || c.EventBufferBytes < 0 || c.EventBufferTotalBytes < 0 || c.EventRetentionBytes < 0 || c.ContextMessages < 0 || c.ContextBytes < 0:
		return c, Validationf("config: EventBuffer, EventBufferBytes, EventBufferTotalBytes, EventRetentionBytes, ContextMessages and ContextBytes must not be negative")
	}
	if err := ValidateID("ConsumerID", c.ConsumerID); err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	return c, nil
}

// Validate reports whether c (with defaults filled in) is usable, without
// building anything: the binary checks its flags before opening files.
func (c Config) Validate() error {
	_, err := c.withDefaults()
	return err
}
