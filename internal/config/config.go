// Package config reads Nix's configuration the way nix-daemon does: nix.conf
// from NIX_CONF_DIR (with include and !include), then NIX_CONFIG, then
// command-line --option overrides; and it computes the on-disk layout of a
// store from the environment (NIX_STORE_DIR, NIX_STATE_DIR, NIX_LOG_DIR,
// NIX_DAEMON_SOCKET_PATH) and an optional chroot root.
package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// maxConfBytes bounds one configuration file; nix.conf files are small and a
// larger one is almost certainly not a configuration file.
const maxConfBytes = 1 << 20

// maxIncludeDepth bounds include chains (Nix has no limit; a cycle would
// otherwise recurse forever).
const maxIncludeDepth = 16

// Settings holds configuration values by name. Values are kept as the text
// after "="; list settings are whitespace-separated. The zero value is empty
// and ready to use. Settings is not safe for concurrent mutation.
type Settings struct {
	values map[string]string
}

// Load reads confDir/nix.conf (a missing file is not an error) and then the
// NIX_CONFIG text from getenv, as Nix does at start-up.
func Load(confDir string, getenv func(string) string) (*Settings, error) {
	s := &Settings{}
	if err := s.loadFile(filepath.Join(confDir, "nix.conf"), false, 0); err != nil {
		return nil, err
	}
	if text := getenv("NIX_CONFIG"); text != "" {
		if err := s.parse(text, "NIX_CONFIG", "", 0); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func (s *Settings) loadFile(path string, optional bool, depth int) error {
	if depth > maxIncludeDepth {
		return fmt.Errorf("config %s: includes nested deeper than %d", path, maxIncludeDepth)
	}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		if depth == 0 || optional {
			return nil
		}
		return fmt.Errorf("config: included file %s does not exist", path)
	}
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfBytes+1))
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	if len(data) > maxConfBytes {
		return fmt.Errorf("config %s: larger than %d bytes", path, maxConfBytes)
	}
	return s.parse(string(data), path, filepath.Dir(path), depth)
}

