package hub

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// Errors a live command's Reply may carry.
var (
	// ErrCommandRefused: the agent answered accepted:false.
	ErrCommandRefused = errors.New("agent refused the command")
	// ErrCommandTimeout: no COMMAND_ACK within Config.CommandTimeout.
	ErrCommandTimeout = errors.New("agent did not acknowledge the command in time")
	// ErrRunEnded: the run ended before the agent acknowledged.
	ErrRunEnded = errors.New("run ended before the command was acknowledged")
)

// checkpointTimeout bounds the persistence of one checkpoint.
const checkpointTimeout = 30 * time.Second

// ErrorCodeCheckpointBacklog is the RunOutcome.ErrorCode of a run failed
// because its agent had more CHECKPOINTs awaiting CHECKPOINT_ACK than
// Config.MaxUnackedCheckpoints or MaxUnackedCheckpointBytes allow.
const ErrorCodeCheckpointBacklog = "checkpoint_backlog"

// stream is one run on a connection.
type stream struct {
	id   uint64
	sink engine.EventSink
	// ctl carries CHECKPOINT and FINISH, in the order received, to the
	// run's goroutine.
	ctl ctlQueue

	mu      sync.Mutex
	closed  bool // no more events go to sink
	pending map[string]*pendingCmd
}

// control is one item of a stream's ctlQueue: a CHECKPOINT (with its
// payload size), a FINISH, or the mark that the checkpoint backlog
// overflowed there.
type control struct {
	checkpoint *checkpointPayload
	size       int64
	finish     *finishPayload
	backlog    *backlogOverflow
}

// backlogOverflow records the CHECKPOINT that found its run's backlog of
// unanswered checkpoints full.
type backlogOverflow struct {
	seq        uint64
	unanswered int
	bytes      int64
}

// checkpointLimits bound a run's backlog of CHECKPOINTs received and not
// yet answered (Config.MaxUnackedCheckpoints and
// MaxUnackedCheckpointBytes).
type checkpointLimits struct {
	count int
	bytes int64
}

// ctlQueue hands a stream's CHECKPOINTs and FINISH from the connection's
// reader to the run's goroutine, in order. The reader never waits on it, so
// a run that is slow to persist its checkpoints cannot stall the other runs
// of the connection; what bounds it is the backlog of checkpoints received
// and not yet answered (checkpointLimits), which an agent controls by
// waiting for CHECKPOINT_ACK.
type ctlQueue struct {
	// ready is signalled (capacity 1) while items are waiting.
	ready chan struct{}

	mu    sync.Mutex
	items []control // items[head:] are waiting, oldest first
	head  int
	// inline backs items for the usual few, so a stream needs no other
	// allocation for them.
	inline [4]control
	// unanswered counts the CHECKPOINTs queued or being applied, bytes
	// their payload sizes; they drop when the run answers one.
	unanswered int
	bytes      int64
	refusing   bool // the backlog overflowed: CHECKPOINTs are refused
	ended      bool // the run's goroutine takes nothing more
}

func (q *ctlQueue) init() {
	q.ready = make(chan struct{}, 1)
	q.items = q.inline[:0]
}

// pushResult is what became of a CHECKPOINT handed to a ctlQueue.
type pushResult uint8

const (
	pushQueued   pushResult = iota
	pushRefused             // the backlog is full, or overflowed before
	pushOverflow            // refused, and the first refusal: the run fails
	pushEnded               // the run's goroutine has stopped
)

