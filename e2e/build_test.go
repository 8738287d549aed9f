package e2e

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/build"
)

// Builds through the daemon with the real nix-build / nix build. Every
// daemon of this suite serves a chroot store (--store ROOT), so both
// nix-daemon and nixyard run every build in the sandbox, whatever the
// sandbox setting says. Builders reach the test through /marks, a
// sandbox-paths bind of a directory of the test.

// buildExprHead makes bb (busybox in the store) and mk, a derivation
// running a busybox shell script; nonce makes every path unique to the test.
const buildExprHead = `{ bbdir, nonce }:
let
  bb = builtins.path { path = bbdir; name = "busybox-static"; };
  mk = { name, script, ... }@a: builtins.derivation ({
    system = builtins.currentSystem;
    builder = "${bb}/busybox";
    args = [ "sh" "-c" script ];
    inherit nonce;
  } // builtins.removeAttrs a [ "script" ]);
in
`

// buildEnv is a daemon for builds and the directory builders see as /marks.
type buildEnv struct {
	*daemon
	marks string
}

func startBuildDaemon(t *testing.T, conf ...string) *buildEnv {
	t.Helper()
	return newEnv(t).startBuildDaemon(t, conf...)
}

// startBuildDaemon is startBuildDaemon in e, for a test that prepares
// files its configuration names first.
func (e *testEnv) startBuildDaemon(t *testing.T, conf ...string) *buildEnv {
	t.Helper()
	return e.startBuildDaemonWith(t, withConf(conf...))
}

// startBuildDaemonWith is startBuildDaemon with options of the daemon.
func (e *testEnv) startBuildDaemonWith(t *testing.T, opts ...daemonOpt) *buildEnv {
	t.Helper()
	marks := filepath.Join(e.dir, "marks")
	mustMkdir(t, marks, 0o777)
	d := e.startDaemon(t, append([]daemonOpt{withConf("sandbox-paths = /marks=" + marks)}, opts...)...)
	return &buildEnv{daemon: d, marks: marks}
}

// expr writes a Nix file of body after buildExprHead and returns the
// arguments that evaluate it.
func (e *testEnv) expr(t *testing.T, name, body string) []string {
	t.Helper()
	bbdir := filepath.Join(e.dir, "bb")
	if _, err := os.Stat(bbdir); err != nil {
		bb, err := os.ReadFile(busybox)
		if err != nil {
			t.Fatal(err)
		}
		mustMkdir(t, bbdir, 0o755)
		writeFile(t, filepath.Join(bbdir, "busybox"), string(bb), 0o755)
	}
	file := writeFile(t, filepath.Join(e.dir, name+".nix"), buildExprHead+body, 0o644)
	return []string{file, "--arg", "bbdir", bbdir, "--argstr", "nonce", e.nonce}
}

// nixBuild runs nix-build through the daemon.
func (d *daemon) nixBuild(args ...string) *command { return d.client("nix-build", args...) }

// markerLines reads a file builders appended to under /marks.
func (b *buildEnv) markerLines(t *testing.T, name string) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(b.marks, name))
	if err != nil {
		t.Fatal(err)
	}
	return lines(string(data))
}

const graphExpr = `rec {
  base = mk { name = "base"; script = "echo base-line; echo base > $out"; };
  left = mk { name = "left"; inherit base; script = "echo left $base > $out"; };
  right = mk { name = "right"; inherit base; script = "echo right $base > $out"; };
  top = mk { name = "top"; inherit left right; script = "echo top-says-hello; echo $left $right > $out"; };
  multi = mk { name = "multi"; outputs = [ "out" "dev" ]; inherit base; script = "echo o > $out; echo $base > $dev"; };
}`

func TestBuildGraph(t *testing.T) {
	for _, sandbox := range []string{"true", "false"} {
		t.Run("sandbox-"+sandbox, func(t *testing.T) { // no "=": Nix paths cannot hold it
			t.Parallel()
			b := startBuildDaemon(t, "sandbox = "+sandbox)
			args := b.expr(t, "graph", graphExpr)

			// A multi-level graph, with a result link; the builders' output
			// reaches nix-build.
			r := b.nixBuild(append(args, "-A", "top")...).run(t)
			if r.err != nil {
				t.Fatalf("nix-build failed:\n%s", r)
			}
			top := oneLine(t, "nix-build -A top", r.stdout)
			for _, want := range []string{"base-line", "top-says-hello", "building '"} {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("nix-build stderr lacks %q:\n%s", want, r.stderr)
				}
			}
			link, err := os.Readlink(filepath.Join(b.dir, "result"))
			if err != nil || link != top {
				t.Errorf("result link: %q, %v; want %s", link, err, top)
			}
			left := oneLine(t, "left", b.nixBuild(append(args, "-A", "left", "--no-out-link")...).ok(t))
			right := oneLine(t, "right", b.nixBuild(append(args, "-A", "right", "--no-out-link")...).ok(t))
			base := oneLine(t, "base", b.nixBuild(append(args, "-A", "base", "--no-out-link")...).ok(t))
			data, err := os.ReadFile(b.realPath(top))
			if err != nil || string(data) != left+" "+right+"\n" {
				t.Errorf("top output: %q, %v", data, err)
			}
			// Outputs refer to their inputs.
			if got, want := sortedLines(b.nixStore(t, "-q", "--references", top)), []string{left, right}; !equalSorted(got, want) {
				t.Errorf("references of top: %q, want %q", got, want)
			}
			if got := lines(b.nixStore(t, "-q", "--references", left)); len(got) != 1 || got[0] != base {
				t.Errorf("references of left: %q, want [%s]", got, base)
			}

			// Multiple outputs (multi.all: drv!dev and drv!out), dev refers
			// to base.
			outs := sortedLines(b.nixBuild(append(args, "-A", "multi.all", "--no-out-link")...).ok(t))
			if len(outs) != 2 || !strings.HasSuffix(outs[0], "-multi") && !strings.HasSuffix(outs[1], "-multi") {
				t.Fatalf("nix-build -A multi.all: %q", outs)
			}
			dev := outs[0]
			if !strings.HasSuffix(dev, "-multi-dev") {
				dev = outs[1]
			}
			if got := lines(b.nixStore(t, "-q", "--references", dev)); len(got) != 1 || got[0] != base {
				t.Errorf("references of multi-dev: %q", got)
			}

			// The log is stored where nix-store -l and nix log find it.
			if got := b.nixStore(t, "-l", top); !strings.Contains(got, "top-says-hello") {
				t.Errorf("nix-store -l: %q", got)
			}
			if got := b.nix(t, "log", base); !strings.Contains(got, "base-line") {
				t.Errorf("nix log: %q", got)
			}
		})
	}
}

