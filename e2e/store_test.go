package e2e

import (
	"fmt"
	"io/fs"
	"os"
	osuser "os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestStorePing(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)

	// nix store ping prints to stderr.
	r := d.client("nix", "store", "ping").run(t)
	if r.err != nil {
		t.Fatalf("nix store ping failed:\n%s", r)
	}
	out := r.stdout + r.stderr
	if !strings.Contains(out, "Store URL: unix://"+d.sock) {
		t.Errorf("nix store ping: no 'Store URL: unix://%s' line:\n%s", d.sock, out)
	}
	version := regexp.MustCompile(`(?m)^Version: [0-9]+\.[0-9]+`)
	if !version.MatchString(out) {
		t.Errorf("nix store ping: no 'Version: N.N' line (the daemon's version string must start with a Nix version):\n%s", out)
	}

	// Several clients at once, each on its own connection.
	var wg sync.WaitGroup
	results := make([]result, 6)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = d.client("nix", "store", "ping").run(t)
		}()
	}
	wg.Wait()
	for _, r := range results {
		if r.err != nil || !version.MatchString(r.stdout+r.stderr) {
			t.Errorf("concurrent ping:\n%s", r)
		}
	}

	// The same daemon over stdio, as ssh-ng runs it.
	r = d.cmd("nix", "store", "ping", "--store", d.sshNG(t)).run(t)
	out = r.stdout + r.stderr
	if r.err != nil || !strings.Contains(out, "Store URL: ssh-ng://localhost") || !version.MatchString(out) {
		t.Errorf("nix store ping over ssh-ng (stdio daemon):\n%s", r)
	}
}

// addItems makes the files, executables, symlinks and directories that
// the add tests put into the store; keys are store names.
func addItems(t *testing.T, e *testEnv) map[string]string {
	t.Helper()
	in := filepath.Join(e.dir, "in")
	link := filepath.Join(in, "link-"+e.nonce)
	mustMkdir(t, in, 0o755)
	if err := os.Symlink("target/does-not-exist", link); err != nil {
		t.Fatal(err)
	}
	items := map[string]string{
		"hello.txt":        e.file(t, "in/hello.txt", "hello, world"),
		"run.sh":           writeFile(t, filepath.Join(in, "run.sh"), "#!/bin/sh\necho "+e.nonce+"\n", 0o755),
		"empty-" + e.nonce: writeFile(t, filepath.Join(in, "empty-"+e.nonce), "", 0o644),
		"big.bin":          writeFile(t, filepath.Join(in, "big.bin"), string(randomBytes(t, 3<<20)), 0o644),
		"link-" + e.nonce:  link,
		"tree": e.mkTree(t, "in/tree", tree{
			"a.txt":             "a",
			"bin/":              "",
			"bin/x":             "*#!/bin/sh\n",
			"sub/sub2/deep.txt": "deep",
			"sub/abs":           "->/etc/hostname",
			"l":                 "->a.txt",
			"emptydir/":         "",
			"Z-upper":           "sorted before lower case",
		}),
	}
	return items
}