// pushCheckpoint queues a CHECKPOINT of size payload bytes unless the
// run's backlog is full: one more would exceed a limit, and it is not the
// only one (a lone checkpoint is always taken). Past the first refusal
// every later CHECKPOINT is refused too, so that what the run applies is
// a prefix of what the agent sent; the first refusal queues a backlog
// mark after the accepted checkpoints.
func (q *ctlQueue) pushCheckpoint(cp *checkpointPayload, size int64, lim checkpointLimits) pushResult {
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case q.ended:
		return pushEnded
	case q.refusing:
		return pushRefused
	case q.unanswered > 0 && (q.unanswered >= lim.count || q.bytes+size > lim.bytes):
		q.refusing = true
		q.appendLocked(control{backlog: &backlogOverflow{seq: cp.Seq, unanswered: q.unanswered, bytes: q.bytes}})
		return pushOverflow
	}
	q.unanswered++
	q.bytes += size
	q.appendLocked(control{checkpoint: cp, size: size})
	return pushQueued
}

// pushFinish queues a FINISH; false when the run's goroutine has stopped.
func (q *ctlQueue) pushFinish(f *finishPayload) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ended {
		return false
	}
	q.appendLocked(control{finish: f})
	return true
}

func (q *ctlQueue) appendLocked(c control) {
	if q.head > 0 && len(q.items) == cap(q.items) {
		// Reuse the consumed front rather than grow.
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
	q.items = append(q.items, c)
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// pop takes the oldest waiting item, if any.
func (q *ctlQueue) pop() (control, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.head == len(q.items) {
		return control{}, false
	}
	c := q.items[q.head]
	q.items[q.head] = control{}
	q.head++
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	} else {
		select { // more are waiting
		case q.ready <- struct{}{}:
		default:
		}
	}
	return c, true
}

// answered records that the run answered a CHECKPOINT of size bytes
// (ACK or ERROR).
func (q *ctlQueue) answered(size int64) {
	q.mu.Lock()
	q.unanswered--
	q.bytes -= size
	q.mu.Unlock()
}

// end stops the queue and returns the items still waiting.
func (q *ctlQueue) end() []control {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.ended = true
	left := append([]control(nil), q.items[q.head:]...)
	clear(q.items)
	q.items, q.head = nil, 0
	return left
}

// pendingCmd is a live command waiting for its COMMAND_ACK.
type pendingCmd struct {
	reply chan<- error // nil for CANCEL
	timer *time.Timer
}

func (p *pendingCmd) settle(err error) {
	if p.timer != nil {
		p.timer.Stop()
	}
	if p.reply != nil {
		p.reply <- err
	}
}

func (st *stream) addPending(id string, p *pendingCmd) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.pending == nil {
		return false
	}
	st.pending[id] = p
	return true
}

func (st *stream) takePending(id string) *pendingCmd {
	st.mu.Lock()
	defer st.mu.Unlock()
	p := st.pending[id]
	delete(st.pending, id)
	return p
}

// expiredCmd stands in the pending map for a command whose ack timed
// out, so that a late COMMAND_ACK is told apart from an unknown one, for
// lateAckWindow.
var expiredCmd = &pendingCmd{}

// lateAckWindow is how long after its timeout a command's ACK is still
// known as late.
const lateAckWindow = 30 * time.Second

// dropExpired forgets a timed-out command.
func (st *stream) dropExpired(id string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.pending[id] == expiredCmd {
		delete(st.pending, id)
	}
}

// expire takes the command id out of waiting, as takePending, but leaves
// expiredCmd in its place; it returns nil when the command no longer
// waited.
func (st *stream) expire(id string) *pendingCmd {
	st.mu.Lock()
	defer st.mu.Unlock()
	p := st.pending[id]
	if p == nil || p == expiredCmd {
		return nil
	}
	st.pending[id] = expiredCmd
	return p
}

// end stops the stream for good: the sink gets nothing more, every
// command still waiting is answered with ErrRunEnded, and the CHECKPOINTs
// and FINISH the run's goroutine did not take are returned.
func (st *stream) end() []control {
	st.mu.Lock()
	st.closed = true
	pending := st.pending
	st.pending = nil
	st.mu.Unlock()
	left := st.ctl.end()
	for _, p := range pending {
		if p != expiredCmd {
			p.settle(ErrRunEnded)
		}
	}
	return left
}

