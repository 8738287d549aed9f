package nar

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
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

// TestRestoreCanonical checks that RestoreCanonical leaves the metadata
// Restore followed by Canonicalise leaves, without a second walk.
func TestRestoreCanonical(t *testing.T) {
	nar := narOf(dir(
		entry("bin", dir(
			entry("hello", file(true, "#!/bin/sh\n")...),
			entry("link", symlink("hello")...),
		)...),
		entry("empty-dir", dir()...),
		entry("readme", file(false, "hi\n")...),
		entry("share", dir(entry("doc", dir(entry("x", file(false, "")...))...))...),
	)...)
	base := t.TempDir()
	ctx := context.Background()
	want, got := filepath.Join(base, "want"), filepath.Join(base, "got")
	if err := Restore(ctx, bytes.NewReader(nar), want); err != nil {
		t.Fatal(err)
	}
	if err := Canonicalise(want); err != nil {
		t.Fatal(err)
	}
	if err := RestoreCanonical(ctx, bytes.NewReader(nar), got); err != nil {
		t.Fatal(err)
	}
	if d := dump(t, got); !bytes.Equal(d, nar) {
		t.Fatal("RestoreCanonical changed the NAR serialisation")
	}
	n := 0
	err := filepath.WalkDir(want, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		var w, g unix.Stat_t
		if err := unix.Lstat(p, &w); err != nil {
			return err
		}
		if err := unix.Lstat(filepath.Join(got, rel), &g); err != nil {
			return err
		}
		if g.Mode != w.Mode || g.Mtim.Sec != w.Mtim.Sec || g.Mtim.Nsec != w.Mtim.Nsec {
			t.Errorf("%s: mode %o mtime %d.%09d, want mode %o mtime %d.%09d", rel, g.Mode, g.Mtim.Sec, g.Mtim.Nsec, w.Mode, w.Mtim.Sec, w.Mtim.Nsec)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != 9 {
		t.Errorf("compared %d inodes, want 9", n)
	}
}

// TestRestoreCanonicalCleanup checks that a failed RestoreCanonical removes
// what it made, read-only directories included.
func TestRestoreCanonicalCleanup(t *testing.T) {
	nar := narOf(dir(
		entry("a", dir(entry("f", file(false, "x")...))...),
		entry("b", file(false, "y")...),
	)...)
	dest := filepath.Join(t.TempDir(), "t")
	err := RestoreCanonical(context.Background(), bytes.NewReader(nar[:len(nar)-16]), dest)
	if err == nil {
		t.Fatal("a truncated NAR was restored")
	}
	if _, err := os.Lstat(dest); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("after a failed restore: %v, want the tree removed", err)
	}
}
