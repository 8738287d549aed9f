package daemon

import (
	"fmt"
	"net"
	"os"
	"strconv"
)

// systemdListenFD is the first file descriptor systemd passes to a
// socket-activated service (SD_LISTEN_FDS_START).
const systemdListenFD = 3

// SystemdListeners returns the listening sockets that systemd passed by
// socket activation: when LISTEN_FDS is set, LISTEN_PID must be pid, and
// the sockets are file descriptors 3 to 3+LISTEN_FDS-1, each a Unix
// socket (nix-daemon takes exactly one; nixyard also takes its job
// sockets so, to keep them through a restart). It returns nil, nil when
// LISTEN_FDS is not set. The variables are removed from the environment
// so that the daemon's own children do not see them.
func SystemdListeners(pid int) ([]*net.UnixListener, error) {
	fds := os.Getenv("LISTEN_FDS")
	if fds == "" {
		return nil, nil
	}
	n, err := strconv.Atoi(fds)
	if os.Getenv("LISTEN_PID") != strconv.Itoa(pid) || err != nil || n < 1 || n > maxSystemdSockets {
		return nil, fmt.Errorf("unexpected systemd environment variables (LISTEN_PID=%q, LISTEN_FDS=%q)", os.Getenv("LISTEN_PID"), fds)
	}
	for _, k := range []string{"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} {
		os.Unsetenv(k)
	}
	var out []*net.UnixListener
	fail := func(err error) ([]*net.UnixListener, error) {
		for _, l := range out {
			l.Close()
		}
		return nil, err
	}
	for fd := systemdListenFD; fd < systemdListenFD+n; fd++ {
		// FileListener works on a duplicate (close-on-exec); the passed
		// descriptor itself is closed so that no child inherits it. A
		// closed one fails here (EBADF).
		f := os.NewFile(uintptr(fd), "systemd socket")
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return fail(fmt.Errorf("systemd socket (file descriptor %d): %w", fd, err))
		}
		ul, ok := l.(*net.UnixListener)
		if !ok {
			l.Close()
			return fail(fmt.Errorf("systemd socket (file descriptor %d) is not a Unix socket", fd))
		}
		out = append(out, ul)
	}
	return out, nil
}

// maxSystemdSockets bounds LISTEN_FDS: a default socket and job sockets.
const maxSystemdSockets = 64
