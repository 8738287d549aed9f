package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

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
	return startCIHostWith(t, nil, conf...)
}

// startCIHostWith is startCIHost with more arguments of the daemon.
func startCIHostWith(t *testing.T, args []string, conf ...string) *ciEnv {
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
	// (A --listen socket is untrusted without trusted=false.)
	d := e.startDaemon(t, withDaemonArgs(append([]string{"--listen", host.Socket + ",tenant=ci-test", "--metrics-listen", "127.0.0.1:0"}, args...)...),
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
	// A root of the host's, whose name the job must not learn.
	hostPath := strings.TrimSpace(c.nixStore(t, "--add", c.file(t, "host-rooted", "host "+c.nonce)))
	c.nixStore(t, "--add-root", filepath.Join(c.dir, "host-secret-root"), "--indirect", "-r", hostPath)
	ctl := c.ctlDir(t, "job")
	job := c.jobCmd(ctl, `
/nix/store/00000000000000000000000000000000-image-tool/bin/tool
nix-store -r "$OUT" > /ctl/realised
T=$(nb t3)
echo "$T" > /ctl/t3
cat "/mnt$OUT" > /ctl/out-contents
cat "/mnt$T" > /ctl/t3-contents
nix-build /job/ci.nix --arg bbdir /job/bb --argstr nonce "$(cat /job/nonce)" -A t3 -o /tmp/job-result > /dev/null
touch /ctl/linked
while [ ! -e /ctl/go ]; do sleep 0.1; done
nix-store --gc --print-roots > /ctl/roots 2> /ctl/roots.err
nix-store --gc --print-dead > /dev/null 2>> /ctl/roots.err
/job/nixyard doctor > /ctl/doctor
`)
	done := make(chan result, 1)
	go func() { done <- job.run(t) }()
	// The job's out-link is in its container: no root on the host, whose
	// collector would follow that name on the host (and, finding nothing
	// there, remove it at its next root scan).
	waitCtl(t, ctl, "linked")
	if links, _ := os.ReadDir(filepath.Join(c.root, "nix/var/nix/gcroots/auto")); len(links) != 1 {
		t.Errorf("gcroots/auto after the job's nix-build -o: %v, want the host's root only", links)
	}
	// A temporary roots file of a host process gone (a host path, a host
	// pid): the job's root scan removes it without saying so.
	stale := writeFile(t, filepath.Join(c.root, "nix/var/nix/temproots", "2147483646"), "", 0o644)
	writeFile(t, filepath.Join(ctl, "go"), "", 0o644)
	r := <-done
	if r.err != nil {
		t.Fatalf("job:\n%s", r)
	}
	if said := readCtl(t, ctl, "roots.err"); strings.Contains(said, "temporary roots") {
		t.Errorf("the job's --print-roots and --print-dead name a host temporary roots file:\n%s", said)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Errorf("%s: a stale temporary roots file left by the job's root scan (the check saw none)", stale)
	}
	out := r.stdout
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
	// The job sees the host's roots, but not their names.
	if roots := readCtl(t, ctl, "roots"); strings.Contains(roots, "host-secret-root") || !strings.Contains(roots, "{censored} -> "+hostPath) {
		t.Errorf("the job's --print-roots:\n%s", roots)
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

// runJobs runs the same job in n containers at once.
func (c *ciEnv) runJobs(t *testing.T, wave string, n int, script func(i int) string) {
	t.Helper()
	var wg sync.WaitGroup
	results := make([]result, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = c.jobCmd(c.ctlDir(t, fmt.Sprintf("%s-%d", wave, i)), script(i)).run(t)
		}()
	}
	wg.Wait()
	for i, r := range results {
		if r.err != nil {
			t.Errorf("%s job %d failed:\n%s", wave, i, r)
		}
	}
}

// TestCIConcurrentJobs: four jobs at once on an empty host need an
// overlapping closure from the cache and overlapping builds: every NAR is
// downloaded once, every derivation built once, never more builds at once
// than max-jobs; a second wave on the warm host downloads and builds
// nothing.
func TestCIConcurrentJobs(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	script := func(i int) string {
		return fmt.Sprintf(`nix-store -r "$OUT" >/dev/null
T=$(nb t%d)
cat "/mnt$OUT" "/mnt$T" > /ctl/contents
`, i)
	}
	c.runJobs(t, "cold", 4, script)
	downloads := c.cache.Counts()
	for _, p := range []string{c.out, c.dep} {
		nar := narURL(t, c.cacheDirOf(), p)
		if n := downloads[nar]; n != 1 {
			t.Errorf("%d GETs of %s, want exactly 1", n, nar)
		}
	}
	counts := c.builtCounts(t)
	for _, name := range []string{"base", "a", "b", "c", "t0", "t1", "t2", "t3"} {
		if counts[name] != 1 {
			t.Errorf("%s built %d times, want 1 (all: %v)", name, counts[name], counts)
		}
	}
	peak := 0
	for _, l := range c.markerLines(t, "samples") {
		n, err := strconv.Atoi(strings.TrimSpace(l))
		if err != nil {
			t.Fatalf("sample %q: %v", l, err)
		}
		peak = max(peak, n)
	}
	if peak > 2 {
		t.Errorf("%d builders ran at once; the daemon's max-jobs is 2", peak)
	}
	for i := range 4 {
		got := readCtl(t, filepath.Join(c.dir, fmt.Sprintf("ctl-cold-%d", i)), "contents")
		if !strings.HasPrefix(got, c.nonce+" "+c.dep+"\nt"+strconv.Itoa(i)+" ") {
			t.Errorf("cold job %d read %q", i, got)
		}
	}

	// The warm host: same jobs, no GETs of anything, no builds.
	c.runJobs(t, "warm", 4, script)
	for k, n := range c.cache.Counts() {
		if n != downloads[k] {
			t.Errorf("warm wave: %d more requests for %s", n-downloads[k], k)
		}
	}
	if after := c.builtCounts(t); fmt.Sprint(after) != fmt.Sprint(counts) {
		t.Errorf("warm wave built: before %v, after %v", counts, after)
	}
}

// cacheDirOf is where startCIHost wrote the cache.
func (c *ciEnv) cacheDirOf() string { return filepath.Join(c.dir, "cache") }

// waitCtl waits until a job has written name into its ctl directory.
func waitCtl(t *testing.T, dir, name string) {
	t.Helper()
	waitFor(t, "a job to write "+name, func() bool {
		_, err := os.Stat(filepath.Join(dir, name))
		return err == nil
	})
}

// TestCIJobSessionAndRefusals: a job (A) realises paths, then waits with
// no connection open. Meanwhile: another job (B), as container root on the
// job socket, cannot add a substituter, import an unsigned input-addressed
// path, delete a path A holds, or write the store through its read-only
// mount; a collection deletes dead paths but none of A's. Once A has
// ended, its paths are collectable.
func TestCIJobSessionAndRefusals(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	// A second cache that the daemon does not use (signed with the
	// trusted key of startCIHost), and an unsigned one.
	other := c.otherStore("src2")
	extra, _ := c.buildFixture(t, other, "ci-extra")
	extraDir := filepath.Join(c.dir, "extra-cache")
	c.fillCache(t, other, extraDir, "xz", filepath.Join(c.dir, "ci-cache-1.sec"), extra)
	extraSrv := cachetest.New(extraDir)
	defer extraSrv.Close()
	unsignedDir := filepath.Join(c.job, "unsigned-cache")
	unsigned, _ := c.buildFixture(t, other, "ci-unsigned")
	c.fillCache(t, other, unsignedDir, "none", "", unsigned)
	writeFile(t, filepath.Join(c.job, "extra"), extra+"\n", 0o644)
	writeFile(t, filepath.Join(c.job, "unsigned"), unsigned+"\n", 0o644)
	writeFile(t, filepath.Join(c.job, "extra-url"), extraSrv.URL+"\n", 0o644)

	// A dead path: added by the host, held by nobody.
	dead := strings.TrimSpace(c.nixStore(t, "--add", c.file(t, "dead", "dead "+c.nonce)))
	writeFile(t, filepath.Join(c.job, "dead"), dead+"\n", 0o644)

	ctlA := c.ctlDir(t, "A")
	jobA := c.jobCmd(ctlA, `nix-store -r "$OUT" >/dev/null
nb t3 > /ctl/t3
touch /ctl/ready
while [ ! -e /ctl/go ]; do sleep 0.1; done
cat "/mnt$OUT" > /ctl/after
`)
	doneA := make(chan result, 1)
	go func() { doneA <- jobA.run(t) }()
	waitCtl(t, ctlA, "ready")
	t3 := readCtl(t, ctlA, "t3")
	held := append([]string{c.out, c.dep, t3}, lines(c.nixStore(t, "-qR", t3))...)

	ctlB := c.ctlDir(t, "B")
	r := c.jobCmd(ctlB, `EXTRA=$(cat /job/extra); UNSIGNED=$(cat /job/unsigned)
if nix-store -r "$EXTRA" --option substituters "$(cat /job/extra-url)" 2>/ctl/subst.err; then echo substituted >> /ctl/wrong; fi
if nix copy --no-check-sigs --from file:///job/unsigned-cache --to "$NIX_REMOTE" "$UNSIGNED" 2>/ctl/import.err; then echo imported >> /ctl/wrong; fi
if nix-store --delete "$OUT" 2>/ctl/delete.err; then echo deleted >> /ctl/wrong; fi
if nix-store --delete $(nix-store --gc --print-dead) 2>/ctl/delete-dead.err; then echo deleted-dead >> /ctl/wrong; fi
if nix-store --gc 2>/ctl/jobgc.err; then echo collected-host >> /ctl/wrong; fi
if nix-store -r --repair "$OUT" 2>/ctl/repair.err; then echo repaired >> /ctl/wrong; fi
if touch /mnt/nix/store/intruder 2>/ctl/touch.err; then echo wrote >> /ctl/wrong; fi
if nix-store --store local?root=/mnt --gc 2>/ctl/gc.err; then echo collected >> /ctl/gc-ok; fi
touch /ctl/finished
`).run(t)
	if r.err != nil {
		t.Fatalf("job B:\n%s", r)
	}
	if b, err := os.ReadFile(filepath.Join(ctlB, "wrong")); err == nil {
		t.Errorf("job B was allowed to: %s", b)
	}
	for name, want := range map[string]string{
		"subst.err":       "ignoring untrusted substituter",
		"import.err":      "lacks a valid signature",
		"delete.err":      "deleting store paths is not allowed through a job socket",
		"delete-dead.err": "deleting store paths is not allowed through a job socket",
		"jobgc.err":       "not allowed through a job socket",
		"repair.err":      "repairing is not allowed because you are not in 'trusted-users' (every client of a job socket is untrusted)",
	} {
		if got := readCtl(t, ctlB, name); !strings.Contains(got, want) {
			t.Errorf("job B %s: %q lacks %q", name, got, want)
		}
	}
	for _, p := range append([]string{extra, unsigned}, held...) {
		want := p != extra && p != unsigned
		if got := c.isValid(t, p); got != want {
			t.Errorf("after job B: %s valid = %v, want %v", p, got, want)
		}
		if _, err := os.Stat(c.realPath(p)); (err == nil) != want {
			t.Errorf("after job B: %s on disk = %v, want %v", p, err == nil, want)
		}
	}
	if _, err := os.Stat(filepath.Join(c.root, "nix/store/intruder")); err == nil {
		t.Error("job B wrote into the host store")
	}
	c.assertValid(t, "job B deleted the dead paths it listed", dead)

	// A collection while A waits between connections.
	c.nixStore(t, "--gc")
	if c.isValid(t, dead) {
		t.Errorf("dead path %s survived the collection", dead)
	}
	for _, p := range held {
		if !c.isValid(t, p) {
			t.Errorf("the collection deleted %s, which job A holds", p)
		}
	}
	writeFile(t, filepath.Join(ctlA, "go"), "", 0o644)
	if r := <-doneA; r.err != nil {
		t.Fatalf("job A:\n%s", r)
	}
	if got, want := readCtl(t, ctlA, "after"), c.nonce+" "+c.dep; got != want {
		t.Errorf("job A read %q after the collection, want %q", got, want)
	}

	// Positive controls: root on the host's default socket may do what
	// job B was refused.
	c.nixStore(t, "-r", extra, "--option", "substituters", extraSrv.URL)
	c.client("nix", "copy", "--no-check-sigs", "--from", "file://"+unsignedDir, "--to", c.url(), unsigned).ok(t)

	// Job A has ended: its paths are collectable now.
	c.nixStore(t, "--gc")
	for _, p := range held {
		if c.isValid(t, p) {
			t.Errorf("%s survived a collection after job A ended", p)
		}
	}
}

// TestCIWarmJobHoldsPaths: on a warm host, the paths a job realises were
// valid already, yet they stay alive for the job like fetched ones (Nix's
// goals root every path they are asked for, valid or not), through a
// collection between the job's connections; after the job, they go.
func TestCIWarmJobHoldsPaths(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	c.nixStore(t, "-r", c.out) // the host is warm; the connection is gone
	c.jobHoldsThroughGC(t, "warm", `nix-store -r "$OUT" >/dev/null`, "which the job realised (valid already)")
	c.nixStore(t, "--gc")
	for _, p := range []string{c.out, c.dep} {
		if c.isValid(t, p) {
			t.Errorf("%s survived a collection after the job ended", p)
		}
	}
}

// jobHoldsThroughGC runs a job that realises c.out with the shell line
// realise, then waits while the host collects, and checks that c.out and
// its reference are still valid and readable in the job afterwards; held
// says why they should be, in errors.
func (c *ciEnv) jobHoldsThroughGC(t *testing.T, name, realise, held string) {
	t.Helper()
	ctl := c.ctlDir(t, name)
	job := c.jobCmd(ctl, realise+`
touch /ctl/ready
while [ ! -e /ctl/go ]; do sleep 0.1; done
cat "/mnt$OUT" > /ctl/after
`)
	done := make(chan result, 1)
	go func() { done <- job.run(t) }()
	waitCtl(t, ctl, "ready")
	c.nixStore(t, "--gc")
	for _, p := range []string{c.out, c.dep} {
		if !c.isValid(t, p) {
			t.Errorf("a collection deleted %s, %s", p, held)
		}
	}
	writeFile(t, filepath.Join(ctl, "go"), "", 0o644)
	if r := <-done; r.err != nil {
		t.Fatalf("job:\n%s", r)
	}
	if got, want := readCtl(t, ctl, "after"), c.nonce+" "+c.dep; got != want {
		t.Errorf("the job read %q after the collection, want %q", got, want)
	}
}

// TestCINestedNamespaceJob: what a job realises from a pid namespace of
// its own inside its container (a sandbox, a container in the container)
// is held for the whole job, as what it realises directly is: the nested
// namespace is the job's. Sessions went by the client's own namespace,
// which ended, with its session, when the nested process exited.
func TestCINestedNamespaceJob(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	c.jobHoldsThroughGC(t, "nested", `unshare --pid --fork --kill-child nix-store -r "$OUT" >/dev/null`,
		"which the job realised from a nested pid namespace while it still runs")
}

// TestCIJobConnectionLimit: a job may hold job-max-connections
// connections at once; the next is refused with a message that says why,
// and the host's own clients are not counted.
func TestCIJobConnectionLimit(t *testing.T) {
	t.Parallel()
	c := startCIHost(t, "job-max-connections = 1")
	accepted := func() int {
		log, err := os.ReadFile(c.logPath)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(log), "accepted connection")
	}
	before := accepted()
	ctl := c.ctlDir(t, "limit")
	job := c.jobCmd(ctl, `socat -u UNIX-CONNECT:/run/nixyard/socket STDOUT >/dev/null &
touch /ctl/connecting
while [ ! -e /ctl/go ]; do sleep 0.1; done
if nix store ping 2>/ctl/refused.err; then echo second-connection >> /ctl/wrong; fi
kill $!; wait $! || true
i=0; until nix store ping 2>/ctl/ping.err; do i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done
`)
	done := make(chan result, 1)
	go func() { done <- job.run(t) }()
	waitCtl(t, ctl, "connecting")
	// The job's idle connection is accepted (and counted) before it asks
	// for a second one.
	waitFor(t, "the job's first connection", func() bool { return accepted() > before })
	c.nix(t, "store", "ping") // the host: not a job
	writeFile(t, filepath.Join(ctl, "go"), "", 0o644)
	if r := <-done; r.err != nil {
		t.Fatalf("job:\n%s\nping.err: %s", r, readCtl(t, ctl, "ping.err"))
	}
	if b, err := os.ReadFile(filepath.Join(ctl, "wrong")); err == nil {
		t.Errorf("a job at its connection limit was allowed a %s", b)
	}
	if got, want := readCtl(t, ctl, "refused.err"), "too many connections: job pidns-"; !strings.Contains(got, want) {
		t.Errorf("the refused connection said %q, want it to contain %q", got, want)
	}
}

// TestCIJobOutlivesRestart: a job's paths stay held across a restart of
// the daemon (an upgrade) and across a crash: the daemon that starts takes
// up the jobs still running, so a collection then does not delete what a
// job realised before and reads afterwards through /mnt.
func TestCIJobOutlivesRestart(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	ctl := c.ctlDir(t, "restart")
	job := c.jobCmd(ctl, `nix-store -r "$OUT" > /dev/null
touch /ctl/ready
while [ ! -e /ctl/go ]; do sleep 0.1; done
cat "/mnt$OUT" > /ctl/after-restart
touch /ctl/ready2
while [ ! -e /ctl/go2 ]; do sleep 0.1; done
cat "/mnt$OUT" > /ctl/after-crash
`)
	done := make(chan result, 1)
	go func() { done <- job.run(t) }()
	waitCtl(t, ctl, "ready")
	c.stop(t)
	c.start(t)
	c.nixStore(t, "--gc")
	writeFile(t, filepath.Join(ctl, "go"), "", 0o644)
	waitCtl(t, ctl, "ready2")
	c.crash(t)
	c.start(t)
	c.nixStore(t, "--gc")
	writeFile(t, filepath.Join(ctl, "go2"), "", 0o644)
	if r := <-done; r.err != nil {
		t.Fatalf("job:\n%s", r)
	}
	want := c.nonce + " " + c.dep
	for _, f := range []string{"after-restart", "after-crash"} {
		if got := readCtl(t, ctl, f); got != want {
			t.Errorf("the job read %q %s, want %q", got, f, want)
		}
	}
}

// TestCIJobHandover: an upgrade under load. The old daemon, told to stop,
// drains (a host build is still under way) while the new one already
// serves the sockets. A collection through the new daemon waits until
// the old one has gone and the new one has taken up its job sessions
// (while the old one runs, its temporary roots hold the jobs' paths; once
// it has gone, only the journals it leaves do), and what a job realised
// through the old daemon stays.
func TestCIJobHandover(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	c.stop(t)
	c.cfg.args = append(c.cfg.args, "--shutdown-grace", "2m")
	c.start(t)
	ctl := c.ctlDir(t, "handover")
	job := c.jobCmd(ctl, `nix-store -r "$OUT" > /dev/null
touch /ctl/ready
while [ ! -e /ctl/go ]; do sleep 0.1; done
cat "/mnt$OUT" > /ctl/after
`)
	jobDone := make(chan result, 1)
	go func() { jobDone <- job.run(t) }()
	waitCtl(t, ctl, "ready")

	// A host build keeps the old daemon draining until the test lets it end.
	old := c.daemon
	next, buildDone := c.upgradeDuringBuild(t, "handover", "go-build")

	gcLog := filepath.Join(c.dir, "gc.stderr")
	gcErr, err := os.Create(gcLog)
	if err != nil {
		t.Fatal(err)
	}
	defer gcErr.Close()
	gc := next.client("nix-store", "--gc").exec()
	gc.Stderr = gcErr
	if err := gc.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the collection to wait for the old daemon", func() bool {
		b, _ := os.ReadFile(gcLog)
		return strings.Contains(string(b), "waiting for the previous daemon to hand over its job sessions...")
	})
	writeFile(t, filepath.Join(c.marks, "go-build"), "", 0o644)
	if r := <-buildDone; r.err != nil {
		t.Errorf("the host build under way during the upgrade:\n%s", r)
	}
	select {
	case <-old.exited:
	case <-time.After(time.Minute):
		t.Fatal("the old daemon did not exit once its last connection ended")
	}
	if err := gc.Wait(); err != nil {
		b, _ := os.ReadFile(gcLog)
		t.Fatalf("the collection through the new daemon: %v\n%s", err, b)
	}
	writeFile(t, filepath.Join(ctl, "go"), "", 0o644)
	if r := <-jobDone; r.err != nil {
		t.Fatalf("job:\n%s", r)
	}
	if got, want := readCtl(t, ctl, "after"), c.nonce+" "+c.dep; got != want {
		t.Errorf("after the upgrade and a collection, the job read %q, want %q", got, want)
	}
}