type runInput struct {
	Messages           []engine.Message  `json:"messages"`
	RunMode            string            `json:"run_mode"`
	Origin             string            `json:"origin"`
	ContinueRunID      string            `json:"continue_run_id,omitempty"`
	ParentRunID        string            `json:"parent_run_id,omitempty"`
	ParentThreadID     string            `json:"parent_thread_id,omitempty"`
	TransportRequestID string            `json:"transport_request_id,omitempty"`
	Decisions          []engine.Decision `json:"decisions,omitempty"`
	FrontendTools      json.RawMessage   `json:"frontend_tools,omitempty"`
	Overrides          json.RawMessage   `json:"overrides,omitempty"`
	Traceparent        string            `json:"traceparent,omitempty"`
}

// Run executes one attempt on a connected agent (engine.Executor): it
// picks the connection with the most free slots among those serving the
// run's agent id, sends RUN and serves the stream until FINISH or a lost
// connection. A cancelled run the agent does not finish within
// CancelGrace is held (logged, counted in
// mailbox_agent_cancel_overdue_total) until one of those, or until the
// hub drains: two runs of one thread never execute at once.
func (h *Hub) Run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	o := h.run(ctx, req, sink)
	if c := h.m.runs[o.MetricLabel()]; c != nil {
		c.Inc()
	}
	return o
}

func (h *Hub) run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	payload, repaired, err := runPayload(getRunBuf(), req)
	if err != nil {
		return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "invalid_request", Error: fmt.Sprintf("encode RUN: %v", err)}
	}
	if repaired {
		h.log.Warn("the RUN held bytes that are not UTF-8 (a message or request stored by an earlier version): sent as U+FFFD",
			"run_id", req.RunID, "thread_id", req.ThreadID)
	}
	// The payload holds the messages and the context now, and the run
	// needs neither again: held in req, a run that goes on for minutes
	// kept its thread's history (up to --context-bytes, decoded) all that
	// time (found by review: 200 running runs of threads with 3.6 MB of
	// history held 745 MiB). engine.Executor allows it.
	req.Messages, req.Context.Messages = nil, nil
	var deadline <-chan time.Time
	for {
		if ctx.Err() != nil {
			// Cancelled (an interrupt, a cancel, shutdown) before any
			// agent got it: no RUN is sent.
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, Error: "cancelled before an agent took the run"}
		}
		c, st, wait, found := h.open(req.AgentID, sink)
		if c == nil {
			if found.anyConn && !found.served {
				// Agents are connected and none serves this agent id:
				// nothing to wait for. Not the run's fault (ipc.md: never
				// nacked, never dead-lettered for lack of an agent): it
				// goes back to the queue without spending an attempt, and
				// the engine sets its thread aside until agents come or go.
				h.doneWaiting()
				return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable,
					Error: fmt.Sprintf("no connected agent serves agent %q", req.AgentID)}
			}
			if found.served && found.freeElsewhere {
				// The agents that serve it are full and the free slot the
				// engine counted is another agent's: a wait would hold
				// that slot from the runs it could take for up to
				// AgentWait. Back to the queue at once, without spending
				// an attempt; the engine sets the thread aside a moment
				// and fills the slot with other work.
				h.doneWaiting()
				return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentBusy,
					Error: fmt.Sprintf("every agent serving agent %q is full; the free slots are other agents'", req.AgentID)}
			}
			if deadline == nil {
				t := time.NewTimer(h.cfg.AgentWait)
				defer t.Stop()
				deadline = t.C
			}
			select {
			case <-wait:
				h.doneWaiting()
				continue
			case <-ctx.Done():
				h.doneWaiting()
				return engine.RunOutcome{Kind: engine.OutcomeAbandoned, Error: "cancelled before an agent took the run"}
			case <-deadline:
				h.doneWaiting()
				if !found.anyConn {
					// No agent at all: not the run's fault; it waits in
					// the queue without spending an attempt.
					return engine.RunOutcome{Kind: engine.OutcomeAbandoned, Error: "no agent connected"}
				}
				if !found.served {
					return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentUnavailable,
						Error: fmt.Sprintf("no connected agent serves agent %q", req.AgentID)}
				}
				// The agents that serve it stayed full (the engine counts
				// the slots of every agent id together): not the run's
				// fault either.
				return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: engine.CodeAgentBusy,
					Error: fmt.Sprintf("no agent serving agent %q had a free slot within %v", req.AgentID, h.cfg.AgentWait)}
			}
		}
		if req.SlotTaken != nil {
			req.SlotTaken() // FreeSlots counts the stream reserved
		}
		if err := c.start(st, payload); err != nil {
			// The agent never got it: try another connection.
			c.closeStream(st)
			st.end()
			if errors.Is(err, ipc.ErrFrameTooLarge) {
				// Nothing was written: the connection is fine, the run
				// can never be sent.
				c.runEnded()
				return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "run_too_large", Error: err.Error()}
			}
			c.fail(err, ipc.Status{})
			continue
		}
		putRunBuf(payload) // written: the agent has it
		return c.drive(ctx, st, req)
	}
}

