package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/internal/syncbuf"
)

// TestStartSidecarReleasesEverythingWhenAListenerFails starts a sidecar
// in process whose last listener cannot be opened (an occupied
// --http-addr or --admin-addr, an --api-socket path that is a regular
// file). startSidecar must fail and leave nothing behind: no goroutine,
// no socket file, and the data directory free for the next sidecar.
func TestStartSidecarReleasesEverythingWhenAListenerFails(t *testing.T) {
	occupied, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer occupied.Close()
	busy := occupied.Addr().String()

	var squatter net.Listener // another process's socket at the agent socket's path
	for _, tc := range []struct {
		name  string
		flags func(n node) []string
		want  string
		// noData: refused before the data directory is made (the TCP
		// ports are bound first; found by review).
		noData bool
	}{
		{"admin-addr occupied", func(node) []string { return []string{"--admin-addr", busy} }, "--admin-addr", true},
		{"http-addr occupied", func(node) []string {
			return []string{"--http-addr", busy, "--auth-token", "0123456789abcdef"}
		}, "--http-addr", true},
		{"api-socket is a file", func(n node) []string {
			if err := os.WriteFile(n.api, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return nil
		}, "API socket", true},
		{"agent-socket listened on by another process", func(n node) []string {
			if squatter, err = net.Listen("unix", n.agent); err != nil {
				t.Fatal(err)
			}
			return nil
		}, "agent socket", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer goleak.VerifyNone(t, goleak.IgnoreCurrent(),
				// As in proxy's tests: fasthttp's process-wide Date-header
				// refresher, and its worker-pool cleaner, which sleeps out
				// its idle period after Stop.
				goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.updateServerDate.func1"),
				goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*workerPool).Start.func2"))
			n := newNode(t)
			args := append([]string{"--data-dir", n.data, "--api-socket", n.api, "--agent-socket", n.agent}, tc.flags(n)...)
			cfg, err := parseServe(args, env(nil), os.Stderr)
			if err != nil {
				t.Fatal(err)
			}
			log := slog.New(slog.DiscardHandler)
			s, err := startSidecar(cfg, log)
			if err == nil {
				s.shutdown(time.Second)
				t.Fatal("startSidecar succeeded with a listener that cannot be opened")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %s", err, tc.want)
			}
			if _, err := os.Stat(n.data); tc.noData && !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the refused start made the data directory (stat: %v)", err)
			}
			if squatter != nil {
				squatter.Close() // removes its socket file
				squatter = nil
			}
			if _, err := os.Lstat(n.agent); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("agent socket file left behind (lstat: %v)", err)
			}
			if fi, err := os.Lstat(n.api); err == nil && fi.Mode()&os.ModeSocket != 0 {
				t.Errorf("API socket file left behind")
			}
			// Everything was released: the next sidecar gets the data
			// directory and the socket paths.
			os.Remove(n.api)
			cfg, err = parseServe([]string{"--data-dir", n.data, "--api-socket", n.api, "--agent-socket", n.agent}, env(nil), os.Stderr)
			if err != nil {
				t.Fatal(err)
			}
			var out syncbuf.Buffer
			s, err = startSidecar(cfg, slog.New(slog.NewTextHandler(&out, nil)))
			if err != nil {
				t.Fatalf("a sidecar after the failed start: %v", err)
			}
			s.shutdown(time.Second)
			// The startup line names the processors in use (--gomaxprocs) and the
			// version.
			v, _ := versionInfo()
			if want := fmt.Sprintf("gomaxprocs=%d", runtime.GOMAXPROCS(0)); !strings.Contains(out.String(), want) || !strings.Contains(out.String(), "version="+v) {
				t.Errorf("the log lacks %q:\n%s", want, out.String())
			}
			for _, p := range []string{n.api, n.agent} {
				if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s left behind by a clean shutdown (lstat: %v)", filepath.Base(p), err)
				}
			}
		})
	}
}

// The startup line names the addresses bound, so that a port left to the
// kernel (":0") can be found, and a line of Badger's carries no key twice
// (found by review: "admin_addr=127.0.0.1:0", and "component" twice in
// Badger's JSON lines).
func TestTheStartupLineNamesTheBoundAddresses(t *testing.T) {
	n := newNode(t)
	cfg, err := parseServe([]string{"--data-dir", n.data, "--api-socket", n.api, "--agent-socket", n.agent,
		"--admin-addr", "127.0.0.1:0", "--log-level", "debug"}, env(nil), os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	var out syncbuf.Buffer
	s, err := startSidecar(cfg, slog.New(slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	defer s.shutdown(time.Second)
	var admin string
	badgerLines := 0
	for l := range strings.Lines(out.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("not JSON: %q", l)
		}
		if m["msg"] == "sidecar listening" {
			admin, _ = m["admin_addr"].(string)
		}
		if m["subsystem"] == "badger" {
			badgerLines++
		}
		if strings.Count(l, `"component":`) > 1 {
			t.Errorf("a key twice: %s", l)
		}
	}
	if badgerLines == 0 {
		t.Errorf("no line of Badger's in:\n%s", out.String())
	}
	if _, port, err := net.SplitHostPort(admin); err != nil || port == "0" {
		t.Fatalf("admin_addr %q is not the address bound:\n%s", admin, out.String())
	}
	resp, err := http.Get("http://" + admin + "/livez")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /livez at the logged address: %s", resp.Status)
	}
}
