package realise

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

func TestConfigFromSettings(t *testing.T) {
	var s config.Settings
	s.Set("substituters", "http://a")
	s.Set("extra-substituters", "http://b http://a")
	s.Set("narinfo-cache-negative-ttl", "0")
	s.Set("connect-timeout", "7")
	env := map[string]string{"SSL_CERT_FILE": "/ssl.pem", "NIX_SSL_CERT_FILE": "/nix-ssl.pem"}
	getenv := func(k string) string { return env[k] }
	c, err := ConfigFromSettings(&s, getenv)
	if err != nil {
		t.Fatal(err)
	}
	if c.CAFile != "/nix-ssl.pem" {
		t.Errorf("ssl-cert-file %q, want NIX_SSL_CERT_FILE's", c.CAFile)
	}
	delete(env, "NIX_SSL_CERT_FILE")
	if c, _ := ConfigFromSettings(&s, getenv); c.CAFile != "/ssl.pem" {
		t.Errorf("ssl-cert-file %q, want SSL_CERT_FILE's", c.CAFile)
	}
	s.Set("ssl-cert-file", "/conf.pem")
	if c, _ := ConfigFromSettings(&s, getenv); c.CAFile != "/conf.pem" {
		t.Errorf("ssl-cert-file %q, want nix.conf's", c.CAFile)
	}
	if len(c.Substituters) != 2 || c.Substituters[0] != "http://a" || c.Substituters[1] != "http://b" {
		t.Errorf("substituters %q", c.Substituters)
	}
	if c.NegativeTTL >= 0 || c.PositiveTTL != 30*24*time.Hour || c.ConnectTimeout != 7*time.Second || c.MaxJobs != 16 || !c.RequireSigs {
		t.Errorf("config %+v", c)
	}
	s.Set("max-substitution-jobs", "0")
	if _, err := ConfigFromSettings(&s, getenv); err == nil {
		t.Error("max-substitution-jobs 0 accepted")
	}
}

