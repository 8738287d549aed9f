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
// (storeURI: nix.conf's store, else NIX_REMOTE, else "auto"; parameters
// after '?' do not matter here): "daemon" and unix://PATH forward; "auto"
// forwards when this process may not write the state directory and the
// socket exists (a user who is not root, whose trust the system daemon
// then decides); "local" and "auto" with a writable state directory serve
// the store here (a chroot store, local?root=DIR or a path, is given with
// --store instead). It returns the socket to forward to, or "" to serve
// here.
func StdioForwardSocket(storeURI, stateDir, socketPath string) (string, error) {
	uri, params, _ := strings.Cut(storeURI, "?")
	switch {
	case uri == "auto" || uri == "":
		if unix.Access(stateDir, unix.R_OK|unix.W_OK) == nil {
			return "", nil
		}
		if _, err := os.Stat(socketPath); err == nil {
			return socketPath, nil
		}
		return "", nil
	case uri == "daemon":
		return socketPath, nil
	case strings.HasPrefix(uri, "unix://"):
		return strings.TrimPrefix(uri, "unix://"), nil
	case uri == "local" && !strings.Contains("&"+params, "&root="):
		return "", nil
	case uri == "local" || strings.HasPrefix(uri, "/"):
		return "", fmt.Errorf("store %q: give nixyard daemon --stdio a chroot store with --store DIR", storeURI)
	}
	return "", fmt.Errorf("nixyard daemon --stdio serves a local store or forwards to a daemon socket; it cannot use store %q", storeURI)
}

// errDaemonClosed is the daemon ending a forwarded connection before the
// client did.
var errDaemonClosed = errors.New("unexpected EOF from daemon socket")

// ForwardStdio connects to the daemon socket and copies bytes both ways
// between it and in/out, as nix-daemon --stdio does when it forwards: it
// returns nil when in ends (the client has gone; the daemon connection is
// closed then), an error when the daemon closes first or a copy fails, and
// ctx's error when ctx ends. The daemon sees this process's credentials,
// so it decides the client's trust. The goroutine reading in may still be
// blocked in a read when ForwardStdio returns; the caller exits then.
func ForwardStdio(ctx context.Context, socket string, in io.Reader, out io.Writer) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return fmt.Errorf("forwarding to the daemon: %w", err)
	}
	defer c.Close()
	errc := make(chan error, 2)
	go func() {
		_, err := io.Copy(c, in)
		if err != nil {
			err = fmt.Errorf("forwarding the client to the daemon: %w", err)
		}
		errc <- err // nil: the client has gone
	}()
	go func() {
		_, err := io.Copy(out, c)
		if err == nil {
			err = errDaemonClosed
		}
		errc <- fmt.Errorf("forwarding the daemon to the client: %w", err)
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
