package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// otherStore returns the root of a new chroot store in the test directory
// (created by real Nix on first use); open it with directStore(root).
func (e *testEnv) otherStore(name string) string { return filepath.Join(e.dir, name) }

// fixtureNix is a two-derivation closure built with static busybox: out
// refers to dep. Both are input-addressed (they have derivers and need
// signatures to be copied into a store that requires them).
const fixtureNix = `{ name, msg, bbdir }:
let bb = builtins.path { path = bbdir; name = "busybox-static"; };
    dep = builtins.derivation { name = "${name}-dep"; inherit msg; system = builtins.currentSystem;
      builder = "${bb}/busybox"; args = [ "sh" "-c" "echo dep $msg > $out" ]; };
in builtins.derivation { inherit name msg dep; system = builtins.currentSystem;
  builder = "${bb}/busybox"; args = [ "sh" "-c" "echo $msg $dep > $out" ]; }
`

// fixtureArgs writes fixtureNix and busybox into the test's directory
// (once) and returns the expression's file and its arguments for the
// fixture called name, as nix-build takes them. Contents include the test nonce, so paths are
// unique to the test.
func (e *testEnv) fixtureArgs(t *testing.T, name string) []string {
	t.Helper()
	expr := filepath.Join(e.dir, "fixture.nix")
	bbdir := filepath.Join(e.dir, "bb")
	if _, err := os.Stat(expr); err != nil {
		writeFile(t, expr, fixtureNix, 0o644)
		bb, err := os.ReadFile(busybox)
		if err != nil {
			t.Fatal(err)
		}
		mustMkdir(t, bbdir, 0o755)
		writeFile(t, filepath.Join(bbdir, "busybox"), string(bb), 0o755)
	}
	return []string{expr, "--argstr", "name", name, "--argstr", "msg", e.nonce, "--arg", "bbdir", bbdir}
}

// buildFixture builds fixtureNix with real Nix in the chroot store under
// other and returns the output path and its one dependency.
func (e *testEnv) buildFixture(t *testing.T, other, name string) (out, dep string) {
	t.Helper()
	out = strings.TrimSpace(e.cmd("nix-build", append([]string{"--store", other, "--no-out-link"}, e.fixtureArgs(t, name)...)...).ok(t))
	refs := lines(e.local(other, "nix-store", "-q", "--references", out).ok(t))
	if len(refs) != 1 {
		t.Fatalf("fixture %s: want one reference, got %q", out, refs)
	}
	return out, refs[0]
}

// pathInfo is one entry of "nix path-info --json".
type pathInfo struct {
	Path             string   `json:"path"`
	NarHash          string   `json:"narHash"`
	NarSize          int64    `json:"narSize"`
	References       []string `json:"references"`
	Deriver          string   `json:"deriver"`
	CA               string   `json:"ca"`
	Signatures       []string `json:"signatures"`
	RegistrationTime int64    `json:"registrationTime"`
	Ultimate         bool     `json:"ultimate"`
	Valid            *bool    `json:"valid"`
}

// parsePathInfos parses "nix path-info --json" output into a map by path.
func parsePathInfos(t *testing.T, what, s string) map[string]pathInfo {
	t.Helper()
	var list []pathInfo
	if err := json.Unmarshal([]byte(s), &list); err != nil {
		t.Fatalf("%s: parsing path-info JSON: %v\n%s", what, err, s)
	}
	m := map[string]pathInfo{}
	for _, p := range list {
		sort.Strings(p.References)
		sort.Strings(p.Signatures)
		m[p.Path] = p
	}
	return m
}

// rawJSON parses JSON into generic values, for exact comparisons.
func rawJSON(t *testing.T, what, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("%s: parsing JSON: %v\n%s", what, err, s)
	}
	return v
}

// sameContent reports the differences between two path infos in the
// fields that a copy must preserve (registration time, ultimate and
// signatures are the receiving store's business).
func sameContent(a, b pathInfo) []string {
	var diffs []string
	if a.Path != b.Path {
		diffs = append(diffs, "path "+a.Path+" vs "+b.Path)
	}
	if a.NarHash != b.NarHash {
		diffs = append(diffs, "narHash "+a.NarHash+" vs "+b.NarHash)
	}
	if a.NarSize != b.NarSize {
		diffs = append(diffs, "narSize differs")
	}
	if !reflect.DeepEqual(a.References, b.References) {
		diffs = append(diffs, "references differ")
	}
	if a.Deriver != b.Deriver {
		diffs = append(diffs, "deriver "+a.Deriver+" vs "+b.Deriver)
	}
	if a.CA != b.CA {
		diffs = append(diffs, "ca "+a.CA+" vs "+b.CA)
	}
	return diffs
}

// assertSameClosure checks that the closures of paths agree between two
// "nix path-info --json -r" outputs.
func assertSameClosure(t *testing.T, what string, want, got map[string]pathInfo) {
	t.Helper()
	if len(want) != len(got) {
		t.Errorf("%s: closure has %d paths, want %d\nwant: %v\ngot:  %v", what, len(got), len(want), keys(want), keys(got))
	}
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: %s missing", what, p)
			continue
		}
		if d := sameContent(w, g); d != nil {
			t.Errorf("%s: %s: %s\nwant %+v\ngot  %+v", what, p, strings.Join(d, "; "), w, g)
		}
	}
}

func keys(m map[string]pathInfo) []string {
	var k []string
	for p := range m {
		k = append(k, p)
	}
	sort.Strings(k)
	return k
}

// assertVerifyClean checks the result of "nix-store --verify" for
// success and for the complaints Nix prints without failing (a valid path
// whose files are gone is silently dropped from the database).
func assertVerifyClean(t *testing.T, r result) {
	t.Helper()
	if r.err != nil {
		t.Fatalf("store verification failed:\n%s", r)
	}
	for _, bad := range []string{"disappeared", "was modified", "error", "corrupt", "invalid", "incorrect"} {
		if strings.Contains(r.stderr, bad) {
			t.Fatalf("store verification reports %q:\n%s", bad, r)
		}
	}
}

// nixHashPath is "nix hash path --type ALGO --base32 P" by real Nix.
func (e *testEnv) nixHashPath(t *testing.T, algo, p string) string {
	t.Helper()
	return strings.TrimSpace(e.cmd("nix", "hash", "path", "--type", algo, "--base32", p).ok(t))
}

// nixHashFile is "nix hash file --type ALGO --base32 P" by real Nix.
func (e *testEnv) nixHashFile(t *testing.T, algo, p string) string {
	t.Helper()
	return strings.TrimSpace(e.cmd("nix", "hash", "file", "--type", algo, "--base32", p).ok(t))
}

// generateKey makes a signing key pair named name and returns the secret
// key file and the public key text.
func (e *testEnv) generateKey(t *testing.T, name string) (secFile, pub string) {
	t.Helper()
	secFile = filepath.Join(e.dir, name+".sec")
	pubFile := filepath.Join(e.dir, name+".pub")
	e.cmd("nix-store", "--generate-binary-cache-key", name, secFile, pubFile).ok(t)
	b, err := os.ReadFile(pubFile)
	if err != nil {
		t.Fatal(err)
	}
	return secFile, strings.TrimSpace(string(b))
}
