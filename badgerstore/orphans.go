package badgerstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// orphanClaim is a claim the store held when it was opened: its dispatch
// and the claim's token.
type orphanClaim struct{ id, token string }

// orphans are the claims of the process that had the directory before
// this one (engine.OrphanReclaimer). Open lists them; ReclaimOrphans
// takes them off the list as it settles them.
type orphans struct {
	mu   sync.Mutex
	left []orphanClaim
}

// listOrphans reads the claims in db's lease index (Open, before the
// writer starts): with the directory's lock held, no other process can
// renew or settle them. A record that does not decode is skipped and
// logged: Verify reports it and repair mends it, and both open the
// directory first (found by review: Open failed on it, so repair could
// not run on the damage it exists for); its lease lapses as before.
func listOrphans(db *badger.DB, log *slog.Logger) ([]orphanClaim, error) {
	var out []orphanClaim
	err := db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{pLease}})
		defer it.Close()
		var ids []string
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()
			if len(k) > 1+tsBytes {
				ids = append(ids, string(k[1+tsBytes:]))
			}
		}
		for _, id := range ids {
			item, err := txn.Get(dispatchKey(id))
			if errors.Is(err, badger.ErrKeyNotFound) {
				continue // Verify reports an index entry without its record
			}
			if err != nil {
				return err
			}
			var d *engine.Dispatch
			if err := item.Value(func(v []byte) (err error) { d, err = decodeDispatch(item.Key(), v); return err }); err != nil {
				if errors.Is(err, engine.ErrCorrupt) {
					log.Error("a claimed dispatch does not decode: left to its lease (mailbox-sidecar repair mends it)", "dispatch_id", id, "err", err)
					continue
				}
				return err
			}
			if d.Status == engine.StatusClaimed && d.ClaimToken != "" {
				out = append(out, orphanClaim{id: id, token: d.ClaimToken})
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list the claims of an earlier process: %w", err)
	}
	return out, nil
}

// ReclaimOrphans implements engine.OrphanReclaimer: the claims listed at
// Open, in the order of their leases, in chunks of reclaimChunk, each its
// own commit (halved while too large). A claim settled since (its token
// changed: a sweep reclaimed it, a cancel acked it) is dropped from the
// list untouched.
func (s *Store) ReclaimOrphans(ctx context.Context, now int64, limit int) ([]engine.Dispatch, error) {
	s.orphans.mu.Lock()
	defer s.orphans.mu.Unlock()
	var out []engine.Dispatch
	chunk := reclaimChunk
	for len(s.orphans.left) > 0 && len(out) < limit {
		batch := s.orphans.left[:min(chunk, len(s.orphans.left), limit-len(out))]
		var got []engine.Dispatch
		err := s.update(ctx, "reclaim_orphans", func(w *writeTx) error {
			got = got[:0]
			for _, o := range batch {
				old, err := w.loadDispatch(o.id)
				if err != nil {
					return err
				}
				if old == nil || old.Status != engine.StatusClaimed || old.ClaimToken != o.token {
					continue
				}
				d, reclaimed, err := w.reclaimClaim(old, now, (*engine.Dispatch).ReclaimOrphan, engine.ReasonOrphanedStale)
				if err != nil {
					return err
				}
				if reclaimed {
					got = append(got, d)
				}
			}
			return nil
		})
		if errors.Is(err, engine.ErrTooLarge) && chunk > 1 {
			chunk /= 2
			continue
		}
		if err != nil {
			return out, fmt.Errorf("reclaim the claims of an earlier process: %w", err)
		}
		s.orphans.left = s.orphans.left[len(batch):]
		out = append(out, got...)
	}
	if len(s.orphans.left) == 0 {
		s.orphans.left = nil
	}
	return out, nil
}
