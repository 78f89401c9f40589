// Command agent is the recording chaos agent of the crash harness
// (package crash): an agent on the Go SDK whose behaviour each run's
// message text chooses (crash.Command: sleep, checkpoint, suspend, fail
// transient, fail permanent, done) and which journals every run start,
// acknowledged checkpoint, live message, decision and cancel it receives
// and run end to a file (crash.Journal), fsynced
// line by line so that the journal survives a SIGKILL of the agent.
//
// Usage:
//
//	agent --socket path --journal path [--name n] [--max-runs n] [--max-backoff d]
//
// SIGTERM or SIGINT stops it gracefully. A journal that cannot be written
// stops it with exit status 3: a run the harness cannot see is worthless.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/bench/crash"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

func main() {
	socket := flag.String("socket", "./run/agent.sock", "sidecar agent socket")
	journal := flag.String("journal", "", "journal file (required)")
	name := flag.String("name", "chaos-agent", "name announced to the sidecar")
	maxRuns := flag.Int("max-runs", 8, "runs executed at once")
	maxBackoff := flag.Duration("max-backoff", 200*time.Millisecond, "longest reconnect backoff")
	logLevel := flag.String("log-level", "warn", "debug, info, warn or error")
	flag.Parse()
	if *journal == "" {
		fmt.Fprintln(os.Stderr, "agent: --journal is required")
		os.Exit(2)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "agent: --log-level:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	j, err := crash.OpenJournal(*journal)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(2)
	}
	client, err := agent.New(agent.Config{
		Socket:        *socket,
		Name:          *name,
		MaxRuns:       *maxRuns,
		Handler:       &chaos{journal: j, log: log, pid: os.Getpid()},
		MinBackoff:    20 * time.Millisecond,
		MaxBackoff:    *maxBackoff,
		ShutdownGrace: 5 * time.Second,
		Logger:        log,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err = client.Serve(ctx)
	if cerr := j.Close(); err == nil {
		err = cerr
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(1)
	}
}

// chaos executes runs as their command says and journals them.
type chaos struct {
	journal *crash.Journal
	log     *slog.Logger
	pid     int
}

// Events the agent emits (the shapes of examples/echo-agent).
type (
	startEvent struct {
		Type      string `json:"type"`
		RunID     string `json:"run_id"`
		SessionID string `json:"session_id"`
	}
	textEvent struct {
		Type  string `json:"type"`
		Delta string `json:"delta"`
	}
	toolEvent struct {
		Type    string `json:"type"`
		CallID  string `json:"call_id"`
		Name    string `json:"name,omitempty"`
		Outcome string `json:"outcome,omitempty"`
	}
	finishEvent struct {
		Type        string            `json:"type"`
		Termination agent.Termination `json:"termination"`
	}
)

// HandleRun journals the start, executes the command (journaling what
// the run receives), journals the end (before the FINISH goes out) and
// returns the result.
func (a *chaos) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	cmd, decided := command(run)
	rec := crash.Record{
		Event: crash.EventStart, ThreadID: run.ThreadID, RunID: run.RunID, DispatchID: run.DispatchID,
		Attempt: run.Attempt, SessionID: run.SessionID, StartNs: time.Now().UnixNano(),
		Command: cmd.String(), PID: a.pid,
	}
	a.append(rec)
	in := &inbox{a: a, run: run}
	cancelled := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(cancelled)
		in.record(crash.EventCancel, fmt.Sprint(context.Cause(ctx)), "")
	})
	res, outcome := a.execute(ctx, in, cmd, decided)
	in.flush()
	switch {
	case !stop():
		<-cancelled // its record goes before the end record
	case ctx.Err() != nil:
		// Cancelled, but stop won the race with the AfterFunc's start.
		in.record(crash.EventCancel, fmt.Sprint(context.Cause(ctx)), "")
	}
	if cause := context.Cause(ctx); cause != nil {
		switch {
		case errors.Is(cause, agent.ErrConnectionLost):
			outcome = crash.OutcomeLost
		case errors.Is(cause, agent.ErrShutdown):
			outcome = crash.OutcomeShutdown
		}
	}
	rec.Event, rec.EndNs, rec.Outcome, rec.Command = crash.EventEnd, time.Now().UnixNano(), outcome, ""
	a.append(rec)
	return res
}

