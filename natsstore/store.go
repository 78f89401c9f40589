package natsstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Store is the NATS JetStream implementation of engine.Store. It is safe
// for concurrent use, and several Stores (in one process or many) may
// share one stream.
type Store struct {
	cfg       Config
	log       *slog.Logger
	nc        *nats.Conn
	js        jetstream.JetStream
	sub       subjects
	directGet string // direct-get subject prefix: "$JS.API.DIRECT.GET.<stream>."
	msgGet    string // message-get API subject (leader reads): "$JS.API.STREAM.MSG.GET.<stream>"
	idx       *index
	cc        jetstream.ConsumeContext
	index     jetstream.Consumer // the index's ordered consumer, deleted at Close
	locks     *threadLocks
	inflight  chan struct{} // one token per open atomic batch
	group     committer
	metrics   storeMetrics

	committed atomic.Uint64 // highest indexed sequence this store committed
	// reclaimWave is how many lapsed leases ReclaimExpired reclaims at
	// once (0: maxReclaimWave); it shrinks under contention (dispatch.go).
	reclaimWave atomic.Int32

	sig  signals        // dispatch signals (signals.go)
	live live           // live commands received (live.go)
	bg   sync.WaitGroup // background loops (the signal sweeper)

	life      context.Context // ends with Close
	endLife   context.CancelFunc
	done      chan struct{} // closed by Close
	closed    atomic.Bool
	closeOnce sync.Once
}

var _ engine.Store = (*Store)(nil)

// Open connects to the server, creates or updates the stream and builds
// the index from it. An unreachable server is engine.ErrUnavailable.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	opts := append([]nats.Option{
		nats.Name("mailbox-sidecar natsstore"),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
	}, cfg.Options...)
	nc, err := nats.Connect(cfg.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("open nats store: connect %s: %w", RedactURL(cfg.URL), unavailable(err))
	}
	s := &Store{
		cfg:       cfg,
		log:       cfg.Logger,
		nc:        nc,
		sub:       subjects{p: cfg.Prefix + "."},
		directGet: "$JS.API.DIRECT.GET." + cfg.Stream + ".",
		msgGet:    "$JS.API.STREAM.MSG.GET." + cfg.Stream,
		locks:     newThreadLocks(),
		inflight:  make(chan struct{}, cfg.MaxInflightBatches),
		done:      make(chan struct{}),
		metrics:   newStoreMetrics(nc),
	}
	s.watchConnection()
	s.life, s.endLife = context.WithCancel(context.Background())
	if err := s.start(ctx); err != nil {
		_ = s.Close()
		return nil, fmt.Errorf("open nats store %s: %w", cfg.Stream, err)
	}
	return s, nil
}

// StreamConfig returns the stream configuration Open creates for cfg
// (after defaults), for operators who create the stream themselves.
func StreamConfig(cfg Config) (jetstream.StreamConfig, error) {
	if err := cfg.validate(); err != nil {
		return jetstream.StreamConfig{}, err
	}
	return streamConfig(&cfg), nil
}

func streamConfig(cfg *Config) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:               cfg.Stream,
		Description:        "mailbox-sidecar store: one record per subject",
		Subjects:           []string{cfg.Prefix + ".>"},
		Retention:          jetstream.LimitsPolicy,
		MaxMsgsPerSubject:  1,
		MaxMsgs:            -1,
		MaxBytes:           -1,
		MaxAge:             0,
		Discard:            jetstream.DiscardNew,
		Storage:            jetstream.FileStorage,
		Replicas:           cfg.Replicas,
		AllowDirect:        true,
		AllowAtomicPublish: true,
		DenyDelete:         true,
		Duplicates:         0,
	}
}

// ensureStream creates the stream want, or brings an existing one to the
// settings this package needs, but refuses one whose subjects or replica
// count differ from want's: those are not one sidecar's to change. A
// second deployment with another prefix on the same stream name took the
// stream's subjects from the first (whose writes then failed), and a
// sidecar started without --nats-replicas turned a stream of three
// replicas into one, with the durability the README relies on (found by
// review). An operator changes them on the stream (nats stream edit) and
// in every sidecar's flags.
func ensureStream(ctx context.Context, js jetstream.JetStream, want jetstream.StreamConfig) (jetstream.Stream, error) {
	st, err := js.Stream(ctx, want.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		st, err = js.CreateStream(ctx, want)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) { // another sidecar made it meanwhile
			st, err = js.Stream(ctx, want.Name)
		} else if err == nil {
			return st, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", want.Name, unavailable(err))
	}
	have := st.CachedInfo().Config
	if !slices.Equal(have.Subjects, want.Subjects) {
		return nil, fmt.Errorf("stream %s holds subjects %v, this store needs %v: another deployment's stream (use another --nats-stream, or the same --nats-prefix)",
			want.Name, have.Subjects, want.Subjects)
	}
	if have.Replicas != want.Replicas {
		return nil, fmt.Errorf("stream %s has %d replicas, this store is configured for %d (--nats-replicas): set the flag to the stream's, or change the stream (nats stream edit) and then every sidecar's flag",
			want.Name, have.Replicas, want.Replicas)
	}
	st, err = js.UpdateStream(ctx, want)
	if err != nil {
		return nil, fmt.Errorf("update stream %s: %w", want.Name, unavailable(err))
	}
	return st, nil
}

// indexFilter is the index consumer's subject filter for the subject
// prefix p (ending in "."): the records of every two-token family.
func indexFilter(p string) string { return p + "*.*" }

