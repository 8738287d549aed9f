package daemon

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/daemon/client"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/jobs"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// testDaemon is a Server on a socket in a temporary dir, over a chroot
// store in another.
type testDaemon struct {
	root   string // store root: ROOT/nix/store, ROOT/nix/var/nix
	socket string
	st     *store.Store
	srv    *Server
	logs   *syncBuffer

	lastStderr string // of the last successful nix command
}

type syncBuffer struct {
	mu sync.Mutex
	bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.Buffer.Write(p)
}

// String returns what was written so far; the daemon may be writing.
func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.Buffer.String()
}

func startDaemon(t testing.TB, opts Options) *testDaemon {
	t.Helper()
	root := t.TempDir()
	st, err := store.Open(context.Background(), store.Config{
		StoreDir:     "/nix/store",
		RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir:     filepath.Join(root, "nix/var/nix"),
		LogDir:       filepath.Join(root, "nix/var/log/nix"),
		RequireSigs:  true,
	})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "socket")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	opts.Store = st
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	srv := New(opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
		st.Close()
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs.String())
		}
	})
	return &testDaemon{root: root, socket: sock, st: st, srv: srv, logs: logs}
}

func (d *testDaemon) storeURL() string { return "unix://" + d.socket + "?root=" + d.root }

// nix runs a real Nix 2.8 command against the daemon.
func (d *testDaemon) nix(t testing.TB, stdin []byte, name string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed", name)
	}
	full := append([]string{"--store", d.storeURL()}, args...)
	if name == "nix" {
		full = append([]string{"--extra-experimental-features", "nix-command"}, full...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, full...)
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "NIX_CONFIG=", "HOME="+home, "XDG_CACHE_HOME="+home, "NIX_CONF_DIR="+home)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), errors.New(strings.TrimSpace(stderr.String()) + " (" + err.Error() + ")")
	}
	d.lastStderr = stderr.String()
	return string(out), nil
}

