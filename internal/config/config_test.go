package config

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("nix.conf", "# comment\ntrusted-users = root @wheel # trailing\nsandbox=false\ninclude extra.conf\n!include missing.conf\n")
	write("extra.conf", "extra-trusted-users = ci\nmax-jobs = 4\n")
	env := map[string]string{"NIX_CONFIG": "require-sigs = false\nextra-trusted-users = bob"}
	s, err := Load(dir, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if got := s.List("trusted-users", nil); !reflect.DeepEqual(got, []string{"root", "@wheel", "ci", "bob"}) {
		t.Errorf("trusted-users = %q", got)
	}
	if b, err := s.Bool("sandbox", true); err != nil || b {
		t.Errorf("sandbox = %v, %v", b, err)
	}
	if b, err := s.Bool("require-sigs", true); err != nil || b {
		t.Errorf("require-sigs = %v, %v", b, err)
	}
	if n, err := s.Int("max-jobs", 1); err != nil || n != 4 {
		t.Errorf("max-jobs = %v, %v", n, err)
	}
	if got := s.List("allowed-users", []string{"*"}); !reflect.DeepEqual(got, []string{"*"}) {
		t.Errorf("allowed-users default = %q", got)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "nix.conf"), []byte("include nope.conf\n"), 0o644)
	if _, err := Load(dir, func(string) string { return "" }); err == nil {
		t.Error("missing include accepted")
	}
	os.WriteFile(filepath.Join(dir, "nix.conf"), []byte("just words\n"), 0o644)
	if _, err := Load(dir, func(string) string { return "" }); err == nil {
		t.Error("line without '=' accepted")
	}
	os.WriteFile(filepath.Join(dir, "nix.conf"), []byte("include nix.conf\n"), 0o644)
	if _, err := Load(dir, func(string) string { return "" }); err == nil {
		t.Error("include cycle accepted")
	}
	if _, err := Load(t.TempDir(), func(string) string { return "" }); err != nil {
		t.Errorf("missing nix.conf: %v", err)
	}
}

func TestLayout(t *testing.T) {
	none := func(string) string { return "" }
	l := NewLayout("", none)
	if l.RealStoreDir != "/nix/store" || l.StateDir != "/nix/var/nix" || l.SocketPath != "/nix/var/nix/daemon-socket/socket" || l.LogDir != "/nix/var/log/nix" {
		t.Errorf("default layout %+v", l)
	}
	l = NewLayout("/r", none)
	if l.StoreDir != "/nix/store" || l.RealStoreDir != "/r/nix/store" || l.StateDir != "/r/nix/var/nix" || l.SocketPath != "/r/nix/var/nix/daemon-socket/socket" {
		t.Errorf("chroot layout %+v", l)
	}
	env := map[string]string{"NIX_STATE_DIR": "/s", "NIX_DAEMON_SOCKET_PATH": "/sock", "NIX_CONF_DIR": "/c"}
	l = NewLayout("", func(k string) string { return env[k] })
	if l.StateDir != "/s" || l.SocketPath != "/sock" || l.ConfDir != "/c" {
		t.Errorf("env layout %+v", l)
	}
	env = map[string]string{"NIX_STORE_DIR": "/st/", "NIX_LOG_DIR": "/logs"}
	l = NewLayout("", func(k string) string { return env[k] })
	if l.StoreDir != "/st" || l.RealStoreDir != "/st" || l.LogDir != "/logs" || l.StateDir != "/nix/var/nix" {
		t.Errorf("NIX_STORE_DIR, NIX_LOG_DIR layout %+v", l)
	}
	// A chroot store keeps its logical store dir, under the root; its
	// state and logs are under the root whatever the environment says.
	l = NewLayout("/r", func(k string) string { return env[k] })
	if l.StoreDir != "/st" || l.RealStoreDir != "/r/st" || l.LogDir != "/r/nix/var/log/nix" {
		t.Errorf("chroot layout with NIX_STORE_DIR, NIX_LOG_DIR %+v", l)
	}
	// Build users are locked in the host's userpool, whatever the store.
	for _, c := range []struct {
		root, stateEnv, want string
	}{
		{"", "", "/nix/var/nix/userpool"},
		{"/r", "", "/nix/var/nix/userpool"},
		{"", "/s", "/s/userpool"},
		{"/r", "/s", "/s/userpool"},
	} {
		l = NewLayout(c.root, func(k string) string {
			if k == "NIX_STATE_DIR" {
				return c.stateEnv
			}
			return ""
		})
		if l.UserPoolDir != c.want {
			t.Errorf("root %q, NIX_STATE_DIR %q: UserPoolDir %q, want %q", c.root, c.stateEnv, l.UserPoolDir, c.want)
		}
	}
}