func TestBuildNixBuildL(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "l", `mk { name = "dash-l"; script = "echo streamed-line-one; echo streamed-line-two; echo > $out"; }`)
	r := b.client("nix", append([]string{"build", "-L", "--no-link", "--json", "-f"}, args...)...).run(t)
	if r.err != nil {
		t.Fatalf("nix build -L:\n%s", r)
	}
	for _, want := range []string{"dash-l> streamed-line-one", "dash-l> streamed-line-two"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("nix build -L stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	var js []struct {
		Outputs map[string]string `json:"outputs"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &js); err != nil || len(js) != 1 || js[0].Outputs["out"] == "" {
		t.Fatalf("nix build --json: %q, %v", r.stdout, err)
	}
	if !b.isValid(t, js[0].Outputs["out"]) {
		t.Errorf("%s is not valid after nix build", js[0].Outputs["out"])
	}
}

func TestBuildFixedOutput(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	// sha256 of the empty file, flat.
	args := b.expr(t, "fixed", `{
  good = mk { name = "fixed-good"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; script = "touch $out"; };
  bad = mk { name = "fixed-bad"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; script = "echo not-empty > $out"; };
}`)
	good := oneLine(t, "good", b.nixBuild(append(args, "-A", "good", "--no-out-link")...).ok(t))
	if info := parsePathInfos(t, "path-info", b.nix(t, "path-info", "--json", good))[good]; info.CA != "fixed:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73" {
		t.Errorf("fixed output CA: %q", info.CA)
	}
	stderr := b.nixBuild(append(args, "-A", "bad", "--no-out-link")...).fails(t)
	for _, want := range []string{"hash mismatch in fixed-output derivation", "specified: sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "got:    sha256-"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("wrong hash: stderr lacks %q:\n%s", want, stderr)
		}
	}
}

// TestClientBuildSettings: the build settings of a client's SetOptions
// reach its builds as with nix-daemon. Any client's timeout (sent under
// its own name, "timeout", not the alias "build-timeout"); a trusted
// client's max-build-log-size, not an untrusted one's; cores, which every
// client sends, except that with nixyard it cannot raise the daemon's.
func TestClientBuildSettings(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "allowed-users = *", "cores = 3")
	u := b.unprivileged(t)
	args := b.expr(t, "client-settings", `{
  sleeps = mk { name = "client-sleeps"; script = "echo going-to-sleep; sleep 60; echo > $out"; };
  chatty = mk { name = "client-chatty"; script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo 0123456789012345678901234567890123456789; done; echo > $out"; };
  chatty2 = mk { name = "client-chatty2"; script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo 0123456789012345678901234567890123456789; done; echo > $out"; };
  cores1 = mk { name = "client-cores-1"; script = "echo $NIX_BUILD_CORES > $out"; };
  cores5 = mk { name = "client-cores-5"; script = "echo $NIX_BUILD_CORES > $out"; };
}`)
	stderr := b.nixBuild(append(args, "-A", "sleeps", "--no-out-link", "--timeout", "1")...).as(u).fails(t)
	if !strings.Contains(stderr, "timed out after 1 seconds") {
		t.Errorf("untrusted --timeout 1: stderr:\n%s", stderr)
	}
	// As nix-daemon, an untrusted client may add with repair (what it
	// adds is checked as any addition is): nix-instantiate --repair.
	b.client("nix-instantiate", append(args, "-A", "chatty", "--repair")...).as(u).ok(t)
	logLimit := []string{"--no-out-link", "--option", "max-build-log-size", "100"}
	stderr = b.nixBuild(append(append(args, "-A", "chatty"), logLimit...)...).fails(t)
	if !strings.Contains(stderr, "killed after writing more than 100 bytes of log output") {
		t.Errorf("trusted max-build-log-size 100: stderr:\n%s", stderr)
	}
	b.nixBuild(append(append(args, "-A", "chatty2"), logLimit...)...).as(u).ok(t)
	for _, tc := range []struct{ attr, cores, want string }{{"cores1", "1", "1"}, {"cores5", "5", "3"}} {
		if useStock {
			tc.want = tc.cores
		}
		out := oneLine(t, tc.attr, b.nixBuild(append(args, "-A", tc.attr, "--no-out-link", "--cores", tc.cores)...).ok(t))
		if got, err := os.ReadFile(filepath.Join(b.root, out)); err != nil || strings.TrimSpace(string(got)) != tc.want {
			t.Errorf("--cores %s with cores = 3 on the daemon: NIX_BUILD_CORES %q (%v), want %s", tc.cores, got, err, tc.want)
		}
	}
	if useStock {
		return
	}
	// Tools that read the JSON log (which has every activity, whatever
	// its level) see nothing of nixyard's own; -vvvvv shows the session.
	if r := b.client("nix", "store", "ping", "--log-format", "internal-json", "-v").run(t); r.err != nil || strings.Contains(r.stderr, "nixyard-session") {
		t.Errorf("nix store ping --log-format internal-json:\n%s", r)
	}
	if r := b.client("nix", "store", "ping", "-vvvvv").run(t); r.err != nil || !strings.Contains(r.stderr, "nixyard-session: job=none tenant=- trust=trusted") {
		t.Errorf("nix store ping -vvvvv does not show the session:\n%s", r)
	}
	// One nixyard does not implement is named to the client.
	r := b.client("nix", "store", "ping", "--option", "impersonate-linux-26", "true").run(t)
	if r.err != nil || !strings.Contains(r.stderr, "the setting 'impersonate-linux-26' is not implemented by nixyard") {
		t.Errorf("--option impersonate-linux-26 true:\n%s", r)
	}
	// One nixyard keeps daemon-wide is named to a trusted client that
	// sends another value (an untrusted client's is dropped, as by
	// nix-daemon).
	// The harness's daemons have sandbox = false (a chroot store
	// sandboxes anyway), and so do its clients.
	const ignored = "ignoring the setting 'sandbox' = 'true': nixyard applies the daemon's ('false') to every client"
	for _, tc := range []struct {
		value string
		as    *user
		warns bool
	}{{"true", nil, true}, {"false", nil, false}, {"true", u, false}} {
		cmd := b.client("nix", "store", "ping", "--option", "sandbox", tc.value)
		if tc.as != nil {
			cmd = cmd.as(tc.as)
		}
		r := cmd.run(t)
		if r.err != nil || strings.Contains(r.stderr, ignored) != tc.warns {
			t.Errorf("--option sandbox %s (untrusted: %v): want a warning %v:\n%s", tc.value, tc.as != nil, tc.warns, r)
		}
	}
}

// TestBuildFailureLoggedAtOnce: the failure of an input is told when it
// happens, as Nix tells it, not once everything else is done: with -k,
// the other input goes on, and ends after the failure is logged.
func TestBuildFailureLoggedAtOnce(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "max-jobs = 2")
	args := b.expr(t, "at-once", `rec {
  fails = mk { name = "fails-at-once"; script = "exit 3"; };
  slow = mk { name = "slow"; script = "sleep 15; echo slow-done; echo > $out"; };
  top = mk { name = "fails-and-slow"; inherit fails slow; script = "echo > $out"; };
}`)
	stderr := b.nixBuild(append(args, "-A", "top", "--no-out-link", "-k", "-j2")...).fails(t)
	failed, done := strings.Index(stderr, "failed with exit code 3"), strings.Index(stderr, "slow-done")
	if failed < 0 || done < 0 || failed > done {
		t.Errorf("the failure is not logged before the slow build ends:\n%s", stderr)
	}
}

// TestBuildWithResultsShowsCause: `nix build` of two targets, one of which
// fails while the other is stopped for it, shows the failure's cause (the
// 2.8 client reports the first failed result), not "stopped because
// another build failed" (nix-daemon 2.8 shows an empty error here).
func TestBuildWithResultsShowsCause(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon 2.8 sends the results in its goals' order: here the stopped one first, and the client shows an empty error")
	}
	b := startBuildDaemon(t, "max-jobs = 2")
	args := b.expr(t, "with-results", `{
  aSlow = mk { name = "a-slow"; script = "sleep 30; echo > $out"; };
  fails = mk { name = "fails-with-cause"; script = "echo the-cause; exit 3"; };
}`)
	stderr := b.client("nix", append([]string{"build", "-f"}, append(args, "aSlow", "fails", "--no-link", "-j2")...)...).fails(t)
	if !strings.Contains(stderr, "failed with exit code 3") || !strings.Contains(stderr, "the-cause") {
		t.Errorf("stderr lacks the failure's cause:\n%s", stderr)
	}
}

func TestBuildFailures(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "fail", `rec {
  fails = mk { name = "fails"; script = "echo first-failing-line; echo last-failing-line; exit 3"; };
  sleeps = mk { name = "sleeps"; script = "echo going-to-sleep; sleep 60; echo > $out"; };
  needsFail = mk { name = "needs-fail"; dep = fails; script = "echo > $out"; };
}`)
	t.Run("exit code and log tail", func(t *testing.T) {
		stderr := b.nixBuild(append(args, "-A", "fails", "--no-out-link")...).fails(t)
		for _, want := range []string{"failed with exit code 3", "last-failing-line", "first-failing-line"} {
			if !strings.Contains(stderr, want) {
				t.Errorf("stderr lacks %q:\n%s", want, stderr)
			}
		}
		// The dependency's failure is logged by the daemon (its waiter
		// fails too): laid out as Nix lays out an error, later lines
		// indented under "error: ".
		stderr = b.nixBuild(append(args, "-A", "needsFail", "--no-out-link")...).fails(t)
		for _, want := range []string{"failed with exit code 3;\n       last 2 log lines:\n       > first-failing-line\n       > last-failing-line\n", "1 dependencies of derivation", "needs-fail.drv"} {
			if !strings.Contains(stderr, want) {
				t.Errorf("dependency failure: stderr lacks %q:\n%s", want, stderr)
			}
		}
	})
	t.Run("timeout", func(t *testing.T) {
		stderr := b.nixBuild(append(args, "-A", "sleeps", "--no-out-link", "--timeout", "1")...).fails(t)
		if !strings.Contains(stderr, "timed out after 1 seconds") {
			t.Errorf("stderr:\n%s", stderr)
		}
	})
	t.Run("max-silent-time", func(t *testing.T) {
		stderr := b.nixBuild(append(args, "-A", "sleeps", "--no-out-link", "--max-silent-time", "1")...).fails(t)
		if !strings.Contains(stderr, "timed out after 1 seconds of silence") || !strings.Contains(stderr, "going-to-sleep") {
			t.Errorf("stderr:\n%s", stderr)
		}
	})
	t.Run("keep-failed", func(t *testing.T) {
		stderr := b.nixBuild(append(args, "-A", "fails", "--no-out-link", "--keep-failed")...).fails(t)
		m := regexp.MustCompile(`keeping build directory '([^']+)'`).FindStringSubmatch(stderr)
		if m == nil {
			t.Fatalf("no kept build directory in:\n%s", stderr)
		}
		// As Nix leaves it: open to the user who debugs the build.
		if st, err := os.Stat(m[1]); err != nil || !st.IsDir() || st.Mode().Perm() != 0o755 {
			t.Errorf("kept build directory %s: %v, %v (want a directory, mode 755)", m[1], st.Mode(), err)
		}
		// Named as by Nix, where users look for it.
		if !regexp.MustCompile(`^nix-build-fails\.drv-[0-9]+$`).MatchString(filepath.Base(m[1])) {
			t.Errorf("kept build directory %s is not named as by Nix", m[1])
		}
		// nix build shows no build log, but the note, a message of its own.
		stderr = b.client("nix", append([]string{"build", "-f"}, append(args, "fails", "--no-link", "--keep-failed")...)...).fails(t)
		if !strings.Contains(stderr, "note: keeping build directory '") {
			t.Errorf("nix build --keep-failed does not say where the build directory is:\n%s", stderr)
		}
	})
}

// TestBuildConcurrentClients: four clients build overlapping graphs at
// once; every derivation is built exactly once and none fails.
func TestBuildConcurrentClients(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "shared", `rec {
  step = name: deps: mk { inherit name deps; script = "echo ${name} >> /marks/built; sleep 0.2; echo $deps > $out"; };
  base = step "base" [];
  a = step "a" [ base ]; b = step "b" [ base ]; c = step "c" [ a b ];
  t0 = step "t0" [ a ]; t1 = step "t1" [ b c ]; t2 = step "t2" [ c ]; t3 = step "t3" [ a b c ];
}`)
	var wg sync.WaitGroup
	results := make([]result, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = b.nixBuild(append(args, "-A", fmt.Sprintf("t%d", i), "--no-out-link")...).run(t)
		}()
	}
	wg.Wait()
	for _, r := range results {
		if r.err != nil {
			t.Errorf("client failed:\n%s", r)
		}
	}
	counts := map[string]int{}
	for _, l := range b.markerLines(t, "built") {
		counts[l]++
	}
	for _, name := range []string{"base", "a", "b", "c", "t0", "t1", "t2", "t3"} {
		if counts[name] != 1 {
			t.Errorf("%s built %d times, want 1 (all: %v)", name, counts[name], counts)
		}
	}
}

// TestBuildSharedInputsShown: two clients whose requests share a goal
// (mid) both see the builds of that goal's inputs (leaf) as they would
// see their own: the start, the log, and the builder's failure with its
// last lines. With nix-daemon each client's worker builds leaf in turn,
// and each shows it. Only the client whose request started mid saw them:
// the other, which joined mid, got "1 dependencies of derivation … failed
// to build" with no word of leaf (CI audit). The second client joins while
// leaf runs, silent until the test lets it fail.
func TestBuildSharedInputsShown(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "shared-inputs", `rec {
  leaf = mk { name = "shared-leaf"; script = ": shared-leaf-${nonce}; while [ ! -e /marks/go ]; do sleep 0.1; done; echo leaf-error-detail >&2; exit 7"; };
  mid = mk { name = "shared-mid"; inherit leaf; script = "echo > $out"; };
  topA = mk { name = "shared-top-a"; inherit mid; script = "echo > $out"; };
  topB = mk { name = "shared-top-b"; inherit mid; script = "echo > $out"; };
}`)
	var stderr [2]lockedBuffer
	var clients [2]*exec.Cmd
	for i, attr := range []string{"topA", "topB"} {
		clients[i] = b.nixBuild(append(args, "-A", attr, "--no-out-link")...).exec()
		clients[i].Stderr = &stderr[i]
	}
	if err := clients[0].Start(); err != nil {
		t.Fatal(err)
	}
	defer clients[0].Process.Kill()
	waitFor(t, "leaf's builder", func() bool { return builderRunning(t, "shared-leaf-"+b.nonce) })
	if err := clients[1].Start(); err != nil {
		t.Fatal(err)
	}
	defer clients[1].Process.Kill()
	leafStarted := regexp.MustCompile(`building '/nix/store/[a-z0-9]{32}-shared-leaf\.drv'`)
	waitFor(t, "the second client to see leaf's build", func() bool {
		// nix-daemon has the second client wait for leaf's lock, then
		// build leaf itself (once the first one's has failed).
		return leafStarted.MatchString(stderr[1].String()) || useStock && strings.Contains(stderr[1].String(), "will be built")
	})
	writeFile(t, filepath.Join(b.marks, "go"), "", 0o644)
	for i, x := range clients {
		if err := x.Wait(); err == nil {
			t.Errorf("client %d succeeded", i)
		}
		out := stderr[i].String()
		if !regexp.MustCompile(`builder for '/nix/store/[a-z0-9]{32}-shared-leaf\.drv' failed with exit code 7`).MatchString(out) ||
			!strings.Contains(out, "leaf-error-detail") {
			t.Errorf("client %d was not told why leaf failed:\n%s", i, out)
		}
	}
}