// parse applies configuration text. Lines are "name = value", "include
// path" or "!include path"; "#" starts a comment.
func (s *Settings) parse(text, source, dir string, depth int) error {
	for i, line := range strings.Split(text, "\n") {
		if j := strings.IndexByte(line, '#'); j >= 0 {
			line = line[:j]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		fields := strings.Fields(line)
		if (fields[0] == "include" || fields[0] == "!include") && len(fields) == 2 {
			p := fields[1]
			if !filepath.IsAbs(p) {
				p = filepath.Join(dir, p)
			}
			if err := s.loadFile(p, fields[0] == "!include", depth+1); err != nil {
				return err
			}
			continue
		}
		name, value, ok := strings.Cut(line, "=")
		if !ok {
			return fmt.Errorf("config %s line %d: expected 'name = value', got %q", source, i+1, line)
		}
		s.Set(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	return nil
}

// aliases are the old names Nix 2.8 still accepts for its settings.
var aliases = map[string]string{
	"build-fallback":                     "fallback",
	"build-max-jobs":                     "max-jobs",
	"build-cores":                        "cores",
	"build-max-silent-time":              "max-silent-time",
	"build-timeout":                      "timeout",
	"build-use-substitutes":              "substitute",
	"build-keep-log":                     "keep-build-log",
	"build-compress-log":                 "compress-build-log",
	"build-max-log-size":                 "max-build-log-size",
	"gc-keep-outputs":                    "keep-outputs",
	"gc-keep-derivations":                "keep-derivations",
	"env-keep-derivations":               "keep-env-derivations",
	"build-use-chroot":                   "sandbox",
	"build-use-sandbox":                  "sandbox",
	"build-chroot-dirs":                  "sandbox-paths",
	"build-sandbox-paths":                "sandbox-paths",
	"build-repeat":                       "repeat",
	"binary-cache-public-keys":           "trusted-public-keys",
	"binary-caches":                      "substituters",
	"trusted-binary-caches":              "trusted-substituters",
	"build-impersonate-linux-26":         "impersonate-linux-26",
	"binary-caches-parallel-connections": "http-connections",
}

// Set sets name to value. "extra-NAME" appends to NAME's list, as in Nix
// (extra-platforms is a setting of its own); old names are aliases of
// the current ones.
func (s *Settings) Set(name, value string) {
	if s.values == nil {
		s.values = map[string]string{}
	}
	base, extra := strings.CutPrefix(name, "extra-")
	if name == "extra-platforms" {
		base, extra = name, false
	}
	if canon, ok := aliases[base]; ok {
		base = canon
	}
	if extra {
		if old := s.values[base]; old != "" {
			value = old + " " + value
		}
	}
	s.values[base] = value
}

// Lookup returns the raw value of name and whether it is set.
func (s *Settings) Lookup(name string) (string, bool) {
	v, ok := s.values[name]
	return v, ok
}

// String returns the value of name, or def when unset.
func (s *Settings) String(name, def string) string {
	if v, ok := s.values[name]; ok {
		return v
	}
	return def
}

// List returns the whitespace-separated words of name, or def when unset.
func (s *Settings) List(name string, def []string) []string {
	if v, ok := s.values[name]; ok {
		return strings.Fields(v)
	}
	return def
}

// Bool returns name as a Boolean (see ParseBool), or def when unset.
func (s *Settings) Bool(name string, def bool) (bool, error) {
	v, ok := s.values[name]
	if !ok {
		return def, nil
	}
	b, err := ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("setting %s: %w", name, err)
	}
	return b, nil
}

// ParseBool parses a Boolean setting as Nix does: true, yes or 1; false,
// no or 0.
func ParseBool(v string) (bool, error) {
	switch v {
	case "true", "yes", "1":
		return true, nil
	case "false", "no", "0":
		return false, nil
	}
	return false, fmt.Errorf("%q is not a Boolean (true or false)", v)
}

// Int returns name as an integer, or def when unset.
func (s *Settings) Int(name string, def int64) (int64, error) {
	v, ok := s.values[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("setting %s: %q is not an integer", name, v)
	}
	return n, nil
}

// NonNegInt is Int for a setting that may not be negative (a count, a
// size or a time).
func (s *Settings) NonNegInt(name string, def int64) (int64, error) {
	n, err := s.Int(name, def)
	if err == nil && n < 0 {
		err = fmt.Errorf("setting %s: %q is not a non-negative integer", name, s.values[name])
	}
	return n, err
}

// Map returns a copy of every setting.
func (s *Settings) Map() map[string]string {
	m := make(map[string]string, len(s.values))
	for k, v := range s.values {
		m[k] = v
	}
	return m
}

// Text returns every setting as nix.conf text, one "name = value" line
// each, sorted by name (what Nix hands a post-build hook in NIX_CONFIG).
func (s *Settings) Text() string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(s.values)) {
		fmt.Fprintf(&b, "%s = %s\n", k, s.values[k])
	}
	return b.String()
}

// unimplemented are settings nix-daemon acts on that nixyard does not,
// with the values that make them no-ops (Nix's defaults, where nixyard
// behaves the same): a sandbox detail.
var unimplemented = map[string][]string{
	"impersonate-linux-26": {"false"},
}

// ignoredTuning are settings of the daemon's own upkeep that nixyard
// ignores, with Nix's defaults: build logs (nixyard compresses every one
// past 4 KiB), the database, and downloads (nixyard's own retries and
// timeouts apply). The daemon names those its nix.conf sets otherwise; a
// client's copy of them is not worth a warning on every command.
var ignoredTuning = map[string][]string{
	"compress-build-log":       {"true"},
	"use-sqlite-wal":           {"true"},
	"fsync-metadata":           {"true"},
	"preallocate-contents":     {"false"},
	"download-attempts":        {"5"},
	"http-connections":         {"25"},
	"stalled-download-timeout": {"300"},
}

