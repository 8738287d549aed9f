package store

import (
	"context"
	"database/sql"
	"errors"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"golang.org/x/sys/unix"
)

// fakeClock makes the path info cache's clock controllable; the returned
// func moves it past the staleness bound for other processes' commits.
func fakeClock(s *Store) (advance func()) {
	now := time.Unix(1_000_000, 0)
	s.cache.mu.Lock()
	s.cache.now = func() time.Time { return now }
	s.cache.mu.Unlock()
	return func() {
		s.cache.mu.Lock()
		now = now.Add(externalStaleness)
		s.cache.mu.Unlock()
	}
}

// TestCacheSeesOtherWriters checks that cached path infos never outlive one
// of our own writes, outlive a change committed by another connection (as
// another process would) by at most externalStaleness, and that callers may
// modify what they get.
func TestCacheSeesOtherWriters(t *testing.T) {
	s, root := testStore(t)
	advance := fakeClock(s)
	ctx := context.Background()
	info, err := s.AddToStoreContent(ctx, "cached", contentaddress.Flat, hash.SHA256, nil, strings.NewReader("cached"), false)
	if err != nil {
		t.Fatal(err)
	}
	p := info.Path
	for range 2 { // the second answer comes from the cache
		got, err := s.QueryPathInfo(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Sigs) != 0 {
			t.Fatalf("sigs %q, want none", got.Sigs)
		}
		got.Sigs = append(got.Sigs, "mutated:by-caller")
	}

	// Another connection, as real Nix in another process would use.
	other, err := sql.Open(dbDriver(), "file:"+filepath.Join(root, "nix/var/nix/db/db.sqlite")+"?mode=rw")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Exec("update ValidPaths set sigs = 'other:sig' where path = ?", s.abs(p)); err != nil {
		t.Fatal(err)
	}
	got, err := s.QueryPathInfo(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Sigs) != 0 {
		t.Errorf("within the staleness bound: sigs %q, want the cached (none)", got.Sigs)
	}
	advance()
	got, err = s.QueryPathInfo(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.Sigs, []string{"other:sig"}) {
		t.Errorf("after a foreign update: sigs %q, want [other:sig]", got.Sigs)
	}

	// Our own write.
	if err := s.AddSignatures(ctx, p, []string{"our:sig"}); err != nil {
		t.Fatal(err)
	}
	got, err = s.QueryPathInfo(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.Sigs, []string{"other:sig", "our:sig"}) {
		t.Errorf("after AddSignatures: sigs %q", got.Sigs)
	}

	// A foreign deletion.
	if _, err := other.Exec("delete from ValidPaths where path = ?", s.abs(p)); err != nil {
		t.Fatal(err)
	}
	advance()
	if _, err := s.QueryPathInfo(ctx, p); !errors.Is(err, ErrNotValid) {
		t.Errorf("after a foreign deletion: err = %v, want ErrNotValid", err)
	}
}

