package e2e

import (
	"bufio"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDropIn installs the daemon the way a host would replace nix-daemon:
// the binary called through a symlink named nix-daemon, with nix-daemon's
// arguments, serving the socket and (for ssh-ng) stdio.
func TestDropIn(t *testing.T) {
	t.Parallel()
	// Arguments a service may give nix-daemon, which takes those of every
	// Nix command.
	d := startDaemon(t, asNixDaemon(), withDaemonArgs("--daemon", "-v", "--log-format", "raw", "--max-jobs", "2", "--sandbox", "--no-keep-failed"))
	if v := d.cmd(d.nixDaemonLink(t), "--version").ok(t); !strings.HasPrefix(v, "nix-daemon (Nix) 2.8.0") {
		t.Errorf("nix-daemon --version: %q", v)
	}
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

// TestSocketActivation starts the daemon as systemd's nix-daemon.socket
// does: the socket exists and listens before the daemon runs, and the
// daemon gets it as file descriptor 3 with LISTEN_FDS=1 and LISTEN_PID set
// to its own pid. A client that connected while no daemon ran (the one
// that made systemd start it) is served, and the daemon leaves the socket
// file alone.
func TestSocketActivation(t *testing.T) {
	t.Parallel()
	d := startDaemon(t, socketActivated())
	before := inode(t, d.sock)
	p := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "activated.txt", "socket activation")))

	d.stop(t)
	c, err := net.Dial("unix", d.sock)
	if err != nil {
		t.Fatalf("connecting while no daemon runs: %v", err)
	}
	defer c.Close()
	d.start(t)
	c.SetDeadline(time.Now().Add(time.Minute)) // a daemon that never accepts it fails the test
	early := &protoConn{c: c, r: bufio.NewReader(c), w: bufio.NewWriter(c), client: clientProto}
	if err := early.handshake(); err != nil {
		t.Fatalf("handshake of the client that connected before the daemon started: %v", err)
	}
	if !d.isValid(t, p) {
		t.Errorf("%s not valid after the restart", p)
	}
	if after := inode(t, d.sock); after != before {
		t.Errorf("the socket file was replaced (inode %d, then %d)", before, after)
	}
	c.Close() // an open connection would hold the stop for its grace
	d.verifyStopped(t)
}

// TestSocketActivationJobSocket: systemd may pass job sockets too (a
// socket unit with several ListenStream=): the daemon serves each on the
// --listen whose path it has, with that socket's policy, and leaves it to
// systemd, so that a job connecting while the daemon restarts waits for
// the new one instead of failing.
func TestSocketActivationJobSocket(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("job sockets are nixyard's")
	}
	e := newEnv(t)
	job := filepath.Join(e.dir, "jobs", "socket")
	d := e.startDaemon(t, socketActivated(job), withDaemonArgs("--listen", job+",tenant=ci"))
	before := inode(t, job)
	jobURL := "unix://" + job + "?root=" + d.root
	e.cmd("nix", "store", "ping", "--store", jobURL).ok(t)
	d.stop(t)
	c, err := net.Dial("unix", job)
	if err != nil {
		t.Fatalf("connecting to the job socket while no daemon runs: %v", err)
	}
	defer c.Close()
	d.start(t)
	c.SetDeadline(time.Now().Add(time.Minute))
	early := &protoConn{c: c, r: bufio.NewReader(c), w: bufio.NewWriter(c), client: clientProto}
	if err := early.handshake(); err != nil {
		t.Fatalf("handshake of the job client that connected during the restart: %v", err)
	}
	if after := inode(t, job); after != before {
		t.Errorf("the job socket file was replaced (inode %d, then %d)", before, after)
	}
	log, _ := os.ReadFile(d.logPath)
	if !strings.Contains(string(log), "using the job socket passed by systemd") || !strings.Contains(string(log), "tenant=ci") {
		t.Errorf("the daemon's log does not say it took the job socket from systemd:\n%s", log)
	}
}

