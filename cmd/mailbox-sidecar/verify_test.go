package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// verify on a stopped sidecar's directory: consistent, then refused while
// the directory is open, then a value-log file with a flipped byte listed
// as a problem; bad usage and a directory without a store.
func TestVerifyChecksAStoppedDataDirectory(t *testing.T) {
	dir, opts := stoppedStoreOfLargeMessages(t)
	verify := func(args ...string) (int, string, string) { return runCommand(append([]string{"verify"}, args...)...) }

	code, out, errOut := verify("--data-dir", dir)
	if code != 0 || !strings.Contains(out, "1 threads, 40 messages") || !strings.Contains(out, "consistent") {
		t.Fatalf("verify of a clean directory: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}

	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	code, out, errOut = verify("--data-dir", dir)
	if code != 1 || !strings.Contains(errOut, "in use") {
		t.Fatalf("verify of a directory in use: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	flipped, _ := flipAMessageBelowTheNewestValueLog(t, dir, 40)
	code, out, errOut = verify("--data-dir", dir)
	if code != 1 || !strings.Contains(out, "problem: "+flipped) || !strings.Contains(out, "fails its checksum") {
		t.Fatalf("verify of a flipped byte: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}

	// A value that went bad in the newest value-log file, with whole
	// entries after it: verify does not open the directory (Badger would
	// cut the file there) unless told to.
	s, err = badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	writeLargeMessages(t, s, "t2", "n", 3, 30<<10) // 90 KiB each: in the value log
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	newest, nb := flipInNewestValueLog(t, dir, `"n0-n0-`)
	if i := bytes.Index(nb, []byte(`"n0-n0-`)); !bytes.Contains(nb[i:], []byte(`"n2-n2-`)) {
		t.Fatalf("n2 not after n0 in the newest value-log file %s", newest)
	}
	code, out, errOut = verify("--data-dir", dir)
	if code != 1 || !strings.Contains(errOut, "not opened") || !strings.Contains(out, "whole entries follow it") {
		t.Fatalf("verify of a damaged newest value-log file: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if st, err := os.Stat(newest); err != nil || st.Size() != int64(len(nb)) {
		t.Fatalf("the newest value-log file changed: %v, %v", st, err)
	}
	code, out, errOut = verify("--data-dir", dir, "--allow-cut")
	if code != 1 || strings.Contains(errOut, "not opened") || !strings.Contains(errOut, "about to cut") || !strings.Contains(out, "decode message") {
		t.Fatalf("verify --allow-cut: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	// The file Badger cut was kept aside, whole.
	if kept, err := os.ReadFile(newest + ".damaged"); err != nil || !bytes.Equal(kept, nb) {
		t.Fatalf("the damaged file's copy: %d bytes of %d, %v", len(kept), len(nb), err)
	}

	if code, _, errOut := verify("--data-dir", t.TempDir()); code != 1 || !strings.Contains(errOut, "no data directory") {
		t.Fatalf("verify of an empty directory: exit %d, stderr %s", code, errOut)
	}
	if code, _, _ := verify("--data-dir", dir, "extra"); code != 2 {
		t.Fatalf("verify with an argument: exit %d, want 2", code)
	}
	// A directory that lost its MANIFEST is not "no data directory": it
	// holds a store that cannot be read (found by review).
	if err := os.Remove(filepath.Join(dir, "MANIFEST")); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"verify", "repair"} {
		if code, _, errOut := runCommand(cmd, "--data-dir", dir); code != 1 || !strings.Contains(errOut, "has no MANIFEST but holds") || !strings.Contains(errOut, "backup") {
			t.Fatalf("%s of a directory without its MANIFEST: exit %d, stderr %s", cmd, code, errOut)
		}
	}
}

// An interrupted verify (its context ended) stops the check, says so
// (exit 1, no verdict) and closes the directory: it opens again at once.
func TestVerifyStopsWhenInterrupted(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	opts := badgerstore.Options{Dir: dir, GCInterval: -1}
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	d := engine.Dispatch{DispatchID: "d1", ThreadID: "t1", RunID: "r1", Priority: engine.DefaultPriority, AvailableAt: 1, CreatedAt: 1, MaxAttempts: 5}
	if _, err := s.Enqueue(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out, errOut bytes.Buffer
	code := runVerify(ctx, []string{"--data-dir", dir}, func(string) string { return "" }, &out, &errOut)
	if code != 1 || !strings.Contains(errOut.String(), "the check did not finish") || !strings.Contains(errOut.String(), context.Canceled.Error()) ||
		strings.Contains(out.String(), "consistent") {
		t.Fatalf("interrupted verify: exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errOut.String())
	}
	s, err = badgerstore.Open(opts)
	if err != nil {
		t.Fatalf("open after an interrupted verify: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// verify of a directory a sidecar holds says so, whatever its newest
// value-log file looks like meanwhile: read while a sidecar appends to
// it, the file could look damaged, and verify said so instead of "in use"
// (found by review).
func TestVerifyOfADirectoryInUseSaysSoFirst(t *testing.T) {
	dir, opts := stoppedStoreOfLargeMessages(t)
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	writeLargeMessages(t, s, "t2", "n", 3, 30<<10) // in the newest value-log file
	flipInNewestValueLog(t, dir, `"n0-n0-`)        // what a reader could see mid-append
	code, out, errOut := runCommand("verify", "--data-dir", dir)
	if code != 1 || !strings.Contains(errOut, "in use") || strings.Contains(out, "problem") {
		t.Fatalf("verify of a directory in use: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
}

// A report whose records were not walked (a table block does not read)
// says so in its first line, not "0 dispatches …", which read as an
// empty queue (found by review).
func TestVerifyHeaderOfAnUnwalkedStore(t *testing.T) {
	var out, errb bytes.Buffer
	rep := badgerstore.Report{Unwalked: true, StorageProblems: 1, Problems: []string{"table checksums: bad block"}}
	if code := printVerify("verify", "/d", rep, nil, &out, &errb); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if !strings.HasPrefix(out.String(), "/d: records not counted") || strings.Contains(out.String(), "0 dispatches") {
		t.Fatalf("report:\n%s", out.String())
	}
}

// verify --json prints one object whose status tells apart what the exit
// status does not: consistent, problems, a directory in use, none there,
// not opened (found by review: exit 1 covered all of them).
func TestVerifyJSONTellsTheOutcomesApart(t *testing.T) {
	dir, opts := stoppedStoreOfLargeMessages(t)
	verifyJSON := func(args ...string) (int, map[string]any) {
		t.Helper()
		code, out, errOut := runCommand(append([]string{"verify", "--json"}, args...)...)
		var v map[string]any
		if err := json.Unmarshal([]byte(out), &v); err != nil || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Fatalf("verify --json %v: not one JSON object: %v\nstdout:\n%s\nstderr:\n%s", args, err, out, errOut)
		}
		return code, v
	}
	if code, v := verifyJSON("--data-dir", dir); code != 0 || v["status"] != "consistent" || v["messages"] != float64(40) || v["counted"] != true {
		t.Fatalf("a clean directory: exit %d %v", code, v)
	}
	s, err := badgerstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	if code, v := verifyJSON("--data-dir", dir); code != 1 || v["status"] != "in_use" || v["error"] == "" {
		t.Fatalf("a directory in use: exit %d %v", code, v)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if code, v := verifyJSON("--data-dir", filepath.Join(t.TempDir(), "none")); code != 1 || v["status"] != "no_data_directory" {
		t.Fatalf("no directory: exit %d %v", code, v)
	}
	flipAMessageBelowTheNewestValueLog(t, dir, 40)
	if code, v := verifyJSON("--data-dir", dir); code != 1 || v["status"] != "problems" || len(v["problems"].([]any)) == 0 {
		t.Fatalf("a flipped byte: exit %d %v", code, v)
	}
}