// lockedBuffer holds what a process writes while the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestBuildHostWideCap: with max-jobs = 2 on the daemon, four clients
// asking for 8 builds each never have more than 2 builders running at
// once. Each builder records how many builders are running while it runs.
func TestBuildHostWideCap(t *testing.T) {
	if useStock {
		t.Skip("nix-daemon has no host-wide cap: each client's max-jobs applies on its own")
	}
	t.Parallel()
	b := startBuildDaemon(t, "max-jobs = 2")
	mustMkdir(t, filepath.Join(b.marks, "running"), 0o777)
	args := b.expr(t, "cap", `let
  list = client: builtins.genList (i: mk {
    name = "cap-${toString client}-${toString i}";
    script = "touch /marks/running/$name; ls /marks/running | wc -l >> /marks/samples; sleep 0.3; rm /marks/running/$name; echo > $out"; }) 8;
in { c0 = list 0; c1 = list 1; c2 = list 2; c3 = list 3; }`)
	var wg sync.WaitGroup
	results := make([]result, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = b.nixBuild(append(args, "-A", "c"+strconv.Itoa(i), "--no-out-link", "--max-jobs", "8")...).run(t)
		}()
	}
	wg.Wait()
	for _, r := range results {
		if r.err != nil {
			t.Errorf("client failed:\n%s", r)
		} else if n := len(lines(r.stdout)); n != 8 {
			t.Errorf("client built %d paths, want 8:\n%s", n, r)
		}
	}
	samples := b.markerLines(t, "samples")
	if len(samples) != 32 {
		t.Errorf("%d samples, want 32", len(samples))
	}
	peak := 0
	for _, s := range samples {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			t.Fatalf("sample %q: %v", s, err)
		}
		peak = max(peak, n)
	}
	if peak > 2 {
		t.Errorf("%d builders ran at once, cap is 2", peak)
	}
	t.Logf("peak concurrent builders: %d", peak)
}

// TestBuildUsersSharedAcrossStores: two daemons on chroot stores of
// their own, both building as the members of one build-users-group at
// once, build as different users and neither kills the other's builder:
// build users are locked in the host's userpool (here the tests' shared
// NIX_STATE_DIR), as Nix locks them whatever store it serves. Both
// builders wait for the test until it has seen their users. Each daemon
// locked them under its own root before: both took the first member, and
// the second, killing that user's processes before its build, killed the
// first's builder.
func TestBuildUsersSharedAcrossStores(t *testing.T) {
	if err := build.CheckBuildUsers("nixbld"); err != nil {
		t.Skipf("the nixbld group cannot serve here: %v", err)
	}
	t.Parallel()
	var envs [2]*buildEnv
	var builds [2]*exec.Cmd
	var tokens [2]string
	for i := range envs {
		envs[i] = startBuildDaemon(t, "build-users-group = nixbld")
		tokens[i] = fmt.Sprintf("users-%d-%s", i, envs[i].nonce)
		args := envs[i].expr(t, "users", fmt.Sprintf(`{ slow = mk { name = "users"; script = ": %s; while [ ! -e /marks/go ]; do sleep 0.1; done; echo > $out"; }; }`, tokens[i]))
		builds[i] = envs[i].nixBuild(append(args, "-A", "slow", "--no-out-link")...).exec()
	}
	var stderr [2]strings.Builder
	for i, x := range builds {
		x.Stderr = &stderr[i]
		if err := x.Start(); err != nil {
			t.Fatal(err)
		}
		defer x.Process.Kill()
		for deadline := time.Now().Add(30 * time.Second); !builderRunning(t, tokens[i]); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("builder %d did not start", i)
			}
		}
	}
	var uids [2]string
	for i := range uids {
		for _, pid := range builderPIDs(t, tokens[i]) {
			status, err := os.ReadFile("/proc/" + pid + "/status")
			if err != nil {
				continue // gone since (not the sleeping builder)
			}
			if m := regexp.MustCompile(`(?m)^Uid:\s+(\d+)`).FindSubmatch(status); m != nil && string(m[1]) != "0" {
				uids[i] = string(m[1])
			}
		}
	}
	if uids[0] == "" || uids[0] == uids[1] {
		t.Errorf("the two daemons' builders run as users %q and %q, want two different build users", uids[0], uids[1])
	}
	for _, e := range envs {
		writeFile(t, filepath.Join(e.marks, "go"), "", 0o644)
	}
	for i, x := range builds {
		if err := x.Wait(); err != nil {
			t.Errorf("build %d: %v\n%s", i, err, stderr[i].String())
		}
	}
}

// TestBuildEquivalence: real Nix building the same derivations in a
// chroot store of its own gives the same output paths and NAR hashes as
// the daemon.
func TestBuildEquivalence(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "graph", graphExpr)
	for _, attr := range []string{"top", "multi"} {
		b.buildLikeNix(t, args, attr)
	}
}

