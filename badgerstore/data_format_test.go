package badgerstore_test

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
)

// A data directory records its DataFormat. Open refuses a directory of a
// later format, and leaves it as it is; it records its own format in a
// directory of an earlier one or of none (written before the key came).
func TestOpenRefusesADataDirectoryOfALaterFormat(t *testing.T) {
	dir := t.TempDir()
	// reopen opens the directory, checks that it records DataFormat, then
	// sets its format to next (0: deletes the key) and closes it.
	reopen := func(next uint64) {
		t.Helper()
		s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		v, ok, err := s.RawGet(badgerstore.DataFormatKey())
		if err != nil || !ok || len(v) != 8 || binary.BigEndian.Uint64(v) != badgerstore.DataFormat {
			t.Fatalf("format after Open: %x (recorded %v, %v), want %d", v, ok, err, badgerstore.DataFormat)
		}
		if next == 0 {
			err = s.RawDelete(badgerstore.DataFormatKey())
		} else {
			err = s.RawSet(badgerstore.DataFormatKey(), binary.BigEndian.AppendUint64(nil, next))
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}

	reopen(badgerstore.DataFormat + 1)
	_, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if !errors.Is(err, badgerstore.ErrFormatTooNew) {
		t.Fatalf("Open of a later format: %v, want ErrFormatTooNew", err)
	}
	// The refused directory is as it was.
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(txn *badger.Txn) error {
		item, err := txn.Get(badgerstore.DataFormatKey())
		if err != nil {
			return err
		}
		v, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		if len(v) != 8 || binary.BigEndian.Uint64(v) != badgerstore.DataFormat+1 {
			t.Errorf("format after the refused Open: %x, want %d", v, badgerstore.DataFormat+1)
		}
		return txn.Delete(badgerstore.DataFormatKey()) // as before the key came
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	reopen(badgerstore.DataFormat - 1)
	reopen(badgerstore.DataFormat)
}
