package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/ci"
	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

// CI jobs in containers (bubblewrap) sharing the host store through
// nixyard's job socket, mounted as `nixyard runner-config` prints it
// (internal/ci): the host store read-only at /mnt/nix/store, the job
// socket's directory at /run/nixyard, NIX_REMOTE=unix://…?root=/mnt. Each
// job has its own pid namespace, and its own image /nix, which stays
// visible because the host store is elsewhere.

// imageTool is a path in the job image's own /nix/store.
const imageTool = "/nix/store/00000000000000000000000000000000-image-tool/bin/tool"

// ciEnv is a host running nixyard with a job socket, plus a job image.
type ciEnv struct {
	*buildEnv
	host  ci.Host
	image string // the image's /nix
	job   string // read-only files jobs see at /job
	cache *cachetest.Server
	out   string // a fixture in the cache: out refers to dep
	dep   string
}

// ciExpr: overlapping builds. Every builder records its name in
// /marks/built and samples how many builders run at once.
const ciExpr = `{ bbdir, nonce }:
let
  bb = builtins.path { path = bbdir; name = "busybox-static"; };
  step = name: deps: builtins.derivation {
    inherit name deps nonce;
    system = builtins.currentSystem;
    builder = "${bb}/busybox";
    args = [ "sh" "-c" "echo ${name} >> /marks/built; touch /marks/running/${name}; ls /marks/running | wc -l >> /marks/samples; sleep 0.3; rm /marks/running/${name}; echo ${name} $deps > $out" ];
  };
in rec {
  base = step "base" [];
  a = step "a" [ base ]; b = step "b" [ base ]; c = step "c" [ a b ];
  t0 = step "t0" [ a ]; t1 = step "t1" [ b c ]; t2 = step "t2" [ c ]; t3 = step "t3" [ a b c ];
}
`

func startCIHost(t *testing.T, conf ...string) *ciEnv {
	t.Helper()
	if useStock {
		t.Skip("job sockets and job sessions are nixyard's")
	}
	if _, err := exec.LookPath("bwrap"); err != nil {
		t.Skip("bubblewrap is not installed (scripts/test.sh installs it)")
	}
	e := newEnv(t)
	other := e.otherStore("src")
	cacheDir := filepath.Join(e.dir, "cache")
	sec, pub := e.generateKey(t, "ci-cache-1")
	out, dep := e.buildFixture(t, other, "ci-closure")
	e.fillCache(t, other, cacheDir, "xz", sec, out)
	srv := cachetest.New(cacheDir)
	t.Cleanup(srv.Close)

	host := ci.Host{Socket: filepath.Join(e.dir, "job-socket", "socket")}
	marks := filepath.Join(e.dir, "marks")
	mustMkdir(t, filepath.Join(marks, "running"), 0o777)
	d := e.startDaemon(t, withDaemonArgs("--listen", host.Socket+",trusted=false,tenant=ci-test"),
		withConf(append([]string{
			"sandbox-paths = /marks=" + marks,
			"substituters = " + srv.URL,
			"trusted-public-keys = " + pub,
			"require-sigs = true",
			"max-jobs = 2",
		}, conf...)...))
	host.StoreRoot = d.root
	c := &ciEnv{buildEnv: &buildEnv{daemon: d, marks: marks}, host: host, cache: srv, out: out, dep: dep,
		image: filepath.Join(e.dir, "image-nix"), job: filepath.Join(e.dir, "job")}

	// The image: its own /nix/store with a tool the job runs.
	writeFile(t, filepath.Join(c.image, strings.TrimPrefix(imageTool, "/nix/")), "#!/bin/sh\necho image-tool-ok\n", 0o755)
	// What jobs read: busybox, the build expression, Nix configuration,
	// the nixyard binary (for doctor), and the paths they work on (in a
	// file, so no job process has a store path in its environment or
	// command line, which the collector would take as a runtime root).
	bb, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(c.job, "bb", "busybox"), string(bb), 0o755)
	writeFile(t, filepath.Join(c.job, "ci.nix"), ciExpr, 0o644)
	writeFile(t, filepath.Join(c.job, "conf", "nix.conf"), "experimental-features = nix-command\n", 0o644)
	nixyard, err := os.ReadFile(nixyardBin)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(c.job, "nixyard"), string(nixyard), 0o755)
	writeFile(t, filepath.Join(c.job, "out"), out+"\n", 0o644)
	writeFile(t, filepath.Join(c.job, "nonce"), e.nonce, 0o644)
	return c
}

// jobScriptHead is sourced by every job: OUT is the cached fixture, and
// nb builds an attribute of ci.nix.
const jobScriptHead = `set -e
OUT=$(cat /job/out)
nb() { nix-build /job/ci.nix --arg bbdir /job/bb --argstr nonce "$(cat /job/nonce)" --no-out-link -A "$@"; }
`

