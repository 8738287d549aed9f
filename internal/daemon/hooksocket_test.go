package daemon

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// TestListenHookSocket: the hook's socket is in a directory only the
// daemon's user can enter, named by the daemon's pid; sockets of daemons
// that are gone are removed, others' left.
func TestListenHookSocket(t *testing.T) {
	state := t.TempDir()
	dir := filepath.Join(state, "nixyard-hook")
	os.MkdirAll(dir, 0o755)
	stale := filepath.Join(dir, "4194303.sock") // above the largest pid Linux hands out
	live := filepath.Join(dir, "1.sock")        // init's: alive
	for _, f := range []string{stale, live} {
		os.WriteFile(f, nil, 0o600)
	}
	l, path, err := ListenHookSocket(state)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if path != filepath.Join(dir, strconv.Itoa(os.Getpid())+".sock") {
		t.Errorf("socket at %s", path)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("directory mode: %v %v", st.Mode(), err)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Error("the socket of a daemon that is gone was left")
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("the socket of a live daemon was removed: %v", err)
	}
}
