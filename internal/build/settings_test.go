package build

import (
	"strings"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/config"
)

func TestConfigFromSettings(t *testing.T) {
	layout := config.Layout{StoreDir: "/nix/store", RealStoreDir: "/root/nix/store", ConfDir: "/etc/nix"}
	read := func(kv ...string) (Config, error) {
		s, err := config.Load(t.TempDir(), func(string) string { return "" })
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(kv); i += 2 {
			s.Set(kv[i], kv[i+1])
		}
		return ConfigFromSettings(s, layout, nil)
	}
	cfg, err := read("max-jobs", "0", "log-lines", "0", "timeout", "30", "sandbox", "relaxed", "keep-build-log", "false")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MaxJobs != 1 || !cfg.NoLocalBuilds || cfg.LogLines != -1 || cfg.Timeout != 30*time.Second ||
		cfg.Sandbox != SandboxRelaxed || !cfg.NoBuildLogs || !cfg.ChrootStore || cfg.NetrcFile != "/etc/nix/netrc" {
		t.Errorf("read %+v", cfg)
	}
	for _, bad := range [][]string{
		{"max-jobs", "many"},
		{"sandbox", "maybe"},
		{"cores", "-1"},
		{"timeout", "-5"},
		{"keep-failed", "perhaps"},
	} {
		if _, err := read(bad...); err == nil || !strings.HasPrefix(err.Error(), "nix.conf: ") {
			t.Errorf("%s = %s: %v, want an error naming nix.conf", bad[0], bad[1], err)
		}
	}
}
