package bench

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestDurableCopy copies a tree of a directory, a small and a large file
// and a symlink, and compares the copy with the original.
func TestDurableCopy(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	big := bytes.Repeat([]byte("0123456789abcdef"), 20000)
	for _, err := range []error{
		os.MkdirAll(filepath.Join(src, "p/sub"), 0o755),
		os.WriteFile(filepath.Join(src, "p/small"), []byte("hello"), 0o644),
		os.WriteFile(filepath.Join(src, "p/sub/big"), big, 0o644),
		os.Symlink("sub/big", filepath.Join(src, "p/link")),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	dst := filepath.Join(t.TempDir(), "dst")
	if _, err := DurableCopy(context.Background(), src, dst); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "p/small")); err != nil || string(b) != "hello" {
		t.Errorf("small: %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "p/sub/big")); err != nil || !bytes.Equal(b, big) {
		t.Errorf("big: %d bytes, %v", len(b), err)
	}
	if l, err := os.Readlink(filepath.Join(dst, "p/link")); err != nil || l != "sub/big" {
		t.Errorf("link: %q, %v", l, err)
	}
	if _, err := DurableCopy(context.Background(), src, dst); err == nil {
		t.Error("copying onto an existing tree succeeded")
	}
}
