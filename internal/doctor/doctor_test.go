package doctor

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/daemon"
	"github.com/nixyard/nixyard/internal/store"
)

func TestParseStoreURL(t *testing.T) {
	for in, want := range map[string][2]string{
		"":                                     {"/nix/var/nix/daemon-socket/socket", "/"},
		"daemon":                               {"/nix/var/nix/daemon-socket/socket", "/"},
		"unix:///run/nixyard/socket?root=/mnt": {"/run/nixyard/socket", "/mnt"},
		"unix:///s":                            {"/s", "/"},
	} {
		s, r, err := ParseStoreURL(in)
		if err != nil || s != want[0] || r != want[1] {
			t.Errorf("ParseStoreURL(%q) = %q, %q, %v; want %q", in, s, r, err, want)
		}
	}
	for _, in := range []string{"local?root=/mnt", "ssh-ng://host", "/mnt/nix"} {
		if _, _, err := ParseStoreURL(in); err == nil {
			t.Errorf("ParseStoreURL(%q) succeeded", in)
		}
	}
}

// TestRunAgainstJobSocket runs the doctor against an in-process daemon
// listening with the job-socket policy, on an empty store.
func TestRunAgainstJobSocket(t *testing.T) {
	root := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := store.Open(ctx, store.Config{
		StoreDir: "/nix/store", RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir: filepath.Join(root, "nix/var/nix"), LogDir: filepath.Join(root, "nix/var/log/nix"),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	sock := filepath.Join(t.TempDir(), "job.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := daemon.New(daemon.Options{Store: st})
	done := make(chan error, 1)
	go func() {
		done <- srv.ServeAll(ctx, []daemon.Listener{{Listener: l, Policy: daemon.ListenPolicy{Untrusted: true, Tenant: "t1"}}})
	}()
	r := Run(ctx, "unix://"+sock+"?root="+root)
	var out strings.Builder
	r.Write(&out)
	for _, want := range []string{
		"ok   socket",
		"ok   protocol   1.37",
		"ok   trust      untrusted",
		"warn session    job=none tenant=t1 trust=untrusted",
		"warn store      the daemon's store is empty",
		// An empty store is checked for being read-only too (a new host's):
		// this test's is writable.
		"FAIL read-only",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	if !r.Failed() {
		t.Errorf("report passed with a writable store:\n%s", out.String())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// Nothing listening: the socket check fails.
	r = Run(context.Background(), "unix://"+sock+"?root="+root)
	if !r.Failed() || r.Checks[len(r.Checks)-1].Name != "socket" {
		t.Errorf("doctor without a daemon: %+v", r.Checks)
	}
}