// TestBuildSandboxIsolation: a sandboxed builder sees only its closure in
// /nix/store and has no network.
func TestBuildSandboxIsolation(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "sandbox = true")
	unrelated := oneLine(t, "add", b.nixStore(t, "--add", b.file(t, "unrelated", "not in the closure "+b.nonce)))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var accepted sync.WaitGroup
	connected := false
	accepted.Add(1)
	go func() {
		defer accepted.Done()
		if c, err := l.Accept(); err == nil {
			connected = true
			c.Close()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	args := b.expr(t, "iso", fmt.Sprintf(`rec {
  dep = mk { name = "iso-dep"; script = "echo dep > $out"; };
  probe = mk { name = "iso-probe"; inherit dep; script = ''
    mkdir $out
    ls /nix/store > $out/store
    if echo hi | nc -w 2 127.0.0.1 %d; then echo reached > $out/net; else echo isolated > $out/net; fi
  ''; };
}`, port))
	dep := oneLine(t, "dep", b.nixBuild(append(args, "-A", "dep", "--no-out-link")...).ok(t))
	probe := oneLine(t, "probe", b.nixBuild(append(args, "-A", "probe", "--no-out-link")...).ok(t))
	l.Close()
	accepted.Wait()
	seen, err := os.ReadFile(filepath.Join(b.realPath(probe), "store"))
	if err != nil {
		t.Fatal(err)
	}
	names := lines(string(seen))
	if contains(names, filepath.Base(unrelated)) {
		t.Errorf("the builder saw %s, outside its closure: %q", unrelated, names)
	}
	if !contains(names, filepath.Base(dep)) {
		t.Errorf("the builder did not see its input %s: %q", dep, names)
	}
	netOut, err := os.ReadFile(filepath.Join(b.realPath(probe), "net"))
	if err != nil || string(netOut) != "isolated\n" || connected {
		t.Errorf("network: builder says %q (%v), host listener connected: %v", netOut, err, connected)
	}
}

func equalSorted(a, b []string) bool {
	a, b = append([]string(nil), a...), append([]string(nil), b...)
	sort.Strings(a)
	sort.Strings(b)
	return strings.Join(a, "\n") == strings.Join(b, "\n")
}

// TestTimerSlack: the daemon's threads run with a wide timer slack (see
// internal/timerslack); its builders get back what the daemon started with.
func TestTimerSlack(t *testing.T) {
	if useStock {
		t.Skip("nix-daemon keeps the slack it inherits")
	}
	if !hasCapability(t, unix.CAP_SYS_NICE) {
		t.Skip("without CAP_SYS_NICE the daemon keeps the slack it inherits")
	}
	t.Parallel()
	b := startBuildDaemon(t)
	// What the daemon inherited: the test's threads all have the slack of
	// its main thread (the test sets none).
	inherited := readIntFile(t, "/proc/self/timerslack_ns")
	args := b.expr(t, "slack", `mk { name = "slack"; script = "cat /proc/self/timerslack_ns > $out"; }`)
	out := oneLine(t, "nix-build", b.nixBuild(append(args, "--no-out-link")...).ok(t))
	if got := readIntFile(t, b.realPath(out)); got != inherited {
		t.Errorf("the builder's timer slack is %d ns, want the %d ns the daemon started with", got, inherited)
	}
	tids, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", b.proc.Process.Pid))
	if err != nil || len(tids) == 0 {
		t.Fatalf("the daemon's threads: %v, %v", tids, err)
	}
	for _, tid := range tids {
		// Only /proc/TID has timerslack_ns, not /proc/PID/task/TID.
		if got := readIntFile(t, "/proc/"+tid.Name()+"/timerslack_ns"); got != 1000000 {
			t.Errorf("daemon thread %s: %d ns, want 1000000", tid.Name(), got)
		}
	}
}

// hasCapability reports whether the test process has capability c in its
// effective set (and so, started by it, the daemon).
func hasCapability(t *testing.T, c int) bool {
	t.Helper()
	v := procStatus(t, "self", "CapEff")
	caps, err := strconv.ParseUint(v, 16, 64)
	if err != nil {
		t.Fatalf("/proc/self/status: CapEff %q: %v", v, err)
	}
	return caps&(1<<c) != 0
}

// procStatus returns the value of field in /proc/PID/status (pid may be
// "self"), without the field's name and surrounding blanks.
func procStatus(t *testing.T, pid, field string) string {
	t.Helper()
	status, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("/proc/%s/status has no %s line", pid, field)
	return ""
}

// TestBuildPlatform: as Nix, a derivation for a platform this host does
// not build for, or that requires a system feature the host lacks, is
// refused with Nix's message; i686-linux is an extra platform of
// x86_64-linux by default.
func TestBuildPlatform(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "platform", `rec {
  other = mk { name = "other"; system = "riscv64-linux"; script = "echo > $out"; };
  feature = mk { name = "feature"; requiredSystemFeatures = [ "gpu" "big-parallel" ]; script = "echo > $out"; };
  i686 = mk { name = "i686"; system = "i686-linux"; script = "echo > $out"; };
  v1 = mk { name = "v1"; system = "x86_64-v1-linux"; script = "echo > $out"; };
  needsOther = mk { name = "needs-other"; inherit other; script = "echo > $out"; };
}`)
	refused := regexp.MustCompile(`a 'riscv64-linux' with features \{\} is required to build '/nix/store/[a-z0-9]{32}-other\.drv', but I am a '[a-z0-9_]+-linux' with features \{benchmark, big-parallel, `)
	stderr := b.nixBuild(append(args, "-A", "other", "--no-out-link")...).fails(t)
	if !refused.MatchString(stderr) {
		t.Errorf("other platform: stderr:\n%s", stderr)
	}
	// As an input, its refusal is told too, not only that an input failed.
	stderr = b.nixBuild(append(args, "-A", "needsOther", "--no-out-link")...).fails(t)
	if !refused.MatchString(stderr) {
		t.Errorf("an input for another platform: stderr:\n%s", stderr)
	}
	stderr = b.nixBuild(append(args, "-A", "feature", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "with features {big-parallel, gpu} is required to build") {
		t.Errorf("missing feature: stderr:\n%s", stderr)
	}
	if runtime.GOARCH == "amd64" {
		b.nixBuild(append(args, "-A", "i686", "--no-out-link")...).ok(t)
		// Every x86-64 CPU has the first microarchitecture level.
		b.nixBuild(append(args, "-A", "v1", "--no-out-link")...).ok(t)
	}
}

// TestBuildPostBuildHook: nix.conf's post-build-hook runs after each
// build with DRV_PATH, OUT_PATHS and NIX_CONFIG, its output reaches the
// client, and a failing hook fails the build (whose output stays valid).
// A process the hook leaves running with its output open does not hold
// the build (nixyard only: nix-daemon waits for it).
func TestBuildPostBuildHook(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	log := filepath.Join(e.dir, "hook.log")
	pidFile := filepath.Join(e.dir, "hook-child.pid")
	// Something left running that holds the hook's output open. (nix-daemon
	// 2.8 reads the hook's output to its end, so it would wait for it.)
	leftover := "sleep 600 &\necho $! > " + pidFile + "\n"
	if useStock {
		leftover = ""
	}
	hook := writeFile(t, filepath.Join(e.dir, "hook.sh"), `#!/bin/sh
echo "drv=$DRV_PATH outs=$OUT_PATHS" >> `+log+`
printf '%s\n' "$NIX_CONFIG" | grep -q '^post-build-hook = ' && echo "config has the hook" >> `+log+`
echo hello-from-the-hook
case "$DRV_PATH" in *hook-fails*) echo failing >&2; exit 3;; esac
`+leftover, 0o755)
	t.Cleanup(func() {
		if data, err := os.ReadFile(pidFile); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	b := e.startBuildDaemon(t, "post-build-hook = "+hook)
	args := b.expr(t, "hook", `{
  ok = mk { name = "hooked"; script = "echo > $out"; };
  fails = mk { name = "hook-fails"; script = "echo > $out"; };
}`)
	res := b.nixBuild(append(args, "-A", "ok", "--no-out-link")...).run(t)
	if res.err != nil {
		t.Fatalf("build with a hook:\n%s", res)
	}
	out := oneLine(t, "ok", res.stdout)
	if !strings.Contains(res.stderr, "post-build-hook: hello-from-the-hook") {
		t.Errorf("the hook's output did not reach the client:\n%s", res.stderr)
	}
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	got := string(data)
	// Nix 2.8.0 passes an empty OUT_PATHS (fixed in 2.8.1).
	if !regexp.MustCompile(`drv=/nix/store/[a-z0-9]{32}-hooked\.drv outs=`).MatchString(got) ||
		(!useStock && !strings.Contains(got, "outs="+out+"\n")) || !strings.Contains(got, "config has the hook") {
		t.Errorf("the hook's environment:\n%s", got)
	}

	stderr := b.nixBuild(append(args, "-A", "fails", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "program '"+hook+"' failed with exit code 3") || !strings.Contains(stderr, "post-build-hook: failing") {
		t.Errorf("failing hook: stderr:\n%s", stderr)
	}
	drv := oneLine(t, "drv", b.client("nix-instantiate", append(args, "-A", "fails")...).ok(t))
	if failed := oneLine(t, "outputs", b.nixStore(t, "-q", "--outputs", drv)); !b.isValid(t, failed) {
		t.Errorf("the output of the build whose hook failed, %s, is not valid", failed)
	}
}

// TestBuildSigned: with secret-key-files, the daemon signs what it
// builds, as Nix does, and the signature verifies with the public key.
func TestBuildSigned(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sk, pk := filepath.Join(e.dir, "sk"), filepath.Join(e.dir, "pk")
	e.cmd("nix-store", "--generate-binary-cache-key", "builder-1", sk, pk).ok(t)
	b := e.startBuildDaemon(t, "secret-key-files = "+sk)
	args := b.expr(t, "signed", `{ out = mk { name = "signed"; script = "echo > $out"; }; }`)
	out := oneLine(t, "out", b.nixBuild(append(args, "-A", "out", "--no-out-link")...).ok(t))
	info := parsePathInfos(t, "path-info", b.nix(t, "path-info", "--json", out))[out]
	if len(info.Signatures) != 1 || !strings.HasPrefix(info.Signatures[0], "builder-1:") {
		t.Errorf("signatures of the built path: %q", info.Signatures)
	}
	key, err := os.ReadFile(pk)
	if err != nil {
		t.Fatal(err)
	}
	b.nix(t, "store", "verify", "--sigs-needed", "1", "--trusted-public-keys", strings.TrimSpace(string(key)), out)
}

// TestBuildSyscallFilter: as with Nix, builders cannot make setuid or
// setgid files and run with no_new_privs, unless filter-syscalls and
// allow-new-privileges say otherwise.
func TestBuildSyscallFilter(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		conf []string
		want string
	}{
		{"default", nil, "setuid-refused setgid-refused plain-ok NoNewPrivs: 1"},
		{"new-privileges", []string{"allow-new-privileges = true"}, "setuid-refused setgid-refused plain-ok NoNewPrivs: 0"},
		{"off", []string{"filter-syscalls = false", "allow-new-privileges = true"}, "setuid-ok setgid-ok plain-ok NoNewPrivs: 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startBuildDaemon(t, tc.conf...)
			args := b.expr(t, "filter", `{ out = mk { name = "filter"; script = ''
  echo x > f
  if chmod 4755 f 2>/dev/null; then echo setuid-ok; else echo setuid-refused; fi > $out
  if chmod 2755 f 2>/dev/null; then echo setgid-ok; else echo setgid-refused; fi >> $out
  chmod 755 f && echo plain-ok >> $out
  grep NoNewPrivs /proc/self/status >> $out
''; }; }`)
			out := oneLine(t, "out", b.nixBuild(append(args, "-A", "out", "--no-out-link")...).ok(t))
			data, err := os.ReadFile(b.realPath(out))
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(strings.Fields(string(data)), " "); got != tc.want {
				t.Errorf("builder saw %q, want %q", got, tc.want)
			}
		})
	}
}

// TestBuildLogLimit: a builder that writes more log than
// max-build-log-size is killed, as Nix kills it.
func TestBuildLogLimit(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "max-build-log-size = 1000")
	args := b.expr(t, "loud", `{ out = mk { name = "loud"; script = "i=0; while [ $i -lt 100 ]; do echo line-$i-of-a-loud-builder; i=$((i+1)); done; sleep 60; echo > $out"; }; }`)
	stderr := b.nixBuild(append(args, "-A", "out", "--no-out-link")...).fails(t)
	if !regexp.MustCompile(`building of '/nix/store/[a-z0-9]{32}-loud\.drv!out' from \.drv file killed after writing more than 1000 bytes of log output`).MatchString(stderr) {
		t.Errorf("stderr:\n%s", stderr)
	}
}

// TestBuildNoLogs: with keep-build-log = false no build log is kept.
func TestBuildNoLogs(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "keep-build-log = false")
	args := b.expr(t, "nolog", `{ out = mk { name = "nolog"; script = "echo says-something; echo > $out"; }; }`)
	out := oneLine(t, "out", b.nixBuild(append(args, "-A", "out", "--no-out-link")...).ok(t))
	if stderr := b.nixStoreFails(t, "-l", out); !strings.Contains(stderr, "is not available") {
		t.Errorf("nix-store -l: %s", stderr)
	}
}

// TestBuildPreBuildHook: nix.conf's pre-build-hook runs before each
// sandboxed build with the derivation and the sandbox's root, and the
// paths it names appear in the sandbox; a hook that answers nonsense
// fails the build with Nix's message.
func TestBuildPreBuildHook(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	shared := filepath.Join(e.dir, "shared")
	mustMkdir(t, shared, 0o755)
	writeFile(t, filepath.Join(shared, "data"), "from-the-hook-"+e.nonce, 0o644)
	log := filepath.Join(e.dir, "pre-hook.log")
	hook := writeFile(t, filepath.Join(e.dir, "pre-hook.sh"), `#!/bin/sh
echo "$1" >> `+log+`
[ -d "$2" ] && echo "root exists" >> `+log+`
case "$1" in *pre-bad*) echo nonsense; exit 0;; esac
printf 'extra-sandbox-paths\n/hooked=`+shared+`\n\n'
`, 0o755)
	b := e.startBuildDaemon(t, "pre-build-hook = "+hook)
	args := b.expr(t, "prehook", `{
  ok = mk { name = "pre-ok"; script = "cat /hooked/data > $out"; };
  bad = mk { name = "pre-bad"; script = "echo > $out"; };
}`)
	out := oneLine(t, "ok", b.nixBuild(append(args, "-A", "ok", "--no-out-link")...).ok(t))
	if got, err := os.ReadFile(b.realPath(out)); err != nil || !strings.HasPrefix(string(got), "from-the-hook-"+e.nonce) {
		t.Errorf("the builder read %q, %v through the hook's path", got, err)
	}
	data, _ := os.ReadFile(log)
	if !regexp.MustCompile(`/nix/store/[a-z0-9]{32}-pre-ok\.drv\nroot exists\n`).Match(data) {
		t.Errorf("the hook's arguments:\n%s", data)
	}
	stderr := b.nixBuild(append(args, "-A", "bad", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "unknown pre-build hook command 'nonsense'") {
		t.Errorf("a hook answering nonsense: stderr:\n%s", stderr)
	}
}

// TestBuildCheck: nix-build --check builds a derivation again and
// compares: a deterministic one passes (its inputs are not checked), one
// whose output changes fails with Nix's message, and one never built
// cannot be checked.
func TestBuildCheck(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "check", `rec {
  det = mk { name = "check-det"; script = "echo same > $out"; };
  nondet = mk { name = "check-nondet"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
  unbuilt = mk { name = "check-unbuilt"; script = "echo > $out"; };
  top = mk { name = "check-top"; dep = nondet; script = "echo top > $out"; };
}`)
	for _, attr := range []string{"det", "nondet", "top"} {
		b.nixBuild(append(args, "-A", attr, "--no-out-link")...).ok(t)
	}
	b.nixBuild(append(args, "-A", "det", "--no-out-link", "--check")...).ok(t)
	// Only the requested derivation is checked, not its inputs.
	b.nixBuild(append(args, "-A", "top", "--no-out-link", "--check")...).ok(t)
	stderr := b.nixBuild(append(args, "-A", "nondet", "--no-out-link", "--check")...).fails(t)
	if !regexp.MustCompile(`derivation '/nix/store/[a-z0-9]{32}-check-nondet\.drv' may not be deterministic: output '[^']*/nix/store/[a-z0-9]{32}-check-nondet' differs`).MatchString(stderr) ||
		!strings.Contains(stderr, "checking outputs of '") {
		t.Errorf("non-deterministic build: stderr:\n%s", stderr)
	}
	stderr = b.nixBuild(append(args, "-A", "unbuilt", "--no-out-link", "--check")...).fails(t)
	if !strings.Contains(stderr, "so checking is not possible") {
		t.Errorf("checking an unbuilt derivation: stderr:\n%s", stderr)
	}
}

// TestBuildNoChroot: with sandbox = true (Nix's default), a derivation that
// asks to build outside the sandbox is refused, as Nix refuses it.
func TestBuildNoChroot(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "sandbox = true")
	args := b.expr(t, "nochroot", `{ impure = mk { name = "impure"; __noChroot = true; script = "echo > $out"; }; }`)
	stderr := b.nixBuild(append(args, "-A", "impure", "--no-out-link")...).fails(t)
	if !regexp.MustCompile(`derivation '/nix/store/[a-z0-9]{32}-impure\.drv' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'`).MatchString(stderr) {
		t.Errorf("stderr:\n%s", stderr)
	}
}

