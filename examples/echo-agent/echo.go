package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// maxEvents caps the "events <n>" control word.
const maxEvents = 1_000_000

// echoAgent answers every text message of a run with "echo: <text>".
// Control words in the text drive it for tests and the demo:
//
//	sleep <ms>       wait that long before answering; echo live messages
//	                 meanwhile as "live: <text>"; cancellable
//	fail transient   fail the run with a transient error (retried)
//	fail permanent   fail the run with a permanent error (dead letter)
//	suspend          suspend tool call "call-1" and wait for its decision
//	events <n>       emit n text_delta events before answering
type echoAgent struct {
	log *slog.Logger
}

// Event shapes the agent emits.
type (
	runStartEvent struct {
		Type     string `json:"type"`
		RunID    string `json:"run_id"`
		ThreadID string `json:"thread_id"`
	}
	textDeltaEvent struct {
		Type  string `json:"type"`
		Delta string `json:"delta"`
	}
	toolCallEvent struct {
		Type    string          `json:"type"`
		CallID  string          `json:"call_id"`
		Name    string          `json:"name,omitempty"`
		Outcome string          `json:"outcome,omitempty"`
		Resume  json.RawMessage `json:"resume,omitempty"`
	}
	runFinishEvent struct {
		Type        string            `json:"type"`
		Termination agent.Termination `json:"termination"`
	}
)

const suspendCallID = "call-1"

// HandleRun executes one run.
func (e *echoAgent) HandleRun(ctx context.Context, run *agent.Run) agent.Result {
	if err := run.Emit(runStartEvent{Type: "run_start", RunID: run.RunID, ThreadID: run.ThreadID}); err != nil {
		return failed(ctx, run, "emit_failed", err)
	}
	var replies []string
	var live <-chan []agent.MessageRecord // set once the run takes live messages
	for _, m := range run.Request.Messages {
		text, ok := m.Text()
		if !ok {
			continue
		}
		if res, stop := e.control(ctx, run, text, &live); stop {
			return res
		}
		reply := "echo: " + text
		if err := run.Emit(textDeltaEvent{Type: "text_delta", Delta: reply}); err != nil {
			return failed(ctx, run, "emit_failed", err)
		}
		cp := agent.Checkpoint{Messages: []agent.Message{agent.TextMessage(agent.RoleAssistant, reply)}}
		if err := run.Checkpoint(ctx, cp); err != nil {
			return failed(ctx, run, "checkpoint_failed", err)
		}
		replies = append(replies, reply)
	}
	if live != nil {
		// The last step: messages from now on go to a run of their own;
		// the ones accepted before are answered here.
		if err := echoLive(run, run.CloseMessages()); err != nil {
			return failed(ctx, run, "emit_failed", err)
		}
	}
	finish := runFinishEvent{Type: "run_finish", Termination: agent.Termination{Type: agent.TermNaturalEnd}}
	if err := run.Emit(finish); err != nil {
		return failed(ctx, run, "emit_failed", err)
	}
	return agent.Done(strings.Join(replies, "\n"))
}

// control acts on a control word in text; stop reports that the run ends
// with res. live is the run's live-message channel once it takes them.
func (e *echoAgent) control(ctx context.Context, run *agent.Run, text string, live *<-chan []agent.MessageRecord) (res agent.Result, stop bool) {
	f := strings.Fields(text)
	if len(f) > 0 {
		switch f[0] {
		case "sleep", "fail", "suspend", "events":
			e.log.Debug("control word", "run_id", run.RunID, "word", f[0])
		}
	}
	switch {
	case len(f) == 2 && f[0] == "sleep":
		ms, err := strconv.Atoi(f[1])
		if err != nil || ms < 0 {
			return agent.Result{}, false
		}
		*live = run.Messages()
		if err := sleepEchoingLive(ctx, run, *live, time.Duration(ms)*time.Millisecond); err != nil {
			return failed(ctx, run, "emit_failed", err), true
		}
	case len(f) == 2 && f[0] == "fail" && f[1] == "transient":
		return agent.Transient("echo_failure", "transient failure requested by the message"), true
	case len(f) == 2 && f[0] == "fail" && f[1] == "permanent":
		return agent.Permanent("echo_failure", "permanent failure requested by the message"), true
	case len(f) == 1 && f[0] == "suspend":
		if err := suspend(ctx, run); err != nil {
			return failed(ctx, run, "suspend_failed", err), true
		}
	case len(f) == 2 && f[0] == "events":
		n, err := strconv.Atoi(f[1])
		if err != nil || n < 0 {
			return agent.Result{}, false
		}
		for i := range min(n, maxEvents) {
			if err := run.Emit(textDeltaEvent{Type: "text_delta", Delta: "event " + strconv.Itoa(i+1)}); err != nil {
				return failed(ctx, run, "emit_failed", err), true
			}
		}
	}
	if ctx.Err() != nil {
		return cancelled(run), true
	}
	return agent.Result{}, false
}

// sleepEchoingLive waits d (or until ctx is done), echoing live messages.
func sleepEchoingLive(ctx context.Context, run *agent.Run, live <-chan []agent.MessageRecord, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			return nil
		case batch := <-live:
			if err := echoLive(run, batch); err != nil {
				return err
			}
		}
	}
}

func echoLive(run *agent.Run, batch []agent.MessageRecord) error {
	for _, rec := range batch {
		if text, ok := rec.Message.Text(); ok {
			if err := run.Emit(textDeltaEvent{Type: "text_delta", Delta: "live: " + text}); err != nil {
				return err
			}
		}
	}
	return nil
}

// suspend suspends tool call call-1 and waits for its decision (or ctx).
func suspend(ctx context.Context, run *agent.Run) error {
	decisions := run.DecisionsFor(suspendCallID) // before the suspension is announced
	if err := run.Emit(toolCallEvent{Type: "tool_call_start", CallID: suspendCallID, Name: "echo_approval"}); err != nil {
		return err
	}
	if err := run.Emit(toolCallEvent{Type: "tool_call_done", CallID: suspendCallID, Outcome: "suspended"}); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case batch := <-decisions:
			for _, d := range batch {
				if d.CallID == suspendCallID {
					return run.Emit(toolCallEvent{Type: "tool_call_resumed", CallID: suspendCallID, Resume: d.Resume})
				}
			}
		}
	}
}

// failed maps an error of the SDK to the run's outcome: a cancelled run is
// Cancelled, anything else a transient failure.
func failed(ctx context.Context, run *agent.Run, code string, err error) agent.Result {
	if ctx.Err() != nil {
		return cancelled(run)
	}
	return agent.Transient(code, fmt.Sprint(err))
}

// cancelled ends a cancelled run: a run_finish event (best effort: the
// connection may be gone) and the Cancelled result.
func cancelled(run *agent.Run) agent.Result {
	_ = run.Emit(runFinishEvent{Type: "run_finish", Termination: agent.Termination{Type: agent.TermCancelled}})
	return agent.Cancelled()
}
