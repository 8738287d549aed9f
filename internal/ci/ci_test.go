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
