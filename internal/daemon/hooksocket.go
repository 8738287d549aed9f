package daemon

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ListenHookSocket opens the build hook's socket: <state>/nixyard-hook/PID.sock,
// in a directory only the daemon's user may enter, so that its clients
// (the hooks this daemon starts) can be trusted whatever trusted-users
// says. Sockets of daemons that are gone are removed.
func ListenHookSocket(stateDir string) (net.Listener, string, error) {
	dir := filepath.Join(stateDir, "nixyard-hook")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("creating %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("securing %s: %w", dir, err)
	}
	if names, err := os.ReadDir(dir); err == nil {
		for _, e := range names {
			pid, err := strconv.Atoi(strings.TrimSuffix(e.Name(), ".sock"))
			if err != nil || unix.Kill(pid, 0) == unix.ESRCH {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}
	}
	path := filepath.Join(dir, strconv.Itoa(os.Getpid())+".sock")
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, "", fmt.Errorf("build hook socket: %w", err)
	}
	return l, path, nil
}
