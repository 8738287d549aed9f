package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
)

// systemdListenFD is the first file descriptor systemd passes to a
// socket-activated service (SD_LISTEN_FDS_START).
const systemdListenFD = 3

// SystemdListener returns the listening socket that systemd passed by
// socket activation, taken as nix-daemon takes it: when LISTEN_FDS is set,
// LISTEN_PID must be pid and LISTEN_FDS must be 1, and the socket is file
// descriptor 3. It returns nil, nil when LISTEN_FDS is not set. The
// variables are removed from the environment so that the daemon's own
// children do not see them.
func SystemdListener(pid int) (net.Listener, error) {
	fds := os.Getenv("LISTEN_FDS")
	if fds == "" {
		return nil, nil
	}
	if os.Getenv("LISTEN_PID") != strconv.Itoa(pid) || fds != "1" {
		return nil, errors.New("unexpected systemd environment variables")
	}
	for _, k := range []string{"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} {
		os.Unsetenv(k)
	}
	// FileListener works on a duplicate (close-on-exec); fd 3 itself is
	// closed so that no child inherits it. A closed fd 3 fails here (EBADF).
	f := os.NewFile(systemdListenFD, "systemd socket")
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("systemd socket (file descriptor %d): %w", systemdListenFD, err)
	}
	if _, ok := l.(*net.UnixListener); !ok {
		l.Close()
		return nil, fmt.Errorf("systemd socket (file descriptor %d) is not a Unix socket", systemdListenFD)
	}
	return l, nil
}
