package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// TestUntrustedClient runs real clients as an unprivileged uid against a
// daemon with trusted-users = root and allowed-users = *, and checks what
// such a client may and may not do.
func TestUntrustedClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	d := e.startDaemon(t, withConf("allowed-users = *"))
	u := d.unprivileged(t)
	other := d.otherStore("other")
	out, _ := d.buildFixture(t, other, "untrusted")

	// It may connect and add content-addressed paths.
	r := d.client("nix", "store", "ping").as(u).run(t)
	if r.err != nil || !strings.Contains(r.stdout+r.stderr, "Version:") {
		t.Fatalf("ping as uid %d:\n%s", u.uid, r)
	}
	mine := oneLine(t, "add", d.client("nix-store", "--add", d.file(t, "u/mine.txt", "untrusted content")).as(u).ok(t))
	if !d.isValid(t, mine) {
		t.Errorf("%s, added by the untrusted client, is not valid", mine)
	}

	// It cannot delete a path held by a root someone else made, nor one
	// held by another connection's temp root.
	held := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "u/held.txt", "rooted by root")))
	d.nixStore(t, "--add-root", filepath.Join(d.dir, "held-result"), "--indirect", "-r", held)
	tmp := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "u/temp.txt", "temp-rooted by root")))
	holder := dialProto(t, d.sock)
	holder.addTempRoot(t, tmp)
	for _, p := range []string{held, tmp} {
		if stderr := d.client("nix-store", "--delete", p).as(u).fails(t); !strings.Contains(stderr, "alive") {
			t.Errorf("untrusted --delete %s: stderr does not say it is alive:\n%s", p, stderr)
		}
	}
	d.assertValid(t, "after untrusted --delete", held, tmp)

	// It cannot add signatures; root can (so the refusal is about trust).
	sec, _ := d.generateKey(t, "e2e-untrusted-key")
	if err := os.Chmod(sec, 0o644); err != nil {
		t.Fatal(err)
	}
	if stderr := d.client("nix", "store", "sign", "--key-file", sec, held).as(u).fails(t); !refusedForTrust(stderr) {
		t.Errorf("untrusted nix store sign failed, but not for lack of trust:\n%s", stderr)
	}
	if s := parsePathInfos(t, "path-info", d.nix(t, "path-info", "--json", held))[held].Signatures; len(s) != 0 {
		t.Errorf("%s has signatures %q after an untrusted nix store sign", held, s)
	}
	d.nix(t, "store", "sign", "--key-file", sec, held)

	// Its dontCheckSigs (nix-store --import sets it) is ignored: unsigned
	// input-addressed paths are refused; root may import them.
	closure := lines(d.local(other, "nix-store", "-q", "--requisites", out).ok(t))
	export := []byte(d.local(other, "nix-store", append([]string{"--export"}, closure...)...).ok(t))
	if stderr := d.client("nix-store", "--import").withStdin(export).as(u).fails(t); !regexp.MustCompile(`(?m)^error: cannot add path '/nix/store/[^']+' because it lacks a valid signature`).MatchString(stderr) {
		t.Errorf("untrusted import of unsigned paths: stderr does not say it lacks a signature, in Nix's words:\n%s", stderr)
	}
	if d.isValid(t, out) {
		t.Errorf("%s is valid after an untrusted import of it was refused", out)
	}
	d.client("nix-store", "--import").withStdin(export).ok(t)

	// Its substituters are ignored (with Nix's warning).
	subOther := d.otherStore("sub-src")
	subst := oneLine(t, "add", d.local(subOther, "nix-store", "--add", d.file(t, "u/subst.txt", "in a binary cache")).ok(t))
	cache := "file://" + filepath.Join(d.dir, "cache")
	d.local(subOther, "nix", "copy", "--to", cache, subst).ok(t)
	stderr := d.client("nix-store", "-r", subst, "--option", "substituters", cache).as(u).fails(t)
	if !strings.Contains(stderr, "ignoring untrusted substituter") {
		t.Errorf("untrusted --option substituters: no 'ignoring untrusted substituter' warning:\n%s", stderr)
	}
	if d.isValid(t, subst) {
		t.Errorf("%s was substituted from a cache an untrusted client named", subst)
	}

	// Repairing needs trust.
	if stderr := d.client("nix-store", "--verify", "--repair").as(u).fails(t); !refusedForTrust(stderr) {
		t.Errorf("untrusted nix-store --verify --repair failed, but not for lack of trust:\n%s", stderr)
	}
	d.nixStore(t, "--verify", "--repair")

	// Runtime roots (processes using store paths) are censored for it.
	running := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "u/running.txt", "used by a process")))
	proc := exec.Command(busybox, "sleep", "3600")
	proc.Env = []string{"E2E_USES=" + running}
	if err := proc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Process.Kill(); proc.Wait() })
	procLink := fmt.Sprintf("/proc/%d/", proc.Process.Pid)
	rootView := gcRoots(t, d.nixStore(t, "--gc", "--print-roots"))
	if !hasRoot(rootView, running, func(l string) bool { return strings.HasPrefix(l, procLink) }) {
		t.Errorf("root's --print-roots does not show %s… -> %s:\n%v", procLink, running, rootView)
	}
	userView := gcRoots(t, d.client("nix-store", "--gc", "--print-roots").as(u).ok(t))
	if !hasRoot(userView, running, func(l string) bool { return l == "{censored}" }) {
		t.Errorf("untrusted --print-roots does not show {censored} -> %s:\n%v", running, userView)
	}
	for _, r := range userView {
		if strings.HasPrefix(r[0], "/proc/") {
			t.Errorf("untrusted --print-roots reveals %s -> %s", r[0], r[1])
		}
	}
	d.assertValid(t, "at the end", held, tmp, running, mine)
}

