package main

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// socketMode is the file mode of both sockets: owner and group may
// connect (share the group with the agent's and clients' containers).
const socketMode = 0o660

// listenUnix listens on a Unix socket at path with socketMode.
//
//   - A lock file, path + ".lock", held while the socket is open, keeps
//     two sidecars that start at once on the same path (with different
//     data directories) from removing or replacing each other's socket.
//     The lock file is left in place: removing it would open that race
//     again.
//   - A socket file is removed only when it is stale: connecting to it is
//     refused (ECONNREFUSED: nobody listens). One that a process listens
//     on is refused, and so is one whose state a connect cannot tell
//     (permission denied; a listener that accepts nothing and whose
//     backlog is full; anything else): removing it could cut a live
//     process off its clients. Any other file is refused.
//   - The socket is bound in a private directory (mode 0700), given
//     socketMode there, and then linked at path, which never replaces a
//     file: it is never reachable with the umask's mode. Where a hard
//     link cannot be made (some FUSE file systems), it is bound at path
//     and given its mode after, with a warning.
//
// Closing the listener removes the socket file if it is still this one.
func listenUnix(path string, log *slog.Logger) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("create the directory of %s: %w", path, err)
	}
	lock, err := lockSocketPath(path, log)
	if err != nil {
		return nil, err
	}
	ln, err := listenLocked(path, log)
	if err != nil {
		lock.Close()
		return nil, err
	}
	ln.lock = lock
	return ln, nil
}

// lockSocketPath takes the lock file of the socket at path. It is opened
// read-only (flock needs no more) with socketMode, so a sidecar run later
// as another user of the group can take it too. A file system without
// flock gets no lock, with a warning (nil file).
func lockSocketPath(path string, log *slog.Logger) (*os.File, error) {
	name := path + ".lock"
	f, err := os.OpenFile(name, os.O_RDONLY|os.O_CREATE, socketMode)
	if err != nil {
		return nil, fmt.Errorf("open the socket's lock file (remove it if it is left from another user): %w", err)
	}
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	switch {
	case err == nil:
		return f, nil
	case errors.Is(err, syscall.EWOULDBLOCK):
		f.Close()
		return nil, fmt.Errorf("%s: another sidecar holds %s (it serves this socket)", path, name)
	case errors.Is(err, syscall.ENOLCK), errors.Is(err, syscall.ENOTSUP), errors.Is(err, syscall.EINVAL):
		f.Close()
		log.Warn("the socket's directory does not support locks: two sidecars starting at once on this path are not kept apart", "path", name, "err", err)
		return nil, nil
	}
	f.Close()
	return nil, fmt.Errorf("lock %s: %w", name, err)
}

// probeSocketLock reports the error listenUnix would give for path's lock
// now: another sidecar holds it. It takes the lock only to learn that,
// and lets it go. A directory without locks is not warned of here:
// listenUnix warns of it when it takes the lock (it was warned twice).
func probeSocketLock(path string) error {
	if _, err := os.Stat(path + ".lock"); errors.Is(err, fs.ErrNotExist) {
		return nil // no sidecar served path since its directory was made
	}
	f, err := lockSocketPath(path, slog.New(slog.DiscardHandler))
	if f != nil {
		f.Close()
	}
	return err
}

// probeSocketPath reports the error listenUnix would give for the file
// at path now: it is not a socket, or a process listens on it (or
// whether one does cannot be told). A stale socket is no error: it is
// removed later, under the lock. Nothing is removed here.
func probeSocketPath(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil // absent (or unreadable: listenUnix says why)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
	}
	_, err = staleSocket(path)
	return err
}

// listenLocked is listenUnix under the lock.
func listenLocked(path string, log *slog.Logger) (*unixSocket, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
		}
		stale, err := staleSocket(path)
		if err != nil {
			return nil, err
		}
		if stale {
			log.Info("removing stale socket", "path", path)
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
			}
		}
	}
	ln, err := bindPrivately(path, log)
	if err != nil {
		return nil, err
	}
	fi, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return &unixSocket{UnixListener: ln, path: path, file: fi}, nil
}

