package build

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// testEnv is a store on a temporary root and what real Nix needs to
// instantiate derivations into it.
type testEnv struct {
	t      testing.TB
	root   string
	st     *store.Store
	url    string // store URL for real Nix
	chroot bool   // logical /nix/store, files under root/nix/store
}

// newChrootEnv opens a chroot store (logical /nix/store under root): its
// builds are always sandboxed.
func newChrootEnv(t testing.TB) *testEnv {
	t.Helper()
	needNix(t)
	root := t.TempDir()
	st, err := store.Open(context.Background(), store.Config{
		StoreDir:     "/nix/store",
		RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir:     filepath.Join(root, "nix/var/nix"),
		LogDir:       filepath.Join(root, "nix/var/log/nix"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &testEnv{t: t, root: root, st: st, url: "local?root=" + root, chroot: true}
}

// newPlainEnv opens a store whose logical and real directory are the same
// (root/store), so builders can run without the sandbox.
func newPlainEnv(t testing.TB) *testEnv {
	t.Helper()
	needNix(t)
	// The store directory must be reachable by the build users, so not
	// under t.TempDir() (whose parent is private).
	root, err := os.MkdirTemp("", "nixyard-build-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeTree(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	for d := filepath.Dir(root); d != "/"; d = filepath.Dir(d) {
		if st, err := os.Stat(d); err == nil && st.Mode().Perm()&0o001 == 0 {
			t.Skipf("%s is not searchable by build users", d)
		}
	}
	cfg := store.Config{
		StoreDir: storepath.Dir(filepath.Join(root, "store")),
		StateDir: filepath.Join(root, "state"),
		LogDir:   filepath.Join(root, "log"),
	}
	st, err := store.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	url := fmt.Sprintf("local?store=%s&state=%s&log=%s", cfg.StoreDir, cfg.StateDir, cfg.LogDir)
	return &testEnv{t: t, root: root, st: st, url: url}
}

func needNix(t testing.TB) {
	t.Helper()
	for _, p := range []string{"nix-instantiate", "/bin/busybox"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed", p)
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (build users, chroot stores)")
	}
}

// busyboxDir is a directory holding only a copy of the static busybox,
// shared by all tests (its store path is the same in every store).
var busyboxDir = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "nixyard-bb-")
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return "", err
	}
	return dir, os.WriteFile(filepath.Join(dir, "busybox"), data, 0o755)
})

// prelude defines, in Nix, bb (busybox in the store) and mk, which makes
// a derivation running a busybox shell script.
func prelude(t testing.TB) string {
	dir, err := busyboxDir()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf(`
let
  bb = builtins.path { path = %s; name = "busybox-static"; };
  mk = { name, script, ... }@a: builtins.derivation ({
    system = builtins.currentSystem;
    builder = "${bb}/busybox";
    args = [ "sh" "-c" script ];
  } // builtins.removeAttrs a [ "script" ]);
in
`, dir)
}

// instantiate evaluates expr (after the prelude) with real Nix into the
// store and returns the .drv paths of the attributes, by name.
func (e *testEnv) instantiate(expr string, attrs ...string) map[string]storepath.Path {
	e.t.Helper()
	file := e.exprFile(expr)
	out := map[string]storepath.Path{}
	for _, a := range attrs {
		out[a] = e.instantiateAttr(file, a)[0]
	}
	return out
}

// instantiateList evaluates expr (after the prelude), whose attribute attr
// is a list of derivations, and returns their .drv paths in order.
func (e *testEnv) instantiateList(expr, attr string) []storepath.Path {
	e.t.Helper()
	return e.instantiateAttr(e.exprFile(expr), attr)
}

