package substitute

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

var _ Store = (*store.Store)(nil)

func openRealStore(t *testing.T) (*store.Store, string) {
	t.Helper()
	root := t.TempDir()
	st, err := store.Open(context.Background(), store.Config{
		StoreDir:     storepath.DefaultDir,
		RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir:     filepath.Join(root, "nix/var/nix"),
		LogDir:       filepath.Join(root, "nix/var/log/nix"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, root
}

// TestRealStore substitutes the fixture closure into a real store on a
// temporary root, with 8 concurrent callers and a reset and a 503 on the
// way, then has real Nix verify the store's contents.
func TestRealStore(t *testing.T) {
	for _, comp := range []string{"xz", "zstd", "br"} {
		t.Run(comp, func(t *testing.T) {
			cache := fixture(t, comp)
			srv := serve(t, cache)
			bigNar := narOf(t, cache, fixBig)
			srv.Inject(bigNar, cachetest.Fault{ResetAfter: 50_000}, cachetest.Fault{Status: 503})
			st, root := openRealStore(t)
			s := newSub(t, st, newClock(), []string{srv.URL}, func(c *Config) {
				c.RequireSigs, c.TrustedPublicKeys = true, []string{fixPub}
			})
			var wg sync.WaitGroup
			errs := make([]error, 8)
			for i := range errs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs[i] = s.Realise(context.Background(), []storepath.Path{fixRoot}, nil)
				}()
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Fatalf("caller %d: %v", i, err)
				}
			}
			for k, v := range srv.Counts() {
				want := 1
				if k == bigNar {
					want = 3 // reset, 503, success
				}
				if strings.HasPrefix(k, "nar/") && v != want {
					t.Errorf("%s fetched %d times, want %d", k, v, want)
				}
			}
			st.Close()
			out, err := run(t.TempDir(), "nix-store", "--store", "local?root="+root, "--verify", "--check-contents")
			if err != nil {
				t.Fatalf("nix-store --verify: %v", err)
			}
			if strings.TrimSpace(out) != "" {
				t.Errorf("nix-store --verify: %s", out)
			}
			out, err = run(t.TempDir(), "nix-store", "--store", "local?root="+root, "-qR", storepath.DefaultDir.Abs(fixRoot))
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, p := range fixAll {
				got = append(got, storepath.DefaultDir.Abs(p))
			}
			if want := strings.Fields(out); !slices.Equal(slices.Sorted(slices.Values(want)), slices.Sorted(slices.Values(got))) {
				t.Errorf("closure in the store %v, want %v", want, got)
			}
		})
	}
}

// TestRealStoreRejectsWrongHash: a corrupted NAR is refused by the real
// store, in Nix's words, and nothing is registered.
func TestRealStoreRejectsWrongHash(t *testing.T) {
	cache := fixture(t, "zstd")
	srv := serve(t, cache)
	bigNar := narOf(t, cache, fixBig)
	srv.Always(bigNar, cachetest.Fault{FlipByte: 400_000})
	st, _ := openRealStore(t)
	s := newSub(t, st, newClock(), []string{srv.URL}, nil)
	err := s.Realise(context.Background(), []storepath.Path{fixRoot}, nil)
	if err == nil || !strings.Contains(hint.Strip(err.Error()), "hash mismatch importing path '"+string(storepath.DefaultDir)+"/"+fixBig.String()+"'") {
		t.Fatalf("err = %v, want Nix's hash mismatch", err)
	}
	for _, p := range []storepath.Path{fixBig, fixRoot} {
		if ok, err := st.IsValidPath(context.Background(), p); err != nil || ok {
			t.Errorf("%s valid=%v err=%v after a corrupt download", p, ok, err)
		}
	}
}
