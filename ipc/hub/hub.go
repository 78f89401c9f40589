// Package hub is the sidecar side of the agent protocol: it accepts agent
// connections on the agent socket and implements engine.Executor by sending
// each run to a connected agent with a free slot, forwarding the agent's
// events to the run's sink, persisting its checkpoints and carrying live
// commands to it (see docs/protocol.md).
//
// One goroutine reads each connection and dispatches its frames: EVENTs go
// straight to the run's sink (the payload is not decoded beyond the frame
// check), CHECKPOINTs and FINISH go, in order, to the goroutine of the run
// (the engine's call to Run), which persists checkpoints and returns the
// outcome. The reader never waits for a run: each run queues what it has
// not applied yet, bounded by its checkpoints awaiting CHECKPOINT_ACK
// (Config.MaxUnackedCheckpoints). When a connection fails, the reader
// still hands over the frames it had received, and the runs take them
// before they are declared lost. A heartbeat goroutine per connection
// sends PING when the hub has been quiet and closes a connection whose
// agent has been silent for three heartbeats. Every goroutine belongs to
// the connection or to a Run call and ends with it.
package hub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/google/uuid"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/loglimit"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// Defaults of Config.
const (
	DefaultHeartbeat        = 5 * time.Second
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultCommandTimeout   = 2 * time.Second
	DefaultCancelGrace      = 10 * time.Second
	DefaultAgentWait        = 15 * time.Second
	DefaultMaxSubmits       = 64
	DefaultMaxConns         = 64
	// DefaultMaxUnackedCheckpoints and DefaultMaxUnackedCheckpointBytes
	// bound a run's CHECKPOINTs awaiting their CHECKPOINT_ACK.
	DefaultMaxUnackedCheckpoints     = 1024
	DefaultMaxUnackedCheckpointBytes = 64 << 20
	// MaxRunsLimit caps an agent's announced max_runs.
	MaxRunsLimit = 1024
)

// Submitter queues background runs an agent asks for with SUBMIT; the
// engine's Mailbox implements it.
type Submitter interface {
	SubmitBackground(ctx context.Context, req engine.SubmitRequest) (engine.SubmitResult, error)
}

// Config configures a Hub. The zero value works (with defaults) except
// that agents' SUBMIT frames are refused without a Submitter.
type Config struct {
	// SidecarID is announced in WELCOME. Default: a new UUID.
	SidecarID string
	// Heartbeat is the heartbeat interval announced in WELCOME; a peer
	// silent for three of them is dead. Default 5 s.
	Heartbeat time.Duration
	// MaxFrame is the largest payload accepted from agents and announced
	// in WELCOME. Default ipc.DefaultMaxFrame (16 MiB).
	MaxFrame uint32
	// HandshakeTimeout bounds the wait for an agent's HELLO. Default 5 s.
	HandshakeTimeout time.Duration
	// CommandTimeout bounds the wait for COMMAND_ACK; a command not
	// acknowledged in time counts as not delivered. Default 2 s.
	CommandTimeout time.Duration
	// CancelGrace is how long a cancelled run waits for the agent's
	// FINISH after CANCEL before it is reported overdue; past it the run
	// is still held until its FINISH or its connection's end, unless the
	// hub drains (then it is given up as cancel_timeout). Default 10 s.
	CancelGrace time.Duration
	// AgentWait is how long Run waits for a connection that serves the
	// run's agent id and has a free slot. Default 15 s.
	AgentWait time.Duration
	// MaxConns bounds the agent connections open at once, those still in
	// their handshake included: past it a new connection is answered
	// ERROR busy on stream 0 and closed (the SDK retries after its
	// backoff). Default 64.
	MaxConns int
	// MaxSubmits bounds the SUBMIT requests in flight per connection;
	// more are answered with a "busy" error. Default 64.
	MaxSubmits int
	// MaxUnackedCheckpoints bounds, per run, the CHECKPOINTs an agent has
	// sent and the hub has not answered yet (with CHECKPOINT_ACK or
	// ERROR): an agent may send CHECKPOINTs without waiting for their
	// ACKs, and the connection's reader never waits for a run's store.
	// A CHECKPOINT past the bound is refused with ERROR
	// checkpoint_failed, as is every later one of that run; the
	// checkpoints accepted before it are applied and acked in order, and
	// the run is cancelled and fails as transient with ErrorCode
	// checkpoint_backlog. The connection and its other runs go on.
	// Default 1024.
	MaxUnackedCheckpoints int
	// MaxUnackedCheckpointBytes bounds the payload bytes of those
	// CHECKPOINTs the same way; a CHECKPOINT when none is unanswered is
	// always accepted, however large. Default 64 MiB.
	MaxUnackedCheckpointBytes int64
	// Submitter handles agents' SUBMIT frames; nil refuses them.
	Submitter Submitter
	// Logger receives connection-level logs. Default slog.Default().
	Logger *slog.Logger
	// Metrics is the set the hub registers its metrics in. Default: a
	// private set (see Hub.Metrics).
	Metrics *metrics.Set
}

