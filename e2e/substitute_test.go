package e2e

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

// Substitution through the daemon from binary caches written by real
// `nix copy --to file://…` and served over HTTP by cachetest.

// fillCache copies paths (with their closures) from the chroot store under
// other into a file:// cache at dir, with the given compression and, if
// sec is set, signed with that secret key.
func (e *testEnv) fillCache(t *testing.T, other, dir, compression, sec string, paths ...string) {
	t.Helper()
	u := "file://" + dir + "?compression=" + compression
	if sec != "" {
		u += "&secret-key=" + sec
	}
	e.local(other, "nix", append([]string{"copy", "--to", u}, paths...)...).ok(t)
}

// cachedFixtures builds the fixtures named in a store of their own and
// copies each closure into the file:// cache at e.dir/cache with the given
// compression (signed with sec if set). It returns the cache directory, the
// outputs, and each output's one reference.
func (e *testEnv) cachedFixtures(t *testing.T, compression, sec string, names ...string) (cacheDir string, outs, deps []string) {
	t.Helper()
	other := e.otherStore("src")
	cacheDir = filepath.Join(e.dir, "cache")
	for _, name := range names {
		out, dep := e.buildFixture(t, other, name)
		e.fillCache(t, other, cacheDir, compression, sec, out)
		outs, deps = append(outs, out), append(deps, dep)
	}
	return cacheDir, outs, deps
}

// buildIntoCache builds attr of the expression args in a store of its own
// and copies its closure into the file:// cache at e.dir/cache with the
// given compression. It returns the output and the cache directory.
func (e *testEnv) buildIntoCache(t *testing.T, args []string, attr, compression string) (out, cacheDir string) {
	t.Helper()
	other := e.otherStore("src")
	cacheDir = filepath.Join(e.dir, "cache")
	out = oneLine(t, attr, e.cmd("nix-build", append(args, "-A", attr, "--no-out-link", "--store", other)...).ok(t))
	e.fillCache(t, other, cacheDir, compression, "", out)
	return out, cacheDir
}

// narURL returns the URL field of p's narinfo in the cache at dir.
func narURL(t *testing.T, dir, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, filepath.Base(p)[:32]+".narinfo"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if u, ok := strings.CutPrefix(l, "URL: "); ok {
			return u
		}
	}
	t.Fatalf("narinfo of %s has no URL:\n%s", p, b)
	return ""
}

// assertFixture checks that out (a fixture output) is valid in the daemon
// with the fixture's contents.
func (d *daemon) assertFixture(t *testing.T, out, dep string) {
	t.Helper()
	for _, p := range []string{out, dep} {
		if !d.isValid(t, p) {
			t.Fatalf("%s is not valid after substitution", p)
		}
	}
	b, err := os.ReadFile(d.realPath(out))
	if err != nil {
		t.Fatal(err)
	}
	if want := d.nonce + " " + dep + "\n"; string(b) != want {
		t.Fatalf("%s holds %q, want %q", out, b, want)
	}
}

// verifyStopped stops the daemon and checks the store with real Nix
// opening it directly.
func (d *daemon) verifyStopped(t *testing.T) {
	t.Helper()
	d.stop(t)
	assertVerifyClean(t, d.local(d.root, "nix-store", "--verify", "--check-contents").run(t))
}

func TestSubstituteCompressions(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	sec, pub := e.generateKey(t, "subst-test-1")
	cacheDir := filepath.Join(e.dir, "cache")
	comps := []string{"xz", "zstd", "bzip2", "br", "none"}
	outs := map[string][2]string{}
	for _, c := range comps {
		out, dep := e.buildFixture(t, other, "subst-"+c)
		e.fillCache(t, other, cacheDir, c, sec, out)
		outs[c] = [2]string{out, dep}
	}
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "trusted-public-keys = "+pub))

	for _, c := range comps {
		out, dep := outs[c][0], outs[c][1]
		// QueryPathInfo never substitutes.
		if r := d.client("nix", "path-info", out).run(t); r.err == nil || !strings.Contains(r.stderr, "is not valid") {
			t.Fatalf("path-info of a substitutable path:\n%s", r)
		}
		// QueryMissing reports both paths as substitutable.
		dry := d.client("nix-store", "-r", "--dry-run", out).run(t)
		if dry.err != nil || !strings.Contains(dry.stderr, "will be fetched") || !strings.Contains(dry.stderr, dep) {
			t.Fatalf("%s: dry run does not list the closure as fetched:\n%s", c, dry)
		}
		// Caches turned off for one connection by a trusted client.
		if r := d.nixStoreRun(t, "-r", out, "--option", "substituters", ""); r.err == nil {
			t.Fatalf("%s: realised with substituters turned off:\n%s", c, r)
		}
		got := oneLine(t, "realise", d.nixStore(t, "-r", out))
		if got != out {
			t.Fatalf("%s: nix-store -r printed %q, want %q", c, got, out)
		}
		d.assertFixture(t, out, dep)
		narPath := narURL(t, cacheDir, out)
		if n := srv.Count(narPath); n != 1 {
			t.Errorf("%s: %d GETs of %s, want 1", c, n, narPath)
		}
	}
	d.verifyStopped(t)
}

func TestSubstituteDerivationOutputs(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "xz", "", "subst-drv")
	out, dep := outs[0], deps[0]
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))

	// The .drv files are instantiated into the daemon by real Nix; the
	// outputs come from the cache (one GET of the output's NAR), not from
	// a build.
	expr := filepath.Join(e.dir, "fixture.nix")
	args := []string{expr, "--argstr", "name", "subst-drv", "--argstr", "msg", e.nonce, "--arg", "bbdir", filepath.Join(e.dir, "bb")}
	drv := oneLine(t, "instantiate", d.client("nix-instantiate", args...).ok(t))
	if got := oneLine(t, "realise drv", d.nixStore(t, "-r", drv)); got != out {
		t.Fatalf("nix-store -r %s printed %q, want %q", drv, got, out)
	}
	d.assertFixture(t, out, dep)

	// nix-build of the same expression on a second daemon store: drv!out.
	e2 := newEnv(t)
	e2.nonce = e.nonce
	d2 := e2.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))
	got := oneLine(t, "nix-build", d2.client("nix-build", append(args, "--no-out-link")...).ok(t))
	if got != out {
		t.Fatalf("nix-build printed %q, want %q", got, out)
	}
	d2.assertFixture(t, out, dep)
	if n := srv.Count(narURL(t, cacheDir, out)); n != 2 {
		t.Errorf("%d GETs of %s's NAR, want 2 (one per daemon)", n, out)
	}
	d.verifyStopped(t)
	d2.verifyStopped(t)
}