// jobCmd runs script as root in a new container: new namespaces (pid
// included), host /usr and /etc read-only, the image's /nix, the mounts
// of internal/ci, and ctl (read-write, at /ctl) to talk to the test.
func (c *ciEnv) jobCmd(ctl, script string) *command {
	args := []string{
		"--unshare-all", "--die-with-parent",
		"--ro-bind", "/usr", "/usr",
		"--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
		"--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
		"--ro-bind", "/etc", "/etc",
		"--bind", c.image, "/nix",
		"--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
		"--ro-bind", c.job, "/job",
		"--bind", ctl, "/ctl",
	}
	for _, m := range c.host.Mounts() {
		args = append(args, "--ro-bind", m.Host, m.Container)
	}
	args = append(args, "--clearenv",
		"--setenv", "PATH", "/usr/bin:/bin",
		"--setenv", "HOME", "/tmp",
		"--setenv", "TMPDIR", "/tmp",
		"--setenv", "NIX_CONF_DIR", "/job/conf",
		"--setenv", "NIX_USER_CONF_FILES", "",
		"--setenv", "NIX_STATE_DIR", "/tmp/nix-state",
		"--setenv", "NIX_LOG_DIR", "/tmp/nix-log",
		"--setenv", "XDG_CACHE_HOME", "/tmp/cache",
	)
	for _, kv := range c.host.Env() {
		k, v, _ := strings.Cut(kv, "=")
		args = append(args, "--setenv", k, v)
	}
	args = append(args, "sh", "-c", jobScriptHead+script)
	return c.cmd("bwrap", args...)
}

// ctlDir makes a fresh directory a job sees at /ctl.
func (c *ciEnv) ctlDir(t *testing.T, name string) string {
	dir := filepath.Join(c.dir, "ctl-"+name)
	mustMkdir(t, dir, 0o777)
	return dir
}

func readCtl(t *testing.T, dir, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// builtCounts counts the builds of each step so far.
func (c *ciEnv) builtCounts(t *testing.T) map[string]int {
	counts := map[string]int{}
	if _, err := os.Stat(filepath.Join(c.marks, "built")); err != nil {
		return counts
	}
	for _, l := range c.markerLines(t, "built") {
		counts[l]++
	}
	return counts
}

// TestCIJob: one job builds and substitutes through the job socket, uses
// its results, still runs its image's own /nix tool, and nixyard doctor
// reports a healthy, untrusted job session.
func TestCIJob(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	ctl := c.ctlDir(t, "job")
	out := c.jobCmd(ctl, `
/nix/store/00000000000000000000000000000000-image-tool/bin/tool
nix-store -r "$OUT" > /ctl/realised
T=$(nb t3)
echo "$T" > /ctl/t3
cat "/mnt$OUT" > /ctl/out-contents
cat "/mnt$T" > /ctl/t3-contents
/job/nixyard doctor > /ctl/doctor
`).ok(t)
	if strings.TrimSpace(out) != "image-tool-ok" {
		t.Errorf("image tool printed %q, want image-tool-ok", out)
	}
	if got := readCtl(t, ctl, "realised"); got != c.out {
		t.Errorf("nix-store -r printed %q, want %s", got, c.out)
	}
	if got, want := readCtl(t, ctl, "out-contents"), c.nonce+" "+c.dep; got != want {
		t.Errorf("the substituted output reads %q inside the job, want %q", got, want)
	}
	t3 := readCtl(t, ctl, "t3")
	if !strings.HasPrefix(readCtl(t, ctl, "t3-contents"), "t3 /nix/store/") {
		t.Errorf("built output %s reads %q inside the job", t3, readCtl(t, ctl, "t3-contents"))
	}
	for _, p := range []string{c.out, c.dep, t3} {
		if !c.isValid(t, p) {
			t.Errorf("%s is not valid in the host store", p)
		}
	}
	doctor := readCtl(t, ctl, "doctor")
	t.Logf("nixyard doctor inside the job:\n%s", doctor)
	for _, want := range []string{"ok   session    job=pidns-", "tenant=ci-test", "ok   trust      untrusted", "ok   store", "ok   read-only"} {
		if !strings.Contains(doctor, want) {
			t.Errorf("doctor output lacks %q:\n%s", want, doctor)
		}
	}
	// Positive control for the doctor: on the host, through the default
	// socket, root is trusted and has no job session.
	host := c.cmd(nixyardBin, "doctor", "--store", c.url()).run(t).stdout
	for _, want := range []string{"warn trust      TRUSTED", "warn session    job=none", "FAIL read-only"} {
		if !strings.Contains(host, want) {
			t.Errorf("doctor on the host lacks %q:\n%s", want, host)
		}
	}
}
