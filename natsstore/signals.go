package natsstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	json "github.com/goccy/go-json"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Dispatch signals (engine.SignalSource, engine.md §13, store.md §2.17).
//
// Every successful transition of a dispatch into queued (Enqueue, Submit,
// Nack back to queued, Release, Requeue, ReclaimExpired) publishes, after
// its commit, one signal {thread_id, dispatch_id} on
// <Prefix>sig.<seg thread> to a work-queue stream <Stream>_SIGNALS. One
// durable pull consumer (signalConsumer) is shared by every store on the
// stream, so each signal goes to one sidecar at a time; the engine's
// signal loop acks, nacks or nacks it with a delay. A publish failure is
// logged and never fails the operation.
//
// Signals are hints: correctness comes from Claim. The stream keeps them
// in memory (a signal costs no fsync; a server restart loses the pending
// ones), and a sweeper in every store repairs what is lost: every
// SignalSweepInterval it signals again each due, unclaimed queued
// dispatch (one per thread, the one Claim would take) that this store has
// not signalled within SignalRepublishAfter. Sweeper publishes carry a
// Nats-Msg-Id naming the dispatch and the republish window, so the
// sweepers of several sidecars add one signal per window, not one each.

// signalConsumer is the durable pull consumer every store shares.
const signalConsumer = "dispatch-worker"

// signalWire is the payload of a signal.
type signalWire struct {
	ThreadID   string `json:"thread_id"`
	DispatchID string `json:"dispatch_id"`
}

// signalStreamName is the name of the signal stream of a store.
func signalStreamName(cfg *Config) string { return cfg.Stream + "_SIGNALS" }

// signalPrefix is the subject prefix of signals: "<Prefix>sig.". It lies
// outside the record stream's "<Prefix>.>".
func signalPrefix(cfg *Config) string { return cfg.Prefix + "sig." }

// SignalStreamConfig returns the configuration of the signal stream Open
// creates for cfg (after defaults), for operators who create it
// themselves.
func SignalStreamConfig(cfg Config) (jetstream.StreamConfig, error) {
	if err := cfg.validate(); err != nil {
		return jetstream.StreamConfig{}, err
	}
	return signalStreamConfig(&cfg), nil
}

func signalStreamConfig(cfg *Config) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        signalStreamName(cfg),
		Description: "mailbox-sidecar dispatch signals (wake-up hints)",
		Subjects:    []string{signalPrefix(cfg) + ">"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.MemoryStorage,
		Replicas:    cfg.Replicas,
		MaxMsgs:     1 << 20,
		MaxBytes:    -1,
		Discard:     jetstream.DiscardOld,
		Duplicates:  2 * time.Minute,
	}
}

func signalConsumerConfig(cfg *Config) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       signalConsumer,
		Description:   "shared by every sidecar: each signal goes to one puller",
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       30 * time.Second,
		MaxDeliver:    -1,
		MaxAckPending: 1 << 16,
		FilterSubject: signalPrefix(cfg) + ">",
	}
}

// signals is the store's signal state.
type signals struct {
	mu   sync.Mutex
	cons jetstream.Consumer // replaced by repairSignals
	sent map[string]int64   // dispatch id → Unix ms this store last signalled it
}

func (s *Store) signalConsumer() jetstream.Consumer {
	s.sig.mu.Lock()
	defer s.sig.mu.Unlock()
	return s.sig.cons
}

// signalsLost reports a pull error that means the signal stream or its
// consumer is gone (a single server loses its memory streams when it
// restarts).
func signalsLost(err error) bool {
	return errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrConsumerNotFound) ||
		errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrConsumerDeleted)
}

// repairSignals creates the signal stream and its consumer again, and
// forgets what this store signalled (those signals are gone: the sweeper
// signals every due dispatch again).
func (s *Store) repairSignals(ctx context.Context) {
	ctx, cancel := s.reqCtx(ctx)
	defer cancel()
	st, err := ensureStream(ctx, s.js, signalStreamConfig(&s.cfg))
	if err != nil {
		s.log.Warn("natsstore: recreate signal stream", "err", err)
		return
	}
	cons, err := st.CreateOrUpdateConsumer(ctx, signalConsumerConfig(&s.cfg))
	if err != nil {
		s.log.Warn("natsstore: recreate signal consumer", "err", err)
		return
	}
	s.sig.mu.Lock()
	s.sig.cons = cons
	clear(s.sig.sent)
	s.sig.mu.Unlock()
}

// startSignals creates the signal stream and its consumer and starts the
// sweeper.
func (s *Store) startSignals(ctx context.Context) error {
	st, err := ensureStream(ctx, s.js, signalStreamConfig(&s.cfg))
	if err != nil {
		return fmt.Errorf("signal stream: %w", err)
	}
	cons, err := st.CreateOrUpdateConsumer(ctx, signalConsumerConfig(&s.cfg))
	if err != nil {
		return fmt.Errorf("create signal consumer: %w", unavailable(err))
	}
	s.sig.cons = cons
	s.sig.sent = make(map[string]int64)
	s.bg.Add(1)
	go s.sweepSignals()
	return nil
}

// signal publishes the wake-up signal of d if d is queued. It never
// blocks on the server and never fails the caller: a failed publish is
// logged (the sweeper repairs it).
func (s *Store) signal(d *engine.Dispatch) {
	if d == nil || d.Status != engine.StatusQueued {
		return
	}
	s.publishSignal(d.ThreadID, d.DispatchID, "")
}

