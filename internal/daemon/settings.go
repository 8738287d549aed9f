package daemon

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/substitute"
)

// clientSettings are the settings a client sent with SetOptions (§5.7),
// kept per connection.
type clientSettings struct {
	KeepFailed, KeepGoing, TryFallback bool
	Verbosity                          Verbosity
	MaxBuildJobs                       uint64
	MaxSilentTime                      uint64
	VerboseBuild                       bool
	BuildCores                         uint64
	UseSubstitutes                     bool
	// Overrides are the accepted overrides, after filtering.
	Overrides map[string]string
}

func defaultClientSettings() clientSettings {
	return clientSettings{Verbosity: lvlInfo, MaxBuildJobs: 1, UseSubstitutes: true, Overrides: map[string]string{}}
}

// untrustedSettings may be set by any client: Nix 2.8's list (timeout,
// repeat, connect-timeout) plus the later additions max-silent-time and
// build-poll-interval (Nix clients send settings under these names, not
// their aliases). builders="" is handled apart.
var untrustedSettings = []string{"timeout", "repeat", "connect-timeout", "max-silent-time", "build-poll-interval"}

func opSetOptionsHandler(ctx context.Context, c *conn) error {
	in := c.in
	var s clientSettings
	s.KeepFailed = in.Bool("keepFailed")
	s.KeepGoing = in.Bool("keepGoing")
	s.TryFallback = in.Bool("tryFallback")
	s.Verbosity = levelFromWire(c.minor, in.U64("verbosity"))
	s.MaxBuildJobs = in.U64("maxBuildJobs")
	s.MaxSilentTime = in.U64("maxSilentTime")
	in.U64("useBuildHook")
	s.VerboseBuild = in.U64("verboseBuild") == uint64(lvlError)
	in.U64("logType")
	in.U64("printBuildTrace")
	s.BuildCores = in.U64("buildCores")
	s.UseSubstitutes = in.Bool("useSubstitutes")
	var overrides map[string]string
	if c.minor >= 12 {
		overrides = in.StringMap("overrides", wire.MaxSmallString)
	}
	if err := c.begin(wire.OpSetOptions); err != nil {
		return err
	}
	s.Overrides = c.filterOverrides(overrides)
	c.settings = s
	c.tun.setVerbosity(s.Verbosity)
	if s.Verbosity >= lvlVomit {
		// The session this connection belongs to, for `nixyard doctor`
		// (and a client at -vvvvv): no other client sees it, since tools
		// that read the JSON log get every activity, whatever its level.
		c.tun.StopActivity(c.tun.StartActivity(lvlVomit, actUnknown, c.sessionAnnouncement(), nil, 0))
	}
	c.stopWork()
	return nil
}

// filterOverrides applies nix-daemon's rules to client overrides.
func (c *conn) filterOverrides(in map[string]string) map[string]string {
	out := map[string]string{}
	for name, value := range in {
		switch {
		case name == "ssh-auth-sock", name == "plugin-files":
			// obsolete or dangerous: ignored
		case name == "experimental-features" || name == "extra-experimental-features":
			c.tun.Log(lvlDebug, "ignoring the client-specified experimental features")
		case c.peer.trusted,
			slices.Contains(untrustedSettings, name),
			name == "builders" && value == "":
			out[name] = value
		case name == "substituters" || name == "extra-substituters" || name == "binary-caches":
			out[name] = c.filterSubstituters(value)
		default:
			c.tun.Log(lvlDebug, fmt.Sprintf("ignoring the client-specified setting '%s', because it is a restricted setting and you are not a trusted user", name))
		}
	}
	var set config.Settings
	for name, value := range out {
		set.Set(name, value)
	}
	for _, name := range config.Unimplemented(&set) {
		c.tun.Warn(fmt.Sprintf("the setting '%s' is not implemented by nixyard; it is ignored", name))
	}
	for _, name := range slices.Sorted(maps.Keys(out)) {
		def, fixed := fixedSettings[name]
		if !fixed {
			continue
		}
		mine, ok := c.srv.opts.Settings[name]
		if !ok {
			mine = def
		}
		if !sameSetting(out[name], mine) {
			c.tun.Warn(fmt.Sprintf("ignoring the setting '%s' = '%s': nixyard applies the daemon's ('%s') to every client", name, out[name], mine))
		}
	}
	return out
}

