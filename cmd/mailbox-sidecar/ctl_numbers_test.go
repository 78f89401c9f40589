package main

import (
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

// cannedAPI serves fixed JSON answers, by path, on a Unix socket until the
// test ends, and returns the socket's node.
func cannedAPI(t *testing.T, answers map[string]string) node {
	t.Helper()
	dir := shortDir(t)
	n := node{dir: dir, api: filepath.Join(dir, "api.sock")}
	ln, err := net.Listen("unix", n.api)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, ok := answers[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(body))
	})}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return n
}

// fieldLine reports whether out has a "field  value" line (record output).
func fieldLine(out, field, value string) bool {
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == field && f[1] == value {
			return true
		}
	}
	return false
}

// TestCtlPrintsIntegersExactly: ctl prints the integers of the API's
// answers as they are: a million is not 1e+06, and integers above 2^53
// (a uint64 epoch, token counts) keep every digit, in tables, records,
// notes and --json. Answers used to be decoded into float64.
func TestCtlPrintsIntegersExactly(t *testing.T) {
	n := cannedAPI(t, map[string]string{
		"/v1/runs/r1": `{"run_id":"r1","thread_id":"t1","agent_id":"a","status":"done","steps":1000000,
			"input_tokens":9007199254740993,"output_tokens":123456789012345678,"created_at":1700000000,"finished_at":0}`,
		"/v1/dispatches/d1": `{"dispatch_id":"d1","thread_id":"t1","run_id":"r1","status":"claimed","attempt_count":1000000,
			"max_attempts":1000001,"dispatch_epoch":18446744073709551615,"lease_until":1700000000123,"created_at":1700000000000}`,
		"/v1/threads/t1/dispatches": `{"items":[{"dispatch_id":"d1","thread_id":"t1","run_id":"r1","status":"claimed",
			"attempt_count":1000000,"max_attempts":1000001,"created_at":1700000000000}],"next_offset":9007199254740993}`,
		"/v1/threads/t1/messages": `{"items":[{"seq":1000000,"message":{"role":"user","content":"a"}},
			{"seq":9007199254740993,"message":{"role":"user","content":"b"}}],"next_offset":9007199254740993}`,
	})

	run := ctlOut(t, n, "show", "run", "r1")
	for _, c := range [][2]string{{"steps", "1000000"}, {"input_tokens", "9007199254740993"}, {"output_tokens", "123456789012345678"}, {"created_at", "2023-11-14T22:13:20Z"}, {"finished_at", "-"}} {
		if !fieldLine(run, c[0], c[1]) {
			t.Errorf("show run: no line %q %q in\n%s", c[0], c[1], run)
		}
	}
	disp := ctlOut(t, n, "show", "dispatch", "d1")
	for _, c := range [][2]string{{"attempt_count", "1000000"}, {"max_attempts", "1000001"}, {"dispatch_epoch", "18446744073709551615"}, {"lease_until", "2023-11-14T22:13:20.123Z"}} {
		if !fieldLine(disp, c[0], c[1]) {
			t.Errorf("show dispatch: no line %q %q in\n%s", c[0], c[1], disp)
		}
	}
	list := ctlOut(t, n, "list", "t1")
	if !strings.Contains(list, " 1000000/1000001 ") || !strings.Contains(list, "(more: --offset 9007199254740993)") {
		t.Errorf("list: attempts or the next offset not exact:\n%s", list)
	}
	thread := ctlOut(t, n, "show", "thread", "t1")
	if !strings.Contains(thread, "\n1000000 ") || !strings.Contains(thread, "\n9007199254740993 ") || !strings.Contains(thread, "--after-seq 9007199254740993 t1") {
		t.Errorf("show thread: seqs or the next seq not exact:\n%s", thread)
	}
	js := ctlOut(t, n, "--json", "show", "run", "r1")
	if !strings.Contains(js, `"input_tokens": 9007199254740993`) || !strings.Contains(js, `"steps": 1000000`) {
		t.Errorf("show run --json: integers not exact:\n%s", js)
	}
	js = ctlOut(t, n, "--json", "show", "thread", "t1")
	if !strings.Contains(js, `"messages_next_after_seq": 9007199254740993`) || !strings.Contains(js, `"seq": 9007199254740993`) {
		t.Errorf("show thread --json: integers not exact:\n%s", js)
	}
}
