package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// Defaults of Config.
const (
	DefaultMaxRuns       = 1
	DefaultMinBackoff    = 100 * time.Millisecond
	DefaultMaxBackoff    = 5 * time.Second
	DefaultShutdownGrace = 10 * time.Second
	// MaxMaxRuns is the largest MaxRuns the sidecar honours.
	MaxMaxRuns = 1024
)

// Config configures a Client. Only Socket and Handler are required.
type Config struct {
	// Socket is the path of the sidecar's agent socket (required), e.g.
	// "./run/agent.sock".
	Socket string
	// Name identifies this process in the sidecar's logs (HELLO name).
	// Default: the program's base name.
	Name string
	// AgentIDs are the agents this process serves; "*" serves any.
	// Default ["*"].
	AgentIDs []string
	// MaxRuns is how many runs this process executes at once, 1 to
	// MaxMaxRuns. The sidecar never sends more on one connection. (After a
	// lost connection, handlers of the old one that have not yet returned
	// from their cancelled context are not counted.) Default 1.
	MaxRuns int
	// Handler executes runs (required).
	Handler Handler
	// MinBackoff and MaxBackoff bound the delay before reconnecting after
	// a failed or lost connection: the n-th consecutive failure waits a
	// random duration in [0, min(MaxBackoff, MinBackoff·2ⁿ)] ("full
	// jitter"). A connection that lasted MaxBackoff ends the count; one
	// that failed sooner, even after its handshake, adds to it. Defaults
	// 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration
	// ShutdownGrace is how long Serve lets running handlers finish once
	// its context is done (after sending GOAWAY); then it cancels their
	// contexts (cause ErrShutdown) and waits for them to return; a run
	// its handler ends so is reported as a transient failure with code
	// shutdown, which the sidecar puts back in the queue without
	// spending an attempt (the GOAWAY was sent). Default 10 s; a
	// negative value cancels at once.
	ShutdownGrace time.Duration
	// StopTimeout, when positive, is how long Serve waits, once
	// ShutdownGrace has run out and the remaining runs are cancelled, for
	// handlers that ignore their cancelled context. Then it closes the
	// connection and returns an error wrapping ErrHandlersStuck. Go cannot
	// stop a goroutine: such a handler still runs, and the process must
	// exit at once, since the sidecar takes the closed connection as a
	// lost agent: it spends an attempt of each such run and retries it,
	// on another agent perhaps, beside the handler still running. 0 (the
	// default) waits for ever, holding the connection (and with it the
	// run's thread) until every handler has returned.
	StopTimeout time.Duration
	// Logger receives the client's logs. Default slog.Default().
	Logger *slog.Logger
}

// withDefaults returns cfg with defaults filled in, or an error naming the
// first invalid field.
func (cfg Config) withDefaults() (Config, error) {
	if cfg.Socket == "" {
		return cfg, errors.New("agent: config: Socket is required")
	}
	if cfg.Handler == nil {
		return cfg, errors.New("agent: config: Handler is required")
	}
	if cfg.Name == "" {
		cfg.Name = filepath.Base(os.Args[0])
	}
	if len(cfg.AgentIDs) == 0 {
		cfg.AgentIDs = []string{"*"}
	}
	for _, id := range cfg.AgentIDs {
		if id == "" {
			return cfg, errors.New("agent: config: AgentIDs holds an empty id")
		}
	}
	switch {
	case cfg.MaxRuns == 0:
		cfg.MaxRuns = DefaultMaxRuns
	case cfg.MaxRuns < 0 || cfg.MaxRuns > MaxMaxRuns:
		return cfg, fmt.Errorf("agent: config: MaxRuns %d out of range 1..%d", cfg.MaxRuns, MaxMaxRuns)
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = max(DefaultMaxBackoff, cfg.MinBackoff)
	}
	if cfg.MinBackoff < 0 || cfg.MaxBackoff < cfg.MinBackoff {
		return cfg, fmt.Errorf("agent: config: backoff %v..%v is not a valid range", cfg.MinBackoff, cfg.MaxBackoff)
	}
	if cfg.ShutdownGrace == 0 {
		cfg.ShutdownGrace = DefaultShutdownGrace
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg, nil
}

// Handler executes runs. HandleRun is called on its own goroutine for every
// RUN the sidecar sends, at most MaxRuns at once.
//
// ctx carries the values of Serve's context (not its cancellation). It is
// cancelled when the sidecar cancels the run (cause ErrCancelled),
// when the connection is lost (ErrConnectionLost; the FINISH is not sent
// and the sidecar retries the run), or when shutdown's grace runs out
// (ErrShutdown); a handler returns promptly then. Events and checkpoints
// go through run; the returned Result becomes the FINISH. A zero Result
// means Cancelled() if ctx was cancelled and Done("") otherwise; a Result
// with only some fields set is completed (a missing status is done, or
// waiting when Waiting is set; a missing termination natural_end,
// suspended or error accordingly). A panic is recovered and reported as
// Transient("panic", …).
type Handler interface {
	HandleRun(ctx context.Context, run *Run) Result
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, run *Run) Result

// HandleRun calls f(ctx, run).
func (f HandlerFunc) HandleRun(ctx context.Context, run *Run) Result { return f(ctx, run) }