// TestSubstituteFallback: when a cache has a derivation's output but its
// NAR is corrupt, nix-build fails, and with --fallback it builds the
// output instead.
func TestSubstituteFallback(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "none", "", "subst-fallback")
	out, dep := outs[0], deps[0]
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	srv.Always(narURL(t, cacheDir, out), cachetest.Fault{FlipByte: 100})
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))

	// nix-store -r of the path: the download's error once, then the
	// request's "build of … failed", as from nix-daemon.
	if r := d.client("nix-store", "-r", out).run(t); r.err == nil || strings.Count(r.stderr, "hash mismatch") != 1 ||
		!strings.Contains(r.stderr, "error: build of '"+out+"' failed") {
		t.Errorf("nix-store -r of a path whose NAR is corrupt: want its error once, then the request's:\n%s", r)
	}
	// nix build of it: the download's error once, in Nix's words (no
	// names of nixyard's packages), not repeated by the request's.
	if r := d.client("nix", "build", "--no-link", out).run(t); r.err == nil ||
		strings.Count(r.stderr, "hash mismatch importing path '"+out+"'") != 1 || strings.Contains(r.stderr, "store:") {
		t.Errorf("nix build of a path whose NAR is corrupt: want its error once, in Nix's words:\n%s", r)
	}
	args := append([]string{"--no-out-link"}, e.fixtureArgs(t, "subst-fallback")...)
	if r := d.client("nix-build", args...).run(t); r.err == nil {
		t.Fatalf("nix-build succeeded with a corrupt NAR in the cache and no --fallback:\n%s", r)
	} else if strings.Count(r.stderr, "hash mismatch") != 1 || !strings.Contains(r.stderr, "try '--fallback' to build derivation from source") || strings.Contains(r.stderr, "store:") {
		t.Errorf("nix-build of a derivation whose output's NAR is corrupt: want the download's error once, then Nix's advice:\n%s", r)
	}
	if d.isValid(t, out) {
		t.Fatalf("%s is valid after a failed substitution", out)
	}
	before := srv.Count(narURL(t, cacheDir, out))
	r := d.client("nix-build", append(args, "--fallback")...).run(t)
	if r.err != nil {
		t.Fatalf("nix-build --fallback failed:\n%s", r)
	}
	// One failed download, then the build: not another try per layer.
	if n := srv.Count(narURL(t, cacheDir, out)) - before; n != 1 || strings.Count(r.stderr, "hash mismatch") != 1 {
		t.Errorf("nix-build --fallback fetched the corrupt NAR %d times:\n%s", n, r)
	}
	if got := strings.TrimSpace(r.stdout); got != out {
		t.Fatalf("nix-build --fallback printed %q, want %q", got, out)
	}
	// The client hears why it builds what a cache has, before it hears
	// of the build.
	mismatch, building := strings.Index(r.stderr, "hash mismatch"), strings.Index(r.stderr, "building '")
	if mismatch < 0 || building < 0 || mismatch > building {
		t.Errorf("nix-build --fallback does not say why the substitution failed before it builds:\n%s", r)
	}
	d.assertFixture(t, out, dep)
	d.verifyStopped(t)
}

// TestSubstituteIncompleteClosure: a cache that has a derivation's output
// but not a path that output refers to (an input derivation's output) is
// no reason to fail: as with Nix (its retrySubstitution), the input is
// built, then the output fetched, once, rather than built.
func TestSubstituteIncompleteClosure(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "none", "", "subst-incomplete")
	out, dep := outs[0], deps[0]
	if err := os.Remove(filepath.Join(cacheDir, strings.TrimPrefix(dep, "/nix/store/")[:32]+".narinfo")); err != nil {
		t.Fatal(err)
	}
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))
	r := d.client("nix-build", append([]string{"--no-out-link"}, e.fixtureArgs(t, "subst-incomplete")...)...).run(t)
	if r.err != nil || strings.TrimSpace(r.stdout) != out {
		t.Fatalf("nix-build with an incomplete closure in the cache:\n%s", r)
	}
	if n := srv.Count(narURL(t, cacheDir, out)); n != 1 || !strings.Contains(r.stderr, "-subst-incomplete-dep.drv'...") || strings.Contains(r.stderr, "-subst-incomplete.drv'...") {
		t.Errorf("the NAR of the output whose closure the cache lacks was fetched %d times, want 1 after the input's build and no build of its own:\n%s", n, r)
	}
	d.assertFixture(t, out, dep)
}

// TestSubstituteDeadCacheWarns: with the only caches unreachable or not
// caches, `nix build` (which, unlike nix-build, does not ask QueryMissing
// first) builds, and the client hears which caches failed, as from
// nix-daemon; so does the next client, for which they are skipped.
func TestSubstituteDeadCacheWarns(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dead := deadURL(t)
	notCache := cachetest.New(t.TempDir()) // no nix-cache-info
	defer notCache.Close()
	d := e.startDaemon(t, withConf("substituters = "+dead+" "+notCache.URL, "require-sigs = false"))
	args := append([]string{"build", "--no-link", "-f"}, e.fixtureArgs(t, "dead-cache")...)
	// warned checks that each cache is named in warnings only (each line
	// of them a warning of its own), and, from nixyard, in one.
	warned := func(what string, r result) {
		t.Helper()
		for _, u := range []string{dead, notCache.URL} {
			var named []string
			for _, l := range strings.Split(r.stderr, "\n") {
				if strings.Contains(l, u) {
					named = append(named, l)
				}
			}
			bad := len(named) == 0 || !useStock && len(named) > 1
			for _, l := range named {
				bad = bad || !strings.HasPrefix(l, "warning: ")
			}
			if r.err != nil || bad {
				t.Errorf("%s: the cache %s is not named in a warning of its own:\n%s", what, u, r)
			}
		}
	}
	r := d.client("nix", args...).run(t)
	warned("nix build with the caches failing", r)
	// In Nix's words.
	if !strings.Contains(r.stderr, "unable to download '"+dead+"/nix-cache-info'") || strings.Contains(r.stderr, `Get "`) {
		t.Errorf("the dead cache's warning is not in Nix's words:\n%s", r)
	}
	// The next client, for which the caches are skipped without being
	// tried (nix-daemon tries them again for each connection), hears why too.
	out := oneLine(t, "nix-build", d.client("nix-build", append(e.fixtureArgs(t, "dead-cache"), "--no-out-link")...).ok(t))
	d.client("nix-store", "--delete", out).ok(t)
	warned("nix build, the caches skipped", d.client("nix", args...).run(t))
	d.verifyStopped(t)
}

// deadURL returns the URL of a port on 127.0.0.1 that nothing listens on
// (it was free a moment ago): connections to it are refused at once.
func deadURL(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "http://" + addr
}

func TestSubstituteSignatures(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	sec, pub := e.generateKey(t, "subst-good-1")
	_, wrongPub := e.generateKey(t, "subst-wrong-1")
	signed, unsigned := filepath.Join(e.dir, "signed"), filepath.Join(e.dir, "unsigned")
	out, dep := e.buildFixture(t, other, "subst-sig")
	e.fillCache(t, other, signed, "xz", sec, out)
	e.fillCache(t, other, unsigned, "xz", "", out)
	caFile := e.file(t, "ca.txt", "content-addressed "+e.nonce)
	ca := oneLine(t, "add", e.local(other, "nix-store", "--add", caFile).ok(t))
	e.fillCache(t, other, unsigned, "xz", "", ca)
	sSrv, uSrv := cachetest.New(signed), cachetest.New(unsigned)
	defer sSrv.Close()
	defer uSrv.Close()
	d := e.startDaemon(t, withConf("substituters = "+sSrv.URL+" "+uSrv.URL, "trusted-public-keys = "+pub))

	opt := func(subs, keys string) []string {
		return []string{"--option", "substituters", subs, "--option", "trusted-public-keys", keys}
	}
	// Wrong key: refused, nothing registered, nothing downloaded, and the
	// client told why, in nix-daemon's words.
	r := d.nixStoreRun(t, append([]string{"-r", out}, opt(sSrv.URL, wrongPub)...)...)
	if r.err == nil {
		t.Fatalf("substitution with the wrong key succeeded:\n%s", r)
	}
	if want := "warning: the substitute for '" + out + "' from '" + sSrv.URL + "' is not signed by any of the keys in 'trusted-public-keys'"; !strings.Contains(r.stderr, want) {
		t.Errorf("no warning %q:\n%s", want, r)
	}
	// Unsigned input-addressed paths: refused.
	if r := d.nixStoreRun(t, append([]string{"-r", out}, opt(uSrv.URL, pub)...)...); r.err == nil {
		t.Fatalf("unsigned substitution succeeded:\n%s", r)
	}
	if d.isValid(t, out) || d.isValid(t, dep) {
		t.Fatalf("an untrusted path was registered")
	}
	if n := sSrv.Count(narURL(t, signed, out)) + uSrv.Count(narURL(t, unsigned, out)); n != 0 {
		t.Errorf("the NAR of an untrusted path was downloaded %d times", n)
	}
	// Unsigned but content-addressed: accepted.
	if got := oneLine(t, "ca", d.nixStore(t, append([]string{"-r", ca}, opt(uSrv.URL, pub)...)...)); got != ca {
		t.Fatalf("realised %q, want %q", got, ca)
	}
	// Positive control: the right key (the daemon's own settings).
	d.nixStore(t, "-r", out)
	d.assertFixture(t, out, dep)
	d.verifyStopped(t)
}