// assertCanonical checks that the store object at real has the metadata
// Nix gives every store file: owned by root, mtime 1, read-only, and
// executable exactly when src is.
func assertCanonical(t *testing.T, real, src string) {
	t.Helper()
	err := filepath.WalkDir(real, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(real, p)
		var st, sst syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		if err := syscall.Lstat(filepath.Join(src, rel), &sst); err != nil {
			return fmt.Errorf("%s: no counterpart in the source: %w", p, err)
		}
		if st.Mode&syscall.S_IFMT != sst.Mode&syscall.S_IFMT {
			t.Errorf("%s: file type %o, source has %o", p, st.Mode&syscall.S_IFMT, sst.Mode&syscall.S_IFMT)
		}
		if st.Uid != 0 {
			t.Errorf("%s: owner uid %d, want 0", p, st.Uid)
		}
		if st.Mtim.Sec != 1 {
			t.Errorf("%s: mtime %d, want 1 (Nix canonicalises store timestamps)", p, st.Mtim.Sec)
		}
		perm := st.Mode & 0o7777
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			want := uint32(0o444)
			if sst.Mode&0o100 != 0 {
				want = 0o555
			}
			if perm != want {
				t.Errorf("%s: mode %o, want %o", p, perm, want)
			}
		case syscall.S_IFDIR:
			if perm != 0o555 {
				t.Errorf("%s: mode %o, want 555", p, perm)
			}
		case syscall.S_IFLNK:
			got, _ := os.Readlink(p)
			want, _ := os.Readlink(filepath.Join(src, rel))
			if got != want {
				t.Errorf("%s: symlink to %q, want %q", p, got, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Errorf("walking %s: %v", real, err)
	}
}

func TestAddToStore(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	other := d.otherStore("other")
	for name, src := range addItems(t, d.testEnv) {
		t.Run(name, func(t *testing.T) {
			got := oneLine(t, "nix-store --add", d.nixStore(t, "--add", src))
			want := oneLine(t, "nix-store --add (real Nix, local store)", d.local(other, "nix-store", "--add", src).ok(t))
			if got != want {
				t.Fatalf("nix-store --add %s through the daemon gave %s; real Nix gives %s", src, got, want)
			}
			narHash := d.nixHashPath(t, "sha256", src)
			fixed := oneLine(t, "print-fixed-path", d.cmd("nix-store", "--print-fixed-path", "--recursive", "sha256", narHash, name).ok(t))
			if got != fixed {
				t.Errorf("added path %s, but nix-store --print-fixed-path --recursive sha256 %s %s = %s", got, narHash, name, fixed)
			}
			if again := oneLine(t, "second --add", d.nixStore(t, "--add", src)); again != got {
				t.Errorf("adding %s again gave %s, first time %s", src, again, got)
			}

			// What is on disk is what was added, as real Nix hashes it.
			if h := d.nixHashPath(t, "sha256", d.realPath(got)); h != narHash {
				t.Errorf("NAR hash of %s on disk is %s, of the source %s", d.realPath(got), h, narHash)
			}
			assertCanonical(t, d.realPath(got), src)

			// The daemon's metadata agrees.
			if h := oneLine(t, "-q --hash", d.nixStore(t, "-q", "--hash", got)); h != "sha256:"+narHash {
				t.Errorf("nix-store -q --hash %s = %s, want sha256:%s", got, h, narHash)
			}
			narSize := len(d.cmd("nix-store", "--dump", src).ok(t))
			if s := oneLine(t, "-q --size", d.nixStore(t, "-q", "--size", got)); s != fmt.Sprint(narSize) {
				t.Errorf("nix-store -q --size %s = %s, want %d", got, s, narSize)
			}
			info := parsePathInfos(t, "path-info", d.nix(t, "path-info", "--json", got))[got]
			if info.CA != "fixed:r:sha256:"+narHash {
				t.Errorf("path-info ca = %q, want fixed:r:sha256:%s", info.CA, narHash)
			}
			if len(info.References) != 0 || info.Deriver != "" {
				t.Errorf("path-info: references %q, deriver %q; want none", info.References, info.Deriver)
			}
		})
	}
}

func TestAddFixed(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	other := d.otherStore("other")
	file := d.file(t, "in/data.txt", "fixed-output data")
	exe := writeFile(t, filepath.Join(d.dir, "in/tool"), "#!/bin/sh\n"+d.nonce+"\n", 0o755)
	dir := d.mkTree(t, "in/dir", tree{"f": "f", "x": "*x", "s/": "", "s/l": "->../f"})
	for _, c := range []struct {
		algo      string
		recursive bool
		src       string
	}{
		{"sha256", false, file},
		{"sha1", false, file},
		{"md5", false, file},
		{"sha512", false, file},
		{"sha256", false, exe},
		{"sha256", true, dir},
		{"sha1", true, dir},
		{"sha512", true, exe},
		{"sha256", true, file},
	} {
		name := filepath.Base(c.src)
		mode := "flat"
		args := []string{"--add-fixed"}
		if c.recursive {
			mode = "recursive"
			args = append(args, "--recursive")
		}
		args = append(args, c.algo, c.src)
		t.Run(fmt.Sprintf("%s-%s-%s", mode, c.algo, name), func(t *testing.T) {
			got := oneLine(t, "nix-store --add-fixed", d.nixStore(t, args...))
			want := oneLine(t, "real Nix", d.local(other, "nix-store", args...).ok(t))
			if got != want {
				t.Fatalf("nix-store %s through the daemon gave %s; real Nix gives %s", strings.Join(args, " "), got, want)
			}
			var hash string
			pfArgs := []string{"--print-fixed-path"}
			if c.recursive {
				hash = d.nixHashPath(t, c.algo, c.src)
				pfArgs = append(pfArgs, "--recursive")
			} else {
				hash = d.nixHashFile(t, c.algo, c.src)
			}
			fixed := oneLine(t, "print-fixed-path", d.cmd("nix-store", append(pfArgs, c.algo, hash, name)...).ok(t))
			if got != fixed {
				t.Errorf("added %s, print-fixed-path says %s", got, fixed)
			}
			info := parsePathInfos(t, "path-info", d.nix(t, "path-info", "--json", got))[got]
			wantCA := "fixed:" + c.algo + ":" + hash
			if c.recursive {
				wantCA = "fixed:r:" + c.algo + ":" + hash
			}
			if info.CA != wantCA {
				t.Errorf("path-info ca = %q, want %q", info.CA, wantCA)
			}
			if h := oneLine(t, "-q --hash", d.nixStore(t, "-q", "--hash", got)); h != "sha256:"+d.nixHashPath(t, "sha256", c.src) {
				t.Errorf("nix-store -q --hash %s = %s, want the sha256 NAR hash of %s", got, h, c.src)
			}
			assertCanonical(t, d.realPath(got), c.src)
		})
	}
}

func TestQueries(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	other := d.otherStore("other")
	out, dep := d.buildFixture(t, other, "q")
	d.cmd("nix", "copy", "--no-check-sigs", "--from", directStore(other), "--to", d.url(), out).ok(t)

	// Each query through the daemon answers what real Nix answers on the
	// store the paths came from.
	for _, q := range [][]string{
		{"-q", "--references", out},
		{"-q", "--referrers", dep},
		{"-q", "--deriver", out},
		{"-q", "--deriver", dep},
		{"-q", "--hash", out},
		{"-q", "--size", out},
		{"-q", "--tree", out},
		{"-q", "--requisites", out},
		{"-q", "--graph", out},
		{"--check-validity", "--print-invalid", out, dep},
	} {
		got := d.nixStore(t, q...)
		want := d.local(other, "nix-store", q...).ok(t)
		if strings.Join(sortedLines(got), "\n") != strings.Join(sortedLines(want), "\n") {
			t.Errorf("nix-store %s: daemon says\n%s\nreal Nix on the source store says\n%s", strings.Join(q, " "), got, want)
		}
	}
	if drv := oneLine(t, "deriver", d.nixStore(t, "-q", "--deriver", out)); !strings.HasSuffix(drv, "-q.drv") {
		t.Errorf("deriver of %s = %s, want the .drv it was built from", out, drv)
	}
	assertSameClosure(t, "nix path-info -r --json (daemon vs source store)",
		parsePathInfos(t, "source", d.local(other, "nix", "path-info", "-r", "--json", out).ok(t)),
		parsePathInfos(t, "daemon", d.nix(t, "path-info", "-r", "--json", out)))

	// Text paths with references, added through the daemon by the evaluator.
	depFile := d.file(t, "dep.txt", "a dependency")
	top := strings.TrimSpace(d.nix(t, "eval", "--impure", "--raw", "--expr",
		fmt.Sprintf(`builtins.toFile "top-%s" "dep: ${%s}"`, d.nonce, depFile)))
	infos := parsePathInfos(t, "path-info -r --json", d.nix(t, "path-info", "-r", "--json", top))
	if len(infos) != 2 {
		t.Fatalf("closure of %s: want 2 paths, got %v", top, keys(infos))
	}
	ti := infos[top]
	if len(ti.References) != 1 {
		t.Fatalf("%s: references %q, want one", top, ti.References)
	}
	depPath := ti.References[0]
	if !strings.HasPrefix(ti.CA, "text:sha256:") {
		t.Errorf("%s: ca %q, want text:sha256:…", top, ti.CA)
	}
	if want := "fixed:r:sha256:" + d.nixHashPath(t, "sha256", depFile); infos[depPath].CA != want {
		t.Errorf("%s: ca %q, want %q", depPath, infos[depPath].CA, want)
	}
	if b, err := os.ReadFile(d.realPath(top)); err != nil || string(b) != "dep: "+depPath {
		t.Errorf("contents of %s: %q, %v; want %q", top, b, err, "dep: "+depPath)
	}
	if got := lines(d.nixStore(t, "-q", "--referrers", depPath)); len(got) != 1 || got[0] != top {
		t.Errorf("referrers of %s = %q, want [%s]", depPath, got, top)
	}
	if got := oneLine(t, "deriver", d.nixStore(t, "-q", "--deriver", top)); got != "unknown-deriver" {
		t.Errorf("deriver of %s = %s, want unknown-deriver", top, got)
	}
	wantTree := top + "\n└───" + depPath + "\n"
	if got := d.nixStore(t, "-q", "--tree", top); got != wantTree {
		t.Errorf("nix-store -q --tree %s:\n%s\nwant\n%s", top, got, wantTree)
	}

	// Paths the daemon does not have.
	missing := randomStorePath(t, "missing")
	if stderr := d.nixFails(t, "path-info", missing); !strings.Contains(stderr, "is not valid") {
		t.Errorf("nix path-info of a missing path: stderr does not say it is not valid:\n%s", stderr)
	}
	if stderr := d.nixStoreFails(t, "-q", "--references", missing); !strings.Contains(stderr, "is not valid") {
		t.Errorf("nix-store -q --references of a missing path: stderr does not say it is not valid:\n%s", stderr)
	}
	if got := oneLine(t, "print-invalid", d.nixStore(t, "--check-validity", "--print-invalid", out, missing)); got != missing {
		t.Errorf("nix-store --check-validity --print-invalid: %q, want %s", got, missing)
	}
}

// TestStoreDirShared: a daemon running as root with a build-users-group
// gives the store directory to root and that group, mode 01775, as Nix
// does each time it opens the store (builds outside the sandbox make
// their outputs there as build users).
func TestStoreDirShared(t *testing.T) {
	t.Parallel()
	g, err := osuser.LookupGroup("nixbld")
	if err != nil {
		t.Skipf("no nixbld group here: %v", err)
	}
	d := startDaemon(t, withConf("build-users-group = nixbld"))
	d.client("nix", "store", "ping").ok(t) // nix-daemon opens the store per connection
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(d.root, "nix/store"), &st); err != nil {
		t.Fatal(err)
	}
	if gid := strconv.Itoa(int(st.Gid)); st.Uid != 0 || gid != g.Gid || st.Mode&^unix.S_IFMT != 0o1775 {
		t.Errorf("the store directory is %o uid %d gid %s, want 1775 root:nixbld (gid %s)", st.Mode&^unix.S_IFMT, st.Uid, gid, g.Gid)
	}
}
