package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// Derivations with builtin builders (builtin:buildenv, builtin:fetchurl,
// builtin:unpack-channel), which Nix runs inside its own process and
// nix-env, <nix/fetchurl.nix> and nix-channel depend on.

// skipStockBuiltins skips a test of builtin builders against the
// reference daemon: Nix 2.8 runs them outside a chroot store's sandbox,
// and writes their outputs under the logical store directory, which is
// the machine's own /nix/store.
func skipStockBuiltins(t *testing.T) {
	if useStock {
		t.Skip("nix-daemon 2.8 writes builtin builders' outputs to the machine's /nix/store, not the test's chroot store")
	}
}

// profileTree lists the tree at dir (a profile in the daemon's chroot):
// "name/" for a directory, "name -> target" for a symlink, "name" for
// anything else, sorted. Targets have the store paths in names replaced
// by their keys.
func profileTree(t *testing.T, dir string, names map[string]string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case rel == ".":
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			for sp, name := range names {
				target = strings.ReplaceAll(target, sp, name)
			}
			out = append(out, rel+" -> "+target)
		case d.IsDir():
			out = append(out, rel+"/")
		default:
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// TestBuiltinBuildenv: nix-env -i builds a user environment
// (builtin:buildenv) through the daemon. Three packages whose directories
// merge, a collision that priorities settle, a package propagated by
// another, a symlink into another store path, a dangling symlink, the
// files that never go into profiles; then a collision of equal
// priorities, which must fail.
func TestBuiltinBuildenv(t *testing.T) {
	t.Parallel()
	skipStockBuiltins(t)
	b := startBuildDaemon(t)
	args := b.expr(t, "pkgs", `rec {
  c = mk { name = "c"; script = "mkdir -p $out/bin $out/share/doc/c; echo c > $out/bin/c; echo c > $out/share/doc/c/README"; };
  a = mk { name = "a"; inherit c; script = ''
    mkdir -p $out/bin $out/share/doc/a $out/share/doc-c $out/nix-support
    echo a > $out/bin/a; echo A > $out/bin/same; echo a > $out/share/doc/a/README
    echo a > $out/share/doc-c/from-a; echo > $out/share/.hidden; echo > $out/log
    echo $c > $out/nix-support/propagated-user-env-packages
  ''; };
  b = (mk { name = "b"; inherit c; script = ''
    mkdir -p $out/bin $out/share/doc/b
    echo b > $out/bin/b; echo B > $out/bin/same; echo b > $out/share/doc/b/README
    ln -s $c/share/doc $out/share/doc-c; ln -s /nowhere $out/bin/dangling
  ''; }) // { meta.priority = 4; };
  d = mk { name = "d"; script = "mkdir -p $out/bin; echo D > $out/bin/same"; };
}`)
	outs := map[string]string{}
	for _, attr := range []string{"a", "b", "c"} {
		outs[attr] = oneLine(t, attr, b.nixBuild(append(args, "-A", attr, "--no-out-link")...).ok(t))
	}
	names := map[string]string{outs["a"]: "A", outs["b"]: "B", outs["c"]: "C"}

	profile := filepath.Join(b.dir, "profile")
	res := b.client("nix-env", append([]string{"-p", profile, "-f"}, append(args, "-iA", "a", "b")...)...).run(t)
	if res.err != nil {
		t.Fatalf("nix-env -i: %v\n%s", res.err, res.stderr)
	}
	if !strings.Contains(res.stderr, "skipping dangling symlink") {
		t.Errorf("no warning about the dangling symlink:\n%s", res.stderr)
	}
	env, err := os.Readlink(profile + "-1-link")
	if err != nil {
		t.Fatal(err)
	}
	got := profileTree(t, b.realPath(env), names)
	want := []string{
		"bin/",
		"bin/a -> A/bin/a",
		"bin/b -> B/bin/b",
		"bin/c -> C/bin/c",
		"bin/same -> B/bin/same",
		"manifest.nix -> " + "MANIFEST",
		"share/",
		"share/doc-c/",
		"share/doc-c/c -> C/share/doc/c",
		"share/doc-c/from-a -> A/share/doc-c/from-a",
		"share/doc/",
		"share/doc/a -> A/share/doc/a",
		"share/doc/b -> B/share/doc/b",
		"share/doc/c -> C/share/doc/c",
	}
	for i, l := range got {
		if strings.HasPrefix(l, "manifest.nix -> /nix/store/") && strings.HasSuffix(l, "-env-manifest.nix") {
			got[i] = "manifest.nix -> MANIFEST"
		}
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("user environment:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// The environment is a valid path whose contents Nix can verify.
	if !b.isValid(t, env) {
		t.Errorf("%s is not valid", env)
	}
	b.nixStore(t, "--verify-path", env)

	// d's bin/same collides with a's at the same priority. (Both in one
	// command: with a chroot store, nix-env cannot read the installed
	// packages back from the profile on the host.)
	stderr := b.client("nix-env", append([]string{"-p", profile + "-2", "-f"}, append(args, "-iA", "a", "d")...)...).fails(t)
	for _, w := range []string{"have the same priority 5", "nix-env --set-flag priority", "user-environment.drv"} {
		if !strings.Contains(stderr, w) {
			t.Errorf("collision: stderr lacks %q:\n%s", w, stderr)
		}
	}
	// Nothing of the failed environment is left in the store (Nix builds
	// it in a sandbox).
	ents, _ := os.ReadDir(filepath.Join(b.root, "nix/store"))
	for _, ent := range ents {
		p := filepath.Join("/nix/store", ent.Name())
		if strings.HasSuffix(ent.Name(), "-user-environment") && ent.IsDir() && !b.isValid(t, p) {
			t.Errorf("the failed build left %s in the store", p)
		}
	}
}

// TestBuiltinFetchurl: <nix/fetchurl.nix> downloads through the daemon
// from an HTTP server of the test, as a file, an executable file and a
// NAR to unpack, from a hashed mirror and with a netrc login; a missing
// file (on no mirror either), a download that stalls past the build's
// timeout and a wrong hash fail.
func TestBuiltinFetchurl(t *testing.T) {
	t.Parallel()
	skipStockBuiltins(t)
	e := newEnv(t)
	content := []byte("fetched " + e.nonce + "\n")
	sum := sha256.Sum256(content)
	// A NAR of a directory with one file, as nix-store --dump writes it.
	narDir := e.mkTree(t, "nar-src", tree{"hello": "hello\n"})
	// executable = true makes the hash the NAR hash of an executable file.
	exeFile := writeFile(t, filepath.Join(e.dir, "exe"), string(content), 0o755)
	nar := []byte(e.cmd("nix-store", "--dump", narDir).ok(t))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/file", "/mirror/sha256/" + hex.EncodeToString(sum[:]):
			w.Write(content)
		case "/auth":
			if u, p, ok := r.BasicAuth(); !ok || u != "fetcher" || p != "secret" {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, "who are you", http.StatusUnauthorized)
				return
			}
			w.Write(content)
		case "/dir.nar":
			w.Write(nar)
		case "/stall":
			w.Write(content[:1])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	netrc := writeFile(t, filepath.Join(e.dir, "netrc"), "machine 127.0.0.1 login fetcher password secret\n", 0o600)
	b := e.startBuildDaemon(t, "hashed-mirrors = "+srv.URL+"/mirror", "netrc-file = "+netrc)
	sri := func(data []byte) string {
		sum := sha256.Sum256(data)
		return "sha256-" + base64.StdEncoding.EncodeToString(sum[:])
	}
	args := b.expr(t, "fetch", fmt.Sprintf(`let fetchurl = import <nix/fetchurl.nix>; in {
  file = fetchurl { url = "%[1]s/file"; hash = "%[2]s"; };
  mirrored = fetchurl { url = "%[1]s/gone"; hash = "%[2]s"; name = "mirrored"; };
  authed = fetchurl { url = "%[1]s/auth"; hash = "%[2]s"; name = "authed"; };
  exe = fetchurl { url = "%[1]s/file"; hash = "%[4]s"; executable = true; name = "exe"; };
  dir = fetchurl { url = "%[1]s/dir.nar"; hash = "%[3]s"; unpack = true; };
  missing = fetchurl { url = "%[1]s/missing"; hash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; };
  stall = fetchurl { url = "%[1]s/stall"; hash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; name = "stall"; };
  wrong = fetchurl { url = "%[1]s/file"; hash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; name = "wrong"; };
}`, srv.URL, sri(content), narHashSRI(t, b, narDir), narHashSRI(t, b, exeFile)))

	file := oneLine(t, "file", b.nixBuild(append(args, "-A", "file", "--no-out-link")...).ok(t))
	if got, err := os.ReadFile(b.realPath(file)); err != nil || !bytes.Equal(got, content) {
		t.Errorf("downloaded file %s: %q, %v", file, got, err)
	}
	// From the hashed mirror (the URL itself is gone), and with the
	// netrc-file's login.
	for _, attr := range []string{"mirrored", "authed"} {
		p := oneLine(t, attr, b.nixBuild(append(args, "-A", attr, "--no-out-link")...).ok(t))
		if got, err := os.ReadFile(b.realPath(p)); err != nil || !bytes.Equal(got, content) {
			t.Errorf("%s: downloaded %q, %v", attr, got, err)
		}
	}
	exe := oneLine(t, "exe", b.nixBuild(append(args, "-A", "exe", "--no-out-link")...).ok(t))
	if st, err := os.Stat(b.realPath(exe)); err != nil || st.Mode()&0o111 == 0 {
		t.Errorf("executable download %s: %v, %v", exe, st, err)
	}
	dir := oneLine(t, "dir", b.nixBuild(append(args, "-A", "dir", "--no-out-link")...).ok(t))
	if got, err := os.ReadFile(filepath.Join(b.realPath(dir), "hello")); err != nil || !strings.HasPrefix(string(got), "hello\n") {
		t.Errorf("unpacked NAR %s: %q, %v", dir, got, err)
	}
	for _, p := range []string{file, exe, dir} {
		b.nixStore(t, "--verify-path", p)
	}

	stderr := b.nixBuild(append(args, "-A", "missing", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "HTTP error 404 ('Not Found')") || !strings.Contains(stderr, srv.URL+"/missing") {
		t.Errorf("missing file: stderr:\n%s", stderr)
	}
	stderr = b.nixBuild(append(args, "-A", "stall", "--no-out-link", "--timeout", "1")...).fails(t)
	if !strings.Contains(stderr, "timed out after 1 seconds") {
		t.Errorf("stalled download with --timeout 1: stderr:\n%s", stderr)
	}
	stderr = b.nixBuild(append(args, "-A", "wrong", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "hash mismatch in fixed-output derivation") {
		t.Errorf("wrong hash: stderr:\n%s", stderr)
	}
}

// narHashSRI is the SRI sha256 of the NAR of path (a file outside the
// store), as nix hash path computes it.
func narHashSRI(t *testing.T, d *buildEnv, path string) string {
	t.Helper()
	return oneLine(t, "nix hash path", d.cmd("nix", "hash", "path", "--type", "sha256", path).ok(t))
}

// tarball returns a gzipped tar of entries, in order.
func tarball(t *testing.T, entries []tar.Header, contents map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for _, h := range entries {
		h := h
		body := contents[h.Name]
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if body != "" {
			tw.Write([]byte(body))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	zw.Close()
	return buf.Bytes()
}

// TestBuiltinUnpackChannel: builtin:unpack-channel, as nix-channel uses it
// (the derivation of Nix's unpack-channel.nix), unpacks a tarball and names
// its top directory after the channel; a tarball with an entry outside the
// output, or with two top-level entries, fails. (nix-channel itself cannot
// use a chroot store: it hands the tarball's real path to
// builtins.storePath.)
func TestBuiltinUnpackChannel(t *testing.T) {
	t.Parallel()
	skipStockBuiltins(t)
	b := startBuildDaemon(t)
	write := func(name string, data []byte) string {
		return writeFile(t, filepath.Join(b.dir, name), string(data), 0o644)
	}
	good := write("good.tar.gz", tarball(t, []tar.Header{
		{Name: "nixexprs-1/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "nixexprs-1/default.nix", Typeflag: tar.TypeReg},
		{Name: "nixexprs-1/lib/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "nixexprs-1/lib/run", Typeflag: tar.TypeReg, Mode: 0o755},
		{Name: "nixexprs-1/link", Typeflag: tar.TypeSymlink, Linkname: "default.nix"},
	}, map[string]string{"nixexprs-1/default.nix": "{ }: " + b.nonce + "\n", "nixexprs-1/lib/run": "#!/bin/sh\n"}))
	// A tarball whose top directory already has the channel's name.
	named := write("named.tar.gz", tarball(t, []tar.Header{
		{Name: "nixpkgs/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "nixpkgs/default.nix", Typeflag: tar.TypeReg},
	}, map[string]string{"nixpkgs/default.nix": "{ }: " + b.nonce + " named\n"}))
	two := write("two.tar.gz", tarball(t, []tar.Header{
		{Name: "a", Typeflag: tar.TypeReg}, {Name: "b", Typeflag: tar.TypeReg},
	}, map[string]string{"a": b.nonce, "b": "b"}))
	escape := write("escape.tar.gz", tarball(t, []tar.Header{
		{Name: "top/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "top/../../evil", Typeflag: tar.TypeReg},
	}, map[string]string{"top/../../evil": b.nonce}))
	args := b.expr(t, "channel", fmt.Sprintf(`let unpack = src: builtins.derivation {
    name = "channel"; builder = "builtin:unpack-channel"; system = "builtin";
    inherit src; channelName = "nixpkgs"; };
in { good = unpack %s; named = unpack %s; two = unpack %s; escape = unpack %s; }`, good, named, two, escape))

	out := oneLine(t, "good", b.nixBuild(append(args, "-A", "good", "--no-out-link")...).ok(t))
	got := profileTree(t, b.realPath(out), nil)
	want := []string{"nixpkgs/", "nixpkgs/default.nix", "nixpkgs/lib/", "nixpkgs/lib/run", "nixpkgs/link -> default.nix"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("unpacked channel:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if st, err := os.Stat(filepath.Join(b.realPath(out), "nixpkgs/lib/run")); err != nil || st.Mode()&0o111 == 0 {
		t.Errorf("executable file of the channel: %v, %v", st, err)
	}
	b.nixStore(t, "--verify-path", out)
	out = oneLine(t, "named", b.nixBuild(append(args, "-A", "named", "--no-out-link")...).ok(t))
	if got := profileTree(t, b.realPath(out), nil); strings.Join(got, " ") != "nixpkgs/ nixpkgs/default.nix" {
		t.Errorf("unpacked channel whose top directory has its name: %q", got)
	}

	stderr := b.nixBuild(append(args, "-A", "two", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "contains more than one file") {
		t.Errorf("two top-level entries: stderr:\n%s", stderr)
	}
	stderr = b.nixBuild(append(args, "-A", "escape", "--no-out-link")...).fails(t)
	if !strings.Contains(stderr, "channel.drv") || (!useStock && !strings.Contains(stderr, "would be unpacked outside the output")) {
		t.Errorf("escaping entry: stderr:\n%s", stderr)
	}
	// top/../../evil from the output <store>/<hash>-channel is <store>/evil.
	if _, err := os.Lstat(filepath.Join(b.root, "nix", "store", "evil")); err == nil {
		t.Errorf("the escaping entry was written outside the output")
	}
}

// TestBuiltinFetchurlSharedTimeout: a client's short --timeout does not
// stop a builtin:fetchurl download that another client, without one,
// waits for; both get the file (as TestBuildSharedTimeout for a builder).
func TestBuiltinFetchurlSharedTimeout(t *testing.T) {
	t.Parallel()
	skipStockBuiltins(t)
	e := newEnv(t)
	content := []byte("slowly fetched " + e.nonce + "\n")
	sum := sha256.Sum256(content)
	requested, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		once.Do(func() { close(requested) })
		select {
		case <-release:
			w.Write(content)
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	b := e.startBuildDaemon(t)
	args := b.expr(t, "fetchshared", fmt.Sprintf(`{ file = (import <nix/fetchurl.nix>) { url = "%s/file"; hash = "sha256-%s"; }; }`,
		srv.URL, base64.StdEncoding.EncodeToString(sum[:])))
	short := make(chan result, 1)
	go func() {
		short <- b.nixBuild(append(args, "-A", "file", "--no-out-link", "--option", "timeout", "2")...).run(t)
	}()
	<-requested
	long := make(chan result, 1)
	go func() { long <- b.nixBuild(append(args, "-A", "file", "--no-out-link")...).run(t) }()
	time.Sleep(4 * time.Second) // past the first client's timeout (the second had 2 s to join)
	close(release)
	for who, ch := range map[string]chan result{"with --timeout 2": short, "without": long} {
		if r := <-ch; r.err != nil {
			t.Errorf("the client %s:\n%s", who, r)
		}
	}
}