func TestSubstitutePriorities(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	out, dep := e.buildFixture(t, other, "subst-prio")
	a, b := filepath.Join(e.dir, "a"), filepath.Join(e.dir, "b")
	e.fillCache(t, other, a, "xz", "", out)
	e.fillCache(t, other, b, "zstd", "", out)
	writeFile(t, filepath.Join(a, "nix-cache-info"), "StoreDir: /nix/store\nPriority: 60\n", 0o644)
	writeFile(t, filepath.Join(b, "nix-cache-info"), "StoreDir: /nix/store\nPriority: 20\n", 0o644)
	sa, sb := cachetest.New(a), cachetest.New(b)
	defer sa.Close()
	defer sb.Close()
	// a comes first in the list, but b's priority is better.
	d := e.startDaemon(t, withConf("substituters = "+sa.URL+" "+sb.URL, "require-sigs = false"))
	d.nixStore(t, "-r", out)
	d.assertFixture(t, out, dep)
	for _, p := range []string{out, dep} {
		if na, nb := sa.Count(narURL(t, a, p)), sb.Count(narURL(t, b, p)); na != 0 || nb != 1 {
			t.Errorf("%s: NAR fetched %d times from priority 60, %d from priority 20; want 0 and 1", p, na, nb)
		}
	}
	d.verifyStopped(t)

	// A cache that states no priority (as `nix copy --to file://` makes
	// one) has Nix's 0: it comes before b, though listed after it.
	c := filepath.Join(e.dir, "c")
	e.fillCache(t, other, c, "zstd", "", out)
	writeFile(t, filepath.Join(c, "nix-cache-info"), "StoreDir: /nix/store\n", 0o644)
	sc := cachetest.New(c)
	defer sc.Close()
	d2 := newEnv(t).startDaemon(t, withConf("substituters = "+sb.URL+" "+sc.URL, "require-sigs = false"))
	d2.nixStore(t, "-r", out)
	if nb, nc := sb.Count(narURL(t, b, out)), sc.Count(narURL(t, c, out)); nb != 1 || nc != 1 {
		t.Errorf("%s: NAR fetched %d more times from priority 20, %d from a cache with no priority; want 0 and 1", out, nb-1, nc)
	}
}

func TestSubstituteFaults(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	cacheDir := filepath.Join(e.dir, "cache")
	cases := []struct {
		name   string
		faults []cachetest.Fault
		always *cachetest.Fault
		remove bool // delete the NAR file from the cache
		// narSize, if set, is the NarSize the narinfo says (a cache's
		// wrong metadata), and says the error that names it.
		narSize string
		says    string
		fails   bool
	}{
		{name: "reset", faults: []cachetest.Fault{{ResetAfter: 64}}},
		{name: "5xx", faults: []cachetest.Fault{{Status: 500}, {Status: 502}, {Status: 503}}},
		{name: "429", faults: []cachetest.Fault{{Status: 429, RetryAfter: "1"}}},
		{name: "slow", faults: []cachetest.Fault{{Delay: 1500 * time.Millisecond}}},
		{name: "truncated", faults: []cachetest.Fault{{CutAfter: 100}}},
		// Cut by a proxy, with no length to tell it short (chunked).
		{name: "truncated-unmeasured", faults: []cachetest.Fault{{CutAfter: 100, Unmeasured: true}}},
		{name: "badhash", always: &cachetest.Fault{FlipByte: 120}, fails: true},
		{name: "nonar", remove: true, fails: true},
		{name: "narsize", narSize: "100", says: "size mismatch importing path", fails: true},
	}
	type fx struct{ out, dep string }
	fxs := map[string]fx{}
	for _, c := range cases {
		out, dep := e.buildFixture(t, other, "fault-"+c.name)
		e.fillCache(t, other, cacheDir, "none", "", out)
		fxs[c.name] = fx{out, dep}
	}
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	// A dead upstream first: everything must come from the live one.
	dead := deadURL(t)
	d := e.startDaemon(t, withConf("substituters = "+dead+" "+srv.URL, "require-sigs = false"))
	for _, c := range cases {
		f := fxs[c.name]
		nar := narURL(t, cacheDir, f.out)
		switch {
		case c.always != nil:
			srv.Always(nar, *c.always)
		case c.remove:
			if err := os.Remove(filepath.Join(cacheDir, nar)); err != nil {
				t.Fatal(err)
			}
		case c.narSize != "":
			ni := filepath.Join(cacheDir, filepath.Base(f.out)[:32]+".narinfo")
			b, err := os.ReadFile(ni)
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, ni, regexp.MustCompile(`(?m)^NarSize: \d+$`).ReplaceAllString(string(b), "NarSize: "+c.narSize), 0o644)
		default:
			srv.Inject(nar, c.faults...)
		}
		r := d.nixStoreRun(t, "-r", f.out)
		// One "copying path" however many tries the download takes (a
		// retry is nixyard's own; nix-daemon fails a broken transfer).
		if n := strings.Count(r.stderr, "copying path '"+f.out+"'"); n != 1 && !(useStock && !c.fails) {
			t.Errorf("%s: %d lines \"copying path '%s'\", want 1:\n%s", c.name, n, f.out, r)
		}
		if !c.fails {
			if r.err != nil {
				t.Fatalf("%s: substitution failed:\n%s", c.name, r)
			}
			d.assertFixture(t, f.out, f.dep)
			continue
		}
		if r.err == nil {
			t.Fatalf("%s: substitution succeeded:\n%s", c.name, r)
		}
		// The cache, and the NAR it lacks, are named (the daemon's log
		// names the NAR's URL in every case).
		if !strings.Contains(r.stderr, "'"+srv.URL+"'") || c.remove && !strings.Contains(r.stderr, "'"+nar+"'") {
			t.Errorf("%s: the error does not name the cache %s (and the NAR %s it lacks):\n%s", c.name, srv.URL, nar, r)
		}
		if !strings.Contains(r.stderr, c.says) {
			t.Errorf("%s: the error does not say %q:\n%s", c.name, c.says, r)
		}
		if d.isValid(t, f.out) {
			t.Errorf("%s: %s was registered", c.name, f.out)
		}
	}
	d.verifyStopped(t)
}

func TestSubstituteConcurrentClients(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	cacheDir := filepath.Join(e.dir, "cache")
	out, dep := e.buildFixture(t, other, "subst-many")
	e.fillCache(t, other, cacheDir, "xz", "", out)
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	// Make the downloads overlap: each NAR's first byte is late.
	for _, p := range []string{out, dep} {
		srv.Inject(narURL(t, cacheDir, p), cachetest.Fault{Delay: time.Second})
	}
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))
	const clients = 8
	var wg sync.WaitGroup
	results := make([]result, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := d.client("nix-store", "-r", out)
			// Each client has its own narinfo cache directory.
			c = c.withEnv(fmt.Sprintf("XDG_CACHE_HOME=%s", filepath.Join(e.dir, fmt.Sprintf("cache-%d", i))))
			results[i] = c.run(t)
		}()
	}
	wg.Wait()
	for i, r := range results {
		if r.err != nil || strings.TrimSpace(r.stdout) != out {
			t.Errorf("client %d:\n%s", i, r)
		}
	}
	d.assertFixture(t, out, dep)
	for _, p := range []string{out, dep} {
		nar := narURL(t, cacheDir, p)
		if n := srv.Count(nar); n != 1 {
			t.Errorf("%d GETs of %s, want exactly 1", n, nar)
		}
		info := filepath.Base(p)[:32] + ".narinfo"
		if n := srv.Count(info); n != 1 {
			t.Errorf("%d GETs of %s, want exactly 1", n, info)
		}
	}
	d.verifyStopped(t)
}

func TestSubstituteUntrustedClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	cacheDir := filepath.Join(e.dir, "cache")
	out, dep := e.buildFixture(t, other, "subst-untrusted")
	e.fillCache(t, other, cacheDir, "xz", "", out)
	good, bad := cachetest.New(cacheDir), cachetest.New(cacheDir)
	defer good.Close()
	defer bad.Close()
	d := e.startDaemon(t, withConf("trusted-substituters = "+good.URL, "require-sigs = false"))
	u := d.unprivileged(t)

	// A substituter the daemon does not trust is dropped with Nix's
	// warning, which leaves this connection without caches.
	r := d.client("nix-store", "-r", out, "--option", "substituters", bad.URL).as(u).run(t)
	if r.err == nil {
		t.Fatalf("an untrusted client substituted from an untrusted cache:\n%s", r)
	}
	if want := "ignoring untrusted substituter '" + bad.URL + "'"; !strings.Contains(r.stderr, want) {
		t.Errorf("no %q warning:\n%s", want, r)
	}
	if n := bad.Count(narURL(t, cacheDir, out)) + bad.Count(filepath.Base(out)[:32]+".narinfo"); n != 0 {
		t.Errorf("the untrusted cache got %d requests", n)
	}
	// A cache listed in trusted-substituters may be chosen.
	d.client("nix-store", "-r", out, "--option", "substituters", good.URL).as(u).ok(t)
	d.assertFixture(t, out, dep)
	d.verifyStopped(t)
}

// TestSubstituteActivities checks the activities a lookup sends, on the
// wire (the client prints them only in some commands): QueryMissing of a
// path a cache has shows, for it and its reference, Nix's QueryPathInfo
// activity ("querying info about '…' on '…'") and the narinfo's download.
func TestSubstituteActivities(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sec, pub := e.generateKey(t, "subst-test-1")
	cacheDir, outs, deps := e.cachedFixtures(t, "zstd", sec, "subst-activities")
	out, dep := outs[0], deps[0]
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "trusted-public-keys = "+pub))

	p := dialProto(t, d.sock)
	p.u64(40) // QueryMissing
	p.strs([]string{out})
	if err := p.flush(); err != nil {
		t.Fatal(err)
	}
	if err := p.readStderr(); err != nil {
		t.Fatalf("QueryMissing: %v", err)
	}
	const actFileTransfer, actQueryPathInfo = 101, 109
	find := func(text string) *protoActivity {
		for i := range p.acts {
			if p.acts[i].text == text {
				return &p.acts[i]
			}
		}
		t.Errorf("no activity %q; the daemon sent:\n%s", text, strings.Join(p.log, "\n"))
		return nil
	}
	find("querying info about missing paths") // Nix's queryMissing, at debug level
	// The cache is read for the first time: its nix-cache-info's download.
	if ci := find(fmt.Sprintf("downloading '%s/nix-cache-info'", srv.URL)); ci != nil && (ci.typ != actFileTransfer || ci.parent != 0) {
		t.Errorf("nix-cache-info download %+v; want a top-level activity of type %d", *ci, actFileTransfer)
	}
	for _, path := range []string{out, dep} {
		q := find(fmt.Sprintf("querying info about '%s' on '%s'", path, srv.URL))
		ft := find(fmt.Sprintf("downloading '%s/%s.narinfo'", srv.URL, filepath.Base(path)[:32]))
		if q == nil || ft == nil {
			continue
		}
		if q.typ != actQueryPathInfo || q.parent != 0 || ft.typ != actFileTransfer || ft.parent != q.id {
			t.Errorf("%s: QueryPathInfo activity %+v, narinfo download %+v; want types %d and %d, the download under the query",
				path, *q, *ft, actQueryPathInfo, actFileTransfer)
		}
		// nix-daemon's lookups end on its download thread, and the stop of
		// the last one can come after the op has ended.
		if !useStock && (!p.stopped[q.id] || !p.stopped[ft.id]) {
			t.Errorf("%s: activities %d and %d not both stopped by the end of QueryMissing", path, q.id, ft.id)
		}
	}
	for _, what := range []string{"willBuild", "willSubstitute", "unknown"} {
		p.mustStrings(t, what)
	}
	p.mustU64(t, "downloadSize")
	p.mustU64(t, "narSize")

	// Substituting: the NAR's download under "copying path", as Nix's
	// copyStorePath nests it.
	const actCopyPath = 100
	p.call(t, "EnsurePath", func() {
		p.u64(10) // EnsurePath
		p.str(out)
	})
	p.mustU64(t, "EnsurePath")
	cp := find(fmt.Sprintf("copying path '%s' from '%s'", out, srv.URL))
	var nar *protoActivity
	for i := range p.acts {
		if strings.HasPrefix(p.acts[i].text, "downloading '"+srv.URL+"/nar/") && p.acts[i].parent == cp.id {
			nar = &p.acts[i]
		}
	}
	if cp == nil || cp.typ != actCopyPath || nar == nil || nar.typ != actFileTransfer {
		t.Errorf("no NAR download under the copying path activity %+v; the daemon sent:\n%s", cp, strings.Join(p.log, "\n"))
	}
}

// TestKillDuringDownload kills the daemon (SIGKILL) while a NAR is half
// downloaded: nothing of the path is registered, real Nix finds the store
// consistent, and after a restart the same request fetches the path again
// and succeeds.
func TestKillDuringDownload(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	contents := string(randomBytes(t, 4<<20))
	blob := writeFile(t, filepath.Join(e.dir, "blob"), contents, 0o644)
	p := oneLine(t, "add", e.local(other, "nix-store", "--add", blob).ok(t))
	cacheDir := filepath.Join(e.dir, "cache")
	e.fillCache(t, other, cacheDir, "none", "", p) // content-addressed: no signature needed
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	narPath := narURL(t, cacheDir, p)
	stalled := make(chan struct{})
	srv.Inject(narPath, cachetest.Fault{StallAfter: 1 << 20, OnStall: func() { close(stalled) }})
	d := e.startDaemon(t, withConf("substituters = "+srv.URL))

	done := make(chan result, 1)
	go func() { done <- d.nixStoreRun(t, "-r", p) }()
	select {
	case <-stalled:
	case r := <-done:
		t.Fatalf("nix-store -r ended before the download stalled:\n%s", r)
	}
	d.crash(t)
	if r := <-done; r.err == nil {
		t.Fatalf("nix-store -r succeeded although the daemon was killed mid-download:\n%s", r)
	}

	if invalid := lines(d.local(d.root, "nix-store", "--check-validity", "--print-invalid", p).ok(t)); len(invalid) != 1 {
		t.Fatalf("%s is valid after the daemon was killed with 1 MiB of its 4 MiB downloaded", p)
	}
	assertVerifyClean(t, d.local(d.root, "nix-store", "--verify", "--check-contents").run(t))

	d.start(t)
	if got := oneLine(t, "realise", d.nixStore(t, "-r", p)); got != p {
		t.Fatalf("nix-store -r printed %q, want %q", got, p)
	}
	if n := srv.Count(narPath); n != 2 {
		t.Errorf("%d GETs of %s, want 2 (the stalled one, then a fresh one)", n, narPath)
	}
	d.verifyStopped(t)
	if b, err := os.ReadFile(d.realPath(p)); err != nil || string(b) != contents {
		t.Errorf("%s after the second download: %d bytes, %v; want the blob", p, len(b), err)
	}
}

