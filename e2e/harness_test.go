package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// testEnv is one test's private world: a temporary directory, a client
// configuration and a client environment that never reach the machine's
// /nix, /etc/nix or the invoking user's home.
type testEnv struct {
	dir        string // the test's t.TempDir()
	nonce      string // unique per test; mixed into file contents so store paths never collide across tests
	clientConf string // NIX_CONF_DIR of the clients
	home       string // HOME of root clients
}

// newEnv makes a testEnv under t.TempDir().
func newEnv(t *testing.T) *testEnv {
	t.Helper()
	dir := t.TempDir()
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	e := &testEnv{
		dir:        dir,
		nonce:      hex.EncodeToString(b[:]),
		clientConf: filepath.Join(dir, "client-conf"),
		home:       filepath.Join(dir, "home"),
	}
	mustMkdir(t, e.clientConf, 0o755)
	mustMkdir(t, e.home, 0o755)
	mustMkdir(t, filepath.Join(dir, "tmp"), 0o1777)
	// store = dummy:// is a safety net: a command that opens the default
	// store instead of the --store it was given fails here rather than
	// touching the machine's /nix (nix-store opens the default store even
	// for --print-fixed-path and --generate-binary-cache-key).
	//
	// build-users-group is empty: fixture builds in chroot stores then run
	// without the nixbld users. With them, Nix kills every process of the
	// build user it picks, and each test's private NIX_STATE_DIR has its own
	// userpool, so parallel tests (or other packages' tests) would kill one
	// another's builders.
	writeFile(t, filepath.Join(e.clientConf, "nix.conf"),
		"experimental-features = nix-command\nsandbox = false\nsubstituters =\nbuild-users-group =\nstore = dummy://\n", 0o644)
	return e
}

// baseEnv returns a minimal environment for a Nix process: the test's own
// configuration, home, cache and state directories; NIX_CONFIG, NIX_REMOTE,
// NIX_PATH and the user's configuration files are absent.
func (e *testEnv) baseEnv(home, confDir string) []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	return []string{
		"PATH=" + path,
		"HOME=" + home,
		"XDG_CACHE_HOME=" + filepath.Join(home, ".cache"),
		"XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		"XDG_DATA_HOME=" + filepath.Join(home, ".local", "share"),
		"XDG_CONFIG_DIRS=" + filepath.Join(home, ".xdg-config-dirs"),
		"NIX_CONF_DIR=" + confDir,
		"NIX_USER_CONF_FILES=",
		"NIX_STATE_DIR=" + filepath.Join(home, ".nix-state"),
		"NIX_LOG_DIR=" + filepath.Join(home, ".nix-log"),
		"TMPDIR=" + filepath.Join(e.dir, "tmp"),
		"TERM=dumb",
		"LANG=C.UTF-8",
	}
}

// user is an unprivileged account a client command can run as.
type user struct {
	uid, gid int
	home     string
}

