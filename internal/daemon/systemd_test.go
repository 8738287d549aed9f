package daemon

import (
	"os"
	"strconv"
	"testing"
)

// TestSystemdListenerEnvironment checks the variables SystemdListeners
// accepts before it touches file descriptor 3 (the socket itself is
// covered end to end by e2e's TestSocketActivation).
func TestSystemdListenerEnvironment(t *testing.T) {
	pid := os.Getpid()
	for _, tc := range []struct {
		name, fds, pid string
		wantErr        bool
	}{
		{"not activated", "", "", false},
		{"another process's sockets", "1", strconv.Itoa(pid + 1), true},
		{"no pid", "1", "", true},
		{"not a number", "x", strconv.Itoa(pid), true},
		{"none", "0", strconv.Itoa(pid), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("LISTEN_FDS", tc.fds)
			t.Setenv("LISTEN_PID", tc.pid)
			ls, err := SystemdListeners(pid)
			if ls != nil {
				t.Fatal("got listeners")
			}
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want an error: %v", err, tc.wantErr)
			}
		})
	}
}
