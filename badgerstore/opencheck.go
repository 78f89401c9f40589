package badgerstore

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/pb"
	"github.com/dgraph-io/badger/v4/table"
	"github.com/dgraph-io/badger/v4/y"
	"google.golang.org/protobuf/proto"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// CheckManifest reports a data directory whose MANIFEST is gone while it
// still holds table or value-log files (engine.ErrCorrupt): Badger would
// open it as a new store, and its new tables, numbered from 1 again,
// overwrite the old ones (found by review: a deleted MANIFEST wiped the
// queue without a word). An absent or empty directory, or one with its
// MANIFEST, is no error.
func CheckManifest(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, badgerManifest)); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return nil // there (or unreadable: Badger's open says why)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil // absent: a new store
	}
	var data []string
	for _, e := range entries {
		switch filepath.Ext(e.Name()) {
		case ".sst", ".vlog", ".mem":
			data = append(data, e.Name())
		}
	}
	if len(data) == 0 {
		return nil
	}
	sort.Strings(data)
	shown := data
	if len(shown) > 5 {
		shown = append(shown[:5:5], "…")
	}
	return fmt.Errorf("%w: %s has no MANIFEST but holds %d table or log files (%s): opened, it would become an empty store written over them; restore the MANIFEST (or the directory) from a backup, or move the files aside to start empty",
		engine.ErrCorrupt, dir, len(data), strings.Join(shown, ", "))
}

// badgerManifest is the name of Badger's manifest file.
const badgerManifest = "MANIFEST"

// checkTables reads the footer of every table the MANIFEST in dir names
// and checks its index against its checksum, as Badger does when it
// opens the table; but where Badger reads past the end of a truncated
// file and panics in a goroutine of its own (the process dies; found by
// review: a truncated .sst crashed serve, verify and repair alike, with a
// stack trace and exit status 2), this returns engine.ErrCorrupt naming
// the file. A table named by the manifest but missing is left to
// Badger's open, which refuses it. Blocks are not read: verify checks
// them (Badger's VerifyChecksum).
func checkTables(dir string, opt badger.Options) error {
	f, err := os.Open(filepath.Join(dir, badgerManifest))
	if err != nil {
		return nil // absent (a new store) or unreadable: Badger's open says why
	}
	defer f.Close()
	m, _, err := badger.ReplayManifestFile(f, opt.ExternalMagicVersion, opt)
	if err != nil {
		return nil // Badger's open refuses it, with its own words
	}
	ids := make([]uint64, 0, len(m.Tables))
	for id := range m.Tables {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		name := table.NewFilename(id, dir)
		if err := checkTableFooter(name); err != nil {
			return fmt.Errorf("%w: table %s: %v (mailbox-sidecar verify lists the damage; restore the directory from a backup)", engine.ErrCorrupt, filepath.Base(name), err)
		}
	}
	return nil
}

// checkTableFooter checks the table file at name as Badger's
// Table.initIndex reads it: from the end, the checksum's length, the
// checksum, the index's length, the index; every length within the
// file, and the index matching its checksum.
func checkTableFooter(name string) error {
	f, err := os.Open(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // Badger's open refuses a missing table
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	pos := size
	take := func(n int64, what string) ([]byte, error) {
		if n < 0 || n > pos {
			return nil, fmt.Errorf("truncated or damaged: its %s (%d bytes) does not fit in the %d bytes before it (the file has %d)", what, n, pos, size)
		}
		pos -= n
		b := make([]byte, n)
		if _, err := f.ReadAt(b, pos); err != nil {
			return nil, fmt.Errorf("read its %s: %w", what, err)
		}
		return b, nil
	}
	lb, err := take(4, "checksum length")
	if err != nil {
		return err
	}
	cb, err := take(int64(y.BytesToU32(lb)), "index checksum")
	if err != nil {
		return err
	}
	var sum pb.Checksum
	if err := proto.Unmarshal(cb, &sum); err != nil {
		return fmt.Errorf("damaged: its index checksum does not decode: %v", err)
	}
	if lb, err = take(4, "index length"); err != nil {
		return err
	}
	index, err := take(int64(y.BytesToU32(lb)), "index")
	if err != nil {
		return err
	}
	if err := y.VerifyChecksum(index, &sum); err != nil {
		return fmt.Errorf("damaged: its index does not match its checksum: %v", err)
	}
	return nil
}
