package badgerstore_test

import (
	"context"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine/storetest"
)

func TestMain(m *testing.M) {
	if runChild() || runRSSChild() {
		return
	}
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		removeBenchDirs()
		os.Exit(code)
	}))
}

func openDisk(t *testing.T) engine.Store {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { closeVerified(t, s) })
	return s
}

func openMem(t *testing.T) engine.Store {
	t.Helper()
	s, err := badgerstore.Open(badgerstore.Options{InMemory: true})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { closeVerified(t, s) })
	return s
}

// closeVerified runs the consistency check after every conformance case,
// so every case also proves the indexes match the records it left.
func closeVerified(t *testing.T, s *badgerstore.Store) {
	t.Helper()
	rep, err := s.Verify(context.Background())
	if err != nil {
		t.Errorf("verify: %v", err)
	} else if len(rep.Problems) > 0 {
		t.Errorf("verify found %d problems: %v", len(rep.Problems), rep.Problems)
	}
	if err := s.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
}

func TestConformanceDisk(t *testing.T)   { storetest.Run(t, openDisk) }
func TestConformanceMemory(t *testing.T) { storetest.Run(t, openMem) }
