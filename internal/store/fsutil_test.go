package store

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestFsyncBudget(t *testing.T) {
	const mb = 1 << 20
	for _, tc := range []struct {
		name           string
		dirty, written uint64
		err            error
		want           int
	}{
		{"quiet system", 2 * mb, 1 * mb, nil, 0},
		{"only our own data dirty", 900 * mb, 900 * mb, nil, 0},
		{"a little other data", 70 * mb, 10 * mb, nil, 0},
		{"some other data", 130 * mb, 10 * mb, nil, 30},
		{"gigabytes of it", 1500 * mb, 10 * mb, nil, 372},
		{"more than ever worth fsyncs", 100000 * mb, 10 * mb, nil, fsyncMaxFiles},
		{"unknown", 0, 0, errors.New("no /proc"), fsyncMaxFiles},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := fsyncBudget(func() (uint64, error) { return tc.dirty, tc.err }, tc.written)
			if got != tc.want {
				t.Errorf("fsyncBudget(dirty %d MiB, written %d MiB) = %d, want %d", tc.dirty/mb, tc.written/mb, got, tc.want)
			}
		})
	}
}

// TestSyncTreesBothWays makes trees durable with syncfs and with fsyncs:
// nested directories, files and a symlink that points outside (which the
// fsyncs must not follow).
func TestSyncTreesBothWays(t *testing.T) {
	for _, dirty := range []uint64{0, 1 << 40} {
		dir := t.TempDir()
		var trees []string
		for _, name := range []string{"a", "b"} {
			tree := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Join(tree, "sub/deeper"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(tree, "sub/deeper/f"), []byte("contents"), 0o444); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink("/nonexistent/outside", filepath.Join(tree, "sub/link")); err != nil {
				t.Fatal(err)
			}
			trees = append(trees, tree)
		}
		prev := dirtyBytes
		t.Cleanup(func() { dirtyBytes = prev })
		dirtyBytes = func() (uint64, error) { return dirty, nil }
		s, _ := testStore(t)
		var log strings.Builder
		s.log = slog.New(slog.NewTextHandler(&log, &slog.HandlerOptions{Level: slog.LevelDebug}))
		err := s.syncTrees(trees, 100, s.syncEpoch())
		if err != nil {
			t.Errorf("dirty %d: %v", dirty, err)
		}
		// Per tree: itself, sub, sub/deeper and sub/deeper/f; then their
		// parent. The e2e test reads which way was taken from this line.
		want := map[bool]string{true: "by=syncfs fsyncs=0", false: "by=fsync fsyncs=9"}[dirty == 0]
		if !strings.Contains(log.String(), want) {
			t.Errorf("dirty %d: debug log %q, want %q", dirty, log.String(), want)
		}
		if got, want := LastDurableWay("other line\n"+log.String()), map[bool]string{true: "syncfs", false: "fsync"}[dirty == 0]; got != want {
			t.Errorf("dirty %d: LastDurableWay = %q, want %q", dirty, got, want)
		}
	}
	if _, err := fsyncTrees([]string{filepath.Join(t.TempDir(), "missing")}, 10, noSyncfs); err == nil {
		t.Error("fsyncTrees of a missing tree: no error")
	}
}

