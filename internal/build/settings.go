package build

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/nixyard/nixyard/internal/config"
)

// ConfigFromSettings reads the daemon's build settings from nix.conf: max-jobs
// (a number or "auto"; Nix's default 1), cores, sandbox, sandbox-paths,
// allowed-impure-host-deps, build-users-group, timeout, max-silent-time, keep-failed, log-lines,
// system, extra-platforms, system-features, pre- and post-build-hook,
// filter-syscalls, allow-new-privileges, builders and build-hook, and for
// builtin:fetchurl hashed-mirrors and netrc-file.
// A chroot store (--store ROOT) always builds in the sandbox, as Nix.
func ConfigFromSettings(s *config.Settings, layout config.Layout, logger *slog.Logger) (Config, error) {
	cfg := Config{
		BuildUsersGroup:       s.String("build-users-group", ""),
		UserPoolDir:           layout.UserPoolDir,
		SandboxPaths:          s.List("sandbox-paths", nil),
		AllowedImpureHostDeps: s.List("allowed-impure-host-deps", nil),
		System:                s.String("system", DefaultSystem()),
		SystemFeatures:        s.List("system-features", DefaultSystemFeatures()),
		PreBuildHook:          s.String("pre-build-hook", ""),
		PostBuildHook:         s.String("post-build-hook", ""),
		DiffHook:              s.String("diff-hook", ""),
		SandboxBuildDir:       s.String("sandbox-build-dir", "/build"),
		SandboxShmSize:        s.String("sandbox-dev-shm-size", "50%"),
		NixConfig:             s.Text(),
		HashedMirrors:         s.List("hashed-mirrors", nil),
		NetrcFile:             s.String("netrc-file", filepath.Join(layout.ConfDir, "netrc")),
		ChrootStore:           layout.RealStoreDir != string(layout.StoreDir),
		Logger:                logger,
		Builders:              s.String("builders", "@"+filepath.Join(layout.ConfDir, "machines")),
		BuildHook:             s.String("build-hook", ""),
		HookSettings:          s.Map(),
	}
	cfg.ExtraPlatforms = s.List("extra-platforms", DefaultExtraPlatforms(cfg.System))
	switch v := strings.TrimSpace(s.String("max-jobs", "1")); v {
	case "auto":
		cfg.MaxJobs = runtime.NumCPU()
	default:
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return cfg, fmt.Errorf("nix.conf: max-jobs: %q is not a number or 'auto'", v)
		}
		// 0: nothing is built here: remote builders or substitutes only.
		cfg.MaxJobs, cfg.NoLocalBuilds = max(n, 1), n == 0
	}
	switch v := strings.TrimSpace(s.String("sandbox", SandboxOn)); v {
	case "true", "false", "relaxed":
		cfg.Sandbox = v
	default:
		return cfg, fmt.Errorf("nix.conf: sandbox: %q is not true, false or relaxed", v)
	}
	ints := []struct {
		name string
		dst  *int
	}{{"cores", &cfg.Cores}, {"log-lines", &cfg.LogLines}, {"repeat", &cfg.Repeat}}
	for _, x := range ints {
		n, err := s.NonNegInt(x.name, 0)
		if err != nil {
			return cfg, fmt.Errorf("nix.conf: %w", err)
		}
		*x.dst = int(n)
	}
	if _, set := s.Lookup("log-lines"); set && cfg.LogLines == 0 {
		cfg.LogLines = -1 // none, where the Builder's 0 means Nix's default
	}
	durations := []struct {
		name string
		dst  *time.Duration
	}{{"timeout", &cfg.Timeout}, {"max-silent-time", &cfg.MaxSilentTime}}
	for _, x := range durations {
		n, err := s.NonNegInt(x.name, 0)
		if err != nil {
			return cfg, fmt.Errorf("nix.conf: %w", err)
		}
		*x.dst = time.Duration(n) * time.Second
	}
	bools := []struct {
		name string
		dst  *bool
		def  bool
	}{{"keep-failed", &cfg.KeepFailed, false}, {"allow-new-privileges", &cfg.AllowNewPrivileges, false},
		{"sandbox-fallback", &cfg.SandboxFallback, true}, {"run-diff-hook", &cfg.RunDiffHook, false}}
	for _, x := range bools {
		var err error
		if *x.dst, err = s.Bool(x.name, x.def); err != nil {
			return cfg, fmt.Errorf("nix.conf: %w", err)
		}
	}
	maxLog, err := s.NonNegInt("max-build-log-size", 0)
	if err != nil {
		return cfg, fmt.Errorf("nix.conf: %w", err)
	}
	cfg.MaxLogSize = maxLog
	filter, err := s.Bool("filter-syscalls", true)
	if err != nil {
		return cfg, fmt.Errorf("nix.conf: %w", err)
	}
	cfg.NoSyscallFilter = !filter
	keepLogs, err := s.Bool("keep-build-log", true)
	if err != nil {
		return cfg, fmt.Errorf("nix.conf: %w", err)
	}
	cfg.NoBuildLogs = !keepLogs
	enforce, err := s.Bool("enforce-determinism", true)
	if err != nil {
		return cfg, fmt.Errorf("nix.conf: %w", err)
	}
	cfg.NoEnforceDeterminism = !enforce
	return cfg, nil
}