// TestCIDoctorStatic: the statically linked nixyard (scripts/build-static.sh)
// runs the doctor in a job whose image has nothing but it: no libc, no
// /usr, as in an image unlike the host's.
func TestCIDoctorStatic(t *testing.T) {
	t.Parallel()
	c := startCIHost(t)
	static := filepath.Join(c.dir, "nixyard-static")
	build := exec.Command("../scripts/build-static.sh", static)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("scripts/build-static.sh: %v\n%s", err, out)
	}
	args := []string{"--unshare-all", "--die-with-parent", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
		"--ro-bind", static, "/nixyard"}
	for _, m := range c.host.Mounts() {
		args = append(args, "--ro-bind", m.Host, m.Container)
	}
	args = append(args, "--clearenv")
	for _, kv := range c.host.Env() {
		k, v, _ := strings.Cut(kv, "=")
		args = append(args, "--setenv", k, v)
	}
	out := c.cmd("bwrap", append(args, "/nixyard", "doctor")...).ok(t)
	for _, want := range []string{"ok   socket", "ok   trust      untrusted", "ok   session    job=pidns-", "ok   read-only"} {
		if !strings.Contains(out, want) {
			t.Errorf("the static doctor in a bare job lacks %q:\n%s", want, out)
		}
	}
}

