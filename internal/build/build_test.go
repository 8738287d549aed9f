package build

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

func TestBuildUnsandboxed(t *testing.T) {
	e := newPlainEnv(t)
	drvs := e.instantiate(`{
  a = mk { name = "a"; msg = "hello"; script = "echo building a; echo $msg > $out"; };
  env = mk { name = "env"; passAsFile = [ "big" ]; big = "in a file"; script = ''
    echo "$0 $PWD $NIX_BUILD_TOP $TMPDIR $HOME $PATH $TERM $NIX_LOG_FD $NIX_BUILD_CORES" > $out
    echo "$NIX_STORE" >> $out
    cat $bigPath >> $out; echo >> $out
    id -u >> $out
  ''; };
}`, "a", "env")
	b := e.builder(Config{Sandbox: SandboxOff, Cores: 3, BuildUsersGroup: "nixbld"})
	rec := &recorder{}
	res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["a"], "out"), out(drvs["env"])}, ClientOptions{}, rec)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Status != Built || r.TimesBuilt != 1 {
			t.Fatalf("%s: status %d %q", r.Path.Path, r.Status, r.ErrorMsg)
		}
	}
	outA := res[0].BuiltOutputs["out"]
	if got := e.readOut(outA, ""); got != "hello\n" {
		t.Errorf("output of a = %q", got)
	}
	info, err := e.st.QueryPathInfo(t.Context(), outA)
	if err != nil {
		t.Fatal(err)
	}
	if info.Deriver != drvs["a"] || !info.Ultimate || len(info.References) != 0 {
		t.Errorf("info of a: %+v", info)
	}
	if !slices.Contains(rec.lines, "building a") || len(rec.started) != 2 || rec.finished[e.st.Dir().Abs(drvs["a"])] != nil {
		t.Errorf("progress: %+v", rec)
	}
	lines := strings.Split(e.readOut(res[1].BuiltOutputs["out"], ""), "\n")
	fields := strings.Fields(lines[0])
	top := fields[1]
	// argv[0] is "busybox" (else busybox would look for an applet named
	// after the store path); in the script, $0 is the shell's name.
	want := []string{"sh", top, top, top, "/homeless-shelter", "/path-not-set", "xterm-256color", "2", "3"}
	if !slices.Equal(fields, want) || filepath.Base(top) != "nix-build-env.drv-0" {
		t.Errorf("environment: %q, want %q", fields, want)
	}
	if lines[1] != string(e.st.Dir()) || lines[2] != "in a file" || lines[3] == "0" {
		t.Errorf("environment: %q", lines)
	}
	// The build directory is gone, the log is kept.
	if _, err := os.Stat(top); !os.IsNotExist(err) {
		t.Errorf("build directory %s left behind: %v", top, err)
	}
	base := drvs["a"].String()
	// A small log is stored uncompressed (a large one as .bz2).
	if _, err := os.Stat(filepath.Join(e.root, "log/drvs", base[:2], base[2:])); err != nil {
		t.Errorf("build log: %v", err)
	}
	// Built again: already valid, nothing runs.
	res = e.build(b, ClientOptions{}, out(drvs["a"], "out"))
	if res[0].Status != AlreadyValid || res[0].BuiltOutputs["out"] != outA {
		t.Errorf("second build: %+v", res[0])
	}
}