// bindPrivately listens on a socket with socketMode at path, which must
// not exist. The socket is bound in a private directory beside path,
// named after it, and linked at path once its mode is set. A private
// path too long for a socket address is bound through the directory's
// descriptor (/proc/self/fd/N/s). Private directories left by a process
// killed in the middle are removed first (the caller holds the lock).
func bindPrivately(path string, log *slog.Logger) (*net.UnixListener, error) {
	// Dir, not Split: a bare name's directory is ".", not "" (which
	// MkdirTemp takes for the system's temporary directory, another file
	// system, where the link fails).
	parent, base := filepath.Dir(path), filepath.Base(path)
	prefix := "." + base + ".tmp"
	if entries, err := os.ReadDir(parent); err == nil {
		for _, e := range entries {
			if rest, ok := strings.CutPrefix(e.Name(), prefix); ok && e.IsDir() && rest != "" && strings.Trim(rest, "0123456789") == "" {
				os.RemoveAll(filepath.Join(parent, e.Name()))
			}
		}
	}
	dir, err := os.MkdirTemp(parent, prefix)
	if err != nil {
		return nil, fmt.Errorf("private directory for %s: %w", path, err)
	}
	defer os.RemoveAll(dir)
	private := filepath.Join(dir, "s")
	bindAt := private
	if len(bindAt) > maxSocketPath {
		d, err := os.Open(dir)
		if err != nil {
			return nil, fmt.Errorf("private directory for %s: %w", path, err)
		}
		defer d.Close()
		bindAt = fmt.Sprintf("/proc/self/fd/%d/s", d.Fd())
	}
	ln, err := bindThenChmod(bindAt)
	if err != nil {
		return nil, err
	}
	err = os.Link(private, path)
	switch {
	case err == nil:
		return ln, nil
	case errors.Is(err, fs.ErrExist):
		ln.Close()
		return nil, fmt.Errorf("%s: created by another process meanwhile; refusing to replace it", path)
	}
	ln.Close()
	log.Warn("cannot link the socket (no hard links on this file system?): it is bound at its path and given its mode after", "path", path, "err", err)
	return bindThenChmod(path)
}

// bindThenChmod listens at path and gives the socket file socketMode.
// Closing the listener does not remove the file (unixSocket does).
func bindThenChmod(path string) (*net.UnixListener, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, socketMode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// unixSocket is a listener made by listenUnix. Close closes the socket,
// removes its file if path still names it (not a later sidecar's), and
// releases the lock. Safe to call twice.
type unixSocket struct {
	*net.UnixListener
	path  string
	file  fs.FileInfo
	lock  *os.File
	once  sync.Once
	close error
}

// Close implements net.Listener.
func (l *unixSocket) Close() error {
	l.once.Do(func() {
		l.close = l.UnixListener.Close()
		if fi, err := os.Lstat(l.path); err == nil && os.SameFile(fi, l.file) {
			os.Remove(l.path)
		}
		if l.lock != nil {
			l.lock.Close()
		}
	})
	return l.close
}

// staleSocket tells whether the socket file at path is stale by
// connecting to it: true when the connection is refused (nobody listens)
// or the file is gone meanwhile; an error when a process listens on it or
// the connect fails in a way that does not show it is stale.
func staleSocket(path string) (bool, error) {
	c, err := net.DialTimeout("unix", path, 500*time.Millisecond)
	switch {
	case err == nil:
		c.Close()
		return false, fmt.Errorf("%s: another process is listening on it", path)
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ENOENT):
		return true, nil
	case errors.Is(err, syscall.EAGAIN):
		return false, fmt.Errorf("%s: a process is listening on it but accepts no connections (its backlog is full); refusing to replace it: %w", path, err)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return false, fmt.Errorf("%s: permission denied connecting to it, so whether a process listens on it is unknown; refusing to replace it (remove it by hand if it is stale): %w", path, err)
	}
	return false, fmt.Errorf("%s: cannot tell whether a process listens on it; refusing to replace it (remove it by hand if it is stale): %w", path, err)
}