// readerDrainTimeout bounds how long a run whose connection failed waits
// for the connection's reader to hand over the frames it had received.
// The reader then only works through its buffer (the connection is
// closed), so this is a guard against a sink that blocks, not a delay.
const readerDrainTimeout = 5 * time.Second

// drive serves a started stream until it ends.
func (c *conn) drive(ctx context.Context, st *stream, req *engine.RunRequest) engine.RunOutcome {
	defer c.endStream(st)
	cmds := req.Commands
	done := ctx.Done()
	var grace <-chan time.Time
	var graceTimer *time.Timer
	var drained <-chan struct{} // once the grace is over: a drain gives the run up
	defer func() {
		if graceTimer != nil {
			graceTimer.Stop()
		}
	}()
	cancelling := false
	// The CANCEL goes out as soon as ctx ends, from a goroutine of its
	// own: this loop may be busy applying a checkpoint (a store commit,
	// milliseconds on a slow store), and the agent should stop at once.
	// The loop starts the grace when it sees ctx end.
	var cancelOnce sync.Once
	sendCancel := func() { cancelOnce.Do(func() { c.sendCancel(st) }) }
	defer context.AfterFunc(ctx, sendCancel)()
	startCancel := func() {
		cancelling = true
		sendCancel()
		graceTimer = time.NewTimer(c.h.cfg.CancelGrace)
		grace = graceTimer.C
	}
	// failed, once the hub has failed the run itself (its checkpoint
	// backlog overflowed), is the outcome whatever the agent's FINISH
	// says: the run's log lacks the refused checkpoints.
	var failed *engine.RunOutcome
	// apply acts on one CHECKPOINT, FINISH or backlog mark, in the order
	// received; true when the run is over.
	apply := func(it control, live bool) (engine.RunOutcome, bool) {
		switch {
		case it.finish != nil:
			if failed != nil {
				return *failed, true
			}
			return c.goingAwayOutcome(outcomeOf(it.finish)), true
		case it.backlog != nil:
			failed = c.backlogOutcome(it.backlog)
			if live && !cancelling {
				startCancel() // the agent has its refusals; stop the run
			}
		default:
			c.checkpoint(ctx, st, req, it.checkpoint)
			st.ctl.answered(it.size)
		}
		return engine.RunOutcome{}, false
	}
	for {
		select {
		case <-st.ctl.ready:
			if it, ok := st.ctl.pop(); ok {
				if o, end := apply(it, true); end {
					return o
				}
			}
		case cmd, ok := <-cmds:
			if !ok {
				cmds = nil
				continue
			}
			c.sendCommand(st, cmd)
		case <-done:
			done = nil
			if !cancelling {
				startCancel()
			}
		case <-grace:
			// The agent still runs it: the run, its thread and its slot
			// stay held until its FINISH or the connection's end, so
			// that no other run of the thread starts meanwhile. Only a
			// drain (shutdown) gives it up, as the engine then waits
			// for it to return.
			grace = nil
			select {
			case <-c.h.drained:
				return c.abandon(st, failed)
			default:
			}
			c.h.m.cancelOverdue.Inc()
			c.log.Warn("the agent has not finished a cancelled run; its thread stays held until it does or its connection ends",
				"stream", st.id, "thread_id", req.ThreadID, "run_id", req.RunID, "cancel_grace", c.h.cfg.CancelGrace)
			drained = c.h.drained
		case <-drained:
			return c.abandon(st, failed)
		case <-c.dead:
			// What the agent sent before the connection failed still
			// counts, in order: checkpoints, and a FINISH if it came.
			// The reader goes on with the frames it had received when
			// the connection failed (even those still in its buffer)
			// and stops at their end; take them all.
			c.awaitReader()
			for {
				it, ok := st.ctl.pop()
				if !ok {
					break
				}
				if o, end := apply(it, false); end {
					return o
				}
			}
			if failed != nil {
				return *failed
			}
			return engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: "agent_lost",
				Error: fmt.Sprintf("agent connection lost: %v", c.cause)}
		}
	}
}

