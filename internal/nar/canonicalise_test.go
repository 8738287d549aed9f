package nar

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func mkfifo(path string) error { return unix.Mkfifo(path, 0o644) }

func TestCanonicalise(t *testing.T) {
	base := t.TempDir()
	tree := filepath.Join(base, "tree")
	makeTree(t, tree)
	outside := filepath.Join(base, "outside")
	if err := os.WriteFile(outside, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(tree, "outside-link")); err != nil {
		t.Fatal(err)
	}
	before := dump(t, tree)
	if err := Canonicalise(tree); err != nil {
		t.Fatal(err)
	}
	if after := dump(t, tree); string(after) != string(before) {
		t.Fatal("Canonicalise changed the NAR serialisation")
	}
	want := map[string]os.FileMode{
		".":                     os.ModeDir | 0o555,
		"bin/hello":             0o555,
		"bin/owner-x":           0o555,
		"bin/other-x":           0o444,
		"empty":                 0o444,
		"share/doc":             os.ModeDir | 0o555,
		"empty-dir":             os.ModeDir | 0o555,
		"share/doc/deep/README": 0o444,
	}
	err := filepath.Walk(tree, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(tree, p)
		if fi.ModTime().Unix() != 1 {
			t.Errorf("%s: mtime %v, want 1", rel, fi.ModTime().Unix())
		}
		if m, ok := want[rel]; ok && fi.Mode() != m {
			t.Errorf("%s: mode %v, want %v", rel, fi.Mode(), m)
		}
		if fi.Mode()&os.ModeSymlink == 0 && fi.Mode().Perm() != 0o444 && fi.Mode().Perm() != 0o555 {
			t.Errorf("%s: mode %v not canonical", rel, fi.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Symlinks were not followed: the file outside the tree is untouched.
	fi, err := os.Stat(outside)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != 0o600 || fi.ModTime().Unix() == 1 {
		t.Fatalf("file outside the tree changed: mode %v mtime %d", fi.Mode(), fi.ModTime().Unix())
	}
	// Idempotent.
	if err := Canonicalise(tree); err != nil {
		t.Fatal(err)
	}
}
