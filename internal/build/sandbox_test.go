package build

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/timerslack"
)

func TestSandboxIsolation(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
			accepted <- struct{}{}
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	e := newChrootEnv(t)
	drvs := e.instantiate(fmt.Sprintf(`rec {
  other = mk { name = "other"; script = "echo other > $out"; };
  file = mk { name = "file"; script = "echo file > $out"; };
  probe = mk { name = "probe"; fileIn = file; otherPath = builtins.unsafeDiscardStringContext "${other}"; script = ''
    b=${bb}/busybox
    ( $b ls /nix/store | $b sort; echo ---; $b ls / | $b sort | $b tr '\n' ' '; echo
      $b test -e $otherPath && echo other-visible || echo other-hidden
      $b id -u; $b id -g; $b hostname; $b pwd
      $b grep CapEff /proc/self/status
      echo x | $b nc -w 2 127.0.0.1 %d && echo net-ok || echo net-blocked
      $b touch ${bb}/busybox 2>/dev/null && echo input-writable || echo input-readonly
      $b chmod u+w $fileIn 2>/dev/null; echo x 2>/dev/null >> $fileIn && echo file-input-writable || echo file-input-readonly
      $b test -e /.nixyard-inputs && echo staging-visible || echo staging-gone
      $b cat /etc/passwd
    ) > $out
  ''; };
}`, port), "other", "file", "probe")
	b := e.builder(Config{Sandbox: SandboxOn, BuildUsersGroup: "nixbld"})
	e.mustBuild(b, out(drvs["other"]))
	res := e.mustBuild(b, out(drvs["probe"]))
	got := e.readOut(res[0].BuiltOutputs["out"], "")
	lines := strings.Split(got, "\n")
	// The store holds the inputs and the output being built only.
	var storeList []string
	for _, l := range lines {
		if l == "---" {
			break
		}
		storeList = append(storeList, l)
	}
	if len(storeList) != 3 || !slices.ContainsFunc(storeList, func(l string) bool { return strings.HasSuffix(l, "-busybox-static") }) ||
		!slices.ContainsFunc(storeList, func(l string) bool { return strings.HasSuffix(l, "-file") }) {
		t.Errorf("sandbox store: %q", storeList)
	}
	for _, want := range []string{
		"build dev etc nix proc tmp ",
		"other-hidden", "1000\n100\nlocalhost\n/build\n",
		"CapEff:\t0000000000000000", "net-blocked", "input-readonly", "file-input-readonly", "staging-gone",
		"nixbld:x:1000:100:Nix build user:/build:/noshell",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("sandbox: no %q in:\n%s", want, got)
		}
	}
	select {
	case <-accepted:
		t.Error("the sandboxed builder reached a host listener")
	default:
	}
}

// Without build users the builder's host identity owns the store's files:
// only the read-only mounts keep it from changing its inputs.
func TestSandboxInputsReadOnlyWithoutBuildUsers(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`rec {
  file = mk { name = "file"; script = "echo file > $out"; };
  probe = mk { name = "probe"; fileIn = file; script = ''
    b=${bb}/busybox
    ( $b touch ${bb}/busybox 2>/dev/null && echo input-writable || echo input-readonly
      $b chmod u+w $fileIn 2>/dev/null; echo x 2>/dev/null >> $fileIn && echo file-input-writable || echo file-input-readonly
    ) > $out
  ''; };
}`, "file", "probe")
	b := e.builder(Config{Sandbox: SandboxOn})
	e.mustBuild(b, out(drvs["file"]))
	res := e.mustBuild(b, out(drvs["probe"]))
	if got := e.readOut(res[0].BuiltOutputs["out"], ""); got != "input-readonly\nfile-input-readonly\n" {
		t.Errorf("inputs in the sandbox: %q", got)
	}
}

