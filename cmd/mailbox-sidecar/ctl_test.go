package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// startInProcess runs a sidecar in this process on n (no agent), with
// extra serve flags, until the test ends, and returns once it is ready.
func startInProcess(t *testing.T, n node, extra ...string) {
	t.Helper()
	cfg, err := parseServe(append([]string{"--data-dir", n.data, "--api-socket", n.api, "--agent-socket", n.agent}, extra...), env(nil), os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	s, err := startSidecar(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.shutdown(time.Second) })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.recover(ctx); err != nil {
		t.Fatal(err)
	}
}

// ctlOut runs `ctl --socket API args…` and returns its stdout; a non-zero
// exit fails the test.
func ctlOut(t *testing.T, n node, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	if code := run(append([]string{"ctl", "--socket", n.api}, args...), env(nil), &out, &errb); code != 0 {
		t.Fatalf("ctl %v: exit %d: %s", args, code, errb.String())
	}
	return out.String()
}

// messageRows counts the rows of the messages table in `show thread`.
func messageRows(out string) int {
	_, table, _ := strings.Cut(out, "\nmessages:\n")
	rows := 0
	for _, line := range strings.Split(table, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] != "SEQ" && !strings.HasPrefix(line, "(") {
			rows++
		}
	}
	return rows
}

// TestCtlShowThreadSaysWhenMessagesAreLeftOut: `show thread` of a thread
// with more messages than one page (1000) shows the first page and says
// where the rest starts, in the table and in --json; --after-seq shows
// the rest.
func TestCtlShowThreadSaysWhenMessagesAreLeftOut(t *testing.T) {
	n := newNode(t)
	startInProcess(t, n)
	msgs := make([]any, 1003)
	for i := range msgs {
		msgs[i] = textMessage(fmt.Sprintf("m%d", i+1))
	}
	c := newAPIClient(n.api)
	if err := c.do(context.Background(), http.MethodPost, "/v1/threads/t1/dispatches", map[string]any{"messages": msgs}, nil); err != nil {
		t.Fatal(err)
	}

	out := ctlOut(t, n, "show", "thread", "t1")
	if rows := messageRows(out); rows != 1000 {
		t.Fatalf("show thread: %d message rows, want the first page of 1000", rows)
	}
	if !strings.Contains(out, "show thread --after-seq 1000 t1") {
		t.Fatalf("show thread of 1003 messages does not say that more follow seq 1000; its end:\n%s", out[len(out)-200:])
	}
	out = ctlOut(t, n, "show", "thread", "--after-seq", "1000", "t1")
	if rows := messageRows(out); rows != 3 || !strings.Contains(out, "m1003") || strings.Contains(out, "--after-seq") {
		t.Fatalf("show thread --after-seq 1000: %d rows, want the last 3 and no note:\n%s", rows, out)
	}

	var js struct {
		Messages             []json.RawMessage `json:"messages"`
		MessagesNextAfterSeq *uint64           `json:"messages_next_after_seq"`
	}
	if err := json.Unmarshal([]byte(ctlOut(t, n, "--json", "show", "thread", "t1")), &js); err != nil {
		t.Fatal(err)
	}
	if len(js.Messages) != 1000 || js.MessagesNextAfterSeq == nil || *js.MessagesNextAfterSeq != 1000 {
		t.Fatalf("show thread --json: %d messages, messages_next_after_seq %v; want 1000 and 1000", len(js.Messages), js.MessagesNextAfterSeq)
	}
}

// TestTruncateKeepsUTF8: truncating never cuts a character in two, and
// the result is at most n characters.
func TestTruncateKeepsUTF8(t *testing.T) {
	for _, s := range []string{"héllo wörld, ça va très bien", "日本語のテキストです", "🙂🙂🙂🙂🙂🙂", "plain ascii text"} {
		for n := 2; n <= 12; n++ {
			got := truncate(s, n)
			if !utf8.ValidString(got) {
				t.Fatalf("truncate(%q, %d) = %q: not valid UTF-8", s, n, got)
			}
			if c := utf8.RuneCountInString(got); c > n {
				t.Fatalf("truncate(%q, %d) = %q: %d characters", s, n, got, c)
			}
			if utf8.RuneCountInString(s) <= n && got != s {
				t.Fatalf("truncate(%q, %d) = %q: a string that fits is cut", s, n, got)
			}
		}
	}
	if got := truncate("a\nb", 10); got != "a b" {
		t.Fatalf("truncate keeps a newline: %q", got)
	}
}

// ctl reaches the TCP listener with --addr and the bearer token of
// MAILBOX_SIDECAR_AUTH_TOKEN; without a token it refuses before sending,
// and a wrong token is the listener's 401 (exit 1).
func TestCtlReachesTheTCPListenerWithItsToken(t *testing.T) {
	n := newNode(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	const token = "0123456789abcdef-token"
	startInProcess(t, n, "--http-addr", addr, "--auth-token", token)
	ctlTCP := func(tok string, args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(append([]string{"ctl", "--socket", "/nonexistent/api.sock"}, args...),
			env(map[string]string{"MAILBOX_SIDECAR_CTL_ADDR": addr, "MAILBOX_SIDECAR_AUTH_TOKEN": tok}), &out, &errb)
		return code, out.String(), errb.String()
	}
	if code, out, errs := ctlTCP(token, "submit", "--background", "tcp-thread", "hello"); code != 0 || !strings.Contains(out, "queued") {
		t.Fatalf("submit over TCP: exit %d, %q %q", code, out, errs)
	}
	if code, out, errs := ctlTCP(token, "show", "thread", "tcp-thread"); code != 0 || !strings.Contains(out, "hello") {
		t.Fatalf("show over TCP: exit %d, %q %q", code, out, errs)
	}
	if code, _, errs := ctlTCP("", "check"); code != 2 || strings.Contains(errs, "usage:") || !strings.Contains(errs, "MAILBOX_SIDECAR_AUTH_TOKEN") {
		t.Fatalf("--addr without a token: exit %d, %q; want 2 naming the variable", code, errs)
	}
	if code, _, errs := ctlTCP("wrong-token-0123456789", "check"); code != 1 || !strings.Contains(errs, "401") {
		t.Fatalf("a wrong token: exit %d, %q; want 1 with the 401", code, errs)
	}
	var out, errb bytes.Buffer
	if code := run([]string{"ctl", "--addr", "no-port", "check"}, env(map[string]string{"MAILBOX_SIDECAR_AUTH_TOKEN": token}), &out, &errb); code != 2 || !strings.Contains(errb.String(), "host:port") {
		t.Fatalf("--addr without a port: exit %d, %q", code, errb.String())
	}
}

// /readyz checks that the agent socket's file is still the one bound:
// removed, agents cannot connect and the sidecar is not ready (found by
// review: agent_socket stayed true).
func TestReadyzSaysWhenTheAgentSocketIsGone(t *testing.T) {
	n := newNode(t)
	startInProcess(t, n)
	c := newAPIClient(n.api)
	ctx := context.Background()
	var ready map[string]any
	if err := c.do(ctx, http.MethodGet, "/readyz", nil, &ready); err != nil {
		t.Fatalf("ready before: %v", err)
	}
	if err := os.Remove(n.agent); err != nil {
		t.Fatal(err)
	}
	err := c.do(ctx, http.MethodGet, "/readyz", nil, nil)
	var ae *apiError
	if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable || !strings.Contains(ae.Message, "agent_socket") {
		t.Fatalf("/readyz after the agent socket was removed: %v; want 503 naming agent_socket", err)
	}
}