// TestSubstituteLargeNARMemory substitutes a 128 MiB NAR of random
// bytes, uncompressed, and checks that the daemon's peak resident memory
// stays well below the NAR's size: the download is hashed and unpacked as
// it streams, never held whole.
func TestSubstituteLargeNARMemory(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("a property of nixyard's streaming; the stock daemon's memory is not under test")
	}
	const narMiB, maxRSSMiB = 128, 96
	e := newEnv(t)
	other := e.otherStore("src")
	big := writeFile(t, filepath.Join(e.dir, "random"), string(randomBytes(t, narMiB<<20)), 0o644)
	p := oneLine(t, "add", e.local(other, "nix-store", "--add", big).ok(t))
	cacheDir := filepath.Join(e.dir, "cache")
	e.fillCache(t, other, cacheDir, "none", "", p)
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL))

	if got := oneLine(t, "realise", d.nixStore(t, "-r", p)); got != p {
		t.Fatalf("nix-store -r printed %q, want %q", got, p)
	}
	var hwmKiB int64
	v := procStatus(t, fmt.Sprint(d.proc.Process.Pid), "VmHWM")
	if _, err := fmt.Sscanf(v, "%d kB", &hwmKiB); err != nil {
		t.Fatalf("VmHWM %q in /proc/%d/status: %v", v, d.proc.Process.Pid, err)
	}
	t.Logf("daemon peak RSS %d MiB for a %d MiB NAR", hwmKiB>>10, narMiB)
	if hwmKiB>>10 >= maxRSSMiB {
		t.Errorf("daemon peak RSS %d MiB substituting a %d MiB NAR; want < %d MiB", hwmKiB>>10, narMiB, maxRSSMiB)
	}
	d.verifyStopped(t)
}

// TestSubstituteParallel: one nix-store -r of 6 independent paths (Nix
// 2.8's client sends max-jobs 1, and the stock daemon then fetches one at a
// time) downloads them in parallel, up to max-substitution-jobs at once.
func TestSubstituteParallel(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("parallel substitution whatever max-jobs the client sends is nixyard's difference")
	}
	e := newEnv(t)
	other := e.otherStore("src")
	var files []string
	for i := range 6 {
		files = append(files, writeFile(t, filepath.Join(e.dir, "par", fmt.Sprintf("f%d", i)), fmt.Sprintf("%s %d", e.nonce, i), 0o644))
	}
	paths := lines(e.local(other, "nix-store", append([]string{"--add"}, files...)...).ok(t))
	cacheDir := filepath.Join(e.dir, "cache")
	e.fillCache(t, other, cacheDir, "none", "", paths...)
	for _, jobs := range []int{1, 3} {
		srv := cachetest.New(cacheDir)
		t.Cleanup(srv.Close)
		// Each NAR takes a second, so downloads that may overlap do.
		srv.Always("nar/*", cachetest.Fault{Delay: time.Second})
		d := newEnv(t).startDaemon(t, withConf("substituters = "+srv.URL, fmt.Sprintf("max-substitution-jobs = %d", jobs)))
		d.nixStore(t, append([]string{"-r"}, paths...)...)
		d.assertValid(t, "after nix-store -r", paths...)
		// At most jobs at once, and more than one when allowed (a
		// loaded machine may keep the third from overlapping).
		if n := srv.MaxConcurrentNARs(); n > jobs || n < min(jobs, 2) {
			t.Errorf("max-substitution-jobs = %d: %d NAR downloads at once, want %d", jobs, n, jobs)
		}
		d.stop(t)
	}
}

// TestSubstituteHTTPS substitutes from an https cache whose certificate
// authority is given by NIX_SSL_CERT_FILE (as Nix 2.8 takes it) or by
// nix.conf's ssl-cert-file (later Nix releases' setting; nixyard only);
// a daemon without either refuses the cache's certificate.
func TestSubstituteHTTPS(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "zstd", "", "subst-https")
	srv, err := cachetest.NewTLS(cacheDir)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ca := writeFile(t, filepath.Join(e.dir, "cache-ca.pem"), string(srv.CAPEM()), 0o644)

	conf := withConf("substituters = "+srv.URL, "require-sigs = false")
	d := e.startDaemon(t, conf, withDaemonEnv("NIX_SSL_CERT_FILE="+ca))
	if got := oneLine(t, "realise", d.nixStore(t, "-r", outs[0])); got != outs[0] {
		t.Fatalf("nix-store -r printed %q, want %q", got, outs[0])
	}
	d.assertFixture(t, outs[0], deps[0])
	d.verifyStopped(t)
	if !useStock {
		d2 := newEnv(t).startDaemon(t, conf, withConf("ssl-cert-file = "+ca))
		if got := oneLine(t, "realise", d2.nixStore(t, "-r", outs[0])); got != outs[0] {
			t.Fatalf("with ssl-cert-file: nix-store -r printed %q, want %q", got, outs[0])
		}
	}

	other := newEnv(t).startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))
	// The client hears why: a warning naming the certificate.
	r := other.nixStoreRun(t, "-r", outs[0])
	if r.err == nil {
		t.Fatalf("substituted from %s without trusting its certificate:\n%s", srv.URL, r)
	}
	if !strings.Contains(strings.ToLower(r.stderr), "certificate") {
		t.Errorf("the failure does not name the certificate:\n%s", r)
	}
	if other.isValid(t, outs[0]) {
		t.Errorf("%s valid although its cache's certificate is not trusted", outs[0])
	}
}

// TestSubstituteRepair: nix-store --verify --check-contents --repair
// fetches a modified path again from the cache and puts it back as it was;
// the store then verifies clean.
func TestSubstituteRepair(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "xz", "", "subst-repair")
	out, dep := outs[0], deps[0]
	d := e.startDaemon(t, withConf("substituters = file://"+cacheDir, "require-sigs = false"))
	d.nixStore(t, "-r", out)
	d.assertFixture(t, out, dep)

	// Someone writes into the store.
	f := d.realPath(out)
	if err := os.Chmod(f, 0o644); err != nil {
		t.Fatal(err)
	}
	writeFile(t, f, "tampered\n", 0o444)
	// And deletes a path that a valid path refers to.
	if err := os.Remove(d.realPath(dep)); err != nil {
		t.Fatal(err)
	}
	res := d.nixStoreRun(t, "--verify", "--check-contents")
	if res.err == nil || !strings.Contains(res.stderr, "was modified!") || !strings.Contains(res.stderr, "path '"+dep+"' disappeared, but it still has valid referrers!") {
		t.Fatalf("verify did not find the modified and the missing path:\n%s", res)
	}
	// Both are fetched again, each shown as Nix shows a download.
	res = d.nixStoreRun(t, "--verify", "--check-contents", "--repair")
	if res.err != nil {
		t.Fatalf("verify --repair:\n%s", res)
	}
	for _, p := range []string{out, dep} {
		if !strings.Contains(res.stderr, "copying path '"+p+"' from '") {
			t.Errorf("verify --repair does not show the download of %s:\n%s", p, res)
		}
	}
	d.assertFixture(t, out, dep)
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))

	// nix-store -r --repair (BuildPaths in repair mode) fetches a modified
	// path again; nix-build --repair does the same for a derivation's
	// outputs.
	tamper := func(p string) {
		t.Helper()
		f := d.realPath(p)
		if err := os.Chmod(f, 0o644); err != nil {
			t.Fatal(err)
		}
		writeFile(t, f, "tampered\n", 0o444)
	}
	tamper(out)
	if r := d.nixStoreRun(t, "-r", "--repair", out); r.err != nil || strings.TrimSpace(r.stdout) != out {
		t.Fatalf("nix-store -r --repair %s:\n%s", out, r)
	}
	d.assertFixture(t, out, dep)
	tamper(out)
	if r := d.client("nix-build", append([]string{"--repair", "--no-out-link"}, e.fixtureArgs(t, "subst-repair")...)...).run(t); r.err != nil || strings.TrimSpace(r.stdout) != out {
		t.Fatalf("nix-build --repair:\n%s", r)
	}
	d.assertFixture(t, out, dep)
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))

	// A modified path that no cache has cannot be repaired, and says so.
	orig := "only here " + e.nonce + "\n"
	added := oneLine(t, "add", d.nixStore(t, "--add", writeFile(t, filepath.Join(e.dir, "no-cache.txt"), orig, 0o644)))
	tamper(added)
	if r := d.nixStoreRun(t, "-r", "--repair", added); r.err == nil || !strings.Contains(r.stderr, added) {
		t.Errorf("nix-store -r --repair of a modified path no cache has:\n%s", r)
	}
	// Put it back by hand, so that the store verifies clean again.
	if err := os.Chmod(d.realPath(added), 0o644); err != nil {
		t.Fatal(err)
	}
	writeFile(t, d.realPath(added), orig, 0o444)
	d.verifyStopped(t)
}