// TestEquivalence builds the same derivations as real nix-build on
// another chroot store and compares output paths, NAR hashes, sizes and
// references.
func TestEquivalence(t *testing.T) {
	expr := `rec {
  dep = mk { name = "dep"; script = "mkdir -p $out/bin; echo dep > $out/bin/x; chmod +x $out/bin/x; ln -s x $out/bin/y"; };
  top = mk { name = "top"; outputs = [ "out" "dev" ]; inherit dep; script = ''
    mkdir $out $dev; echo "$dep/bin/x" > $out/ref; echo $out > $out/self; echo $out > $dev/other
    cat $dep/bin/x >> $out/ref
  ''; };
  fixed = mk { name = "fixed"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "sha256-DDBxQY5jVuYUiYyE7QZMqV6IVRvAgRtTS98ZUuza5TQ="; script = "echo fixed > $out"; };
}`
	e := newChrootEnv(t)
	drvs := e.instantiate(expr, "top", "fixed")
	b := e.builder(Config{Sandbox: SandboxOn, BuildUsersGroup: "nixbld"})
	res := e.mustBuild(b, out(drvs["top"]), out(drvs["fixed"]))

	ref := newChrootEnv(t)
	refDrvs := ref.instantiate(expr, "top", "fixed")
	for k := range drvs {
		if drvs[k] != refDrvs[k] {
			t.Fatalf("%s: derivation paths differ: %s vs %s", k, drvs[k], refDrvs[k])
		}
	}
	for k, drv := range refDrvs {
		outs := strings.Fields(ref.nix("nix-store", "--store", ref.url, "--realise", ref.st.Dir().Abs(drv),
			"--option", "build-users-group", "nixbld", "--option", "substituters", ""))
		var infos []struct {
			Path       string   `json:"path"`
			NarHash    string   `json:"narHash"`
			NarSize    uint64   `json:"narSize"`
			References []string `json:"references"`
			CA         string   `json:"ca"`
		}
		js := ref.nix("nix", append([]string{"--extra-experimental-features", "nix-command", "path-info", "--json", "--store", ref.url}, outs...)...)
		if err := json.Unmarshal([]byte(js), &infos); err != nil {
			t.Fatal(err)
		}
		if len(infos) != len(outs) {
			t.Fatalf("%s: nix path-info: %s", k, js)
		}
		var got []string
		for _, r := range res {
			if r.Path.Path == drvs[k] {
				for _, p := range r.BuiltOutputs {
					got = append(got, e.st.Dir().Abs(p))
				}
			}
		}
		slices.Sort(got)
		slices.Sort(outs)
		if !slices.Equal(got, outs) {
			t.Fatalf("%s: outputs %q, real Nix built %q", k, got, outs)
		}
		for _, want := range infos {
			p, _ := e.st.Dir().Parse(want.Path)
			info, err := e.st.QueryPathInfo(t.Context(), p)
			if err != nil {
				t.Fatal(err)
			}
			var refs []string
			for _, r := range info.References {
				refs = append(refs, e.st.Dir().Abs(r))
			}
			slices.Sort(want.References)
			wantHash, err := hash.Parse(want.NarHash)
			if err != nil {
				t.Fatal(err)
			}
			if !info.NarHash.Equal(wantHash) || info.NarSize != want.NarSize || !slices.Equal(refs, want.References) || info.CA != want.CA {
				t.Errorf("%s: ours %s %d %q %q, real Nix %s %d %q %q", want.Path, info.NarHash, info.NarSize, refs, info.CA,
					want.NarHash, want.NarSize, want.References, want.CA)
			}
		}
	}
}

// TestBuildUnsandboxedSyscallFilter: without the sandbox, a builder run as
// a build user gets the seccomp filter too, with or without no_new_privs.
func TestBuildUnsandboxedSyscallFilter(t *testing.T) {
	e := newPlainEnv(t)
	script := `script = ''
    echo x > f
    if chmod 4755 f 2>/dev/null; then echo setuid-ok; else echo setuid-refused; fi > $out
    grep NoNewPrivs /proc/self/status >> $out
    id -u >> $out
    id -G | tr ' ' '\n' | grep -qx 0 && echo has-group-0 >> $out
    true
  '';`
	drvs := e.instantiate(`{
  nnp = mk { name = "filter-nnp"; `+script+` };
  allow = mk { name = "filter-allow"; `+script+` };
}`, "nnp", "allow")
	for name, allow := range map[string]bool{"nnp": false, "allow": true} {
		b := e.builder(Config{Sandbox: SandboxOff, BuildUsersGroup: "nixbld", AllowNewPrivileges: allow})
		res := e.mustBuild(b, out(drvs[name]))
		got := strings.Fields(e.readOut(res[0].BuiltOutputs["out"], ""))
		want := map[bool]string{false: "1", true: "0"}[allow]
		if len(got) != 4 || got[0] != "setuid-refused" || got[2] != want || got[3] == "0" {
			t.Errorf("allow-new-privileges %v: builder saw %q", allow, got)
		}
	}
}