// TestJobSocketHostClientRoots: a client on the host (a shell runner's
// job: in the daemon's pid namespace, with its root directory) that
// reaches the daemon through a job socket keeps its out-links as roots, as
// through the default socket: its links are the host's files. A
// container's are not (TestCIJob). They were ignored for every job-socket
// client (CI audit).
func TestJobSocketHostClientRoots(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("--listen is nixyard's")
	}
	e := newEnv(t)
	sock := filepath.Join(e.dir, "job.sock")
	d := e.startDaemon(t, withDaemonArgs("--listen", sock+",tenant=shell"))
	p := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "shell-root", "kept by its out-link "+d.nonce)))
	link := filepath.Join(e.dir, "result")
	e.cmd("nix-store", "--store", "unix://"+sock+"?root="+d.root, "-r", p, "--add-root", link).ok(t)
	d.nixStore(t, "--gc")
	if !d.isValid(t, p) {
		t.Errorf("%s, with an out-link made through the job socket by a client on the host, was collected", p)
	}
}

// TestListenMaxConnections: a --listen socket with max-connections=N
// refuses a connection beyond N open ones, and the real client says why
// (a flood on one job socket cannot take the daemon's descriptors from the
// others: see TestListenMaxConns); once one ends, the client is served
// again.
func TestListenMaxConnections(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("--listen is nixyard's")
	}
	e := newEnv(t)
	sock := filepath.Join(e.dir, "job.sock")
	d := e.startDaemon(t, withDaemonArgs("--listen", sock+",trusted=false,tenant=capped,max-connections=2"))
	store := "unix://" + sock + "?root=" + d.root
	ping := func() result { return e.cmd("nix", "store", "ping", "--store", store).run(t) }
	if r := ping(); r.err != nil {
		t.Fatalf("ping through the capped socket:\n%s", r)
	}
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	waitFor(t, "the held connections to be accepted", func() bool {
		log, _ := os.ReadFile(d.logPath)
		n := 0
		for _, l := range strings.Split(string(log), "\n") {
			if strings.Contains(l, "accepted connection") && strings.Contains(l, "tenant=capped") {
				n++
			}
		}
		return n >= 3 // the ping's, and the two held
	})
	if r := ping(); r.err == nil {
		t.Errorf("a third connection to a socket with max-connections=2 was served:\n%s", r)
	} else if !strings.Contains(r.stderr, "too many connections: the daemon's socket has 2 open") {
		t.Errorf("the refused client was not told why:\n%s", r)
	}
	held[0].Close()
	waitFor(t, "the client to be served again", func() bool { return ping().err == nil })
	held[1].Close()
}

