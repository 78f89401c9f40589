package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"
)

const ctlUsage = `usage: mailbox-sidecar ctl [--socket PATH | --addr HOST:PORT] [--json] [--timeout D] <command> [flags] [args]

commands:
  submit [--background] [--agent ID] [--key K] THREAD TEXT
                             submit a run; streams its events (or prints the queued dispatch)
  send [--expected-run ID] THREAD TEXT
                             send a message: live to the running run, else queued
  show dispatch ID | run ID | thread [--after-seq N] ID
                             show a dispatch, a run, or a thread (its first 1000
                             dispatches, and 1000 messages from seq N+1)
  list [--status S,S] [--limit N] [--offset N] THREAD
                             list a thread's dispatches
  dead-letters [--limit N] [--offset N]            list dead letters, newest first
  dead-letters show ID | requeue ID                show one, or put it back in the queue
  cancel ID                  cancel by dispatch, run or thread id (a thread id
                             cancels its running run only, its queued work
                             stays: interrupt supersedes that too); "nothing
                             to cancel" (exit 0) when the id names nothing
                             running or queued, a typo included
  interrupt THREAD           supersede the thread's queued work and cancel its active run
  decide RUN CALL_ID RESUME_JSON
                             send a tool-call decision to a running run
  check                      exit 0 when ready, 1 when not ready, 3 when unreachable

The socket defaults to $MAILBOX_SIDECAR_API_SOCKET or ./run/api.sock.
--addr (or $MAILBOX_SIDECAR_CTL_ADDR) reaches the TCP listener (serve's
--http-addr) instead, with the bearer token of $MAILBOX_SIDECAR_AUTH_TOKEN
(serve's --auth-token; --auth-token here too, but a flag shows in ps).
Exit status: 0 ok, 1 the sidecar answered with an error (or a submit's run
failed or was cancelled, or its stream ended before its run_finish), 2 bad
usage, 3 sidecar unreachable.
`

// ctl holds the CLI's global options.
type ctl struct {
	api     *apiClient
	json    bool
	stdout  io.Writer
	stderr  io.Writer
	timeout time.Duration
}

// runCtl is `ctl`.
func runCtl(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, ctlUsage) }
	socket := getenv(envPrefix + "API_SOCKET")
	if socket == "" {
		socket = "./run/api.sock"
	}
	fs.StringVar(&socket, "socket", socket, "API socket")
	addr := fs.String("addr", getenv(envPrefix+"CTL_ADDR"), "TCP listener host:port, instead of the socket")
	token := fs.String("auth-token", getenv(envPrefix+"AUTH_TOKEN"), "bearer token of the TCP listener")
	asJSON := fs.Bool("json", false, "print JSON instead of tables")
	timeout := fs.Duration("timeout", 30*time.Second, "timeout of one request (streams are not limited)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprint(stderr, ctlUsage)
		return 2
	}
	api := newAPIClient(socket)
	if *addr != "" {
		if _, _, err := net.SplitHostPort(*addr); err != nil {
			fmt.Fprintf(stderr, "mailbox-sidecar ctl: --addr %q: want host:port (%v)\n", *addr, err)
			return 2
		}
		if *token == "" {
			fmt.Fprintf(stderr, "mailbox-sidecar ctl: --addr needs the listener's bearer token: set %sAUTH_TOKEN (or --auth-token)\n", envPrefix)
			return 2
		}
		api = newTCPClient(*addr, *token)
	}
	c := &ctl{api: api, json: *asJSON, stdout: stdout, stderr: stderr, timeout: *timeout}
	err := c.run(fs.Arg(0), fs.Args()[1:])
	var ue usageError
	var ae *apiError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "mailbox-sidecar ctl: %v\n\n%s", err, ctlUsage)
		return 2
	case errors.As(err, &ae):
		fmt.Fprintf(stderr, "mailbox-sidecar ctl: %v\n", err)
		return 1
	case errors.Is(err, errNotReady), errors.Is(err, errStreamEnded), errors.Is(err, errRunFailed):
		fmt.Fprintf(stderr, "mailbox-sidecar ctl: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "mailbox-sidecar ctl: %v\n", err)
	return 3
}

type usageError string

func (e usageError) Error() string { return string(e) }

var errNotReady = errors.New("sidecar not ready")

// errRunFailed is a submitted run that did not complete: failed (perhaps
// to be retried) or cancelled.
var errRunFailed = errors.New("the run did not complete")

// errStreamEnded is a run's event stream that ended before its run_finish.
var errStreamEnded = errors.New("the event stream ended before run_finish")

