package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// testStore opens a chroot store under a temporary root.
func testStore(t testing.TB) (*Store, string) {
	t.Helper()
	root := t.TempDir()
	s := openAt(t, root)
	t.Cleanup(func() { s.Close() })
	return s, root
}

func openAt(t testing.TB, root string) *Store {
	t.Helper()
	return openWith(t, root, func(*Config) {})
}

// openWith opens the chroot store at root with the configuration of
// openAt, as tune changes it.
func openWith(t testing.TB, root string, tune func(*Config)) *Store {
	t.Helper()
	cfg := Config{
		StoreDir:     "/nix/store",
		RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir:     filepath.Join(root, "nix/var/nix"),
		LogDir:       filepath.Join(root, "nix/var/log/nix"),
		RequireSigs:  true,
	}
	tune(&cfg)
	s, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// nixCmd runs a real Nix command against the chroot store at root.
func nixCmd(t testing.TB, root string, name string, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed", name)
	}
	full := append([]string{"--store", "local?root=" + root}, args...)
	if name == "nix" {
		full = append([]string{"--extra-experimental-features", "nix-command"}, full...)
	}
	cmd := exec.Command(name, full...)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=", "XDG_CACHE_HOME="+t.TempDir())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(full, " "), err, stderr.String())
	}
	return string(out)
}

