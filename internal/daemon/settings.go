package daemon

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/daemon/wire"
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
// poll-interval, under their names (what clients send) and their aliases.
// builders="" is handled apart.
var untrustedSettings = []string{"timeout", "build-timeout", "repeat", "build-repeat", "connect-timeout",
	"max-silent-time", "build-max-silent-time", "poll-interval"}

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
	if err := c.args(wire.OpSetOptions); err != nil {
		return err
	}
	if err := c.startWork(); err != nil {
		return err
	}
	s.Overrides = c.filterOverrides(overrides)
	c.opts = s
	c.tun.setVerbosity(s.Verbosity)
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
	return out
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
	v, ok := c.opts.Overrides[name]
	if !ok {
		return nil
	}
	b, err := config.ParseBool(v)
	if err != nil {
		return nil
	}
	return &b
}