func (c *ctl) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.timeout)
}

// sub parses a subcommand's flags and checks its argument count.
func sub(name string, args []string, nargs int, declare func(*flag.FlagSet)) ([]string, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if declare != nil {
		declare(fs)
	}
	if err := fs.Parse(args); err != nil {
		return nil, usageError(fmt.Sprintf("%s: %v", name, err))
	}
	if fs.NArg() != nargs {
		return nil, usageError(fmt.Sprintf("%s takes %d argument(s), got %d", name, nargs, fs.NArg()))
	}
	return fs.Args(), nil
}

func (c *ctl) run(cmd string, args []string) error {
	switch cmd {
	case "submit":
		return c.submit(args)
	case "send":
		return c.send(args)
	case "show":
		return c.show(args)
	case "list":
		return c.list(args)
	case "dead-letters":
		return c.deadLetters(args)
	case "cancel":
		a, err := sub(cmd, args, 1, nil)
		if err != nil {
			return err
		}
		return c.post("/v1/cancel/"+url.PathEscape(a[0]), nil, func(m map[string]any) {
			if m["cancelled"] == true {
				fmt.Fprintln(c.stdout, "cancelled")
			} else {
				fmt.Fprintln(c.stdout, "nothing to cancel")
			}
		})
	case "interrupt":
		a, err := sub(cmd, args, 1, nil)
		if err != nil {
			return err
		}
		return c.post("/v1/threads/"+url.PathEscape(a[0])+"/interrupt", struct{}{}, func(m map[string]any) {
			active := "none"
			if d, ok := m["active_dispatch"].(map[string]any); ok {
				active = fmt.Sprintf("dispatch %v (run %v), cancelled", d["dispatch_id"], d["run_id"])
			}
			fmt.Fprintf(c.stdout, "epoch %v  superseded %v queued  active %s\n", m["new_dispatch_epoch"], m["superseded_count"], active)
		})
	case "decide":
		a, err := sub(cmd, args, 3, nil)
		if err != nil {
			return err
		}
		if !json.Valid([]byte(a[2])) {
			return usageError("decide: RESUME_JSON is not valid JSON")
		}
		return c.post("/v1/runs/"+url.PathEscape(a[0])+"/decisions", map[string]any{"tool_call_id": a[1], "resume": json.RawMessage(a[2])}, func(m map[string]any) {
			if m["delivered"] == true {
				fmt.Fprintln(c.stdout, "delivered")
			} else {
				fmt.Fprintln(c.stdout, "not delivered (no running run of that id waits for that call)")
			}
		})
	case "check":
		return c.check(args)
	}
	return usageError(fmt.Sprintf("unknown command %q", cmd))
}

func textMessage(text string) map[string]any {
	return map[string]any{"role": "user", "content": text}
}

func (c *ctl) submit(args []string) error {
	var background bool
	var agent, key string
	a, err := sub("submit", args, 2, func(fs *flag.FlagSet) {
		fs.BoolVar(&background, "background", false, "queue the run instead of streaming it")
		fs.StringVar(&agent, "agent", "", "agent id")
		fs.StringVar(&key, "key", "", "idempotency key")
	})
	if err != nil {
		return err
	}
	body := map[string]any{"messages": []any{textMessage(a[1])}}
	if agent != "" {
		body["agent_id"] = agent
	}
	h := http.Header{}
	if key != "" {
		h.Set("Idempotency-Key", key)
	}
	thread := url.PathEscape(a[0])
	if background {
		ctx, cancel := c.ctx()
		defer cancel()
		resp, err := c.api.send(ctx, http.MethodPost, "/v1/threads/"+thread+"/dispatches", body, h)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		return c.printAnswer(resp.Body, func(m map[string]any) {
			fmt.Fprintf(c.stdout, "dispatch %v  run %v  thread %v  %v\n", m["dispatch_id"], m["run_id"], m["thread_id"], m["status"])
		})
	}
	h.Set("Accept", "text/event-stream")
	resp, err := c.api.send(context.Background(), http.MethodPost, "/v1/threads/"+thread+"/runs", body, h)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := c.stream(resp.Body); err != nil {
		if errors.Is(err, errStreamEnded) {
			return fmt.Errorf("%w (the run goes on or stays queued; follow it with GET /v1/threads/%s/events)", err, thread)
		}
		return err
	}
	return nil
}