// TestSubstituteAllowSubstitutes: a derivation with allowSubstitutes =
// false is built even when a cache has its output (nixpkgs sets it on
// trivial builders), as Nix does, whether asked for or needed as an input;
// others come from the cache.
func TestSubstituteAllowSubstitutes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	args := e.expr(t, "allowsubst", `rec {
  local = mk { name = "local-only"; allowSubstitutes = false; script = "echo local > $out"; };
  cached = mk { name = "cached"; script = "echo cached > $out"; };
  localInput = mk { name = "local-only-input"; allowSubstitutes = false; script = "echo local input > $out"; };
  top = mk { name = "top"; inherit localInput; script = "cat $localInput > $out"; };
}`)
	var cacheDir string
	outs := map[string]string{}
	for _, attr := range []string{"local", "cached", "localInput"} {
		outs[attr], cacheDir = e.buildIntoCache(t, args, attr, "none")
	}
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	b := e.startBuildDaemon(t, "substituters = "+srv.URL, "require-sigs = false")
	for attr, wantBuilt := range map[string]bool{"local": true, "cached": false} {
		r := b.nixBuild(append(args, "-A", attr, "--no-out-link")...).run(t)
		if r.err != nil || strings.TrimSpace(r.stdout) != outs[attr] {
			t.Fatalf("%s:\n%s", attr, r)
		}
		built := strings.Contains(r.stderr, "building '/nix/store/")
		gets := srv.Count(narURL(t, cacheDir, outs[attr]))
		if built != wantBuilt || (gets == 0) != wantBuilt {
			t.Errorf("%s: built %v with %d GETs of its NAR, want built %v:\n%s", attr, built, gets, wantBuilt, r)
		}
	}
	b.nixBuild(append(args, "-A", "top", "--no-out-link")...).ok(t)
	if n := srv.Count(narURL(t, cacheDir, outs["localInput"])); n != 0 {
		t.Errorf("the input with allowSubstitutes = false was substituted (%d GETs)", n)
	}
}

// TestSubstituteBuildInputs: building a derivation whose inputs a cache
// has fetches those inputs, each NAR once, instead of building them, as
// Nix does, with nix-build and with nix build; the fetches are shown
// before the build that needs them. With substitutes off they are built;
// with max-jobs 0 they are fetched and nothing is built.
func TestSubstituteBuildInputs(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	args := e.expr(t, "inputs", `rec {
  dep = mk { name = "cached-dep"; script = "echo dep > $out"; };
  mid = mk { name = "cached-mid"; inherit dep; script = "echo mid $dep > $out"; };
  top = mk { name = "top"; inherit mid; script = "echo top $mid > $out"; };
  multi = mk { name = "multi"; outputs = [ "out" "dev" ]; script = "echo out > $out; echo dev > $dev"; };
  usesDev = mk { name = "uses-dev"; dev = multi.dev; script = "echo uses $dev > $out"; };
}`)
	mid, cacheDir := e.buildIntoCache(t, args, "mid", "zstd")
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	midNAR := narURL(t, cacheDir, mid)
	// Each build goes to a daemon on an empty store of its own.
	fresh := func() *buildEnv {
		de := newEnv(t)
		de.nonce = e.nonce
		return de.startBuildDaemon(t, "substituters = "+srv.URL, "require-sigs = false")
	}

	for i, build := range []func(b *buildEnv) *command{
		func(b *buildEnv) *command { return b.nixBuild(append(args, "-A", "top", "--no-out-link")...) },
		func(b *buildEnv) *command {
			return b.client("nix", append([]string{"build", "-f"}, append(args, "top", "--no-link", "--json")...)...)
		},
	} {
		b := fresh()
		r := build(b).run(t)
		if r.err != nil {
			t.Fatalf("build %d:\n%s", i, r)
		}
		top := strings.TrimSpace(r.stdout)
		if m := regexp.MustCompile(`"out":"([^"]+)"`).FindStringSubmatch(top); m != nil {
			top = m[1] // nix build --json
		}
		if got, err := os.ReadFile(b.realPath(top)); err != nil || string(got) != "top "+mid+"\n" {
			t.Errorf("build %d: %s holds %q (%v)", i, top, got, err)
		}
		if regexp.MustCompile(`building '[^']*-cached-`).MatchString(r.stderr) {
			t.Errorf("build %d built an input that the cache has:\n%s", i, r)
		}
		fetched := strings.Index(r.stderr, "copying path '"+mid+"'")
		built := strings.Index(r.stderr, "-top.drv'...")
		if fetched < 0 || built < fetched {
			t.Errorf("build %d: want the input's fetch shown before the build:\n%s", i, r)
		}
		if n := srv.Count(midNAR); n != i+1 {
			t.Errorf("build %d: %d GETs of the input's NAR in all, want %d", i, n, i+1)
		}
		b.verifyStopped(t)
	}

	b := fresh()
	r := b.nixBuild(append(args, "-A", "top", "--no-out-link", "--option", "substitute", "false")...).run(t)
	if r.err != nil || !regexp.MustCompile(`building '[^']*-cached-mid\.drv'`).MatchString(r.stderr) {
		t.Errorf("with substitutes off, the input was not built:\n%s", r)
	}
	if n := srv.Count(midNAR); n != 2 {
		t.Errorf("with substitutes off: %d GETs of the input's NAR in all, want 2", n)
	}

	// An input derivation of which the build needs one output, which the
	// cache has without the others: that output is fetched, nothing built
	// but the top.
	dev, _ := e.buildIntoCache(t, args, "multi.dev", "zstd")
	b = fresh()
	r = b.nixBuild(append(args, "-A", "usesDev", "--no-out-link")...).run(t)
	if r.err != nil || strings.Contains(r.stderr, "-multi.drv'...") || !strings.Contains(r.stderr, "copying path '"+dev+"'") {
		t.Errorf("one cached output of an input derivation was not fetched, or the derivation was built:\n%s", r)
	}

	// max-jobs 0, the client's (-j0) or the daemon's: what the cache has
	// is fetched, and a request that needs a build fails as with Nix.
	for _, c := range []struct {
		name   string
		conf   []string
		jflags []string
	}{
		{"client -j0", nil, []string{"-j0"}},
		{"daemon max-jobs = 0", []string{"max-jobs = 0"}, nil},
	} {
		if useStock && c.conf != nil {
			continue // nix-daemon takes the client's max-jobs (1) over its own
		}
		de := newEnv(t)
		de.nonce = e.nonce
		b := de.startBuildDaemon(t, append([]string{"substituters = " + srv.URL, "require-sigs = false"}, c.conf...)...)
		if got := oneLine(t, "mid", b.nixBuild(append(append(args, "-A", "mid", "--no-out-link"), c.jflags...)...).ok(t)); got != mid {
			t.Errorf("%s: nix-build of a cached output printed %q, want %q", c.name, got, mid)
		}
		r := b.nixBuild(append(append(args, "-A", "top", "--no-out-link"), c.jflags...)...).run(t)
		if r.err == nil || !strings.Contains(r.stderr, "error: unable to start any build; either increase '--max-jobs' or enable remote builds.") || strings.Contains(r.stderr, "building '") {
			t.Errorf("%s: a build was needed:\n%s", c.name, r)
		}
	}
}

