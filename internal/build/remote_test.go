package build

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/store"
)

func TestHasMachines(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	some := filepath.Join(dir, "some")
	os.WriteFile(empty, []byte("# no machines\n\n"), 0o644)
	os.WriteFile(some, []byte("ssh://a x86_64-linux\n"), 0o644)
	for spec, want := range map[string]bool{
		"":                               false,
		" ; \n ;# ssh://commented":       false,
		"@" + filepath.Join(dir, "nope"): false,
		"@" + empty:                      false,
		"@" + empty + "; @" + some:       true,
		"ssh://a":                        true,
		"# x\nssh-ng://b x86_64-linux":   true,
		"@" + dir:                        true, // unreadable: let the hook say
	} {
		if got := hasMachines(spec, 0); got != want {
			t.Errorf("hasMachines(%q) = %v, want %v", spec, got, want)
		}
	}
}

// TestRemoteHook drives the build hook protocol with a fake hook (a shell
// script that answers what its mode file says) and checks what the
// builder makes of each answer.
func TestRemoteHook(t *testing.T) {
	e := newPlainEnv(t)
	dir := t.TempDir()
	mode := filepath.Join(dir, "mode")
	starts := filepath.Join(dir, "starts")
	hook := filepath.Join(dir, "fake-hook")
	script := `#!/bin/sh
echo "$0 $1" >> ` + starts + `
echo "$NIX_DAEMON_SOCKET_PATH" > ` + starts + `.socket
case $(cat ` + mode + `) in
decline) printf '# decline\n# decline\n# decline\n' ;;
permanent) printf '# decline-permanently\n' ;;
die) exit 0 ;;
fail) printf '@nix {"action":"msg","level":0,"msg":"remote says no"}\n@nix {"action":"msg","level":5,"msg":"chatter"}\n# accept\nfake-machine\n'
  echo remote-line >&4; cat > /dev/null; exit 1 ;;
nothing) printf 'not json\n# postpone\n# accept\nfake-machine\n'
  echo remote-line >&4
  printf '@nix {"action":"result","id":7,"type":101,"fields":["ng-line"]}\n'
  cat > /dev/null; exit 0 ;;
esac
cat > /dev/null
`
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	old := hookRetry
	hookRetry = 50 * time.Millisecond
	t.Cleanup(func() { hookRetry = old })
	b := e.builder(Config{Sandbox: SandboxOff, BuildHook: hook, Builders: "fake " + DefaultSystem(), HookStore: "daemon", HookSocket: "/nonexistent/hook.sock"})
	t.Cleanup(b.Close)
	nStarts := func() int {
		data, _ := os.ReadFile(starts)
		return strings.Count(string(data), "\n")
	}
	run := func(m, name string) (Result, *recorder) {
		t.Helper()
		if err := os.WriteFile(mode, []byte(m), 0o644); err != nil {
			t.Fatal(err)
		}
		drvs := e.instantiate(`{ d = mk { name = "`+name+`"; script = "echo local-line; echo `+name+` > $out"; }; }`, "d")
		rec := &recorder{}
		res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["d"])}, ClientOptions{}, rec)
		if err != nil {
			t.Fatal(err)
		}
		return res[0], rec
	}

	// Declined: built here, and the hook is kept for the request's next
	// offer (the input's, then the top's), not for another request's.
	if err := os.WriteFile(mode, []byte("decline"), 0o644); err != nil {
		t.Fatal(err)
	}
	drvs := e.instantiate(`rec {
  dep = mk { name = "declined-dep"; script = "echo local-line; echo dep > $out"; };
  top = mk { name = "declined"; inherit dep; script = "echo top $dep > $out"; };
}`, "top")
	rec := &recorder{}
	res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])}, ClientOptions{}, rec)
	if err != nil || res[0].Status != Built || !slices.Contains(rec.lines, "local-line") {
		t.Errorf("declined: %+v %v %+v", res, err, rec)
	}
	if n := nStarts(); n != 1 {
		t.Errorf("%d hooks started for one request's two offers, want 1 kept", n)
	}
	run("decline", "declined-again")
	if n := nStarts(); n != 2 {
		t.Errorf("%d hooks started for two requests, want 2: a hook serves one request", n)
	}
	if data, _ := os.ReadFile(starts); !strings.HasSuffix(string(data), " 3\n") {
		t.Errorf("hook run as %q, want Nix's verbosity (3) as its argument", data)
	}
	// Its store, "daemon", is the hook socket.
	if data, _ := os.ReadFile(starts + ".socket"); string(data) != "/nonexistent/hook.sock\n" {
		t.Errorf("the hook's NIX_DAEMON_SOCKET_PATH is %q, want the hook socket", data)
	}

	// Accepted, then failed: the hook's error and the remote builder's
	// output reach the caller; messages below warnings do not. (The
	// builder is not closed between requests: after Close, no hook is
	// kept, and the postponing hook below would never be asked again.)
	r, rec := run("fail", "failing")
	if r.Status != MiscFailure || !strings.Contains(r.ErrorMsg, "failed with exit code 1") ||
		!slices.Contains(rec.errors, "remote says no") || slices.Contains(rec.errors, "chatter") || !slices.Contains(rec.lines, "remote-line") {
		t.Errorf("failed remote build: %+v %+v", r, rec)
	}

	// Postponed, then accepted, and the outputs are not brought back: a
	// failure, with both kinds of remote log in the build log.
	r, _ = run("nothing", "nothing")
	if r.Status != MiscFailure || !strings.Contains(r.ErrorMsg, "not valid after its build on 'fake-machine'") {
		t.Errorf("remote build without outputs: %+v", r)
	}
	var logText string
	for _, d := range []string{"log/drvs"} {
		filepath.Walk(filepath.Join(e.root, d), func(p string, fi os.FileInfo, err error) error {
			if err == nil && !fi.IsDir() && strings.HasSuffix(p, "-nothing.drv") {
				data, _ := os.ReadFile(p)
				logText = string(data)
			}
			return nil
		})
	}
	if !strings.Contains(logText, "remote-line\n") || !strings.Contains(logText, "ng-line\n") {
		t.Errorf("build log of the remote build: %q", logText)
	}

	// A hook that dies: said, and built here. (One that cannot even be
	// started, which a loaded machine has made of it once, is said too.)
	r, rec = run("die", "died")
	if r.Status != Built || len(rec.errors) == 0 || !strings.Contains(rec.errors[0], "build hook died unexpectedly") && !strings.Contains(rec.errors[0], "cannot start the build hook") {
		t.Errorf("dead hook: %+v %+v", r, rec)
	}

	// Declined for good: built here, and not asked again in the request
	// (b is offered after a, its input).
	before := nStarts()
	drvs = e.instantiate(`rec { a = mk { name = "perm-a"; script = "echo a > $out"; }; b = mk { name = "perm-b"; inherit a; script = "echo b > $out"; }; }`, "a", "b")
	os.WriteFile(mode, []byte("permanent"), 0o644)
	res, err = b.Build(t.Context(), []store.DerivedPath{out(drvs["a"]), out(drvs["b"])}, ClientOptions{}, nil)
	if err != nil || res[0].Status != Built || res[1].Status != Built {
		t.Fatalf("declined for good: %+v %v", res, err)
	}
	if n := nStarts() - before; n != 1 {
		t.Errorf("%d hooks started in a request after decline-permanently, want 1", n)
	}

	// A client with builders = "": no hook at all.
	before = nStarts()
	drvs = e.instantiate(`{ d = mk { name = "no-builders"; script = "echo > $out"; }; }`, "d")
	res, err = b.Build(t.Context(), []store.DerivedPath{out(drvs["d"])}, ClientOptions{Settings: map[string]string{"builders": ""}}, nil)
	if err != nil || res[0].Status != Built || nStarts() != before {
		t.Errorf("builders = \"\": %+v %v, %d hooks started", res, err, nStarts()-before)
	}
}

