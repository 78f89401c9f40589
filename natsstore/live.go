package natsstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	json "github.com/goccy/go-json"
	"github.com/nats-io/nats.go"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Live commands (engine.LiveRouter, store.md §2.18, lessons.md §4.2 item
// 21) travel over core NATS request/reply, not JetStream, on the exact
// subject of their target:
//
//	<Prefix>live.<seg thread>.<seg run>                  target without a dispatch
//	<Prefix>live.<seg thread>.<seg run>.<seg dispatch>   target with a dispatch
//
// A target with a dispatch and one without are different subjects, as
// store.md rule 14 requires. Every store that serves live commands
// (ServeLive) subscribes to <Prefix>live.> and hands each command to its
// handler (the engine's HandleLive), which accepts only a command whose
// target runs in that process; only then does the store reply, with an
// empty message: the receipt. The process the target runs in and that
// does not take the command (ServeLiveAnswers: engine.LiveRefused)
// replies "refused" at once: not delivered, without the sender waiting
// out its timeout (found by review: every refusal cost 5 s; a sender of
// an earlier version reads any non-empty reply as not delivered too).
// Nobody answering means no reply, and the sender's request times out:
// not delivered, so the engine falls back to the durable queue. A payload that does not decode, or whose version or
// kind this build does not know, is dropped without a reply (the sender
// sees "not delivered").
//
// The payload is JSON, version 1 (LiveWireVersion):
//
//	{"v":1,"kind":"messages","messages":[<engine.MessageRecord>…]}
//	{"v":1,"kind":"cancel"}
//	{"v":1,"kind":"decision","decisions":[{"call_id":"…","resume":<JSON>}…]}
//
// MessageRecord and Decision use their engine JSON shapes (snake_case, as
// stored). A receiver ignores fields it does not know; a change that old
// receivers must not misread gets a new version.

// LiveWireVersion is the version of the live command payload this build
// sends and accepts.
const LiveWireVersion = 1

// Live command kinds on the wire.
const (
	liveKindMessages = "messages"
	liveKindCancel   = "cancel"
	liveKindDecision = "decision"
)

// liveWire is the payload of one live command.
type liveWire struct {
	V         int                    `json:"v"`
	Kind      string                 `json:"kind"`
	Messages  []engine.MessageRecord `json:"messages,omitempty"`
	Decisions []engine.Decision      `json:"decisions,omitempty"`
}

// liveHandlerSlots bounds the live commands one store handles at once.
const liveHandlerSlots = 64

// LiveHandler takes a live command routed to this process and reports
// whether it accepted it; (*engine.Mailbox).HandleLive is one.
type LiveHandler func(ctx context.Context, target engine.LiveTarget, cmd engine.LiveCommand) bool

// LiveAnswerer is a LiveHandler that tells a refusal by the target's
// owner apart from a target that is not here; (*engine.Mailbox).AnswerLive
// is one.
type LiveAnswerer func(ctx context.Context, target engine.LiveTarget, cmd engine.LiveCommand) engine.LiveAnswer

// liveRefusal is the reply of the target's owner that refuses a command.
var liveRefusal = []byte("refused")

// live is the receiving side's state.
type live struct {
	mu    sync.Mutex
	sub   *nats.Subscription
	owner *nats.Subscription // TakeName's: answers for this sidecar's name
	slots chan struct{}
	wg    sync.WaitGroup // handler goroutines
}

func livePrefix(cfg *Config) string { return cfg.Prefix + "live." }

// liveSubject is the exact subject of a target.
func (s *Store) liveSubject(t engine.LiveTarget) string {
	subj := livePrefix(&s.cfg) + seg(t.ThreadID) + "." + seg(t.RunID)
	if t.DispatchID != "" {
		subj += "." + seg(t.DispatchID)
	}
	return subj
}

// parseLiveSubject decodes the target of a live subject.
func (s *Store) parseLiveSubject(subj string) (engine.LiveTarget, error) {
	rest, ok := strings.CutPrefix(subj, livePrefix(&s.cfg))
	if !ok {
		return engine.LiveTarget{}, fmt.Errorf("subject %q is not a live subject", subj)
	}
	toks := strings.Split(rest, ".")
	if len(toks) != 2 && len(toks) != 3 {
		return engine.LiveTarget{}, fmt.Errorf("live subject %q has %d target tokens", subj, len(toks))
	}
	ids := make([]string, len(toks))
	for i, tok := range toks {
		id, err := unseg(tok)
		if err != nil {
			return engine.LiveTarget{}, err
		}
		ids[i] = id
	}
	t := engine.LiveTarget{ThreadID: ids[0], RunID: ids[1]}
	if len(ids) == 3 {
		t.DispatchID = ids[2]
	}
	return t, nil
}

func encodeLive(cmd engine.LiveCommand) ([]byte, error) {
	w := liveWire{V: LiveWireVersion}
	switch cmd.Kind {
	case engine.LiveMessages:
		w.Kind, w.Messages = liveKindMessages, cmd.Messages
	case engine.LiveCancel:
		w.Kind = liveKindCancel
	case engine.LiveDecision:
		w.Kind, w.Decisions = liveKindDecision, cmd.Decisions
	default:
		return nil, engine.Validationf("live command kind %d is unknown", cmd.Kind)
	}
	b, err := json.Marshal(&w)
	if err != nil {
		return nil, fmt.Errorf("encode live command: %w", err)
	}
	return b, nil
}

func decodeLive(b []byte) (engine.LiveCommand, error) {
	var w liveWire
	if err := unmarshal(b, &w); err != nil {
		return engine.LiveCommand{}, fmt.Errorf("decode live command: %w", err)
	}
	if w.V != LiveWireVersion {
		return engine.LiveCommand{}, fmt.Errorf("live command version %d, this build speaks %d", w.V, LiveWireVersion)
	}
	switch w.Kind {
	case liveKindMessages:
		if len(w.Messages) == 0 {
			return engine.LiveCommand{}, errors.New("live messages command without messages")
		}
		return engine.LiveCommand{Kind: engine.LiveMessages, Messages: w.Messages}, nil
	case liveKindCancel:
		return engine.LiveCommand{Kind: engine.LiveCancel}, nil
	case liveKindDecision:
		if len(w.Decisions) == 0 {
			return engine.LiveCommand{}, errors.New("live decision command without decisions")
		}
		return engine.LiveCommand{Kind: engine.LiveDecision, Decisions: w.Decisions}, nil
	}
	return engine.LiveCommand{}, fmt.Errorf("live command kind %q is unknown", w.Kind)
}

// DeliverLive implements engine.LiveRouter: a request on the target's
// exact subject, bounded by LiveTimeout (or ctx's earlier end). A reply
// (the receiving process accepted the command) is true; no subscriber, no
// reply in time or a refusal is false with no error; other transport
// failures are errors wrapping engine.ErrUnavailable.
func (s *Store) DeliverLive(ctx context.Context, target engine.LiveTarget, cmd engine.LiveCommand) (bool, error) {
	if err := engine.ValidateID("thread_id", target.ThreadID); err != nil {
		return false, err
	}
	if err := engine.ValidateID("run_id", target.RunID); err != nil {
		return false, err
	}
	if target.DispatchID != "" {
		if err := engine.ValidateID("dispatch_id", target.DispatchID); err != nil {
			return false, err
		}
	}
	if err := s.usable(); err != nil {
		return false, fmt.Errorf("deliver live command: %w", err)
	}
	data, err := encodeLive(cmd)
	if err != nil {
		return false, err
	}
	if limit := s.nc.MaxPayload(); int64(len(data)) > limit {
		// Messages that fit the store one by one can exceed the server's
		// max_payload together: not delivered, and not the store's
		// failure (it read as unavailable, and the engine answered 503
		// with the messages logged; found by review).
		return false, fmt.Errorf("deliver live command to run %s of %s: %d bytes, over the server's max_payload of %d: %w",
			target.RunID, target.ThreadID, len(data), limit, engine.ErrTooLarge)
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.LiveTimeout)
	defer cancel()
	reply, err := s.nc.RequestWithContext(ctx, s.liveSubject(target), data)
	switch {
	case err == nil:
		// The receipt is an empty message; anything else (a status
		// header, a body) is not one.
		return len(reply.Data) == 0 && reply.Header.Get(hdrStatus) == "", nil
	case errors.Is(err, nats.ErrNoResponders), errors.Is(err, nats.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return false, nil
	}
	return false, fmt.Errorf("deliver live command to run %s of %s: %w", target.RunID, target.ThreadID, unavailable(err))
}

// ServeLive makes this store receive the live commands other processes
// route to runs executing here: it subscribes to every live subject of
// the prefix and calls handler for each well-formed command (up to 64 at
// once; each with a context bounded by LiveTimeout and ended by Close),
// replying with the receipt only when handler returns true. Call it once,
// after the engine exists; Close stops it. Wire it to the engine with
// store.ServeLive(mailbox.HandleLive), or ServeLiveAnswers.
func (s *Store) ServeLive(handler LiveHandler) error {
	if handler == nil {
		return engine.Validationf("natsstore: ServeLive needs a handler")
	}
	return s.ServeLiveAnswers(func(ctx context.Context, target engine.LiveTarget, cmd engine.LiveCommand) engine.LiveAnswer {
		if handler(ctx, target, cmd) {
			return engine.LiveAccepted
		}
		return engine.LiveNotHere
	})
}

// ServeLiveAnswers is ServeLive with a handler that tells refusals apart:
// the owner's refusal is replied to at once ("refused"), so its sender
// does not wait out LiveTimeout. Wire it with
// store.ServeLiveAnswers(mailbox.AnswerLive).
func (s *Store) ServeLiveAnswers(handler LiveAnswerer) error {
	if handler == nil {
		return engine.Validationf("natsstore: ServeLive needs a handler")
	}
	if err := s.usable(); err != nil {
		return fmt.Errorf("serve live commands: %w", err)
	}
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	if s.live.sub != nil {
		return fmt.Errorf("serve live commands: already serving: %w", engine.ErrAlreadyExists)
	}
	s.live.slots = make(chan struct{}, liveHandlerSlots)
	sub, err := s.nc.Subscribe(livePrefix(&s.cfg)+">", func(m *nats.Msg) { s.onLive(m, handler) })
	if err != nil {
		return fmt.Errorf("serve live commands: subscribe: %w", unavailable(err))
	}
	// The subscription is in place on the server before ServeLive
	// returns, so a command sent afterwards reaches it.
	if err := s.nc.FlushTimeout(s.cfg.RequestTimeout); err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("serve live commands: flush: %w", unavailable(err))
	}
	s.live.sub = sub
	return nil
}

// onLive runs on the subscription's goroutine: it decodes the command and
// hands it to a handler goroutine, so one slow agent does not hold up
// commands for other runs.
func (s *Store) onLive(m *nats.Msg, handler LiveAnswerer) {
	if m.Reply == "" {
		return
	}
	target, err := s.parseLiveSubject(m.Subject)
	if err == nil {
		err = validTarget(target)
	}
	var cmd engine.LiveCommand
	if err == nil {
		cmd, err = decodeLive(m.Data)
	}
	if err != nil {
		s.log.Warn("natsstore: dropping malformed live command", "subject", m.Subject, "err", err)
		return
	}
	select {
	case s.live.slots <- struct{}{}:
	case <-s.done:
		return
	}
	s.live.wg.Add(1)
	go func() {
		defer s.live.wg.Done()
		defer func() { <-s.live.slots }()
		ctx, cancel := context.WithTimeout(s.life, s.cfg.LiveTimeout)
		defer cancel()
		var reply []byte
		switch handler(ctx, target, cmd) {
		case engine.LiveAccepted:
		case engine.LiveRefused:
			reply = liveRefusal
		default:
			return // not here: the owner, if any, answers
		}
		if err := m.Respond(reply); err != nil {
			s.log.Warn("natsstore: live command receipt", "subject", m.Subject, "err", err)
		}
	}()
}

func validTarget(t engine.LiveTarget) error {
	if err := engine.ValidateID("thread_id", t.ThreadID); err != nil {
		return err
	}
	if err := engine.ValidateID("run_id", t.RunID); err != nil {
		return err
	}
	if t.DispatchID != "" {
		return engine.ValidateID("dispatch_id", t.DispatchID)
	}
	return nil
}

// stopLive unsubscribes and waits for the handlers still running (their
// contexts end with the store).
func (s *Store) stopLive() {
	s.live.mu.Lock()
	sub, owner := s.live.sub, s.live.owner
	s.live.sub, s.live.owner = nil, nil
	s.live.mu.Unlock()
	if sub != nil {
		_ = sub.Unsubscribe()
	}
	if owner != nil {
		_ = owner.Unsubscribe()
	}
	s.live.wg.Wait()
}

var _ engine.LiveRouter = (*Store)(nil)

// nameSubject is the subject on which the sidecar that took name answers
// for it: <Prefix>name.<seg name>. Outside <Prefix>live.>, which every
// sidecar subscribes to: a question there found a subscriber always, so
// the server never said "no responders" and every start waited out the
// question's timeout (found by review).
func nameSubject(cfg *Config, name string) string { return cfg.Prefix + "name." + seg(name) }

// ErrNameInUse reports that a running sidecar answers for the name (its
// consumer id) another asked to take.
var ErrNameInUse = errors.New("the name is in use by a running sidecar")

// nameQuestionTimeout bounds TakeName's question when no responder is
// reported (a server that does not tell).
var nameQuestionTimeout = time.Second

// TakeName makes this store answer for name, a sidecar's consumer id, so
// that a second sidecar started with the same name is refused: it asks
// first, and a running sidecar's answer (about, say: its host and pid) is
// ErrNameInUse. Two sidecars with one name would take each other's
// claims for their own (found by review: the second started silently).
// A process killed a moment ago does not answer: its successor starts at
// once. Two started at the same moment may both take the name, and so may
// one started while the owner is disconnected from the server. A user
// without the permissions for <Prefix>name.> is not told apart from a
// free name (the question times out; the subscription fails on the
// server's side). Close gives it up.
func (s *Store) TakeName(ctx context.Context, name, about string) error {
	if err := s.usable(); err != nil {
		return fmt.Errorf("take name %q: %w", name, err)
	}
	subj := nameSubject(&s.cfg, name)
	qctx, cancel := context.WithTimeout(ctx, nameQuestionTimeout)
	defer cancel()
	reply, err := s.nc.RequestWithContext(qctx, subj, nil)
	switch {
	case err == nil:
		return fmt.Errorf("consumer id %q: answered by %s: %w", name, strings.TrimSpace(string(reply.Data)), ErrNameInUse)
	case errors.Is(err, nats.ErrNoResponders), errors.Is(err, nats.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
	default:
		return fmt.Errorf("take name %q: %w", name, unavailable(err))
	}
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	if s.live.owner != nil {
		return fmt.Errorf("take name %q: a name is taken already: %w", name, engine.ErrAlreadyExists)
	}
	sub, err := s.nc.Subscribe(subj, func(m *nats.Msg) { _ = m.Respond([]byte(about)) })
	if err != nil {
		return fmt.Errorf("take name %q: subscribe: %w", name, unavailable(err))
	}
	if err := s.nc.FlushTimeout(s.cfg.RequestTimeout); err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("take name %q: flush: %w", name, unavailable(err))
	}
	s.live.owner = sub
	return nil
}
