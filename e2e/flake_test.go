package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// flakeNix is a flake without inputs whose default package is a script
// run by busybox from the flake's own bb directory; nonce makes its paths
// unique to the test.
const flakeNix = `{
  outputs = { self }: let
    bb = "${./bb}/busybox";
    hello = builtins.derivation {
      name = "flake-hello";
      system = "x86_64-linux";
      builder = bb;
      args = [ "sh" "-c" "mkdir -p $out/bin; printf '#!${bb} sh\\necho hello from the flake @NONCE@\\n' > $out/bin/flake-hello; chmod +x $out/bin/flake-hello" ];
    };
  in {
    packages.x86_64-linux.default = hello;
    apps.x86_64-linux.default = { type = "app"; program = "${hello}/bin/flake-hello"; };
  };
}
`

// TestFlake: what a CI job does with a flake, through the daemon: nix
// build, nix run, nix shell and nix flake archive of a path: flake (no
// inputs, no registry, no network). (nix profile install is left out: the
// 2.8 client reads the package from /nix/store itself, which a chroot
// store is not.)
func TestFlake(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the flake names x86_64-linux")
	}
	t.Parallel()
	e := newEnv(t)
	d := e.startDaemon(t)
	dir := filepath.Join(e.dir, "flake")
	mustMkdir(t, filepath.Join(dir, "bb"), 0o755)
	bb, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "bb", "busybox"), string(bb), 0o755)
	writeFile(t, filepath.Join(dir, "flake.nix"), strings.ReplaceAll(flakeNix, "@NONCE@", e.nonce), 0o644)
	ref := "path:" + dir
	// Options go first: nix shell's -c takes the rest of the line.
	flake := func(args ...string) []string {
		return append([]string{"--extra-experimental-features", "flakes", "--option", "flake-registry", "", "--store", d.url()}, args...)
	}
	want := "hello from the flake " + e.nonce

	var built []struct {
		Outputs map[string]string `json:"outputs"`
	}
	out := e.cmd("nix", flake("build", ref, "--no-link", "--json")...).ok(t)
	if err := json.Unmarshal([]byte(out), &built); err != nil || len(built) != 1 || built[0].Outputs["out"] == "" {
		t.Fatalf("nix build --json printed %q (%v)", out, err)
	}
	pkg := built[0].Outputs["out"]
	if !d.isValid(t, pkg) {
		t.Fatalf("%s is not valid after nix build", pkg)
	}
	if got := strings.TrimSpace(e.cmd("nix", flake("run", ref)...).ok(t)); got != want {
		t.Errorf("nix run printed %q, want %q", got, want)
	}
	if got := strings.TrimSpace(e.cmd("nix", flake("shell", ref, "-c", "flake-hello")...).ok(t)); got != want {
		t.Errorf("nix shell -c flake-hello printed %q, want %q", got, want)
	}

	// The flake's source is in the store, and archive finds it there.
	var meta struct {
		Path string `json:"path"`
	}
	if err := json.Unmarshal([]byte(e.cmd("nix", flake("flake", "metadata", ref, "--json")...).ok(t)), &meta); err != nil || !d.isValid(t, meta.Path) {
		t.Errorf("the flake's source %q is not valid (%v)", meta.Path, err)
	}
	e.cmd("nix", flake("flake", "archive", ref)...).ok(t)
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
	d.verifyStopped(t)
}

// TestCADerivationsClient: a client with the ca-derivations feature (common
// in users' nix.conf) asks for the realisation of every output it uses,
// input-addressed ones too; nix path-info and nix copy of an installable
// then work as with nix-daemon (which needs the feature itself).
func TestCADerivationsClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	d := e.startDaemon(t, withConf("experimental-features = nix-command ca-derivations"))
	ca := func(args ...string) []string {
		return append([]string{"--extra-experimental-features", "ca-derivations"}, args...)
	}
	fixture := append([]string{"-f"}, e.fixtureArgs(t, "ca-client")...)
	d.nix(t, ca(append([]string{"build", "--no-link"}, fixture...)...)...)
	paths := strings.TrimSpace(d.nix(t, ca(append([]string{"path-info"}, fixture...)...)...))
	if !strings.HasPrefix(paths, "/nix/store/") || !strings.HasSuffix(paths, "-ca-client") {
		t.Fatalf("nix path-info of the built fixture printed %q", paths)
	}
	cache := filepath.Join(e.dir, "cache")
	d.nix(t, ca(append([]string{"copy", "--to", "file://" + cache}, fixture...)...)...)
	if ents, err := os.ReadDir(filepath.Join(cache, "realisations")); err != nil || len(ents) == 0 {
		t.Errorf("nix copy wrote no realisations to the cache (%v)", err)
	}
	// nix copy of the installable into a daemon registers its realisations
	// there (RegisterDrvOutput).
	d2 := newEnv(t).startDaemon(t, withConf("experimental-features = nix-command ca-derivations"))
	d2.nix(t, ca(append([]string{"copy", "--no-check-sigs", "--from", d.url(), "--to", d2.url()}, fixture...)...)...)
	if !d2.isValid(t, paths) {
		t.Errorf("%s is not valid after nix copy", paths)
	}
	d2.verifyStopped(t)

	d.verifyStopped(t)
	// Real Nix opening the store itself finds the same realisations (the
	// same table, and the same derivation hashes).
	r := e.local(d.root, "nix", ca(append([]string{"path-info"}, fixture...)...)...).run(t)
	if r.err != nil || strings.TrimSpace(r.stdout) != paths {
		t.Errorf("real Nix on the store does not find the realisation of %s:\n%s", paths, r)
	}
}
