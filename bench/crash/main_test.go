package crash

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
)

// Binaries built once for the package: the sidecar and the chaos agent
// (with the race detector when the tests have it, so a race in the
// sidecar under crash conditions shows in its output; see raceReports).
var (
	sidecarBin string
	agentBin   string
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "crashbin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sidecarBin = filepath.Join(dir, "mailbox-sidecar")
	agentBin = filepath.Join(dir, "chaos-agent")
	for pkg, out := range map[string]string{"../../cmd/mailbox-sidecar": sidecarBin, "./agent": agentBin} {
		args := []string{"build", "-o", out}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, pkg)...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n", pkg, err)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		writeReport()
		os.RemoveAll(dir)
		os.Exit(code)
	}))
}