// TestSubstituteCheck: nix-build --check of a derivation whose output is
// not valid but in a cache substitutes it, then builds again and compares.
func TestSubstituteCheck(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	args := e.expr(t, "substcheck", `{ det = mk { name = "subst-check"; script = "echo same > $out"; }; }`)
	out, cacheDir := e.buildIntoCache(t, args, "det", "none")
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	b := e.startBuildDaemon(t, "substituters = "+srv.URL, "require-sigs = false")
	r := b.nixBuild(append(args, "-A", "det", "--no-out-link", "--check")...).run(t)
	if r.err != nil || !strings.Contains(r.stderr, "checking outputs of '") {
		t.Fatalf("nix-build --check:\n%s", r)
	}
	if n := srv.Count(narURL(t, cacheDir, out)); n != 1 || !b.isValid(t, out) {
		t.Errorf("%d GETs of the output's NAR, valid %v: want it substituted once", n, b.isValid(t, out))
	}
}

// TestRemoteBuilder: nixyard serves as a remote builder for Nix (a client
// with builders = ssh-ng://…, which sends BuildDerivation over --stdio):
// the derivations' outputs that its caches have are fetched there, as
// nix-daemon fetches them, the rest is built there, and the client gets
// the results back.
func TestRemoteBuilder(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	args := e.expr(t, "remote", `rec {
  dep = mk { name = "remote-cached"; script = "echo cached > $out"; };
  top = mk { name = "remote-top"; inherit dep; script = "echo top $dep > $out"; };
}`)
	dep, cacheDir := e.buildIntoCache(t, args, "dep", "zstd")
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	b := e.startBuildDaemon(t, "substituters = "+srv.URL, "require-sigs = false")
	client := filepath.Join(e.dir, "client")
	builders := "ssh-ng://localhost?remote-program=" + b.stdioWrapper(t)
	r := e.cmd("nix-build", append(args, "-A", "top", "--no-out-link", "--store", client, "-j0", "--builders", builders)...).run(t)
	if r.err != nil {
		t.Fatalf("nix-build with nixyard as its remote builder:\n%s", r)
	}
	top := strings.TrimSpace(r.stdout)
	if got, err := os.ReadFile(filepath.Join(client, top)); err != nil || string(got) != "top "+dep+"\n" {
		t.Errorf("%s holds %q in the client's store (%v)", top, got, err)
	}
	if !strings.Contains(r.stderr, "copying path '"+dep+"' from '"+srv.URL) || regexp.MustCompile(`building '[^']*-remote-cached\.drv'\.\.\.`).MatchString(r.stderr) {
		t.Errorf("the cached input was not fetched by the remote builder, or was built:\n%s", r)
	}
	if !strings.Contains(r.stderr, "-remote-top.drv'...") {
		t.Errorf("the remote builder did not build top:\n%s", r)
	}
	b.assertValid(t, "on the remote builder", dep, top)
}

// TestSubstituteNegativeTTL: a path an HTTP cache did not have stays "not
// there" for the narinfo cache's negative TTL, for every client, after
// the cache gets it (as with nix-daemon's narinfo disk cache), unless a
// trusted client's narinfo-cache-negative-ttl = 0 asks to look again; a
// file:// cache is read afresh each time, as Nix reads it.
func TestSubstituteNegativeTTL(t *testing.T) {
	t.Parallel()
	for _, viaHTTP := range []bool{true, false} {
		t.Run(fmt.Sprintf("http=%v", viaHTTP), func(t *testing.T) {
			e := newEnv(t)
			other := e.otherStore("src")
			cacheDir := filepath.Join(e.dir, "cache")
			first := oneLine(t, "add", e.local(other, "nix-store", "--add", e.file(t, "first", "in the cache from the start")).ok(t))
			later := oneLine(t, "add", e.local(other, "nix-store", "--add", e.file(t, "later", "pushed to the cache later")).ok(t))
			e.fillCache(t, other, cacheDir, "zstd", "", first)
			url := "file://" + cacheDir
			if viaHTTP {
				srv := cachetest.New(cacheDir)
				defer srv.Close()
				url = srv.URL
			}
			d := e.startDaemon(t)
			subst := func(p string, args ...string) *command {
				return d.client("nix-store", append([]string{"-r", p, "--option", "substituters", url}, args...)...)
			}
			// -v shows downloads; a file:// cache's files are read, as Nix
			// reads them, not downloaded. -vv says the substitution
			// succeeded.
			if r := subst(first, "-vv").run(t); r.err != nil || strings.Contains(r.stderr, "downloading 'file://") ||
				!strings.Contains(r.stderr, "substitution of path '"+first+"' succeeded") {
				t.Errorf("substituting from %s:\n%s", url, r)
			}
			subst(later).fails(t)
			e.fillCache(t, other, cacheDir, "zstd", "", later)
			if r := subst(later).run(t); (r.err == nil) == viaHTTP {
				t.Errorf("after the cache got the path (remembered miss wanted: %v):\n%s", viaHTTP, r)
			}
			if viaHTTP {
				r := subst(later, "--option", "narinfo-cache-negative-ttl", "0").run(t)
				if r.err != nil || strings.Contains(r.stderr, "ignoring the setting") {
					t.Errorf("with the client's negative TTL of 0:\n%s", r)
				}
			}
			if !d.isValid(t, later) {
				t.Errorf("%s is not valid after its substitution", later)
			}
		})
	}
}

