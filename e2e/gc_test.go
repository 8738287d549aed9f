package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

// gcRoots parses "nix-store --gc --print-roots" output into link → target
// pairs.
func gcRoots(t *testing.T, out string) [][2]string {
	t.Helper()
	var roots [][2]string
	for _, l := range lines(out) {
		link, target, ok := strings.Cut(l, " -> ")
		if !ok {
			t.Fatalf("--print-roots line %q is not 'LINK -> PATH'", l)
		}
		roots = append(roots, [2]string{link, target})
	}
	return roots
}

// hasRoot reports whether roots holds target through a link accepted by
// linkOK.
func hasRoot(roots [][2]string, target string, linkOK func(string) bool) bool {
	for _, r := range roots {
		if r[1] == target && linkOK(r[0]) {
			return true
		}
	}
	return false
}

// assertValid checks that each path is valid and present on disk.
func (d *daemon) assertValid(t *testing.T, why string, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if !d.isValid(t, p) {
			t.Errorf("%s: %s is no longer valid", why, p)
		}
		if _, err := os.Lstat(d.realPath(p)); err != nil {
			t.Errorf("%s: %s is gone from disk: %v", why, p, err)
		}
	}
}

// assertGone checks that each path is invalid and deleted from disk.
func (d *daemon) assertGone(t *testing.T, why string, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if d.isValid(t, p) {
			t.Errorf("%s: %s is still valid", why, p)
		}
		if _, err := os.Lstat(d.realPath(p)); err == nil {
			t.Errorf("%s: %s is still on disk", why, p)
		}
	}
}

