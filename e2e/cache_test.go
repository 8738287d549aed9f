package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCacheServer: with --cache-listen, another store substitutes a
// closure from the daemon's store over HTTP, as from nix-serve: the
// narinfos are signed with the daemon's secret-key-files (a client that
// trusts another key refuses them), and the copy verifies clean.
func TestCacheServer(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon serves no binary cache")
	}
	e := newEnv(t)
	sec, pub := e.generateKey(t, "host-cache-1")
	_, otherPub := e.generateKey(t, "other-cache-1")
	d := e.startDaemon(t, withDaemonArgs("--cache-listen", "127.0.0.1:0"), withConf("secret-key-files = "+sec))
	url := strings.TrimSuffix(d.servedURL(t, "--cache-listen"), "/")
	args := e.expr(t, "served", `rec {
  dep = mk { name = "served-dep"; script = "echo dep > $out"; };
  top = mk { name = "served-top"; inherit dep; script = "echo top $dep > $out"; };
}`)
	top := oneLine(t, "top", d.nixBuild(append(args, "-A", "top", "--no-out-link")...).ok(t))
	dep := oneLine(t, "dep", d.nixBuild(append(args, "-A", "dep", "--no-out-link")...).ok(t))

	other := e.otherStore("fetched")
	subst := func(key string) *command {
		return e.cmd("nix-store", "--store", directStore(other), "-r", top,
			"--option", "substituters", url, "--option", "trusted-public-keys", key)
	}
	if stderr := subst(otherPub).fails(t); !strings.Contains(stderr, "is not signed by any of the keys in 'trusted-public-keys'") {
		t.Errorf("a client that trusts another key:\n%s", stderr)
	}
	subst(pub).ok(t)
	got, err := os.ReadFile(filepath.Join(other, top))
	if err != nil || string(got) != "top "+dep+"\n" {
		t.Errorf("%s in the other store: %q %v", top, got, err)
	}
	e.local(other, "nix-store", "--verify", "--check-contents").ok(t)
	if refs := e.local(other, "nix-store", "-q", "--references", top).ok(t); !strings.Contains(refs, dep) {
		t.Errorf("references of %s in the other store: %q", top, refs)
	}
}

// TestPushToCache: with --push-to file://DIR, what the daemon builds is
// pushed with its closure to the binary cache in DIR, signed, from where
// another store substitutes it; a path it only added is not pushed.
func TestPushToCache(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon pushes nothing by itself")
	}
	e := newEnv(t)
	sec, pub := e.generateKey(t, "fleet-1")
	dir := filepath.Join(e.dir, "fleet-cache")
	d := e.startDaemon(t, withDaemonArgs("--push-to", "file://"+dir+"?compression=xz&write-nar-listing=true"), withConf("secret-key-files = "+sec))
	added := oneLine(t, "added", d.nixStore(t, "--add", e.file(t, "added.txt", "only added\n")))
	args := e.expr(t, "pushed", `rec {
  dep = mk { name = "pushed-dep"; script = "echo dep > $out"; };
  top = mk { name = "pushed-top"; inherit dep; script = "echo top $dep > $out"; };
}`)
	top := oneLine(t, "top", d.nixBuild(append(args, "-A", "top", "--no-out-link")...).ok(t))
	narinfo := filepath.Join(dir, filepath.Base(top)[:32]+".narinfo")
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(narinfo); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s was not pushed to %s", top, dir)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, filepath.Base(added)[:32]+".narinfo")); err == nil {
		t.Errorf("%s, only added, was pushed", added)
	}
	// The URL's parameters: xz, and a listing next to the narinfo.
	if ni, err := os.ReadFile(narinfo); err != nil || !strings.Contains(string(ni), "\nCompression: xz\n") {
		t.Errorf("narinfo of %s: %s %v", top, ni, err)
	}
	if _, err := os.Stat(strings.TrimSuffix(narinfo, ".narinfo") + ".ls"); err != nil {
		t.Errorf("no listing: %v", err)
	}
	other := e.otherStore("from-fleet")
	e.cmd("nix-store", "--store", directStore(other), "-r", top,
		"--option", "substituters", "file://"+dir, "--option", "trusted-public-keys", pub).ok(t)
	e.local(other, "nix-store", "--verify", "--check-contents").ok(t)
	if got, err := os.ReadFile(filepath.Join(other, top)); err != nil || !strings.HasPrefix(string(got), "top /nix/store/") {
		t.Errorf("%s from the fleet cache: %q %v", top, got, err)
	}
}
