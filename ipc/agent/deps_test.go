package agent

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies keeps the SDK light: an agent author importing it pulls
// in the standard library, package ipc and the JSON and UUID libraries,
// nothing else (no Badger, no metrics, not the engine).
func TestDependencies(t *testing.T) {
	t.Parallel()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	out, err := exec.Command(goBin, "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	const self = "github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
	allowed := func(p string) bool {
		switch p {
		case self, "github.com/mailbox-sidecar/mailbox-sidecar/ipc", "github.com/google/uuid", "github.com/goccy/go-json":
			return true
		}
		return strings.HasPrefix(p, "github.com/goccy/go-json/")
	}
	var sawSelf bool
	for _, p := range strings.Fields(string(out)) {
		sawSelf = sawSelf || p == self
		if !allowed(p) {
			t.Errorf("package agent depends on %s", p)
		}
	}
	if !sawSelf {
		t.Fatalf("go list output does not list the package itself:\n%s", out)
	}
}
