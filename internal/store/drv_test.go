package store

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// TestDerivationFromNix adds a .drv that real Nix instantiated and checks
// DerivationOutputs and the deriver edges of the GC.
func TestDerivationFromNix(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	nixRoot := t.TempDir()
	expr := filepath.Join(t.TempDir(), "t.nix")
	os.WriteFile(expr, []byte(`derivation { name = "trivial"; system = builtins.currentSystem; builder = "/bin/busybox"; args = [ "sh" "-c" "echo hi > $out" ]; }`), 0o644)
	drvAbs := strings.TrimSpace(nixCmd(t, nixRoot, "nix-instantiate", expr))
	outAbs := strings.TrimSpace(nixCmd(t, nixRoot, "nix-store", "-q", "--outputs", drvAbs))
	data, err := os.ReadFile(filepath.Join(nixRoot, drvAbs))
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.AddToStoreContent(ctx, strings.SplitN(filepath.Base(drvAbs), "-", 2)[1], contentaddress.Text, hash.SHA256, nil, strings.NewReader(string(data)), false)
	if err != nil {
		t.Fatal(err)
	}
	if s.Dir().Abs(info.Path) != drvAbs {
		t.Fatalf("drv path %s, Nix made %s", s.Dir().Abs(info.Path), drvAbs)
	}
	outs, err := s.QueryDerivationOutputMap(ctx, info.Path)
	if err != nil || len(outs) != 1 || s.Dir().Abs(outs["out"]) != outAbs {
		t.Fatalf("outputs = %v, %v; want out=%s", outs, err, outAbs)
	}
	if ds, _ := s.QueryValidDerivers(ctx, outs["out"]); !slices.Equal(ds, []storepath.Path{info.Path}) {
		t.Errorf("derivers = %v", ds)
	}
	// Real Nix reads our DerivationOutputs.
	if got := strings.TrimSpace(nixCmd(t, root, "nix-store", "-q", "--outputs", drvAbs)); got != outAbs {
		t.Errorf("nix-store -q --outputs = %q", got)
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
	res, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil)
	if err != nil || !slices.Equal(res.Paths, []string{drvAbs}) {
		t.Errorf("gc: %v %v", res, err)
	}
}
