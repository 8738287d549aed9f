package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNixClientOps drives the common ops with the real Nix 2.8 client.
func TestNixClientOps(t *testing.T) {
	d := startDaemon(t, Options{})
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "sub"), 0o755)
	os.WriteFile(filepath.Join(tree, "sub", "a"), []byte("aaa"), 0o644)
	os.WriteFile(filepath.Join(tree, "b"), []byte("bbb"), 0o755)
	os.Symlink("sub/a", filepath.Join(tree, "link"))

	// AddToStore (framed NAR).
	p := strings.TrimSpace(d.mustNix(t, "nix-store", "--add", tree))
	// AddToStoreNar via --add-fixed.
	flat := filepath.Join(dir, "flat")
	os.WriteFile(flat, []byte("flat contents"), 0o644)
	pf := strings.TrimSpace(d.mustNix(t, "nix-store", "--add-fixed", "sha256", flat))
	if pf == "" {
		t.Fatal("no path from --add-fixed")
	}
	// Queries.
	if got := d.mustNix(t, "nix-store", "-q", "--references", p); strings.TrimSpace(got) != "" {
		t.Errorf("references = %q", got)
	}
	d.mustNix(t, "nix-store", "-q", "--referrers", p)
	d.mustNix(t, "nix", "path-info", "-r", "--json", p, pf)
	// Missing path: QueryPathInfo with valid=0.
	missing := "/nix/store/00000000000000000000000000000000-missing"
	if _, err := d.nix(t, nil, "nix", "path-info", missing); err == nil || !strings.Contains(err.Error(), "is not valid") {
		t.Errorf("path-info of a missing path: %v", err)
	}
	// nix copy --from (BuildPathsWithResults on valid paths) into a file cache.
	cache := filepath.Join(dir, "cache")
	d.mustNix(t, "nix", "copy", "--from", d.storeURL(), "--to", "file://"+cache, p)
	// nix copy --to (QueryValidPaths + AddMultipleToStore) from that cache
	// into a second daemon.
	d2 := startDaemon(t, Options{})
	d2.mustNix(t, "nix", "copy", "--no-check-sigs", "--from", "file://"+cache, "--to", d2.storeURL(), p)
	if out := d2.mustNix(t, "nix", "path-info", p); strings.TrimSpace(out) != p {
		t.Errorf("copied path-info = %q", out)
	}
	// Export from one, import into the other.
	exp, err := d.nix(t, nil, "nix-store", "--export", pf)
	if err != nil {
		t.Fatalf("export: %v", err)
	}
	if out, err := d2.nix(t, []byte(exp), "nix-store", "--import"); err != nil || strings.TrimSpace(out) != pf {
		t.Errorf("import: %q %v", out, err)
	}
	// Roots and GC.
	d.mustNix(t, "nix-store", "--gc", "--print-roots")
	dead := d.mustNix(t, "nix-store", "--gc", "--print-dead")
	if !strings.Contains(dead, p) {
		t.Errorf("print-dead = %q, want %s", dead, p)
	}
	d.mustNix(t, "nix-store", "--delete", pf)
	if out, _ := d.nix(t, nil, "nix-store", "--check-validity", pf); out != "" {
		t.Errorf("deleted path still valid")
	}
	d.mustNix(t, "nix-store", "--gc")
	// Verify and optimise.
	d.mustNix(t, "nix-store", "--verify", "--check-contents")
	d.mustNix(t, "nix-store", "--optimise")
}
