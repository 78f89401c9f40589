package hub

import (
	"context"
	"errors"
	"fmt"
	"strings"
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

// stream is one run on a connection.
type stream struct {
	id   uint64
	sink engine.EventSink
	// ctl carries CHECKPOINT and FINISH, in the order received, to the
	// run's goroutine.
	ctl  chan control
	done chan struct{} // closed when the run's goroutine stops listening

	mu      sync.Mutex
	closed  bool // no more events go to sink
	pending map[string]*pendingCmd
}

type control struct {
	checkpoint *checkpointPayload
	finish     *finishPayload
}

// deliver hands a CHECKPOINT or FINISH to the run's goroutine; it blocks
// while the run is busy with earlier ones (the agent waits for its acks)
// and drops the frame once the run has stopped listening.
func (st *stream) deliver(c control) {
	select {
	case st.ctl <- c:
	case <-st.done:
	}
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

// end stops the stream for good: the sink gets nothing more and every
// command still waiting is answered with ErrRunEnded.
func (st *stream) end() {
	st.mu.Lock()
	st.closed = true
	pending := st.pending
	st.pending = nil
	st.mu.Unlock()
	close(st.done)
	for _, p := range pending {
		p.settle(ErrRunEnded)
	}
}

// runPayload is a RUN.
type runPayload struct {
	DispatchID string               `json:"dispatch_id"`
	RunID      string               `json:"run_id"`
	ThreadID   string               `json:"thread_id"`
	AgentID    string               `json:"agent_id"`
	SessionID  string               `json:"session_id"`
	Attempt    uint32               `json:"attempt"`
	Request    runInput             `json:"request"`
	Context    engine.ThreadContext `json:"context"`
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

// encodeRun builds the RUN payload of req. Origins go on the wire in
// lower case (user, a2a, internal), as the protocol spells them.
func encodeRun(req *engine.RunRequest) ([]byte, error) {
	msgs := req.Messages
	if msgs == nil {
		msgs = []engine.Message{}
	}
	ctx := req.Context
	if ctx.Messages == nil {
		ctx.Messages = []engine.MessageRecord{}
	}
	return json.Marshal(runPayload{
		DispatchID: req.DispatchID, RunID: req.RunID, ThreadID: req.ThreadID, AgentID: req.AgentID,
		SessionID: req.SessionID, Attempt: req.Attempt,
		Request: runInput{
			Messages: msgs, RunMode: req.RunMode, Origin: strings.ToLower(req.Origin),
			ContinueRunID: req.ContinueRunID, ParentRunID: req.ParentRunID, ParentThreadID: req.ParentThreadID,
			TransportRequestID: req.TransportRequestID, Decisions: req.Decisions,
			FrontendTools: req.FrontendTools, Overrides: req.Overrides, Traceparent: req.Traceparent,
		},
		Context: ctx,
	})
}

// Run executes one attempt on a connected agent (engine.Executor): it
// picks the connection with the most free slots among those serving the
// run's agent id, sends RUN and serves the stream until FINISH, a lost
// connection, or a cancellation the agent does not finish within
// CancelGrace.
func (h *Hub) Run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	o := h.run(ctx, req, sink)
	if c := h.m.runs[o.Kind]; c != nil {
		c.Inc()
	}
	return o
}

func (h *Hub) run(ctx context.Context, req *engine.RunRequest, sink engine.EventSink) engine.RunOutcome {
	payload, err := encodeRun(req)
	if err != nil {
		return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "invalid_request", Error: fmt.Sprintf("encode RUN: %v", err)}
	}
	var deadline <-chan time.Time
	for {
		if ctx.Err() != nil {
			// Cancelled (an interrupt, a cancel, shutdown) before any
			// agent got it: no RUN is sent.
			return engine.RunOutcome{Kind: engine.OutcomeAbandoned, Error: "cancelled before an agent took the run"}
		}
		c, st, wait, anyConn := h.open(req.AgentID, sink)
		if c == nil {
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
				if !anyConn {
					// No agent at all: not the run's fault; it waits in
					// the queue without spending an attempt.
					return engine.RunOutcome{Kind: engine.OutcomeAbandoned, Error: "no agent connected"}
				}
				return engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: "agent_unavailable",
					Error: fmt.Sprintf("no connected agent serves agent %q with a free slot within %v", req.AgentID, h.cfg.AgentWait)}
			}
		}
		if err := c.start(st, payload); err != nil {
			// The agent never got it: try another connection.
			c.closeStream(st)
			st.end()
			if errors.Is(err, ipc.ErrFrameTooLarge) {
				// Nothing was written: the connection is fine, the run
				// can never be sent.
				h.wake()
				return engine.RunOutcome{Kind: engine.OutcomePermanent, ErrorCode: "run_too_large", Error: err.Error()}
			}
			c.fail(err, ipc.Status{})
			continue
		}
		return c.drive(ctx, st, req)
	}
}