// TestBuildKeepGoing: without --keep-going (Nix's default) the first
// failed build stops the request's other builds; with it they finish.
// The slow build waits for /marks/go for at most a minute: a daemon that
// does not stop it makes its output valid, which the test sees. Both
// builds run at once (max-jobs 2 on the daemon and the client).
func TestBuildKeepGoing(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "max-jobs = 2")
	args := b.expr(t, "keepgoing", `rec {
  fail = mk { name = "kg-fail"; script = "exit 1"; };
  slow = mk { name = "kg-slow"; script = ": kg-slow-${nonce}; i=0; while [ ! -e /marks/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo > $out"; };
  top = mk { name = "kg-top"; inherit fail slow; script = "echo > $out"; };
}`)
	drv := strings.TrimSpace(b.client("nix-instantiate", append(args, "-A", "slow")...).ok(t))
	slow := strings.TrimSpace(b.client("nix-store", "-q", "--outputs", drv).ok(t))
	for _, attrs := range [][]string{{"-A", "fail", "-A", "slow"}, {"-A", "top"}} {
		stderr := b.nixBuild(append(append(args, attrs...), "--no-out-link", "--max-jobs", "2")...).fails(t)
		if !strings.Contains(stderr, "builder for '") {
			t.Errorf("%v: stderr:\n%s", attrs, stderr)
		}
		// Stopped, not left running: once its builder is gone, its
		// output is not valid (left running, it would be after a minute).
		for builderRunning(t, "kg-slow-"+b.nonce) {
			time.Sleep(20 * time.Millisecond)
		}
		if b.isValid(t, slow) {
			t.Fatalf("%v: the slow build was not stopped when the other failed", attrs)
		}
	}
	writeFile(t, filepath.Join(b.marks, "go"), "", 0o644)
	b.nixBuild(append(args, "-A", "fail", "-A", "slow", "--no-out-link", "--max-jobs", "2", "--keep-going")...).fails(t)
	if !b.isValid(t, slow) {
		t.Errorf("with --keep-going the slow build did not finish")
	}
}

// TestBuildRepeat: --repeat N builds a derivation N more times and
// compares each round's outputs with the previous round's, as Nix does: a
// build that gives the same outputs is registered once, after its last
// round ("building '…' (round 2/3)"); one that differs fails (enforce-
// determinism, the default) and nothing is registered, or, with
// enforce-determinism = false, is reported and registered. With
// --keep-failed the first round is kept at <path>.check and named. Any
// client may send repeat.
func TestBuildRepeat(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "allowed-users = *")
	u := b.unprivileged(t)
	args := b.expr(t, "repeat", `{
  same = mk { name = "repeat-same"; script = "echo same > $out"; };
  differs = mk { name = "repeat-differs"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
  differs2 = mk { name = "repeat-differs-2"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
  differs3 = mk { name = "repeat-differs-3"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
}`)
	outOf := func(attr string) (drv, out string) {
		drv = strings.TrimSpace(b.client("nix-instantiate", append(args, "-A", attr)...).ok(t))
		return drv, strings.TrimSpace(b.client("nix-store", "-q", "--outputs", drv).ok(t))
	}

	drv, out := outOf("same")
	r := b.nixBuild(append(args, "-A", "same", "--no-out-link", "--repeat", "2")...).as(u).run(t)
	for i := 1; i <= 3; i++ {
		if want := fmt.Sprintf("building '%s' (round %d/3)", drv, i); r.err != nil || !strings.Contains(r.stderr, want) {
			t.Errorf("an untrusted client's --repeat 2: no %q:\n%s", want, r)
		}
	}
	if !b.isValid(t, out) {
		t.Errorf("%s is not valid after three rounds that agreed", out)
	}

	drv, out = outOf("differs")
	stderr := b.nixBuild(append(args, "-A", "differs", "--no-out-link", "--repeat", "1")...).fails(t)
	if want := fmt.Sprintf("output '%s' of '%s' differs from previous round", out, drv); !strings.Contains(stderr, want) {
		t.Errorf("rounds that differ: no %q:\n%s", want, stderr)
	}
	if b.isValid(t, out) {
		t.Errorf("%s is valid after rounds that differed", out)
	}

	// Nix 2.8 renames the first round's output by its logical path, which
	// is not where a chroot store keeps it ("renaming … : No such file or
	// directory").
	if !useStock {
		drv, out = outOf("differs2")
		stderr = b.nixBuild(append(args, "-A", "differs2", "--no-out-link", "--repeat", "1", "--keep-failed")...).fails(t)
		if want := fmt.Sprintf("output '%s' of '%s' differs from '%s.check' from previous round", out, drv, out); !strings.Contains(stderr, want) {
			t.Errorf("with --keep-failed: no %q:\n%s", want, stderr)
		}
		if _, err := os.Lstat(filepath.Join(b.root, out+".check")); err != nil {
			t.Errorf("with --keep-failed the first round is not kept: %v", err)
		}
	}

	drv, out = outOf("differs3")
	r = b.nixBuild(append(args, "-A", "differs3", "--no-out-link", "--repeat", "2", "--option", "enforce-determinism", "false")...).run(t)
	if want := fmt.Sprintf("output '%s' of '%s' differs from previous round", out, drv); r.err != nil || !strings.Contains(r.stderr, want) {
		t.Errorf("enforce-determinism = false: no %q, or not built:\n%s", want, r)
	}
	if strings.Contains(r.stderr, "(round 3/3)") || !b.isValid(t, out) {
		t.Errorf("enforce-determinism = false: the rounds did not end at the difference with its outputs registered:\n%s", r)
	}
}

// TestBuildLogLatest: `nix log` shows the log of the latest build of a
// derivation, as with nix-daemon, which writes each build's log afresh:
// after a failed build and a successful one, and after a --check.
func TestBuildLogLatest(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "loglatest", `{
  flaky = mk { name = "log-latest"; script = "echo attempt-$(cat /proc/sys/kernel/random/uuid); if [ -e /marks/ok ]; then echo > $out; else exit 1; fi"; };
}`)
	drv := strings.TrimSpace(b.client("nix-instantiate", append(args, "-A", "flaky")...).ok(t))
	attempt := regexp.MustCompile(`attempt-[0-9a-f-]{36}`)
	build := func(extra ...string) string {
		t.Helper()
		r := b.nixBuild(append(append(args, "-A", "flaky", "--no-out-link"), extra...)...).run(t)
		return attempt.FindString(r.stderr)
	}
	for i, step := range []struct {
		ok    bool
		extra []string
	}{{false, nil}, {true, nil}, {true, []string{"--check"}}} {
		if step.ok {
			writeFile(t, filepath.Join(b.marks, "ok"), "", 0o644)
		}
		shown := build(step.extra...)
		if got := attempt.FindString(b.nix(t, "log", drv)); shown == "" || got != shown {
			t.Errorf("build %d %v: nix log shows %q, the build printed %q", i+1, step.extra, got, shown)
		}
	}
}

// TestBuildLogLines: a failure shows the last log-lines lines of the
// builder's output: the daemon's setting, or a trusted client's (0: none),
// as with nix-daemon.
func TestBuildLogLines(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "log-lines = 4")
	args := b.expr(t, "loglines", `{
  loud = mk { name = "log-lines-loud"; script = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line-$i; done; exit 1"; };
}`)
	for _, tc := range []struct {
		extra []string
		want  string
	}{{nil, "last 4 log lines:"}, {[]string{"--log-lines", "2"}, "last 2 log lines:"}, {[]string{"--log-lines", "0"}, ""}} {
		stderr := b.nixBuild(append(append(args, "-A", "loud", "--no-out-link"), tc.extra...)...).fails(t)
		if (tc.want == "") == strings.Contains(stderr, "log lines:") || tc.want != "" && !strings.Contains(stderr, tc.want) || strings.Contains(stderr, "ignoring the setting") {
			t.Errorf("%v: want %q:\n%s", tc.extra, tc.want, stderr)
		}
	}
}

// TestBuildClientHangsUp: a build whose only client goes away (a
// cancelled CI job) is stopped, as nix-daemon stops it when the client's
// connection hangs up, instead of running to its end: the builder is gone
// and the output is never registered.
func TestBuildClientHangsUp(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "hangup", `{ long = mk { name = "hangup-long"; script = ": hangup-${nonce}; echo started; sleep 4; echo > $out"; }; }`)
	drv := strings.TrimSpace(b.client("nix-instantiate", append(args, "-A", "long")...).ok(t))
	out := strings.TrimSpace(b.client("nix-store", "-q", "--outputs", drv).ok(t))
	x := b.nixBuild(append(args, "-A", "long", "--no-out-link")...).exec()
	killWhenBuilding(t, x, "hangup-"+b.nonce)
	for stop := time.Now().Add(5 * time.Second); builderRunning(t, "hangup-"+b.nonce); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(stop) {
			t.Fatal("the builder still runs 5 s after its only client went away")
		}
	}
	time.Sleep(4500 * time.Millisecond) // past the builder's own end
	if b.isValid(t, out) {
		t.Errorf("%s was registered after its only client went away", out)
	}
}

// killWhenBuilding starts the client x, and kills it once a builder whose
// command line holds token runs.
func killWhenBuilding(t *testing.T, x *exec.Cmd, token string) {
	t.Helper()
	if err := x.Start(); err != nil {
		t.Fatal(err)
	}
	defer x.Wait()
	defer x.Process.Kill()
	for deadline := time.Now().Add(30 * time.Second); !builderRunning(t, token); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the builder did not start")
		}
	}
}

// TestBuildStdioClientHangsUp: the same over ssh-ng, where the daemon
// serves one client on its standard input and output: when the client
// goes, the build stops and the daemon cleans up its sandbox before it
// exits (the write to the gone client must not kill it first).
func TestBuildStdioClientHangsUp(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "stdiohangup", `{ long = mk { name = "stdio-hangup"; script = ": stdio-hangup-${nonce}; sleep 6; echo > $out"; }; }`)
	ssh := b.sshNG(t)
	drv := strings.TrimSpace(b.client("nix-instantiate", append(args, "-A", "long")...).ok(t))
	x := b.cmd("nix-store", "--store", ssh, "-r", drv).exec()
	killWhenBuilding(t, x, "stdio-hangup-"+b.nonce)
	// (/proc/PID/cmdline separates the arguments with NUL.)
	for stop := time.Now().Add(10 * time.Second); builderRunning(t, "stdio-hangup-"+b.nonce) || builderRunning(t, b.root+"\x00--stdio"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(stop) {
			t.Fatal("the builder or the stdio daemon still runs 10 s after the client went away")
		}
	}
	// (nix-daemon 2.8 may leave its sandbox root behind here.)
	if left, _ := filepath.Glob(filepath.Join(b.root, "nix/store/*.chroot*")); len(left) > 0 && !useStock {
		t.Errorf("the stdio daemon left %v", left)
	}
}

