package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// repair on a directory whose newest value-log file went bad under three
// large messages: refused while the directory is open and, as verify is,
// before Badger would cut the file; with --allow-cut the messages the cut
// lost become system messages saying so, and the directory verifies clean.
func TestRepairPutsBackWhatAValueLogCutLost(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	opts := badgerstore.Options{Dir: dir, GCInterval: -1}
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	writeLargeMessages(t, s, "t2", "n", 3, 30<<10) // 90 KiB each: in the value log
	command := runCommand
	if code, _, errOut := command("repair", "--data-dir", dir); code != 1 || !strings.Contains(errOut, "in use") {
		t.Fatalf("repair of a directory in use: exit %d, stderr %s", code, errOut)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	flipInNewestValueLog(t, dir, `"n0-n0-`)
	code, out, errOut := command("repair", "--data-dir", dir)
	if code != 1 || !strings.Contains(errOut, "not opened") || !strings.Contains(errOut, "repair --allow-cut") {
		t.Fatalf("repair of a damaged newest value-log file: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	code, out, errOut = command("repair", "--data-dir", dir, "--allow-cut")
	if code != 0 || !strings.Contains(out, "replaced: message 1 of thread t2 (id n0)") || !strings.Contains(out, "consistent") {
		t.Fatalf("repair --allow-cut: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if code, out, errOut := command("verify", "--data-dir", dir); code != 0 {
		t.Fatalf("verify after the repair: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	code, out, errOut = command("repair", "--data-dir", dir)
	if code != 0 || !strings.Contains(out, "0 records replaced, 0 derived keys rewritten") || !strings.Contains(out, "consistent") {
		t.Fatalf("a second repair: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	s, err = badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	msgs, err := s.LoadMessages(ctx, "t2")
	if err != nil || len(msgs) != 3 {
		t.Fatalf("t2 after the repair: %d messages, %v", len(msgs), err)
	}
	if m := msgs[0]; m.MessageID != "n0" || m.Message.Role != engine.RoleSystem || !strings.Contains(string(m.Message.Content), "damaged") {
		t.Fatalf("the first message after the repair: %+v", m)
	}
	if code, _, _ := command("repair", "--data-dir", dir, "extra"); code != 2 {
		t.Fatalf("repair with an argument: exit %d, want 2", code)
	}
}

// repair when a value went bad in a value-log file below the newest: the
// message is mended, the file stays listed (repair does not rewrite it),
// the exit status is 1, and the output says why.
func TestRepairSaysWhatItLeavesInTheValueLog(t *testing.T) {
	dir, _ := stoppedStoreOfLargeMessages(t)
	file, msg := flipAMessageBelowTheNewestValueLog(t, dir, 40)
	code, out, errOut := runCommand("repair", "--data-dir", dir)
	if code != 1 || !strings.Contains(out, fmt.Sprintf("replaced: message %d of thread t1 (id m%d)", msg+1, msg)) ||
		!strings.Contains(out, "problem: "+file) || !strings.Contains(out, "which repair does not rewrite") {
		t.Fatalf("repair of a value gone bad below the newest value-log file: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
}

// writeLargeMessages appends n messages to the new thread: message i has
// the id <prefix><i> and content "<prefix><i>-" repeated times (20<<10
// times is about 80 KB: in the value log).
// stoppedStoreOfLargeMessages writes 40 messages of about 60 KB to t1 of
// a store on disk (2 MiB value-log files, GC off), closes it, and returns
// its directory and options.
func stoppedStoreOfLargeMessages(t *testing.T) (string, badgerstore.Options) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	opts := badgerstore.Options{Dir: dir, GCInterval: -1, ValueLogFileSize: 2 << 20}
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	writeLargeMessages(t, s, "t1", "m", 40, 20<<10)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return dir, opts
}

func writeLargeMessages(t *testing.T, s *badgerstore.Store, thread, prefix string, n, times int) {
	t.Helper()
	for i := range n {
		content, _ := json.Marshal(strings.Repeat(fmt.Sprintf("%s%d-", prefix, i), times))
		if _, err := s.Checkpoint(context.Background(), engine.Checkpoint{ThreadID: thread, ExpectedCount: uint64(i), CreatedAt: int64(i + 1),
			Messages: []engine.Message{{ID: fmt.Sprintf("%s%d", prefix, i), Role: "user", Content: content}}}); err != nil {
			t.Fatal(err)
		}
	}
}

// runCommand runs the binary's main with args and an empty environment.
func runCommand(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, func(string) string { return "" }, &out, &errOut)
	return code, out.String(), errOut.String()
}

// flipInNewestValueLog flips one byte of the value that starts with
// marker in the newest value-log file of dir; it returns the file and its
// bytes as written.
func flipInNewestValueLog(t *testing.T, dir, marker string) (path string, b []byte) {
	t.Helper()
	vlogs := valueLogs(dir)
	path = filepath.Join(dir, vlogs[len(vlogs)-1])
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b, []byte(marker))
	if i < 0 {
		t.Fatalf("%s not in the newest value-log file %s", marker, path)
	}
	b[i+999] ^= 0x01
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, b
}

// flipAMessageBelowTheNewestValueLog flips one byte of one of the n
// messages of writeLargeMessages in a value-log file below the newest of
// dir, and returns the file and the message's index.
func flipAMessageBelowTheNewestValueLog(t *testing.T, dir string, n int) (file string, msg int) {
	t.Helper()
	vlogs := valueLogs(dir)
	for _, name := range vlogs[:max(len(vlogs)-1, 0)] {
		path := filepath.Join(dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for m := range n {
			if i := bytes.Index(b, []byte(fmt.Sprintf(`"m%d-m%d-`, m, m))); i >= 0 {
				b[i+999] ^= 0x01
				if err := os.WriteFile(path, b, 0o600); err != nil {
					t.Fatal(err)
				}
				return name, m
			}
		}
	}
	t.Fatalf("no message in the value-log files %v below the newest", vlogs)
	return "", 0
}

// valueLogs lists the value-log files of dir, oldest first.
func valueLogs(dir string) []string {
	es, _ := os.ReadDir(dir)
	var vlogs []string
	for _, e := range es {
		if strings.HasSuffix(e.Name(), ".vlog") {
			vlogs = append(vlogs, e.Name())
		}
	}
	slices.Sort(vlogs)
	return vlogs
}

// verify lists a table block that fails its checksum, wherever the bad
// byte lies (Badger's check panicked on some: verify crashed), and repair
// refuses to run: a walk of the records misses those in such a block, and
// repair deleted the indexes and counters of messages still on the disk,
// so that the next appends overwrote them (found by review).
func TestRepairRefusesADirectoryWithADamagedTable(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir, GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		writeLargeMessages(t, s, fmt.Sprint("t", i), "m", 3, 4)
	}
	if err := s.Close(); err != nil { // flushes the records into a table
		t.Fatal(err)
	}
	tables, _ := filepath.Glob(filepath.Join(dir, "*.sst"))
	if len(tables) != 1 {
		t.Fatalf("tables: %v; want one", tables)
	}
	b, err := os.ReadFile(tables[0])
	if err != nil {
		t.Fatal(err)
	}
	b[3000] ^= 0xff
	if err := os.WriteFile(tables[0], b, 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCommand("verify", "--data-dir", dir)
	if code != 1 || !strings.Contains(out, "problem: table checksums") || !strings.Contains(out, "note: the records were not walked") {
		t.Fatalf("verify of a damaged table: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	code, out, errOut = runCommand("repair", "--data-dir", dir)
	if code != 1 || !strings.Contains(errOut, "table blocks fail their checksums") || !strings.Contains(errOut, "nothing written") || strings.Contains(out, "rewrote") {
		t.Fatalf("repair of a damaged table: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	after, err := os.ReadFile(tables[0])
	if err != nil || !bytes.Equal(after, b) {
		t.Fatalf("the table changed under the refused repair (%v)", err)
	}
}

// repair --json: one object with what was replaced and the check after
// it; a directory in use and one with nothing to mend are told apart.
func TestRepairJSONSaysWhatItDid(t *testing.T) {
	dir, opts := stoppedStoreOfLargeMessages(t)
	repairJSON := func() (int, map[string]any) {
		t.Helper()
		code, out, errOut := runCommand("repair", "--json", "--data-dir", dir)
		var v map[string]any
		if err := json.Unmarshal([]byte(out), &v); err != nil || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Fatalf("repair --json: not one JSON object: %v\nstdout:\n%s\nstderr:\n%s", err, out, errOut)
		}
		return code, v
	}
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	if code, v := repairJSON(); code != 1 || v["status"] != "in_use" {
		t.Fatalf("a directory in use: exit %d %v", code, v)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, msg := flipAMessageBelowTheNewestValueLog(t, dir, 40)
	code, v := repairJSON()
	replaced, _ := v["replaced"].([]any)
	want := fmt.Sprintf("message %d of thread t1 (id m%d)", msg+1, msg)
	if code != 1 || v["status"] != "problems" || len(replaced) != 1 || !strings.HasPrefix(replaced[0].(string), want) || len(v["problems"].([]any)) == 0 || v["messages"] != float64(40) {
		t.Fatalf("repair of a value gone bad: exit %d %v, want the message replaced and the file's problem left", code, v)
	}
	code, v = repairJSON()
	if code != 1 || len(v["replaced"].([]any)) != 0 || len(v["rewrote"].([]any)) != 0 || v["rewritten"] != float64(0) {
		t.Fatalf("a second repair: exit %d %v, want nothing replaced or rewritten", code, v)
	}
}