// TestAliases: Nix's old setting names set the current ones, extra- works
// with them too, and extra-platforms is a setting of its own.
func TestAliases(t *testing.T) {
	var s Settings
	s.Set("build-max-jobs", "4")
	s.Set("binary-caches", "http://a")
	s.Set("extra-binary-caches", "http://b")
	s.Set("gc-keep-outputs", "true")
	s.Set("extra-platforms", "i686-linux")
	s.Set("extra-extra-platforms", "aarch64-linux")
	for name, want := range map[string]string{
		"max-jobs":        "4",
		"substituters":    "http://a http://b",
		"keep-outputs":    "true",
		"extra-platforms": "i686-linux aarch64-linux",
	} {
		if got, ok := s.Lookup(name); !ok || got != want {
			t.Errorf("%s = %q (set %v), want %q", name, got, ok, want)
		}
	}
	if _, ok := s.Lookup("platforms"); ok {
		t.Error("extra-platforms set a setting named platforms")
	}
}

func TestUnimplemented(t *testing.T) {
	var s Settings
	s.Set("max-jobs", "4")                        // implemented
	s.Set("diff-hook", "/bin/hook")               // implemented
	s.Set("builders", "ssh://a")                  // implemented
	s.Set("build-repeat", "2")                    // implemented, under its old name
	s.Set("build-impersonate-linux-26", "true")   // an alias of an ignored one
	s.Set("allowed-impure-host-deps", "/usr/lib") // implemented
	s.Set("compress-build-log", "false")          // tuning, ignored
	s.Set("download-attempts", "5")               // tuning, ignored, at Nix's default
	s.Set("http-connections", "50")               // tuning, ignored
	if got := strings.Join(Unimplemented(&s), " "); got != "impersonate-linux-26" {
		t.Errorf("Unimplemented: %q", got)
	}
	if got := strings.Join(IgnoredTuning(&s), " "); got != "compress-build-log http-connections" {
		t.Errorf("IgnoredTuning: %q", got)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"1": 1, "4096": 4096, "10K": 10 << 10, "3m": 3 << 20, "200G": 200 << 30, "2T": 2 << 40} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "G", "-1", "1.5G", "99999999999T", "12X"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q): no error", in)
		}
	}
}

func TestNonNegInt(t *testing.T) {
	s, err := Load(t.TempDir(), func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if n, err := s.NonNegInt("cores", 3); n != 3 || err != nil {
		t.Errorf("unset: %d, %v", n, err)
	}
	s.Set("cores", "0")
	if n, err := s.NonNegInt("cores", 3); n != 0 || err != nil {
		t.Errorf("0: %d, %v", n, err)
	}
	s.Set("cores", "-1")
	if _, err := s.NonNegInt("cores", 3); err == nil || err.Error() != `setting cores: "-1" is not a non-negative integer` {
		t.Errorf("-1: %v", err)
	}
	s.Set("cores", "many")
	if _, err := s.NonNegInt("cores", 3); err == nil || err.Error() != `setting cores: "many" is not an integer` {
		t.Errorf("many: %v", err)
	}
}

func TestUnknown(t *testing.T) {
	var s Settings
	for _, kv := range [][2]string{
		{"sandbox", "true"}, {"build-max-jobs", "2"}, {"extra-substituters", "http://c"},
		{"extra-platforms", "i686-linux"}, {"job-lease", "2h"}, {"sandboxx", "true"},
		{"extra-sandbox-pathz", "/x"}, {"jb-lease", "1h"}, {"binary-caches-parallel-connections", "8"},
	} {
		s.Set(kv[0], kv[1])
	}
	if got, want := Unknown(&s), []string{"jb-lease", "sandbox-pathz", "sandboxx"}; !slices.Equal(got, want) {
		t.Errorf("Unknown = %q, want %q", got, want)
	}
}