// TestStoreSyncEpoch checks the bookkeeping of storeSync: a sync fails if
// a writeback error was reported since the caller's epoch, to whichever
// caller, and not otherwise; after Close it fails.
func TestStoreSyncEpoch(t *testing.T) {
	s := openAt(t, t.TempDir())
	before := s.syncEpoch()
	if err := s.syncStoreFS(before); err != nil {
		t.Fatal(err)
	}
	reportedElsewhere(s, unix.EIO)
	if err := s.syncStoreFS(before); !errors.Is(err, unix.EIO) {
		t.Errorf("sync of paths written before the error: %v, want EIO", err)
	}
	if err := s.syncStoreFS(s.syncEpoch()); err != nil {
		t.Errorf("sync of paths written after the error: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.syncStoreFS(s.syncEpoch()); err == nil || !strings.Contains(err.Error(), "the store is closed") {
		t.Errorf("sync after Close: %v, want an error saying the store is closed", err)
	}
}

// TestSyncPendingOldestEpoch: paths made durable together fail if an error
// was reported since the first of them was written.
func TestSyncPendingOldestEpoch(t *testing.T) {
	forceSyncfs(t)
	s, _ := testStore(t)
	first := s.syncEpoch()
	reportedElsewhere(s, unix.EIO)
	paths := []*pendingPath{{epoch: s.syncEpoch()}, {epoch: first}}
	if err := s.syncPending(paths); !errors.Is(err, unix.EIO) {
		t.Errorf("paths written before and after an error: %v, want EIO", err)
	}
	paths[1].epoch = s.syncEpoch()
	if err := s.syncPending(paths); err != nil {
		t.Errorf("paths written after the error: %v", err)
	}
}

// TestStoreSyncShared: callers that arrive while a sync runs all wait for
// it, then share one sync of their own (begun after their calls); a caller
// that arrives after that gets a sync of its own.
func TestStoreSyncShared(t *testing.T) {
	s := openAt(t, t.TempDir())
	t.Cleanup(func() { s.Close() })
	var calls atomic.Int32
	inFirst, releaseFirst := make(chan struct{}), make(chan struct{})
	var release sync.Once
	prev := syncfs
	t.Cleanup(func() {
		release.Do(func() { close(releaseFirst) }) // if the test stopped early
		syncfs = prev
	})
	syncfs = func(fd int) error {
		if calls.Add(1) == 1 {
			close(inFirst)
			<-releaseFirst
		}
		return prev(fd)
	}

	const waiters = 4
	errs := make(chan error, waiters+1)
	go func() { errs <- s.syncStoreFS(s.syncEpoch()) }()
	<-inFirst
	for range waiters {
		go func() { errs <- s.syncStoreFS(s.syncEpoch()) }()
	}
	waitForWaiters(t, waiters, "(*Store).syncStoreFS")
	release.Do(func() { close(releaseFirst) })
	for range waiters + 1 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := calls.Load(); n != 2 {
		t.Errorf("%d syncfs calls for one caller and %d that arrived during its sync, want 2", n, waiters)
	}
	if err := s.syncStoreFS(s.syncEpoch()); err != nil {
		t.Fatal(err)
	}
	if n := calls.Load(); n != 3 {
		t.Errorf("%d syncfs calls after a later caller, want 3", n)
	}
}

// waitForWaiters waits until n goroutines are blocked on a mutex in fn
// (a function name as stack traces print it).
func waitForWaiters(t *testing.T, n int, fn string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		blocked := 0
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "[sync.Mutex.Lock") && strings.Contains(g, fn) {
				blocked++
			}
		}
		if blocked >= n {
			return
		}
	}
	t.Fatalf("fewer than %d goroutines blocked in %s after 10 s", n, fn)
}

// reportedElsewhere makes s look as if another caller's syncfs had been
// told of err.
func reportedElsewhere(s *Store, err error) {
	s.fsSync.mu.Lock()
	s.fsSync.epoch.Add(1)
	s.fsSync.lastErr = err
	s.fsSync.mu.Unlock()
}

// TestFsyncTreesManyFiles: beyond the budget, one syncfs does.
func TestFsyncTreesManyFiles(t *testing.T) {
	tree := filepath.Join(t.TempDir(), "many")
	if err := os.Mkdir(tree, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 101 {
		if err := os.WriteFile(filepath.Join(tree, strconv.Itoa(i)), nil, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	// 101 files, the tree and its parent: 103 fsyncs.
	for _, tc := range []struct {
		limit     int
		wantWhole bool
	}{{0, true}, {100, true}, {102, true}, {103, false}, {1000, false}} {
		whole := 0
		fsyncs, err := fsyncTrees([]string{tree}, tc.limit, func() error { whole++; return nil })
		if err != nil {
			t.Errorf("budget %d: %v", tc.limit, err)
		}
		if (whole > 0) != tc.wantWhole {
			t.Errorf("budget %d: %d syncfs, want syncfs %v", tc.limit, whole, tc.wantWhole)
		}
		if want := map[bool]int{true: 0, false: 103}[tc.wantWhole]; fsyncs != want {
			t.Errorf("budget %d: %d fsyncs, want %d", tc.limit, fsyncs, want)
		}
	}
}

// noSyncfs stands for syncfs where none is expected.
func noSyncfs() error { return errors.New("unexpected syncfs") }

func TestReleaseAtLeast(t *testing.T) {
	for release, want := range map[string]bool{
		"5.8.0": true, "5.10.0-28-amd64": true, "6.18.44-fc-v782": true,
		"5.7.19": false, "4.19.0-6-amd64": false, "garbage": false,
	} {
		if got := releaseAtLeast(release, 5, 8); got != want {
			t.Errorf("releaseAtLeast(%q, 5, 8) = %v, want %v", release, got, want)
		}
	}
}
