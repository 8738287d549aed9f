package realise

import (
	"fmt"
	"time"

	"github.com/nixyard/nixyard/internal/config"
)

// Nix's defaults for the settings below.
var (
	defaultSubstituters      = []string{"https://cache.nixos.org/"}
	defaultTrustedPublicKeys = []string{"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="}
)

// ConfigFromSettings reads the daemon's substitution settings from
// nix.conf: substituters, trusted-public-keys,
// require-sigs, connect-timeout, narinfo-cache-positive-ttl,
// narinfo-cache-negative-ttl, fallback and nixyard's
// max-substitution-jobs (default 16). extra-* forms are merged by config.
// (trusted-substituters is applied by the daemon when it filters what
// untrusted clients send.)
func ConfigFromSettings(s *config.Settings) (Config, error) {
	var c Config
	var err error
	c.Substituters = dedup(s.List("substituters", defaultSubstituters))
	c.TrustedPublicKeys = s.List("trusted-public-keys", defaultTrustedPublicKeys)
	if c.RequireSigs, err = s.Bool("require-sigs", true); err != nil {
		return c, err
	}
	if c.Fallback, err = s.Bool("fallback", false); err != nil {
		return c, err
	}
	jobs, err := s.Int("max-substitution-jobs", 16)
	if err != nil {
		return c, err
	}
	if jobs < 1 {
		return c, fmt.Errorf("setting max-substitution-jobs: %d is not a positive number", jobs)
	}
	c.MaxJobs = int(jobs)
	secs := func(name string, def int64) (time.Duration, error) {
		n, err := s.Int(name, def)
		if err != nil {
			return 0, err
		}
		if n < 0 {
			return 0, fmt.Errorf("setting %s: %d is negative", name, n)
		}
		return time.Duration(n) * time.Second, nil
	}
	if c.ConnectTimeout, err = secs("connect-timeout", 0); err != nil {
		return c, err
	}
	if c.PositiveTTL, err = secs("narinfo-cache-positive-ttl", 30*24*3600); err != nil {
		return c, err
	}
	if c.NegativeTTL, err = secs("narinfo-cache-negative-ttl", 3600); err != nil {
		return c, err
	}
	// 0 means "do not remember" in nix.conf, but "default" in
	// substitute.Config.
	if c.PositiveTTL == 0 {
		c.PositiveTTL = -1
	}
	if c.NegativeTTL == 0 {
		c.NegativeTTL = -1
	}
	return c, nil
}