// TestSubstituteWorkerProgress: a build request that substitutes counts
// the copies on the Worker's CopyPaths activity and the sizes on its
// Realise activity, as nix-daemon's Worker does: what `nix build`'s
// progress bar shows as "[1 copied (… MiB)]".
func TestSubstituteWorkerProgress(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sec, pub := e.generateKey(t, "subst-progress-1")
	cacheDir, outs, _ := e.cachedFixtures(t, "zstd", sec, "subst-progress")
	// A first cache that lacks one NAR: that path comes from the second,
	// and counts once, as done (Nix counts a path, not each try).
	broken := filepath.Join(e.dir, "broken-cache")
	e.cmd("cp", "-a", cacheDir, broken).ok(t)
	if err := os.Remove(filepath.Join(broken, narURL(t, broken, outs[0]))); err != nil {
		t.Fatal(err)
	}
	d := e.startDaemon(t, withConf("substituters = file://"+broken+" file://"+cacheDir, "trusted-public-keys = "+pub))
	stderr := d.client("nix-store", "-r", outs[0], "--log-format", "internal-json").run(t).stderr
	const actCopyPaths, actRealise, resProgress, resSetExpected = 103, 102, 105, 106
	var narBytes float64
	// The Worker sets the expected download, then NAR, bytes: the last is
	// the NAR's (activity type 100).
	if f := lastResult(stderr, actRealise, resSetExpected); len(f) == 2 && f[0].(float64) == 100 {
		narBytes = f[1].(float64)
	}
	if f := lastResult(stderr, actCopyPaths, resProgress); fmt.Sprint(f) != "[2 2 0 0]" || narBytes == 0 {
		t.Errorf("copies %v (want [2 2 0 0]: done, total, running, failed), NAR bytes expected %v (want > 0); the client got:\n%s", f, narBytes, stderr)
	}
	// The whole copy is expected from the first copy's start, as Nix's
	// Worker counts each substitution once it knows of it: the bar shows
	// "[1/0/2 copied]", not "[1/0/1 copied]" growing path by path.
	for _, e := range logEvents(stderr) {
		if e.Action == "result" && e.Type == resProgress && e.ActType == actCopyPaths && len(e.Fields) == 4 &&
			e.Fields[2].(float64) > 0 && e.Fields[1].(float64) != 2 {
			t.Errorf("copies %v while one runs (want 2 expected from the start); the client got:\n%s", e.Fields, stderr)
			break
		}
	}
}

// TestSubstituteFileCacheMadeLater: a file:// substituter whose directory
// is not there yet (nor its nix-cache-info) is an empty cache, not a
// broken one: once a path is copied there, it is substituted, as with
// nix-daemon (which makes the directory when it opens the cache).
func TestSubstituteFileCacheMadeLater(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	cacheDir := filepath.Join(e.dir, "later-cache")
	p := oneLine(t, "add", e.local(other, "nix-store", "--add", e.file(t, "later-file", "copied to the cache later")).ok(t))
	d := e.startDaemon(t, withConf("substituters = file://"+cacheDir))
	r := d.client("nix-store", "-r", p).run(t)
	if r.err == nil || strings.Contains(r.stderr, "does not appear to be a binary cache") {
		t.Errorf("before the cache has the path:\n%s", r)
	}
	e.local(other, "nix", "copy", "--to", "file://"+cacheDir, p).ok(t)
	d.client("nix-store", "-r", p).ok(t)
	if !d.isValid(t, p) {
		t.Errorf("%s is not valid after its substitution", p)
	}
}

// TestSubstituteFileCacheReadOnce: within one connection a file:// cache's
// narinfo is read once, as nix-daemon's per-connection store reads it:
// `nix-store -r -vv` shows one "querying info about" for the path (its
// QueryMissing), not one more for each step of the substitution. Another
// connection reads it afresh (TestSubstituteNegativeTTL).
func TestSubstituteFileCacheReadOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	cacheDir := filepath.Join(e.dir, "cache")
	p := oneLine(t, "add", e.local(other, "nix-store", "--add", e.file(t, "read-once", "one narinfo read")).ok(t))
	e.fillCache(t, other, cacheDir, "zstd", "", p)
	url := "file://" + cacheDir
	d := e.startDaemon(t, withConf("substituters = "+url, "require-sigs = false"))
	r := d.client("nix-store", "-r", p, "-vv").run(t)
	if n := strings.Count(r.stderr, fmt.Sprintf("querying info about '%s' on '%s'", p, url)); r.err != nil || n != 1 {
		t.Errorf("the narinfo was queried %d times, want 1:\n%s", n, r)
	}
}

// TestRealiseUnknownPaths: `nix-store -r` of paths that no cache has
// fails as with nix-daemon: the client's "don't know how to build these
// paths", then only "build of … failed", for one path as for several
// (Nix's substitution goal ends without an error of its own to log).
func TestRealiseUnknownPaths(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	missing := []string{randomStorePath(t, "unknown-a"), randomStorePath(t, "unknown-b")}
	for _, paths := range [][]string{missing[:1], missing} {
		stderr := d.client("nix-store", append([]string{"-r"}, paths...)...).fails(t)
		want := fmt.Sprintf("error: build of '%s' failed", strings.Join(slices.Sorted(slices.Values(paths)), "', '"))
		if !strings.Contains(stderr, want) || strings.Contains(stderr, "is required") {
			t.Errorf("nix-store -r %v: want %q and no other error:\n%s", paths, want, stderr)
		}
	}
}

// TestSubstituteNARGone: a cache that has a runtime dependency's narinfo
// but has lost its NAR is as one that never had it (Nix's
// SubstituteGone): the dependency, an input derivation, is built, with no
// need for --fallback, and the output then fetched.
func TestSubstituteNARGone(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "zstd", "", "subst-nar-gone")
	out, dep := outs[0], deps[0]
	if err := os.Remove(filepath.Join(cacheDir, narURL(t, cacheDir, dep))); err != nil {
		t.Fatal(err)
	}
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))
	r := d.client("nix-build", append([]string{"--no-out-link"}, e.fixtureArgs(t, "subst-nar-gone")...)...).run(t)
	if r.err != nil || strings.TrimSpace(r.stdout) != out || !strings.Contains(r.stderr, "-subst-nar-gone-dep.drv'...") ||
		strings.Contains(r.stderr, "-subst-nar-gone.drv'...") || !strings.Contains(r.stderr, "copying path '"+out+"'") {
		t.Errorf("want the dependency built and %s fetched:\n%s", out, r)
	}
	d.assertFixture(t, out, dep)
}

// TestSubstituteHoldsPresentReferences: while a path downloads, the part
// of its closure already in the store is held: a collection meanwhile
// (anyone's, or the size budget's) does not take it, which failed the
// substitution with "reference … is not valid" (nix-daemon's substitution
// goals root each path before they look at it).
func TestSubstituteHoldsPresentReferences(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "none", "", "subst-held")
	out, dep := outs[0], deps[0]
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false"))
	d.nixStore(t, "-r", dep)

	// out's download waits until the collection is over.
	if r := collectWhileDownloading(t, d, srv, narURL(t, cacheDir, out), d.client("nix-store", "-r", out)); r.err != nil {
		t.Errorf("nix-store -r, whose present reference a collection could take while it downloaded:\n%s", r)
	}
	if !d.isValid(t, out) || !d.isValid(t, dep) {
		t.Errorf("after the substitution: %s valid %v, %s valid %v", out, d.isValid(t, out), dep, d.isValid(t, dep))
	}
}

// TestDownloadSlotsPerClient: a client whose downloads hang (a slow cache
// edge) holds none of another client's: each client has its own
// max-substitution-jobs downloads, as with nix-daemon, whose every client
// has its own. (With one pool for the host, the other client waited until
// the hanging download ended.)
func TestDownloadSlotsPerClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "none", "", "slots-hung", "slots-other")
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "require-sigs = false", "max-substitution-jobs = 1"))
	held, release := make(chan struct{}), make(chan struct{})
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()
	srv.Inject(narURL(t, cacheDir, deps[0]), cachetest.Fault{Held: func() { close(held) }, Release: release})
	hung := make(chan result, 1)
	go func() { hung <- d.client("nix-store", "-r", outs[0]).run(t) }()
	select {
	case <-held:
	case r := <-hung:
		t.Fatalf("the first client ended before its download:\n%s", r)
	}
	other := make(chan result, 1)
	go func() { other <- d.client("nix-store", "-r", outs[1]).run(t) }()
	select {
	case r := <-other:
		if r.err != nil {
			t.Fatalf("the other client, while the first one's download hangs:\n%s", r)
		}
	case <-time.After(time.Minute):
		t.Fatal("the other client's substitution waited for the first one's hanging download")
	}
	close(release)
	if r := <-hung; r.err != nil {
		t.Errorf("the first client, once its download went on:\n%s", r)
	}
}