// abandon gives up a cancelled run the agent still runs, once the hub
// drains: the attempt ends as a transient cancel_timeout (or as the hub
// failed it), and its slot stays taken until the agent's late FINISH or
// the connection's end, so no further RUN lands on a full agent.
func (c *conn) abandon(st *stream, failed *engine.RunOutcome) engine.RunOutcome {
	c.mu.Lock()
	c.abandoned[st.id] = struct{}{}
	c.mu.Unlock()
	if failed != nil {
		return *failed
	}
	return engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: "cancel_timeout",
		Error: fmt.Sprintf("agent did not finish the run within %v of CANCEL, and the sidecar is draining", c.h.cfg.CancelGrace)}
}

// awaitReader waits, once the connection has failed, until its reader has
// handed over every frame it had received, or readerDrainTimeout.
func (c *conn) awaitReader() {
	t := time.NewTimer(readerDrainTimeout)
	defer t.Stop()
	select {
	case <-c.readDone:
	case <-t.C:
		c.log.Warn("agent connection's reader still busy after it failed; its last frames may be lost", "waited", readerDrainTimeout)
	}
}

// endStream closes a run's stream once its goroutine is done with it.
// CHECKPOINTs it did not take are refused, so that the agent does not wait
// for their ACK; a FINISH it did not take (it came as the run was given
// up at a drain) frees the slot kept for the run.
func (c *conn) endStream(st *stream) {
	c.closeStream(st)
	for _, it := range st.end() {
		switch {
		case it.checkpoint != nil:
			c.refuseCheckpoint(st.id, it.checkpoint.Seq, ipc.ReasonRunEnded, "the run ended before this checkpoint was applied")
		case it.finish != nil:
			c.mu.Lock()
			delete(c.abandoned, st.id)
			c.mu.Unlock()
		}
	}
	c.runEnded()
}

// backlogOutcome is the outcome of a run whose checkpoint backlog
// overflowed.
func (c *conn) backlogOutcome(b *backlogOverflow) *engine.RunOutcome {
	return &engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: ErrorCodeCheckpointBacklog,
		Error: fmt.Sprintf("agent sent CHECKPOINT seq %d while %d checkpoints (%d bytes) of the run awaited CHECKPOINT_ACK (limits %d, %d bytes); it and every later checkpoint of the run were refused",
			b.seq, b.unanswered, b.bytes, c.h.cfg.MaxUnackedCheckpoints, c.h.cfg.MaxUnackedCheckpointBytes)}
}