func TestGarbageCollection(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	add := func(name string) string {
		t.Helper()
		return oneLine(t, "nix-store --add", d.nixStore(t, "--add", d.file(t, "gc/"+name, name)))
	}

	// A text path referring to a source path: top keeps dep alive.
	depFile := d.file(t, "gc/dep", "dependency")
	top := strings.TrimSpace(d.nix(t, "eval", "--impure", "--raw", "--expr",
		fmt.Sprintf(`builtins.toFile "top-%s" "uses ${%s}"`, d.nonce, depFile)))
	dep := oneLine(t, "references", d.nixStore(t, "-q", "--references", top))
	profiled := add("profiled")
	linked := add("linked")
	temp := add("temp")
	dead := add("dead")
	var garbage []string
	for i := range 3 {
		garbage = append(garbage, add(fmt.Sprintf("garbage%d", i)))
	}

	// Roots: an indirect root (a result symlink outside the store), a
	// profile generation, a symlink in gcroots, and a temp root held by a
	// live connection.
	result := filepath.Join(d.dir, "result")
	if got := oneLine(t, "--add-root", d.nixStore(t, "--add-root", result, "--indirect", "-r", top)); got != result {
		t.Errorf("nix-store --add-root printed %q, want %q", got, result)
	}
	if target, err := os.Readlink(result); err != nil || target != top {
		t.Fatalf("result symlink: %q, %v; want a link to %s", target, err, top)
	}
	profile := filepath.Join(d.root, "nix/var/nix/profiles/e2e")
	d.client("nix-env", "-p", profile, "--set", profiled).ok(t)
	gcroots := filepath.Join(d.root, "nix/var/nix/gcroots")
	mustMkdir(t, gcroots, 0o755)
	if err := os.Symlink(linked, filepath.Join(gcroots, "e2e-link")); err != nil {
		t.Fatal(err)
	}
	holder := dialProto(t, d.sock)
	holder.addTempRoot(t, temp)

	roots := gcRoots(t, d.nixStore(t, "--gc", "--print-roots"))
	if !hasRoot(roots, top, func(l string) bool { return l == result }) {
		t.Errorf("--print-roots has no %s -> %s:\n%v", result, top, roots)
	}
	if !hasRoot(roots, profiled, func(l string) bool { return strings.HasPrefix(l, profile) }) {
		t.Errorf("--print-roots has no %s* -> %s:\n%v", profile, profiled, roots)
	}
	if !hasRoot(roots, linked, func(l string) bool { return l == filepath.Join(gcroots, "e2e-link") }) {
		t.Errorf("--print-roots has no gcroots/e2e-link -> %s:\n%v", linked, roots)
	}

	live := sortedLines(d.nixStore(t, "--gc", "--print-live"))
	deadList := sortedLines(d.nixStore(t, "--gc", "--print-dead"))
	for _, p := range []string{top, dep, profiled, linked, temp} {
		if !contains(live, p) {
			t.Errorf("--print-live lacks %s", p)
		}
		if contains(deadList, p) {
			t.Errorf("--print-dead lists live path %s", p)
		}
	}
	for _, p := range append([]string{dead}, garbage...) {
		if !contains(deadList, p) {
			t.Errorf("--print-dead lacks %s", p)
		}
		if contains(live, p) {
			t.Errorf("--print-live lists dead path %s", p)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// --delete refuses live paths (rooted, or referenced by a rooted one)
	// and deletes dead ones.
	for _, p := range []string{top, dep, profiled, linked, temp} {
		if stderr := d.nixStoreFails(t, "--delete", p); !strings.Contains(stderr, "alive") {
			t.Errorf("--delete %s: stderr does not say it is alive:\n%s", p, stderr)
		}
	}
	d.assertValid(t, "after refused --delete", top, dep, profiled, linked, temp)
	d.nixStore(t, "--delete", dead)
	d.assertGone(t, "after --delete", dead)

	// --max-freed 0 deletes nothing (Nix collects only while maxFreed > 0);
	// --max-freed 1 stops after the first deletion.
	d.nixStore(t, "--gc", "--max-freed", "0")
	d.assertValid(t, "after --gc --max-freed 0", garbage...)
	d.nixStore(t, "--gc", "--max-freed", "1")
	left := 0
	for _, g := range garbage {
		if d.isValid(t, g) {
			left++
		}
	}
	if left == 0 || left == len(garbage) {
		t.Errorf("after --gc --max-freed 1, %d of %d dead paths are left; want some deleted and some left", left, len(garbage))
	}

	// A full collection deletes the rest and keeps every root.
	d.nixStore(t, "--gc")
	d.assertGone(t, "after --gc", garbage...)
	d.assertValid(t, "after --gc", top, dep, profiled, linked, temp)

	// The temp root lives as long as its connection.
	holder.c.Close()
	waitFor(t, "the temp root of a closed connection to be released", func() bool {
		return contains(lines(d.nixStore(t, "--gc", "--print-dead")), temp)
	})
	d.nixStore(t, "--gc")
	d.assertGone(t, "after the temp root's connection closed", temp)

	// Removing the result symlink makes its indirect root stale: the
	// daemon removes the link when it next looks for roots, and says so
	// as nix-daemon does.
	if err := os.Remove(result); err != nil {
		t.Fatal(err)
	}
	if r := d.client("nix-store", "--gc", "--print-roots").run(t); r.err != nil || !strings.Contains(r.stderr, "removing stale link from '"+d.root+"/nix/var/nix/gcroots/auto/") || !strings.Contains(r.stderr, "' to '"+result+"'") {
		t.Errorf("--print-roots after removing %s: no word of the stale link:\n%s", result, r)
	}
	d.nixStore(t, "--gc")
	d.assertGone(t, "after removing the result symlink", top, dep)
	d.assertValid(t, "after removing the result symlink", profiled, linked)

	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
}

// waitFor polls cond until it holds, failing the test after a minute. It
// is for effects that follow an asynchronous event (a connection closing),
// not a timing assertion.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestVerifyStore(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	file := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "v/file.txt", "verify me")))
	dir := oneLine(t, "add", d.nixStore(t, "--add", d.mkTree(t, "v/dir", tree{"a": "a", "b/": "", "b/c": "*c"})))

	assertVerifyClean(t, d.nixStoreRun(t, "--verify"))
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
	// Its news are at info level, as Nix's: --quiet hides them; -v shows
	// each path it hashes.
	if r := d.nixStoreRun(t, "--verify", "--check-contents", "--quiet"); r.err != nil || strings.TrimSpace(r.stderr) != "" {
		t.Errorf("nix-store --verify --quiet on a clean store:\n%s", r)
	}
	if r := d.nixStoreRun(t, "--verify", "--check-contents", "-v"); r.err != nil || !strings.Contains(r.stderr, "checking contents of '"+file+"'") {
		t.Errorf("nix-store --verify -v does not name the paths it hashes:\n%s", r)
	}

	// Corrupt one file behind the daemon's back.
	victim := filepath.Join(d.realPath(dir), "b/c")
	if err := os.Chmod(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(victim, []byte("corrupted\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Without --check-contents, nothing is hashed.
	assertVerifyClean(t, d.nixStoreRun(t, "--verify"))
	r := d.nixStoreRun(t, "--verify", "--check-contents")
	if r.err == nil {
		t.Errorf("nix-store --verify --check-contents succeeded on a corrupted store:\n%s", r)
	}
	if !strings.Contains(r.stderr, dir) || !strings.Contains(r.stderr, "modified") {
		t.Errorf("nix-store --verify --check-contents does not report %s as modified:\n%s", dir, r)
	}
	if strings.Contains(r.stderr, file) {
		t.Errorf("nix-store --verify --check-contents reports the intact %s:\n%s", file, r)
	}
	// With --repair and no cache, in Nix's words: an error for the
	// modified path; a warning for a missing one that a valid path refers
	// to (a text path's reference here).
	top := strings.TrimSpace(d.nix(t, "eval", "--impure", "--raw", "--expr",
		fmt.Sprintf(`builtins.toFile "refers-%s" "uses ${%s}"`, d.nonce, d.file(t, "v/dep", "dep "+d.nonce))))
	dep := oneLine(t, "references", d.nixStore(t, "-q", "--references", top))
	if err := os.RemoveAll(d.realPath(dep)); err != nil {
		t.Fatal(err)
	}
	r = d.nixStoreRun(t, "--verify", "--check-contents", "--repair")
	for _, want := range []string{"error: cannot repair path '" + dir + "'\n", "warning: cannot repair path '" + dep + "'\n"} {
		if r.err == nil || !strings.Contains(r.stderr, want) {
			t.Errorf("nix-store --verify --check-contents --repair without a cache: no %q:\n%s", want, r)
		}
	}
}

func TestOptimise(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	same := hex.EncodeToString(randomBytes(t, 32<<10)) // text, so mkTree never reads a leading "*" or "->" as a mode
	one := oneLine(t, "add", d.nixStore(t, "--add", d.mkTree(t, "opt/one", tree{"same.bin": same, "one.txt": "one", "link": "-> same.bin"})))
	two := oneLine(t, "add", d.nixStore(t, "--add", d.mkTree(t, "opt/two", tree{"same.bin": same, "two.txt": "two", "link": "-> same.bin"})))
	hashes := map[string]string{}
	for _, p := range []string{one, two} {
		hashes[p] = d.nixStore(t, "-q", "--hash", p)
	}
	f1, f2 := filepath.Join(d.realPath(one), "same.bin"), filepath.Join(d.realPath(two), "same.bin")
	if inode(t, f1) == inode(t, f2) {
		t.Fatalf("%s and %s share an inode before optimising", f1, f2)
	}

	// As from nix-daemon, the client hears what it saved: two files (the
	// second same.bin, and the second symlink, which Nix on Linux links
	// too) replaced by links.
	if r := d.nixStoreRun(t, "--optimise"); r.err != nil || !strings.Contains(r.stderr, "0.06 MiB freed by hard-linking 2 files") {
		t.Errorf("nix-store --optimise does not report 64 KiB freed by linking two files:\n%s", r)
	}

	if inode(t, f1) != inode(t, f2) {
		t.Errorf("after nix-store --optimise, %s and %s are not hard-linked (inodes %d, %d)", f1, f2, inode(t, f1), inode(t, f2))
	}
	if l1, l2 := lInode(t, filepath.Join(d.realPath(one), "link")), lInode(t, filepath.Join(d.realPath(two), "link")); l1 != l2 {
		t.Errorf("after nix-store --optimise, the two identical symlinks are not hard-linked (inodes %d, %d)", l1, l2)
	}
	// As nix-daemon's: each path it looks at (at talkative level), and the
	// paths done of all on the optimise activity, for the progress bar.
	if r := d.nixStoreRun(t, "--optimise", "-v"); r.err != nil || !strings.Contains(r.stderr, "optimising path '"+one+"'") {
		t.Errorf("nix-store --optimise -v does not name the paths:\n%s", r)
	}
	jr := d.nixStoreRun(t, "--optimise", "--log-format", "internal-json")
	const actOptimiseStore, resProgress = 106, 105
	var done, total float64
	if f := lastResult(jr.stderr, actOptimiseStore, resProgress); len(f) == 4 {
		done, total = f[0].(float64), f[1].(float64)
	}
	if total < 2 || done != total {
		t.Errorf("optimise progress %v/%v, want all of at least 2 paths:\n%s", done, total, jr)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(f1, &st); err != nil {
		t.Fatal(err)
	}
	if st.Nlink < 3 {
		t.Errorf("%s has %d links; want 3 (two store paths and .links)", f1, st.Nlink)
	}
	if st.Mode&0o7777 != 0o444 || st.Mtim.Sec != 1 {
		t.Errorf("%s: mode %o, mtime %d after optimising; want 444 and 1", f1, st.Mode&0o7777, st.Mtim.Sec)
	}
	// What Nix's optimiser warns of reaches the client: a file left
	// writable, and a link in .links that is not the file it names
	// (removed, then made again).
	odd := oneLine(t, "add", d.nixStore(t, "--add", d.mkTree(t, "opt/odd", tree{"writable.txt": "odd", "linked.txt": "four"})))
	writable, linked := filepath.Join(d.realPath(odd), "writable.txt"), filepath.Join(d.realPath(odd), "linked.txt")
	os.Chmod(d.realPath(odd), 0o755)
	if err := os.Chmod(writable, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chmod(d.realPath(odd), 0o555)
	corrupt := filepath.Join(d.root, "nix/store/.links", strings.TrimSpace(d.cmd("nix-hash", "--type", "sha256", "--base32", linked).ok(t)))
	writeFile(t, corrupt, "not the file", 0o444)
	or := d.nixStoreRun(t, "--optimise", "-v")
	for _, want := range []string{
		"warning: skipping suspicious writable file '" + writable + "'",
		"warning: removing corrupted link '" + corrupt + "'",
		"You should run `nix-store --verify --check-contents --repair` to fix them all",
		"hash inodes",
	} {
		if or.err != nil || !strings.Contains(or.stderr, want) {
			t.Errorf("nix-store --optimise -v: no %q:\n%s", want, or)
		}
	}
	if inode(t, corrupt) != inode(t, linked) {
		t.Errorf("the corrupted link %s was not made again", corrupt)
	}
	links, err := os.ReadDir(filepath.Join(d.root, "nix/store/.links"))
	if err != nil || len(links) == 0 {
		t.Errorf("nix/store/.links: %d entries, %v; want the shared file's link", len(links), err)
	}
	for p, h := range hashes {
		if got := d.nixStore(t, "-q", "--hash", p); got != h {
			t.Errorf("NAR hash of %s changed by optimising: %s → %s", p, h, got)
		}
	}
	for _, p := range []string{one, two} {
		if got, want := d.nixHashPath(t, "sha256", d.realPath(p)), strings.TrimPrefix(strings.TrimSpace(hashes[p]), "sha256:"); got != want {
			t.Errorf("%s on disk hashes to %s after optimising, want %s", p, got, want)
		}
	}
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
	// The unshared files stay single.
	var st1 syscall.Stat_t
	if err := syscall.Stat(filepath.Join(d.realPath(one), "one.txt"), &st1); err != nil {
		t.Fatal(err)
	}
	if st1.Nlink > 2 {
		t.Errorf("one.txt has %d links, want at most 2", st1.Nlink)
	}
	// A collection reports what the links still save, as Nix counts it:
	// the second link of same.bin (64 KiB) less the .links directory's own
	// block.
	three := oneLine(t, "add", d.nixStore(t, "--add", d.mkTree(t, "opt/three", tree{"three.txt": "three"})))
	if r := d.nixStoreRun(t, "--delete", three); r.err != nil || !strings.Contains(r.stderr, "note: currently hard linking saves 0.06 MiB") {
		t.Errorf("nix-store --delete does not report the 0.06 MiB that hard linking saves:\n%s", r)
	}
	r := d.nixStoreRun(t, "--delete", two)
	if r.err != nil || !regexp.MustCompile(`note: currently hard linking saves -?[0-9]+\.[0-9]{2} MiB`).MatchString(r.stderr) {
		t.Errorf("nix-store --delete does not report what hard linking saves:\n%s", r)
	}
}

// TestAutoOptimise: with auto-optimise-store, identical files of paths
// added through the daemon (nix-store --add) and of its builds' outputs
// share one inode as they arrive; contents stay verifiable.
func TestAutoOptimise(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t, "auto-optimise-store = true")
	same := hex.EncodeToString(randomBytes(t, 32<<10)) // text, so mkTree never reads a leading "*" or "->" as a mode
	one := oneLine(t, "add", b.nixStore(t, "--add", b.mkTree(t, "opt/one", tree{"same.bin": same, "one.txt": "one"})))
	two := oneLine(t, "add", b.nixStore(t, "--add", b.mkTree(t, "opt/two", tree{"same.bin": same, "two.txt": "two"})))
	f1, f2 := filepath.Join(b.realPath(one), "same.bin"), filepath.Join(b.realPath(two), "same.bin")
	if inode(t, f1) != inode(t, f2) {
		t.Errorf("%s and %s are not hard-linked", f1, f2)
	}
	// A build whose two outputs hold the same bytes.
	args := b.expr(t, "opt", `{ out = mk { name = "opt"; outputs = [ "out" "dup" ];
  script = "echo same-bytes-"+"${nonce} > $out; echo same-bytes-"+"${nonce} > $dup"; }; }`)
	b.nixBuild(append(args, "-A", "out", "--no-out-link")...).ok(t)
	drv := oneLine(t, "drv", b.client("nix-instantiate", append(args, "-A", "out")...).ok(t))
	outs := lines(b.nixStore(t, "-q", "--outputs", drv))
	if len(outs) != 2 || inode(t, b.realPath(outs[0])) != inode(t, b.realPath(outs[1])) {
		t.Errorf("the build's identical outputs %q are not hard-linked", outs)
	}
	assertVerifyClean(t, b.nixStoreRun(t, "--verify", "--check-contents"))
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// lInode is the inode of p itself, not of what a symlink points to.
func lInode(t *testing.T, p string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestGCKeepSettings: the daemon's keep-outputs keeps the outputs of a
// rooted derivation, and keep-derivations = false lets the derivation of
// a rooted output go, as with Nix; by default it is the other way round.
// A trusted client's own settings decide for its collection, as with
// nix-daemon.
func TestGCKeepSettings(t *testing.T) {
	t.Parallel()
	keepOutputs := []string{"keep-outputs = true", "keep-derivations = false"}
	for _, tc := range []struct {
		name             string
		conf             []string
		clientArgs       []string
		outKept, drvKept bool
	}{
		{"defaults", nil, nil, false, true},
		{"keep-outputs", keepOutputs, nil, true, false},
		{"the client's keep-outputs", nil, []string{"--option", "keep-outputs", "true", "--option", "keep-derivations", "false"}, true, false},
		{"the client's defaults", keepOutputs, []string{"--option", "keep-outputs", "false", "--option", "keep-derivations", "true"}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startBuildDaemon(t, tc.conf...)
			args := b.expr(t, "keep", `{
  a = mk { name = "keep-a"; script = "echo a > $out"; };
  b = mk { name = "keep-b"; script = "echo b > $out"; };
}`)
			// Roots: a's derivation, b's output.
			rootA := filepath.Join(b.dir, "root-a")
			if got := oneLine(t, "drv", b.client("nix-instantiate", append(args, "-A", "a", "--add-root", rootA)...).ok(t)); got != rootA {
				t.Fatalf("nix-instantiate --add-root printed %q", got)
			}
			outA := oneLine(t, "a", b.nixBuild(append(args, "-A", "a", "--no-out-link")...).ok(t))
			outB := oneLine(t, "b", b.nixBuild(append(args, "-A", "b", "--no-out-link")...).ok(t))
			drvB := oneLine(t, "deriver", b.nixStore(t, "-q", "--deriver", outB))
			b.nixStore(t, "--add-root", filepath.Join(b.dir, "root-b"), "--indirect", "-r", outB)
			b.nixStore(t, append([]string{"--gc"}, tc.clientArgs...)...)
			if got := b.isValid(t, outA); got != tc.outKept {
				t.Errorf("output of the rooted derivation valid: %v, want %v", got, tc.outKept)
			}
			if got := b.isValid(t, drvB); got != tc.drvKept {
				t.Errorf("derivation of the rooted output valid: %v, want %v", got, tc.drvKept)
			}
		})
	}
}

// TestAutoGC: with min-free and max-free, a store low on space collects
// its garbage before the next path is added, keeping what is rooted. The
// free space comes from _NIX_TEST_FREE_SPACE_FILE, as in Nix's own tests.
func TestAutoGC(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	free := writeFile(t, filepath.Join(e.dir, "free"), "100000000", 0o644)
	d := e.startDaemon(t, withConf("min-free = 1000000", "max-free = 2000000", "min-free-check-interval = 0"),
		withDaemonEnv("_NIX_TEST_FREE_SPACE_FILE="+free))
	garbage := oneLine(t, "add", d.nixStore(t, "--add", e.file(t, "garbage", "garbage")))
	kept := oneLine(t, "add", d.nixStore(t, "--add", e.file(t, "kept", "kept")))
	d.nixStore(t, "--add-root", filepath.Join(e.dir, "kept-root"), "--indirect", "-r", kept)
	if !d.isValid(t, garbage) {
		t.Fatalf("%s collected with plenty of space", garbage)
	}
	writeFile(t, free, "500000", 0o644)
	r := d.nixStoreRun(t, "--add", e.file(t, "new", "new"))
	added := oneLine(t, "add", r.stdout)
	// As Nix, the client whose request starts the collection hears of it.
	if !strings.Contains(r.stderr, "running auto-GC to free 1500000 bytes") {
		t.Errorf("nix-store --add that started a collection:\n%s", r)
	}
	if d.isValid(t, garbage) {
		t.Errorf("%s not collected with little space left", garbage)
	}
	if !d.isValid(t, kept) || !d.isValid(t, added) {
		t.Errorf("the rooted path %s or the path just added %s was collected", kept, added)
	}
}

// TestAutoGCEachClient: min-free-check-interval spaces the free-space
// checks of each client, not of the daemon: a new client's first addition
// checks, as with nix-daemon, whose connections each check on their first
// request. (Once per interval for the whole daemon let a burst of short
// clients fill the disk.)
func TestAutoGCEachClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	free := writeFile(t, filepath.Join(e.dir, "free"), "100000000", 0o644)
	opts := []daemonOpt{withConf("min-free = 1000000", "max-free = 2000000", "min-free-check-interval = 3600"),
		withDaemonEnv("_NIX_TEST_FREE_SPACE_FILE=" + free)}
	if !useStock {
		opts = append(opts, withDaemonArgs("--metrics-listen", "127.0.0.1:0"))
	}
	d := e.startDaemon(t, opts...)
	garbage := oneLine(t, "add", d.nixStore(t, "--add", e.file(t, "garbage", "garbage")))
	writeFile(t, free, "500000", 0o644)
	r := d.nixStoreRun(t, "--add", e.file(t, "next", "next"))
	if r.err != nil || !strings.Contains(r.stderr, "running auto-GC to free 1500000 bytes") {
		t.Errorf("a second client's addition with little space left:\n%s", r)
	}
	for deadline := time.Now().Add(10 * time.Second); d.isValid(t, garbage); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s not collected", garbage)
		}
	}
	if useStock {
		return
	}
	// The collection is counted once it has ended.
	want := regexp.MustCompile(`(?m)^nixyard_auto_gc_runs_total\{result="ok"\} 1$`)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		body := scrapeMetrics(t, d.servedURL(t, "--metrics-listen"))
		if want.MatchString(body) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the metrics do not count the automatic collection:\n%s", body)
		}
	}
}

// TestGCRootMessages: what the root scan finds wrong is told to the
// client in Nix's words (a root to an invalid path, a stale temporary
// roots file); a temporary root is one whether its path is valid or not;
// a refused deletion says why, as Nix says it.
func TestGCRootMessages(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	invalid := "/nix/store/" + strings.Repeat("1", 32) + "-not-valid"
	link := filepath.Join(d.root, "nix/var/nix/gcroots/to-invalid")
	if err := os.Symlink(invalid, link); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(d.root, "nix/var/nix/temproots/999999")
	writeFile(t, stale, "", 0o644)
	holder := dialProto(t, d.sock)
	tempInvalid := "/nix/store/" + strings.Repeat("2", 32) + "-temp-not-valid"
	holder.addTempRoot(t, tempInvalid)

	r := d.nixStoreRun(t, "--gc", "--print-roots")
	for _, want := range []string{
		"skipping invalid root from '" + link + "' to '" + invalid + "'",
		"removing stale temporary roots file '" + stale + "'",
	} {
		if r.err != nil || !strings.Contains(r.stderr, want) {
			t.Errorf("--print-roots: stderr lacks %q:\n%s", want, r)
		}
	}
	if !strings.Contains(r.stdout, " -> "+tempInvalid) {
		t.Errorf("--print-roots lacks the temporary root on an invalid path:\n%s", r)
	}

	held := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "gcmsg/held.txt", "held")))
	holder.addTempRoot(t, held)
	r = d.nixStoreRun(t, "--delete", held)
	if !regexp.MustCompile(`(?m)^error: Cannot delete path '` + regexp.QuoteMeta(held) + `' since it is still alive`).MatchString(r.stderr) {
		t.Errorf("--delete of a live path:\n%s", r)
	}
}