// A builder that cannot be executed is a setup failure reported by the
// helper from inside the sandbox; nothing of the sandbox stays behind,
// and a builder killed by a signal is reported with that signal. A
// failed build is permanent, unless it is of a fixed output.
func TestSandboxSetupFailureAndSignal(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`rec {
  dep = mk { name = "dep"; script = "echo dep > $out"; };
  noexec = builtins.derivation { name = "noexec"; system = builtins.currentSystem; builder = "${bb}/nonexistent"; inherit dep; };
  # The builder is PID 1 of its namespace, which only a fault can kill
  # from inside: a stack overflow.
  killed = mk { name = "killed"; inherit dep; script = "ulimit -s 64; f() { f; }; f"; };
  fodFails = mk { name = "fod-fails"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; script = "exit 1"; };
}`, "dep", "noexec", "killed", "fodFails")
	b := e.builder(Config{Sandbox: SandboxOn})
	e.mustBuild(b, out(drvs["dep"]))
	abs := e.st.Dir().Abs
	r := e.build(b, ClientOptions{}, out(drvs["noexec"]))[0]
	want := fmt.Sprintf("while setting up the build environment of '%s': executing '", abs(drvs["noexec"]))
	if r.Status != MiscFailure || !strings.HasPrefix(r.ErrorMsg, want) || !strings.HasSuffix(r.ErrorMsg, "/nonexistent': No such file or directory") {
		t.Errorf("unexecutable builder: status %d, %q", r.Status, r.ErrorMsg)
	}
	r = e.build(b, ClientOptions{}, out(drvs["killed"]))[0]
	if want := fmt.Sprintf("builder for '%s' failed due to signal 11 (Segmentation fault)", abs(drvs["killed"])); r.Status != PermanentFailure || hint.Strip(r.ErrorMsg) != want {
		t.Errorf("killed builder: status %d, %q, want %q", r.Status, r.ErrorMsg, want)
	}
	// As Nix: a failing fixed-output derivation (which may use the
	// network) may succeed another time.
	if r = e.build(b, ClientOptions{}, out(drvs["fodFails"]))[0]; r.Status != TransientFailure {
		t.Errorf("failing fixed-output derivation: status %d, %q", r.Status, r.ErrorMsg)
	}
	left, err := filepath.Glob(filepath.Join(e.root, "nix/store/*.chroot*"))
	if err != nil || len(left) > 0 {
		t.Errorf("sandbox roots left behind: %q %v", left, err)
	}
}

func TestFixedOutputs(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`{
  rec_ok = mk { name = "rec"; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "sha256-Mhxd/jqpSIrg+t3oddwxrvoJXq/yfWfDzOe8UW8g7Xs="; script = "mkdir $out; echo r > $out/f"; };
  flat_bad = mk { name = "flat"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; script = "echo not-empty > $out"; };
}`, "rec_ok", "flat_bad")
	b := e.builder(Config{Sandbox: SandboxOn})
	res := e.mustBuild(b, out(drvs["rec_ok"]))
	if info, err := e.st.QueryPathInfo(t.Context(), res[0].BuiltOutputs["out"]); err != nil || !strings.HasPrefix(info.CA, "fixed:r:sha256:") {
		t.Errorf("recursive fixed output: %+v %v", info, err)
	}
	res = e.build(b, ClientOptions{}, out(drvs["flat_bad"]))
	r := res[0]
	wantMsg := fmt.Sprintf("hash mismatch in fixed-output derivation '%s':\n  specified: sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n     got:    sha256-",
		e.st.Dir().Abs(drvs["flat_bad"]))
	if r.Status != OutputRejected || !strings.HasPrefix(hint.Strip(r.ErrorMsg), wantMsg) {
		t.Fatalf("wrong hash: status %d, %q", r.Status, r.ErrorMsg)
	}
	// Like Nix, what was built is registered under its real content address.
	valid, err := e.st.QueryAllValidPaths(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range valid {
		if p.Name() == "flat" {
			info, _ := e.st.QueryPathInfo(t.Context(), p)
			found = strings.HasPrefix(info.CA, "fixed:sha256:")
		}
	}
	if !found {
		t.Errorf("the mismatching output was not registered under its content address")
	}
}