// append journals r; a journal that fails ends the process.
func (a *chaos) append(r crash.Record) {
	if err := a.journal.Append(r); err != nil {
		fmt.Fprintln(os.Stderr, "agent: journal:", err)
		os.Exit(3)
	}
}

// command returns the run's command: the first activation message that
// parses as one (a run activated by anything else completes at once), and
// whether the request carries the decision for SuspendCallID.
func command(run *agent.Run) (crash.Command, bool) {
	decided := false
	for _, d := range run.Request.Decisions {
		decided = decided || d.CallID == crash.SuspendCallID
	}
	for _, m := range run.Request.Messages {
		if text, ok := m.Text(); ok {
			if c, ok := crash.ParseCommand(text); ok {
				return c, decided
			}
		}
	}
	return crash.Command{Nonce: "n-none", Verb: crash.VerbDone}, decided
}

// execute runs cmd and returns the result with its journal outcome.
func (a *chaos) execute(ctx context.Context, in *inbox, cmd crash.Command, decided bool) (agent.Result, string) {
	run := in.run
	if err := run.Emit(startEvent{Type: "run_start", RunID: run.RunID, SessionID: run.SessionID}); err != nil {
		return failed(ctx, run, "emit_failed", err)
	}
	in.live = run.Messages() // every run takes live messages, echoed as they come
	if decided {
		if err := run.Emit(toolEvent{Type: "tool_call_resumed", CallID: crash.SuspendCallID}); err != nil {
			return failed(ctx, run, "emit_failed", err)
		}
	}
	switch cmd.Verb {
	case crash.VerbSleep:
		if err := pause(ctx, in, time.Duration(cmd.Arg)*time.Millisecond); err != nil {
			return failed(ctx, run, "emit_failed", err)
		}
	case crash.VerbCheckpoint:
		for i := 1; i <= cmd.Arg; i++ {
			text := crash.CheckpointText(i, cmd.Arg, run.DispatchID, run.SessionID, run.Attempt)
			cp := agent.Checkpoint{Messages: []agent.Message{agent.TextMessage(agent.RoleAssistant, text)}}
			if err := run.Checkpoint(ctx, cp); err != nil {
				return failed(ctx, run, "checkpoint_failed", err)
			}
			a.append(crash.Record{
				Event: crash.EventCheckpoint, ThreadID: run.ThreadID, RunID: run.RunID, DispatchID: run.DispatchID,
				Attempt: run.Attempt, SessionID: run.SessionID, Index: i, AckNs: time.Now().UnixNano(), PID: a.pid,
			})
			if err := pause(ctx, in, time.Duration(cmd.Arg2)*time.Millisecond); err != nil {
				return failed(ctx, run, "emit_failed", err)
			}
		}
	case crash.VerbSuspend:
		if !decided {
			got, err := suspend(ctx, in, time.Duration(cmd.Arg)*time.Millisecond)
			if err != nil {
				return failed(ctx, run, "emit_failed", err)
			}
			if ctx.Err() != nil {
				return cancelled(run)
			}
			if !got {
				return agent.Suspended(agent.WaitingState{Reason: agent.WaitToolPermission, Message: crash.SuspendCallID}), crash.OutcomeSuspended
			}
			decided = true
		}
	case crash.VerbTransient:
		if run.Attempt <= cmd.Arg {
			return agent.Transient("chaos_transient", fmt.Sprintf("transient failure of attempt %d requested", run.Attempt)), crash.OutcomeTransient
		}
	case crash.VerbPermanent:
		return agent.Permanent("chaos_permanent", "permanent failure requested"), crash.OutcomePermanent
	}
	if ctx.Err() != nil {
		return cancelled(run)
	}
	if err := drain(in); err != nil {
		return failed(ctx, run, "emit_failed", err)
	}
	if err := run.Emit(finishEvent{Type: "run_finish", Termination: agent.Termination{Type: agent.TermNaturalEnd}}); err != nil {
		return failed(ctx, run, "emit_failed", err)
	}
	outcome := crash.OutcomeDone
	if decided {
		outcome = crash.OutcomeResumed
	}
	return agent.Done("ok " + run.SessionID), outcome
}

// pause waits d or until ctx is done, echoing live messages.
func pause(ctx context.Context, in *inbox, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			return nil
		case batch := <-in.live:
			if err := in.echo(batch); err != nil {
				return err
			}
		}
	}
}