// fairExpr: three builds that wait for /marks/go-NAME, and one that does
// not; each records its start in /marks/order.
const fairExpr = `{ bbdir, nonce }:
let
  bb = builtins.path { path = bbdir; name = "busybox-static"; };
  mk = name: wait: builtins.derivation {
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "${bb}/busybox";
    args = [ "sh" "-c" ("echo ${name} >> /marks/order; "
      + (if wait then "i=0; while [ ! -e /marks/go-${name} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; " else "")
      + "echo ${name} > $out") ];
  };
in { hog1 = mk "fair-hog1" true; hog2 = mk "fair-hog2" true; hog3 = mk "fair-hog3" true; quick = mk "fair-quick" false; }
`

// TestCIJobsShareBuildSlots: with one build slot, a job that runs three
// nix-builds at once gets the slot in turn with another job, not once per
// request: once the first job has had the slot twice, the other job's
// build comes, though the first job's third request came before it (with
// the slot shared out per request, it came last).
func TestCIJobsShareBuildSlots(t *testing.T) {
	t.Parallel()
	c := startCIHost(t, "max-jobs = 1")
	writeFile(t, filepath.Join(c.job, "fair.nix"), fairExpr, 0o644)
	const nbf = `nbf() { nix-build /job/fair.nix --arg bbdir /job/bb --argstr nonce "$(cat /job/nonce)" --no-out-link -A "$@" >/dev/null; }
`
	order := func() []string {
		if _, err := os.Stat(filepath.Join(c.marks, "order")); err != nil {
			return nil
		}
		return c.markerLines(t, "order")
	}
	release := func(name string) { writeFile(t, filepath.Join(c.marks, "go-"+name), "", 0o644) }
	defer func() {
		for _, h := range []string{"fair-hog1", "fair-hog2", "fair-hog3"} {
			release(h)
		}
	}()
	done := make(chan result, 2)
	go func() {
		done <- c.jobCmd(c.ctlDir(t, "fair-a"), nbf+"nbf hog1 & nbf hog2 & nbf hog3 & wait %1 && wait %2 && wait %3\n").run(t)
	}()
	metricsURL := c.servedURL(t, "--metrics-listen")
	waitFor(t, "job a's first build to start", func() bool { return len(order()) == 1 })
	waitFor(t, "job a's other builds to wait for the slot", func() bool { return buildsWaiting(t, metricsURL) == "2" })
	go func() { done <- c.jobCmd(c.ctlDir(t, "fair-b"), nbf+"nbf quick\n").run(t) }()
	waitFor(t, "job b's build to wait too", func() bool { return buildsWaiting(t, metricsURL) == "3" })
	release(order()[0])
	waitFor(t, "the second build to start", func() bool { return len(order()) >= 2 })
	release(order()[1])
	waitFor(t, "the third build to start", func() bool { return len(order()) >= 3 })
	for _, h := range []string{"fair-hog1", "fair-hog2", "fair-hog3"} {
		release(h)
	}
	for range 2 {
		if r := <-done; r.err != nil {
			t.Errorf("job failed:\n%s", r)
		}
	}
	if got := order(); len(got) != 4 || got[2] != "fair-quick" {
		t.Errorf("builds started in the order %v: want job b's fair-quick third, after two of job a's", got)
	}
}