func TestFailuresAndTimeouts(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`rec {
  fail = mk { name = "fail"; script = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line $i; done; exit 3"; };
  dep = mk { name = "dep"; inherit fail; script = "echo > $out"; };
  silent = mk { name = "silent"; script = "echo start; exec ${bb}/busybox sleep 30"; };
  slow = mk { name = "slow"; script = "while true; do echo tick; ${bb}/busybox sleep 0.2; done"; };
  noout = mk { name = "noout"; script = "echo nothing"; };
}`, "fail", "dep", "silent", "slow", "noout")
	b := e.builder(Config{Sandbox: SandboxOn, MaxJobs: 4})
	abs := e.st.Dir().Abs
	res := e.build(b, ClientOptions{KeepFailed: true}, out(drvs["dep"]))
	if r := res[0]; r.Status != DependencyFailed || r.ErrorMsg != fmt.Sprintf("\x1b[35;1m1\x1b[0m dependencies of derivation '\x1b[35;1m%s\x1b[0m' failed to build", abs(drvs["dep"])) {
		t.Errorf("dependent: %d %q", r.Status, r.ErrorMsg)
	}
	res = e.build(b, ClientOptions{}, out(drvs["fail"]))
	// Nix's words and highlighting: the derivation in bold magenta, the
	// command to run in bold.
	want := fmt.Sprintf("builder for '\x1b[35;1m%s\x1b[0m' failed with exit code 3;\nlast 10 log lines:\n> line 3\n", abs(drvs["fail"]))
	if r := res[0]; r.Status != PermanentFailure || !strings.HasPrefix(r.ErrorMsg, want) || !strings.HasSuffix(r.ErrorMsg, "> line 12\nFor full logs, run '\x1b[1mnix log "+abs(drvs["fail"])+"\x1b[0m'.") {
		t.Errorf("failure: %d %q", r.Status, r.ErrorMsg)
	}
	res = e.build(b, ClientOptions{}, out(drvs["noout"]))
	if r := res[0]; r.Status != OutputRejected || !strings.Contains(hint.Strip(r.ErrorMsg), "failed to produce output path for output 'out'") {
		t.Errorf("no output: %d %q", r.Status, r.ErrorMsg)
	}
	start := time.Now()
	res = e.build(b, ClientOptions{MaxSilentTime: time.Second}, out(drvs["silent"], "out"))
	if r := res[0]; r.Status != TimedOut || r.ErrorMsg != fmt.Sprintf("\x1b[35;1mbuilding of '%s!out' from .drv file\x1b[0m timed out after \x1b[35;1m1\x1b[0m seconds of silence", abs(drvs["silent"])) {
		t.Errorf("silent: %d %q", r.Status, r.ErrorMsg)
	}
	res = e.build(b, ClientOptions{Timeout: time.Second}, out(drvs["slow"], "out"))
	if r := res[0]; r.Status != TimedOut || !strings.HasSuffix(hint.Strip(r.ErrorMsg), "timed out after 1 seconds") {
		t.Errorf("slow: %d %q", r.Status, r.ErrorMsg)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("timeouts took %v", d)
	}
	// keep-failed kept the failed build's directory.
	ents, _ := filepath.Glob(filepath.Join(e.root, "tmp", "nix-build-*"))
	if len(ents) != 1 || filepath.Base(ents[0]) != "nix-build-fail.drv-0" {
		t.Errorf("kept build directories: %q", ents)
	}
}