// TestStdioForwards runs `nix-daemon --stdio` (what ssh-ng runs on the
// remote side) as a user who may not write the store: as with Nix, it
// forwards the client to the daemon socket, and the daemon treats the
// user as untrusted rather than the stdio client as trusted.
func TestStdioForwards(t *testing.T) {
	t.Parallel()
	d := startDaemon(t, withConf("allowed-users = *"))
	u := d.unprivileged(t)
	url := "ssh-ng://localhost?remote-program=" + d.nixDaemonLink(t)
	// The remote program inherits the client's environment: the store's
	// state directory (not writable by u) and the daemon's socket.
	env := []string{"NIX_STATE_DIR=" + filepath.Join(d.root, "nix/var/nix"), "NIX_DAEMON_SOCKET_PATH=" + d.sock, "NIX_REMOTE=", "NIX_CONFIG=store = auto"}
	p := oneLine(t, "add", d.cmd("nix-store", "--add", d.file(t, "fwd/forwarded.txt", "through the daemon"), "--store", url).as(u).withEnv(env...).ok(t))
	if !d.isValid(t, p) {
		t.Fatalf("%s, added over ssh-ng as uid %d, is not valid in the daemon", p, u.uid)
	}
	log, err := os.ReadFile(d.logPath)
	if err != nil {
		t.Fatal(err)
	}
	if !useStock && !strings.Contains(string(log), "(untrusted)") {
		t.Errorf("the daemon logged no untrusted connection; log:\n%s", log)
	}
}

// TestSocketActivationUnknownSocket: with job sockets, a passed socket
// that is neither the default socket nor a --listen one (a misspelt path)
// stops the daemon rather than becoming a socket that trusts by uid.
func TestSocketActivationUnknownSocket(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("job sockets are nixyard's")
	}
	e := newEnv(t)
	d := &daemon{testEnv: e, root: filepath.Join(e.dir, "root"), confDir: filepath.Join(e.dir, "daemon-conf"), home: filepath.Join(e.dir, "daemon-home")}
	d.sock = filepath.Join(d.root, "nix/var/nix/daemon-socket/socket")
	mustMkdir(t, d.confDir, 0o755)
	mustMkdir(t, d.home, 0o755)
	writeFile(t, filepath.Join(d.confDir, "nix.conf"), "sandbox = false\n", 0o644)
	passed := d.activationSocket(t, filepath.Join(e.dir, "jobs", "socket"))
	argv := daemonArgv(d.root, "--listen", filepath.Join(e.dir, "job", "socket")+",tenant=ci")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second) // a daemon that starts is killed
	defer cancel()
	x := exec.CommandContext(ctx, "/bin/sh", append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`}, argv...)...)
	x.ExtraFiles = []*os.File{passed}
	x.Env = d.daemonEnv()
	out, err := x.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "neither the default socket") {
		t.Errorf("a daemon passed a socket no --listen names: %v\n%s", err, out)
	}
}

// TestSecondDaemonRefused: a daemon started on a store whose socket
// another daemon serves refuses to start, and says only that: nothing
// about the store it would have opened (it spoke of the other daemon's
// job journals first), and the serving daemon does not log its check as
// a failed connection.
func TestSecondDaemonRefused(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon replaces the socket of a daemon that serves it")
	}
	d := startDaemon(t)
	argv := daemonArgv(d.root)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = d.daemonEnv()
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another daemon is listening there; stop it first") || strings.Contains(string(out), "journals") {
		t.Errorf("a second daemon on a served store (%v):\n%s", err, out)
	}
	d.client("nix", "store", "ping").ok(t)
	if log, err := os.ReadFile(d.logPath); err != nil || strings.Contains(string(log), "connection ended with an error") {
		t.Errorf("the serving daemon logged the second one's check as a failure (%v):\n%s", err, log)
	}
}

// TestStartWhileOldDaemonLetsGo: a daemon started just after the one
// before was told to stop, which has not let go of its socket yet (a busy
// daemon takes a moment), waits for it instead of refusing to start.
func TestStartWhileOldDaemonLetsGo(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon replaces the socket of a daemon that serves it")
	}
	d := startDaemon(t)
	d.stop(t)
	old, err := net.Listen("unix", d.sock) // the old daemon's socket, still answering
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(time.Second, func() { old.Close() })
	d.start(t)
	d.client("nix", "store", "ping").ok(t)
}