// TestBuildChatty: at -vv the client hears what nix-daemon says of a
// builder it starts: the sandbox it sets up, the builder and its
// arguments.
func TestBuildChatty(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "chatty", `{ c = mk { name = "chatty-build"; script = "echo > $out"; }; }`)
	r := b.nixBuild(append(args, "-A", "c", "--no-out-link", "-vv")...).run(t)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`setting up chroot environment in '[^']*-chatty-build\.drv\.chroot(-[0-9]+)?'`),
		regexp.MustCompile(`executing builder '/nix/store/[a-z0-9]{32}-busybox-static/busybox'`),
		regexp.MustCompile(`using builder args 'sh -c echo > \$out'`),
	} {
		if r.err != nil || !want.MatchString(r.stderr) {
			t.Errorf("nix-build -vv: no %s:\n%s", want, r)
		}
	}
}

// TestBuildFailureStopsQueued: without --keep-going, a build waiting for
// a build slot when another of the request's builds fails does not start
// (to be stopped at once), as with Nix, whose worker handles the failure
// before it starts another build. One slot: if the queued build runs
// first it succeeds and both are shown; a queued build that starts after
// the failure is killed before its output is made, which the test sees.
// Which of the two takes the slot first is up to the daemon, so the test
// asks a few times.
func TestBuildFailureStopsQueued(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "max-jobs = 1")
	const rounds = 6
	var body strings.Builder
	body.WriteString("{\n")
	for i := range rounds {
		fmt.Fprintf(&body, "  fail%d = mk { name = \"fsq-fail-%d\"; script = \"exit 1\"; };\n", i, i)
		fmt.Fprintf(&body, "  queued%d = mk { name = \"fsq-queued-%d\"; script = \"sleep 1; echo > $out\"; };\n", i, i)
	}
	body.WriteString("}")
	args := b.expr(t, "failstopsqueued", body.String())
	for i := range rounds {
		attr := fmt.Sprintf("queued%d", i)
		drv := strings.TrimSpace(b.client("nix-instantiate", append(args, "-A", attr)...).ok(t))
		out := strings.TrimSpace(b.client("nix-store", "-q", "--outputs", drv).ok(t))
		stderr := b.nixBuild(append(args, "-A", fmt.Sprintf("fail%d", i), "-A", attr, "--no-out-link")...).fails(t)
		if strings.Contains(stderr, fmt.Sprintf("building '%s'", drv)) && !b.isValid(t, out) {
			t.Fatalf("round %d: the queued build started after the failure, to be stopped:\n%s", i, stderr)
		}
	}
}

// builderRunning reports whether a process has token in its command line.
func builderRunning(t *testing.T, token string) bool {
	t.Helper()
	return len(builderPIDs(t, token)) > 0
}

// builderPIDs returns the processes whose command line holds token.
func builderPIDs(t *testing.T, token string) []string {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var pids []string
	for _, p := range procs {
		if data, err := os.ReadFile(p); err == nil && strings.Contains(string(data), token) {
			pids = append(pids, filepath.Base(filepath.Dir(p)))
		}
	}
	return pids
}

// TestBuildCheckDiffHook: when --check finds an output that differs, with
// run-diff-hook the new output is kept at <path>.check and diff-hook runs
// with the two paths, the derivation and the build directory; its output
// reaches the client.
func TestBuildCheckDiffHook(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	argsFile := filepath.Join(e.dir, "diff-args")
	hook := writeFile(t, filepath.Join(e.dir, "diff-hook"), "#!/bin/sh\necho \"$@\" > "+argsFile+"\necho diff-hook-says-hello\n", 0o755)
	b := e.startBuildDaemon(t, "diff-hook = "+hook, "run-diff-hook = true")
	args := b.expr(t, "diffhook", `{ nondet = mk { name = "diff-nondet"; script = "cat /proc/sys/kernel/random/uuid > $out"; }; }`)
	out := strings.TrimSpace(b.nixBuild(append(args, "-A", "nondet", "--no-out-link")...).ok(t))
	stderr := b.nixBuild(append(args, "-A", "nondet", "--no-out-link", "--check")...).fails(t)
	check := b.realPath(out) + ".check"
	if !strings.Contains(stderr, "differs from '"+check+"'") || !strings.Contains(stderr, "diff-hook-says-hello") {
		t.Errorf("stderr:\n%s", stderr)
	}
	argsData, err := os.ReadFile(argsFile)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Fields(string(argsData))
	if len(got) != 4 || got[0] != out || got[1] != check || !strings.HasSuffix(got[2], "-diff-nondet.drv") {
		t.Errorf("diff hook arguments %q, want %s %s DRV DIR", got, out, check)
	}
	if a, err1 := os.ReadFile(b.realPath(out)); err1 != nil {
		t.Fatal(err1)
	} else if c, err2 := os.ReadFile(check); err2 != nil || string(a) == string(c) {
		t.Errorf("%s: %v, same contents as the output: %v", check, err2, string(a) == string(c))
	}
}

// TestBuildSandboxSettings: sandbox-build-dir moves the build directory
// inside the sandbox, sandbox-dev-shm-size sizes its /dev/shm.
func TestBuildSandboxSettings(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "sandbox-build-dir = /build-elsewhere", "sandbox-dev-shm-size = 3m")
	args := b.expr(t, "sandboxsettings", `{ s = mk { name = "sandbox-settings"; script = "echo $NIX_BUILD_TOP $PWD $TMPDIR > $out; df -k /dev/shm | tail -n 1 >> $out"; }; }`)
	out := strings.TrimSpace(b.nixBuild(append(args, "-A", "s", "--no-out-link")...).ok(t))
	data, err := os.ReadFile(b.realPath(out))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) != 2 || lines[0] != "/build-elsewhere /build-elsewhere /build-elsewhere" {
		t.Fatalf("output %q", data)
	}
	if f := strings.Fields(lines[1]); len(f) < 2 || f[1] != "3072" {
		t.Errorf("/dev/shm: %q, want 3072 KiB", lines[1])
	}
}

// TestRepairByRebuild: a built output that was damaged and that no cache
// has is built again and replaced, as Nix does, by nix-store --verify
// --repair and nix-build --repair, and by nix-store -r --repair of the
// output itself (which nix-daemon leaves to the caches); its referrers stay
// valid, an intact output of the same derivation is left as it was (which
// nix-daemon replaces too), and the store verifies clean.
func TestRepairByRebuild(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "repair", `rec {
  lib = mk { name = "repairable"; outputs = [ "out" "doc" ]; script = "mkdir $out; echo library > $out/lib; echo $RANDOM$RANDOM > $doc"; };
  app = mk { name = "repair-app"; inherit lib; script = "echo uses $lib > $out"; };
}`)
	app := oneLine(t, "app", b.nixBuild(append(args, "-A", "app", "--no-out-link")...).ok(t))
	outs := lines(b.nixBuild(append(args, "-A", "lib.all", "--no-out-link")...).ok(t))
	if len(outs) != 2 {
		t.Fatalf("lib's outputs: %q", outs)
	}
	lib, doc := outs[0], outs[1]
	if strings.HasSuffix(lib, "-doc") {
		lib, doc = doc, lib
	}
	// doc differs from build to build: a repair of lib leaves it be.
	docBefore, err := os.ReadFile(b.realPath(doc))
	if err != nil {
		t.Fatal(err)
	}
	damage := func() {
		t.Helper()
		f := filepath.Join(b.realPath(lib), "lib")
		if err := os.Chmod(b.realPath(lib), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(f, 0o644); err != nil {
			t.Fatal(err)
		}
		writeFile(t, f, "damaged\n", 0o444)
		if err := os.Chmod(b.realPath(lib), 0o555); err != nil {
			t.Fatal(err)
		}
	}
	repaired := func(how string, r result) {
		t.Helper()
		if r.err != nil {
			t.Fatalf("%s:\n%s", how, r)
		}
		if !strings.Contains(r.stderr, "repairing outputs of '") {
			t.Errorf("%s did not show the build:\n%s", how, r)
		}
		if got, err := os.ReadFile(filepath.Join(b.realPath(lib), "lib")); err != nil || string(got) != "library\n" {
			t.Errorf("%s: %s/lib holds %q (%v)", how, lib, got, err)
		}
		b.assertValid(t, how, app, lib, doc)
		// nix-daemon replaces every output of the derivation it rebuilds.
		if got, err := os.ReadFile(b.realPath(doc)); !useStock && (err != nil || string(got) != string(docBefore)) {
			t.Errorf("%s replaced the intact output %s: %q, was %q (%v)", how, doc, got, docBefore, err)
		}
		assertVerifyClean(t, b.nixStoreRun(t, "--verify", "--check-contents"))
	}

	// What a repair checked and found, in nix-daemon's words.
	saysChecked := func(how string, r result) {
		t.Helper()
		for _, want := range []string{"checking path '" + lib + "'...", "path '" + lib + "' is corrupted or missing!"} {
			if !strings.Contains(r.stderr, want) {
				t.Errorf("%s does not say %q:\n%s", how, want, r)
			}
		}
	}
	damage()
	r := b.nixStoreRun(t, "--verify", "--check-contents", "--repair")
	repaired("nix-store --verify --check-contents --repair", r)
	saysChecked("nix-store --verify --check-contents --repair", r)
	damage()
	r = b.nixBuild(append(args, "-A", "lib", "--no-out-link", "--repair")...).run(t)
	repaired("nix-build --repair", r)
	saysChecked("nix-build --repair", r)
	// A damaged input in the closure of what is named is repaired too
	// (nix-daemon repairs the inputs' outputs first, which it finds by
	// the input derivations rather than the closure).
	damage()
	r = b.nixBuild(append(args, "-A", "app", "--no-out-link", "--repair")...).run(t)
	repaired("nix-build --repair of a referrer", r)
	if want := "found corrupted or missing path '" + lib + "' in the output closure of '"; !useStock && !strings.Contains(r.stderr, want) {
		t.Errorf("nix-build --repair of a referrer does not say %q:\n%s", want, r)
	}
	if useStock {
		return // nix-daemon repairs a plain path from caches only
	}
	damage()
	repaired("nix-store -r --repair", b.nixStoreRun(t, "-r", "--repair", lib))
}

// TestOldClientExitStatus: a client before protocol 1.26 (Nix 2.3) gets
// the exit status of Nix's Worker with a failed BuildPaths, as its
// nix-build exits with it: 100 for a failed build, 102 for a fixed-output
// hash mismatch.
func TestOldClientExitStatus(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "exit-status", `{
  fails = mk { name = "exit-fails"; script = "exit 3"; };
  mismatch = mk { name = "exit-mismatch"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; script = "echo not-empty > $out"; };
}`)
	for attr, want := range map[string]uint64{"fails": 100, "mismatch": 102} {
		drv := oneLine(t, attr, b.client("nix-instantiate", append(args, "-A", attr)...).ok(t))
		p := dialProtoVersion(t, b.sock, 0x115) // 1.21, Nix 2.3's
		p.u64(9)                                // BuildPaths
		p.strs([]string{drv})
		p.u64(0) // normal
		if err := p.flush(); err != nil {
			t.Fatal(err)
		}
		var de *daemonError
		if err := p.readStderr(); !errors.As(err, &de) || de.status != want {
			t.Errorf("%s: BuildPaths at 1.21: %v (status %v), want exit status %d", attr, err, de, want)
		}
	}
}