// refusedForTrust reports whether an error message says the client lacks
// trust (Nix: "you are not privileged to …").
func refusedForTrust(stderr string) bool {
	return strings.Contains(stderr, "not privileged") || strings.Contains(stderr, "not trusted")
}

// TestBuildDerivationUntrusted: as with nix-daemon, an untrusted client
// may not have an input-addressed derivation built by BuildDerivation (a
// remote build's op, the derivation sent whole): its output path cannot
// be checked without the derivation's inputs, so the client could have any
// content registered under any path. A job socket's client (untrusted) is
// refused; root on the default socket gets the same derivation built. No
// real client can be made to send it as an untrusted user (ssh-ng runs its
// own daemon), hence the raw protocol.
func TestBuildDerivationUntrusted(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the derivation names x86_64-linux")
	}
	if useStock {
		t.Skip("nix-daemon has no job sockets (--listen)")
	}
	t.Parallel()
	e := newEnv(t)
	job := filepath.Join(e.dir, "job.sock")
	b := e.startBuildDaemonWith(t, withDaemonArgs("--listen", job+",trusted=false"))
	bbData, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(e.dir, "bb", "busybox"), string(bbData), 0o755)
	bb := oneLine(t, "add", b.nixStore(t, "--add", filepath.Join(e.dir, "bb")))
	out := "/nix/store/11111111111111111111111111111111-ia-remote"
	build := func(sock string) (status uint64, msg string, err error) {
		p := dialProto(t, sock)
		p.u64(36) // BuildDerivation
		p.str("/nix/store/22222222222222222222222222222222-ia-remote.drv")
		p.u64(1) // outputs: name, path, hash algorithm, hash (none: input-addressed)
		p.str("out")
		p.str(out)
		p.str("")
		p.str("")
		p.strs([]string{bb}) // input sources
		p.str("x86_64-linux")
		p.str(bb + "/busybox") // builder
		p.u64(3)               // arguments, in order
		p.str("sh")
		p.str("-c")
		p.str("echo built > $out")
		p.u64(1) // environment
		p.str("out")
		p.str(out)
		p.u64(0) // build mode: normal
		if err := p.flush(); err != nil {
			t.Fatal(err)
		}
		if err := p.readStderr(); err != nil {
			return 0, "", err
		}
		// The BuildResult's status and error message.
		if status, err = p.readU64(); err != nil {
			return 0, "", err
		}
		msg, err = p.readString()
		return status, msg, err
	}
	if _, _, err := build(job); err == nil || !strings.Contains(err.Error(), "you are not privileged to build input-addressed derivations") {
		t.Errorf("an untrusted client's BuildDerivation of an input-addressed derivation: %v", err)
	}
	if b.isValid(t, out) {
		t.Fatalf("%s was built for an untrusted client", out)
	}
	if status, msg, err := build(b.sock); err != nil || status != 0 || !b.isValid(t, out) {
		t.Errorf("root's BuildDerivation of the same derivation: status %d %q, %v, output valid %v", status, msg, err, b.isValid(t, out))
	}
}
