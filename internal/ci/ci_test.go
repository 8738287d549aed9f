package ci

import (
	"strings"
	"testing"
)

func TestGitLabSnippet(t *testing.T) {
	h := Host{StoreRoot: "/srv/ci", Socket: "/srv/ci/jobs/socket"}
	got := h.GitLab()
	for _, want := range []string{
		`executor = "docker"`,
		`environment = ["NIX_REMOTE=unix:///run/nixyard/socket?root=/mnt"]`,
		`volumes = ["/srv/ci/nix/store:/mnt/nix/store:ro", "/srv/ci/jobs:/run/nixyard:ro"]`,
		// The daemon named serves the store the volumes show.
		"nixyard daemon --store /srv/ci --listen /srv/ci/jobs/socket,trusted=false",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("snippet lacks %q:\n%s", want, got)
		}
	}
	for _, m := range h.Mounts() {
		if strings.HasPrefix(m.Host, "/srv/ci/nix/var") {
			t.Errorf("state directory %s is mounted into jobs", m.Host)
		}
	}
}

func TestDefaults(t *testing.T) {
	h := Host{}.WithDefaults()
	if h.StoreRoot != "/" || h.Socket != DefaultSocket {
		t.Fatalf("defaults = %+v", h)
	}
	if m := h.Mounts()[0]; m.Host != "/nix/store" || m.Container != "/mnt/nix/store" {
		t.Fatalf("store mount = %+v", m)
	}
}

// TestCheck: runner-config refuses a socket whose directory, mounted into
// every job, is the host's root or holds the daemon's trusted socket, and
// paths the daemon flag or a volume mount cannot carry.
func TestCheck(t *testing.T) {
	for _, h := range []Host{{}, {Socket: "/run/nixyard-jobs/socket"}, {StoreRoot: "/mnt/cache", Socket: "/mnt/cache/nix/var/nix/job-socket/socket"}} {
		if err := h.Check(); err != nil {
			t.Errorf("%+v: %v", h, err)
		}
	}
	for _, h := range []Host{
		{Socket: "/socket"},
		{Socket: "/nix/var/nix/daemon-socket/socket"},
		{Socket: "/nix/var/nix/daemon-socket/jobs"},
		{StoreRoot: "/mnt/cache", Socket: "/mnt/cache/nix/var/nix/daemon-socket/socket"},
		{Socket: "/run/a,b/socket"},
		{Socket: "/run/a b/socket"},
		{StoreRoot: "/mnt/x:y"},
	} {
		if err := h.Check(); err == nil {
			t.Errorf("%+v: accepted", h)
		}
	}
}