// Unimplemented lists, sorted, the settings of s that nix-daemon would
// act on and nixyard ignores: those set to anything but a no-op value.
func Unimplemented(s *Settings) []string { return setOtherwise(s, unimplemented) }

// IgnoredTuning lists, sorted, the settings of s among ignoredTuning set
// to anything but Nix's default.
func IgnoredTuning(s *Settings) []string { return setOtherwise(s, ignoredTuning) }

// Unknown lists, sorted, the settings of s that are neither Nix 2.8's
// (nor their old names) nor nixyard's own: typing mistakes, which Nix
// warns of ("unknown setting") and ignores.
func Unknown(s *Settings) []string {
	var names []string
	for name := range s.values {
		if !nixSettings[name] && !ownSettings[name] {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

// nixSettings are the settings Nix 2.8 knows on Linux (`nix show-config`
// lists them), besides the aliases.
var nixSettings = setOf(`accept-flake-config access-tokens allow-dirty
allow-import-from-derivation allow-new-privileges allow-symlinked-store
allow-unsafe-native-code-during-evaluation allowed-impure-host-deps
allowed-uris allowed-users auto-optimise-store bash-prompt
bash-prompt-suffix build-hook build-poll-interval build-users-group
builders builders-use-substitutes commit-lockfile-summary
compress-build-log connect-timeout cores diff-hook download-attempts
enforce-determinism eval-cache experimental-features extra-platforms
fallback filter-syscalls flake-registry fsync-metadata gc-reserved-space
hashed-mirrors http-connections http2 ignored-acls impersonate-linux-26
keep-build-log keep-derivations keep-env-derivations keep-failed
keep-going keep-outputs log-lines max-build-log-size max-free max-jobs
max-silent-time min-free min-free-check-interval nar-buffer-size
narinfo-cache-negative-ttl narinfo-cache-positive-ttl netrc-file
nix-path plugin-files post-build-hook pre-build-hook
preallocate-contents print-missing pure-eval repeat require-sigs
restrict-eval run-diff-hook sandbox sandbox-build-dir
sandbox-dev-shm-size sandbox-fallback sandbox-paths secret-key-files
show-trace stalled-download-timeout store substitute substituters
sync-before-registering system system-features tarball-ttl timeout
trace-function-calls trusted-public-keys trusted-substituters
trusted-users use-case-hack use-registries use-sqlite-wal
user-agent-suffix warn-dirty`)

// ownSettings are nixyard's settings that Nix 2.8 does not have (later
// Nix's ssl-cert-file among them).
var ownSettings = setOf(`job-lease job-max-connections job-namespace-depth max-substitution-jobs ssl-cert-file`)

func setOf(words string) map[string]bool {
	m := map[string]bool{}
	for _, w := range strings.Fields(words) {
		m[w] = true
	}
	return m
}

// setOtherwise lists, sorted, the settings of s among those of noops that
// are set to a value not listed there.
func setOtherwise(s *Settings, noops map[string][]string) []string {
	var names []string
	for name, ok := range noops {
		if v, set := s.Lookup(name); set && !slices.Contains(ok, strings.TrimSpace(v)) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

// ParseSize reads a positive size in bytes, with an optional K, M, G or T
// suffix (powers of 1024), as "200G".
func ParseSize(s string) (uint64, error) {
	mult := uint64(1)
	num := strings.ToUpper(strings.TrimSpace(s))
	if n := len(num); n > 0 {
		if i := strings.IndexByte("KMGT", num[n-1]); i >= 0 {
			mult = 1 << (10 * (i + 1))
			num = num[:n-1]
		}
	}
	v, err := strconv.ParseUint(num, 10, 64)
	if err != nil || v == 0 || v > math.MaxUint64/mult {
		return 0, fmt.Errorf("%q is not a positive size (bytes, or with K, M, G or T)", s)
	}
	return v * mult, nil
}