// TestBuildUnknownOutput: asking for an output a derivation does not have
// fails with Nix's message, from the build (QueryMissing, which
// nix-store -r sends first, leaves it out, as Nix's does).
func TestBuildUnknownOutput(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "unknown-output", `{ one = mk { name = "one-output"; script = "echo > $out"; }; }`)
	drv := oneLine(t, "drv", b.client("nix-instantiate", append(args, "-A", "one")...).ok(t))
	stderr := b.client("nix-store", "-r", drv+"!nosuch").fails(t)
	if want := "derivation '" + drv + "' does not have wanted outputs 'nosuch'"; !strings.Contains(stderr, want) || strings.Contains(stderr, "QueryMissing") {
		t.Errorf("stderr lacks %q (or names an op):\n%s", want, stderr)
	}
	// A derivation that is not there, built, and asked for (EnsurePath).
	gone := "/nix/store/" + strings.Repeat("3", 32) + "-gone.drv"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-r", gone}, "cannot build missing derivation '" + gone + "'"},
		{[]string{"-r", gone, "--option", "substituters", "file://" + filepath.Join(b.dir, "empty-cache")}, "cannot build missing derivation '" + gone + "'"},
		{[]string{"-q", "--outputs", gone}, "path '" + gone + "' does not exist and cannot be created"},
	} {
		if stderr := b.client("nix-store", tc.args...).fails(t); !strings.Contains(stderr, tc.want) {
			t.Errorf("nix-store %v: stderr lacks %q:\n%s", tc.args, tc.want, stderr)
		}
	}
}

// TestBuildCounters: the Worker's build counters the client gets, as
// nix-daemon's: a build that failed, or whose input failed, is no longer
// expected; only the one that failed by itself counts as failed; at the
// end none runs ("[1 built, 1 failed]" rather than "[1/3 built, 2 failed]").
func TestBuildCounters(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "counters", `rec {
  ok = mk { name = "counters-ok"; script = "echo > $out"; };
  fails = mk { name = "counters-fails"; script = "exit 1"; };
  top = mk { name = "counters-top"; inherit ok fails; script = "echo > $out"; };
}`)
	r := b.client("nix", append([]string{"build", "-f"}, append(args, "top", "--no-link", "--keep-going", "--log-format", "internal-json")...)...).run(t)
	const actBuilds, resProgress = 104, 105
	last := lastResult(r.stderr, actBuilds, resProgress)
	if r.err == nil || fmt.Sprint(last) != "[1 1 0 1]" {
		t.Errorf("last build counters %v, want [1 1 0 1] (done, total, running, failed):\n%s", last, r)
	}
}

// TestBuildActivityEndsAfterCounts: a build's activity stops after the
// build counters that count it done (or failed), as with nix-daemon,
// whose goal's activity ends with the goal: a progress bar never shows
// the build neither running nor done.
func TestBuildActivityEndsAfterCounts(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "actorder", `{
  ok = mk { name = "actorder-ok"; script = "echo > $out"; };
  fails = mk { name = "actorder-fails"; script = "exit 1"; };
}`)
	const actBuild, actBuilds, resProgress = 105, 104, 105
	for _, tc := range []struct{ attr, counted string }{{"ok", "[1 1 0 0]"}, {"fails", "[0 0 0 1]"}} {
		r := b.client("nix", append([]string{"build", "-f"}, append(args, tc.attr, "--no-link", "--log-format", "internal-json")...)...).run(t)
		counted, stopped := -1, -1
		build := -1.0
		for i, e := range logEvents(r.stderr) {
			switch {
			case e.Action == "start" && e.Type == actBuild:
				build = e.ID
			case e.Action == "result" && e.ActType == actBuilds && e.Type == resProgress && fmt.Sprint(e.Fields) == tc.counted && counted < 0:
				counted = i
			case e.Action == "stop" && e.ID == build:
				stopped = i
			}
		}
		if counted < 0 || stopped < 0 || stopped < counted {
			t.Errorf("%s: the counters %s come at event %d, the build activity stops at %d: want it after them:\n%s", tc.attr, tc.counted, counted, stopped, r)
		}
	}
}

// TestNoLocalBuildsSaidOnce: with -j0, a request whose input must be
// built here fails with Nix's "unable to start any build", said once.
func TestNoLocalBuildsSaidOnce(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "j0", `rec {
  dep = mk { name = "j0-dep"; script = "echo > $out"; };
  top = mk { name = "j0-top"; inherit dep; script = "echo > $out"; };
}`)
	stderr := b.nixBuild(append(args, "-A", "top", "--no-out-link", "-j0")...).fails(t)
	if n := strings.Count(stderr, "unable to start any build"); n != 1 {
		t.Errorf("said %d times, want once:\n%s", n, stderr)
	}
}

// TestBuildSharedTimeout: a client's short --timeout does not stop a build
// that another client, without one, waits for: both get the output. (With
// nix-daemon the second client builds it again once the first one's
// build has timed out.)
func TestBuildSharedTimeout(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "sharedtimeout", `{ slow = mk { name = "shared-timeout"; script = ": shared-timeout-${nonce}; while [ ! -e /marks/go ]; do sleep 0.2; done; echo > $out"; }; }`)
	short := b.nixBuild(append(args, "-A", "slow", "--no-out-link", "--option", "timeout", "4")...)
	shortDone := make(chan result, 1)
	go func() { shortDone <- short.run(t) }()
	waitFor(t, "the builder", func() bool { return builderRunning(t, "shared-timeout-"+b.nonce) })
	long := make(chan result, 1)
	go func() { long <- b.nixBuild(append(args, "-A", "slow", "--no-out-link")...).run(t) }()
	time.Sleep(5 * time.Second) // past the first client's timeout (the second had 4 s to join)
	writeFile(t, filepath.Join(b.marks, "go"), "", 0o644)
	for who, ch := range map[string]chan result{"with --timeout 4": shortDone, "without": long} {
		if r := <-ch; r.err != nil && !(useStock && who == "with --timeout 4") {
			t.Errorf("the client %s:\n%s", who, r)
		}
	}
}

// TestStopLetsBuildsFinish: a daemon told to stop (SIGTERM: a restart or
// an upgrade) stops accepting connections at once, but serves those open
// until they end, within --shutdown-grace: a build under way finishes and
// its client gets its output. A second SIGTERM stops at once.
func TestStopLetsBuildsFinish(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nixyard's --shutdown-grace (nix-daemon's connections are processes of their own, which a SIGTERM to the daemon does not reach)")
	}
	b := newEnv(t).startBuildDaemonWith(t, withDaemonArgs("--shutdown-grace", "1m"))
	d, marks := b.daemon, b.marks
	args := b.expr(t, "stopgrace", `{
  slow = mk { name = "stop-grace"; script = ": stop-grace-${nonce}; while [ ! -e /marks/go ]; do sleep 0.1; done; echo > $out"; };
  slow2 = mk { name = "stop-now"; script = ": stop-now-${nonce}; sleep 60; echo > $out"; };
}`)
	build := func(attr string) chan result {
		ch := make(chan result, 1)
		go func() { ch <- b.nixBuild(append(args, "-A", attr, "--no-out-link")...).run(t) }()
		return ch
	}
	done := build("slow")
	waitFor(t, "the builder", func() bool { return builderRunning(t, "stop-grace-"+b.nonce) })
	syscall.Kill(d.proc.Process.Pid, syscall.SIGTERM)
	waitFor(t, "the socket to go", func() bool { _, err := os.Stat(d.sock); return err != nil })
	if r := d.client("nix", "store", "ping").run(t); r.err == nil {
		t.Errorf("a stopping daemon took a new connection:\n%s", r)
	}
	writeFile(t, filepath.Join(marks, "go"), "", 0o644)
	if r := <-done; r.err != nil {
		t.Errorf("the build under way when the daemon was told to stop:\n%s", r)
	}
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not exit once its last connection ended")
	}

	d.start(t)
	done = build("slow2")
	waitFor(t, "the builder", func() bool { return builderRunning(t, "stop-now-"+b.nonce) })
	syscall.Kill(d.proc.Process.Pid, syscall.SIGTERM)
	waitFor(t, "the socket to go", func() bool { _, err := os.Stat(d.sock); return err != nil })
	syscall.Kill(d.proc.Process.Pid, syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not exit at a second SIGTERM")
	}
	if r := <-done; r.err == nil || !strings.Contains(r.stderr, "the daemon is stopping") {
		t.Errorf("a build the daemon was told twice to stop: its client does not hear why:\n%s", r)
	}
	if builderRunning(t, "stop-now-"+b.nonce) {
		t.Error("the builder still runs after the daemon stopped")
	}
	if left, _ := filepath.Glob(filepath.Join(d.root, "nix/store/*.chroot*")); len(left) > 0 {
		t.Errorf("the stopped daemon left %v", left)
	}
}

// TestImpureEnvVarsWithholdsCredentials: a fixed-output derivation's
// impureEnvVars get the daemon's values, except the daemon's own AWS
// credentials (for --push-to s3://), which any client could otherwise
// read into the store: they come empty.
func TestImpureEnvVarsWithholdsCredentials(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon passes every variable of its environment that impureEnvVars names")
	}
	b := newEnv(t).startBuildDaemonWith(t, withDaemonEnv("NIXYARD_TEST_PROXY=http://proxy.example:3128", "AWS_SECRET_ACCESS_KEY=daemon-secret"))
	marks := b.marks
	want := "proxy=http://proxy.example:3128 secret=\n"
	sum := sha256.Sum256([]byte(want))
	args := b.expr(t, "impure-env", fmt.Sprintf(`{
  fod = mk {
    name = "impure-env";
    impureEnvVars = [ "NIXYARD_TEST_PROXY" "AWS_SECRET_ACCESS_KEY" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "%x";
    script = ": ${nonce}; echo proxy=$NIXYARD_TEST_PROXY secret=$AWS_SECRET_ACCESS_KEY | tee /marks/env > $out";
  };
}`, sum))
	r := b.nixBuild(append(args, "-A", "fod", "--no-out-link")...).run(t)
	if got, _ := os.ReadFile(filepath.Join(marks, "env")); r.err != nil || string(got) != want {
		t.Errorf("the builder saw %q, want %q:\n%s", got, want, r)
	}
}

