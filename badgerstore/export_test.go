package badgerstore

import (
	"time"

	"context"
	"errors"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Test hooks: raw access to keys, to plant corrupt records and damaged
// indexes that the public API can never produce.

// RawSet writes a raw key (through the writer, so its cache sees it).
func (s *Store) RawSet(key, val []byte) error {
	return s.update(context.Background(), "raw_set", func(w *writeTx) error {
		w.set(key, val)
		return nil
	})
}

// RawDelete deletes a raw key (through the writer).
func (s *Store) RawDelete(key []byte) error {
	return s.update(context.Background(), "raw_delete", func(w *writeTx) error {
		w.del(key)
		return nil
	})
}

// BeforeGCMark makes fn run after each value-log GC's moves were written
// and synced, before their marker is.
func (s *Store) BeforeGCMark(fn func()) { s.testBeforeGCMark = fn }

// BeforeValueLogCheck sets a function Verify runs before it reads each
// value-log file.
func (s *Store) BeforeValueLogCheck(fn func()) { s.testBeforeValueLogCheck = fn }

// DispatchKey exposes the record key of a dispatch.
func DispatchKey(id string) []byte { return dispatchKey(id) }

// StateKey exposes the state key of a thread.
func StateKey(thread string) []byte { return stateKey(thread) }

// QueuedMarkerKey exposes the queued-thread marker of a thread.
func QueuedMarkerKey(thread string) []byte { return threadQKey(thread) }

// RunKey exposes the record key of a run.
func RunKey(id string) []byte { return runKey(id) }

// EnqueueMany enqueues ds in one operation (benchmark fixtures only: the
// same code path as Enqueue, without a commit per dispatch).
func (s *Store) EnqueueMany(ds []engine.Dispatch) error {
	return s.update(context.Background(), "enqueue_many", func(w *writeTx) error {
		for i := range ds {
			d := ds[i].Clone()
			if err := d.PrepareEnqueue(); err != nil {
				return err
			}
			ep, err := w.epoch(d.ThreadID)
			if err != nil {
				return err
			}
			d.Epoch = ep
			if err := w.putDispatch(nil, &d, d.UpdatedAt); err != nil {
				return err
			}
		}
		return nil
	})
}

// CompactOnClose makes Close compact level 0 into the tree, so Badger
// records which value-log entries are garbage (test hook).
func CompactOnClose(o Options) Options {
	o.compactL0OnClose = true
	return o
}

// MessageKey exposes the record key of a message.
func MessageKey(thread string, seq uint64) []byte { return messageKey(thread, seq) }

// MessageCountKey exposes the message counter of a thread.
func MessageCountKey(thread string) []byte { return msgCountKey(thread) }

// ReadyFloor exposes the ready-index floor (snapshot.go).
func (s *Store) ReadyFloor() int64 {
	s.reads.mu.Lock()
	defer s.reads.mu.Unlock()
	return s.reads.floor
}

// HoldCommits makes every commit wait for a value from release: nil
// commits it, an error fails it without writing anything. entered gets
// one value per commit as it starts waiting.
func (s *Store) HoldCommits(release <-chan error, entered chan<- struct{}) {
	s.testCommit = func(txn *badger.Txn) func(cb func(error)) {
		return func(cb func(error)) {
			go func() {
				entered <- struct{}{}
				if err := <-release; err != nil {
					txn.Discard()
					cb(err)
					return
				}
				txn.CommitWith(cb)
			}()
		}
	}
}

// CopyKey is one write operation: it writes to the value of from, or
// "missing", and sends on ran (without blocking) each time it runs.
func (s *Store) CopyKey(from, to []byte, ran chan<- struct{}) error {
	return s.update(context.Background(), "copy_key", func(w *writeTx) error {
		v, ok, err := w.get(from)
		if err != nil {
			return err
		}
		if !ok {
			v = []byte("missing")
		}
		w.set(to, append([]byte(nil), v...))
		select {
		case ran <- struct{}{}:
		default:
		}
		return nil
	})
}

// RawGet reads a raw key from the committed state.
func (s *Store) RawGet(key []byte) ([]byte, bool, error) {
	var out []byte
	found := false
	err := s.view(context.Background(), func(r *reader) error {
		item, err := r.txn.Get(key)
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		found = true
		out, err = item.ValueCopy(nil)
		return err
	})
	return out, found, err
}

// ThreadKey exposes the projection key of a thread.
func ThreadKey(thread string) []byte { return threadKey(thread) }

// OldRunStatusKey is a key of the retired index of runs by status (S).
func OldRunStatusKey(status engine.RunStatus, createdAt int64, runID string) []byte {
	return append(appendTS(runStatusPrefix(status), createdAt), runID...)
}

// RunWaitingKey is a run's key in the index of waiting runs.
func RunWaitingKey(createdAt int64, runID string) []byte { return runWaitingKey(createdAt, runID) }

// DataFormatKey exposes the key that records the directory's DataFormat.
func DataFormatKey() []byte { return dataFormatKey }

// LeaseKey exposes the lease-index key of a dispatch whose lease ends at
// until.
func LeaseKey(id string, until int64) []byte {
	return leaseKey(&engine.Dispatch{DispatchID: id, LeaseUntil: until})
}

// SetFirstValueLogCheck sets how soon after the start the value-log files
// are first read for damage, and returns the undo (test hook; not for
// parallel tests).
func SetFirstValueLogCheck(d time.Duration) func() {
	old := firstValueLogCheck
	firstValueLogCheck = d
	return func() { firstValueLogCheck = old }
}
