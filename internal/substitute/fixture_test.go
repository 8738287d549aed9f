package substitute

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

// The fixture, made once per test binary with real Nix: a closure
//
//	c -> big (1.5 MB pseudo-random, fixed:r:sha256), a, b;  b -> a
//
// signed with key k1 and copied to one file:// cache per compression.
var (
	fixDir   string
	fixRoot  storepath.Path // c
	fixBig   storepath.Path
	fixAll   []storepath.Path
	fixPub   string // k1:...
	fixErr   error
	fixOnce  sync.Once
	compress = []string{"none", "xz", "zstd", "bzip2", "br", "gzip"}
)

func TestMain(m *testing.M) {
	code := m.Run()
	if fixDir != "" {
		os.RemoveAll(fixDir)
	}
	os.Exit(code)
}

func run(dir string, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(dir, "xdg"), "NIX_CONFIG=experimental-features = nix-command")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %v: %v: %s", name, args, err, errb.String())
	}
	return strings.TrimSpace(out.String()), nil
}

func makeFixture() error {
	dir, err := os.MkdirTemp("", "substitute-fixture-")
	if err != nil {
		return err
	}
	fixDir = dir
	big := make([]byte, 1_500_000) // several progress steps; incompressible, deterministic
	rand.NewChaCha8([32]byte{1}).Read(big)
	if err := os.WriteFile(filepath.Join(dir, "big"), big, 0o644); err != nil {
		return err
	}
	root := filepath.Join(dir, "root")
	expr := fmt.Sprintf(`let big = builtins.path { path = %s/big; name = "big"; }; a = builtins.toFile "a" "hello"; b = builtins.toFile "b" "ref ${a}"; c = builtins.toFile "c" "${big} ${a} ${b}"; in c`, dir)
	out, err := run(dir, "nix-instantiate", "--store", "local?root="+root, "--read-write-mode", "--eval", "-E", expr)
	if err != nil {
		return err
	}
	c := strings.Trim(out, `"`)
	if fixRoot, err = storepath.DefaultDir.Parse(c); err != nil {
		return err
	}
	if _, err := run(dir, "nix-store", "--generate-binary-cache-key", "k1", "sec", "pub"); err != nil {
		return err
	}
	pub, err := os.ReadFile(filepath.Join(dir, "pub"))
	if err != nil {
		return err
	}
	fixPub = strings.TrimSpace(string(pub))
	if _, err := run(dir, "nix", "store", "sign", "--store", "local?root="+root, "--key-file", "sec", "-r", c); err != nil {
		return err
	}
	out, err = run(dir, "nix-store", "--store", "local?root="+root, "-qR", c)
	if err != nil {
		return err
	}
	for _, l := range strings.Fields(out) {
		p, err := storepath.DefaultDir.Parse(l)
		if err != nil {
			return err
		}
		fixAll = append(fixAll, p)
		if p.Name() == "big" {
			fixBig = p
		}
	}
	for _, comp := range compress {
		if _, err := run(dir, "nix", "copy", "--from", "local?root="+root, "--to", "file://"+dir+"/cache-"+comp+"?compression="+comp, c); err != nil {
			return err
		}
	}
	return nil
}

// fixture returns a private copy of the cache made with compression comp.
func fixture(t *testing.T, comp string) string {
	t.Helper()
	if _, err := exec.LookPath("nix-store"); err != nil {
		t.Skip("real Nix (nix-store) not installed")
	}
	fixOnce.Do(func() { fixErr = makeFixture() })
	if fixErr != nil {
		t.Fatalf("making fixture with real Nix: %v", fixErr)
	}
	dst := filepath.Join(t.TempDir(), "cache")
	if out, err := exec.Command("cp", "-r", filepath.Join(fixDir, "cache-"+comp), dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	return dst
}

// editNarinfos rewrites every narinfo of cache with f (applied per line;
// returning "" drops the line).
func editNarinfos(t *testing.T, cache string, f func(line string) string) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(cache, "*.narinfo"))
	for _, fn := range files {
		data, err := os.ReadFile(fn)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, l := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
			if l = f(l); l != "" {
				out = append(out, l)
			}
		}
		if err := os.WriteFile(fn, []byte(strings.Join(out, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// narOf returns the NAR URL (relative) of p in cache.
func narOf(t *testing.T, cache string, p storepath.Path) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(cache, p.HashPart()+".narinfo"))
	if err != nil {
		t.Fatal(err)
	}
	info, err := narinfo.Parse(storepath.DefaultDir, data)
	if err != nil {
		t.Fatal(err)
	}
	return info.URL
}

// memStore is a test double of the store: it reads the NAR fully, checks
// NarHash and NarSize, requires every reference to be valid first, and
// counts additions.
type memStore struct {
	mu    sync.Mutex
	valid map[storepath.Path]bool
	adds  map[storepath.Path]int
	errs  []string
}

func newMemStore() *memStore {
	return &memStore{valid: map[storepath.Path]bool{}, adds: map[storepath.Path]int{}}
}

func (m *memStore) IsValidPath(ctx context.Context, p storepath.Path) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.valid[p], nil
}

func (m *memStore) AddToStoreNar(ctx context.Context, info store.PathInfo, nar io.Reader, opts store.AddOptions) error {
	m.mu.Lock()
	for _, r := range info.References {
		if r != info.Path && !m.valid[r] {
			m.errs = append(m.errs, fmt.Sprintf("%s added before its reference %s", info.Path, r))
		}
	}
	m.mu.Unlock()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(nar, int64(info.NarSize)+1))
	if err != nil {
		return fmt.Errorf("reading NAR: %w", err)
	}
	if uint64(n) != info.NarSize {
		return fmt.Errorf("NAR size mismatch: got %d, want %d", n, info.NarSize)
	}
	if string(h.Sum(nil)) != string(info.NarHash.Digest) {
		return fmt.Errorf("hash mismatch for %s", info.Path)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.valid[info.Path] = true
	m.adds[info.Path]++
	return nil
}

func (m *memStore) check(t *testing.T, want []storepath.Path) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.errs {
		t.Error(e)
	}
	for _, p := range want {
		if m.adds[p] != 1 {
			t.Errorf("%s added %d times, want 1", p, m.adds[p])
		}
	}
}

// fakeClock is the injected time: Sleep advances Now and records the
// durations, without sleeping.
type fakeClock struct {
	mu     sync.Mutex
	t      time.Time
	sleeps []time.Duration
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sleeps = append(c.sleeps, d)
	c.t = c.t.Add(d)
	return ctx.Err()
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func (c *fakeClock) Sleeps() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.sleeps...)
}

// newSub returns a Substituter on st with the fake clock and test-friendly
// timeouts; edit adjusts the config.
func newSub(t *testing.T, st Store, clk *fakeClock, upstreams []string, edit func(*Config)) *Substituter {
	t.Helper()
	cfg := Config{
		Upstreams:        upstreams,
		Now:              clk.Now,
		Sleep:            clk.Sleep,
		FirstByteTimeout: 5 * time.Second,
		StallTimeout:     5 * time.Second,
		ConnectTimeout:   2 * time.Second,
	}
	if testing.Verbose() {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if edit != nil {
		edit(&cfg)
	}
	s, err := New(cfg, st)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func serve(t *testing.T, dir string) *cachetest.Server {
	srv := cachetest.New(dir)
	t.Cleanup(srv.Close)
	return srv
}