// TestCIEndedJobCollectedAutomatically: an automatic collection (here the
// size budget's) ends the job sessions of jobs that are over before it
// reads the roots, and deletes what only they held at once, not once the
// once-a-minute reaping has come round (the collection saw the ended job
// as live, freed nothing, and then held off the next: the CI-scale audit).
func TestCIEndedJobCollectedAutomatically(t *testing.T) {
	t.Parallel()
	c := startCIHostWith(t, []string{"--size-budget", "512K"}, "min-free-check-interval = 0")
	writeFile(t, filepath.Join(c.job, "big"), strings.Repeat("big output of a job "+c.nonce+"\n", 64<<10), 0o644)
	ctl := c.ctlDir(t, "ended")
	if r := c.jobCmd(ctl, "nix-store --add /job/big > /ctl/added\n").run(t); r.err != nil {
		t.Fatalf("job:\n%s", r)
	}
	added := readCtl(t, ctl, "added")
	if !c.isValid(t, added) {
		t.Fatalf("%s, which the job added, is not valid", added)
	}
	// The job has ended; the next addition on the host checks the budget
	// and waits for the collection it starts.
	c.nixStore(t, "--add", c.file(t, "host-small", "small "+c.nonce))
	if c.isValid(t, added) {
		t.Errorf("%s, held only by a job that has ended, survived the automatic collection", added)
	}
}