// unprivileged returns the account "nobody" with a private home, and makes
// the test directory traversable so that it can reach the store and the
// daemon socket.
func (e *testEnv) unprivileged(t *testing.T) *user {
	t.Helper()
	u := &user{uid: 65534, gid: 65534, home: filepath.Join(e.dir, "nobody-home")}
	mustMkdir(t, u.home, 0o755)
	if err := os.Chown(u.home, u.uid, u.gid); err != nil {
		t.Fatal(err)
	}
	// t.TempDir() makes 0700 directories (the test's and its parent).
	for _, d := range []string{e.dir, filepath.Dir(e.dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return u
}

// command is one client command to run in a testEnv.
type command struct {
	e     *testEnv
	name  string
	args  []string
	stdin []byte
	user  *user
	extra []string // extra environment entries
	dir   string
}

// cmd prepares the command name with args in the test's client environment.
func (e *testEnv) cmd(name string, args ...string) *command {
	return &command{e: e, name: name, args: args, dir: e.dir}
}

// withStdin feeds b to the command's standard input.
func (c *command) withStdin(b []byte) *command { c.stdin = b; return c }

// as runs the command as u instead of root.
func (c *command) as(u *user) *command { c.user = u; return c }

// withEnv adds environment entries (KEY=VALUE).
func (c *command) withEnv(kv ...string) *command { c.extra = append(c.extra, kv...); return c }

// result is the outcome of a command.
type result struct {
	cmdline        string
	stdout, stderr string
	err            error
}

func (r result) String() string {
	return fmt.Sprintf("command: %s\nerror: %v\n--- stdout ---\n%s\n--- stderr ---\n%s", r.cmdline, r.err, r.stdout, r.stderr)
}

// exec builds the exec.Cmd for c.
func (c *command) exec() *exec.Cmd {
	x := exec.Command(c.name, c.args...)
	x.Dir = c.dir
	home := c.e.home
	if c.user != nil {
		home = c.user.home
		x.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{
			Uid: uint32(c.user.uid), Gid: uint32(c.user.gid), Groups: []uint32{},
		}}
	}
	x.Env = append(c.e.baseEnv(home, c.e.clientConf), c.extra...)
	if c.stdin != nil {
		x.Stdin = bytes.NewReader(c.stdin)
	}
	return x
}

// run runs the command to completion.
func (c *command) run(t *testing.T) result {
	t.Helper()
	x := c.exec()
	var stdout, stderr bytes.Buffer
	x.Stdout, x.Stderr = &stdout, &stderr
	err := x.Run()
	return result{
		cmdline: shellQuote(append([]string{c.name}, c.args...)),
		stdout:  stdout.String(), stderr: stderr.String(), err: err,
	}
}

// ok runs the command, fails the test unless it succeeds, and returns its
// standard output.
func (c *command) ok(t *testing.T) string {
	t.Helper()
	r := c.run(t)
	if r.err != nil {
		t.Fatalf("command failed unexpectedly:\n%s", r)
	}
	return r.stdout
}

// fails runs the command, fails the test if it succeeds, and returns its
// standard error.
func (c *command) fails(t *testing.T) string {
	t.Helper()
	r := c.run(t)
	if r.err == nil {
		t.Fatalf("command succeeded, want failure:\n%s", r)
	}
	var ee *exec.ExitError
	if !errors.As(r.err, &ee) {
		t.Fatalf("command did not run:\n%s", r)
	}
	return r.stderr
}

func shellQuote(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		if a != "" && strings.IndexFunc(a, func(r rune) bool {
			return !(r == '/' || r == '.' || r == '-' || r == '_' || r == '=' || r == ':' || r == '+' ||
				r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z')
		}) < 0 {
			q[i] = a
			continue
		}
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// directStore is the store URL with which real Nix opens the store under
// root directly, without any daemon.
func directStore(root string) string { return "local?root=" + root }

// local runs a client command against the store under root opened
// directly by real Nix; "--store local?root=ROOT" is appended to args.
func (e *testEnv) local(root, name string, args ...string) *command {
	return e.cmd(name, append(args, "--store", directStore(root))...)
}

// daemon is a store daemon (nixyard or the reference nix-daemon) serving a
// private store root.
type daemon struct {
	*testEnv
	root    string // the chroot: the store is root/nix/store
	confDir string // the daemon's NIX_CONF_DIR
	sock    string // NIX_DAEMON_SOCKET_PATH
	logPath string
	home    string // the daemon's HOME
	cfg     daemonConfig

	proc   *exec.Cmd
	exited chan struct{} // closed when proc has exited
	// listeners are the sockets made for a socket-activated daemon, by
	// path, kept open across restarts as systemd keeps them.
	listeners map[string]*os.File
}

// daemonOpt configures startDaemon.
type daemonOpt func(*daemonConfig)

type daemonConfig struct {
	conf          []string
	asNixDaemon   bool // run the binary through a symlink named nix-daemon
	defaultSocket bool // leave NIX_DAEMON_SOCKET_PATH unset
	args          []string
	env           []string // extra environment entries for the daemon
	// socketActivated makes the socket in the test, as systemd's
	// nix-daemon.socket does, and passes it to the daemon as file
	// descriptor 3 with LISTEN_FDS and LISTEN_PID.
	socketActivated bool
	// activatedJobSockets are job sockets (--listen) passed as well, as
	// file descriptors 4, 5, ….
	activatedJobSockets []string
}

// withDaemonArgs adds arguments to the daemon's command line.
func withDaemonArgs(args ...string) daemonOpt {
	return func(c *daemonConfig) { c.args = append(c.args, args...) }
}

// asNixDaemon runs the daemon binary through a symlink named nix-daemon,
// with nix-daemon's arguments (the drop-in installation).
func asNixDaemon() daemonOpt {
	return func(c *daemonConfig) { c.asNixDaemon = true }
}

// withDefaultSocket leaves NIX_DAEMON_SOCKET_PATH unset, so the daemon
// picks its socket path itself.
func withDefaultSocket() daemonOpt {
	return func(c *daemonConfig) { c.defaultSocket = true }
}

// withDaemonEnv adds entries (KEY=VALUE) to the daemon's environment.
func withDaemonEnv(kv ...string) daemonOpt {
	return func(c *daemonConfig) { c.env = append(c.env, kv...) }
}

// socketActivated starts the daemon as systemd socket activation does,
// with the default socket and the job sockets at jobSockets.
func socketActivated(jobSockets ...string) daemonOpt {
	return func(c *daemonConfig) { c.socketActivated, c.activatedJobSockets = true, jobSockets }
}

// withConf adds lines to the daemon's nix.conf.
func withConf(lines ...string) daemonOpt {
	return func(c *daemonConfig) { c.conf = append(c.conf, lines...) }
}

// startDaemon starts a daemon on a fresh store root in a new testEnv and
// stops it when the test ends.
func startDaemon(t *testing.T, opts ...daemonOpt) *daemon {
	t.Helper()
	return newEnv(t).startDaemon(t, opts...)
}

// startDaemon starts a daemon on a fresh store root inside e.
func (e *testEnv) startDaemon(t *testing.T, opts ...daemonOpt) *daemon {
	t.Helper()
	var cfg daemonConfig
	for _, o := range opts {
		o(&cfg)
	}
	d := &daemon{
		testEnv: e,
		root:    filepath.Join(e.dir, "root"),
		confDir: filepath.Join(e.dir, "daemon-conf"),
		logPath: filepath.Join(e.dir, "daemon.log"),
		home:    filepath.Join(e.dir, "daemon-home"),
		cfg:     cfg,
	}
	d.sock = filepath.Join(d.root, "nix/var/nix/daemon-socket/socket")
	mustMkdir(t, d.confDir, 0o755)
	mustMkdir(t, d.home, 0o755)
	conf := []string{
		"experimental-features = nix-command",
		"sandbox = false",
		"substituters =",
		"trusted-users = root",
		"build-users-group =",
	}
	writeFile(t, filepath.Join(d.confDir, "nix.conf"), strings.Join(append(conf, cfg.conf...), "\n")+"\n", 0o644)
	t.Cleanup(func() {
		if d.running() {
			d.kill(t, syscall.SIGKILL)
		}
		log, _ := os.ReadFile(d.logPath)
		if i := bytes.Index(log, []byte("WARNING: DATA RACE")); i >= 0 {
			t.Errorf("the daemon reported a data race (%s):\n%s", d.logPath, log[i:min(len(log), i+8<<10)])
		}
		if t.Failed() {
			if len(log) > 16<<10 {
				log = append([]byte("…"), log[len(log)-16<<10:]...)
			}
			t.Logf("daemon log (%s):\n%s", d.logPath, log)
		}
	})
	d.start(t)
	return d
}

// daemonArgv is the command line that serves the store under root; extra
// arguments (e.g. --stdio) follow.
func daemonArgv(root string, extra ...string) []string {
	if useStock {
		return append([]string{stockDaemon, "--store", root}, extra...)
	}
	return append([]string{nixyardBin, "daemon", "--store", root}, extra...)
}

// argv is the daemon's command line: daemonArgv, or with asNixDaemon the
// binary called through a symlink named nix-daemon.
func (d *daemon) argv(t *testing.T) []string {
	t.Helper()
	args := d.cfg.args
	if !useStock && !slices.Contains(args, "--shutdown-grace") {
		// A test's own connection left open would hold its daemon's stop
		// for the grace: tests that mean to drain say so.
		args = append(slices.Clone(args), "--shutdown-grace", "0")
	}
	if !d.cfg.asNixDaemon {
		return daemonArgv(d.root, args...)
	}
	return append([]string{d.nixDaemonLink(t), "--store", d.root}, args...)
}

// nixDaemonLink makes (once) a symlink named nix-daemon to the daemon
// binary and returns its path.
func (d *daemon) nixDaemonLink(t *testing.T) string {
	t.Helper()
	link := filepath.Join(d.dir, "bin", "nix-daemon")
	if _, err := os.Lstat(link); err == nil {
		return link
	}
	target := nixyardBin
	if useStock {
		target = stockDaemon
	}
	mustMkdir(t, filepath.Dir(link), 0o755)
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	return link
}

// testHostStateDir stands for the host's state directory (/nix/var/nix)
// in the tests' daemons: the internal/build tests lock build users in its
// userpool too.
var testHostStateDir = filepath.Join(os.TempDir(), "nixyard-test-state")

// daemonEnv is the daemon's environment.
func (d *daemon) daemonEnv() []string {
	env := d.baseEnv(d.home, d.confDir)
	// The daemon's state and log directories follow from --store; only the
	// client-side defaults of baseEnv are dropped. NIX_STATE_DIR is the
	// host's state directory, where a daemon that builds as build users
	// locks them (whatever store it serves): one for all the tests on the
	// machine, as the host's is one for all its daemons.
	out := env[:0]
	for _, kv := range env {
		if strings.HasPrefix(kv, "NIX_STATE_DIR=") || strings.HasPrefix(kv, "NIX_LOG_DIR=") {
			continue
		}
		out = append(out, kv)
	}
	out = append(out, "NIX_STATE_DIR="+testHostStateDir)
	out = append(out, d.cfg.env...)
	if d.cfg.defaultSocket {
		return out
	}
	return append(out, "NIX_DAEMON_SOCKET_PATH="+d.sock)
}

// start (re)starts the daemon on d.root and waits until its socket accepts
// connections.
func (d *daemon) start(t *testing.T) {
	t.Helper()
	if d.running() {
		t.Fatal("start: the daemon is already running")
	}
	log, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	argv := d.argv(t)
	var extraFiles []*os.File
	if d.cfg.socketActivated {
		extraFiles = []*os.File{d.activationSocket(t, d.sock)}
		for _, p := range d.cfg.activatedJobSockets {
			extraFiles = append(extraFiles, d.activationSocket(t, p))
		}
		// systemd sets LISTEN_PID to the pid of the process it execs.
		argv = append([]string{"/bin/sh", "-c", fmt.Sprintf(`LISTEN_PID=$$ LISTEN_FDS=%d exec "$0" "$@"`, len(extraFiles))}, argv...)
	}
	fmt.Fprintf(log, "=== %s: %s\n", time.Now().Format(time.RFC3339Nano), shellQuote(argv))
	x := exec.Command(argv[0], argv[1:]...)
	x.ExtraFiles = extraFiles
	x.Dir = d.dir
	x.Env = d.daemonEnv()
	x.Stdout, x.Stderr = log, log
	x.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := x.Start(); err != nil {
		t.Fatalf("starting %s: %v", shellQuote(argv), err)
	}
	d.proc = x
	exited := make(chan struct{})
	d.exited = exited
	go func() { x.Wait(); close(exited) }()

	// Wait until the socket accepts. A stale socket file left by a killed
	// daemon refuses connections until the new one has bound it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		// A full handshake, so the daemon logs no half-open connection.
		c, err := net.Dial("unix", d.sock)
		if err == nil {
			// A socket nobody accepts on (a socket-activated daemon that
			// ignores the one it was given) must not hold the loop up.
			c.SetDeadline(time.Now().Add(5 * time.Second))
			p := &protoConn{c: c, r: bufio.NewReader(c), w: bufio.NewWriter(c), client: clientProto}
			err = p.handshake()
			c.Close()
			if err == nil {
				return
			}
		}
		select {
		case <-exited:
			out, _ := os.ReadFile(d.logPath)
			t.Fatalf("daemon %s exited before accepting connections (%v); log:\n%s", shellQuote(argv), x.ProcessState, out)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(d.logPath)
			t.Fatalf("daemon %s: socket %s does not accept connections after 30s (last error %v); log:\n%s", shellQuote(argv), d.sock, err, out)
		}
	}
}

// activationSocket makes (once) the listening socket at path that a
// socket-activated daemon gets, as systemd's socket unit makes it (mode
// 0666), and returns it as a file to pass on.
func (d *daemon) activationSocket(t *testing.T, path string) *os.File {
	t.Helper()
	if f := d.listeners[path]; f != nil {
		return f
	}
	mustMkdir(t, filepath.Dir(path), 0o755)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	f, err := l.File()
	l.Close() // f keeps the socket open
	if err != nil {
		t.Fatal(err)
	}
	if d.listeners == nil {
		d.listeners = map[string]*os.File{}
	}
	d.listeners[path] = f
	t.Cleanup(func() { f.Close() })
	return f
}

func (d *daemon) running() bool {
	if d.exited == nil {
		return false
	}
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// stop stops the daemon and every process it started (SIGTERM, then
// SIGKILL after 10 s) and waits for it to exit.
func (d *daemon) stop(t *testing.T) {
	t.Helper()
	d.kill(t, syscall.SIGTERM)
}

// crash kills the daemon and all its processes with SIGKILL.
func (d *daemon) crash(t *testing.T) {
	t.Helper()
	d.kill(t, syscall.SIGKILL)
}

func (d *daemon) kill(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if !d.running() {
		t.Fatal("the daemon is not running")
	}
	signalTree(d.proc.Process.Pid, sig)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		signalTree(d.proc.Process.Pid, syscall.SIGKILL)
		<-d.exited
	}
}

// signalTree sends sig to pid and all its descendants. The stock
// nix-daemon forks a child per connection, each in its own session, so
// killing the process group is not enough: the tree is frozen with SIGSTOP
// first (so nothing forks or is reparented unseen), then signalled.
func signalTree(pid int, sig syscall.Signal) {
	frozen := map[int]bool{pid: true}
	syscall.Kill(pid, syscall.SIGSTOP)
	for {
		grew := false
		for _, p := range descendants(pid) {
			if !frozen[p] {
				frozen[p] = true
				grew = true
				syscall.Kill(p, syscall.SIGSTOP)
			}
		}
		if !grew {
			break
		}
	}
	for p := range frozen {
		syscall.Kill(p, sig)
		if sig != syscall.SIGKILL {
			syscall.Kill(p, syscall.SIGCONT)
		}
	}
}

// descendants lists the processes below pid, read from /proc.
func descendants(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	children := map[int][]int{}
	for _, ent := range ents {
		p, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + ent.Name() + "/stat")
		if err != nil {
			continue
		}
		// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 {
			continue
		}
		pp, _ := strconv.Atoi(f[1])
		children[pp] = append(children[pp], p)
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// url is the daemon's store URL for clients. ?root= lets the client read
// store contents from the daemon's chroot, as it reads /nix/store for the
// system daemon.
func (d *daemon) url() string { return "unix://" + d.sock + "?root=" + d.root }

// client prepares a client command against the daemon ("--store URL" is
// appended to args).
func (d *daemon) client(name string, args ...string) *command {
	return d.cmd(name, append(args, "--store", d.url())...)
}

// nix runs "nix ARGS --store URL" through the daemon and returns stdout.
func (d *daemon) nix(t *testing.T, args ...string) string {
	t.Helper()
	return d.client("nix", args...).ok(t)
}

// nixStore runs "nix-store ARGS --store URL" and returns stdout.
func (d *daemon) nixStore(t *testing.T, args ...string) string {
	t.Helper()
	return d.client("nix-store", args...).ok(t)
}

// nixFails runs "nix ARGS --store URL", expects it to fail and returns stderr.
func (d *daemon) nixFails(t *testing.T, args ...string) string {
	t.Helper()
	return d.client("nix", args...).fails(t)
}

// nixStoreFails runs "nix-store ARGS --store URL", expects it to fail and
// returns stderr.
func (d *daemon) nixStoreFails(t *testing.T, args ...string) string {
	t.Helper()
	return d.client("nix-store", args...).fails(t)
}

// realPath maps a store path to the file that holds it under d.root.
func (d *daemon) realPath(storePath string) string { return filepath.Join(d.root, storePath) }

// isValid reports whether the daemon says path is valid ("nix-store
// --check-validity"), failing the test if the query itself goes wrong.
func (d *daemon) isValid(t *testing.T, path string) bool {
	t.Helper()
	r := d.client("nix-store", "--check-validity", path).run(t)
	if r.err == nil {
		return true
	}
	if strings.Contains(r.stderr, "is not valid") {
		return false
	}
	t.Fatalf("nix-store --check-validity failed without saying the path is invalid:\n%s", r)
	return false
}

// --- files ---

func mustMkdir(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
}

// writeFile writes contents to path (creating its directory) with mode.
func writeFile(t *testing.T, path, contents string, mode os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(contents), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// file writes a file under the test directory whose contents are unique
// to this test (the nonce is appended) and returns its absolute path.
func (e *testEnv) file(t *testing.T, rel, contents string) string {
	t.Helper()
	return writeFile(t, filepath.Join(e.dir, rel), contents+"\n"+e.nonce+"\n", 0o644)
}

// randomBytes returns n random bytes.
func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// tree is a directory to create: relative path → entry. Entries ending in
// "/" are directories, "->target" makes a symlink, "*contents" an
// executable file, anything else a regular file.
type tree map[string]string

// mkTree creates the tree under the test directory at rel and returns its
// absolute path.
func (e *testEnv) mkTree(t *testing.T, rel string, entries tree) string {
	t.Helper()
	base := filepath.Join(e.dir, rel)
	mustMkdir(t, base, 0o755)
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		v := entries[n]
		p := filepath.Join(base, n)
		switch {
		case strings.HasSuffix(n, "/"):
			mustMkdir(t, p, 0o755)
		case strings.HasPrefix(v, "->"):
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(v[2:], p); err != nil {
				t.Fatal(err)
			}
		case strings.HasPrefix(v, "*"):
			writeFile(t, p, v[1:]+e.nonce+"\n", 0o755)
		default:
			writeFile(t, p, v+e.nonce+"\n", 0o644)
		}
	}
	return base
}

// lines splits command output into its non-empty lines.
func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// oneLine returns the only non-empty line of s, failing the test otherwise.
func oneLine(t *testing.T, what, s string) string {
	t.Helper()
	l := lines(s)
	if len(l) != 1 {
		t.Fatalf("%s: want exactly one line, got %q", what, s)
	}
	return l[0]
}

// sortedLines returns the non-empty lines of s, sorted.
func sortedLines(s string) []string {
	l := lines(s)
	sort.Strings(l)
	return l
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// stdioWrapper writes an executable script that serves the daemon's store
// over stdin/stdout, for ssh-ng://localhost?remote-program=SCRIPT (Nix runs
// "bash -c 'SCRIPT --stdio'" for localhost instead of ssh). It execs
// "nixyard daemon --store ROOT --stdio" or "nix-daemon --store ROOT --stdio"
// with the daemon's configuration.
func (d *daemon) stdioWrapper(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("#!/bin/sh\n")
	for _, kv := range d.daemonEnv() {
		k, v, _ := strings.Cut(kv, "=")
		if k == "NIX_DAEMON_SOCKET_PATH" {
			continue
		}
		fmt.Fprintf(&b, "export %s=%s\n", k, shellQuote([]string{v}))
	}
	b.WriteString("unset NIX_STATE_DIR NIX_LOG_DIR NIX_DAEMON_SOCKET_PATH NIX_REMOTE NIX_CONFIG\n")
	fmt.Fprintf(&b, "exec %s \"$@\"\n", shellQuote(daemonArgv(d.root)))
	return writeFile(t, filepath.Join(d.dir, "stdio-daemon"), b.String(), 0o755)
}

// sshNG is the ssh-ng store URL that runs the daemon's stdio wrapper.
func (d *daemon) sshNG(t *testing.T) string {
	t.Helper()
	return "ssh-ng://localhost?remote-program=" + d.stdioWrapper(t)
}

// logEvent is one line of a client's `--log-format internal-json` output;
// for a result, ActType is the type of the activity it is on.
type logEvent struct {
	Action   string
	ID, Type float64
	Fields   []any
	ActType  float64 `json:"-"`
}

// logEvents parses a client's `--log-format internal-json` output
// (stderr), skipping other lines.
func logEvents(stderr string) []logEvent {
	types := map[float64]float64{} // activity id -> type
	var out []logEvent
	for _, line := range strings.Split(stderr, "\n") {
		var e logEvent
		if json.Unmarshal([]byte(strings.TrimPrefix(line, "@nix ")), &e) != nil {
			continue
		}
		if e.Action == "start" {
			types[e.ID] = e.Type
		}
		e.ActType = types[e.ID]
		out = append(out, e)
	}
	return out
}

// lastResult returns the fields of the last result of type resType on an
// activity of type actType in a client's `--log-format internal-json`
// output (stderr), or nil.
func lastResult(stderr string, actType, resType float64) []any {
	var last []any
	for _, e := range logEvents(stderr) {
		if e.Action == "result" && e.Type == resType && e.ActType == actType {
			last = e.Fields
		}
	}
	return last
}

// successor returns a daemon like d on the same store root, not started:
// the daemon of an upgrade, started while d may still be stopping.
func (d *daemon) successor(t *testing.T) *daemon {
	t.Helper()
	n := *d
	n.proc, n.exited = nil, nil
	t.Cleanup(func() {
		if n.running() {
			n.kill(t, syscall.SIGKILL)
		}
	})
	return &n
}