// stream prints an SSE stream until it ends. A stream that ends before
// the run's run_finish (the sidecar shut down, or this client fell
// behind the event buffer and was disconnected) is errStreamEnded: the
// run was not seen to finish.
func (c *ctl) stream(r io.Reader) error {
	finished, failed := false, ""
	err := readSSE(r, func(ev sseEvent) bool {
		if ev.Event == "run_finish" {
			finished = true
			failed = runFailure(ev)
		}
		if c.json {
			out, _ := json.Marshal(map[string]any{"id": ev.ID, "event": ev.Event, "data": json.RawMessage(ev.Data)})
			fmt.Fprintln(c.stdout, string(out))
		} else {
			fmt.Fprintf(c.stdout, "%4s  %s\n", ev.ID, describeEvent(ev))
		}
		return true
	})
	if !finished {
		// Also a stream cut mid-event (the sidecar killed): the run was
		// accepted (its stream had begun), so this is no "unreachable"
		// (exit 3), which a retrying script takes for a submit that never
		// arrived, and submits again (found by review).
		if err != nil {
			return fmt.Errorf("%w (%v)", errStreamEnded, err)
		}
		return errStreamEnded
	}
	if failed != "" {
		return fmt.Errorf("%w: %s", errRunFailed, failed)
	}
	return nil
}

// runFailure is what a run_finish event says of a run that did not
// complete (an error termination: failed, or failed for now with a retry
// at retry_at; a cancelled one), or "": a script must tell those from a
// run that completed by ctl's exit status (found by review: it was 0).
func runFailure(ev sseEvent) string {
	var m struct {
		Termination struct {
			Type  string          `json:"type"`
			Value json.RawMessage `json:"value"`
		} `json:"termination"`
		RetryAt int64 `json:"retry_at"`
	}
	if decodeJSON([]byte(ev.Data), &m) != nil {
		return ""
	}
	switch m.Termination.Type {
	case "error":
		msg := "it failed: " + string(m.Termination.Value)
		if m.RetryAt > 0 {
			msg += fmt.Sprintf(" (it is retried at %s)", time.UnixMilli(m.RetryAt).UTC().Format(time.RFC3339))
		}
		return msg
	case "cancelled":
		return "it was cancelled"
	}
	return ""
}

func (c *ctl) send(args []string) error {
	var expected string
	a, err := sub("send", args, 2, func(fs *flag.FlagSet) {
		fs.StringVar(&expected, "expected-run", "", "deliver only to this run")
	})
	if err != nil {
		return err
	}
	body := map[string]any{"messages": []any{textMessage(a[1])}}
	if expected != "" {
		body["expected_run_id"] = expected
	}
	return c.post("/v1/threads/"+url.PathEscape(a[0])+"/messages", body, func(m map[string]any) {
		fmt.Fprintf(c.stdout, "%v  dispatch %v  run %v  thread %v  %v\n", m["delivery"], m["dispatch_id"], m["run_id"], m["thread_id"], m["status"])
	})
}

// post sends a POST and prints its answer (with table, as printAnswer).
func (c *ctl) post(path string, body any, table func(map[string]any)) error {
	ctx, cancel := c.ctx()
	defer cancel()
	resp, err := c.api.send(ctx, http.MethodPost, path, body, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return c.printAnswer(resp.Body, table)
}

// printAnswer prints a JSON answer: indented JSON with --json or without
// a table printer, else the table printer's rendering.
func (c *ctl) printAnswer(r io.Reader, table func(map[string]any)) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	var m map[string]any
	if err := decodeJSON(data, &m); err != nil {
		return fmt.Errorf("answer is not a JSON object: %w", err)
	}
	if c.json || table == nil {
		out, _ := json.MarshalIndent(m, "", "  ")
		fmt.Fprintln(c.stdout, string(out))
		return nil
	}
	table(m)
	return nil
}

func (c *ctl) get(path string) (map[string]any, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	var m map[string]any
	err := c.api.do(ctx, http.MethodGet, path, nil, &m)
	return m, err
}

// showPage is how many dispatches and messages `show thread` shows (the
// API's largest page).
const showPage = 1000

