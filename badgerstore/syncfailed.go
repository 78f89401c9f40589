package badgerstore

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"syscall"
)

// syncFailedMarker is the file a store whose log sync failed leaves in
// its data directory (Badger ignores names it does not know), so that the
// next Open writes the logs out again (rewriteAfterFailedSync).
//
// Why: on Linux a failed fsync reports the error once, and the kernel
// marks the pages it could not write clean while keeping their contents
// in the page cache. The next process's sync of the same files then
// succeeds without writing them, Badger reads them back from the cache
// and replays the batch, and a later power loss (or the cache evicting
// the pages) takes the bytes away from under a value pointer that a
// table file has meanwhile made durable: an acknowledged earlier value of
// the key is then hidden behind an empty one (found by review). Written
// again from the cache, the pages are dirty, and Open's sync takes them
// to the disk, or fails and Open with it.
const syncFailedMarker = "SYNC-FAILED"

// markSyncFailed leaves syncFailedMarker in dir, naming cause, synced
// with the directory. Best effort: the disk that failed a sync may fail
// this too; the error says so.
func markSyncFailed(dir string, cause error) error {
	path := filepath.Join(dir, syncFailedMarker)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("leave %s: %w", syncFailedMarker, err)
	}
	_, werr := f.WriteString(cause.Error() + "\n")
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		return fmt.Errorf("leave %s: %w", syncFailedMarker, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("leave %s: directory: %w", syncFailedMarker, err)
	}
	return nil
}

// rewriteAfterFailedSync runs at Open, before the logs are synced and
// Badger reads them: when the last process left syncFailedMarker, it
// writes every memtable log and the two newest value-log files out again
// (their data, holes skipped) from what the page cache holds, syncs them
// and the directory, and removes the marker. It reports whether it did.
// On error the marker stays, and Open fails: the disk still does not
// take the writes.
func rewriteAfterFailedSync(dir string, hook func(string) error, log *slog.Logger) (bool, error) {
	cause, err := os.ReadFile(filepath.Join(dir, syncFailedMarker))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", syncFailedMarker, err)
	}
	log.Warn("the last process's log sync failed: writing its logs out again before they are read",
		"marker", syncFailedMarker, "cause", string(cause))
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false, fmt.Errorf("rewrite logs: %w", err)
	}
	var mems, vlogs []string
	for _, e := range entries {
		if _, ok := logFid(e.Name(), memExt); ok {
			mems = append(mems, e.Name())
		}
		if _, ok := logFid(e.Name(), vlogExt); ok {
			vlogs = append(vlogs, e.Name())
		}
	}
	// A failed sync stops the store at once, so only the value-log file
	// followed then, or the one Badger had just moved on to, can hold
	// pages it did not write.
	slices.SortFunc(vlogs, func(a, b string) int {
		fa, _ := logFid(a, vlogExt)
		fb, _ := logFid(b, vlogExt)
		return fa - fb
	})
	vlogs = vlogs[max(0, len(vlogs)-2):]
	var bytes int64
	for _, name := range append(vlogs, mems...) {
		n, err := rewriteFile(filepath.Join(dir, name), hook)
		if err != nil {
			return false, err
		}
		bytes += n
	}
	if err := syncDir(dir); err != nil {
		return false, fmt.Errorf("rewrite logs: directory: %w", err)
	}
	if err := os.Remove(filepath.Join(dir, syncFailedMarker)); err != nil {
		return false, fmt.Errorf("remove %s: %w", syncFailedMarker, err)
	}
	if err := syncDir(dir); err != nil {
		return false, fmt.Errorf("remove %s: directory: %w", syncFailedMarker, err)
	}
	log.Info("logs written out again after the last process's failed sync", "files", len(vlogs)+len(mems), "bytes", bytes)
	return true, nil
}

// rewriteFile writes the data of path (its holes skipped) back in place,
// byte for byte, and syncs it: pages a failed sync left clean in the page
// cache are dirty again. It returns the bytes written.
func rewriteFile(path string, hook func(string) error) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("rewrite %s: %w", path, err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("rewrite %s: %w", path, err)
	}
	size := info.Size()
	buf := make([]byte, 1<<20)
	var written int64
	for off := int64(0); off < size; {
		data, err := f.Seek(off, seekData)
		switch {
		case errors.Is(err, syscall.ENXIO):
			off = size // only holes from off on
			continue
		case err == nil && data > off:
			off = data
			continue
		}
		n, rerr := f.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		if n > 0 {
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				return written, fmt.Errorf("rewrite %s: %w", path, err)
			}
			written += int64(n)
		}
		off += int64(n)
		if rerr != nil && !(errors.Is(rerr, io.EOF) && off >= size) {
			return written, fmt.Errorf("rewrite %s: %w", path, rerr)
		}
	}
	if err := fdatasync(f, int(f.Fd()), hook); err != nil {
		return written, fmt.Errorf("rewrite: %w", err)
	}
	return written, nil
}
