package crash

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// api speaks the client API (spec/http.md) over the API socket with
// net/http (fasthttp's client cannot read an endless stream).
type api struct {
	tr   *http.Transport
	hc   *http.Client
	node string // the sidecar it speaks to (cluster.node)
}

func newAPI(socket, node string) *api {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConnsPerHost: 32,
		IdleConnTimeout:     5 * time.Second,
	}
	return &api{tr: tr, hc: &http.Client{Transport: tr}, node: node}
}

// close drops idle connections (their goroutines end).
func (a *api) close() { a.tr.CloseIdleConnections() }

// apiError is a non-2xx answer: {"error":{"code","message"}}.
type apiError struct {
	Status  int
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *apiError) Error() string { return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message) }

// statusOf is the HTTP status of an *apiError, 0 for other errors.
func statusOf(err error) int {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}

// send sends a request with an optional JSON body; a non-2xx answer is an
// *apiError (its body consumed).
func (a *api) send(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://sidecar"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		var e struct {
			Error apiError `json:"error"`
		}
		if json.Unmarshal(data, &e) != nil || e.Error.Code == "" {
			e.Error = apiError{Code: "http", Message: strings.TrimSpace(string(data))}
		}
		e.Error.Status = resp.StatusCode
		return nil, &e.Error
	}
	return resp, nil
}

// do sends a request and decodes a JSON answer into out (when non-nil).
func (a *api) do(ctx context.Context, method, path string, body, out any) error {
	resp, err := a.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("%s %s: decode answer %q: %w", method, path, data, err)
		}
	}
	return nil
}

// get is do with GET and a per-request timeout.
func (a *api) get(path string, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return a.do(ctx, http.MethodGet, path, nil, out)
}

// readiness is GET /readyz: 200 and whether an agent is connected.
func (a *api) readiness(ctx context.Context) (ready, agent bool) {
	resp, err := a.send(ctx, http.MethodGet, "/readyz", nil)
	if err != nil {
		return false, false
	}
	defer resp.Body.Close()
	var r struct {
		AgentConnected bool `json:"agent_connected"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&r)
	return true, r.AgentConnected
}

// message is a message in a request body.
type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func userText(text string) []message { return []message{{Role: "user", Content: text}} }

// submitResult is the answer of a submit and the data of `submitted`.
type submitResult struct {
	DispatchID string `json:"dispatch_id"`
	RunID      string `json:"run_id"`
	ThreadID   string `json:"thread_id"`
	Status     string `json:"status"`
	Delivery   string `json:"delivery"` // POST …/messages only
}

// dispatch is the part of a dispatch record the checks read.
type dispatch struct {
	DispatchID   string       `json:"dispatch_id"`
	ThreadID     string       `json:"thread_id"`
	RunID        string       `json:"run_id"`
	Status       string       `json:"status"`
	AttemptCount int          `json:"attempt_count"`
	LastError    string       `json:"last_error"`
	Errors       []attemptErr `json:"errors"`
	LeaseUntil   int64        `json:"lease_until"`
	InstanceID   string       `json:"dispatch_instance_id"`
	RunStatus    string       `json:"run_status"`
	Termination  *termination `json:"termination"`
	RunResponse  string       `json:"run_response"`
	CompletedAt  int64        `json:"completed_at"`
}

type attemptErr struct {
	Attempt int    `json:"attempt"`
	Error   string `json:"error"`
	At      int64  `json:"at"` // Unix ms
}

type termination struct {
	Type string `json:"type"`
}

func (t *termination) String() string {
	if t == nil {
		return "<none>"
	}
	return t.Type
}

// terminal reports whether a dispatch status is terminal.
func terminal(status string) bool {
	switch status {
	case "acked", "cancelled", "superseded", "dead_letter":
		return true
	}
	return false
}

// runRecord is the part of a run record the checks read.
type runRecord struct {
	RunID             string       `json:"run_id"`
	ThreadID          string       `json:"thread_id"`
	Status            string       `json:"status"`
	DispatchID        string       `json:"dispatch_id"`
	SessionID         string       `json:"session_id"`
	TerminationReason *termination `json:"termination_reason"`
	FinalOutput       any          `json:"final_output"`
}

// messageRecord is a message of a thread log.
type messageRecord struct {
	Seq             uint64 `json:"seq"`
	MessageID       string `json:"message_id"`
	ProducedByRunID string `json:"produced_by_run_id"`
	Message         struct {
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
	} `json:"message"`
}

// text is the message's content when it is a JSON string.
func (m messageRecord) text() string {
	var s string
	_ = json.Unmarshal(m.Message.Content, &s)
	return s
}

// threadMessages reads a thread's whole log, page by page.
func (a *api) threadMessages(thread string) ([]messageRecord, error) {
	var all []messageRecord
	after := uint64(0)
	for {
		var page struct {
			Items      []messageRecord `json:"items"`
			NextOffset *uint64         `json:"next_offset"`
		}
		if err := a.get(fmt.Sprintf("/v1/threads/%s/messages?after_seq=%d&limit=1000", url.PathEscape(thread), after), &page); err != nil {
			return nil, err
		}
		all = append(all, page.Items...)
		if page.NextOffset == nil {
			return all, nil
		}
		after = *page.NextOffset
	}
}

// threadDispatches reads every dispatch of a thread, page by page.
func (a *api) threadDispatches(thread string) ([]dispatch, error) {
	var all []dispatch
	for offset := 0; ; {
		var page struct {
			Items      []dispatch `json:"items"`
			NextOffset *int       `json:"next_offset"`
		}
		if err := a.get(fmt.Sprintf("/v1/threads/%s/dispatches?limit=1000&offset=%d", url.PathEscape(thread), offset), &page); err != nil {
			return nil, err
		}
		all = append(all, page.Items...)
		if page.NextOffset == nil {
			return all, nil
		}
		offset = *page.NextOffset
	}
}

// sseEvent is one server-sent event.
type sseEvent struct {
	ID, Event, Data string
}

// readSSE calls fn for every event of a stream until it ends, fails, or
// fn returns false.
func readSSE(r io.Reader, fn func(sseEvent) bool) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var ev sseEvent
	var data []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case line == "":
			if ev.Event != "" || len(data) > 0 {
				ev.Data = strings.Join(data, "\n")
				if !fn(ev) {
					return nil
				}
			}
			ev, data = sseEvent{}, nil
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "id:"):
			ev.ID = strings.TrimSpace(line[3:])
		case strings.HasPrefix(line, "event:"):
			ev.Event = strings.TrimSpace(line[6:])
		case strings.HasPrefix(line, "data:"):
			data = append(data, strings.TrimPrefix(line[5:], " "))
		}
	}
}