// suspend announces the suspended tool call and waits up to d for its
// decision; got says whether it came.
func suspend(ctx context.Context, in *inbox, d time.Duration) (got bool, err error) {
	run := in.run
	in.decisions = run.Decisions() // before the suspension is announced
	if err := run.Emit(toolEvent{Type: "tool_call_start", CallID: crash.SuspendCallID, Name: "approval"}); err != nil {
		return false, err
	}
	if err := run.Emit(toolEvent{Type: "tool_call_done", CallID: crash.SuspendCallID, Outcome: "suspended"}); err != nil {
		return false, err
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false, nil
		case <-t.C:
			return false, nil
		case batch := <-in.live:
			if err := in.echo(batch); err != nil {
				return false, err
			}
		case batch := <-in.decisions:
			in.decided(batch)
			for _, dec := range batch {
				if dec.CallID == crash.SuspendCallID {
					return true, run.Emit(toolEvent{Type: "tool_call_resumed", CallID: crash.SuspendCallID})
				}
			}
		}
	}
}

// drain echoes the live messages already accepted.
func drain(in *inbox) error {
	for {
		select {
		case batch, ok := <-in.live:
			if !ok {
				return nil
			}
			if err := in.echo(batch); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// inbox journals what a run receives: live messages and decisions as the
// handler takes them from the SDK (flush takes the rest, which the SDK
// acknowledged too, before the end record).
type inbox struct {
	a         *chaos
	run       *agent.Run
	live      <-chan []agent.MessageRecord // nil until the run takes live messages
	decisions <-chan []agent.Decision      // nil until the run waits for one
}

// record journals one thing the run received.
func (in *inbox) record(event, text, callID string) {
	r := in.run
	in.a.append(crash.Record{
		Event: event, ThreadID: r.ThreadID, RunID: r.RunID, DispatchID: r.DispatchID, Attempt: r.Attempt,
		SessionID: r.SessionID, Text: text, CallID: callID, AtNs: time.Now().UnixNano(), PID: in.a.pid,
	})
}

// echo journals a batch of live messages, then echoes them as events.
func (in *inbox) echo(batch []agent.MessageRecord) error {
	in.received(batch)
	for _, rec := range batch {
		if text, ok := rec.Message.Text(); ok {
			if err := in.run.Emit(textEvent{Type: "text_delta", Delta: "live: " + text}); err != nil {
				return err
			}
		}
	}
	return nil
}

// received journals a batch of live messages.
func (in *inbox) received(batch []agent.MessageRecord) {
	for _, rec := range batch {
		text, _ := rec.Message.Text()
		in.record(crash.EventLive, text, "")
	}
}

// decided journals a batch of decisions.
func (in *inbox) decided(batch []agent.Decision) {
	for _, d := range batch {
		in.record(crash.EventDecision, "", d.CallID)
	}
}

// flush journals the live messages and decisions still buffered, once
// the run takes no more (CloseMessages, CloseDecisions): a command the SDK
// accepted between a last look at the buffer and the end record was
// answered delivered and never journaled, nor taken in (found by the
// harness in CI).
func (in *inbox) flush() {
	if in.live != nil {
		in.received(in.run.CloseMessages())
	}
	if in.decisions != nil {
		in.decided(in.run.CloseDecisions())
	}
	for {
		select {
		case batch, ok := <-in.live:
			if !ok {
				in.live = nil
				continue
			}
			in.received(batch)
		case batch, ok := <-in.decisions:
			if !ok {
				in.decisions = nil
				continue
			}
			in.decided(batch)
		default:
			return
		}
	}
}

// failed maps an SDK error to the outcome: a cancelled run is Cancelled,
// anything else a transient failure.
func failed(ctx context.Context, run *agent.Run, code string, err error) (agent.Result, string) {
	if ctx.Err() != nil {
		return cancelled(run)
	}
	return agent.Transient(code, err.Error()), crash.OutcomeTransient
}

// cancelled ends a cancelled run with a run_finish (best effort).
func cancelled(run *agent.Run) (agent.Result, string) {
	_ = run.Emit(finishEvent{Type: "run_finish", Termination: agent.Termination{Type: agent.TermCancelled}})
	return agent.Cancelled(), crash.OutcomeCancelled
}