func (c *Config) setDefaults() error {
	if c.SidecarID == "" {
		c.SidecarID = uuid.NewString()
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = DefaultHeartbeat
	}
	if c.MaxFrame == 0 {
		c.MaxFrame = ipc.DefaultMaxFrame
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.CommandTimeout == 0 {
		c.CommandTimeout = DefaultCommandTimeout
	}
	if c.CancelGrace == 0 {
		c.CancelGrace = DefaultCancelGrace
	}
	if c.AgentWait == 0 {
		c.AgentWait = DefaultAgentWait
	}
	if c.MaxSubmits == 0 {
		c.MaxSubmits = DefaultMaxSubmits
	}
	if c.MaxConns == 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.MaxUnackedCheckpoints == 0 {
		c.MaxUnackedCheckpoints = DefaultMaxUnackedCheckpoints
	}
	if c.MaxUnackedCheckpointBytes == 0 {
		c.MaxUnackedCheckpointBytes = DefaultMaxUnackedCheckpointBytes
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Metrics == nil {
		c.Metrics = metrics.NewSet()
	}
	for name, d := range map[string]time.Duration{
		"heartbeat": c.Heartbeat, "handshake timeout": c.HandshakeTimeout, "command timeout": c.CommandTimeout,
		"cancel grace": c.CancelGrace, "agent wait": c.AgentWait,
	} {
		if d < 0 {
			return fmt.Errorf("hub: %s %v is negative", name, d)
		}
	}
	if c.MaxFrame < 1<<10 {
		return fmt.Errorf("hub: max frame %d is below 1 KiB", c.MaxFrame)
	}
	if c.MaxSubmits < 0 {
		return fmt.Errorf("hub: max submits %d is negative", c.MaxSubmits)
	}
	if c.MaxConns < 0 {
		return fmt.Errorf("hub: max connections %d is negative", c.MaxConns)
	}
	if c.MaxUnackedCheckpoints < 0 || c.MaxUnackedCheckpointBytes < 0 {
		return fmt.Errorf("hub: max unacked checkpoints %d (%d bytes) is negative", c.MaxUnackedCheckpoints, c.MaxUnackedCheckpointBytes)
	}
	return nil
}

// ErrClosed is returned by Serve after Close.
var ErrClosed = errors.New("hub: closed")

// Hub accepts agent connections and runs the engine's runs on them. It
// implements engine.Executor. Create it with New, feed it connections
// with Serve or ServeConn, and Close it after the engine has stopped.
type Hub struct {
	cfg Config
	log *slog.Logger
	m   hubMetrics

	capacity atomic.Int64
	capCh    chan struct{}
	// served is what Serves answers from: the agent ids of the
	// connections that take runs, replaced whenever a connection comes,
	// goes or sends GOAWAY (refreshServed). Serves is asked at every
	// submit, and under the lock it cost the sidecar 5–9 % more CPU per
	// run in DurableRuns/threads=64 (measured when a submit without an
	// agent id began to ask it for "default").
	served atomic.Pointer[servedIDs]

	mu         sync.Mutex
	conns      map[*conn]struct{}
	listeners  map[net.Listener]struct{}
	greeting   map[net.Conn]struct{} // connections in their handshake
	refusedLog loglimit.EverySecond  // warnings for connections refused past MaxConns
	closed     bool
	draining   bool
	// drained is closed when draining begins (GoAway, Close): a run whose
	// agent has not finished it within CancelGrace of its CANCEL is held
	// until then (docs/protocol.md).
	drained chan struct{}
	goaway  ipc.Status
	waiters int
	slotCh  chan struct{} // closed and replaced when a slot may have freed

	submitter atomic.Pointer[Submitter]

	nextConn atomic.Uint64
	wg       sync.WaitGroup // accept loops and connections
}

// New returns a Hub with cfg's defaults filled in.
func New(cfg Config) (*Hub, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	h := &Hub{
		cfg:       cfg,
		log:       cfg.Logger,
		capCh:     make(chan struct{}, 1),
		conns:     make(map[*conn]struct{}),
		listeners: make(map[net.Listener]struct{}),
		greeting:  make(map[net.Conn]struct{}),
		slotCh:    make(chan struct{}),
		drained:   make(chan struct{}),
	}
	h.m = newHubMetrics(cfg.Metrics, h)
	if cfg.Submitter != nil {
		h.SetSubmitter(cfg.Submitter)
	}
	return h, nil
}

// SetSubmitter sets the handler of agents' SUBMIT frames, for when it is
// built after the hub (the engine's Mailbox takes the hub as its
// executor and is the hub's submitter).
func (h *Hub) SetSubmitter(s Submitter) { h.submitter.Store(&s) }

// Metrics is the set the hub's metrics live in.
func (h *Hub) Metrics() *metrics.Set { return h.cfg.Metrics }

// Capacity is the total max_runs of the connected agents that take new
// runs (engine.Executor).
func (h *Hub) Capacity() int { return int(h.capacity.Load()) }

// CapacityChanged is signalled when an agent connected or left, and when
// Capacity grew (engine.Executor). An agent's GOAWAY, and each of its
// held runs ending, only shrink Capacity and are not signalled: they
// give no thread set aside a slot (a replacement agent's connection is
// signalled).
func (h *Hub) CapacityChanged() <-chan struct{} { return h.capCh }

// Connections is the number of agent connections past their handshake.
func (h *Hub) Connections() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.conns)
}