// TestSingleFlightAndSlots: 4 callers ask for the same derivation at once
// (built once), then 4 callers with 8 builds each share MaxJobs=2 slots;
// the builders themselves record how many run at once.
func TestSingleFlightAndSlots(t *testing.T) {
	e := newChrootEnv(t)
	marks := t.TempDir()
	os.Chmod(marks, 0o777)
	var attrs []string
	expr := "{\n  once = mk { name = \"once\"; script = \"echo x >> /marks/once-$$; ${bb}/busybox sleep 0.5; echo > $out\"; };\n"
	for c := range 4 {
		for i := range 8 {
			a := fmt.Sprintf("c%dn%d", c, i)
			attrs = append(attrs, a)
			expr += fmt.Sprintf(`  %s = mk { name = "%s"; script = ''
    b=${bb}/busybox; n=$($b ls /marks/run-* 2>/dev/null | $b wc -l); echo $n > /marks/seen-%s
    $b touch /marks/run-%s; $b sleep 0.15; $b rm /marks/run-%s; echo > $out
  ''; };
`, a, a, a, a, a)
		}
	}
	drvs := e.instantiate(expr+"}", append(attrs, "once")...)
	b := e.builder(Config{Sandbox: SandboxOn, MaxJobs: 2, SandboxPaths: []string{"/marks=" + marks}})

	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := b.Build(context.Background(), []store.DerivedPath{out(drvs["once"])}, ClientOptions{}, nil)
			if err != nil || !res[0].Status.Success() {
				t.Errorf("once: %v %+v", err, res)
			}
		}()
	}
	wg.Wait()
	if m, _ := filepath.Glob(marks + "/once-*"); len(m) != 1 {
		t.Errorf("the shared derivation was built %d times", len(m))
	}

	recs := make([]*recorder, 4)
	for c := range 4 {
		recs[c] = &recorder{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var reqs []store.DerivedPath
			for i := range 8 {
				reqs = append(reqs, out(drvs[fmt.Sprintf("c%dn%d", c, i)]))
			}
			res, err := b.Build(context.Background(), reqs, ClientOptions{}, recs[c])
			if err != nil {
				t.Error(err)
				return
			}
			for _, r := range res {
				if !r.Status.Success() {
					t.Errorf("%s: %s", r.Path.Path, r.ErrorMsg)
				}
			}
		}()
	}
	wg.Wait()
	for _, a := range attrs {
		data, err := os.ReadFile(filepath.Join(marks, "seen-"+a))
		if err != nil {
			t.Fatal(err)
		}
		// The builder saw the others running before it marked itself.
		if n := strings.TrimSpace(string(data)); n != "0" && n != "1" {
			t.Errorf("%s saw %s other builders running (MaxJobs 2)", a, n)
		}
	}
	// The callers' running counters, as Nix's Worker's, count a build
	// until it is registered, so they may briefly pass MaxJobs; at the
	// end, each caller's 8 builds are done and none runs.
	for c, r := range recs {
		if r.maxRun == 0 || r.maxRun > 8 || len(r.started) != 8 || r.counts != [4]int{8, 8, 0, 0} || r.negative {
			t.Errorf("caller %d: %d running at most, %d started, last counters %v (negative: %v)", c, r.maxRun, len(r.started), r.counts, r.negative)
		}
	}
}

