package e2e

import (
	"crypto/rand"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

func TestCopyToDaemon(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sec, pub := e.generateKey(t, "e2e-key-1")
	d := e.startDaemon(t, withConf("trusted-public-keys = "+pub))
	other := d.otherStore("other")
	out, dep := d.buildFixture(t, other, "copy-to")
	signedOut, signedDep := d.buildFixture(t, other, "copy-to-signed")
	d.local(other, "nix", "store", "sign", "-r", "--key-file", sec, signedOut).ok(t)
	ca := oneLine(t, "nix-store --add", d.local(other, "nix-store", "--add", d.file(t, "ca.txt", "content-addressed")).ok(t))

	copyTo := func(args ...string) *command {
		return d.cmd("nix", append([]string{"copy", "--from", directStore(other), "--to", d.url()}, args...)...)
	}

	// The daemon requires signatures by default: unsigned input-addressed
	// paths are refused, and nothing of the closure is left valid.
	// In Nix's words.
	stderr := copyTo(out).fails(t)
	if !regexp.MustCompile(`error: cannot add path '/nix/store/[a-z0-9]{32}-[^']+' because it lacks a valid signature`).MatchString(stderr) {
		t.Errorf("copying unsigned paths: stderr does not say a signature is lacking, in Nix's words:\n%s", stderr)
	}
	if d.isValid(t, out) {
		t.Errorf("%s is valid after a refused copy", out)
	}

	// --no-check-sigs from a trusted client is honoured.
	copyTo("--no-check-sigs", out).ok(t)
	assertSameClosure(t, "closure copied with --no-check-sigs",
		parsePathInfos(t, "source", d.local(other, "nix", "path-info", "-r", "--json", out).ok(t)),
		parsePathInfos(t, "daemon", d.nix(t, "path-info", "-r", "--json", out)))

	// Paths signed by a key in trusted-public-keys need no flag, and keep
	// their signatures.
	copyTo(signedOut).ok(t)
	infos := parsePathInfos(t, "daemon", d.nix(t, "path-info", "-r", "--json", signedOut))
	assertSameClosure(t, "signed closure",
		parsePathInfos(t, "source", d.local(other, "nix", "path-info", "-r", "--json", signedOut).ok(t)), infos)
	for _, p := range []string{signedOut, signedDep} {
		if s := infos[p].Signatures; len(s) != 1 || !strings.HasPrefix(s[0], "e2e-key-1:") {
			t.Errorf("%s: signatures %q, want one by e2e-key-1", p, s)
		}
	}

	// Content-addressed paths need no signature.
	copyTo(ca).ok(t)
	if !d.isValid(t, ca) {
		t.Errorf("%s not valid after nix copy", ca)
	}

	// Copying again is a no-op that succeeds.
	copyTo("--no-check-sigs", out, signedOut, ca).ok(t)

	// Everything arrived intact, as real Nix sees the daemon's store.
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
	for _, p := range []string{out, dep, signedOut, ca} {
		if got, want := d.nixHashPath(t, "sha256", d.realPath(p)), d.nixHashPath(t, "sha256", filepath.Join(other, p)); got != want {
			t.Errorf("%s: NAR hash on the daemon's disk %s, in the source store %s", p, got, want)
		}
	}
}

// nixStoreRun runs nix-store through the daemon and returns the whole
// result, success or not (for commands that report on stderr).
func (d *daemon) nixStoreRun(t *testing.T, args ...string) result {
	t.Helper()
	return d.client("nix-store", args...).run(t)
}

func TestCopyFromDaemon(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	src := d.otherStore("src")
	out, _ := d.buildFixture(t, src, "copy-from")
	d.cmd("nix", "copy", "--no-check-sigs", "--from", directStore(src), "--to", d.url(), out).ok(t)
	dir := d.mkTree(t, "tree", tree{"a": "a", "b/": "", "b/c": "*c", "l": "->a"})
	ca := oneLine(t, "nix-store --add", d.nixStore(t, "--add", dir))
	want := parsePathInfos(t, "daemon", d.nix(t, "path-info", "-r", "--json", out, ca))

	for _, c := range []struct{ name, url string }{
		{"unix", d.url()},
		{"ssh-ng", d.sshNG(t)},
	} {
		t.Run(c.name, func(t *testing.T) {
			dst := d.otherStore("dst-" + c.name)
			// Input-addressed paths need a signature or --no-check-sigs;
			// content-addressed ones do not.
			stderr := d.cmd("nix", "copy", "--from", c.url, "--to", directStore(dst), out).fails(t)
			if !strings.Contains(stderr, "lacks a valid signature") {
				t.Errorf("unsigned copy: stderr does not say a signature is lacking:\n%s", stderr)
			}
			d.cmd("nix", "copy", "--from", c.url, "--to", directStore(dst), ca).ok(t)
			d.cmd("nix", "copy", "--no-check-sigs", "--from", c.url, "--to", directStore(dst), out).ok(t)
			got := parsePathInfos(t, "destination", d.local(dst, "nix", "path-info", "-r", "--json", out, ca).ok(t))
			assertSameClosure(t, "closure copied from the daemon over "+c.name, want, got)
			assertVerifyClean(t, d.local(dst, "nix-store", "--verify", "--check-contents").run(t))
		})
	}

	// Queries over ssh-ng (no SetOptions, NARs over the wire) answer as
	// over the socket.
	ssh := d.sshNG(t)
	for _, q := range [][]string{{"-q", "--references", out}, {"-q", "--hash", out}, {"-q", "--deriver", out}} {
		got := d.cmd("nix-store", append(q, "--store", ssh)...).ok(t)
		if w := d.nixStore(t, q...); got != w {
			t.Errorf("nix-store %s over ssh-ng: %q; over the socket: %q", strings.Join(q, " "), got, w)
		}
	}
	// The daemon's own log lines stay off the ssh-ng user's terminal (the
	// earlier ssh-ng daemons left temporary roots files that a collection
	// removes, which nixyard logs), as nix-daemon --stdio writes none.
	if r := d.cmd("nix", "store", "gc", "--dry-run", "--store", ssh).run(t); r.err != nil || strings.Contains(r.stderr, "level=") {
		t.Errorf("nix store gc --dry-run over ssh-ng:\n%s", r)
	}
	// The NAR of a path that is not valid (collected meanwhile, say)
	// fails; a Nix 2.8 client reads on after the op's error, so the
	// connection must end there, as nix-daemon's does.
	missing := filepath.Join(filepath.Dir(out), strings.Repeat("0", 32)+"-missing")
	r := d.cmd("timeout", "60", "nix", "store", "dump-path", "--store", ssh, missing).run(t)
	var ee *exec.ExitError
	if !errors.As(r.err, &ee) || ee.ExitCode() == 124 {
		t.Errorf("dump-path of a path that is not valid over ssh-ng: want a failure, not a hang:\n%s", r)
	}
}

func TestExportImport(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	other := d.otherStore("other")
	out, dep := d.buildFixture(t, other, "export")
	closure := lines(d.local(other, "nix-store", "-q", "--requisites", out).ok(t))
	export := []byte(d.local(other, "nix-store", append([]string{"--export"}, closure...)...).ok(t))

	// nix-store --import into the daemon (AddToStoreNar, dontCheckSigs).
	imported := sortedLines(d.client("nix-store", "--import").withStdin(export).ok(t))
	if strings.Join(imported, " ") != strings.Join(sortedLines(strings.Join(closure, "\n")), " ") {
		t.Errorf("nix-store --import printed %q, want the exported closure %q", imported, closure)
	}
	want := parsePathInfos(t, "source", d.local(other, "nix", "path-info", "-r", "--json", out).ok(t))
	assertSameClosure(t, "imported closure", want, parsePathInfos(t, "daemon", d.nix(t, "path-info", "-r", "--json", out)))
	if got := oneLine(t, "deriver", d.nixStore(t, "-q", "--deriver", dep)); got != want[dep].Deriver {
		t.Errorf("deriver of imported %s = %s, want %s", dep, got, want[dep].Deriver)
	}
	// Importing again is harmless.
	d.client("nix-store", "--import").withStdin(export).ok(t)

	// Export from the daemon and import into a fresh store directly: the
	// round trip preserves everything.
	again := []byte(d.nixStore(t, append([]string{"--export"}, closure...)...))
	third := d.otherStore("third")
	d.local(third, "nix-store", "--import").withStdin(again).ok(t)
	assertSameClosure(t, "closure exported from the daemon", want,
		parsePathInfos(t, "third", d.local(third, "nix", "path-info", "-r", "--json", out).ok(t)))
	assertVerifyClean(t, d.local(third, "nix-store", "--verify", "--check-contents").run(t))
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
}

func TestSignVerify(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	other := d.otherStore("other")
	out, dep := d.buildFixture(t, other, "sign")
	d.cmd("nix", "copy", "--no-check-sigs", "--from", directStore(other), "--to", d.url(), out).ok(t)
	sec, pub := d.generateKey(t, "e2e-sign-1")
	_, otherPub := d.generateKey(t, "e2e-sign-2")

	verify := func(trusted string, args ...string) *command {
		return d.client("nix", append([]string{"store", "verify", "--sigs-needed", "1", "--option", "trusted-public-keys", trusted}, args...)...)
	}
	if stderr := verify(pub, out).fails(t); !strings.Contains(stderr, "untrusted") {
		t.Errorf("verifying an unsigned path: stderr does not call it untrusted:\n%s", stderr)
	}

	d.nix(t, "store", "sign", "--key-file", sec, out)
	sigs := parsePathInfos(t, "path-info", d.nix(t, "path-info", "--json", out))[out].Signatures
	if len(sigs) != 1 || !strings.HasPrefix(sigs[0], "e2e-sign-1:") {
		t.Fatalf("signatures of %s after nix store sign: %q, want one by e2e-sign-1", out, sigs)
	}
	// The signature is real: real Nix checks it against the public key.
	verify(pub, out).ok(t)
	verify(otherPub, out).fails(t)
	// The dependency is still unsigned.
	verify(pub, "-r", out).fails(t)
	d.nix(t, "store", "sign", "-r", "--key-file", sec, out)
	verify(pub, "-r", out).ok(t)
	// Signing twice with the same key keeps one signature.
	d.nix(t, "store", "sign", "--key-file", sec, dep)
	if s := parsePathInfos(t, "path-info", d.nix(t, "path-info", "--json", dep))[dep].Signatures; len(s) != 1 {
		t.Errorf("signatures of %s after signing twice: %q, want one", dep, s)
	}

	// The signature is in the database real Nix reads.
	direct := parsePathInfos(t, "direct", d.local(d.root, "nix", "path-info", "--json", out).ok(t))[out]
	if strings.Join(direct.Signatures, " ") != strings.Join(sigs, " ") {
		t.Errorf("real Nix reading the store directly sees signatures %q, the daemon %q", direct.Signatures, sigs)
	}
}

// TestStopDuringCopyTellsClient: `nix copy --to` the daemon, still
// uploading when the daemon's stop grace ends, fails with the daemon's
// reason: whether the client waits for its own source (a held download)
// or keeps sending (a slow one); an upload refused at its first bytes, whose
// rest the daemon was reading to drop it, with the refusal's. Nix 2.8's client reads what the daemon
// says while it uploads; when the daemon only hung up, it said "unexpected
// end-of-file", or, still sending, dropped the error and exited 0 without
// the paths.
func TestStopDuringCopyTellsClient(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nixyard's --shutdown-grace (nix-daemon's connections are processes of their own, which a SIGTERM to the daemon does not reach)")
	}
	e := newEnv(t)
	src := e.otherStore("src")
	big := make([]byte, 8<<20) // sent at 1.3 MB/s: longer than the grace and the daemon's last 2 s
	if _, err := rand.Read(big); err != nil {
		t.Fatal(err)
	}
	bigPath := oneLine(t, "nix-store --add", e.local(src, "nix-store", "--add", e.file(t, "stop-upload-big", string(big))).ok(t))
	small, _ := e.buildFixture(t, src, "stop-upload")
	// As big, but input-addressed: a store that requires signatures
	// refuses it unsigned, at its first bytes.
	fx := e.fixtureArgs(t, "stop-upload")
	expr := writeFile(t, filepath.Join(e.dir, "big-ia.nix"), `{ bbdir, nonce }:
let bb = builtins.path { path = bbdir; name = "busybox-static"; };
in builtins.derivation { name = "stop-upload-big-ia"; inherit nonce; system = builtins.currentSystem;
  builder = "${bb}/busybox"; args = [ "sh" "-c" "echo $nonce > $out; head -c 8388608 /dev/urandom >> $out" ]; }
`, 0o644)
	bigIA := oneLine(t, "nix-build", e.cmd("nix-build", "--store", src, "--no-out-link", expr, "--arg", "bbdir", fx[len(fx)-1], "--argstr", "nonce", e.nonce).ok(t))
	cacheDir := filepath.Join(e.dir, "cache")
	e.fillCache(t, src, cacheDir, "none", "", bigPath, small, bigIA)
	srv := cachetest.New(cacheDir)
	defer srv.Close()

	slow := func(started chan struct{}, _ <-chan struct{}) cachetest.Fault {
		now := make(chan struct{})
		close(now)
		return cachetest.Fault{Held: func() { close(started) }, Release: now, Trickle: 50 * time.Millisecond}
	}
	for _, tc := range []struct {
		name string
		path string
		// fault makes the client's upload outlast the grace; it closes
		// started when the download begins, when the upload is under way.
		fault func(started chan struct{}, release <-chan struct{}) cachetest.Fault
		sigs  bool   // the daemon checks signatures (and refuses the path at once)
		want  string // what the client says
	}{
		{"held", small, func(started chan struct{}, release <-chan struct{}) cachetest.Fault {
			return cachetest.Fault{Held: func() { close(started) }, Release: release}
		}, false, "the daemon is stopping"},
		{"slow", bigPath, slow, false, "the daemon is stopping"},
		// Refused at its first bytes, the rest read to be dropped when the
		// stop comes: the client hears why the path was refused.
		{"refused", bigIA, slow, true, "lacks a valid signature"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := e.startDaemon(t, withDaemonArgs("--shutdown-grace", "1s"))
			started, release := make(chan struct{}), make(chan struct{})
			srv.Inject(narURL(t, cacheDir, tc.path), tc.fault(started, release))
			done := make(chan result, 1)
			args := []string{"copy", "--from", srv.URL, "--to", d.url(), tc.path}
			if !tc.sigs {
				args = append(args, "--no-check-sigs")
			}
			go func() { done <- e.cmd("nix", args...).run(t) }()
			select {
			case <-started:
			case r := <-done:
				t.Fatalf("nix copy ended before it downloaded:\n%s", r)
			}
			syscall.Kill(d.proc.Process.Pid, syscall.SIGTERM)
			select {
			case <-d.exited:
			case <-time.After(30 * time.Second):
				t.Fatal("the daemon did not exit after its grace")
			}
			close(release)
			r := <-done
			if r.err == nil || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("nix copy, cut by the daemon's stop: it does not fail saying %q:\n%s", tc.want, r)
			}
			d.start(t)
			if d.isValid(t, tc.path) {
				t.Errorf("%s is valid after a copy the daemon's stop cut", tc.path)
			}
			d.stop(t)
		})
	}
}