func (s *Store) start(ctx context.Context) error {
	js, err := jetstream.New(s.nc,
		jetstream.WithPublishAsyncTimeout(s.cfg.RequestTimeout),
		jetstream.WithPublishAsyncMaxPending(4096),
		jetstream.WithPublishAsyncErrHandler(func(_ jetstream.JetStream, m *nats.Msg, err error) {
			if !s.closed.Load() {
				s.log.Warn("natsstore: dispatch signal not stored (the sweeper repairs it)", "subject", m.Subject, "err", err)
			}
		}))
	if err != nil {
		return unavailable(err)
	}
	s.js = js
	octx, cancel := s.reqCtx(ctx)
	defer cancel()
	st, err := ensureStream(octx, js, streamConfig(&s.cfg))
	if err != nil {
		return err
	}
	s.idx = newIndex(s.sub, func(msg string, args ...any) { s.log.Warn(msg, args...) })
	p := s.cfg.Prefix + "."
	// One filter, "<p>.*.*": the two-token families, the dispatch,
	// thread-state and run records the index reads and the thread
	// projections it skips (k, m, mi and x have other shapes). The
	// server delivers a consumer of several filters (d, e and r, until
	// the thirty-eighth session) by intersecting them with the subjects
	// of a message block at every message: a restart's catch-up of
	// 10 000 dispatches and their runs took 6.8 s (92 ms with this
	// filter; BenchmarkOpen), and the live consumer paid the same per
	// message.
	cons, err := st.OrderedConsumer(octx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{indexFilter(p)},
		DeliverPolicy:  jetstream.DeliverLastPerSubjectPolicy,
	})
	if err != nil {
		return fmt.Errorf("index consumer: %w", unavailable(err))
	}
	s.index = cons
	s.cc, err = cons.Consume(s.idx.handle, jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		s.log.Warn("natsstore index consumer", "err", err)
	}))
	if err != nil {
		return fmt.Errorf("index consumer: %w", unavailable(err))
	}
	if err := s.idx.caughtUp(octx, cons); err != nil {
		return err
	}
	return s.startSignals(octx)
}

// Close stops the signal sweeper, the live command subscription (waiting
// for handlers still running, whose contexts end now) and the index
// consumer, and closes the connection. Operations still running fail
// with engine.ErrUnavailable. Safe to call twice.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		close(s.done)
		s.endLife()
		s.bg.Wait()
		s.stopLive()
		if s.cc != nil {
			s.cc.Stop()
			<-s.cc.Closed()
		}
		s.deleteIndexConsumer()
		s.nc.Close()
		s.group.close()
	})
	return nil
}

// deleteIndexConsumer deletes the index's ordered consumer on the
// server, which stopping it leaves there until its inactivity threshold
// (5 minutes): a sidecar restarted often left one behind each time
// (found by review). A killed sidecar's still waits out the threshold.
func (s *Store) deleteIndexConsumer() {
	if s.index == nil {
		return
	}
	info := s.index.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(s.cfg.RequestTimeout, 2*time.Second))
	defer cancel()
	if err := s.js.DeleteConsumer(ctx, s.cfg.Stream, info.Name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		s.log.Debug("natsstore: delete the index consumer", "consumer", info.Name, "err", err)
	}
}

// RedactURL hides the credentials of every server URL in a
// comma-separated list, for logs and errors: a password as "xxxxx", and a
// user part without one (a token) whole — url.Redacted hides only a
// password (found by review: a token in the URL reached the logs).
func RedactURL(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		u, err := url.Parse(strings.TrimSpace(p))
		switch {
		case err != nil:
			if strings.Contains(p, "@") {
				parts[i] = "(unparsable URL with credentials)"
			}
		case u.User == nil:
		case hasPassword(u):
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
			parts[i] = u.String()
		default:
			u.User = url.User("xxxxx")
			parts[i] = u.String()
		}
	}
	return strings.Join(parts, ",")
}

func hasPassword(u *url.URL) bool {
	_, ok := u.User.Password()
	return ok
}

// Writable reports whether the store can take writes now: nil, or why
// not (closed, or not connected to a server: the client is
// reconnecting). Readiness probes call it; it costs no round trip.
func (s *Store) Writable() error {
	if err := s.usable(); err != nil {
		return err
	}
	if st := s.nc.Status(); st != nats.CONNECTED {
		return fmt.Errorf("nats connection %s: %w", st, engine.ErrUnavailable)
	}
	return nil
}

// Conn is the store's NATS connection, for components that share it
// (work-queue signals, live request/reply). Do not close it.
func (s *Store) Conn() *nats.Conn { return s.nc }

// usable reports a closed store.
func (s *Store) usable() error {
	if s.closed.Load() {
		return fmt.Errorf("store closed: %w", engine.ErrUnavailable)
	}
	return nil
}

// indexed reports whether the index consumes a subject family.
func (s *Store) indexed(fam string) bool {
	return fam == famDispatch || fam == famState || fam == famRun
}

// noteCommitted raises the read-your-writes mark to seq.
func (s *Store) noteCommitted(seq uint64) {
	for {
		cur := s.committed.Load()
		if seq <= cur || s.committed.CompareAndSwap(cur, seq) {
			return
		}
	}
}

// fresh waits until the index reflects every write this store committed.
func (s *Store) fresh(ctx context.Context) error {
	if err := s.usable(); err != nil {
		return err
	}
	return s.waitIndex(ctx, s.committed.Load())
}

func (s *Store) waitIndex(ctx context.Context, seq uint64) error {
	ctx, cancel := s.reqCtx(ctx)
	defer cancel()
	if err := s.idx.wait(ctx, seq, s.done); err != nil {
		return unavailable(err)
	}
	return nil
}
