package daemon

import (
	"os"
	"path/filepath"
	"testing"
)

// TestStdioForwardSocket checks how `--stdio` picks between serving the
// store and forwarding to the daemon socket (a state directory this
// process cannot write is stood in for by a missing one: tests run as
// root). The forwarding itself is tested end to end (TestStdioForwards).
func TestStdioForwardSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "socket")
	if err := os.WriteFile(sock, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")
	for _, tc := range []struct {
		uri, stateDir, socket, want string
		wantErr                     bool
	}{
		{uri: "auto", stateDir: dir, socket: sock, want: ""},
		{uri: "", stateDir: dir, socket: sock, want: ""},
		{uri: "auto", stateDir: missing, socket: sock, want: sock},
		{uri: "auto", stateDir: missing, socket: missing, want: ""},
		{uri: "daemon", stateDir: dir, socket: sock, want: sock},
		{uri: "unix:///run/other.sock?root=/x", stateDir: dir, socket: sock, want: "/run/other.sock"},
		{uri: "daemon?trusted=1", stateDir: dir, socket: sock, want: sock},
		{uri: "auto?foo=bar", stateDir: missing, socket: sock, want: sock},
		{uri: "local", stateDir: missing, socket: sock, want: ""},
		{uri: "local?trusted=1", stateDir: missing, socket: sock, want: ""},
		{uri: "local?root=/x", stateDir: missing, socket: sock, wantErr: true},
		{uri: "/some/chroot", stateDir: missing, socket: sock, wantErr: true},
		{uri: "ssh-ng://host", stateDir: dir, socket: sock, wantErr: true},
	} {
		got, err := StdioForwardSocket(tc.uri, tc.stateDir, tc.socket)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("StdioForwardSocket(%q, %s, %s) = %q, %v; want %q (error: %v)", tc.uri, tc.stateDir, tc.socket, got, err, tc.want, tc.wantErr)
		}
	}
}