// narOf builds a tree with files and returns its NAR.
func narOf(t testing.TB, files map[string]string) []byte {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tree")
	for name, content := range files {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if len(files) == 0 {
		os.WriteFile(dir, []byte("single file"), 0o644)
	}
	var buf bytes.Buffer
	if err := nar.DumpPath(&buf, dir); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// caNARInfo makes the info of a content-addressed NAR path.
func caNARInfo(t testing.TB, s *Store, name string, data []byte, refs []storepath.Path) PathInfo {
	t.Helper()
	h := hash.Sum(hash.SHA256, data)
	ca := contentaddress.CA{Method: contentaddress.NAR, Hash: h}
	p, err := ca.StorePath(s.Dir(), name, refs, false)
	if err != nil {
		t.Fatal(err)
	}
	return PathInfo{Path: p, NarHash: h, NarSize: uint64(len(data)), References: refs, CA: ca.String()}
}

// addNAR adds a content-addressed path made of files (narOf) and returns
// its info.
func addNAR(t testing.TB, s *Store, name string, files map[string]string) PathInfo {
	t.Helper()
	data := narOf(t, files)
	info := caNARInfo(t, s, name, data, nil)
	if err := s.AddToStoreNar(context.Background(), info, bytes.NewReader(data), AddOptions{}); err != nil {
		t.Fatal(err)
	}
	return info
}

func TestOpenCreatesLayout(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	for _, p := range []string{"nix/store/.links", "nix/var/nix/db/db.sqlite", "nix/var/nix/db/big-lock", "nix/var/nix/temproots", "nix/var/nix/profiles", "nix/var/nix/gcroots/profiles"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
			t.Error(err)
		}
	}
	schema, _ := os.ReadFile(filepath.Join(root, "nix/var/nix/db/schema"))
	if string(schema) != "10" {
		t.Errorf("schema = %q", schema)
	}
	info, err := s.AddToStoreContent(ctx, "hello.txt", contentaddress.Text, hash.SHA256, nil, strings.NewReader("hello"), false)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := openAt(t, root)
	defer s2.Close()
	got, err := s2.QueryPathInfo(ctx, info.Path)
	if err != nil {
		t.Fatal(err)
	}
	if got.NarHash.String() != info.NarHash.String() || got.CA != info.CA {
		t.Errorf("after reopen: %+v, want %+v", got, info)
	}
	var mode string
	if err := s2.db.r.QueryRow("pragma journal_mode").Scan(&mode); err != nil || mode != "wal" {
		t.Errorf("journal_mode = %q, %v", mode, err)
	}
	out := nixCmd(t, root, "nix-store", "--dump-db")
	if !strings.Contains(out, s2.Dir().Abs(info.Path)) {
		t.Errorf("nix-store --dump-db lacks %s:\n%s", info.Path, out)
	}
}

func TestAddAndQuery(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()

	dep, err := s.AddToStoreContent(ctx, "dep", contentaddress.Flat, hash.SHA256, nil, strings.NewReader("dependency"), false)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := s.Dir().MakeFixedOutputPath("dep", false, hash.Sum(hash.SHA256, []byte("dependency")), nil, false); dep.Path != want {
		t.Errorf("flat path %s, want %s", dep.Path, want)
	}
	data := narOf(t, map[string]string{"bin/tool": "#!/bin/sh\n", "share/doc": "docs " + s.Dir().Abs(dep.Path)})
	info := caNARInfo(t, s, "pkg", data, []storepath.Path{dep.Path})
	info.Sigs = []string{"b:sig2", "a:sig1"}
	if err := s.AddToStoreNar(ctx, info, bytes.NewReader(data), AddOptions{CheckSigs: true}); err != nil {
		t.Fatal(err)
	}
	got, err := s.QueryPathInfo(ctx, info.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !got.NarHash.Equal(info.NarHash) || got.NarSize != info.NarSize || !slices.Equal(got.References, info.References) || got.CA != info.CA || !slices.Equal(got.Sigs, []string{"a:sig1", "b:sig2"}) {
		t.Errorf("QueryPathInfo = %+v", got)
	}
	if refs, _ := s.QueryReferrers(ctx, dep.Path); !slices.Equal(refs, []storepath.Path{info.Path}) {
		t.Errorf("referrers = %v", refs)
	}
	if all, _ := s.QueryAllValidPaths(ctx); len(all) != 2 {
		t.Errorf("all = %v", all)
	}
	bogus, _ := storepath.ParseBase("00000000000000000000000000000000-bogus")
	if v, _ := s.QueryValidPaths(ctx, []storepath.Path{bogus, dep.Path}); !slices.Equal(v, []storepath.Path{dep.Path}) {
		t.Errorf("valid = %v", v)
	}
	if p, err := s.QueryPathFromHashPart(ctx, info.Path.HashPart()); err != nil || p != info.Path {
		t.Errorf("from hash part: %v %v", p, err)
	}
	if _, err := s.QueryPathFromHashPart(ctx, bogus.HashPart()); !errors.Is(err, ErrNotValid) {
		t.Errorf("from bogus hash part: %v", err)
	}
	if _, err := s.QueryPathInfo(ctx, bogus); !errors.Is(err, ErrNotValid) {
		t.Errorf("bogus info: %v", err)
	}
	if c, _ := s.QueryClosure(ctx, []storepath.Path{info.Path}); len(c) != 2 {
		t.Errorf("closure = %v", c)
	}
	var buf bytes.Buffer
	if err := s.NarFromPath(ctx, info.Path, &buf); err != nil || !bytes.Equal(buf.Bytes(), data) {
		t.Errorf("NarFromPath: %v, equal=%v", err, bytes.Equal(buf.Bytes(), data))
	}
	if err := s.AddSignatures(ctx, info.Path, []string{"c:sig3", "a:sig1"}); err != nil {
		t.Fatal(err)
	}
	// Adding again consumes the NAR and changes nothing.
	r := bytes.NewReader(append(slices.Clone(data), "trailing"...))
	if err := s.AddToStoreNar(ctx, info, r, AddOptions{}); err != nil || r.Len() != len("trailing") {
		t.Errorf("re-add: %v, left %d", err, r.Len())
	}

	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
	var pi []struct {
		Path       string   `json:"path"`
		NarHash    string   `json:"narHash"`
		NarSize    uint64   `json:"narSize"`
		References []string `json:"references"`
		CA         string   `json:"ca"`
		Signatures []string `json:"signatures"`
	}
	if err := json.Unmarshal([]byte(nixCmd(t, root, "nix", "path-info", "--json", s.Dir().Abs(info.Path))), &pi); err != nil {
		t.Fatal(err)
	}
	if len(pi) != 1 || pi[0].NarHash != info.NarHash.SRI() || pi[0].NarSize != info.NarSize || pi[0].CA != info.CA ||
		!slices.Equal(pi[0].References, []string{s.Dir().Abs(dep.Path)}) || !slices.Equal(pi[0].Signatures, []string{"a:sig1", "b:sig2", "c:sig3"}) {
		t.Errorf("nix path-info = %+v", pi)
	}
}

func TestSeesPathAddedByNix(t *testing.T) {
	s, root := testStore(t)
	f := filepath.Join(t.TempDir(), "added-by-nix")
	os.WriteFile(f, []byte("from real nix\n"), 0o644)
	out := strings.TrimSpace(nixCmd(t, root, "nix-store", "--add", f))
	p, err := s.Dir().Parse(out)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.QueryPathInfo(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := s.NarFromPath(context.Background(), p, &buf); err != nil || !hash.Sum(hash.SHA256, buf.Bytes()).Equal(info.NarHash) {
		t.Errorf("NAR of %s does not match its hash: %v", p, err)
	}
	if info.CA == "" || info.NarSize != uint64(buf.Len()) {
		t.Errorf("info = %+v", info)
	}
}

// TestOpenOddDirectoryName: a store under a directory whose name holds
// what a URI gives meaning to ('?', '#', '%') keeps its database where
// the state directory says, not where SQLite would read the name as a URI.
func TestOpenOddDirectoryName(t *testing.T) {
	parent := t.TempDir()
	root := filepath.Join(parent, "local?root=x#y%20z")
	s := openAt(t, root)
	s.Close()
	if _, err := os.Stat(filepath.Join(root, "nix/var/nix/db/db.sqlite")); err != nil {
		t.Errorf("the database is not in the state directory: %v", err)
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 1 {
		t.Errorf("%s holds %d entries, want only the store's root", parent, len(ents))
	}
}