func (c *ctl) show(args []string) error {
	if len(args) > 0 && args[0] == "thread" {
		return c.showThread(args[1:])
	}
	a, err := sub("show", args, 2, nil)
	if err != nil {
		return err
	}
	id := url.PathEscape(a[1])
	switch a[0] {
	case "dispatch":
		m, err := c.get("/v1/dispatches/" + id)
		if err != nil {
			return err
		}
		return c.record(m, []string{"dispatch_id", "thread_id", "run_id", "status", "attempt_count", "max_attempts", "dispatch_epoch", "available_at", "claimed_by", "lease_until", "run_status", "run_response", "last_error", "requeued_as", "created_at", "updated_at", "completed_at"})
	case "run":
		m, err := c.get("/v1/runs/" + id)
		if err != nil {
			return err
		}
		return c.record(m, []string{"run_id", "thread_id", "agent_id", "status", "termination_reason", "final_output", "dispatch_id", "session_id", "waiting", "steps", "input_tokens", "output_tokens", "created_at", "started_at", "finished_at"})
	}
	return usageError(fmt.Sprintf("show %q: want dispatch, run or thread", a[0]))
}

// showThread is `show thread [--after-seq N] ID`: the thread's first
// showPage dispatches and showPage messages from seq N+1. What is left
// out is said: a note under each table, or dispatches_next_offset and
// messages_next_after_seq (null when nothing is) with --json.
func (c *ctl) showThread(args []string) error {
	var after uint64
	a, err := sub("show thread", args, 1, func(fs *flag.FlagSet) {
		fs.Uint64Var(&after, "after-seq", 0, "show the messages after this seq")
	})
	if err != nil {
		return err
	}
	thread := a[0]
	id := url.PathEscape(thread)
	ds, err := c.get(fmt.Sprintf("/v1/threads/%s/dispatches?limit=%d", id, showPage))
	if err != nil {
		return err
	}
	ms, err := c.get(fmt.Sprintf("/v1/threads/%s/messages?limit=%d&after_seq=%d", id, showPage, after))
	if err != nil {
		return err
	}
	if c.json {
		out, _ := json.MarshalIndent(map[string]any{
			"dispatches": ds["items"], "dispatches_next_offset": ds["next_offset"],
			"messages": ms["items"], "messages_next_after_seq": ms["next_offset"],
		}, "", "  ")
		fmt.Fprintln(c.stdout, string(out))
		return nil
	}
	fmt.Fprintln(c.stdout, "dispatches:")
	c.dispatchTable(ds, func(next json.Number) string {
		return fmt.Sprintf("mailbox-sidecar ctl list --offset %s %s", next, thread)
	})
	fmt.Fprintln(c.stdout, "\nmessages:")
	c.messageTable(ms)
	if next, ok := ms["next_offset"].(json.Number); ok {
		fmt.Fprintf(c.stdout, "(more messages: mailbox-sidecar ctl show thread --after-seq %s %s)\n", next, thread)
	}
	return nil
}

