package e2e

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// TestDirectCrossCheck runs a batch of operations through the daemon and
// checks that real Nix, opening the same store directly, sees exactly the
// store the daemon describes; and that paths real Nix adds directly are
// served by the daemon, while it runs and after a restart.
func TestDirectCrossCheck(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	other := d.otherStore("other")

	// The batch.
	file := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "x/file.txt", "cross-check")))
	dir := oneLine(t, "add", d.nixStore(t, "--add", d.mkTree(t, "x/dir", tree{"a": "a", "b/": "", "b/x": "*x", "l": "->a"})))
	flat := oneLine(t, "add-fixed", d.nixStore(t, "--add-fixed", "sha1", d.file(t, "x/flat.txt", "flat sha1")))
	depFile := d.file(t, "x/dep.txt", "dep")
	top := strings.TrimSpace(d.nix(t, "eval", "--impure", "--raw", "--expr",
		fmt.Sprintf(`builtins.toFile "cross-%s" "${%s}"`, d.nonce, depFile)))
	out, _ := d.buildFixture(t, other, "cross")
	d.cmd("nix", "copy", "--no-check-sigs", "--from", directStore(other), "--to", d.url(), out).ok(t)
	sec, _ := d.generateKey(t, "e2e-cross")
	d.nix(t, "store", "sign", "--key-file", sec, out)
	doomed := oneLine(t, "add", d.nixStore(t, "--add", d.file(t, "x/doomed.txt", "deleted")))
	d.nixStore(t, "--delete", doomed)
	d.nixStore(t, "--add-root", d.dir+"/keep", "--indirect", "-r", top)
	d.nixStore(t, "--optimise")

	compare := func(when string) {
		t.Helper()
		via := d.nixStore(t, "--dump-db")
		direct := d.local(d.root, "nix-store", "--dump-db").ok(t)
		if via != direct {
			t.Errorf("%s: nix-store --dump-db through the daemon differs from real Nix reading the store directly\n--- daemon ---\n%s\n--- direct ---\n%s", when, via, direct)
		}
		viaJ := rawJSON(t, "daemon", d.nix(t, "path-info", "--json", "--all"))
		directJ := rawJSON(t, "direct", d.local(d.root, "nix", "path-info", "--json", "--all").ok(t))
		if !reflect.DeepEqual(viaJ, directJ) {
			t.Errorf("%s: nix path-info --json --all through the daemon differs from the direct one\n--- daemon ---\n%v\n--- direct ---\n%v", when, viaJ, directJ)
		}
		all := sortedLines(d.local(d.root, "nix-store", "--gc", "--print-live").ok(t) + d.local(d.root, "nix-store", "--gc", "--print-dead").ok(t))
		for _, p := range []string{file, dir, flat, top, out} {
			if !contains(all, p) {
				t.Errorf("%s: real Nix does not see %s in the store", when, p)
			}
		}
		if contains(all, doomed) {
			t.Errorf("%s: real Nix still sees the deleted %s", when, doomed)
		}
	}
	compare("while the daemon runs")

	// Real Nix adds a path directly while the daemon runs; the daemon
	// serves it at once.
	side := oneLine(t, "direct add", d.local(d.root, "nix-store", "--add", d.file(t, "x/side.txt", "added directly")).ok(t))
	if got, want := d.nixStore(t, "-q", "--hash", side), d.local(d.root, "nix-store", "-q", "--hash", side).ok(t); got != want {
		t.Errorf("daemon's hash of directly added %s: %q, want %q", side, got, want)
	}
	dst := d.otherStore("dst")
	d.cmd("nix", "copy", "--from", d.url(), "--to", directStore(dst), side).ok(t)
	compare("after a direct add")

	// Stopped: real Nix finds the store clean and adds another path.
	d.stop(t)
	assertVerifyClean(t, d.local(d.root, "nix-store", "--verify", "--check-contents").run(t))
	offline := oneLine(t, "direct add", d.local(d.root, "nix-store", "--add", d.file(t, "x/offline.txt", "added while stopped")).ok(t))

	// Restarted: the daemon serves everything, old and new.
	d.start(t)
	for _, p := range []string{file, dir, flat, top, out, side, offline} {
		if !d.isValid(t, p) {
			t.Errorf("after restart, the daemon says %s is not valid", p)
		}
	}
	compare("after a restart")
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
}