// TestGCClientHangsUp: a collection, or a verification, that waits for the
// garbage collector's lock gives up when its client goes away, rather than
// running for no one once the lock is free.
func TestGCClientHangsUp(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon 2.8 waits for the lock in a blocking flock and sees the hang-up only once it has it (then deletes nothing)")
	}
	d := startDaemon(t)
	dead := oneLine(t, "nix-store --add", d.nixStore(t, "--add", d.file(t, "gc-hangup/dead", "dead")))
	lockPath := filepath.Join(d.root, "nix/var/nix/gc.lock")
	lock, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"--gc"}, {"--verify", "--check-contents"}} {
		// (The daemon keeps a descriptor of its own for temporary roots.)
		held := openCount(t, d.proc.Process.Pid, lockPath)
		stderr := filepath.Join(d.dir, "gc-hangup-stderr")
		f, err := os.Create(stderr)
		if err != nil {
			t.Fatal(err)
		}
		x := d.client("nix-store", args...).exec()
		x.Stderr = f
		if err := x.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if b, _ := os.ReadFile(stderr); strings.Contains(string(b), "waiting for the big garbage collector lock") {
				break
			}
			if time.Now().After(deadline) {
				x.Process.Kill()
				t.Fatalf("nix-store %v: the daemon did not wait for the lock", args)
			}
		}
		x.Process.Kill()
		x.Wait()
		f.Close()
		// The op holds the lock file open while it waits for the lock.
		for stop := time.Now().Add(10 * time.Second); openCount(t, d.proc.Process.Pid, lockPath) > held; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(stop) {
				t.Fatalf("nix-store %v: the daemon still waits for the lock 10 s after its client went away", args)
			}
		}
	}
	syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	d.assertValid(t, "a collection whose client went away", dead)
	if log, err := os.ReadFile(d.logPath); err != nil || strings.Count(string(log), "the client hung up; its operation stopped") != 2 || strings.Contains(string(log), "context canceled") {
		t.Errorf("the daemon's log does not say twice that the client hung up (%v):\n%s", err, log)
	}
}

