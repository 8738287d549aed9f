package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// TestRegisterReplace: an output registered again with Replace (a repair
// by rebuild) has its files swapped in and its info updated; when the
// registration fails, the old files are put back and the info is kept.
func TestRegisterReplace(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	out, err := s.Dir().Parse("/nix/store/00000000000000000000000000000000-out")
	if err != nil {
		t.Fatal(err)
	}
	drv, _ := s.Dir().Parse("/nix/store/11111111111111111111111111111111-out.drv")
	tree := func(name, content string) string {
		dir := filepath.Join(root, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "f"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	register := func(src string, replace bool, check func(map[string]PathInfo) error) error {
		l, err := s.LockOutputs(ctx, []storepath.Path{out})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Unlock()
		_, err = l.Register(ctx, drv, []BuiltOutput{{Name: "out", Path: out, Src: src, Replace: replace}}, nil, check)
		return err
	}
	contents := func() string {
		b, err := os.ReadFile(filepath.Join(s.RealPath(out), "f"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if err := register(tree("build-1", "one"), false, nil); err != nil {
		t.Fatal(err)
	}
	first, err := s.QueryPathInfo(ctx, out)
	if err != nil {
		t.Fatal(err)
	}

	refused := errors.New("refused")
	src := tree("build-2", "two")
	if err := register(src, true, func(map[string]PathInfo) error { return refused }); !errors.Is(err, refused) {
		t.Fatalf("err = %v, want the check's", err)
	}
	if got := contents(); got != "one" {
		t.Errorf("after a failed replace the output holds %q, want the old files", got)
	}
	if info, _ := s.QueryPathInfo(ctx, out); !info.NarHash.Equal(first.NarHash) {
		t.Errorf("after a failed replace the info changed: %v", info.NarHash)
	}

	if err := register(src, true, nil); err != nil {
		t.Fatal(err)
	}
	if got := contents(); got != "two" {
		t.Errorf("after a replace the output holds %q", got)
	}
	if info, _ := s.QueryPathInfo(ctx, out); info.NarHash.Equal(first.NarHash) {
		t.Error("after a replace the info still has the old NAR hash")
	}
	if _, err := os.Lstat(src); !os.IsNotExist(err) {
		t.Errorf("the old files are left at %s (%v)", src, err)
	}
	if errs, err := s.VerifyStore(ctx, true, false, nil, nil); err != nil || errs {
		t.Errorf("verify after the replace: %v %v", errs, err)
	}
}
