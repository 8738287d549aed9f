package store

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestPathLockAcrossStores: a path lock excludes another Store on the same
// root (another process: real Nix, or the old daemon still draining during
// an upgrade), and a waiter that gets the lock file its holder deleted on
// unlock tries again rather than holding a stale lock beside a new holder.
func TestPathLockAcrossStores(t *testing.T) {
	s1, root := testStore(t)
	s2, s3 := openAt(t, root), openAt(t, root)
	t.Cleanup(func() { s2.Close(); s3.Close() })
	ctx := context.Background()
	p := addText(t, s1, "locked", "locked")

	l1, err := s1.lockPath(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if l, err := s2.tryLockPath(ctx, p); err != nil || l != nil {
		t.Fatalf("another store took a held path lock (%v)", err)
	}
	got := make(chan *pathLock, 1)
	go func() {
		l, err := s2.lockPath(ctx, p)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	// s2 has opened the lock file and polls for it.
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(string(buf[:runtime.Stack(buf, true)]), "store.lockFD"); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the second store never waited for the lock")
		}
	}
	l1.unlock()
	l2 := <-got
	defer l2.unlock()
	if l, err := s3.tryLockPath(ctx, p); err != nil || l != nil {
		t.Errorf("a third store took the path lock the second holds (%v)", err)
		l.unlock()
	}
}