// openCount is the number of descriptors process pid has open on path.
func openCount(t *testing.T, pid int, path string) int {
	t.Helper()
	fds, err := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(fd); err == nil && target == path {
			n++
		}
	}
	return n
}

// TestAutoGCBetweenBuilds: a store that runs low on space while a request
// builds collects its garbage before the request's next build starts, as
// Nix's worker checks between builds, not only when the request starts.
func TestAutoGCBetweenBuilds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	marks := filepath.Join(e.dir, "marks")
	mustMkdir(t, marks, 0o777)
	free := writeFile(t, filepath.Join(marks, "free"), "100000000", 0o666)
	d := e.startDaemon(t, withConf("sandbox-paths = /marks="+marks, "min-free = 1000000", "max-free = 2000000", "min-free-check-interval = 0"),
		withDaemonEnv("_NIX_TEST_FREE_SPACE_FILE="+free))
	b := &buildEnv{daemon: d, marks: marks}
	garbage := oneLine(t, "add", d.nixStore(t, "--add", e.file(t, "garbage", "garbage")))
	// The first build uses up the space; the second needs it.
	args := b.expr(t, "autogc", `rec {
  fill = mk { name = "fill"; script = "echo 500000 > /marks/free; echo > $out"; };
  next = mk { name = "next"; inherit fill; script = "echo > $out"; };
}`)
	r := b.nixBuild(append(args, "-A", "next", "--no-out-link")...).run(t)
	if r.err != nil || !strings.Contains(r.stderr, "running auto-GC to free 1500000 bytes") {
		t.Errorf("a build that ran out of space:\n%s", r)
	}
	// (The collection runs in the background.)
	for deadline := time.Now().Add(10 * time.Second); d.isValid(t, garbage); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s not collected when the space ran out between two builds", garbage)
		}
	}
	d.assertValid(t, "the build's output", oneLine(t, "nix-build", r.stdout))
}

