package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// A handler streams events, checkpoints what the run produced, and returns
// the run's outcome; Serve connects it to the sidecar. (Not run: it needs
// a sidecar.)
func Example() {
	handler := agent.HandlerFunc(func(ctx context.Context, run *agent.Run) agent.Result {
		_ = run.Emit(map[string]string{"type": "run_start", "run_id": run.RunID, "thread_id": run.ThreadID})
		var text string
		for _, m := range run.Request.Messages {
			if t, ok := m.Text(); ok {
				text = t
			}
		}
		reply := "echo: " + text
		_ = run.Emit(map[string]string{"type": "text_delta", "delta": reply})
		err := run.Checkpoint(ctx, agent.Checkpoint{Messages: []agent.Message{agent.TextMessage(agent.RoleAssistant, reply)}})
		switch {
		case ctx.Err() != nil:
			return agent.Cancelled()
		case err != nil:
			return agent.Transient("checkpoint_failed", err.Error())
		}
		_ = run.Emit(map[string]any{"type": "run_finish", "termination": map[string]string{"type": "natural_end"}})
		return agent.Done(reply)
	})

	client, err := agent.New(agent.Config{
		Socket:  "./run/agent.sock",
		Name:    "echo",
		MaxRuns: 4,
		Handler: handler,
		Logger:  slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := client.Serve(ctx); err != nil { // returns after a graceful stop on SIGINT/SIGTERM
		fmt.Fprintln(os.Stderr, err)
	}
}

// A handler that takes live messages and decisions while it works: it
// must ask for them (Messages, Decisions) to receive any, and should drain
// them before it returns. (Not run: it needs a sidecar.)
func Example_liveCommands() {
	_ = agent.HandlerFunc(func(ctx context.Context, run *agent.Run) agent.Result {
		live, decisions := run.Messages(), run.Decisions()
		_ = run.Emit(map[string]any{"type": "tool_call_start", "call_id": "call-1", "name": "deploy"})
		_ = run.Emit(map[string]any{"type": "tool_call_done", "call_id": "call-1", "outcome": "suspended"})
		for {
			select {
			case <-ctx.Done():
				return agent.Cancelled()
			case batch := <-live:
				for _, rec := range batch {
					text, _ := rec.Message.Text()
					_ = run.Emit(map[string]string{"type": "text_delta", "delta": "noted: " + text})
				}
			case ds := <-decisions:
				_ = run.Emit(map[string]any{"type": "tool_call_resumed", "call_id": ds[0].CallID, "resume": ds[0].Resume})
				return agent.Done("deployed")
			}
		}
	})
}

// The outcomes a handler returns, as the FINISH payloads they become.
func Example_results() {
	for _, r := range []agent.Result{
		agent.Done("hello"),
		agent.Cancelled(),
		agent.Suspended(agent.WaitingState{Reason: agent.WaitToolPermission, TicketIDs: []string{"call-1"}}),
		agent.Transient("llm_unavailable", "upstream 503"),
		agent.Permanent("agent_not_found", "no agent named x"),
	} {
		b, _ := json.Marshal(r)
		fmt.Println(string(b))
	}
	// Output:
	// {"status":"done","termination":{"type":"natural_end"},"response":"hello"}
	// {"status":"done","termination":{"type":"cancelled"}}
	// {"status":"waiting","termination":{"type":"suspended"},"waiting":{"reason":"tool_permission","ticket_ids":["call-1"]}}
	// {"status":"done","termination":{"type":"error","value":"upstream 503"},"error":{"kind":"transient","code":"llm_unavailable","message":"upstream 503"}}
	// {"status":"done","termination":{"type":"error","value":"no agent named x"},"error":{"kind":"permanent","code":"agent_not_found","message":"no agent named x"}}
}

// Text reads the text of the common content shapes.
func ExampleMessage_Text() {
	for _, content := range []string{
		`"plain"`,
		`{"type":"text","text":"one part"}`,
		`[{"type":"text","text":"two "},{"type":"image","url":"x"},{"type":"text","text":"parts"}]`,
		`{"type":"image","url":"x"}`,
		`["a string part, ",{"type":"text","text":"then an object"},7,["nested"]]`,
	} {
		text, ok := agent.Message{Role: agent.RoleUser, Content: json.RawMessage(content)}.Text()
		fmt.Printf("%q %v\n", text, ok)
	}
	// Output:
	// "plain" true
	// "one part" true
	// "two parts" true
	// "" false
	// "a string part, then an object" true
}
