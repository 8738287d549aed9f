package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"
)

// Env is the environment shared by the daemons and the Nix clients of a
// run: a private HOME, cache, state and configuration directory, so nothing
// reads or writes the machine's /nix or the caller's settings.
type Env struct {
	Work    string // private directory for HOME, caches and nix.conf
	ConfDir string // NIX_CONF_DIR
}

// NewEnv creates the private directories and nix.conf under work. The
// nix.conf turns substituters, the sandbox and build users off; conf lines
// given here come after those and override them.
func NewEnv(work string, conf ...string) (*Env, error) {
	e := &Env{Work: work, ConfDir: filepath.Join(work, "conf")}
	for _, d := range []string{"conf", "home", "cache", "state", "log"} {
		if err := os.MkdirAll(filepath.Join(work, d), 0o755); err != nil {
			return nil, fmt.Errorf("creating %s: %w", d, err)
		}
	}
	lines := append([]string{
		"experimental-features = nix-command",
		"sandbox = false",
		"substituters =",
		"build-users-group =",
	}, conf...)
	if err := os.WriteFile(filepath.Join(e.ConfDir, "nix.conf"), []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		return nil, fmt.Errorf("writing nix.conf: %w", err)
	}
	return e, nil
}

// Vars returns the process environment for a daemon or client: the caller's
// environment without any NIX_* variable, plus the private directories.
func (e *Env) Vars(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "NIX_"), k == "HOME", k == "XDG_CACHE_HOME", k == "XDG_CONFIG_HOME", k == "XDG_DATA_HOME":
			continue
		}
		out = append(out, kv)
	}
	out = append(out,
		"HOME="+filepath.Join(e.Work, "home"),
		"XDG_CACHE_HOME="+filepath.Join(e.Work, "cache"),
		"XDG_CONFIG_HOME="+filepath.Join(e.Work, "home/.config"),
		"XDG_DATA_HOME="+filepath.Join(e.Work, "home/.local/share"),
		"NIX_CONF_DIR="+e.ConfDir,
		"NIX_STATE_DIR="+filepath.Join(e.Work, "state"),
		"NIX_LOG_DIR="+filepath.Join(e.Work, "log"),
	)
	return append(out, extra...)
}

// DaemonSpec says how to start one kind of daemon on a chroot store.
type DaemonSpec struct {
	Name string                     // "nix-daemon" or "nixyard"
	Argv func(root string) []string // command line serving the chroot store at root
}

// StockDaemon is Nix's own daemon.
func StockDaemon() DaemonSpec {
	return DaemonSpec{Name: "nix-daemon", Argv: func(root string) []string {
		return []string{"nix-daemon", "--store", root}
	}}
}

// NixyardDaemon is the nixyard binary at bin.
func NixyardDaemon(bin string) DaemonSpec {
	return DaemonSpec{Name: "nixyard", Argv: func(root string) []string {
		return []string{bin, "daemon", "--store", root}
	}}
}

// Daemon is a running daemon serving a chroot store.
type Daemon struct {
	Spec    DaemonSpec
	Root    string // chroot store root
	Socket  string
	LogPath string // its standard output and error
	cmd     *exec.Cmd
	done    chan error
	log     *os.File
}

// StoreURL is the URL a Nix client uses to reach the daemon: unix:// with
// ?root= so that the client, which reads NARs from its own file system,
// finds the chroot store's files.
func (d *Daemon) StoreURL() string {
	return "unix://" + d.Socket + "?root=" + d.Root
}

