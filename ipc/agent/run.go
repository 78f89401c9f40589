package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	json "github.com/goccy/go-json"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
)

// liveBuffer is how many live MESSAGES (and, separately, DECISION)
// commands a run buffers before refusing more.
const liveBuffer = 8

// Run is one attempt of a run, handed to Handler.HandleRun. Its exported
// fields are the RUN payload; its methods talk to the sidecar on the run's
// stream and are safe for concurrent use. Once the handler has returned
// (and FINISH is sent) they fail with ErrRunFinished and the live channels
// are closed.
type Run struct {
	DispatchID string // the dispatch (queue entry) this attempt executes
	RunID      string
	ThreadID   string
	AgentID    string
	SessionID  string // this attempt's id: new for every attempt
	Attempt    int    // counts from 1
	Request    Request
	Context    ThreadContext

	conn   *conn
	stream uint64
	log    *slog.Logger // built on first use (logger): most runs log nothing
	logMu  sync.Mutex
	ctx    context.Context
	cancel context.CancelCauseFunc

	// sendMu orders the frames of the run: EVENTs hold it shared,
	// CHECKPOINT and FINISH exclusively, each until its frame's place in
	// the stream is fixed (conn.sendQueued), not while it waits for its
	// write; the reader holds it shared from a command's admission until
	// the command has acted. Lock order: sendMu before mu.
	sendMu sync.RWMutex
	sent   bool   // FINISH was sent (or given up); guarded by sendMu
	seq    uint64 // last checkpoint seq; guarded by sendMu and mu

	mu       sync.Mutex            // guards the fields below; never held across a write
	done     bool                  // the handler returned: commands are refused, channels closed
	pending  map[uint64]chan error // checkpoints awaiting ACK or ERROR, by seq
	msgs     chan []MessageRecord  // live MESSAGES
	decs     chan []Decision       // live DECISION
	wantMsgs bool                  // Messages was called
	wantDecs bool                  // Decisions was called
	// msgsClosed, decsClosed: CloseMessages, CloseDecisions was called;
	// such commands are refused.
	msgsClosed, decsClosed bool
	// decFor, when not nil, are the only call ids whose decisions the run
	// takes (DecisionsFor).
	decFor map[string]struct{}
}

func newRun(cn *conn, stream uint64, p *runPayload) *Run {
	ctx, cancel := context.WithCancelCause(cn.base)
	return &Run{
		DispatchID: p.DispatchID,
		RunID:      p.RunID,
		ThreadID:   p.ThreadID,
		AgentID:    p.AgentID,
		SessionID:  p.SessionID,
		Attempt:    p.Attempt,
		Request:    p.Request,
		Context:    p.Context,
		conn:       cn,
		stream:     stream,
		ctx:        ctx,
		cancel:     cancel,
		pending:    make(map[uint64]chan error),
		msgs:       make(chan []MessageRecord, liveBuffer),
		decs:       make(chan []Decision, liveBuffer),
	}
}

// logger returns the run's logger, made on first use: building one per
// run costs more than most runs ever log.
func (r *Run) logger() *slog.Logger {
	r.logMu.Lock()
	defer r.logMu.Unlock()
	if r.log == nil {
		r.log = r.conn.log.With("run_id", r.RunID, "thread_id", r.ThreadID, "dispatch_id", r.DispatchID,
			"attempt", r.Attempt, "stream", r.stream)
	}
	return r.log
}

// debug logs at debug level, building the run's logger only when that
// level is on.
func (r *Run) debug(msg string, args ...any) {
	if r.conn.log.Enabled(context.Background(), slog.LevelDebug) {
		r.logger().Debug(msg, args...)
	}
}

// Emit marshals event to JSON and sends it as one EVENT. The event must
// encode as a JSON object with a "type" string member (run_start,
// text_delta, tool_call_start, tool_call_done, tool_call_resumed,
// run_finish, …); the sidecar forwards it to clients byte for byte.
func (r *Run) Emit(event any) error {
	b, err := json.Marshal(event)
	if err != nil {
		return fmt.Errorf("agent: emit on run %s: encode %T: %w", r.RunID, event, err)
	}
	return r.EmitRaw(b)
}