// fixedSettings are the settings nix-daemon takes from a trusted client
// (for the process it forks for that client) and nixyard keeps
// daemon-wide, with Nix 2.8's defaults: builds are shared between clients,
// and the sandbox, build users, hooks, signing keys and the store's upkeep
// are the host's. A client that sends one with a value other than the
// daemon's is told it is ignored. Lists that Nix computes or extends
// (system-features, sandbox-paths, extra-platforms) are left out: a
// client's copy of the host's nix.conf would differ from the raw text.
// (require-sigs, trusted-users and the like are fixed by nix-daemon too,
// before SetOptions.)
var fixedSettings = map[string]string{
	"sandbox":              "true",
	"sandbox-fallback":     "true",
	"sandbox-build-dir":    "/build",
	"sandbox-dev-shm-size": "50%",
	"build-users-group":    "",
	"filter-syscalls":      "true",
	"allow-new-privileges": "false",
	"pre-build-hook":       "",
	"post-build-hook":      "",
	"diff-hook":            "",
	"run-diff-hook":        "false",
	"keep-build-log":       "true",
	"compress-build-log":   "true",
	"secret-key-files":     "",
	"auto-optimise-store":  "false",
	"min-free":             "0",
	"max-free":             "18446744073709551615",
}

// sameSetting reports whether two values of a setting mean the same:
// equal as Booleans, or as whitespace-separated words.
func sameSetting(a, b string) bool {
	if x, err := config.ParseBool(a); err == nil {
		y, err := config.ParseBool(b)
		return err == nil && x == y
	}
	return slices.Equal(strings.Fields(a), strings.Fields(b))
}

// filterSubstituters keeps the substituters that the daemon's own
// substituters or trusted-substituters list.
func (c *conn) filterSubstituters(value string) string {
	trusted := map[string]bool{}
	for _, k := range []string{"substituters", "extra-substituters", "trusted-substituters", "extra-trusted-substituters"} {
		for _, s := range strings.Fields(c.srv.opts.Settings[k]) {
			trusted[s] = true
		}
	}
	var keep []string
	for _, s := range strings.Fields(value) {
		switch {
		case trusted[s]:
			keep = append(keep, s)
		case !strings.HasSuffix(s, "/") && trusted[s+"/"]:
			keep = append(keep, s+"/")
		default:
			c.tun.Warn(fmt.Sprintf("ignoring untrusted substituter '%s'", s))
		}
	}
	return strings.Join(keep, " ")
}

// overrideBool is the client's accepted override of a Boolean setting,
// or nil if it sent none (or one that is not a Boolean).
func (c *conn) overrideBool(name string) *bool {
	v, ok := c.settings.Overrides[name]
	if !ok {
		return nil
	}
	b, err := config.ParseBool(v)
	if err != nil {
		return nil
	}
	return &b
}

// narinfoTTLs are the narinfo cache TTLs a (trusted) client sent, for the
// lookups made for it; ok is false if it sent neither.
func (c *conn) narinfoTTLs() (t substitute.NarinfoTTLs, ok bool) {
	t = substitute.NarinfoTTLs{Positive: -1, Negative: -1}
	for name, d := range map[string]*time.Duration{"narinfo-cache-positive-ttl": &t.Positive, "narinfo-cache-negative-ttl": &t.Negative} {
		if v, set := c.settings.Overrides[name]; set {
			if n, err := strconv.ParseUint(v, 10, 32); err == nil {
				*d, ok = time.Duration(n)*time.Second, true
			}
		}
	}
	return t, ok
}