// StartDaemon starts spec on the chroot store at root (created if missing),
// with its socket at root/nix/var/nix/daemon-socket/socket and its log in
// logPath, and waits until a client can connect and complete the handshake.
func StartDaemon(ctx context.Context, env *Env, spec DaemonSpec, root, logPath string) (*Daemon, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("creating store root: %w", err)
	}
	d := &Daemon{Spec: spec, Root: root, Socket: filepath.Join(root, "nix/var/nix/daemon-socket/socket"), LogPath: logPath, done: make(chan error, 1)}
	if len(d.Socket) > 100 {
		return nil, fmt.Errorf("socket path %s is too long for a Unix socket", d.Socket)
	}
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("creating daemon log: %w", err)
	}
	d.log = lf
	argv := spec.Argv(root)
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Env = env.Vars("NIX_DAEMON_SOCKET_PATH=" + d.Socket)
	d.cmd.Stdout, d.cmd.Stderr = lf, lf
	if err := d.cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("starting %s: %w", spec.Name, err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	exited := func() error {
		select {
		case werr := <-d.done:
			d.done <- werr
			return fmt.Errorf("%s exited at start-up (%v); see %s", spec.Name, werr, logPath)
		default:
			return nil
		}
	}
	if err := awaitHandshake(ctx, d.Socket, 15*time.Second, exited); err != nil {
		d.Stop()
		return nil, fmt.Errorf("%s: %w; see %s", spec.Name, err, logPath)
	}
	return d, nil
}

// awaitHandshake dials socket until a client handshake completes (so that
// readiness also proves the server speaks the protocol, and no server logs
// a half-open probe), exited reports the server gone, ctx ends or timeout
// passes.
func awaitHandshake(ctx context.Context, socket string, timeout time.Duration, exited func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := Dial(pctx, socket)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if xerr := exited(); xerr != nil {
			return xerr
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no handshake on %s within %v: %w", socket, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop terminates the daemon and every process it forked (the stock daemon
// forks one child per connection, each in its own session).
func (d *Daemon) Stop() error {
	err := KillTree(d.cmd.Process.Pid, 5*time.Second)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		err = errors.Join(err, fmt.Errorf("%s (pid %d) was not reaped", d.Spec.Name, d.cmd.Process.Pid))
	}
	d.log.Close()
	return err
}

// Nix runs a Nix client command in env with the given stdin (may be nil)
// and returns its standard output. Its standard error goes to the error
// when it fails. The process tree is killed if ctx ends.
func Nix(ctx context.Context, env *Env, stdin io.Reader, name string, args ...string) ([]byte, error) {
	var out bytes.Buffer
	_, err := runNix(ctx, env, nil, stdin, &out, name, args...)
	return out.Bytes(), err
}

// ClientRun is how long a client ran and the CPU time it used (user and
// system).
type ClientRun struct {
	Wall, CPU time.Duration
}

// RunClient runs a Nix client command in env with extra environment
// variables, and returns its wall and CPU time. Its standard output is
// dropped; the end of its standard error goes to the error when it fails.
// The process tree is killed if ctx ends.
func RunClient(ctx context.Context, env *Env, extraEnv []string, name string, args ...string) (ClientRun, error) {
	return runNix(ctx, env, extraEnv, nil, nil, name, args...)
}

// runNix runs name with args in env (and extraEnv), stdin and stdout as
// given (nil: none), and returns its wall and CPU time; when it fails, the
// error holds the command line and the end of its standard error.
func runNix(ctx context.Context, env *Env, extraEnv []string, stdin io.Reader, stdout io.Writer, name string, args ...string) (ClientRun, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env.Vars(extraEnv...)
	cmd.Dir = env.Work
	cmd.Stdin, cmd.Stdout = stdin, stdout
	cmd.Cancel = func() error { return KillTree(cmd.Process.Pid, time.Second) }
	cmd.WaitDelay = 10 * time.Second // a leftover child holding stderr open
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	run := ClientRun{Wall: time.Since(start)}
	if ps := cmd.ProcessState; ps != nil {
		run.CPU = ps.UserTime() + ps.SystemTime()
	}
	if err != nil {
		line := head(strings.Join(append([]string{name}, args...), " "), 300)
		return run, fmt.Errorf("%s: %w: %s", line, err, tail(strings.TrimSpace(stderr.String()), 2000))
	}
	return run, nil
}

// head returns the first n bytes of s (cut at a character boundary).
func head(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// tail returns the last n bytes of s (cut at a character boundary).
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := len(s) - n
	for i < len(s) && !utf8.RuneStart(s[i]) {
		i++
	}
	return "…" + s[i:]
}