// refuseCheckpoint answers a CHECKPOINT that is not applied with ERROR
// checkpoint_failed on its stream, through the heartbeat goroutine (it is
// called by the reader).
func (c *conn) refuseCheckpoint(stream, seq uint64, reason, why string) {
	c.answer(ipc.TypeError, stream, ipc.Status{Code: ipc.CodeCheckpointFailed, Message: why, Seq: &seq, Reason: reason}, false)
}

// checkpoint persists one CHECKPOINT and answers it.
func (c *conn) checkpoint(ctx context.Context, st *stream, req *engine.RunRequest, cp *checkpointPayload) {
	var err error
	if req.Checkpoint != nil && (len(cp.Messages) > 0 || cp.Run != nil) {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), checkpointTimeout)
		err = req.Checkpoint(cctx, engine.RunCheckpoint{Messages: cp.Messages, Run: cp.Run})
		cancel()
	}
	if err != nil {
		c.h.m.checkpointErrors.Inc()
		seq := cp.Seq
		_ = c.writeJSON(ipc.TypeError, st.id, ipc.Status{Code: ipc.CodeCheckpointFailed, Message: err.Error(), Seq: &seq, Reason: checkpointReason(err)})
		return
	}
	c.h.m.checkpoints.Inc()
	_ = c.writeJSON(ipc.TypeCheckpointAck, st.id, ipc.CheckpointAck{Seq: cp.Seq})
}

// checkpointReason is the Reason of the ERROR answering a checkpoint the
// store refused: the client API's code of the error (engine.Code). A
// context that ended first (checkpointTimeout: the store did not answer
// in time) is unavailable, like the store's own failures.
func checkpointReason(err error) string {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return ipc.ReasonUnavailable
	}
	return engine.Code(err)
}

// sendCancel tells the agent to stop the run; its ack is not awaited.
func (c *conn) sendCancel(st *stream) {
	id := c.newCmdID()
	if !st.addPending(id, &pendingCmd{}) {
		return // the run has ended
	}
	_ = c.writeJSON(ipc.TypeCancel, st.id, ipc.Command{Cmd: id})
}

// sendCommand sends a live command; its Reply is answered by the ack,
// by the timeout, or when the run ends.
func (c *conn) sendCommand(st *stream, cmd engine.Command) {
	id := c.newCmdID()
	// The wait ends at the engine's deadline (it falls back then), not a
	// timeout counted from here: the command may have waited for this
	// loop (found by review: ack_by fell after the engine's fallback).
	now := time.Now()
	deadline := cmd.Deadline
	if deadline.IsZero() {
		deadline = now.Add(c.h.cfg.CommandTimeout)
	}
	ackBy, ok := commandAckBy(now, deadline)
	if !ok {
		// At its deadline: not sent, as no agent could answer in time.
		c.h.m.cmdTimeout.Inc()
		reply(cmd.Reply, ErrCommandTimeout)
		return
	}
	left := deadline.Sub(now)
	out := ipc.Command{Cmd: id, AckBy: ackBy}
	var typ ipc.FrameType
	var err error
	switch cmd.Kind {
	case engine.CommandMessages:
		typ = ipc.TypeMessages
		out.Messages, err = json.Marshal(cmd.Messages)
	case engine.CommandDecision:
		typ = ipc.TypeDecision
		out.Decisions, err = json.Marshal(cmd.Decisions)
	default:
		err = fmt.Errorf("unknown command kind %d", cmd.Kind)
	}
	if err != nil {
		c.h.m.cmdFailed.Inc()
		reply(cmd.Reply, fmt.Errorf("command %s: %w", id, err))
		return
	}
	p := &pendingCmd{reply: cmd.Reply}
	if !st.addPending(id, p) {
		reply(cmd.Reply, ErrRunEnded)
		return
	}
	p.timer = time.AfterFunc(left, func() {
		if q := st.expire(id); q != nil {
			c.h.m.cmdTimeout.Inc()
			q.reply <- ErrCommandTimeout
			// A late ACK is told apart for a while, not for the run's
			// whole life (found by review: one marker per unanswered
			// command).
			time.AfterFunc(lateAckWindow, func() { st.dropExpired(id) })
		}
	})
	if err := c.writeJSON(typ, st.id, out); err != nil {
		if q := st.takePending(id); q != nil && q != expiredCmd {
			c.h.m.cmdFailed.Inc()
			q.settle(fmt.Errorf("send %s: %w", typ, err))
		}
	}
}