// TestNarFromPathHoldsPath: a path whose NAR a client is reading (nix copy
// --from, ssh-ng) is not collected under it, however slowly it reads; once
// the NAR is sent, it is collectable again.
func TestNarFromPathHoldsPath(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon 2.8 takes no root on a path it sends: a collection deletes it under a slow reader")
	}
	d := startDaemon(t)
	big := make([]byte, 16<<20) // far more than the socket buffers hold
	if _, err := rand.Read(big); err != nil {
		t.Fatal(err)
	}
	p := oneLine(t, "nix-store --add", d.nixStore(t, "--add", d.file(t, "narhold/big", string(big))))
	size, err := strconv.ParseInt(strings.TrimSpace(d.nixStore(t, "-q", "--size", p)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	reader := dialProto(t, d.sock)
	reader.u64(opNarFromPath)
	reader.str(p)
	if err := reader.flush(); err != nil {
		t.Fatal(err)
	}
	if err := reader.readStderr(); err != nil {
		t.Fatalf("NarFromPath: %v", err)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, reader.r, 4096); err != nil {
		t.Fatalf("reading the NAR's start: %v", err)
	}
	d.nixStore(t, "--gc")
	d.assertValid(t, "a collection while a client reads the path's NAR", p)
	if _, err := io.CopyN(h, reader.r, size-4096); err != nil {
		t.Fatalf("reading the rest of the NAR: %v", err)
	}
	want := strings.TrimPrefix(strings.TrimSpace(d.nixStore(t, "-q", "--hash", p)), "sha256:")
	if got := strings.TrimSpace(d.client("nix-hash", "--type", "sha256", "--to-base32", hex.EncodeToString(h.Sum(nil))).ok(t)); got != want {
		t.Errorf("the NAR read has hash %s, want %s", got, want)
	}
	d.nixStore(t, "--gc")
	d.assertGone(t, "a collection after the NAR was sent", p)
}

// collectWhileDownloading runs cmd, and a collection through d while cmd's
// download of narURL from srv waits; it returns cmd's result.
func collectWhileDownloading(t *testing.T, d *daemon, srv *cachetest.Server, narURL string, cmd *command) result {
	t.Helper()
	held, release := make(chan struct{}), make(chan struct{})
	srv.Inject(narURL, cachetest.Fault{Held: func() { close(held) }, Release: release})
	done := make(chan result, 1)
	go func() { done <- cmd.run(t) }()
	select {
	case <-held:
	case r := <-done:
		t.Fatalf("the command ended before it downloaded:\n%s", r)
	}
	d.nixStore(t, "--gc")
	close(release)
	return <-done
}

// TestCopyHoldsValidPaths: the paths a client was told are valid stay
// while it is connected. `nix copy --to` the daemon asks which paths it
// has (QueryValidPaths) and sends only the others, which refer to them;
// a collection while it downloads them (here a manual one; on a host
// with a size budget, an automatic one) must not delete what they refer
// to, or the copy fails with "reference … is not valid".
func TestCopyHoldsValidPaths(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon holds nothing between QueryValidPaths and the addition that relies on it")
	}
	e := newEnv(t)
	cacheDir, outs, deps := e.cachedFixtures(t, "none", "", "held-valid")
	out, dep := outs[0], deps[0]
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t)
	from := []string{"copy", "--no-check-sigs", "--from", srv.URL, "--to", d.url()}
	e.cmd("nix", append(from, dep)...).ok(t)

	// The download of out waits until the collection is over.
	r := collectWhileDownloading(t, d, srv, narURL(t, cacheDir, out), e.cmd("nix", append(from, out)...))
	if r.err != nil {
		t.Errorf("nix copy, whose reference was collected while it downloaded:\n%s", r)
	}
	if !d.isValid(t, out) || !d.isValid(t, dep) {
		t.Errorf("after the copy: %s valid %v, %s valid %v", out, d.isValid(t, out), dep, d.isValid(t, dep))
	}
}
