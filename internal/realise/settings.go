package realise

import (
	"fmt"
	"os"
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
// narinfo-cache-negative-ttl, fallback, ssl-cert-file and nixyard's
// max-substitution-jobs (default 16). extra-* forms are merged by config.
// (trusted-substituters is applied by the daemon when it filters what
// untrusted clients send.) getenv supplies ssl-cert-file's default, as
// Nix takes it: NIX_SSL_CERT_FILE, else SSL_CERT_FILE, else the first of
// the system's bundle and the default Nix profile's that exists.
func ConfigFromSettings(s *config.Settings, getenv func(string) string) (Config, error) {
	var c Config
	var err error
	c.CAFile = s.String("ssl-cert-file", defaultCAFile(getenv))
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

// Where Nix looks for a CA bundle when neither NIX_SSL_CERT_FILE nor
// SSL_CERT_FILE is set.
var defaultCAFiles = []string{"/etc/ssl/certs/ca-certificates.crt", "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt"}

func defaultCAFile(getenv func(string) string) string {
	for _, k := range []string{"NIX_SSL_CERT_FILE", "SSL_CERT_FILE"} {
		if v := getenv(k); v != "" {
			return v
		}
	}
	for _, f := range defaultCAFiles {
		if _, err := os.Stat(f); err == nil {
			return f
		}
	}
	return "" // the system's roots, as Go finds them
}
