// Package agent is the Go SDK for agent processes: it connects to the
// sidecar's agent socket, executes the runs the sidecar hands out, and
// reports their events, checkpoints and outcomes (spec/ipc.md).
//
// # Model
//
// An agent process holds one connection to the sidecar. It announces which
// agents it serves and how many runs it executes at once (Config.AgentIDs,
// Config.MaxRuns); the sidecar then sends RUN frames, each opening a stream
// of its own. For every run the Client calls Handler.HandleRun on a new
// goroutine with a *Run, which carries the request and the recent thread
// history and talks back on the run's stream:
//
//   - Run.Emit streams an event ({"type":"text_delta",…}) to the clients
//     following the run, byte for byte;
//   - Run.Checkpoint makes messages and run-record fields durable and waits
//     for the sidecar's acknowledgement;
//   - Run.Messages and Run.Decisions deliver live commands: messages sent
//     to the thread while the run executes, and decisions for tool calls
//     the run suspended on (Run.DecisionsFor names those calls, and
//     Run.CloseMessages and Run.CloseDecisions end the taking of commands
//     before the last step: a command is accepted only if the run will
//     take it in);
//   - the handler's context is cancelled when the sidecar cancels the run.
//
// The Result the handler returns is the run's outcome: Done, Cancelled,
// Suspended (waits for a decision or input), Transient (retried after a
// backoff) or Permanent (dead-lettered).
//
// The Client keeps the connection alive with heartbeats and reconnects
// with jittered exponential backoff when the sidecar restarts. A lost
// connection cancels every run on it (context cause ErrConnectionLost);
// the sidecar retries those runs, so a handler should make its side
// effects idempotent or checkpoint them. When Serve's context is done the
// Client stops taking runs, lets running ones finish within
// Config.ShutdownGrace, cancels the rest, and returns once their handlers
// have returned. With Config.StopTimeout set, handlers that ignore their
// cancelled context for that long more are left running: Serve closes the
// connection (the sidecar retries their runs) and returns
// ErrHandlersStuck, and the process must exit at once.
//
// The package depends on the standard library, package ipc (the frame
// codec) and two small libraries (JSON and UUID) only.
//
// # Usage
//
//	client, err := agent.New(agent.Config{
//		Socket:  "./run/agent.sock",
//		MaxRuns: 4,
//		Handler: agent.HandlerFunc(func(ctx context.Context, run *agent.Run) agent.Result {
//			var reply string
//			for _, m := range run.Request.Messages {
//				if text, ok := m.Text(); ok {
//					reply = "echo: " + text
//				}
//			}
//			if err := run.Emit(map[string]string{"type": "text_delta", "delta": reply}); err != nil {
//				return agent.Transient("emit_failed", err.Error())
//			}
//			return agent.Done(reply)
//		}),
//	})
//	if err != nil {
//		return err
//	}
//	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
//	defer stop()
//	return client.Serve(ctx) // until SIGINT or SIGTERM
package agent