// TestImpureHostDeps: a derivation's __impureHostDeps bring host paths
// into its sandbox when allowed-impure-host-deps allows them, and fail
// the build, in Nix's words, when it does not.
func TestImpureHostDeps(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	allowed := filepath.Join(e.dir, "host-deps")
	writeFile(t, filepath.Join(allowed, "tool"), "from the host "+e.nonce+"\n", 0o644)
	b := e.startBuildDaemon(t, "sandbox = true", "allowed-impure-host-deps = "+allowed)
	args := b.expr(t, "impurehost", fmt.Sprintf(`{
  ok = mk { name = "impure-ok"; __impureHostDeps = [ "%[1]s/tool" ]; script = "cat %[1]s/tool > $out"; };
  refused = mk { name = "impure-refused"; __impureHostDeps = [ "/etc/hostname" ]; script = "cat /etc/hostname > $out"; };
}`, allowed))
	out := strings.TrimSpace(b.nixBuild(append(args, "-A", "ok", "--no-out-link")...).ok(t))
	if got, err := os.ReadFile(b.realPath(out)); err != nil || string(got) != "from the host "+e.nonce+"\n" {
		t.Errorf("the build with an allowed impure host path wrote %q (%v)", got, err)
	}
	stderr := b.nixBuild(append(args, "-A", "refused", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "requested impure path '/etc/hostname', but it was not in allowed-impure-host-deps") {
		t.Errorf("a build with an impure host path not allowed:\n%s", stderr)
	}
}

// TestFixedOutputReferences: a fixed-output derivation whose output
// refers to a store path fails, saying so (nix-daemon 2.8 fails an
// assertion, and its client reads an unexpected end of file).
func TestFixedOutputReferences(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon 2.8 fails an assertion here")
	}
	b := startBuildDaemon(t, "sandbox = true")
	ref := strings.TrimSpace(b.nix(t, "eval", "--raw", "--expr", `builtins.toFile "fod-ref-`+b.nonce+`" "referred to"`))
	content := "ref " + ref + "\n"
	args := b.expr(t, "fodref", fmt.Sprintf(`{
  fod = mk {
    name = "fod-with-ref"; dep = builtins.toFile "fod-ref-${nonce}" "referred to";
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "%x";
    script = "echo ref $dep > $out";
  };
}`, sha256.Sum256([]byte(content))))
	stderr := b.nixBuild(append(args, "-A", "fod", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "illegal path references in fixed-output derivation '") {
		t.Errorf("a fixed output that refers to a path:\n%s", stderr)
	}
}

// TestBuildOutLinks: `nix build A B` names its out-links (result,
// result-1, …) as with nix-daemon, whose results come one per derivation
// (with the outputs of every request of it), by the derivations' names.
func TestBuildOutLinks(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "outlinks", `{
  zeta = mk { name = "zeta"; script = "echo zeta > $out"; };
  alpha = mk { name = "alpha"; script = "echo alpha > $out"; };
  multi = mk { name = "multi"; outputs = [ "out" "dev" "doc" ]; script = "echo o > $out; echo d > $dev; echo c > $doc"; };
}`)
	file := args[0]
	rest := args[1:]
	for i, tc := range []struct {
		attrs []string
		want  map[string]string // link -> the end of its target
	}{
		{[]string{"zeta", "alpha"}, map[string]string{"result": "-alpha", "result-1": "-zeta"}},
		{[]string{"multi.dev", "multi.doc"}, map[string]string{"result-dev": "-multi-dev", "result-doc": "-multi-doc"}},
		{[]string{"multi.doc", "multi.doc"}, map[string]string{"result-doc": "-multi-doc", "result-1-doc": "-multi-doc"}},
	} {
		dir := filepath.Join(b.dir, fmt.Sprintf("links-%d", i))
		mustMkdir(t, dir, 0o755)
		cmd := b.client("nix", append(append([]string{"build", "-f", file}, rest...), tc.attrs...)...)
		cmd.dir = dir
		cmd.ok(t)
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, e := range ents {
			target, _ := os.Readlink(filepath.Join(dir, e.Name()))
			got[e.Name()] = target
		}
		if len(got) != len(tc.want) {
			t.Errorf("nix build %v made links %v, want %v", tc.attrs, got, tc.want)
			continue
		}
		for link, suffix := range tc.want {
			if !strings.HasSuffix(got[link], suffix) {
				t.Errorf("nix build %v: %s -> %q, want …%s (all: %v)", tc.attrs, link, got[link], suffix, got)
			}
		}
	}
}

// TestBuildProgressOrder: as from nix-daemon, a build's activity starts
// before the builds' progress counts it as running (the progress bar
// showed a running build with no name for a moment).
func TestBuildProgressOrder(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "progressorder", `{ x = mk { name = "progress-order"; script = "echo > $out"; }; }`)
	r := b.nixBuild(append(args, "-A", "x", "--no-out-link", "--log-format", "internal-json", "-v")...).run(t)
	if r.err != nil {
		t.Fatalf("%s", r)
	}
	const actBuild, actBuilds, resProgress = 105, 104, 105
	started, counted := -1, -1
	for i, e := range logEvents(r.stderr) {
		switch {
		case e.Action == "start" && e.Type == actBuild && started < 0:
			started = i
		case e.Action == "result" && e.Type == resProgress && e.ActType == actBuilds && len(e.Fields) == 4 && e.Fields[2] == float64(1) && counted < 0:
			counted = i
		}
	}
	if started < 0 || counted < 0 || counted < started {
		t.Errorf("the build's start (line %d) and the progress counting it running (line %d):\n%s", started, counted, r.stderr)
	}
}

// TestKeepGoingFailureBeforeNextBuild: with --keep-going and one build at
// a time, a failed input's error comes before the next build starts, as
// from nix-daemon (whose worker logs a failed goal's error before it
// starts the next build).
func TestKeepGoingFailureBeforeNextBuild(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "max-jobs = 1")
	args := b.expr(t, "kgorder", `rec {
  dfa = mk { name = "kgorder-a"; script = "echo a-fails; exit 3"; };
  dfb = mk { name = "kgorder-b"; script = "echo b-fails; exit 3"; };
  top = mk { name = "kgorder-top"; inherit dfa dfb; script = "echo > $out"; };
}`)
	stderr := b.nixBuild(append(args, "-A", "top", "--no-out-link", "-k")...).fails(t)
	firstError := strings.Index(stderr, "failed with exit code 3")
	starts := regexp.MustCompile(`building '[^']*-kgorder-[ab]\.drv'`).FindAllStringIndex(stderr, -1)
	if firstError < 0 || len(starts) != 2 || firstError > starts[1][0] {
		t.Errorf("the second build started before the first one's error was told:\n%s", stderr)
	}
}

// TestOneRunningAtATime: with one build at a time, the build counters
// never count two running (the next build starts while the previous one's
// outputs are registered), as with nix-daemon.
func TestOneRunningAtATime(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "max-jobs = 1")
	args := b.expr(t, "onerunning", `rec {
  a = mk { name = "onerunning-a"; script = "sleep 0.5; echo > $out"; };
  b = mk { name = "onerunning-b"; script = "sleep 0.5; echo > $out"; };
  top = mk { name = "onerunning-top"; inherit a b; script = "echo > $out"; };
}`)
	r := b.client("nix", append([]string{"build", "-f"}, append(args, "top", "--no-link", "--log-format", "internal-json")...)...).run(t)
	if r.err != nil {
		t.Fatalf("nix build:\n%s", r)
	}
	const actBuilds, resProgress = 104, 105
	for _, e := range logEvents(r.stderr) {
		if e.Action == "result" && e.ActType == actBuilds && e.Type == resProgress && len(e.Fields) == 4 && e.Fields[2].(float64) > 1 {
			t.Errorf("the build counters %v count %v running with max-jobs = 1:\n%s", e.Fields, e.Fields[2], r)
			break
		}
	}
}

// TestBuildBesideRealNix: real Nix building a derivation in the store
// directly (or a second daemon, during an upgrade) while the daemon is
// asked for the same one: the daemon neither wipes the other's sandbox
// nor builds over it, and both get the output.
func TestBuildBesideRealNix(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon serializes with real Nix through the output locks alone")
	}
	b := startBuildDaemon(t)
	args := b.expr(t, "beside", `{ slow = mk { name = "beside"; script = ": beside-${nonce}; while [ ! -e /marks/go ]; do sleep 0.1; done; echo > $out"; }; }`)
	direct := make(chan result, 1)
	go func() {
		direct <- b.local(b.root, "nix-build", append(args, "-A", "slow", "--no-out-link",
			"--option", "sandbox", "true", "--option", "sandbox-paths", "/marks="+b.marks)...).run(t)
	}()
	waitFor(t, "real Nix's builder", func() bool { return builderRunning(t, "beside-"+b.nonce) })
	// The daemon's client, at -vvv, hears when its sandbox is laid out
	// (it then waits for real Nix's output locks).
	stderrPath := filepath.Join(b.dir, "beside.stderr")
	stderr, err := os.Create(stderrPath)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	x := b.nixBuild(append(args, "-A", "slow", "--no-out-link", "-vvv")...).exec()
	x.Stderr = stderr
	if err := x.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the daemon's sandbox", func() bool {
		out, _ := os.ReadFile(stderrPath)
		return strings.Contains(string(out), "setting up chroot environment")
	})
	writeFile(t, filepath.Join(b.marks, "go"), "", 0o644)
	select {
	case r := <-direct:
		if r.err != nil {
			t.Errorf("real Nix:\n%s", r)
		}
	case <-time.After(2 * time.Minute):
		x.Process.Kill()
		t.Fatal("real Nix's build never ended (its sandbox was taken from under it)")
	}
	if err := x.Wait(); err != nil {
		out, _ := os.ReadFile(stderrPath)
		t.Errorf("the daemon's client: %v\n%s", err, out)
	}
}

// upgradeDuringBuild starts, through b's daemon, a build of a derivation
// called name whose builder waits for the file gate in b's marks; once it
// runs, the daemon is told to stop (the build keeps it draining) and its
// successor is started on the same store, as in an upgrade. It returns
// the successor and the build's result, which comes once gate is written.
func (b *buildEnv) upgradeDuringBuild(t *testing.T, name, gate string) (next *daemon, built <-chan result) {
	t.Helper()
	args := b.expr(t, name, fmt.Sprintf(`{
  slow = mk { name = "%s"; script = ": %[1]s-${nonce}; while [ ! -e /marks/%s ]; do sleep 0.1; done; echo built > $out"; };
}`, name, gate))
	done := make(chan result, 1)
	go func() { done <- b.nixBuild(append(args, "-A", "slow", "--no-out-link")...).run(t) }()
	waitFor(t, "the builder", func() bool { return builderRunning(t, name+"-"+b.nonce) })
	old := b.daemon
	if err := syscall.Kill(old.proc.Process.Pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the old daemon's socket to go", func() bool { _, err := os.Stat(old.sock); return err != nil })
	next = old.successor(t)
	next.start(t)
	return next, done
}

// TestKeepGoingTopErrorsOrder: with --keep-going, the errors of failed
// targets come as nix-daemon's buildPaths logs them: in its goals' order
// (by name), the first one's last, just before "build of … failed",
// whatever the order they were asked for or failed in.
func TestKeepGoingTopErrorsOrder(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "max-jobs = 1")
	args := b.expr(t, "kgtop", `{
  b = mk { name = "kgtop-b"; script = "echo b-fails; exit 3"; };
  a = mk { name = "kgtop-a"; script = "echo a-fails; exit 3"; };
  c = mk { name = "kgtop-c"; script = "echo c-fails; exit 3"; };
}`)
	stderr := b.nixBuild(append(args, "-A", "b", "-A", "a", "-A", "c", "--no-out-link", "-k")...).fails(t)
	var order []string
	for _, m := range regexp.MustCompile(`builder for '[^']*-kgtop-([abc])\.drv' failed with exit code 3`).FindAllStringSubmatch(stderr, -1) {
		order = append(order, m[1])
	}
	end := strings.Index(stderr, "build of ")
	last := strings.LastIndex(stderr, "failed with exit code 3")
	if strings.Join(order, "") != "bca" || end < last {
		t.Errorf("errors in the order %q (want b, c, then a, then \"build of\"):\n%s", order, stderr)
	}
}