// TestBuildKillsLeftovers: without the sandbox, a process the builder
// left running outside its process group (setsid) is killed when the
// build ends, as Nix kills every process of the build user.
func TestBuildKillsLeftovers(t *testing.T) {
	e := newPlainEnv(t)
	pidFile := filepath.Join(e.root, "leftover.pid")
	if err := os.WriteFile(pidFile, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	os.Chmod(pidFile, 0o666)
	drvs := e.instantiate(`{
  f = mk { name = "leftover"; script = "setsid sleep 600 > /dev/null 2>&1 & echo $! > `+pidFile+`; echo > $out"; };
}`, "f")
	b := e.builder(Config{Sandbox: SandboxOff, BuildUsersGroup: "nixbld"})
	e.mustBuild(b, out(drvs["f"]))
	data, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid := strings.TrimSpace(string(data))
	if pid == "" {
		t.Fatal("the builder wrote no pid")
	}
	// SIGKILL is delivered asynchronously: give it a moment on a busy
	// machine before calling the process alive.
	alive := func() bool {
		status, err := os.ReadFile("/proc/" + pid + "/status")
		return err == nil && !strings.Contains(string(status), "State:\tZ") && strings.Contains(string(status), "Name:\tsleep")
	}
	for i := 0; i < 50 && alive(); i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if alive() {
		syscall.Kill(atoi(t, pid), syscall.SIGKILL)
		t.Errorf("the builder's leftover process %s is still running", pid)
	}
}

func atoi(t *testing.T, s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSandboxModes: as Nix 2.8, sandbox = relaxed builds fixed-output and
// __noChroot derivations without the sandbox and others in it, and
// sandbox = true refuses __noChroot derivations.
func TestSandboxModes(t *testing.T) {
	e := newPlainEnv(t)
	fixed := hash.Sum(hash.SHA256, []byte("unsandboxed\n"))
	drvs := e.instantiate(`{
  plain = mk { name = "plain"; script = "echo $NIX_BUILD_TOP > $out"; };
  noChroot = mk { name = "no-chroot"; __noChroot = true; script = "echo $NIX_BUILD_TOP > $out"; };
  fixed = mk {
    name = "fixed";
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "`+fixed.Base16()+`";
    script = ''[ "$NIX_BUILD_TOP" != /build ] && echo unsandboxed > $out'';
  };
}`, "plain", "noChroot", "fixed")
	relaxed := e.builder(Config{Sandbox: SandboxRelaxed})
	res := e.mustBuild(relaxed, out(drvs["plain"]), out(drvs["noChroot"]), out(drvs["fixed"]))
	if got := e.readOut(res[0].BuiltOutputs["out"], ""); got != "/build\n" {
		t.Errorf("relaxed: a plain derivation built in %q, want the sandbox", got)
	}
	if got := e.readOut(res[1].BuiltOutputs["out"], ""); got == "/build\n" {
		t.Errorf("relaxed: a __noChroot derivation built in the sandbox")
	}
	drvs = e.instantiate(`{ noChroot = mk { name = "no-chroot-2"; __noChroot = true; script = "echo > $out"; }; }`, "noChroot")
	r := e.build(e.builder(Config{Sandbox: SandboxOn}), ClientOptions{}, out(drvs["noChroot"]))[0]
	if want := "has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"; r.Status.Success() || !strings.Contains(hint.Strip(r.ErrorMsg), want) {
		t.Errorf("sandbox = true, __noChroot: status %d %q", r.Status, r.ErrorMsg)
	}
}

// TestKeepGoing: without KeepGoing the first failure stops the caller's
// other builds (reported as Stopped); with it they run to the end.
func TestKeepGoing(t *testing.T) {
	e := newChrootEnv(t)
	gate := filepath.Join(e.root, "gate")
	drvs := e.instantiate(`rec {
  fail = mk { name = "fail"; script = "exit 1"; };
  slow = mk { name = "slow"; script = "i=0; while [ ! -e /gate/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; echo > $out"; };
  top = mk { name = "top"; inherit fail slow; script = "echo > $out"; };
  slow2 = mk { name = "slow2"; script = "sleep 0.5; echo > $out"; };
}`, "fail", "slow", "top", "slow2")
	if err := os.Mkdir(gate, 0o755); err != nil {
		t.Fatal(err)
	}
	b := e.builder(Config{MaxJobs: 2, SandboxPaths: []string{"/gate=" + gate}})
	res := e.build(b, ClientOptions{}, out(drvs["fail"]), out(drvs["slow"]))
	if res[0].Status.Success() || res[0].Stopped || !res[1].Stopped || res[1].Status.Success() {
		t.Errorf("without keep-going: %+v", res)
	}
	rec := &recorder{}
	res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])}, ClientOptions{}, rec)
	if err != nil || res[0].Status != DependencyFailed || !strings.Contains(hint.Strip(res[0].ErrorMsg), "1 dependencies of derivation") {
		t.Errorf("without keep-going, top: %+v %v", res, err)
	}
	// Each failure is told once, the input's first; at the end nothing is
	// expected or running, and only the build that failed by itself
	// counts as failed (as Nix's Worker counts).
	if len(rec.goalFailures) != 2 || !strings.HasPrefix(hint.Strip(rec.goalFailures[0]), e.st.Dir().Abs(drvs["fail"])+": builder for") ||
		!strings.HasPrefix(hint.Strip(rec.goalFailures[1]), e.st.Dir().Abs(drvs["top"])+": 1 dependencies") {
		t.Errorf("failures told: %q", rec.goalFailures)
	}
	if rec.counts != [4]int{0, 0, 0, 1} || rec.negative {
		t.Errorf("last counters %v (negative: %v), want [0 0 0 1]", rec.counts, rec.negative)
	}
	// The slow build was stopped, not left running: open the gate, let
	// every goal end, and its output is still not valid.
	if err := os.WriteFile(filepath.Join(gate, "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for {
		b.mu.Lock()
		n := len(b.goals)
		b.mu.Unlock()
		if n == 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	outs, err := e.st.QueryDerivationOutputMap(t.Context(), drvs["slow"])
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := e.st.IsValidPath(t.Context(), outs["out"]); err != nil || ok {
		t.Errorf("the stopped slow build went on and registered its output (%v)", err)
	}
	res = e.build(b, ClientOptions{KeepGoing: true}, out(drvs["fail"]), out(drvs["slow"]))
	if res[0].Status.Success() || !res[1].Status.Success() {
		t.Errorf("with keep-going: %+v", res)
	}
	// A path no cache has does not stop the others, as in Nix.
	absent, _ := e.st.Dir().Parse(string(e.st.Dir()) + "/00000000000000000000000000000000-absent")
	res = e.build(b, ClientOptions{}, store.DerivedPath{Path: absent}, out(drvs["slow2"]))
	if res[0].Status != NoSubstituters || !res[1].Status.Success() {
		t.Errorf("a missing path and a build: %+v", res)
	}
}

// TestNoLocalBuilds: with max-jobs 0, the caller's or the daemon's, a
// request that needs a build fails with ErrNoLocalBuilds and builds
// nothing; a caller with max-jobs 0 that joins a build another caller
// runs gets its outputs.
func TestNoLocalBuilds(t *testing.T) {
	e := newChrootEnv(t)
	gate := filepath.Join(e.root, "gate")
	drvs := e.instantiate(`rec {
  dep = mk { name = "dep"; script = "echo > $out"; };
  top = mk { name = "top"; inherit dep; script = "i=0; while [ ! -e /gate/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; echo > $out"; };
}`, "dep", "top")
	if err := os.Mkdir(gate, 0o755); err != nil {
		t.Fatal(err)
	}
	depOut := func() bool {
		outs, err := e.st.QueryDerivationOutputMap(t.Context(), drvs["dep"])
		if err != nil {
			t.Fatal(err)
		}
		ok, _ := e.st.IsValidPath(t.Context(), outs["out"])
		return ok
	}
	for _, c := range []struct {
		name string
		cfg  Config
		opts ClientOptions
	}{
		{"caller", Config{}, ClientOptions{NoLocalBuilds: true}},
		{"daemon", Config{NoLocalBuilds: true}, ClientOptions{}},
	} {
		b := e.builder(c.cfg)
		if _, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])}, c.opts, nil); !errors.Is(err, ErrNoLocalBuilds) {
			t.Errorf("%s: err = %v, want ErrNoLocalBuilds", c.name, err)
		}
		if depOut() {
			t.Fatalf("%s: the input was built", c.name)
		}
	}

	b := e.builder(Config{MaxJobs: 2, SandboxPaths: []string{"/gate=" + gate}})
	rec := &recorder{}
	runs := make(chan []Result, 1)
	go func() {
		res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])}, ClientOptions{}, rec)
		if err != nil {
			t.Error(err)
		}
		runs <- res
	}()
	deadline := time.Now().Add(time.Minute)
	for !slices.Contains(rec.startedList(), e.st.Dir().Abs(drvs["top"])) {
		if time.Now().After(deadline) {
			t.Fatal("the build did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	joined := make(chan error, 1)
	go func() {
		res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])}, ClientOptions{NoLocalBuilds: true}, nil)
		if err == nil && !res[0].Status.Success() {
			err = res[0].Err()
		}
		joined <- err
	}()
	for joinedCallers(b, drvs["top"]) < 2 { // the second caller joins the running build
		if time.Now().After(deadline) {
			t.Fatal("the second caller did not join the build")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.WriteFile(filepath.Join(gate, "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if res := <-runs; res == nil || !res[0].Status.Success() {
		t.Errorf("the caller that may build: %+v", res)
	}
	if err := <-joined; err != nil {
		t.Errorf("the caller with max-jobs 0 that joined the build: %v", err)
	}
}

// joinedCallers returns how many callers wait for the build of drv.
func joinedCallers(b *Builder, drv storepath.Path) int {
	b.mu.Lock()
	g := b.goals[goalKey{drv: drv}]
	b.mu.Unlock()
	if g == nil {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.subs)
}

// TestRepeatUnsandboxed: repeated builds (Nix's repeat) without the
// sandbox, where each round writes the outputs in place: rounds that agree
// register the last round's outputs once; rounds that differ fail
// (nothing registered, with keep-failed the first round kept at
// <path>.check) or, with enforce-determinism off, register the round that
// differed. A caller's repeat of 0 replaces the daemon's.
func TestRepeatUnsandboxed(t *testing.T) {
	e := newPlainEnv(t)
	drvs := e.instantiate(`{
  same = mk { name = "same"; script = "echo same > $out"; };
  differs = mk { name = "differs"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
  kept = mk { name = "kept"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
  lenient = mk { name = "lenient"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
  once = mk { name = "once"; script = "cat /proc/sys/kernel/random/uuid > $out"; };
  agree = mk { name = "agree"; script = "echo agree > $out"; };
}`, "same", "differs", "kept", "lenient", "once", "agree")
	b := e.builder(Config{Sandbox: SandboxOff, BuildUsersGroup: "nixbld", Repeat: 2})
	valid := func(p storepath.Path) bool {
		ok, err := e.st.IsValidPath(t.Context(), p)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	outPath := func(drv storepath.Path) storepath.Path {
		t.Helper()
		d, err := b.loadDerivation(t.Context(), e.st.Dir().Abs(drv))
		if err != nil {
			t.Fatal(err)
		}
		p, err := e.st.Dir().Parse(d.Outputs["out"].Path)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}

	rec := &recorder{}
	res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["same"])}, ClientOptions{}, rec)
	if err != nil {
		t.Fatal(err)
	}
	if r := res[0]; r.Status != Built || r.TimesBuilt != 3 || r.NonDeterministic || !valid(r.BuiltOutputs["out"]) || len(rec.started) != 3 {
		t.Errorf("rounds that agree: %+v, started %d times", r, len(rec.started))
	}

	res = e.build(b, ClientOptions{}, out(drvs["differs"]))
	if r := res[0]; r.Status != NotDeterministic || !r.NonDeterministic || !strings.Contains(hint.Strip(r.ErrorMsg), "differs from previous round") || valid(outPath(drvs["differs"])) {
		t.Errorf("rounds that differ: %+v", r)
	}

	res = e.build(b, ClientOptions{KeepFailed: true}, out(drvs["kept"]))
	kept := e.st.RealPath(outPath(drvs["kept"])) + checkSuffix
	if r := res[0]; r.Status != NotDeterministic || !strings.Contains(hint.Strip(r.ErrorMsg), "differs from '"+kept+"' from previous round") {
		t.Errorf("rounds that differ, keep-failed: %+v", r)
	}
	first, err := os.ReadFile(kept)
	last, lerr := os.ReadFile(e.st.RealPath(outPath(drvs["kept"]))) // the last round's, left unregistered
	if err != nil || lerr != nil || len(first) == 0 || string(first) == string(last) {
		t.Errorf("keep-failed: the first round's output %q (%v) is not kept beside the last one's %q (%v)", first, err, last, lerr)
	}
	// Rounds that agree leave no .check behind, keep-failed or not.
	res = e.build(b, ClientOptions{KeepFailed: true}, out(drvs["agree"]))
	if _, err := os.Lstat(e.st.RealPath(outPath(drvs["agree"])) + checkSuffix); res[0].Status != Built || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("rounds that agree, keep-failed: %+v; .check: %v", res[0], err)
	}

	lenient := false
	rec = &recorder{}
	res, err = b.Build(t.Context(), []store.DerivedPath{out(drvs["lenient"])}, ClientOptions{EnforceDeterminism: &lenient}, rec)
	if err != nil {
		t.Fatal(err)
	}
	if r := res[0]; r.Status != Built || r.TimesBuilt != 2 || !r.NonDeterministic || !valid(r.BuiltOutputs["out"]) || len(rec.errors) != 1 {
		t.Errorf("rounds that differ, enforce-determinism off: %+v, errors %q", r, rec.errors)
	}

	rec = &recorder{}
	res, err = b.Build(t.Context(), []store.DerivedPath{out(drvs["once"])}, ClientOptions{Repeat: -1}, rec)
	if err != nil {
		t.Fatal(err)
	}
	if r := res[0]; r.Status != Built || r.TimesBuilt != 1 || len(rec.started) != 1 {
		t.Errorf("a caller's repeat of 0: %+v, started %d times", r, len(rec.started))
	}
}