func (d *testDaemon) mustNix(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := d.nix(t, nil, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return out
}

func TestNixClientSmoke(t *testing.T) {
	d := startDaemon(t, Options{})
	out, err := d.nix(t, nil, "nix", "store", "ping")
	if err != nil {
		t.Fatalf("nix store ping: %v", err)
	}
	if !strings.Contains(d.lastStderr, "Version: 2.8.0 (nixyard)") {
		t.Errorf("nix store ping printed %q / %q", out, d.lastStderr)
	}

	dir := t.TempDir()
	file := filepath.Join(dir, "hello.txt")
	os.WriteFile(file, []byte("hello nixyard\n"), 0o644)
	p := strings.TrimSpace(d.mustNix(t, "nix-store", "--add", file))
	if !strings.HasPrefix(p, "/nix/store/") || !strings.HasSuffix(p, "-hello.txt") {
		t.Fatalf("nix-store --add printed %q", p)
	}
	info := d.mustNix(t, "nix", "path-info", "--json", p)
	if !strings.Contains(info, `"narHash"`) {
		t.Errorf("path-info --json: %s", info)
	}
	if !strings.Contains(d.logs.String(), "accepted connection from pid") {
		t.Errorf("no accept log line")
	}
}

// TestHandshakeTimeout: a socket client that never sends its handshake is
// dropped, and its descriptor given back; one that handshakes is served
// past the timeout.
func TestHandshakeTimeout(t *testing.T) {
	d := startDaemon(t, Options{handshakeTimeout: 200 * time.Millisecond})
	idle, err := net.Dial("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := idle.Read(make([]byte, 1)); err == nil || os.IsTimeout(err) {
		t.Errorf("a client that sent nothing was not dropped: %v", err)
	}
	c, err := client.Dial(context.Background(), d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(300 * time.Millisecond)
	p, _ := storepath.ParseBase("00000000000000000000000000000000-x")
	if _, err := c.QueryPathInfo(context.Background(), p); !errors.Is(err, store.ErrNotValid) {
		t.Errorf("a client that handshook, after the timeout: %v, want 'not valid'", err)
	}
}

// TestRefusedHandshakeTimeout: a refused client that does not say hello
// (and so cannot hear why) is dropped within seconds, not a minute.
func TestRefusedHandshakeTimeout(t *testing.T) {
	d := startDaemon(t, Options{TrustedUsers: []string{"nobody"}, AllowedUsers: []string{"nobody"}, refusedHandshakeTimeout: 200 * time.Millisecond})
	idle, err := net.Dial("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := idle.Read(make([]byte, 1)); err == nil || os.IsTimeout(err) {
		t.Errorf("a refused client that sent nothing was not dropped: %v", err)
	}
}

// TestListenMaxConns: a socket with max-connections N tells a client
// beyond N open connections why it is refused; of a flood beyond that,
// maxToldOverCap are held to be told (each for the refused handshake's
// wait at most) and the rest closed at once, unheard (a flood holds few
// descriptors); once one of the N closes, the next is served.
func TestListenMaxConns(t *testing.T) {
	d := startDaemon(t, Options{refusedHandshakeTimeout: time.Minute})
	sock := filepath.Join(t.TempDir(), "job-socket")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- d.srv.ServeAll(ctx, []Listener{{Listener: l, Policy: ListenPolicy{Untrusted: true, MaxConns: 2}}})
	}()
	defer func() {
		cancel()
		<-done
	}()
	var held []*client.Client
	for range 2 {
		c, err := client.Dial(context.Background(), sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	if _, err := client.Dial(context.Background(), sock); err == nil || !strings.Contains(err.Error(), "too many connections") {
		t.Errorf("a third client: %v, want it told of too many connections", err)
	}
	// A flood that says nothing: some held (to be told), the rest closed.
	const flood = maxToldOverCap + 8
	closed := make(chan bool, flood)
	for range flood {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		go func() {
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err := c.Read(make([]byte, 1))
			closed <- err == io.EOF
		}()
	}
	nClosed := 0
	for range flood {
		if <-closed {
			nClosed++
		}
	}
	if nClosed < flood-maxToldOverCap {
		t.Errorf("%d of a flood of %d closed at once, want at least %d (the rest held to be told)", nClosed, flood, flood-maxToldOverCap)
	}
	held[0].Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := client.Dial(context.Background(), sock)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection served after one of two closed: %v", err)
		}
	}
}

// TestDrainClosesIdle: a stopping daemon serves its open connections on,
// but one that waits idle for its next op (a nix repl) is closed after
// idleCloseAfter rather than holding the stop for the whole grace.
func TestDrainClosesIdle(t *testing.T) {
	sock, stop := drainingServer(t, startDaemon(t, Options{}), ListenPolicy{}, 100*time.Millisecond)
	c, err := client.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestDrainKeepsPooledConnection: a client's connection idle in its pool
// while another of its connections works is not closed as idle (the
// client would fail when it took it again); once all of the client's
// connections are idle, they are.
func TestDrainKeepsPooledConnection(t *testing.T) {
	sock, stop := drainingServer(t, startDaemon(t, Options{}), ListenPolicy{}, 100*time.Millisecond)
	pooled, err := client.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer pooled.Close()
	working, err := client.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	// An op under way: its code sent, its arguments not yet.
	working.Out.U64(wire.OpIsValidPath)
	if err := working.Out.Flush(); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	servedAfterIdlePass(t, pooled, "the pooled connection, while another of its client's worked")
	// The op ends (its client goes); then the idle one is closed too.
	working.Close()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}

// TestDrainKeepsWorkingClient: a connection idle between operations whose
// client process works on its own (evaluating before its next op, say) is
// kept during a drain, though it was idle longer than idleCloseAfter
// when the stop came; once its client stops using CPU, it is closed as
// idle.
func TestDrainKeepsWorkingClient(t *testing.T) {
	var ticks atomic.Uint64
	working := atomic.Bool{}
	working.Store(true)
	cpu := func(int32) (uint64, bool) {
		if working.Load() {
			return ticks.Add(50), true // half a second of CPU a second
		}
		return ticks.Load(), true
	}
	sock, stop := drainingServerCPU(t, startDaemon(t, Options{}), ListenPolicy{}, 100*time.Millisecond, cpu)
	c, err := client.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(300 * time.Millisecond) // idle past idleCloseAfter before the stop
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	time.Sleep(1500 * time.Millisecond) // the first pass notes the CPU time
	servedAfterIdlePass(t, c, "the connection of a client that works on its own")
	working.Store(false)
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the connection was not closed once its client stopped working")
	}
}

// servedAfterIdlePass checks that c, idle, is still served once the
// draining daemon has passed over its connections for idle ones.
func servedAfterIdlePass(t *testing.T, c *client.Client, what string) {
	t.Helper()
	time.Sleep(1500 * time.Millisecond) // past a closeIdle pass
	p, _ := storepath.ParseBase("00000000000000000000000000000000-x")
	if _, err := c.QueryPathInfo(context.Background(), p); !errors.Is(err, store.ErrNotValid) {
		t.Errorf("%s, during the drain: %v, want 'not valid'", what, err)
	}
}

// drainingServer serves d's store on a socket of its own with policy pol
// and a minute's shutdown grace; stop begins the server's stop and waits,
// for at most 30 s, for it to end.
func drainingServer(t *testing.T, d *testDaemon, pol ListenPolicy, idleCloseAfter time.Duration) (sock string, stop func() error) {
	t.Helper()
	// The test's client is this process, which works on: it counts as a
	// client waiting for its user unless a test says otherwise.
	idleClient := func(int32) (uint64, bool) { return 0, true }
	return drainingServerCPU(t, d, pol, idleCloseAfter, idleClient)
}

// drainingServerCPU is drainingServer with clientCPU as the clients' CPU
// time.
func drainingServerCPU(t *testing.T, d *testDaemon, pol ListenPolicy, idleCloseAfter time.Duration, clientCPU func(int32) (uint64, bool)) (sock string, stop func() error) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "socket")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := New(Options{Store: d.st, ShutdownGrace: time.Minute, Logger: slog.New(slog.DiscardHandler), idleCloseAfter: idleCloseAfter, clientCPU: clientCPU})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeAll(ctx, []Listener{{Listener: l, Policy: pol}}) }()
	return sock, func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(30 * time.Second):
			return errors.New("the stop waited for 30 s")
		}
	}
}

