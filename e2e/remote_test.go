package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/build"
)

// TestSendToRemoteBuilder: with builders in nix.conf, the daemon sends
// builds to the machines there through Nix's own build hook, as
// nix-daemon does. A derivation that needs a feature only the remote
// machine has is built there (its inputs copied over, its output and log
// brought back); one that prefers to be built here is built here; a
// failed remote build fails with the remote's error; -j0 builds nothing
// here but still remotely; and a client whose --builders is empty keeps
// its builds here.
func TestSendToRemoteBuilder(t *testing.T) {
	t.Parallel()
	remote := startBuildDaemon(t, "system-features = remote-only")
	e := newEnv(t)
	machine := remote.sshNG(t) + " " + build.DefaultSystem() + " - 2 1 remote-only"
	// Root is not trusted here: the hook, which brings the outputs back
	// unsigned, is trusted on its own socket (nixyard), or opens the store
	// directly (nix-daemon).
	d := e.startBuildDaemon(t, "system-features = benchmark", "builders = "+machine, "trusted-users = nobody-here")
	args := e.expr(t, "send", `rec {
  here = mk { name = "send-here"; preferLocalBuild = true; script = "echo here > $out"; };
  top = mk { name = "send-top"; inherit here; requiredSystemFeatures = [ "remote-only" ];
    script = "echo remote-log-line; echo top $here > $out"; };
  fail = mk { name = "send-fail"; requiredSystemFeatures = [ "remote-only" ];
    script = "echo remote-fail-line; exit 3"; };
  other = mk { name = "send-other"; requiredSystemFeatures = [ "remote-only" ]; script = "echo > $out"; };
  anywhere = mk { name = "send-anywhere"; script = "echo > $out"; };
}`)

	r := d.nixBuild(append(args, "-A", "top", "--no-out-link")...).run(t)
	if r.err != nil {
		t.Fatalf("nix-build of a derivation for the remote builder:\n%s", r)
	}
	top := strings.TrimSpace(r.stdout)
	if !regexp.MustCompile(`building '/nix/store/[a-z0-9]{32}-send-top\.drv' on 'ssh-ng://localhost`).MatchString(r.stderr) ||
		!strings.Contains(r.stderr, "remote-log-line") {
		t.Errorf("the client did not see the remote build or its log:\n%s", r)
	}
	here := oneLine(t, "here", d.nixBuild(append(args, "-A", "here", "--no-out-link")...).ok(t))
	if got, err := os.ReadFile(d.realPath(top)); err != nil || string(got) != "top "+here+"\n" {
		t.Errorf("%s holds %q here (%v)", top, got, err)
	}
	remote.assertValid(t, "on the remote builder", here, top)
	topDrv := oneLine(t, "deriver", d.nixStore(t, "-q", "--deriver", top))
	if log := d.nixStore(t, "-l", topDrv); !strings.Contains(log, "remote-log-line") {
		t.Errorf("nix-store -l of the remote build here: %q", log)
	}
	if log := remote.nixStore(t, "-l", topDrv); !strings.Contains(log, "remote-log-line") {
		t.Errorf("nix-store -l of the build on the remote builder: %q", log)
	}
	hereDrv := filepath.Base(oneLine(t, "deriver", d.nixStore(t, "-q", "--deriver", here)))
	for _, name := range []string{hereDrv[2:], hereDrv[2:] + ".bz2"} {
		if _, err := os.Stat(filepath.Join(remote.root, "nix/var/log/nix/drvs", hereDrv[:2], name)); err == nil {
			t.Errorf("%s (preferLocalBuild) was built on the remote builder", hereDrv)
		}
	}
	d.nixStore(t, "--verify", "--check-contents")

	stderr := d.nixBuild(append(args, "-A", "fail", "--no-out-link")...).fails(t)
	if !regexp.MustCompile(`build of '/nix/store/[a-z0-9]{32}-send-fail\.drv' on 'ssh-ng://localhost[^']*' failed`).MatchString(stderr) ||
		!strings.Contains(stderr, "remote-fail-line") {
		t.Errorf("a failed remote build:\n%s", stderr)
	}

	// -j0: nothing is built here, what a machine can build is built there.
	anywhere := oneLine(t, "anywhere", d.nixBuild(append(args, "-A", "anywhere", "--no-out-link", "-j0")...).ok(t))
	remote.assertValid(t, "on the remote builder", anywhere)

	stderr = d.nixBuild(append(args, "-A", "other", "--no-out-link", "--builders", "")...).fails(t)
	if !strings.Contains(stderr, "with features {remote-only} is required to build") {
		t.Errorf("--builders '' still sent the build away:\n%s", stderr)
	}
	// -j0 with a machine set that cannot take it (another feature): Nix's
	// words for that, not those for having no machines.
	gpu := e.expr(t, "gpu", `{ gpu = mk { name = "send-gpu"; requiredSystemFeatures = [ "gpu" ]; script = "echo > $out"; }; }`)
	stderr = d.nixBuild(append(gpu, "-A", "gpu", "--no-out-link", "-j0")...).fails(t)
	if !strings.Contains(stderr, "unable to start any build; remote machines may not have all required system features.") {
		t.Errorf("-j0 with no machine for the derivation:\n%s", stderr)
	}
}