// TestStoppedCallerSharedInput: an input realised for a caller whom
// another build's failure stops comes back stopped while the goal that
// needs it still has a caller who is not stopped: it is realised again
// for that one, and the goal is built with it (not without it).
func TestStoppedCallerSharedInput(t *testing.T) {
	e := newChrootEnv(t)
	gate := filepath.Join(e.root, "gate")
	drvs := e.instantiate(`rec {
  fail = mk { name = "fail"; script = "i=0; while [ ! -e /gate/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 1"; };
  dep = mk { name = "dep"; script = "echo dep > $out"; };
  top = mk { name = "top"; inherit dep; script = "cat $dep > $out"; };
}`, "fail", "dep", "top")
	if err := os.Mkdir(gate, 0o755); err != nil {
		t.Fatal(err)
	}
	b := e.builder(Config{MaxJobs: 1, SandboxPaths: []string{"/gate=" + gate}})
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	goal := func(drv storepath.Path) *goal {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.goals[goalKey{drv, ModeNormal}]
	}
	type outcome struct {
		res []Result
		err error
	}
	start := func(opts ClientOptions, reqs ...store.DerivedPath) chan outcome {
		ch := make(chan outcome, 1)
		go func() {
			res, err := b.Build(t.Context(), reqs, opts, nil)
			ch <- outcome{res, err}
		}()
		return ch
	}
	// A keep-going caller runs the failing build, which holds the slot.
	first := start(ClientOptions{KeepGoing: true}, out(drvs["fail"]))
	waitFor("the failing build to run", func() bool { return isRunning(goal(drvs["fail"])) })
	// Another asks for it and for top, whose input dep waits for the slot;
	// a third joins top.
	stopped := start(ClientOptions{}, out(drvs["fail"]), out(drvs["top"]))
	waitFor("dep to wait for the slot", func() bool { return goal(drvs["dep"]) != nil })
	joined := start(ClientOptions{}, out(drvs["top"]))
	waitFor("the third caller to join top", func() bool {
		g := goal(drvs["top"])
		if g == nil {
			return false
		}
		g.mu.Lock()
		defer g.mu.Unlock()
		return len(g.subs) == 2
	})
	if err := os.WriteFile(filepath.Join(gate, "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if o := <-first; o.err != nil || o.res[0].Status.Success() {
		t.Errorf("the keep-going caller: %+v %v", o.res, o.err)
	}
	if o := <-stopped; o.err != nil || o.res[0].Status.Success() || !o.res[1].Stopped {
		t.Errorf("the caller the failure stops: %+v %v", o.res, o.err)
	}
	o := <-joined
	if o.err != nil || o.res[0].Status != Built {
		t.Fatalf("the caller that joined top: %+v %v", o.res, o.err)
	}
	if got := e.readOut(o.res[0].BuiltOutputs["out"], ""); got != "dep\n" {
		t.Errorf("top holds %q, want its input's \"dep\"", got)
	}
}

// TestRepeatHoldsSlot: a repeated build keeps its build slot from one
// round to the next (it holds the outputs' locks throughout): a check of
// the same derivation that took the slot between rounds would wait for
// the locks while the rounds wait for the slot.
func TestRepeatHoldsSlot(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`{
  slow = mk { name = "slow-rounds"; script = "sleep 0.3; echo same > $out"; };
}`, "slow")
	b := e.builder(Config{MaxJobs: 1, Repeat: 2})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	rounds := make(chan []Result, 1)
	go func() {
		res, _ := b.Build(ctx, []store.DerivedPath{out(drvs["slow"])}, ClientOptions{}, nil)
		rounds <- res
	}()
	waitBuilding(t, b, drvs["slow"])
	check, err := b.Build(ctx, []store.DerivedPath{out(drvs["slow"])}, ClientOptions{Mode: ModeCheck}, nil)
	if err != nil {
		t.Fatalf("the check: %v (a deadlock ends with the test's timeout)", err)
	}
	res := <-rounds
	if len(res) != 1 || res[0].Status != Built || res[0].TimesBuilt != 3 {
		t.Errorf("the repeated build: %+v", res)
	}
	if check[0].Status != Built {
		t.Errorf("the check after it: %+v", check[0])
	}
}
