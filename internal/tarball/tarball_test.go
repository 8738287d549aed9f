package tarball

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tarOf is a tar of headers, files holding their names as contents.
func tarOf(t testing.TB, headers ...tar.Header) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range headers {
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(h.Name))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(h.Name))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// TestUnpackHostile: entries that would leave the output are
// refused, and nothing is written outside it.
func TestUnpackHostile(t *testing.T) {
	for name, data := range map[string][]byte{
		"dot-dot":           tarOf(t, tar.Header{Name: "top/../../evil", Typeflag: tar.TypeReg}),
		"over a directory":  tarOf(t, tar.Header{Name: "d/", Typeflag: tar.TypeDir}, tar.Header{Name: "d", Typeflag: tar.TypeReg}),
		"through a symlink": tarOf(t, tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: ".."}, tar.Header{Name: "l/evil", Typeflag: tar.TypeReg}),
		"hard link out":     tarOf(t, tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "../outside"}),
		"hard link to a symlink": tarOf(t, tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "../outside"},
			tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "l"}),
		"device": tarOf(t, tar.Header{Name: "dev", Typeflag: tar.TypeChar}),
	} {
		t.Run(name, func(t *testing.T) {
			parent := t.TempDir()
			os.WriteFile(filepath.Join(parent, "outside"), []byte("keep"), 0o644)
			dest := filepath.Join(parent, "out")
			os.Mkdir(dest, 0o755)
			if err := Unpack(context.Background(), bytes.NewReader(data), dest); err == nil {
				t.Error("no error")
			}
			checkOnlyDest(t, parent)
		})
	}
}

// checkOnlyDest fails if parent holds anything but "out" and "outside"
// (unchanged).
func checkOnlyDest(t testing.TB, parent string) {
	entries, _ := os.ReadDir(parent)
	for _, e := range entries {
		if e.Name() != "out" && e.Name() != "outside" {
			t.Errorf("%s was written outside the output", e.Name())
		}
	}
	if data, err := os.ReadFile(filepath.Join(parent, "outside")); err != nil || string(data) != "keep" {
		t.Errorf("the file outside the output: %q, %v", data, err)
	}
}

func TestUnpack(t *testing.T) {
	dest := t.TempDir()
	data := tarOf(t,
		tar.Header{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755},
		tar.Header{Name: "top/sub/file", Typeflag: tar.TypeReg, Mode: 0o755},
		tar.Header{Name: "top/link", Typeflag: tar.TypeSymlink, Linkname: "sub/file"},
		tar.Header{Name: "top/hard", Typeflag: tar.TypeLink, Linkname: "top/sub/file"},
		// As libarchive for Nix: a leading "/" is dropped, and a later
		// entry replaces an earlier one.
		tar.Header{Name: "/abs", Typeflag: tar.TypeReg},
		tar.Header{Name: "dup", Typeflag: tar.TypeSymlink, Linkname: "x"},
		tar.Header{Name: "dup", Typeflag: tar.TypeReg},
	)
	if err := Unpack(context.Background(), bytes.NewReader(data), dest); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dest, "top/sub/file"))
	if err != nil || st.Mode()&0o111 == 0 {
		t.Errorf("file: %v, %v", st, err)
	}
	if got, err := os.ReadFile(filepath.Join(dest, "top/link")); err != nil || string(got) != "top/sub/file" {
		t.Errorf("through the symlink: %q, %v", got, err)
	}
	if got, err := os.ReadFile(filepath.Join(dest, "top/hard")); err != nil || string(got) != "top/sub/file" {
		t.Errorf("hard link: %q, %v", got, err)
	}
	if got, err := os.ReadFile(filepath.Join(dest, "abs")); err != nil || string(got) != "/abs" {
		t.Errorf("absolute name: %q, %v", got, err)
	}
	if got, err := os.ReadFile(filepath.Join(dest, "dup")); err != nil || string(got) != "dup" {
		t.Errorf("duplicate entry: %q, %v", got, err)
	}
}

// FuzzUnpack: whatever the archive, nothing is written outside
// the output directory.
func FuzzUnpack(f *testing.F) {
	f.Add(tarOf(f, tar.Header{Name: "a/b", Typeflag: tar.TypeReg}))
	f.Add(tarOf(f, tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "/"}, tar.Header{Name: "l/x", Typeflag: tar.TypeReg}))
	f.Add(tarOf(f, tar.Header{Name: "../x", Typeflag: tar.TypeReg}))
	f.Fuzz(func(t *testing.T, data []byte) {
		parent := t.TempDir()
		os.WriteFile(filepath.Join(parent, "outside"), []byte("keep"), 0o644)
		dest := filepath.Join(parent, "out")
		os.Mkdir(dest, 0o755)
		Unpack(context.Background(), bytes.NewReader(data), dest)
		checkOnlyDest(t, parent)
		filepath.WalkDir(dest, func(p string, d os.DirEntry, err error) error {
			if err == nil && !strings.HasPrefix(p, dest) {
				t.Errorf("%s outside %s", p, dest)
			}
			return nil
		})
	})
}
