package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// runDemo is `demo`: the sidecar on the embedded default (Badger in a
// local folder, sockets in a local folder), the example echo agent as a
// real subprocess, a foreground run streamed over the real API socket, a
// few background runs on two threads, and the records they left.
func runDemo(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "./demo", "folder for the demo's data and sockets (emptied first)")
	agentBin := fs.String("agent", "", "echo agent binary (default: echo-agent next to this binary, then on PATH)")
	verbose := fs.Bool("v", false, "show the sidecar's and the agent's logs")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if err := demo(*dir, *agentBin, *verbose, stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "demo failed: %v\n", err)
		return 1
	}
	return 0
}

func findAgent(explicit string) (string, error) {
	if explicit != "" {
		return explicit, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "echo-agent")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("echo-agent")
	if err != nil {
		return "", errors.New("echo-agent binary not found next to mailbox-sidecar or on PATH; build it (make demo does) or pass --agent")
	}
	return p, nil
}

func demo(dir, agentBin string, verbose bool, out, stderr io.Writer) error {
	agentPath, err := findAgent(agentBin)
	if err != nil {
		return err
	}
	var cfg serveConfig
	serveFlags(flag.NewFlagSet("demo", flag.ContinueOnError), &cfg)
	cfg.DataDir = filepath.Join(dir, "data")
	cfg.APISocket = filepath.Join(dir, "run", "api.sock")
	cfg.AgentSocket = filepath.Join(dir, "run", "agent.sock")
	cfg.ShutdownGrace = 5 * time.Second
	if errs := cfg.validate(); len(errs) > 0 {
		return errors.Join(errs...)
	}
	logw := io.Discard
	if verbose {
		logw = stderr
	}
	log := newLogger(logw, "info", "text")
	if err := emptyDemoData(cfg, log); err != nil {
		return err
	}
	step := func(format string, args ...any) { fmt.Fprintf(out, "\n== "+format+"\n", args...) }

	step("starting the sidecar: data in %s, sockets in %s", cfg.DataDir, filepath.Dir(cfg.APISocket))
	s, err := startSidecar(cfg, log)
	if err != nil {
		return err
	}
	defer s.shutdown(cfg.ShutdownGrace)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := s.recover(ctx); err != nil {
		return err
	}

	step("starting the example agent: %s", agentPath)
	agent := exec.Command(agentPath, "--socket", cfg.AgentSocket, "--max-runs", "4")
	agent.Stdout, agent.Stderr = io.Discard, io.Discard
	if verbose {
		agent.Stdout, agent.Stderr = stderr, stderr
	}
	if err := agent.Start(); err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	defer func() {
		_ = agent.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = agent.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = agent.Process.Kill()
			<-done
		}
	}()
	api := newAPIClient(cfg.APISocket)
	for s.hub.Connections() == 0 {
		if ctx.Err() != nil {
			return errors.New("the agent did not connect within a minute")
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Fprintf(out, "agent connected (%d run slots)\n", s.hub.Capacity())

	step("foreground run on thread demo-1, streamed (POST /v1/threads/demo-1/runs)")
	body := map[string]any{"messages": []any{textMessage("hello, sidecar")}}
	resp, err := api.send(ctx, http.MethodPost, "/v1/threads/demo-1/runs", body, http.Header{"Accept": {"text/event-stream"}})
	if err != nil {
		return err
	}
	var fgDispatch, fgRun string
	err = readSSE(resp.Body, func(ev sseEvent) bool {
		fmt.Fprintf(out, "  %4s  %s\n", ev.ID, describeEvent(ev))
		if ev.Event == "submitted" {
			fgDispatch = jsonField(ev.Data, "dispatch_id")
			fgRun = jsonField(ev.Data, "run_id")
		}
		return true
	})
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("event stream: %w", err)
	}

	step("background runs on threads demo-1 and demo-2 (POST /v1/threads/{id}/dispatches)")
	var ids []string
	for i, job := range []struct{ thread, text string }{
		{"demo-1", "second message on demo-1"},
		{"demo-2", "first message on demo-2"},
		{"demo-1", "third message on demo-1"},
		{"demo-2", "sleep 200"},
	} {
		var res map[string]any
		if err := api.do(ctx, http.MethodPost, "/v1/threads/"+job.thread+"/dispatches", map[string]any{"messages": []any{textMessage(job.text)}}, &res); err != nil {
			return err
		}
		fmt.Fprintf(out, "  %d. %-7s %-28q -> dispatch %v (%v)\n", i+1, job.thread, job.text, res["dispatch_id"], res["status"])
		ids = append(ids, fmt.Sprint(res["dispatch_id"]))
	}
	fmt.Fprintln(out, "  waiting for them to finish (one run at a time per thread) …")
	for _, id := range ids {
		for {
			var d map[string]any
			if err := api.do(ctx, http.MethodGet, "/v1/dispatches/"+id, nil, &d); err != nil {
				return err
			}
			if st := fmt.Sprint(d["status"]); st != "queued" && st != "claimed" {
				fmt.Fprintf(out, "  dispatch %s: %s, response %q\n", id, st, d["run_response"])
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("dispatch %s did not finish", id)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	c := &ctl{api: api, stdout: out, stderr: stderr, timeout: 10 * time.Second}
	step("the foreground run's dispatch record (GET /v1/dispatches/%s)", fgDispatch)
	if err := c.show([]string{"dispatch", fgDispatch}); err != nil {
		return err
	}
	step("its run record (GET /v1/runs/%s)", fgRun)
	if err := c.show([]string{"run", fgRun}); err != nil {
		return err
	}
	step("thread demo-1: dispatches and message log")
	if err := c.show([]string{"thread", "demo-1"}); err != nil {
		return err
	}
	step("done; shutting down (try it yourself: mailbox-sidecar serve, then mailbox-sidecar ctl -h)")
	return nil
}

// emptyDemoData removes the demo's data directory, unless a sidecar is
// using it: the store is opened first, so its lock refuses a directory
// another process holds, as serve does. Removing the files under a
// running sidecar would lose its acknowledged work, and the fresh lock
// file would then let the demo open a second store on the same folder.
// A directory that does not open for another reason is removed anyway.
func emptyDemoData(cfg serveConfig, log *slog.Logger) error {
	if _, err := os.Stat(cfg.DataDir); err == nil {
		st, err := openStore(cfg, log.With("component", "store"))
		switch {
		case errors.Is(err, engine.ErrDataDirInUse):
			return fmt.Errorf("%w; the demo empties its folder first, so it leaves this one alone (choose another --dir)", err)
		case err == nil:
			if err := st.Close(); err != nil {
				log.Warn("close the old demo store", "err", err)
			}
		}
	}
	return os.RemoveAll(cfg.DataDir)
}

// jsonField returns a top-level string field of a JSON object.
func jsonField(data, key string) string {
	var m map[string]any
	_ = json.Unmarshal([]byte(strings.TrimSpace(data)), &m)
	v, _ := m[key].(string)
	return v
}
