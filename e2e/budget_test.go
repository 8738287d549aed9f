package e2e

import (
	"os"
	"strings"
	"testing"
	"time"
)

// TestSizeBudget: with --size-budget, a store that grows past the budget
// collects its dead paths least recently used first (a path asked for
// with nix path-info counts as used) until it is back under 90 % of it;
// what remains verifies clean.
func TestSizeBudget(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon has no size budget")
	}
	e := newEnv(t)
	// Three paths of 64 KiB (a NAR of about 65.7 KB each); the budget holds
	// two and a half, so the third pushes the store over and one path has
	// to go.
	d := e.startDaemon(t, withDaemonArgs("--size-budget", "164250"), withConf("min-free-check-interval = 0"))
	add := func(name string) string {
		t.Helper()
		body := strings.Repeat(name+"\n", 65536/(len(name)+1))
		body += strings.Repeat("-", 65536-len(body))
		return oneLine(t, name, d.nixStore(t, "--add", e.file(t, name, body)))
	}
	a := add("first")
	time.Sleep(1100 * time.Millisecond)
	b := add("second")
	time.Sleep(1100 * time.Millisecond)
	d.nix(t, "path-info", a) // a is used again: b is now the least recently used
	time.Sleep(1100 * time.Millisecond)
	c := add("third")
	// The store is over budget; the next addition collects first.
	small := add("small")

	for p, want := range map[string]bool{a: true, b: false, c: true, small: true} {
		if got := d.isValid(t, p); got != want {
			t.Errorf("%s valid = %v, want %v", p, got, want)
		}
	}
	if _, err := os.Lstat(d.realPath(b)); err == nil {
		t.Errorf("%s is still on disk", b)
	}
	d.nixStore(t, "--verify", "--check-contents")
	e.local(d.root, "nix-store", "--verify", "--check-contents").ok(t)
}