// Serve accepts agent connections on ln until ln fails or the hub is
// closed; each connection is served on its own goroutine. It returns
// ErrClosed after Close.
func (h *Hub) Serve(ln net.Listener) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	h.listeners[ln] = struct{}{}
	h.wg.Add(1)
	h.mu.Unlock()
	defer h.wg.Done()
	defer func() {
		h.mu.Lock()
		delete(h.listeners, ln)
		h.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if h.isClosed() {
				return ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, errTooManyFiles) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				h.log.Warn("agent socket accept failed; retrying", "err", err, "backoff", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("hub: accept: %w", err)
		}
		backoff = 0
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			nc.Close()
			return ErrClosed
		}
		h.wg.Add(1)
		h.mu.Unlock()
		go func() {
			defer h.wg.Done()
			h.serveConn(nc)
		}()
	}
}

// ServeConn serves one agent connection and returns when it is closed.
// The hub owns nc from then on.
func (h *Hub) ServeConn(nc net.Conn) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		nc.Close()
		return
	}
	h.wg.Add(1)
	h.mu.Unlock()
	defer h.wg.Done()
	h.serveConn(nc)
}

func (h *Hub) isClosed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.closed
}

// GoAway tells every agent, now and connecting later, that the sidecar
// starts no new runs (GOAWAY); running runs go on. Capacity drops to 0.
func (h *Hub) GoAway(code, message string) {
	h.mu.Lock()
	h.drainLocked()
	h.goaway = ipc.Status{Code: code, Message: message}
	conns := h.connList()
	h.mu.Unlock()
	for _, c := range conns {
		c.sendGoAway(h.goaway)
	}
	h.updateCapacity()
}

// Close stops accepting, closes every agent connection (their runs fail
// as transient) and waits for the hub's goroutines. Stop the engine first
// so that no run is executing.
func (h *Hub) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		h.wg.Wait()
		return nil
	}
	h.closed = true
	h.drainLocked()
	lns := make([]net.Listener, 0, len(h.listeners))
	for ln := range h.listeners {
		lns = append(lns, ln)
	}
	conns := h.connList()
	for nc := range h.greeting {
		nc.Close()
	}
	h.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	for _, c := range conns {
		c.fail(ErrClosed, ipc.Status{Code: ipc.CodeShutdown, Message: "sidecar closing"})
	}
	h.wg.Wait()
	h.updateCapacity()
	return nil
}

// drainLocked marks the hub draining (h.mu held).
func (h *Hub) drainLocked() {
	if !h.draining {
		h.draining = true
		close(h.drained)
	}
}

func (h *Hub) connList() []*conn {
	out := make([]*conn, 0, len(h.conns))
	for c := range h.conns {
		out = append(out, c)
	}
	return out
}

