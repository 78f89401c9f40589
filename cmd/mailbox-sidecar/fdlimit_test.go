package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// A sidecar out of file descriptors keeps running: the listener waits
// and retries, open connections go on, and new ones are served once
// descriptors free (found by review: fasthttp took EMFILE as permanent,
// and the listener's end shut the whole sidecar down). The process runs
// with a limit of 64 descriptors; the test holds 100 connections.
func TestASidecarOutOfFileDescriptorsKeepsServing(t *testing.T) {
	n := newNode(t)
	p := start(t, "/bin/sh", "-c", `ulimit -n 64 && exec "$0" "$@"`, sidecarBin, "serve", "--data-dir", n.data,
		"--api-socket", n.api, "--agent-socket", n.agent, "--log-level", "debug")
	c := n.ready(t)
	var held []net.Conn
	defer func() {
		for _, nc := range held {
			nc.Close()
		}
	}()
	for range 100 {
		nc, err := net.Dial("unix", n.api)
		if err != nil {
			break // the kernel's backlog is full too
		}
		held = append(held, nc)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.out.String(), "too many open files") {
		if time.Now().After(deadline) {
			t.Fatalf("no accept failure after %d connections; output:\n%s", len(held), p.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // fasthttp gave up on the first such error
	select {
	case <-p.done:
		t.Fatalf("the sidecar exited when its descriptors ran out; output:\n%s", p.out.String())
	default:
	}
	if !strings.Contains(p.out.String(), "accept failed for want of a resource") {
		t.Fatalf("no warning of the retried accepts; output:\n%s", p.out.String())
	}
	for _, nc := range held {
		nc.Close()
	}
	held = nil
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.waitReady(ctx); err != nil {
		t.Fatalf("not ready once the descriptors were free again: %v", err)
	}
	resp, err := c.send(ctx, http.MethodGet, "/metrics", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "mailbox_http_accept_retries_total ") || strings.Contains(string(body), "mailbox_http_accept_retries_total 0\n") {
		var lines []string
		for _, l := range strings.Split(string(body), "\n") {
			if strings.Contains(l, "accept") {
				lines = append(lines, l)
			}
		}
		t.Fatalf("/metrics without a count of the retried accepts:\n%s", strings.Join(lines, "\n"))
	}
}
