package main

import (
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
)

// closingStore is a store whose Closable and Close fail or hang on cue
// (fault injection around a real store).
type closingStore struct {
	*badgerstore.Store
	closable error
	hold     chan struct{} // Close waits on it when not nil
	closed   atomic.Bool
}

func (s *closingStore) Closable() error { return s.closable }

func (s *closingStore) Close() error {
	if s.hold != nil {
		<-s.hold
	}
	s.closed.Store(true)
	return s.Store.Close()
}

// At shutdown the store is closed, but not when closing would hang or
// crash (a failed log sync, a full disk: found by review, a SIGTERM that
// never ended and a SIGBUS), and not waited for past its timeout.
func TestShutdownClosesTheStoreOnlyWhenThatCannotHangOrCrash(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	open := func() *closingStore {
		st, err := badgerstore.Open(badgerstore.Options{InMemory: true})
		if err != nil {
			t.Fatal(err)
		}
		return &closingStore{Store: st}
	}

	ok := open()
	closeStore(ok, time.Minute, log)
	if !ok.closed.Load() {
		t.Fatal("a healthy store was not closed")
	}

	broken := open()
	broken.closable = errors.New("sync failed: EIO")
	closeStore(broken, time.Minute, log)
	if broken.closed.Load() {
		t.Fatal("a store whose Close would hang or crash was closed")
	}
	broken.Store.Close()

	hung := open()
	hung.hold = make(chan struct{})
	t.Cleanup(func() { close(hung.hold) }) // the Close left behind ends with the test
	start := time.Now()
	closeStore(hung, 50*time.Millisecond, log)
	if waited := time.Since(start); waited > 10*time.Second {
		t.Fatalf("a hung Close held the shutdown %v", waited)
	}
}
