package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/pagecache"
)

// holdGroup makes s look as if a group were being committed, so that
// AddToStoreNar callers queue up; release then hands the queue over as
// commitPath's leader does.
func holdGroup(s *Store) (queued func() int, release func()) {
	q := &s.commits
	q.mu.Lock()
	q.running = true
	q.mu.Unlock()
	queued = func() int {
		q.mu.Lock()
		defer q.mu.Unlock()
		return len(q.queued)
	}
	release = func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		if len(q.queued) > 0 {
			q.queued[0].lead = true
			q.queued[0].wake <- struct{}{}
		} else {
			q.running = false
		}
	}
	return queued, release
}

// waitFor polls cond until it holds (or fails the test after 10 s).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// countCommits counts the store's write transactions from now on.
func countCommits(s *Store) *atomic.Int64 {
	var n atomic.Int64
	prev := s.db.onCommit
	s.db.onCommit = func(c commit) {
		n.Add(1)
		if prev != nil {
			prev(c)
		}
	}
	return &n
}

// Paths that reach the commit step while a group is running are committed
// together, in one transaction, and a caller whose context is cancelled
// while it waits does not disturb the others (its path is committed too).
func TestGroupCommit(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	baseInfo := addNAR(t, s, "base", map[string]string{"f": "base"})
	const n = 12
	var infos []PathInfo
	var nars [][]byte
	for i := range n {
		d := narOf(t, map[string]string{"a": fmt.Sprint("content ", i), "d/b": strings.Repeat("x", 1000*i)})
		var refs []storepath.Path
		if i%2 == 0 {
			refs = []storepath.Path{baseInfo.Path}
		}
		infos = append(infos, caNARInfo(t, s, fmt.Sprint("p", i), d, refs))
		nars = append(nars, d)
	}
	queued, release := holdGroup(s)
	commits := countCommits(s)
	errs := make([]error, n)
	cancels := make([]context.CancelFunc, n)
	var wg sync.WaitGroup
	for i := range n {
		cctx, cancel := context.WithCancel(ctx)
		cancels[i] = cancel
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.AddToStoreNar(cctx, infos[i], bytes.NewReader(nars[i]), AddOptions{})
		}()
	}
	waitFor(t, "all paths queued", func() bool { return queued() == n })
	for i := 0; i < n; i += 3 {
		cancels[i]()
	}
	release()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("path %d: %v", i, err)
		}
		if ok, err := s.IsValidPath(ctx, infos[i].Path); !ok || err != nil {
			t.Errorf("path %d: valid %v, %v", i, ok, err)
		}
		cancels[i]()
	}
	if c := commits.Load(); c != 1 {
		t.Errorf("%d transactions for one group, want 1", c)
	}
	if s.commits.running || len(s.commits.queued) > 0 {
		t.Error("the commit queue is still running or holds paths")
	}
	refs, err := s.QueryPathInfo(ctx, infos[0].Path)
	if err != nil || len(refs.References) != 1 || refs.References[0] != baseInfo.Path {
		t.Errorf("references of path 0: %v, %v", refs, err)
	}
	ents, _ := os.ReadDir(s.realDir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".lock") {
			t.Errorf("lock file left: %s", e.Name())
		}
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

// Many concurrent additions, without any help: every one succeeds and the
// store is consistent.
func TestGroupCommitConcurrent(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	const n = 40
	var wg sync.WaitGroup
	errs := make([]error, n)
	infos := make([]PathInfo, n)
	for i := range n {
		d := narOf(t, map[string]string{"f": fmt.Sprint("concurrent ", i)})
		infos[i] = caNARInfo(t, s, "c", d, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.AddToStoreNar(ctx, infos[i], bytes.NewReader(d), AddOptions{})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("path %d: %v", i, err)
		}
		if ok, _ := s.IsValidPath(ctx, infos[i].Path); !ok {
			t.Errorf("path %d not valid", i)
		}
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

// A member whose registration is refused (its reference vanished after it
// was checked) fails alone, with an error that names it; the rest of its
// group is registered.
func TestGroupCommitBadMember(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	refInfo := addNAR(t, s, "ref", map[string]string{"f": "ref"})
	var group []*groupMember
	var infos []PathInfo
	for i := range 4 {
		d := narOf(t, map[string]string{"f": fmt.Sprint("member ", i)})
		var refs []storepath.Path
		if i == 2 {
			refs = []storepath.Path{refInfo.Path}
		}
		info := caNARInfo(t, s, "m", d, refs)
		b := s.newBatch(AddOptions{})
		if err := b.add(ctx, info, bytes.NewReader(d)); err != nil {
			t.Fatal(err)
		}
		group = append(group, &groupMember{pp: b.pending[0]})
		infos = append(infos, info)
		t.Cleanup(func() {
			for _, p := range b.rooted {
				s.roots.remove(p)
			}
		})
	}
	// The reference disappears between the check and the commit.
	if _, err := s.db.w.Exec("delete from ValidPaths where path = ?", s.abs(refInfo.Path)); err != nil {
		t.Fatal(err)
	}
	s.cache.invalidateAll()
	s.commitGroup(ctx, group)
	for i, m := range group {
		ok, err := s.IsValidPath(ctx, infos[i].Path)
		if err != nil {
			t.Fatal(err)
		}
		if i == 2 {
			if m.err == nil || !errors.Is(m.err, ErrNotValid) || !strings.Contains(m.err.Error(), s.abs(infos[2].Path)) {
				t.Errorf("bad member: err = %v, want ErrNotValid naming %s", m.err, s.abs(infos[2].Path))
			}
			if ok {
				t.Error("bad member registered")
			}
			if _, err := os.Lstat(s.RealPath(infos[i].Path)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("bad member left on disk: %v", err)
			}
			continue
		}
		if m.err != nil || !ok {
			t.Errorf("member %d: err %v, valid %v", i, m.err, ok)
		}
	}
	os.RemoveAll(s.RealPath(refInfo.Path))
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

// BenchmarkSyncOnePath compares the two ways to make one freshly written
// small path durable: fsync of its files and directories, or syncfs.
func BenchmarkSyncOnePath(b *testing.B) {
	for _, how := range []string{"fsyncTrees", "syncFS"} {
		b.Run(how, func(b *testing.B) {
			dir := b.TempDir()
			for i := range b.N {
				p := fmt.Sprintf("%s/p%d", dir, i)
				os.MkdirAll(p+"/bin", 0o755)
				for j := range 4 {
					os.WriteFile(fmt.Sprintf("%s/bin/f%d", p, j), bytes.Repeat([]byte{byte(i)}, 64<<10), 0o644)
				}
				var err error
				if how == "fsyncTrees" {
					_, err = fsyncTrees([]string{p}, fsyncMaxFiles, noSyncfs)
				} else {
					err = pagecache.SyncFS(p)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