// record prints one record as "field  value" lines in the given order.
func (c *ctl) record(m map[string]any, fields []string) error {
	if c.json {
		out, _ := json.MarshalIndent(m, "", "  ")
		fmt.Fprintln(c.stdout, string(out))
		return nil
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 0, 2, ' ', 0)
	for _, f := range fields {
		v, ok := m[f]
		if !ok || v == nil || v == "" {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\n", f, cell(f, v))
	}
	return tw.Flush()
}

// cell renders a value for a table: times as RFC 3339, objects as JSON,
// numbers (json.Number, from decodeJSON) exactly as the answer had them.
func cell(field string, v any) string {
	switch x := v.(type) {
	case json.Number:
		if strings.HasSuffix(field, "_at") || strings.HasSuffix(field, "_until") {
			t, err := x.Int64()
			if err != nil {
				return x.String()
			}
			if t == 0 {
				return "-"
			}
			// Dispatch times are Unix milliseconds, run-record times
			// Unix seconds (as in the seed).
			if t < 1e11 {
				return time.Unix(t, 0).UTC().Format(time.RFC3339)
			}
			return time.UnixMilli(t).UTC().Format(time.RFC3339Nano)
		}
		return x.String()
	case string:
		return x
	}
	b, _ := json.Marshal(v)
	return string(b)
}

func items(m map[string]any) []map[string]any {
	raw, _ := m["items"].([]any)
	out := make([]map[string]any, 0, len(raw))
	for _, r := range raw {
		if o, ok := r.(map[string]any); ok {
			out = append(out, o)
		}
	}
	return out
}

// dispatchTable prints a page of dispatches; when more follow, a note
// (more of the next offset) says how to get them.
func (c *ctl) dispatchTable(m map[string]any, more func(next json.Number) string) {
	tw := tabwriter.NewWriter(c.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DISPATCH\tTHREAD\tRUN\tSTATUS\tATTEMPTS\tCREATED\tLAST ERROR")
	for _, d := range items(m) {
		fmt.Fprintf(tw, "%v\t%v\t%v\t%v\t%v/%v\t%s\t%s\n", d["dispatch_id"], d["thread_id"], d["run_id"], d["status"],
			cell("", d["attempt_count"]), cell("", d["max_attempts"]), cell("created_at", d["created_at"]), truncate(fmt.Sprint(orDash(d["last_error"])), 60))
	}
	tw.Flush()
	if next, ok := m["next_offset"].(json.Number); ok {
		fmt.Fprintf(c.stdout, "(more: %s)\n", more(next))
	}
}

// offsetHint is the note of list and dead-letters when more follow.
func offsetHint(next json.Number) string { return "--offset " + next.String() }

func (c *ctl) messageTable(m map[string]any) {
	tw := tabwriter.NewWriter(c.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tROLE\tCONTENT")
	for _, r := range items(m) {
		msg, _ := r["message"].(map[string]any)
		content := msg["content"]
		text, ok := content.(string)
		if !ok {
			b, _ := json.Marshal(content)
			text = string(b)
		}
		fmt.Fprintf(tw, "%v\t%v\t%s\n", cell("", r["seq"]), msg["role"], truncate(text, 80))
	}
	tw.Flush()
}

func orDash(v any) any {
	if v == nil || v == "" {
		return "-"
	}
	return v
}

// truncate puts s on one line and cuts it to at most n characters (not
// bytes: a multi-byte UTF-8 character is never cut in two), the last one
// "…" when something was cut.
func truncate(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if n < 1 || utf8.RuneCountInString(s) <= n {
		return s
	}
	i, kept := 0, 0
	for kept < n-1 {
		_, size := utf8.DecodeRuneInString(s[i:])
		i += size
		kept++
	}
	return s[:i] + "…"
}

func (c *ctl) list(args []string) error {
	var status string
	var limit, offset int
	a, err := sub("list", args, 1, func(fs *flag.FlagSet) {
		fs.StringVar(&status, "status", "", "statuses, comma-separated")
		fs.IntVar(&limit, "limit", 50, "page size")
		fs.IntVar(&offset, "offset", 0, "page start")
	})
	if err != nil {
		return err
	}
	q := url.Values{"limit": {fmt.Sprint(limit)}, "offset": {fmt.Sprint(offset)}}
	if status != "" {
		q.Set("status", status)
	}
	m, err := c.get("/v1/threads/" + url.PathEscape(a[0]) + "/dispatches?" + q.Encode())
	if err != nil {
		return err
	}
	if c.json {
		return c.record(m, nil)
	}
	c.dispatchTable(m, offsetHint)
	return nil
}

func (c *ctl) deadLetters(args []string) error {
	if len(args) > 0 && (args[0] == "show" || args[0] == "requeue") {
		a, err := sub("dead-letters "+args[0], args[1:], 1, nil)
		if err != nil {
			return err
		}
		if args[0] == "show" {
			return c.show([]string{"dispatch", a[0]})
		}
		return c.post("/v1/dispatches/"+url.PathEscape(a[0])+"/requeue", struct{}{}, func(m map[string]any) {
			fmt.Fprintf(c.stdout, "requeued as dispatch %v  run %v  thread %v  %v\n", m["dispatch_id"], m["run_id"], m["thread_id"], m["status"])
		})
	}
	var limit, offset int
	if _, err := sub("dead-letters", args, 0, func(fs *flag.FlagSet) {
		fs.IntVar(&limit, "limit", 50, "page size")
		fs.IntVar(&offset, "offset", 0, "page start")
	}); err != nil {
		return err
	}
	m, err := c.get(fmt.Sprintf("/v1/dead-letters?limit=%d&offset=%d", limit, offset))
	if err != nil {
		return err
	}
	if c.json {
		return c.record(m, nil)
	}
	c.dispatchTable(m, offsetHint)
	return nil
}

func (c *ctl) check(args []string) error {
	if _, err := sub("check", args, 0, nil); err != nil {
		return err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	var m map[string]any
	err := c.api.do(ctx, http.MethodGet, "/readyz", nil, &m)
	var ae *apiError
	if errors.As(err, &ae) && ae.Status == http.StatusServiceUnavailable {
		fmt.Fprintf(c.stdout, "not ready: %s\n", ae.Message)
		return errNotReady
	}
	if err != nil {
		return err
	}
	if c.json {
		return c.record(m, nil)
	}
	fmt.Fprintf(c.stdout, "ready (agent connected: %v)\n", m["agent_connected"])
	return nil
}