// register moves a connection past its handshake from greeting (nc) to
// conns; false when the hub is closed (it is then in neither).
func (h *Hub) register(c *conn, nc net.Conn) (ok bool, goaway *ipc.Status) {
	h.mu.Lock()
	delete(h.greeting, nc)
	if h.closed {
		h.mu.Unlock()
		return false, nil
	}
	h.conns[c] = struct{}{}
	if h.draining {
		g := h.goaway
		goaway = &g
	}
	h.mu.Unlock()
	h.agentsChanged()
	h.wake()
	return true, goaway
}

func (h *Hub) unregister(c *conn) {
	h.mu.Lock()
	delete(h.conns, c)
	h.mu.Unlock()
	h.agentsChanged()
	h.wake()
}

// agentsChanged recomputes Capacity and signals CapacityChanged once: the
// agent ids served changed, whatever the total did. Signalled twice (by
// updateCapacity and again), the engine could take the second signal
// after a claim that followed the first, take the hub's refusal of it for
// out of date, and claim it again only to be refused again (found in CI).
func (h *Hub) agentsChanged() {
	h.refreshServed()
	h.recomputeCapacity()
	h.signalCapacity()
}

// servedIDs is a set of agent ids; any: every id ("*").
type servedIDs struct {
	any bool
	ids map[string]struct{}
}

// refreshServed recomputes served from the connections that take runs.
func (h *Hub) refreshServed() {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := &servedIDs{ids: map[string]struct{}{}}
	for c := range h.conns {
		if !c.takesRuns() {
			continue
		}
		s.any = s.any || c.anyID
		for a := range c.agents {
			s.ids[a] = struct{}{}
		}
	}
	h.served.Store(s)
}

// signalCapacity signals CapacityChanged (coalesced, never blocking).
func (h *Hub) signalCapacity() {
	select {
	case h.capCh <- struct{}{}:
	default:
	}
}

// updateCapacity recomputes Capacity and signals CapacityChanged when it
// grew. A capacity that only shrank (an agent's GOAWAY, each of its held
// runs ending, a drain) is not signalled: the engine reads Capacity at
// every pass, and takes a signal for agents that came or went, which
// ends the holds of the threads set aside for lack of an agent. Each run
// end of an agent going away had every such thread claimed and refused
// again (found by review).
func (h *Hub) updateCapacity() {
	if h.recomputeCapacity() > 0 {
		h.signalCapacity()
	}
}

// recomputeCapacity recomputes Capacity and returns how much it changed.
// The total is stored under h.mu: two recomputes at once (a held run
// ending as an agent registers) could otherwise store the older total
// last, until the next recompute (found by review).
func (h *Hub) recomputeCapacity() int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	total := 0
	if !h.draining {
		for c := range h.conns {
			total += c.capacityShare()
		}
	}
	return int64(total) - h.capacity.Swap(int64(total))
}

// Drain gives up, as GoAway does, the cancelled runs whose agents have
// not finished them within CancelGrace (engine.Drainer): the engine's
// Stop calls it once its grace is over, so that it does not wait for an
// agent that ignores its CANCELs. It sends GOAWAY unless GoAway did.
func (h *Hub) Drain() {
	h.mu.Lock()
	draining := h.draining
	h.mu.Unlock()
	if !draining {
		h.GoAway(ipc.CodeShutdown, "sidecar stopping")
	}
}

// FreeSlots lists the connections with a free slot and the agent ids
// each serves (engine.SlotCounter).
func (h *Hub) FreeSlots() []engine.AgentSlots {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.draining {
		return nil
	}
	var out []engine.AgentSlots
	for c := range h.conns {
		if !c.takesRuns() {
			continue
		}
		if free := c.freeSlots(); free > 0 {
			out = append(out, engine.AgentSlots{Free: free, AgentIDs: slices.Collect(maps.Keys(c.agents)), Any: c.anyID})
		}
	}
	return out
}

// HasFreeSlot reports whether a connection that takes runs of agent id
// id has a free slot now: FreeSlots for one id, without building the
// list (the engine asks it at every submit that names an agent id).
func (h *Hub) HasFreeSlot(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.draining {
		return false
	}
	for c := range h.conns {
		if c.takesRuns() && c.serves(id) && c.freeSlots() > 0 {
			return true
		}
	}
	return false
}

// Serves implements engine.SlotCounter: whether a connection that takes
// runs serves agent id id.
func (h *Hub) Serves(id string) bool {
	s := h.served.Load()
	if s == nil {
		return false
	}
	if s.any {
		return true
	}
	_, ok := s.ids[id]
	return ok
}

// wake tells Run calls waiting for a slot to look again.
func (h *Hub) wake() {
	h.mu.Lock()
	if h.waiters > 0 {
		close(h.slotCh)
		h.slotCh = make(chan struct{})
	}
	h.mu.Unlock()
}

