package main

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
	"strings"
	"time"
)

// apiClient speaks the client API over the API socket, or over the TCP
// listener with its bearer token.
type apiClient struct {
	http  *http.Client
	token string // sent as "Authorization: Bearer" when set (TCP)
}

// newTCPClient is an apiClient of the TCP listener at addr (host:port),
// sending token with every request.
func newTCPClient(addr, token string) *apiClient {
	c := dialingClient("tcp", addr)
	c.token = token
	return c
}

// newAPIClient is an apiClient of the API socket.
func newAPIClient(socket string) *apiClient { return dialingClient("unix", socket) }

// dialingClient is an apiClient whose connections all go to address on
// network, whatever the request's host.
func dialingClient(network, address string) *apiClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, address)
		},
		MaxIdleConnsPerHost: 4,
	}
	return &apiClient{http: &http.Client{Transport: tr}}
}

// apiError is the API's error shape.
type apiError struct {
	Status  int
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *apiError) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message)
}

// do sends a request with an optional JSON body and decodes a JSON answer
// into out (when non-nil). Non-2xx answers are *apiError.
func (c *apiClient) do(ctx context.Context, method, path string, body any, out any) error {
	resp, err := c.send(ctx, method, path, body, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if out != nil {
		if err := decodeJSON(data, out); err != nil {
			return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
		}
	}
	return nil
}

// decodeJSON is json.Unmarshal with numbers kept as json.Number: decoded
// into an interface value (map[string]any), an integer keeps every digit
// and prints as it was sent (1000000, not 1e+06; above 2^53, not rounded
// to a float64).
func decodeJSON(data []byte, out any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(out); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("invalid character after top-level value")
	}
	return nil
}

// send sends a request and returns the response; non-2xx answers are
// turned into *apiError (and the body closed).
func (c *apiClient) send(ctx context.Context, method, path string, body any, header http.Header) (*http.Response, error) {
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
	for k, v := range header {
		req.Header[k] = v
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		var e struct {
			Error apiError `json:"error"`
		}
		if json.Unmarshal(data, &e) != nil || e.Error.Code == "" {
			e.Error = apiError{Code: "http_" + resp.Status, Message: strings.TrimSpace(string(data))}
		}
		e.Error.Status = resp.StatusCode
		return nil, &e.Error
	}
	return resp, nil
}

// sseEvent is one server-sent event.
type sseEvent struct {
	ID    string
	Event string
	Data  string
}

// readSSE calls fn for every event of an SSE stream until it ends or fn
// returns false.
func readSSE(r io.Reader, fn func(sseEvent) bool) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	var ev sseEvent
	var data []string
	for sc.Scan() {
		line := sc.Text()
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
	return sc.Err()
}

// describeEvent renders an agent event for people: its type and what it
// says, not the raw JSON.
func describeEvent(ev sseEvent) string {
	var m map[string]any
	_ = decodeJSON([]byte(ev.Data), &m)
	str := func(k string) string {
		if v, ok := m[k].(string); ok {
			return v
		}
		return ""
	}
	switch ev.Event {
	case "submitted":
		return fmt.Sprintf("submitted  dispatch %s  run %s  (%s)", str("dispatch_id"), str("run_id"), str("status"))
	case "text_delta":
		return fmt.Sprintf("text       %s", str("delta"))
	case "run_start":
		return "run start"
	case "run_finish":
		t, _ := m["termination"].(map[string]any)
		typ, _ := t["type"].(string)
		if v, ok := t["value"]; ok {
			return fmt.Sprintf("run finish %s: %v", typ, v)
		}
		return "run finish " + typ
	case "tool_call_start", "tool_call_done", "tool_call_resumed":
		return fmt.Sprintf("%-10s %s %s", strings.TrimPrefix(ev.Event, "tool_call_"), str("call_id"), str("outcome"))
	case "reset":
		return "reset      (events were dropped from the buffer)"
	}
	return fmt.Sprintf("%-10s %s", ev.Event, ev.Data)
}

// waitReady polls /readyz until it answers 200 or ctx ends.
func (c *apiClient) waitReady(ctx context.Context) error {
	for {
		err := c.do(ctx, http.MethodGet, "/readyz", nil, nil)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("sidecar not ready: %w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
