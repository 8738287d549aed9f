package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// StdioForwardSocket says whether `nix-daemon --stdio` (what ssh-ng runs
// on the remote side) serves the store itself or forwards its client to
// the daemon socket, as Nix 2.8 decides it from the store setting
// (storeURI: nix.conf's store, else NIX_REMOTE, else "auto"): "daemon"
// and unix://PATH forward; "auto" forwards when this process may not
// write the state directory and the socket exists (a user who is not
// root, where the system daemon then decides the client's trust); "local"
// and "auto" with a writable state directory serve the store here. It
// returns the socket to forward to, or "" to serve here.
func StdioForwardSocket(storeURI, stateDir, socketPath string) (string, error) {
	switch {
	case storeURI == "auto" || storeURI == "":
		if unix.Access(stateDir, unix.R_OK|unix.W_OK) == nil {
			return "", nil
		}
		if _, err := os.Stat(socketPath); err == nil {
			return socketPath, nil
		}
		return "", nil
	case storeURI == "daemon":
		return socketPath, nil
	case strings.HasPrefix(storeURI, "unix://"):
		path, _, _ := strings.Cut(strings.TrimPrefix(storeURI, "unix://"), "?")
		return path, nil
	case storeURI == "local":
		return "", nil
	}
	return "", fmt.Errorf("nixyard daemon --stdio serves a local store or forwards to a daemon socket; it cannot use store %q", storeURI)
}

// ForwardStdio connects to the daemon socket and copies bytes both ways
// between it and in/out until the daemon closes the connection, or in
// ends and the daemon has answered everything sent before. The daemon
// sees this process's credentials, so it decides the client's trust.
func ForwardStdio(ctx context.Context, socket string, in io.Reader, out io.Writer) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return fmt.Errorf("forwarding to the daemon: %w", err)
	}
	uc := c.(*net.UnixConn)
	defer uc.Close()
	stop := context.AfterFunc(ctx, func() { uc.Close() })
	defer stop()
	go func() {
		io.Copy(uc, in)
		uc.CloseWrite() // the daemon sees the client's EOF
	}()
	if _, err := io.Copy(out, uc); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("forwarding to the daemon: %w", err)
	}
	return nil
}