func (s *Store) publishSignal(thread, dispatchID, msgID string) {
	if s.closed.Load() {
		return
	}
	data, err := json.Marshal(signalWire{ThreadID: thread, DispatchID: dispatchID})
	if err != nil {
		s.log.Warn("natsstore: encode dispatch signal", "dispatch_id", dispatchID, "err", err)
		return
	}
	m := &nats.Msg{Subject: signalPrefix(&s.cfg) + seg(thread), Data: data}
	if msgID != "" {
		m.Header = nats.Header{jetstream.MsgIDHeader: []string{msgID}}
	}
	s.sig.mu.Lock()
	s.sig.sent[dispatchID] = time.Now().UnixMilli()
	s.sig.mu.Unlock()
	if _, err := s.js.PublishMsgAsync(m); err != nil {
		s.log.Warn("natsstore: publish dispatch signal", "thread_id", thread, "dispatch_id", dispatchID, "err", err)
	}
}

// sweepSignals runs the sweeper until the store closes.
func (s *Store) sweepSignals() {
	defer s.bg.Done()
	t := time.NewTicker(s.cfg.SignalSweepInterval)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
			s.SweepSignals(time.Now().UnixMilli())
		}
	}
}

// SweepSignals signals again every due, unclaimed queued dispatch (one
// per thread: the one Claim would take, as this process's index sees it)
// that this store has not signalled within SignalRepublishAfter of now
// (Unix ms), and forgets dispatches no longer queued. The sweeper calls
// it every SignalSweepInterval; it returns how many signals it published.
func (s *Store) SweepSignals(now int64) int {
	if s.closed.Load() {
		return 0
	}
	heads := s.idx.readyHeads(now)
	after := s.cfg.SignalRepublishAfter.Milliseconds()
	window := strconv.FormatInt(now/after, 10)
	var due []dEntry
	s.sig.mu.Lock()
	for id := range s.sig.sent {
		if !s.idx.isQueued(id) {
			delete(s.sig.sent, id)
		}
	}
	for _, h := range heads {
		if at, ok := s.sig.sent[h.id]; !ok || now-at >= after {
			due = append(due, h)
		}
	}
	s.sig.mu.Unlock()
	for _, h := range due {
		s.publishSignal(h.thread, h.id, "sweep."+seg(h.id)+"."+window)
	}
	return len(due)
}

// PullDispatchSignals implements engine.SignalSource: up to max signals,
// waiting at most wait (or until ctx ends) for the first. A payload that
// does not decode is acked and skipped.
func (s *Store) PullDispatchSignals(ctx context.Context, max int, wait time.Duration) ([]engine.DispatchSignal, error) {
	if max <= 0 {
		return nil, nil
	}
	if err := s.usable(); err != nil {
		return nil, fmt.Errorf("pull dispatch signals: %w", err)
	}
	var batch jetstream.MessageBatch
	var err error
	cons := s.signalConsumer()
	if wait <= 0 {
		batch, err = cons.FetchNoWait(max)
	} else {
		fctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		batch, err = cons.Fetch(max, jetstream.FetchContext(fctx))
	}
	if err != nil {
		if signalsLost(err) {
			s.repairSignals(ctx)
		}
		return nil, fmt.Errorf("pull dispatch signals: %w", unavailable(err))
	}
	var out []engine.DispatchSignal
	for m := range batch.Messages() {
		var w signalWire
		if err := unmarshal(m.Data(), &w); err != nil || engine.ValidateID("thread_id", w.ThreadID) != nil || engine.ValidateID("dispatch_id", w.DispatchID) != nil {
			s.log.Warn("natsstore: dropping malformed dispatch signal", "subject", m.Subject(), "err", err)
			_ = m.Ack()
			continue
		}
		out = append(out, engine.DispatchSignal{ThreadID: w.ThreadID, DispatchID: w.DispatchID, Receipt: signalReceipt{m}})
	}
	// Signals received are returned even if the pull ended with an error:
	// they must be settled. An expired wait is no error.
	if err := batch.Error(); err != nil && len(out) == 0 && ctx.Err() == nil &&
		!errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, nats.ErrTimeout) {
		if signalsLost(err) {
			s.repairSignals(ctx)
		}
		return nil, fmt.Errorf("pull dispatch signals: %w", unavailable(err))
	}
	if len(out) == 0 && ctx.Err() != nil {
		return nil, fmt.Errorf("pull dispatch signals: %w", unavailable(ctx.Err()))
	}
	return out, nil
}

// signalReceipt settles one signal: ack, nak, nak with delay; the
// delivery count comes from the message's metadata.
type signalReceipt struct{ m jetstream.Msg }

// Deliveries implements engine.SignalReceipt.
func (r signalReceipt) Deliveries() (int, bool) {
	md, err := r.m.Metadata()
	if err != nil || md.NumDelivered == 0 {
		return 0, false
	}
	return int(md.NumDelivered), true
}

// Ack implements engine.SignalReceipt.
func (r signalReceipt) Ack() error {
	if err := r.m.Ack(); err != nil {
		return fmt.Errorf("ack dispatch signal: %w", unavailable(err))
	}
	return nil
}

// Nack implements engine.SignalReceipt: redelivery at once (delay 0) or
// not before delay.
func (r signalReceipt) Nack(delay time.Duration) error {
	var err error
	if delay > 0 {
		err = r.m.NakWithDelay(delay)
	} else {
		err = r.m.Nak()
	}
	if err != nil {
		return fmt.Errorf("nack dispatch signal: %w", unavailable(err))
	}
	return nil
}

var _ engine.SignalSource = (*Store)(nil)