// TestJoinRunningBuild: a caller that asks for a derivation whose build is
// already running joins it, and hears it start as well as finish.
func TestJoinRunningBuild(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`{ slow = mk { name = "slow"; script = "${bb}/busybox sleep 1; echo > $out"; }; }`, "slow")
	b := e.builder(Config{Sandbox: SandboxOn, MaxJobs: 2})
	drv := e.st.Dir().Abs(drvs["slow"])
	first, second := &recorder{}, &recorder{}
	done := make(chan error, 1)
	go func() {
		res, err := b.Build(context.Background(), []store.DerivedPath{out(drvs["slow"])}, ClientOptions{}, first)
		if err == nil && !res[0].Status.Success() {
			err = fmt.Errorf("first: %s", res[0].ErrorMsg)
		}
		done <- err
	}()
	waitStarted := time.Now().Add(30 * time.Second)
	for {
		first.mu.Lock()
		n := len(first.started)
		first.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(waitStarted) {
			t.Fatal("the first caller's build did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	res, err := b.Build(context.Background(), []store.DerivedPath{out(drvs["slow"])}, ClientOptions{}, second)
	if err != nil || !res[0].Status.Success() || res[0].TimesBuilt != 1 {
		t.Fatalf("second caller: %v %+v", err, res)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(second.started, []string{drv}) || second.finished[drv] != nil || len(second.finished) != 1 {
		t.Errorf("second caller: started %q, finished %v; want the joined build's start and end", second.started, second.finished)
	}
}

// TestBuilderTimerSlack: a daemon that widened its timer slack gives its
// builders back the slack it started with, sandboxed (the helper's child)
// or not (the helper itself execs the builder).
func TestBuilderTimerSlack(t *testing.T) {
	// This widens the slack of the whole test process for good: the tests
	// that run after it see 1 ms too, as in the daemon.
	if err := timerslack.Widen(timerslack.Daemon); err != nil {
		t.Skipf("cannot widen this process's timer slack: %v", err)
	}
	want := timerslack.Inherited()
	if want >= timerslack.Daemon {
		t.Skipf("the test runs with a slack of %d ns already", want)
	}
	for _, tc := range []struct {
		name string
		env  func(testing.TB) *testEnv
		mode string
	}{{"sandboxed", newChrootEnv, SandboxOn}, {"unsandboxed", newPlainEnv, SandboxOff}} {
		t.Run(tc.name, func(t *testing.T) {
			e := tc.env(t)
			drvs := e.instantiate(`{ slack = mk { name = "slack"; script = "cat /proc/self/timerslack_ns > $out"; }; }`, "slack")
			res := e.mustBuild(e.builder(Config{Sandbox: tc.mode}), out(drvs["slack"]))
			if got := strings.TrimSpace(e.readOut(res[0].BuiltOutputs["out"], "")); got != strconv.Itoa(want) {
				t.Errorf("the builder's timer slack: %s ns, want %d", got, want)
			}
		})
	}
}

// TestSandboxFallback: this host makes the sandbox's namespaces (the
// probe says so); where a kernel or container refuses them (set here, as
// it cannot be made so on this host), builds fall back to no sandbox if
// sandbox-fallback allows, as with Nix, and a chroot store cannot.
func TestSandboxFallback(t *testing.T) {
	plain := newPlainEnv(t)
	if b := plain.builder(Config{Sandbox: SandboxOn}); b.namespaceSupport() != namespacesAll {
		t.Fatal("the probe says the sandbox's namespaces are refused on this host")
	}
	// Where user namespaces are refused (bubblewrap's --disable-userns),
	// the probe says so. The test binary has the helper's modes too.
	bwrap, err1 := exec.LookPath("bwrap")
	bash, err2 := exec.LookPath("bash")
	if err1 != nil || err2 != nil {
		t.Log("no bwrap or bash: the probe is not tried where user namespaces are refused")
	} else {
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		// With root's capabilities there (bubblewrap keeps them for
		// root), the other namespaces can still be made: exit status 4;
		// without them, none: 3.
		for caps, want := range map[string]int{"--cap-add": 4, "--cap-drop": 3} {
			cmd := exec.Command(bwrap, "--bind", "/", "/", "--dev", "/dev", "--unshare-user", "--disable-userns", caps, "ALL",
				bash, "-c", `exec -a "$0" "$1"`, probeArg0, exe)
			var exit *exec.ExitError
			if err := cmd.Run(); !errors.As(err, &exit) || exit.ExitCode() != want {
				t.Errorf("the probe where user namespaces are refused, %s ALL: %v, want exit status %d", caps, err, want)
			}
		}
	}
	refused := func(b *Builder) *Builder {
		b.probeOnce.Do(func() {})
		b.namespaces = namespacesNone
		return b
	}
	drvs := plain.instantiate(`{ a = mk { name = "fallback"; script = "echo $NIX_BUILD_TOP > $out"; }; b = mk { name = "no-fallback"; script = "echo > $out"; }; }`, "a", "b")
	b := refused(plain.builder(Config{Sandbox: SandboxOn, SandboxFallback: true}))
	res := plain.mustBuild(b, out(drvs["a"]))
	if top := strings.TrimSpace(plain.readOut(res[0].BuiltOutputs["out"], "")); top == sandboxBuildDir {
		t.Errorf("the fallback build ran in the sandbox (NIX_BUILD_TOP %s)", top)
	}
	b = refused(plain.builder(Config{Sandbox: SandboxOn}))
	if r := plain.build(b, ClientOptions{}, out(drvs["b"]))[0]; r.Status.Success() || !strings.Contains(r.ErrorMsg, "does not support the kernel namespaces") {
		t.Errorf("without fallback: status %d, %q", r.Status, r.ErrorMsg)
	}
	chroot := newChrootEnv(t)
	cdrvs := chroot.instantiate(`{ a = mk { name = "chroot"; script = "echo > $out"; }; }`, "a")
	b = refused(chroot.builder(Config{Sandbox: SandboxOn, SandboxFallback: true}))
	if r := chroot.build(b, ClientOptions{}, out(cdrvs["a"]))[0]; r.Status.Success() || !strings.Contains(r.ErrorMsg, "does not support the kernel namespaces") {
		t.Errorf("chroot store: status %d, %q", r.Status, r.ErrorMsg)
	}
}

// TestSandboxWithoutUserNamespace: where only user namespaces are refused
// (set here, as this host allows them), a daemon running as root still
// sandboxes, as Nix 2.8 does: the builder runs as its build user itself,
// in its own mount, PID, IPC, UTS and network namespaces.
func TestSandboxWithoutUserNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	e := newPlainEnv(t)
	drvs := e.instantiate(`{ a = mk { name = "no-userns"; script = ''
    echo $NIX_BUILD_TOP > $out; id -u >> $out; id -g >> $out; hostname >> $out
    cat /proc/self/uid_map >> $out; ls /proc | grep -c '^[0-9]' >> $out; grep -c nixbld /etc/passwd >> $out
    grep -E '^(CapPrm|CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\t ' ' ' | tr '\n' ' ' >> $out
  ''; }; b = mk { name = "no-userns-no-users"; script = "echo > $out"; }; }`, "a", "b")
	b := e.builder(Config{Sandbox: SandboxOn, BuildUsersGroup: "nixbld"})
	b.probeOnce.Do(func() {})
	b.namespaces = namespacesNoUser
	res := e.mustBuild(b, out(drvs["a"]))
	lines := strings.Split(strings.TrimSpace(e.readOut(res[0].BuiltOutputs["out"], "")), "\n")
	if len(lines) != 8 {
		t.Fatalf("output: %q", lines)
	}
	uid, _ := strconv.Atoi(lines[1])
	if lines[0] != sandboxBuildDir || uid == 0 || uid == sandboxUID || lines[2] == "0" || lines[3] != "localhost" {
		t.Errorf("builder: top %s, uid %s, gid %s, host name %s; want the sandbox as a build user", lines[0], lines[1], lines[2], lines[3])
	}
	// No user namespace: the initial one's map; a PID namespace of its
	// own: few processes; its build user in /etc/passwd.
	if f := strings.Fields(lines[4]); len(f) != 3 || f[0] != "0" || f[1] != "0" || f[2] != "4294967295" {
		t.Errorf("uid_map %q: the builder is in a user namespace", lines[4])
	}
	if n, _ := strconv.Atoi(lines[5]); n > 5 {
		t.Errorf("%d processes visible: no PID namespace of its own", n)
	}
	if lines[6] != "1" {
		t.Errorf("/etc/passwd has %s nixbld entries", lines[6])
	}
	// No capability left; no_new_privs and the syscall filter on.
	if want := "CapPrm: 0000000000000000 CapEff: 0000000000000000 NoNewPrivs: 1 Seccomp: 2"; strings.TrimSpace(lines[7]) != want {
		t.Errorf("builder's status %q, want %q", lines[7], want)
	}
	// Without build users the builder would be root on the host: refused,
	// as Nix refuses it.
	nb := e.builder(Config{Sandbox: SandboxOn})
	nb.probeOnce.Do(func() {})
	nb.namespaces = namespacesNoUser
	if r := e.build(nb, ClientOptions{}, out(drvs["b"]))[0]; r.Status.Success() || !strings.Contains(r.ErrorMsg, "cannot perform a sandboxed build because user namespaces are not enabled") {
		t.Errorf("no build users: status %d %q", r.Status, r.ErrorMsg)
	}
	info, err := e.st.QueryPathInfo(t.Context(), res[0].BuiltOutputs["out"])
	if err != nil || info.Deriver != drvs["a"] {
		t.Errorf("output not registered: %v", err)
	}
}

// TestSharedBuildLimits: a client's short timeout or max-silent-time does
// not stop a build that another client without one waits for, whether it
// waits for that derivation or for one that needs it: the build runs under
// the most generous limits of those waiting (with nix-daemon each client's
// build is its own). Alone, a client's limit still stops its build.
func TestSharedBuildLimits(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`rec {
  slow = mk { name = "limits-slow"; script = "while [ ! -e /gate/go ]; do echo tick; ${bb}/busybox sleep 0.2; done; echo > $out"; };
  slow2 = mk { name = "limits-slow-2"; script = "while [ ! -e /gate/go ]; do echo tick; ${bb}/busybox sleep 0.2; done; echo > $out"; };
  top = mk { name = "limits-top"; slow = slow2; script = "echo > $out"; };
  silent = mk { name = "limits-silent"; script = "while [ ! -e /gate/go ]; do ${bb}/busybox sleep 0.2; done; echo > $out"; };
}`, "slow", "slow2", "top", "silent")
	for _, tc := range []struct {
		name        string
		first, then store.DerivedPath
		running     storepath.Path
		short       ClientOptions
	}{
		{"timeout, same derivation", out(drvs["slow"]), out(drvs["slow"]), drvs["slow"], ClientOptions{Timeout: time.Second}},
		{"timeout, through a derivation that needs it", out(drvs["top"]), out(drvs["top"]), drvs["slow2"], ClientOptions{Timeout: time.Second}},
		{"max-silent-time", out(drvs["silent"]), out(drvs["silent"]), drvs["silent"], ClientOptions{MaxSilentTime: time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gate := t.TempDir()
			b := e.builder(Config{MaxJobs: 2, SandboxPaths: []string{"/gate=" + gate}})
			short := make(chan []Result, 1)
			go func() {
				res, _ := b.Build(t.Context(), []store.DerivedPath{tc.first}, tc.short, nil)
				short <- res
			}()
			waitBuilding(t, b, tc.running)
			long := make(chan []Result, 1)
			go func() {
				res, _ := b.Build(t.Context(), []store.DerivedPath{tc.then}, ClientOptions{}, nil)
				long <- res
			}()
			// Past the short limit, then let the build end.
			time.Sleep(2 * time.Second)
			if err := os.WriteFile(filepath.Join(gate, "go"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			for who, ch := range map[string]chan []Result{"the client with the short limit": short, "the client without": long} {
				if res := <-ch; len(res) != 1 || !res[0].Status.Success() {
					t.Errorf("%s: %+v", who, res)
				}
			}
		})
	}
	// Alone, the short limit stops the build.
	drvs = e.instantiate(`{ alone = mk { name = "limits-alone"; script = "${bb}/busybox sleep 30; echo > $out"; }; }`, "alone")
	res := e.build(e.builder(Config{}), ClientOptions{Timeout: time.Second}, out(drvs["alone"]))
	if r := res[0]; r.Status != TimedOut || !strings.HasSuffix(hint.Strip(r.ErrorMsg), "timed out after 1 seconds") {
		t.Errorf("alone: %d %q", r.Status, r.ErrorMsg)
	}
}

// waitBuilding waits until b runs the builder of drv.
func waitBuilding(t *testing.T, b *Builder, drv storepath.Path) {
	t.Helper()
	waitUntil(t, "the builder of "+drv.String(), func() bool { return isRunning(goalOf(b, drv, ModeNormal)) })
}

// TestImpureEnvVars: a fixed-output derivation's impureEnvVars get the
// daemon's values, except the daemon's own credentials, which it gets
// empty.
func TestImpureEnvVars(t *testing.T) {
	e := newChrootEnv(t)
	t.Setenv("NIXYARD_TEST_PROXY", "http://proxy.example:3128")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "daemon-secret")
	want := "proxy=http://proxy.example:3128 secret=\n"
	drvs := e.instantiate(`{
  fod = mk {
    name = "impure-env";
    impureEnvVars = [ "NIXYARD_TEST_PROXY" "AWS_SECRET_ACCESS_KEY" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "`+hash.Sum(hash.SHA256, []byte(want)).Base16()+`";
    script = "echo proxy=$NIXYARD_TEST_PROXY secret=$AWS_SECRET_ACCESS_KEY > $out";
  };
}`, "fod")
	r := e.build(e.builder(Config{Sandbox: SandboxOn}), ClientOptions{}, out(drvs["fod"]))[0]
	if !r.Status.Success() {
		t.Errorf("the output is not %q: %d %s", want, r.Status, r.ErrorMsg)
	}
}

// TestImpureHostDepsMissingOrEscaping: an allowed __impureHostDeps path
// that this host lacks is left out, as Nix leaves it (nixpkgs lists macOS
// paths); one whose symlinks lead out of allowed-impure-host-deps is
// refused (the bind mount would follow them; Nix binds it).
func TestImpureHostDepsMissingOrEscaping(t *testing.T) {
	e := newChrootEnv(t)
	allowed := filepath.Join(t.TempDir(), "deps")
	if err := os.MkdirAll(allowed, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc", filepath.Join(allowed, "escape")); err != nil {
		t.Fatal(err)
	}
	drvs := e.instantiate(`{
  missing = mk { name = "impure-missing"; __impureHostDeps = [ "`+allowed+`/absent" ]; script = "echo > $out"; };
  escaping = mk { name = "impure-escaping"; __impureHostDeps = [ "`+allowed+`/escape/passwd" ]; script = "echo > $out"; };
}`, "missing", "escaping")
	b := e.builder(Config{AllowedImpureHostDeps: []string{allowed}})
	if r := e.build(b, ClientOptions{}, out(drvs["missing"]))[0]; !r.Status.Success() {
		t.Errorf("a missing allowed impure host path: %d %s", r.Status, r.ErrorMsg)
	}
	if r := e.build(b, ClientOptions{}, out(drvs["escaping"]))[0]; r.Status.Success() || !strings.Contains(r.ErrorMsg, "which leads to '/etc/passwd'") {
		t.Errorf("an impure host path whose symlink leads out: %d %s", r.Status, r.ErrorMsg)
	}
}

// TestBuildFailureDiskFull: a builder that fails with the store's file
// system (nearly) full gets Nix's note, and is a transient failure (it may
// succeed once there is room).
func TestBuildFailureDiskFull(t *testing.T) {
	e := newChrootEnv(t)
	free := filepath.Join(t.TempDir(), "free")
	if err := os.WriteFile(free, []byte("1000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("_NIX_TEST_FREE_SPACE_FILE", free)
	drvs := e.instantiate(`{ full = mk { name = "disk-full"; script = "exit 1"; }; }`, "full")
	r := e.build(e.builder(Config{}), ClientOptions{}, out(drvs["full"]))[0]
	if r.Status != TransientFailure || !strings.HasSuffix(r.ErrorMsg, "\nnote: build failure may have been caused by lack of free disk space") {
		t.Errorf("a build that failed on a full disk: %d %q", r.Status, r.ErrorMsg)
	}
}
