package substitute

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// TestNarinfoForAnotherPath: a cache whose narinfo under p's hash names
// another path (another hash, or p's hash with another name) does not
// have p: the narinfo is refused, asked twice (the second time from the
// narinfo cache), and nothing is added in p's stead.
func TestNarinfoForAnotherPath(t *testing.T) {
	for _, tc := range []struct {
		name  string
		other func() string // the StorePath line's new value
	}{
		{"other hash", func() string {
			for _, p := range fixAll {
				if p != fixRoot {
					return storepath.DefaultDir.Abs(p)
				}
			}
			t.Fatal("no other path in the fixture")
			return ""
		}},
		{"other name", func() string {
			return storepath.DefaultDir.Abs(fixRoot)[:len(string(storepath.DefaultDir))+1+32] + "-not-" + fixRoot.Name()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cache := fixture(t, "zstd")
			fn := filepath.Join(cache, fixRoot.HashPart()+".narinfo")
			data, err := os.ReadFile(fn)
			if err != nil {
				t.Fatal(err)
			}
			var out []string
			for _, l := range strings.Split(string(data), "\n") {
				if strings.HasPrefix(l, "StorePath: ") {
					l = "StorePath: " + tc.other()
				}
				out = append(out, l)
			}
			if err := os.WriteFile(fn, []byte(strings.Join(out, "\n")), 0o644); err != nil {
				t.Fatal(err)
			}
			srv := serve(t, cache)
			st := newMemStore()
			s := newSub(t, st, newClock(), []string{srv.URL}, nil)
			for i := range 2 {
				if info, err := s.QueryPathInfo(context.Background(), fixRoot); err == nil {
					t.Errorf("query %d: QueryPathInfo(%s) = narinfo of %s, want an error", i, fixRoot, info.StorePath)
				}
			}
			if err := s.Realise(context.Background(), []storepath.Path{fixRoot}, nil); err == nil {
				t.Errorf("Realise(%s) succeeded from a narinfo of another path", fixRoot)
			}
			st.mu.Lock()
			defer st.mu.Unlock()
			for p, n := range st.adds {
				t.Errorf("%s added (%d times) when %s was asked for", p, n, fixRoot)
			}
		})
	}
}
