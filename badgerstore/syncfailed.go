package badgerstore

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
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

// markSyncFailed leaves syncFailedMarker in dir, naming cause and the
// first value-log file a sync may have failed on (vlogFrom; 0: every
// one), synced with the directory. Best effort: the disk that failed a
// sync may fail this too; the error says so. Every sync of a value-log
// file after Open is of the one followed or a newer one (durable.go), so
// the followed file's number bounds them.
func markSyncFailed(dir string, vlogFrom int, cause error) error {
	path := filepath.Join(dir, syncFailedMarker)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("leave %s: %w", syncFailedMarker, err)
	}
	_, werr := fmt.Fprintf(f, "%s%d\n%s\n", vlogFromPrefix, max(0, vlogFrom), cause)
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

// vlogFromPrefix starts the marker's first line: the number of the first
// value-log file to write out again.
const vlogFromPrefix = "vlog_from "

// rewriteAfterFailedSync runs at Open, before the logs are synced and
// Badger reads them: when a process left syncFailedMarker, it writes
// every memtable log and every value-log file from the one the marker
// names (all of them when it names none) out again (their data, holes
// skipped) from what the page cache holds, syncs them and the directory,
// and removes the marker. It reports whether it did. It holds the
// directory's lock meanwhile, as repair does (another process may own the
// directory: engine.ErrDataDirInUse). On error the marker stays, and Open
// fails: the disk still does not take the writes.
func rewriteAfterFailedSync(dir string, hook func(string) error, log *slog.Logger) (bool, error) {
	marker, err := os.ReadFile(filepath.Join(dir, syncFailedMarker))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", syncFailedMarker, err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return false, err
	}
	defer unlock()
	vlogFrom := 0
	first, cause, _ := strings.Cut(string(marker), "\n")
	if n, ok := strings.CutPrefix(first, vlogFromPrefix); ok {
		if v, err := strconv.Atoi(n); err == nil && v >= 0 {
			vlogFrom = v
		}
	} else {
		cause = string(marker) // another form: every value-log file
	}
	log.Warn("a log sync of this data directory failed: writing its logs out again before they are read",
		"marker", syncFailedMarker, "cause", strings.TrimSpace(cause), "value_logs_from", vlogFrom)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false, fmt.Errorf("rewrite logs: %w", err)
	}
	var mems, vlogs []string
	for _, e := range entries {
		if _, ok := logFid(e.Name(), memExt); ok {
			mems = append(mems, e.Name())
		}
		if fid, ok := logFid(e.Name(), vlogExt); ok && fid >= vlogFrom {
			vlogs = append(vlogs, e.Name())
		}
	}
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
		end := size
		if hole, err := f.Seek(off, seekHole); err == nil && hole > off {
			end = hole // write no zeros into the hole after this extent
		}
		n, rerr := f.ReadAt(buf[:min(int64(len(buf)), end-off)], off)
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

// seekHole is lseek's SEEK_HOLE: the next offset at or after the one
// given that is in a hole (the file's end counts as one).
const seekHole = 4

// lockDir takes the lock Badger takes on dir (a flock of the directory)
// without waiting: engine.ErrDataDirInUse when another process holds it.
// Badger's Open takes it again after unlock.
func lockDir(dir string) (unlock func(), err error) {
	lock, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, engine.ErrDataDirInUse
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { lock.Close() }, nil // closing releases the lock
}

// openSyncFailed leaves syncFailedMarker for a failure of Open's own
// syncs (or of what came with them: a listing, a repair's cut): the pages
// a crashed process left unsynced are then clean in the page cache and
// no longer on their way to the disk, as after a failed sync of a running
// store. Every value-log file is written out again. It returns err, with
// the marker's own failure when it could not be left.
func openSyncFailed(dir string, err error) error {
	if merr := markSyncFailed(dir, 0, err); merr != nil {
		return fmt.Errorf("%w; %v", err, merr)
	}
	return err
}
