package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
)

// listenWedged listens on a Unix socket at path with a backlog of 0 and
// never accepts, then fills the backlog with one connection: the socket
// is live, but a further connect fails with EAGAIN, not ECONNREFUSED.
func listenWedged(t *testing.T, path string) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("first connection to the wedged listener: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	if c2, err := net.Dial("unix", path); !errors.Is(err, syscall.EAGAIN) {
		if c2 != nil {
			c2.Close()
		}
		t.Fatalf("connect to a full backlog: %v, want EAGAIN", err)
	}
}

// inode returns the inode of the file at path.
func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatalf("socket file: %v", err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestListenUnixKeepsAWedgedLiveSocket: a process that listens but does
// not accept (its backlog full) makes connect fail with EAGAIN; the
// socket is live and must be neither removed nor replaced.
func TestListenUnixKeepsAWedgedLiveSocket(t *testing.T) {
	path := filepath.Join(shortDir(t), "a.sock")
	listenWedged(t, path)
	before := inode(t, path)
	ln, err := listenUnix(path, slog.New(slog.DiscardHandler))
	if err == nil {
		ln.Close()
		t.Fatal("listenUnix replaced the socket of a live listener whose backlog is full")
	}
	if !strings.Contains(err.Error(), "backlog") || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not name the path and say the listener is not accepting", err)
	}
	if after := inode(t, path); after != before {
		t.Fatalf("socket file replaced (inode %d, was %d)", after, before)
	}
}

// TestListenUnixKeepsASocketItMayNotConnectTo: connect refused with
// EACCES says nothing about whether a process listens there (another
// user's sidecar may); the socket must not be removed. As root, the
// connecting thread drops its file-system identity (setfsuid, which also
// clears CAP_DAC_OVERRIDE) so that the permission check applies.
func TestListenUnixKeepsASocketItMayNotConnectTo(t *testing.T) {
	dir := shortDir(t)
	// Writable by everyone: the dropped identity could remove the file,
	// so only listenUnix's own decision keeps it.
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "a.sock")
	live, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if err := os.Chmod(path, 0); err != nil {
		t.Fatal(err)
	}
	before := inode(t, path)

	var lerr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		if os.Geteuid() == 0 {
			// The thread is never unlocked: it exits with the goroutine,
			// its changed identity with it.
			runtime.LockOSThread()
			syscall.RawSyscall(syscall.SYS_SETFSUID, 65534, 0, 0) // per thread; it cannot fail for root
		}
		if c, err := net.Dial("unix", path); !errors.Is(err, syscall.EACCES) {
			if c != nil {
				c.Close()
			}
			lerr = errors.New("setup: connect as another user: want EACCES, got " + fmt.Sprint(err))
			return
		}
		var ln net.Listener
		ln, lerr = listenUnix(path, slog.New(slog.DiscardHandler))
		if lerr == nil {
			ln.Close()
		}
	}()
	<-done
	if lerr != nil && strings.HasPrefix(lerr.Error(), "setup:") {
		if os.Geteuid() == 0 {
			t.Skipf("root could not drop its file-system identity (no CAP_SETUID?): %v", lerr)
		}
		t.Fatal(lerr)
	}
	if lerr == nil {
		t.Fatal("listenUnix replaced a socket it was not allowed to connect to")
	}
	if !strings.Contains(lerr.Error(), "permission denied") || !strings.Contains(lerr.Error(), path) {
		t.Errorf("error %q does not name the path and the permission problem", lerr)
	}
	if after := inode(t, path); after != before {
		t.Fatalf("socket file replaced (inode %d, was %d)", after, before)
	}
}

// abandon closes a listener of listenUnix as a killed process does: the
// socket file stays, the lock goes.
func abandon(ln net.Listener) {
	u := ln.(*unixSocket)
	u.UnixListener.SetUnlinkOnClose(false)
	u.UnixListener.Close()
	u.lock.Close()
}

// TestListenUnixNeverExposesTheUmasksMode: under umask 000 a socket is
// created 0777; the path must never name it before it has socketMode
// (found by review: the chmod came after the bind), a path too long to
// bind in the private directory included. A watcher looks at the path
// while the socket is made, many times over. The lock file gets
// socketMode too, and a private directory left by a killed process goes.
func TestListenUnixNeverExposesTheUmasksMode(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	short := shortDir(t)
	long := filepath.Join(short, strings.Repeat("d", 100-len(short)-len("/a.sock")))
	if err := os.Mkdir(long, 0o755); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	for _, dir := range []string{short, long} {
		path := filepath.Join(dir, "a.sock")
		leftover := filepath.Join(dir, ".a.sock.tmp123")
		if err := os.MkdirAll(filepath.Join(leftover, "s"), 0o700); err != nil {
			t.Fatal(err)
		}
		for range 300 {
			stop := make(chan struct{})
			seen := make(chan os.FileMode, 1)
			go func() {
				defer close(seen)
				for {
					select {
					case <-stop:
						return
					default:
					}
					if fi, err := os.Lstat(path); err == nil && fi.Mode().Perm() != socketMode {
						seen <- fi.Mode().Perm()
						return
					}
				}
			}()
			ln, err := listenUnix(path, log)
			close(stop)
			if err != nil {
				t.Fatalf("%d-byte path: %v", len(path), err)
			}
			if m, ok := <-seen; ok {
				t.Fatalf("%d-byte path: the socket was reachable with mode %v", len(path), m)
			}
			ln.Close()
			if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("Close left the socket file: %v", err)
			}
		}
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if e.Name() != "a.sock.lock" && filepath.Join(dir, e.Name()) != long {
				t.Errorf("left behind: %s", e.Name())
			}
		}
		if fi, err := os.Stat(path + ".lock"); err != nil || fi.Mode().Perm() != socketMode {
			t.Errorf("lock file: %v %v", fi, err)
		}
	}
}

// TestListenUnixLockAndClose: the lock file refuses a second listener on
// the path until the first closes; Close removes only its own socket.
func TestListenUnixLockAndClose(t *testing.T) {
	path := filepath.Join(shortDir(t), "a.sock")
	log := slog.New(slog.DiscardHandler)
	ln, err := listenUnix(path, log)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := listenUnix(path, log); err == nil || !strings.Contains(err.Error(), "another sidecar holds "+path+".lock") {
		t.Fatalf("second listener: %v", err)
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	ln.Close() // twice is safe
	ln2, err := listenUnix(path, log)
	if err != nil {
		t.Fatalf("after the first closed: %v", err)
	}
	// The file at path is replaced behind the listener's back: its Close
	// leaves the newcomer alone.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("newer"), 0o600); err != nil {
		t.Fatal(err)
	}
	ln2.Close()
	if b, err := os.ReadFile(path); err != nil || string(b) != "newer" {
		t.Fatalf("Close removed a file that was not its socket: %q %v", b, err)
	}
}

// A socket path that is a bare name is made in the working directory's
// private directory and linked, not bound in the system's temporary
// directory (another file system, where the link fails and the socket
// fell back to being bound in place, with a warning).
func TestListenUnixOnABareName(t *testing.T) {
	t.Chdir(shortDir(t))
	t.Setenv("TMPDIR", filepath.Join(t.TempDir(), "absent")) // the system's temporary directory is not used
	var logs strings.Builder
	ln, err := listenUnix("a.sock", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if fi, err := os.Lstat("a.sock"); err != nil || fi.Mode().Perm() != socketMode {
		t.Fatalf("socket: %v %v", fi, err)
	}
	if strings.Contains(logs.String(), "cannot link") {
		t.Fatalf("fell back to bind-then-chmod:\n%s", logs.String())
	}
}
