package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nixyard/nixyard/internal/daemon"
)

// listenAll opens the default socket (Nix's uid-based trust) and every
// --listen socket with its policy. Under systemd socket activation the
// sockets systemd passes are used: each --listen socket whose path is one
// of theirs, and the default socket (the one passed socket that is no
// --listen's, as for nix-daemon). Sockets systemd did not pass are made
// as without it. Passed sockets keep their files when the daemon stops, so
// that clients queue during a restart instead of failing.
func listenAll(defaultPath string, specs []daemon.ListenSpec, logger *slog.Logger) ([]daemon.Listener, error) {
	passed, err := daemon.SystemdListeners(os.Getpid())
	if err != nil {
		return nil, err
	}
	byPath := map[string]net.Listener{}
	for _, l := range passed {
		byPath[filepath.Clean(l.Addr().String())] = l
	}
	var jobSockets []daemon.Listener
	fail := func(err error) ([]daemon.Listener, error) {
		for _, o := range jobSockets {
			o.Close()
		}
		for _, l := range byPath {
			l.Close()
		}
		return nil, err
	}
	seen := map[string]bool{}
	for _, s := range specs {
		p := filepath.Clean(s.Path)
		if seen[p] || p == filepath.Clean(defaultPath) {
			return fail(fmt.Errorf("--listen %s: the daemon listens there already (its default socket, or a --listen given twice)", s.Path))
		}
		seen[p] = true
		if filepath.Dir(p) == filepath.Dir(filepath.Clean(defaultPath)) {
			logger.Warn("a job socket is in the default socket's directory: a job that mounts that directory reaches the default socket too, which trusts container root as root; give the job socket a directory of its own", "socket", s.Path)
		}
		l, ok := byPath[p]
		if ok {
			delete(byPath, p)
			logger.Info("using the job socket passed by systemd", "socket", s.Path)
		} else if l, err = listen(s.Path, logger); err != nil {
			return fail(err)
		}
		jobSockets = append(jobSockets, daemon.Listener{Listener: l, Policy: s.Policy})
		logger.Info("listening on a job socket", "socket", s.Path, "untrusted", s.Policy.Untrusted, "tenant", s.Policy.Tenant)
	}
	var def net.Listener
	switch len(byPath) {
	case 0:
		if def, err = listen(defaultPath, logger); err != nil {
			return fail(err)
		}
	case 1:
		for p, l := range byPath {
			// With job sockets, only the default socket's own path: a job
			// socket whose --listen is misspelt must not become a socket
			// that trusts by uid (container root as root).
			if len(specs) > 0 && p != filepath.Clean(defaultPath) {
				return fail(fmt.Errorf("systemd passed the socket %s, which is neither the default socket (%s) nor a --listen socket (%s)", p, defaultPath, listenPaths(specs)))
			}
			def = l
			delete(byPath, p)
			logger.Info("using the socket passed by systemd", "socket", p)
		}
	default:
		return fail(fmt.Errorf("systemd passed %d sockets that are not --listen sockets: give each job socket's path to --listen, and pass at most one other (the default socket)", len(byPath)))
	}
	return append([]daemon.Listener{{Listener: def}}, jobSockets...), nil
}

// listenPaths lists the --listen sockets' paths, for messages.
func listenPaths(specs []daemon.ListenSpec) string {
	paths := make([]string, len(specs))
	for i, s := range specs {
		paths[i] = s.Path
	}
	return strings.Join(paths, ", ")
}

// listen creates the daemon socket as nix-daemon does: the directory is made
// if missing, a stale socket is replaced, and the socket itself is
// world-writable (access is governed by the directory's permissions and by
// allowed-users).
func listen(path string, logger *slog.Logger) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	// A daemon that still answers there keeps its socket: taking it over
	// would leave that one serving no one (and, on exit, remove this one's).
	if err := notServed(path, logger); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false) // see ownSocket.Close
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		l.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		l.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return &ownSocket{UnixListener: l, path: path, dev: st.Dev, ino: st.Ino}, nil
}

// notServed fails if a daemon answers on the socket at path, and goes on
// doing so for a few seconds: one just told to stop (an upgrade's old
// daemon, busy) may take a moment to let go of its socket.
func notServed(path string, logger *slog.Logger) error {
	for deadline, said := time.Now().Add(5*time.Second), false; ; time.Sleep(250 * time.Millisecond) {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
		} else if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ENOTSOCK) {
			return nil // nobody there (a stale socket, or none)
		}
		// Answered, or too busy to (a full backlog, a timeout).
		if time.Now().After(deadline) {
			return fmt.Errorf("listening on %s: another daemon is listening there; stop it first", path)
		}
		if !said {
			logger.Info("a daemon answers on the socket; waiting a few seconds for it to let go (one stopping?)", "socket", path)
			said = true
		}
	}
}

// checkSocketsFree fails, before the daemon opens the store, if a daemon
// answers on one of the sockets it is to make (not those systemd passes):
// listen checks again, but by then this one would have said things about
// the store that concern the other daemon.
func checkSocketsFree(defaultPath string, specs []daemon.ListenSpec, logger *slog.Logger) error {
	if os.Getenv("LISTEN_FDS") != "" {
		return nil // listenAll sorts out which sockets are passed
	}
	if err := notServed(defaultPath, logger); err != nil {
		return err
	}
	for _, s := range specs {
		if err := notServed(s.Path, logger); err != nil {
			return err
		}
	}
	return nil
}

// ownSocket is a socket the daemon made: closing it removes the file only
// if it is still this socket's, not one that another daemon made there
// since.
type ownSocket struct {
	*net.UnixListener
	path     string
	dev, ino uint64
}

func (l *ownSocket) Close() error {
	err := l.UnixListener.Close()
	var st syscall.Stat_t
	if syscall.Lstat(l.path, &st) == nil && st.Dev == l.dev && st.Ino == l.ino {
		os.Remove(l.path)
	}
	return err
}