func TestSelectionSharesSubstituters(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(context.Background(), store.Config{
		StoreDir: "/nix/store", RealStoreDir: filepath.Join(dir, "nix/store"),
		StateDir: filepath.Join(dir, "nix/var/nix"), LogDir: filepath.Join(dir, "nix/var/log/nix"),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := New(Config{Substituters: []string{"http://127.0.0.1:1"}}, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	r1, _ := m.For(Selection{}, nil)
	r2, _ := m.For(Selection{Substituters: []string{"http://127.0.0.1:1"}}, nil)
	r3, _ := m.For(Selection{ExtraSubstituters: []string{"http://127.0.0.1:2"}}, nil)
	off, _ := m.For(Selection{Substituters: []string{}}, nil)
	none, _ := m.For(Selection{NoSubstitutes: true}, nil)
	if r1.sub == nil || r1.sub != r2.sub {
		t.Error("the same caches do not share one Substituter")
	}
	if r3.sub == nil || r3.sub == r1.sub {
		t.Error("other caches share a Substituter")
	}
	if off.HasSubstituters() || none.HasSubstituters() {
		t.Error("caches not turned off")
	}
	if _, err := New(Config{Substituters: []string{"ftp://x"}}, st, nil); err == nil {
		t.Error("a bad substituter URL was accepted")
	}
}

// TestQueryMissingWithoutCaches has real Nix instantiate a derivation with
// an input derivation into the store and checks Nix's answer without
// substituters: both derivations will be built, an invalid opaque path and
// an invalid .drv are unknown, and a valid path needs nothing.
func TestQueryMissingWithoutCaches(t *testing.T) {
	if _, err := exec.LookPath("nix-instantiate"); err != nil {
		t.Skip("nix not installed")
	}
	root := t.TempDir()
	expr := filepath.Join(t.TempDir(), "t.nix")
	os.WriteFile(expr, []byte(`let
  dep = derivation { name = "dep"; system = builtins.currentSystem; builder = "/bin/busybox"; args = [ "sh" "-c" "echo dep > $out" ]; };
in derivation { name = "top"; system = builtins.currentSystem; builder = "/bin/busybox"; args = [ "sh" "-c" "cat ${dep} > $out" ]; }`), 0o644)
	cmd := exec.Command("nix-instantiate", "--store", "local?root="+root, expr)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=", "XDG_CACHE_HOME="+t.TempDir())
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nix-instantiate: %v", err)
	}
	st, err := store.Open(context.Background(), store.Config{
		StoreDir: "/nix/store", RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir: filepath.Join(root, "nix/var/nix"), LogDir: filepath.Join(root, "nix/var/log/nix"),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	top, err := st.Dir().Parse(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	d, err := derivation.ParseFile(st.RealPath(top))
	if err != nil {
		t.Fatal(err)
	}
	var dep storepath.Path
	for in := range d.InputDrvs {
		dep, _ = st.Dir().Parse(in)
	}
	topOut, _ := st.Dir().Parse(d.Outputs["out"].Path)
	missingDrv, _ := st.Dir().Parse("/nix/store/00000000000000000000000000000000-absent.drv")

	r, err := NoCaches(st).For(Selection{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.QueryMissing(ctx, []store.DerivedPath{
		{Path: top, Built: true, AllOutputs: true},
		{Path: topOut},
		{Path: top}, // the .drv itself is valid: nothing to do
		{Path: missingDrv, Built: true, Outputs: []string{"out"}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := storepath.Sort([]storepath.Path{top, dep}); !slices.Equal(m.WillBuild, want) {
		t.Errorf("WillBuild = %v, want %v", m.WillBuild, want)
	}
	if want := storepath.Sort([]storepath.Path{topOut, missingDrv}); !slices.Equal(m.Unknown, want) {
		t.Errorf("Unknown = %v, want %v", m.Unknown, want)
	}
	if len(m.WillSubstitute) != 0 || m.DownloadSize != 0 {
		t.Errorf("substitutes without caches: %+v", m)
	}
}

// TestCombinedError: one failed derivation, even asked for twice (with
// two outputs), gives its own error; several give "build of …" naming
// each once, sorted, with their own errors to log; a stopped target is
// named but has no error of its own.
func TestCombinedError(t *testing.T) {
	st, err := store.Open(context.Background(), store.Config{
		StoreDir: "/nix/store", RealStoreDir: filepath.Join(t.TempDir(), "store"),
		StateDir: t.TempDir(), LogDir: t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	r, err := NoCaches(st).For(Selection{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := st.Dir().Parse("/nix/store/00000000000000000000000000000000-a.drv")
	b, _ := st.Dir().Parse("/nix/store/11111111111111111111111111111111-b.drv")
	failed := func(p storepath.Path, out, msg string, stopped bool) Result {
		return Result{Target: store.DerivedPath{Path: p, Outputs: []string{out}, Built: true}, Status: MiscFailure, ErrorMsg: msg, Stopped: stopped}
	}
	if err := r.CombinedError([]Result{failed(a, "out", "a failed", false), failed(a, "dev", "a failed", false)}); err == nil || err.Error() != "a failed" {
		t.Errorf("one derivation twice: %v", err)
	}
	err = r.CombinedError([]Result{failed(b, "out", "b failed", false), failed(a, "out", "", true)})
	var cf *CombinedFailure
	if !errors.As(err, &cf) || err.Error() != "build of \x1b[35;1m'"+st.Dir().Abs(a)+"', '"+st.Dir().Abs(b)+"'\x1b[0m failed" || len(cf.Failures) != 1 || cf.Failures[0] != "b failed" {
		t.Errorf("two derivations, one stopped: %v", err)
	}
	if err := r.CombinedError([]Result{{Status: Built}}); err != nil {
		t.Errorf("success: %v", err)
	}
}