// EmitRaw sends event, an encoded JSON object with a "type" string member,
// as one EVENT. It refuses anything but a JSON object (the sidecar would
// close the connection on it) and does not keep event after it returns.
func (r *Run) EmitRaw(event []byte) error {
	if err := ipc.CheckPayload(ipc.TypeEvent, event); err != nil {
		return fmt.Errorf("agent: emit on run %s: %w", r.RunID, err)
	}
	r.sendMu.RLock()
	if r.sent {
		r.sendMu.RUnlock()
		return ErrRunFinished
	}
	if err := r.conn.sendQueued(ipc.TypeEvent, r.stream, event, r.releaseShared); err != nil {
		return fmt.Errorf("agent: emit on run %s: %w", r.RunID, err)
	}
	return nil
}

// Checkpoint persists cp: its messages are appended to the thread log and
// its run fields applied to the run record. It numbers the checkpoint
// (seq 1, 2, … per run), sends it after every event emitted before, and
// waits until the sidecar made it durable (nil), refused it (a
// *CheckpointError), ctx is done, or the connection is lost (an error
// wrapping ErrConnectionLost; the checkpoint may or may not have been
// applied). A checkpoint must complete before the handler returns.
//
// A ctx already done sends nothing (the checkpoint is not applied). When
// ctx is done only because the sidecar cancelled the run (the run's own
// context, or one derived from it: cause ErrCancelled), Checkpoint still
// waits for the sidecar's answer (at most 30 s), which a cancel does not
// hold back, so that its result says whether the checkpoint was applied. When ctx ends
// otherwise after the checkpoint went out, the error wraps ctx's cause and
// the checkpoint may or may not have been applied.
//
// Do not checkpoint the request's activation messages or live MESSAGES:
// they are already in the thread log.
func (r *Run) Checkpoint(ctx context.Context, cp Checkpoint) error {
	if cp.Messages == nil {
		cp.Messages = []Message{}
	}
	body, err := json.Marshal(cp) // {"messages":[…],…}: Messages is never omitted
	if err == nil {
		err = ipc.CheckPayload(ipc.TypeCheckpoint, body) // raw JSON fields are not checked by the encoder
	}
	if err != nil {
		return fmt.Errorf("agent: checkpoint on run %s: encode: %w", r.RunID, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("agent: checkpoint on run %s: not sent: %w", r.RunID, context.Cause(ctx))
	}
	ch := make(chan error, 1)

	r.sendMu.Lock()
	if r.sent {
		r.sendMu.Unlock()
		return ErrRunFinished
	}
	r.mu.Lock()
	if r.done { // the handler returned; FINISH is on its way
		r.mu.Unlock()
		r.sendMu.Unlock()
		return ErrRunFinished
	}
	r.seq++
	seq := r.seq
	r.pending[seq] = ch
	r.mu.Unlock()
	payload := make([]byte, 0, len(body)+32)
	payload = append(payload, `{"seq":`...)
	payload = strconv.AppendUint(payload, seq, 10)
	payload = append(payload, ',')
	payload = append(payload, body[1:]...)
	err = r.conn.sendQueued(ipc.TypeCheckpoint, r.stream, payload, r.releaseExclusive)

	if err != nil {
		r.dropCheckpoint(seq)
		return fmt.Errorf("agent: checkpoint %d on run %s: %w", seq, r.RunID, err)
	}
	done := ctx.Done()
	var answerWait <-chan time.Time
	for {
		select {
		case err := <-ch:
			return err
		case <-done:
			if errors.Is(context.Cause(ctx), ErrCancelled) {
				// The sidecar answers a checkpoint of a cancelled run; a
				// bound all the same, should the answer never come.
				done = nil
				t := time.NewTimer(cancelledCheckpointWait)
				defer t.Stop()
				answerWait = t.C
				continue
			}
			r.dropCheckpoint(seq)
			return fmt.Errorf("agent: checkpoint %d on run %s: %w", seq, r.RunID, context.Cause(ctx))
		case <-answerWait:
			r.dropCheckpoint(seq)
			return fmt.Errorf("agent: checkpoint %d on run %s: no answer %v after the cancel (it may or may not have been applied): %w",
				seq, r.RunID, cancelledCheckpointWait, context.Cause(ctx))
		case <-r.conn.dead:
			select {
			case err := <-ch: // answered before the connection ended
				return err
			default:
			}
			r.dropCheckpoint(seq)
			return fmt.Errorf("agent: checkpoint %d on run %s: %w", seq, r.RunID, ErrConnectionLost)
		}
	}
}

// cancelledCheckpointWait bounds how long Checkpoint waits for the answer
// to a checkpoint whose run the sidecar cancelled meanwhile.
const cancelledCheckpointWait = 30 * time.Second

func (r *Run) dropCheckpoint(seq uint64) {
	r.mu.Lock()
	delete(r.pending, seq)
	r.mu.Unlock()
}

// resolveCheckpoint hands the sidecar's answer to the waiting Checkpoint
// and reports whether one was waiting for seq.
func (r *Run) resolveCheckpoint(seq uint64, err error) bool {
	r.mu.Lock()
	ch, ok := r.pending[seq]
	delete(r.pending, seq)
	r.mu.Unlock()
	if ok {
		ch <- err // buffered, sent once
	}
	return ok
}

// Messages returns the channel of live messages: each MESSAGES command the
// sidecar sends while the run executes, already in the thread log (do not
// checkpoint them again). Take them in at the next step boundary.
//
// The run accepts live messages only once Messages has been called and
// until CloseMessages is; before, after, and when the channel's small
// buffer is full, the sidecar is told they were not delivered and queues
// them for a run of their own. Messages still in the channel when the
// handler returns are not lost (they are in the log) but no run reacts to
// them: call CloseMessages before the run's last step and take in what it
// returns. The channel is closed when the handler returns.
func (r *Run) Messages() <-chan []MessageRecord {
	r.mu.Lock()
	r.wantMsgs = true
	r.mu.Unlock()
	return r.msgs
}

// CloseMessages stops taking live messages: from now on the sidecar is
// told they were not delivered, and queues them for a run of their own
// (ipc.md: a run accepts them only if it will hand them to its model). It
// returns the messages accepted before and not yet read from Messages;
// the run has told the sidecar it takes them in, so it must. Call it
// before the run's last step (its final answer): a message accepted after
// that step began would be answered by no run.
func (r *Run) CloseMessages() []MessageRecord { return closeInput(r, r.msgs, &r.msgsClosed) }

// CloseDecisions is CloseMessages for decisions: from now on a DECISION
// is refused, and the decisions accepted before and not yet read from
// Decisions are returned (the run must take them in).
func (r *Run) CloseDecisions() []Decision { return closeInput(r, r.decs, &r.decsClosed) }

// closeInput sets closed (guarded by mu), so that no more commands of its
// kind are admitted, and returns what ch holds. It holds sendMu
// exclusively: a command admitted before (under the shared lock) is in ch
// once it holds it.
func closeInput[T any](r *Run, ch chan []T, closed *bool) []T {
	r.sendMu.Lock()
	defer r.sendMu.Unlock()
	r.mu.Lock()
	*closed = true
	done := r.done // the channels are closed and drained at FINISH
	r.mu.Unlock()
	var out []T
	for !done {
		select {
		case batch := <-ch:
			out = append(out, batch...)
			continue
		default:
		}
		break
	}
	return out
}

// Decisions returns the channel of live tool-call decisions (DECISION
// commands) for calls the run suspended on. As with Messages, decisions
// are accepted only once Decisions has been called and while the buffer
// has room; the channel is closed when the handler returns. Decisions
// accepts a decision for any call id: a run that knows the calls it
// suspended on uses DecisionsFor, so that the sidecar is told a decision
// for another call was not delivered.
func (r *Run) Decisions() <-chan []Decision {
	r.mu.Lock()
	r.wantDecs = true
	r.decFor = nil
	r.mu.Unlock()
	return r.decs
}

// DecisionsFor is Decisions for a run suspended on the calls callIDs: a
// DECISION is accepted only when each of its decisions names one of them
// (the sidecar hears "no suspended call" otherwise). A later call replaces
// the set; the channel is the same.
func (r *Run) DecisionsFor(callIDs ...string) <-chan []Decision {
	set := make(map[string]struct{}, len(callIDs))
	for _, id := range callIDs {
		set[id] = struct{}{}
	}
	r.mu.Lock()
	r.wantDecs = true
	r.decFor = set
	r.mu.Unlock()
	return r.decs
}

// command answers a live command with COMMAND_ACK and acts on it once the
// ack has its place in the stream: the ack precedes every frame the
// command causes (events of a handler reacting to a message or to its
// cancelled context) and the run's FINISH, because it is queued under
// sendMu like an event. A run whose FINISH is already out gets no ack (its
// stream is closed). Only the reader goroutine calls command, so a channel
// with room when the command is admitted still has room when it is
// delivered, and FINISH (which closes the channels) waits for sendMu.
func (r *Run) command(typ ipc.FrameType, cmd *commandPayload) error {
	r.sendMu.RLock()
	if r.sent {
		r.sendMu.RUnlock()
		return nil
	}
	r.mu.Lock()
	reason := r.admitLocked(typ, cmd)
	r.mu.Unlock()
	ok := reason == ""
	r.debug("live command", "type", typ, "cmd", cmd.Cmd, "accepted", ok, "reason", reason)
	ack := mustMarshal(ipc.CommandAck{Cmd: cmd.Cmd, Accepted: ok, Reason: reason})
	// The command acts as soon as its ack has its place in the stream,
	// before the ack is written: whatever it causes is written after the
	// ack, and a sidecar slow to read does not hold up a CANCEL.
	err := r.conn.sendQueued(ipc.TypeCommandAck, r.stream, ack, func(placed bool) {
		if ok && placed {
			switch typ {
			case ipc.TypeCancel:
				r.cancel(ErrCancelled)
			case ipc.TypeMessages:
				r.msgs <- cmd.Messages
			case ipc.TypeDecision:
				r.decs <- cmd.Decisions
			}
		}
		r.sendMu.RUnlock()
	})
	return ignoreLost(err)
}

// releaseShared and releaseExclusive release sendMu once a frame has its
// place in the stream (conn.sendQueued).
func (r *Run) releaseShared(bool)    { r.sendMu.RUnlock() }
func (r *Run) releaseExclusive(bool) { r.sendMu.Unlock() }

// admitLocked returns why the run refuses a command of type typ now, or
// "" when it takes it.
func (r *Run) admitLocked(typ ipc.FrameType, cmd *commandPayload) string {
	if r.done {
		return "run finished"
	}
	if cmd.AckBy > 0 && typ != ipc.TypeCancel && time.Now().UnixMilli() > cmd.AckBy {
		// Read after its ack was due: the sidecar may have fallen back
		// already (the messages queued as a new dispatch).
		return "late"
	}
	switch typ {
	case ipc.TypeMessages:
		switch {
		case r.ctx.Err() != nil:
			return "run cancelled"
		case !r.wantMsgs:
			return "run does not take live messages"
		case r.msgsClosed:
			return "run takes no more live messages (its last step began)"
		case len(r.msgs) == cap(r.msgs):
			return "live message buffer full"
		}
	case ipc.TypeDecision:
		switch {
		case r.ctx.Err() != nil:
			return "run cancelled"
		case !r.wantDecs:
			return "run does not take live decisions"
		case r.decsClosed:
			return "run takes no more decisions (its last step began)"
		case r.decFor != nil && !r.decidesAllLocked(cmd.Decisions):
			return "no suspended call for the decision"
		case len(r.decs) == cap(r.decs):
			return "live decision buffer full"
		}
	}
	return ""
}

// decidesAllLocked reports whether every decision names a call of
// decFor. Called with r.mu held.
func (r *Run) decidesAllLocked(ds []Decision) bool {
	if len(ds) == 0 {
		return false
	}
	for _, d := range ds {
		if _, ok := r.decFor[d.CallID]; !ok {
			return false
		}
	}
	return true
}

// execute runs the handler and sends its FINISH.
func (r *Run) execute(h Handler) {
	defer r.conn.client.handlerDone()
	// Released as the handler returns, before FINISH: the sidecar sends
	// the thread's next run only after it.
	release := r.conn.client.holdThread(r.ThreadID, r.logger())
	returned := false
	defer func() {
		if !returned {
			release()
			// The handler ended its goroutine without returning
			// (runtime.Goexit: t.FailNow in a test's handler): the run
			// still finishes, or it would hold its slot, and Serve would
			// wait for it, for ever.
			r.logger().Error("run handler exited without returning (runtime.Goexit)")
			r.finish(Transient("handler_exited", "agent handler exited without returning a result"))
		}
	}()
	res := r.call(h)
	returned = true
	release()
	r.finish(res)
}

// call runs the handler, turning a panic into a transient failure.
func (r *Run) call(h Handler) (res Result) {
	defer func() {
		if v := recover(); v != nil {
			r.logger().Error("run handler panicked", "panic", v, "stack", string(debug.Stack()))
			res = Transient("panic", fmt.Sprintf("agent handler panicked: %v", v))
		}
	}()
	return h.HandleRun(r.ctx, r)
}

// finish closes the run: commands are refused from now on, the live
// channels close, and FINISH is sent unless the connection is lost.
func (r *Run) finish(res Result) {
	cause := context.Cause(r.ctx)
	res = res.complete(cause != nil)
	if res.Status != StatusDone && res.Status != StatusWaiting {
		// The sidecar would close the connection, failing every run on
		// it (protocol.md): this run alone fails, for good (the handler
		// would most likely return the same again).
		r.logger().Error("run result has a status that is neither done nor waiting", "status", res.Status)
		res = Permanent("invalid_result", fmt.Sprintf("agent returned status %q; a run ends done or waiting", res.Status))
	}
	if res.Error != nil && res.Error.Kind != ipc.KindTransient && res.Error.Kind != ipc.KindPermanent {
		// The sidecar takes any other kind as transient, so a typo
		// ("Permanent", "fatal") was retried to its last attempt (found
		// by review): this run fails for good, saying why.
		r.logger().Error("run result has an error kind that is neither transient nor permanent", "kind", res.Error.Kind)
		res = Permanent("invalid_result", fmt.Sprintf("agent returned error kind %q; a failure is transient or permanent", res.Error.Kind))
	}
	if errors.Is(cause, ErrShutdown) && res.Error == nil && res.Termination.Type == TermCancelled {
		// Not the user's cancel: the run is to be retried elsewhere.
		res = Transient(ipc.CodeShutdown, "the agent shut down before the run finished")
	}
	payload, err := json.Marshal(res)
	if err == nil {
		err = ipc.CheckPayload(ipc.TypeFinish, payload)
	}
	if err != nil {
		r.logger().Error("run result does not encode", "err", err)
		payload = mustMarshal(Transient("invalid_result", "agent returned a result that does not encode: "+err.Error()))
	} else if limit := r.conn.w.MaxFrame(); uint64(len(payload)) > uint64(limit) {
		// The sidecar would never hear of the run: it would hold its
		// slot until the connection ends. Fail it instead, for good: a
		// retry would most likely return as much again.
		r.logger().Error("run result exceeds the sidecar's max_frame", "bytes", len(payload), "max_frame", limit)
		payload = mustMarshal(Permanent("result_too_large", fmt.Sprintf(
			"agent returned a result of %d bytes encoded; the sidecar takes frames of at most %d bytes (max_frame)", len(payload), limit)))
	}

	r.conn.closeStream(r.stream)
	r.sendMu.Lock()
	r.mu.Lock()
	r.done = true
	unread := len(r.msgs) + len(r.decs)
	close(r.msgs)
	close(r.decs)
	pending := r.pending
	r.pending = nil
	r.mu.Unlock()
	r.sent = true
	if errors.Is(cause, ErrConnectionLost) {
		err = ErrConnectionLost
		r.sendMu.Unlock()
	} else {
		err = r.conn.sendQueued(ipc.TypeFinish, r.stream, payload, r.releaseExclusive)
	}
	for _, ch := range pending {
		ch <- ErrRunFinished
	}
	if unread > 0 {
		r.logger().Warn("run returned with live commands unread", "unread", unread)
	}
	r.cancel(ErrRunFinished)
	r.conn.runEnded()

	switch {
	case err != nil:
		r.logger().Warn("run ended without FINISH; the sidecar retries it", "err", err)
	case res.Error != nil:
		r.logger().Warn("run failed", "status", res.Status, "kind", res.Error.Kind, "code", res.Error.Code)
	default:
		r.debug("run finished", "status", res.Status, "termination", res.Termination.Type)
	}
}