// exprFile writes the prelude and expr to a file and returns its path.
func (e *testEnv) exprFile(expr string) string {
	t := e.t
	t.Helper()
	file := filepath.Join(t.TempDir(), "t.nix")
	if err := os.WriteFile(file, []byte(prelude(t)+expr), 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// instantiateAttr instantiates attribute attr of file and returns the
// .drv paths nix-instantiate prints (one, or one per list element).
func (e *testEnv) instantiateAttr(file, attr string) []storepath.Path {
	t := e.t
	t.Helper()
	var out []storepath.Path
	for _, s := range strings.Fields(e.nix("nix-instantiate", "--store", e.url, file, "-A", attr)) {
		p, err := e.st.Dir().Parse(s)
		if err != nil {
			t.Fatalf("nix-instantiate -A %s: %q: %v", attr, s, err)
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		t.Fatalf("nix-instantiate -A %s: no derivation", attr)
	}
	return out
}

func (e *testEnv) nix(name string, args ...string) string {
	t := e.t
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=", "XDG_CACHE_HOME="+t.TempDir(), "NIX_REMOTE=")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

func (e *testEnv) builder(cfg Config) *Builder {
	e.t.Helper()
	if cfg.BuildDir == "" {
		cfg.BuildDir = filepath.Join(e.root, "tmp")
		if err := os.MkdirAll(cfg.BuildDir, 0o755); err != nil {
			e.t.Fatal(err)
		}
	}
	if cfg.UserPoolDir == "" {
		// The userpool of the host's state directory, which every test
		// shares (the e2e tests' daemons too: testHostStateDir there), as
		// the host's daemons share the host's: tests that each locked
		// build users in a userpool of their own could pick the same user
		// and kill each other's builders.
		cfg.UserPoolDir = filepath.Join(os.TempDir(), "nixyard-test-state", "userpool")
	}
	b, err := New(cfg, e.st)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

func out(drv storepath.Path, outputs ...string) store.DerivedPath {
	if len(outputs) == 0 {
		return store.DerivedPath{Path: drv, Built: true, AllOutputs: true}
	}
	return store.DerivedPath{Path: drv, Built: true, Outputs: outputs}
}

// build builds reqs and fails the test on an error (not on failed builds).
func (e *testEnv) build(b *Builder, opts ClientOptions, reqs ...store.DerivedPath) []Result {
	e.t.Helper()
	res, err := b.Build(context.Background(), reqs, opts, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return res
}

// mustBuild builds reqs and fails the test unless all succeed.
func (e *testEnv) mustBuild(b *Builder, reqs ...store.DerivedPath) []Result {
	e.t.Helper()
	res := e.build(b, ClientOptions{}, reqs...)
	for _, r := range res {
		if !r.Status.Success() {
			e.t.Fatalf("build of %s: status %d: %s", r.Path.Path, r.Status, r.ErrorMsg)
		}
	}
	return res
}

// readOut reads a file of an output.
func (e *testEnv) readOut(p storepath.Path, rel string) string {
	e.t.Helper()
	data, err := os.ReadFile(filepath.Join(e.st.RealPath(p), rel))
	if err != nil {
		e.t.Fatal(err)
	}
	return string(data)
}

// recorder is a Progress that keeps what it receives.
type recorder struct {
	mu        sync.Mutex
	started   []string
	lines     []string
	phases    []string
	hookLines []string
	errors    []string
	finished  map[string]error
	maxRun    int
	// goalFailures are "drv: msg" of GoalFailed, in order.
	goalFailures []string
	// counts are the last counters; negative, whether any was below 0.
	counts   [4]int
	negative bool
}

// startedList returns the derivations whose builds started so far.
func (r *recorder) startedList() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.started)
}

func (r *recorder) BuildStarted(drv, _ string, _ BuildMode, _ Round) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.started = append(r.started, drv)
}
func (r *recorder) BuildLogLine(drv, line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, line)
}
func (r *recorder) BuildPhase(drv, phase string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.phases = append(r.phases, phase)
}
func (r *recorder) BuildFinished(drv string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.finished == nil {
		r.finished = map[string]error{}
	}
	r.finished[drv] = err
}
func (r *recorder) GoalFailed(drv string, res Result) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.goalFailures = append(r.goalFailures, drv+": "+res.ErrorMsg)
}
func (r *recorder) PostBuildHookStarted(drv, hook string) {}
func (r *recorder) PostBuildHookLine(drv, line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hookLines = append(r.hookLines, line)
}
func (r *recorder) PostBuildHookFinished(drv string) {}
func (r *recorder) Error(msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errors = append(r.errors, msg)
}
func (r *recorder) Chatty(string)                      {}
func (r *recorder) Info(string)                        {}
func (r *recorder) RemoteActivity(string, RemoteEvent) {}
func (r *recorder) BuildsProgress(done, expected, running, failed int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.maxRun = max(r.maxRun, running)
	r.counts = [4]int{done, expected, running, failed}
	if min(done, expected, running, failed) < 0 {
		r.negative = true
	}
}
