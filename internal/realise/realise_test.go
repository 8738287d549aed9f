package realise

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/store"
)

func TestConfigFromSettings(t *testing.T) {
	var s config.Settings
	s.Set("substituters", "http://a")
	s.Set("extra-substituters", "http://b http://a")
	s.Set("narinfo-cache-negative-ttl", "0")
	s.Set("connect-timeout", "7")
	c, err := ConfigFromSettings(&s)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Substituters) != 2 || c.Substituters[0] != "http://a" || c.Substituters[1] != "http://b" {
		t.Errorf("substituters %q", c.Substituters)
	}
	if c.NegativeTTL >= 0 || c.PositiveTTL != 30*24*time.Hour || c.ConnectTimeout != 7*time.Second || c.MaxJobs != 16 || !c.RequireSigs {
		t.Errorf("config %+v", c)
	}
	s.Set("max-substitution-jobs", "0")
	if _, err := ConfigFromSettings(&s); err == nil {
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