// drive serves a started stream until it ends.
func (c *conn) drive(ctx context.Context, st *stream, req *engine.RunRequest) engine.RunOutcome {
	defer st.end()
	defer c.h.wake()
	defer c.closeStream(st)
	cmds := req.Commands
	done := ctx.Done()
	var grace <-chan time.Time
	for {
		select {
		case it := <-st.ctl:
			if it.finish != nil {
				return outcomeOf(it.finish)
			}
			c.checkpoint(ctx, st, req, it.checkpoint)
		case cmd, ok := <-cmds:
			if !ok {
				cmds = nil
				continue
			}
			c.sendCommand(st, cmd)
		case <-done:
			done = nil
			c.sendCancel(st)
			t := time.NewTimer(c.h.cfg.CancelGrace)
			defer t.Stop()
			grace = t.C
		case <-grace:
			c.mu.Lock()
			c.abandoned[st.id] = struct{}{}
			c.mu.Unlock()
			return engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: "cancel_timeout",
				Error: fmt.Sprintf("agent did not finish the run within %v of CANCEL", c.h.cfg.CancelGrace)}
		case <-c.dead:
			// What the agent sent before the connection died still
			// counts, in order: checkpoints, and a FINISH if it came.
			for {
				select {
				case it := <-st.ctl:
					if it.finish != nil {
						return outcomeOf(it.finish)
					}
					c.checkpoint(ctx, st, req, it.checkpoint)
					continue
				default:
				}
				break
			}
			return engine.RunOutcome{Kind: engine.OutcomeTransient, ErrorCode: "agent_lost",
				Error: fmt.Sprintf("agent connection lost: %v", c.cause)}
		}
	}
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
		_ = c.writeJSON(ipc.TypeError, st.id, ipc.Status{Code: ipc.CodeCheckpointFailed, Message: err.Error(), Seq: &seq})
		return
	}
	c.h.m.checkpoints.Inc()
	_ = c.writeJSON(ipc.TypeCheckpointAck, st.id, ipc.CheckpointAck{Seq: cp.Seq})
}

// sendCancel tells the agent to stop the run; its ack is not awaited.
func (c *conn) sendCancel(st *stream) {
	id := c.newCmdID()
	st.addPending(id, &pendingCmd{})
	_ = c.writeJSON(ipc.TypeCancel, st.id, ipc.Command{Cmd: id})
}

// sendCommand sends a live command; its Reply is answered by the ack,
// by the timeout, or when the run ends.
func (c *conn) sendCommand(st *stream, cmd engine.Command) {
	id := c.newCmdID()
	out := ipc.Command{Cmd: id}
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
	p.timer = time.AfterFunc(c.h.cfg.CommandTimeout, func() {
		if q := st.takePending(id); q != nil {
			c.h.m.cmdTimeout.Inc()
			q.reply <- ErrCommandTimeout
		}
	})
	if err := c.writeJSON(typ, st.id, out); err != nil {
		if q := st.takePending(id); q != nil {
			c.h.m.cmdFailed.Inc()
			q.settle(fmt.Errorf("send %s: %w", typ, err))
		}
	}
}

func reply(ch chan<- error, err error) {
	if ch != nil {
		ch <- err
	}
}

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