// commandAckBy is the ack_by (Unix ms) of a command sent at now that the
// engine gives up on at deadline: half the time left, the other half for
// the ACK to reach the sidecar. An agent that reads the command after it
// refuses it, so that messages the engine then queues as a new dispatch
// are not also taken live. It falls in a millisecond before the
// deadline's (ack_by is whole milliseconds, and an agent accepts
// through its millisecond; found by review); ok is false when no such
// millisecond is left.
func commandAckBy(now, deadline time.Time) (ackBy int64, ok bool) {
	ackBy = now.Add(deadline.Sub(now) / 2).UnixMilli()
	if last := deadline.UnixMilli() - 1; ackBy > last {
		ackBy = last
	}
	return ackBy, ackBy >= now.UnixMilli()
}

func reply(ch chan<- error, err error) {
	if ch != nil {
		ch <- err
	}
}

// goingAwayOutcome is o, except that a run an agent gave up because it
// is shutting down — a transient failure with code shutdown after its
// GOAWAY — goes back to the queue without spending an attempt
// (abandoned, code agent_shutdown), as a run the sidecar's own shutdown
// cuts short does. In a pod the agent stops first, and every stop cost
// each long run one of its attempts (found by two reviews). An agent
// that reports shutdown without a GOAWAY spends one: a loop of such
// answers would otherwise never end.
func (c *conn) goingAwayOutcome(o engine.RunOutcome) engine.RunOutcome {
	if o.Kind != engine.OutcomeTransient || o.ErrorCode != ipc.CodeShutdown {
		return o
	}
	c.mu.Lock()
	goingAway := c.agentGoAway
	c.mu.Unlock()
	if !goingAway {
		return o
	}
	return engine.RunOutcome{Kind: engine.OutcomeAbandoned, ErrorCode: ErrorCodeAgentShutdown, Error: o.Error}
}

// ErrorCodeAgentShutdown is the code of a run released because its
// agent shut down (goingAwayOutcome). The engine spends an attempt from
// the fourth in a row on (an agent that goes away with every run it
// takes, a crash loop).
const ErrorCodeAgentShutdown = engine.CodeAgentShutdown

// outcomeOf maps a FINISH to the engine's outcome.
func outcomeOf(f *finishPayload) engine.RunOutcome {
	if f.Error != nil {
		kind := engine.OutcomeTransient
		if f.Error.Kind == ipc.KindPermanent {
			kind = engine.OutcomePermanent
		}
		msg := f.Error.Message
		if msg == "" {
			msg = f.Error.Code
		}
		if msg == "" {
			msg = "agent reported a " + kind.String()
		}
		return engine.RunOutcome{Kind: kind, ErrorCode: f.Error.Code, Error: msg}
	}
	o := engine.RunOutcome{Kind: engine.OutcomeCompleted, Status: engine.RunDone, Termination: f.Termination, Response: f.Response, Waiting: f.Waiting}
	if f.Status == string(engine.RunWaiting) {
		o.Status = engine.RunWaiting
	}
	if o.Termination == nil {
		o.Termination = &engine.Termination{Type: engine.TermNaturalEnd}
		if o.Status == engine.RunWaiting {
			o.Termination = &engine.Termination{Type: engine.TermSuspended}
		}
	}
	return o
}
