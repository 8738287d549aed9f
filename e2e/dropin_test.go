package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDropIn installs the daemon the way a host would replace nix-daemon:
// the binary called through a symlink named nix-daemon, with nix-daemon's
// arguments, serving the socket and (for ssh-ng) stdio.
func TestDropIn(t *testing.T) {
	t.Parallel()
	d := startDaemon(t, asNixDaemon())
	p := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "dropin.txt", "served by nix-daemon")))
	if !d.isValid(t, p) {
		t.Fatalf("%s not valid", p)
	}

	// ssh-ng's own remote-store parameter: Nix runs
	// "nix-daemon --stdio --store ROOT" (no wrapper script).
	url := "ssh-ng://localhost?remote-program=" + d.nixDaemonLink(t) + "&remote-store=" + d.root
	got := d.cmd("nix-store", "-q", "--hash", p, "--store", url).ok(t)
	if want := d.nixStore(t, "-q", "--hash", p); got != want {
		t.Errorf("nix-store -q --hash over ssh-ng: %q; over the socket: %q", got, want)
	}
	dst := d.otherStore("dst")
	d.cmd("nix", "copy", "--from", url, "--to", directStore(dst), p).ok(t)
	if b, err := os.ReadFile(filepath.Join(dst, p)); err != nil || !strings.Contains(string(b), d.nonce) {
		t.Errorf("%s copied over ssh-ng: %q, %v", p, b, err)
	}
}

// TestDefaultSocket checks that "nixyard daemon --store ROOT" listens on
// ROOT/nix/var/nix/daemon-socket/socket when NIX_DAEMON_SOCKET_PATH is
// unset.
func TestDefaultSocket(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("the stock nix-daemon --store ROOT listens on the machine's /nix/var/nix/daemon-socket/socket, which the tests never touch")
	}
	d := startDaemon(t, withDefaultSocket())
	r := d.client("nix", "store", "ping").run(t)
	if r.err != nil || !strings.Contains(r.stdout+r.stderr, "Store URL: unix://"+d.sock) {
		t.Fatalf("ping on %s:\n%s", d.sock, r)
	}
}