// TestDrainKeepsHookConnections: the build hook's connection, idle while
// its remote build runs, is not closed as idle while the daemon drains.
func TestDrainKeepsHookConnections(t *testing.T) {
	sock, stop := drainingServer(t, startDaemon(t, Options{}), ListenPolicy{Trusted: true}, 50*time.Millisecond)
	c, err := client.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	servedAfterIdlePass(t, c, "the hook's connection")
	c.Close()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}

// TestCloseIdleOpArriving: an op that arrives as closeIdle takes its
// connection is served, or told that the daemon stops; it is not cut off
// (the client read an unexpected end of file).
func TestCloseIdleOpArriving(t *testing.T) {
	d := startDaemon(t, Options{})
	c, err := client.Dial(context.Background(), d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p, _ := storepath.ParseBase("00000000000000000000000000000000-x")
	if _, err := c.IsValidPath(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // idle for a while
	prev := runtime.GOMAXPROCS(1)      // so that closeIdle runs before the serving goroutine
	defer runtime.GOMAXPROCS(prev)
	errc := make(chan error, 1)
	go func() { _, err := c.IsValidPath(context.Background(), p); errc <- err }()
	runtime.Gosched()
	d.srv.closeIdle(100 * time.Millisecond)
	if err := <-errc; err != nil && !strings.Contains(err.Error(), "the daemon is stopping") {
		t.Errorf("an op sent as closeIdle ran: %v", err)
	}
}

// TestProcCPU: the daemon reads a process's CPU time from /proc.
func TestProcCPU(t *testing.T) {
	if _, ok := procCPU(int32(os.Getpid())); !ok {
		t.Error("procCPU of this process: not read")
	}
	if _, ok := procCPU(-1); ok {
		t.Error("procCPU of no process: read")
	}
}

// TestJobSocketClientOutsideNamespace: a job socket's client that the
// kernel gives no pid for (outside the daemon's pid namespace: a daemon in
// a container of its own) is refused, saying why, as one whose job cannot
// be told; on the default socket it is served with its own roots.
func TestJobSocketClientOutsideNamespace(t *testing.T) {
	d := startDaemon(t, Options{})
	jm, err := jobs.New(t.Context(), d.st, jobs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer jm.Close()
	srv := New(Options{Store: d.st, Jobs: jm, Logger: slog.New(slog.NewTextHandler(d.logs, nil))})
	for _, pid := range []int32{0, -1} {
		p := peer{pid: pid, uid: 0, user: "root"}
		srv.applyPolicy(&p, ListenPolicy{Untrusted: true, Tenant: "ci"})
		if !strings.Contains(p.refused, "outside the daemon's pid namespace") {
			t.Errorf("pid %d on a job socket: refused %q", pid, p.refused)
		}
		p = peer{pid: pid, uid: 0, user: "root", trusted: true}
		srv.applyPolicy(&p, ListenPolicy{})
		if p.refused != "" || p.job != nil {
			t.Errorf("pid %d on the default socket: refused %q, job %v", pid, p.refused, p.job)
		}
	}
}