// TestCacheSeesRealNix has real Nix sign a path we have cached.
func TestCacheSeesRealNix(t *testing.T) {
	if _, err := exec.LookPath("nix"); err != nil {
		t.Skip("nix not installed")
	}
	s, root := testStore(t)
	advance := fakeClock(s)
	ctx := context.Background()
	info, err := s.AddToStoreContent(ctx, "signed", contentaddress.Flat, hash.SHA256, nil, strings.NewReader("signed"), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.QueryPathInfo(ctx, info.Path); err != nil { // cache it
		t.Fatal(err)
	}
	key := filepath.Join(t.TempDir(), "key")
	nixCmd(t, root, "nix-store", "--generate-binary-cache-key", "test-1", key, key+".pub")
	nixCmd(t, root, "nix", "store", "sign", "--key-file", key, s.abs(info.Path))
	advance()
	got, err := s.QueryPathInfo(ctx, info.Path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Sigs) != 1 || !strings.HasPrefix(got.Sigs[0], "test-1:") {
		t.Errorf("after nix store sign: sigs %q", got.Sigs)
	}
}

// cached reports whether the cache holds an entry for p, and whether that
// entry says p is valid.
func cached(s *Store, p storepath.Path) (known, valid bool) {
	s.cache.mu.RLock()
	defer s.cache.mu.RUnlock()
	info, known := s.cache.m[p]
	return known, info != nil
}

// textPath is the store path addText gives name with name itself as its
// contents.
func textPath(t *testing.T, s *Store, name string) storepath.Path {
	t.Helper()
	p, err := contentaddress.CA{Method: contentaddress.Text, Hash: hash.Sum(hash.SHA256, []byte(name))}.StorePath(s.dir, name, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// cacheNotValid has s look up p, which is not valid yet: s's cache then
// says so.
func cacheNotValid(t *testing.T, s *Store, p storepath.Path) {
	t.Helper()
	if ok, err := s.IsValidPath(context.Background(), p); err != nil || ok {
		t.Fatalf("IsValidPath(%s) = %v, %v before anyone added it", p, ok, err)
	}
}

// TestCacheOwnCommitsDropOnlyTheirPaths checks that registering a path
// leaves the other entries in place and replaces the "not valid" entry of
// the path itself.
func TestCacheOwnCommitsDropOnlyTheirPaths(t *testing.T) {
	s, _ := testStore(t)
	fakeClock(s)
	ctx := context.Background()
	a := addText(t, s, "a", "a")
	if _, err := s.QueryPathInfo(ctx, a); err != nil {
		t.Fatal(err)
	}
	b := textPath(t, s, "b")
	cacheNotValid(t, s, b)
	if known, valid := cached(s, b); !known || valid {
		t.Fatalf("b before adding it: cached %v, valid %v; want a \"not valid\" entry", known, valid)
	}
	addText(t, s, "b", "b")
	if known, valid := cached(s, a); !known || !valid {
		t.Errorf("a after adding b: cached %v, valid %v; want its entry kept", known, valid)
	}
	if known, valid := cached(s, b); known && !valid {
		t.Errorf("b's \"not valid\" entry outlived its registration")
	}
	if ok, err := s.IsValidPath(ctx, b); err != nil || !ok {
		t.Errorf("IsValidPath(b) after adding it = %v, %v", ok, err)
	}
}

// TestCacheOwnCommitNoticesForeignOne checks that a commit by another
// connection just before one of ours is not taken for ours: the cache is
// dropped then, without waiting for the staleness bound.
func TestCacheOwnCommitNoticesForeignOne(t *testing.T) {
	s, root := testStore(t)
	fakeClock(s) // never advanced: only the write can notice
	ctx := context.Background()
	a, err := s.AddToStoreContent(ctx, "a", contentaddress.Flat, hash.SHA256, nil, strings.NewReader("a"), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.QueryPathInfo(ctx, a.Path); err != nil {
		t.Fatal(err)
	}
	other, err := sql.Open(dbDriver(), "file:"+filepath.Join(root, "nix/var/nix/db/db.sqlite")+"?mode=rw")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Exec("update ValidPaths set sigs = 'other:sig' where path = ?", s.abs(a.Path)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AddToStoreContent(ctx, "b", contentaddress.Flat, hash.SHA256, nil, strings.NewReader("b"), false); err != nil {
		t.Fatal(err)
	}
	got, err := s.QueryPathInfo(ctx, a.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.Sigs, []string{"other:sig"}) {
		t.Errorf("after a foreign update and then one of ours: sigs %q, want [other:sig]", got.Sigs)
	}
}

// TestCacheFirstWriteNoticesForeignCommit: a commit by another connection
// before our first write since opening is not taken for ours (the writer's
// data_version has no earlier reading to compare with).
func TestCacheFirstWriteNoticesForeignCommit(t *testing.T) {
	root := t.TempDir()
	first := openAt(t, root)
	addText(t, first, "a", "a")
	first.Close()
	s := openAt(t, root)
	defer s.Close()
	advance := fakeClock(s)
	other := openAt(t, root) // another process, as far as SQLite can tell
	defer other.Close()
	b := textPath(t, s, "b")
	cacheNotValid(t, s, b)
	addText(t, other, "b", "b")
	addText(t, s, "c", "c")
	advance()
	advance()
	if ok, err := s.IsValidPath(context.Background(), b); err != nil || !ok {
		t.Errorf("IsValidPath(b) = %v, %v after another process added it, want true", ok, err)
	}
}

// TestAddRechecksUnderLock: a path that another process registered while
// the cache still says "not valid" is not unpacked again over the files
// that process wrote.
func TestAddRechecksUnderLock(t *testing.T) {
	s, root := testStore(t)
	fakeClock(s) // never advanced: the cache keeps its "not valid"
	other := openAt(t, root)
	defer other.Close()
	x := textPath(t, s, "x")
	cacheNotValid(t, s, x)
	addText(t, other, "x", "x")
	var before, after unix.Stat_t
	if err := unix.Lstat(s.RealPath(x), &before); err != nil {
		t.Fatal(err)
	}
	addText(t, s, "x", "x")
	if err := unix.Lstat(s.RealPath(x), &after); err != nil {
		t.Fatal(err)
	}
	if before.Ino != after.Ino {
		t.Errorf("x was unpacked again (inode %d → %d) although another process had registered it", before.Ino, after.Ino)
	}
}

// invalidateAll drops every entry (tests that change the database behind
// the store's back).
func (c *infoCache) invalidateAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.drop()
}
