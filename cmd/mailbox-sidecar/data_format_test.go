package main

import (
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
)

// serve refuses a data directory that a later version wrote in a format
// this one does not read, and says so; the directory is left as it was.
func TestServeRefusesADataDirectoryOfALaterFormat(t *testing.T) {
	n := newNode(t)
	key := []byte("ofv") // badgerstore's DataFormat key
	later := binary.BigEndian.AppendUint64(nil, badgerstore.DataFormat+1)
	db, err := badger.Open(badger.DefaultOptions(n.data).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(txn *badger.Txn) error { return txn.Set(key, later) })
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}

	p := n.serve(t)
	if code := p.wait(t, 10*time.Second); code != 1 || !strings.Contains(p.out.String(), "was written by a later version of mailbox-sidecar; run that version") {
		t.Fatalf("serve on a later format: exit %d\n%s", code, p.out.String())
	}
	db, err = badger.Open(badger.DefaultOptions(n.data).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key)
		if err != nil {
			return err
		}
		v, err := item.ValueCopy(nil)
		if err == nil && string(v) != string(later) {
			t.Errorf("format after the refusal: %x, want %x", v, later)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}