// openResult says what open found besides a stream: whether any
// connection takes runs at all, whether one of them serves the agent id
// (full or not), and whether one that does not serve it has a free slot
// (freeElsewhere: the engine, which counts the slots of every agent id
// together, took that slot for this run).
type openResult struct{ anyConn, served, freeElsewhere bool }

// open picks the connection with the most free slots that serves agent
// and opens a stream on it. Without one it returns the channel to wait
// on and what it found.
func (h *Hub) open(agent string, sink engine.EventSink) (*conn, *stream, <-chan struct{}, openResult) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var best *conn
	bestFree := 0
	var found openResult
	if !h.draining {
		for c := range h.conns {
			if !c.takesRuns() {
				continue
			}
			found.anyConn = true
			if !c.serves(agent) {
				if !found.freeElsewhere && c.freeSlots() > 0 {
					found.freeElsewhere = true
				}
				continue
			}
			found.served = true
			if free := c.freeSlots(); free > bestFree {
				best, bestFree = c, free
			}
		}
	}
	if best == nil {
		h.waiters++
		return nil, nil, h.slotCh, found
	}
	return best, best.reserveStream(sink), nil, found
}

func (h *Hub) doneWaiting() {
	h.mu.Lock()
	h.waiters--
	h.mu.Unlock()
}

type hubMetrics struct {
	connects, protocolErrors, events                 *metrics.Counter
	refusedConns                                     *metrics.Counter
	checkpoints, checkpointErrors, checkpointRefused *metrics.Counter
	cmdAccepted, cmdRefused, cmdTimeout, cmdFailed   *metrics.Counter
	cmdLate                                          *metrics.Counter
	unknownStream, submits, repliesDropped           *metrics.Counter
	cancelOverdue                                    *metrics.Counter
	runs                                             map[string]*metrics.Counter
}

func newHubMetrics(s *metrics.Set, h *Hub) hubMetrics {
	s.NewGauge("mailbox_agent_connections", func() float64 { return float64(h.Connections()) })
	s.NewGauge("mailbox_agent_capacity", func() float64 { return float64(h.Capacity()) })
	// The slots agents have free, as the dispatcher counts them
	// (FreeSlots): capacity less the runs they hold, 0 while draining.
	s.NewGauge("mailbox_agent_free_slots", func() float64 {
		n := 0
		for _, a := range h.FreeSlots() {
			n += a.Free
		}
		return float64(n)
	})
	m := hubMetrics{
		connects:          s.NewCounter("mailbox_agent_connects_total"),
		refusedConns:      s.NewCounter("mailbox_agent_connections_refused_total"),
		protocolErrors:    s.NewCounter("mailbox_agent_protocol_errors_total"),
		events:            s.NewCounter("mailbox_agent_events_total"),
		checkpoints:       s.NewCounter(`mailbox_agent_checkpoints_total{result="ok"}`),
		checkpointErrors:  s.NewCounter(`mailbox_agent_checkpoints_total{result="error"}`),
		checkpointRefused: s.NewCounter(`mailbox_agent_checkpoints_total{result="refused"}`),
		cmdAccepted:       s.NewCounter(`mailbox_agent_commands_total{result="accepted"}`),
		cmdRefused:        s.NewCounter(`mailbox_agent_commands_total{result="refused"}`),
		cmdTimeout:        s.NewCounter(`mailbox_agent_commands_total{result="timeout"}`),
		cmdLate:           s.NewCounter(`mailbox_agent_commands_late_total`),
		cmdFailed:         s.NewCounter(`mailbox_agent_commands_total{result="failed"}`),
		unknownStream:     s.NewCounter("mailbox_agent_unknown_stream_frames_total"),
		submits:           s.NewCounter("mailbox_agent_submits_total"),
		repliesDropped:    s.NewCounter("mailbox_agent_replies_dropped_total"),
		cancelOverdue:     s.NewCounter("mailbox_agent_cancel_overdue_total"),
		runs:              make(map[string]*metrics.Counter),
	}
	for _, k := range []string{engine.OutcomeCompleted.String(), engine.OutcomeTransient.String(), engine.OutcomePermanent.String(), engine.OutcomeAbandoned.String(), engine.OutcomeCancelledLabel} {
		m.runs[k] = s.NewCounter(fmt.Sprintf(`mailbox_agent_runs_total{outcome=%q}`, k))
	}
	return m
}