// TestHooksEndWithClose: Close ends the kept hooks and stops their
// expiry timer, and a hook given back after Close is ended, not kept.
func TestHooksEndWithClose(t *testing.T) {
	b := &Builder{}
	start := func() *hookProc {
		t.Helper()
		cmd := exec.Command("sleep", "60")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		var files childFiles
		t.Cleanup(func() { files.closeAll() })
		inR, inW, err1 := files.pipe()
		fromR, fromW, err2 := files.pipe()
		logR, _, err3 := files.pipe()
		if err := errors.Join(err1, err2, err3); err != nil {
			t.Fatal(err)
		}
		cmd.Stdin, cmd.Stdout = inR, fromW
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return &hookProc{procGroup: procGroup{cmd: cmd}, key: "k", stdin: inW, fromF: fromR, logR: logR}
	}
	kept := start()
	b.putHook(kept)
	b.mu.Lock()
	n, timer := len(b.hooks.idle["k"]), b.hooks.expiry != nil
	b.mu.Unlock()
	if n != 1 || !timer {
		t.Fatalf("a hook given back: %d kept, expiry timer %v; want 1 kept, with the timer", n, timer)
	}
	b.Close()
	if kept.cmd.ProcessState == nil {
		t.Error("a kept hook still runs after Close")
	}
	late := start()
	b.putHook(late)
	if late.cmd.ProcessState == nil {
		t.Error("a hook given back after Close still runs")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.hooks.idle != nil || b.hooks.expiry != nil {
		t.Errorf("after Close: idle hooks %v, expiry timer %v; want none", b.hooks.idle, b.hooks.expiry)
	}
}

// fakeHookEnv, when set, makes the test binary a build hook (see
// fakeHook) that keeps its state in the directory it names.
const fakeHookEnv = "NIXYARD_TEST_FAKE_HOOK"

func init() {
	if dir := os.Getenv(fakeHookEnv); dir != "" && len(os.Args) == 2 {
		os.Exit(fakeHook(dir))
	}
}

// fakeHook speaks Nix's build hook protocol with one remote machine that
// builds one derivation at a time (for 0.5 s, without bringing anything
// back): it accepts while the machine is free, declines what this host
// is willing to build, and postpones the rest. It logs each offer as
// "DRV WILLING" to dir/offers and the settings it got to dir/settings.
func fakeHook(dir string) int {
	in := bufio.NewReader(os.Stdin)
	u64 := func() uint64 {
		var b [8]byte
		if _, err := io.ReadFull(in, b[:]); err != nil {
			os.Exit(0)
		}
		return binary.LittleEndian.Uint64(b[:])
	}
	str := func() string {
		n := u64()
		b := make([]byte, (n+7)&^7)
		if _, err := io.ReadFull(in, b); err != nil {
			os.Exit(0)
		}
		return string(b[:n])
	}
	strs := func() []string {
		var out []string
		for n := u64(); n > 0; n-- {
			out = append(out, str())
		}
		return out
	}
	var settings strings.Builder
	for u64() == 1 {
		k, v := str(), str()
		fmt.Fprintf(&settings, "%s=%s\n", k, v)
	}
	os.WriteFile(filepath.Join(dir, "settings"), []byte(settings.String()), 0o644)
	busy := filepath.Join(dir, "busy")
	for {
		if str() != "try" {
			return 1
		}
		willing := u64()
		str() // platform
		drv := str()
		strs() // features
		f, _ := os.OpenFile(filepath.Join(dir, "offers"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		fmt.Fprintf(f, "%s %d\n", drv, willing)
		f.Close()
		m, err := os.OpenFile(busy, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		switch {
		case err == nil:
			m.Close()
			fmt.Fprint(os.Stderr, "# accept\nfake-machine\n")
			strs() // inputs
			strs() // wanted outputs
			time.Sleep(500 * time.Millisecond)
			os.Remove(busy)
			return 0
		case willing == 1:
			fmt.Fprint(os.Stderr, "# decline\n")
		default:
			fmt.Fprint(os.Stderr, "# postpone\n")
		}
	}
}

// TestRemoteOffers: as with Nix, a build that this host has a free slot
// for is offered as "willing" and, declined, built here with that slot;
// the others are offered as not willing, postponed, and offered again
// when the remote machine is free. The hook gets the daemon's settings,
// the store to reach it through and the client's options.
func TestRemoteOffers(t *testing.T) {
	e := newPlainEnv(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	t.Setenv(fakeHookEnv, dir)
	b := e.builder(Config{Sandbox: SandboxOff, MaxJobs: 1, BuildHook: self, Builders: "fake " + DefaultSystem(),
		HookStore: "unix:///hook.sock", HookSettings: map[string]string{"system": DefaultSystem()}})
	t.Cleanup(b.Close)
	drvs := e.instantiate(`{
  a = mk { name = "offer-a"; script = "sleep 2; echo > $out"; };
  b = mk { name = "offer-b"; script = "sleep 2; echo > $out"; };
  c = mk { name = "offer-c"; script = "sleep 2; echo > $out"; };
}`, "a", "b", "c")
	res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["a"]), out(drvs["b"]), out(drvs["c"])},
		ClientOptions{KeepGoing: true, MaxSilentTime: 42 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	here, there := 0, 0
	for _, r := range res {
		switch {
		case r.Status == Built:
			here++
		case strings.Contains(r.ErrorMsg, "not valid after its build on 'fake-machine'"):
			there++
		default:
			t.Errorf("%s: %d %s", r.Path.Path, r.Status, r.ErrorMsg)
		}
	}
	offers, _ := os.ReadFile(filepath.Join(dir, "offers"))
	if here != 1 || there != 2 {
		t.Errorf("%d built here and %d sent to the machine, want 1 and 2; offers:\n%s", here, there, offers)
	}
	seen := map[string][]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(offers)), "\n") {
		drv, w, _ := strings.Cut(l, " ")
		seen[drv] = append(seen[drv], w)
	}
	again := false
	for _, ws := range seen {
		again = again || (len(ws) > 1 && ws[0] == "0")
	}
	if !again {
		t.Errorf("no postponed build offered again:\n%s", offers)
	}
	settings, _ := os.ReadFile(filepath.Join(dir, "settings"))
	for _, want := range []string{"store=unix:///hook.sock\n", "builders=fake " + DefaultSystem() + "\n", "keep-going=true\n"} {
		if !strings.Contains(string(settings), want) {
			t.Errorf("the hook's settings lack %q:\n%s", want, settings)
		}
	}
	// The client's limits are held here, not sent (they change as clients
	// join the build).
	if strings.Contains(string(settings), "max-silent-time=42") {
		t.Errorf("the hook was sent the client's max-silent-time:\n%s", settings)
	}
}
