package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixyard/nixyard/internal/pagecache"
	"golang.org/x/sys/unix"
)

// removeAll deletes a path like Nix's deletePath: directories are made
// writable first, and the bytes freed are counted as Nix counts them (the
// size of every non-directory with one or two links: two is assumed to be a
// file whose other link is in .links).
func removeAll(path string) error {
	_, err := removeAllCount(path)
	return err
}

func removeAllCount(path string) (uint64, error) {
	var freed uint64
	err := removeTree(path, &freed)
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	return freed, err
}

func removeTree(path string, freed *uint64) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("getting status of %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if st.Nlink == 1 || st.Nlink == 2 {
			*freed += uint64(st.Size)
		}
		if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("deleting %s: %w", path, err)
		}
		return nil
	}
	if st.Mode&0o700 != 0o700 {
		if err := unix.Chmod(path, st.Mode&0o7777|0o700); err != nil {
			return fmt.Errorf("making %s writable: %w", path, err)
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	for {
		names, err := f.Readdirnames(1024)
		for _, n := range names {
			if err := removeTree(path+"/"+n, freed); err != nil {
				f.Close()
				return err
			}
		}
		if err != nil {
			break
		}
	}
	f.Close()
	if err := unix.Rmdir(path); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("deleting %s: %w", path, err)
	}
	return nil
}

// Making new paths durable. One syncfs(2) of the store's file system is
// the cheapest way while that file system holds little other dirty data
// (for a small path 1.7 ms, against 4.5 ms for fsyncs of its files:
// BenchmarkSyncOnePath), but it writes back everything dirty on the file
// system. On a shared CI host, where jobs write gigabytes next to the store,
// that is other jobs' data: with 1.5 GB of it dirty, a syncfs took 1.2 s
// where fsync of a small file and its directory took 1.8 ms. Fsyncs have
// their own price, though: each is a journal commit, and a syncfs clears
// the other data once while fsyncs pay again for every batch (5,000 small
// paths with ~120 MB of other data dirty: 5.4–6.6 s with fsyncs, 1.9 s
// with a syncfs per batch of 64). So syncfs is used unless the page cache's
// dirty and under-writeback bytes (/proc/meminfo, all file systems) beyond
// what the caller itself has just written exceed foreignDirtyMax, and even
// then unless there are few enough new files and directories: fsyncWorth
// of that other data per fsync, and at most fsyncMaxFiles. The fsyncs run
// syncParallel at a time (concurrent fsyncs share journal commits).
const (
	foreignDirtyMax = 64 << 20
	fsyncWorth      = 4 << 20
	fsyncMaxFiles   = 4096
	syncParallel    = 8
)

// syncTrees makes freshly written trees, all on the store's file system,
// durable: their files, their directories and their entries in their
// parent directories. written is about how many bytes the caller wrote
// into them; since is the sync epoch (Store.syncEpoch) taken before they
// were written. The way taken is logged at debug level.
func (s *Store) syncTrees(trees []string, written, since uint64) error {
	t0 := time.Now()
	fsyncs, err := fsyncTrees(trees, fsyncBudget(dirtyBytes, written), func() error { return s.syncStoreFS(since) })
	if err != nil {
		return err
	}
	by := "syncfs"
	if fsyncs > 0 {
		by = "fsync"
	}
	s.log.Debug(durableMsg, "paths", len(trees), "bytes", written, "by", by,
		"fsyncs", fsyncs, "took", time.Since(t0).Round(time.Microsecond))
	return nil
}

// durableMsg is the message of syncTrees' debug line.
const durableMsg = "made paths durable"

// LastDurableWay returns how the last of syncTrees' debug lines in a
// daemon's text log says paths were made durable: "syncfs", "fsync", or ""
// if there is none. Tests and benchmarks read the way taken with it.
func LastDurableWay(log string) string {
	way := ""
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, durableMsg) {
			continue
		}
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "by="); ok {
				way = v
			}
		}
	}
	return way
}

// fsyncBudget returns how many files and directories may be fsynced
// rather than the whole file system synced (0: syncfs), with dirty
// reporting the dirty bytes on the system and written the caller's own.
func fsyncBudget(dirty func() (uint64, error), written uint64) int {
	d, err := dirty()
	if err != nil {
		return fsyncMaxFiles
	}
	if d <= written+foreignDirtyMax {
		return 0
	}
	return int(min(fsyncMaxFiles, (d-written)/fsyncWorth))
}

// dirtyBytes is pagecache.Dirty; tests replace it.
var dirtyBytes = pagecache.Dirty

// errTooMany stops fsyncTrees' walk at its budget.
var errTooMany = errors.New("too many files to fsync")

// fsyncTrees fsyncs every regular file and directory of the trees, and
// the directories that hold them, if they are at most limit in all;
// otherwise it syncs their file system once with syncWhole. It returns the
// number of fsyncs, 0 if it synced the file system.
func fsyncTrees(trees []string, limit int, syncWhole func() error) (fsyncs int, err error) {
	if limit <= 0 {
		return 0, syncWhole()
	}
	var paths []string
	parents := map[string]bool{}
	for _, t := range trees {
		err := walkNoFollow(t, func(p string, isDir, isReg bool) error {
			if isDir || isReg {
				if len(paths)+len(parents) >= limit {
					return errTooMany
				}
				paths = append(paths, p)
			}
			return nil
		})
		if errors.Is(err, errTooMany) {
			return 0, syncWhole()
		}
		if err != nil {
			return 0, err
		}
		parents[parentDir(t)] = true
	}
	if len(paths)+len(parents) > limit {
		return 0, syncWhole()
	}
	for p := range parents {
		paths = append(paths, p)
	}
	return len(paths), fsyncAll(paths)
}

// fsyncAll fsyncs paths, syncParallel at a time, and returns the first
// error.
func fsyncAll(paths []string) error {
	var (
		next     atomic.Int64
		failed   atomic.Bool
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range min(syncParallel, len(paths)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !failed.Load() {
				i := int(next.Add(1)) - 1
				if i >= len(paths) {
					return
				}
				if err := fsyncPath(paths[i]); err != nil {
					errOnce.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
			}
		}()
	}
	wg.Wait()
	return firstErr
}

func parentDir(p string) string {
	for i := len(p) - 1; i > 0; i-- {
		if p[i] == '/' {
			return p[:i]
		}
	}
	return "/"
}

// storeSync syncs the store's whole file system so that no writeback error
// goes unreported. Linux (5.8 and later) reports a file system's writeback
// errors to syncfs once per open file: an error that nobody has seen yet,
// or one that happened since the file was opened. A descriptor opened for
// each sync misses an error in the writeback that sync_file_range started
// if another process's syncfs has seen it first; one descriptor shared by
// concurrent callers reports it to the first of them only. So the store
// keeps one descriptor, opened with it, and counts the errors its syncs
// report (epoch): a caller takes the epoch before it writes, and its sync
// fails if any error has been reported since, to whichever caller.
//
// Syncs run one at a time; a caller that waited while a sync begun after
// its call ran takes that sync's result instead of starting another.
type storeSync struct {
	epoch atomic.Uint64 // errors reported so far; added to under mu
	begun atomic.Uint64 // syncs begun so far; added to under mu

	mu      sync.Mutex
	dir     *os.File // the real store directory
	done    uint64   // the number (begun) of the last sync completed
	lastErr error    // the last error a sync reported
}

// syncfsReportsErrors reports whether the running kernel reports writeback
// errors to syncfs (Linux 5.8 and later).
func syncfsReportsErrors() bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return false
	}
	return releaseAtLeast(unix.ByteSliceToString(u.Release[:]), 5, 8)
}

// releaseAtLeast reports whether a kernel release ("6.1.0-13-amd64") is
// major.minor or later; false if it cannot be read.
func releaseAtLeast(release string, major, minor int) bool {
	var relMajor, relMinor int
	if _, err := fmt.Sscanf(release, "%d.%d", &relMajor, &relMinor); err != nil {
		return false
	}
	return relMajor > major || relMajor == major && relMinor >= minor
}

// syncfs is unix.Syncfs; tests count its calls.
var syncfs = unix.Syncfs

// syncEpoch returns the number of writeback errors reported so far: take
// it before writing what syncTrees will make durable.
func (s *Store) syncEpoch() uint64 { return s.fsSync.epoch.Load() }

// syncStoreFS syncs the store's file system and fails if a writeback error
// has been reported since the epoch since.
func (s *Store) syncStoreFS(since uint64) error {
	st := &s.fsSync
	asked := st.begun.Load()
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.done <= asked {
		// No sync begun after this call has completed: one is needed.
		rc, err := st.dir.SyscallConn()
		if err != nil {
			return fmt.Errorf("syncfs %s: %w", s.realDir, err)
		}
		n := st.begun.Add(1)
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = syncfs(int(fd)) }); err != nil {
			return fmt.Errorf("syncfs %s: the store is closed: %w", s.realDir, err)
		}
		if serr != nil {
			st.epoch.Add(1)
			st.lastErr = serr
		}
		st.done = n
	}
	if st.epoch.Load() != since {
		return fmt.Errorf("syncfs %s: a write to the store's file system failed since these paths were written: %w", s.realDir, st.lastErr)
	}
	return nil
}

func fsyncPath(p string) error {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("opening %s for fsync: %w", p, err)
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("fsync %s: %w", p, err)
	}
	return nil
}

// walkNoFollow visits path and everything below it without following
// symlinks.
func walkNoFollow(path string, visit func(p string, isDir, isReg bool) error) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fmt.Errorf("getting status of %s: %w", path, err)
	}
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	if err := visit(path, isDir, st.Mode&unix.S_IFMT == unix.S_IFREG); err != nil {
		return err
	}
	if !isDir {
		return nil
	}
	ents, err := os.ReadDir(path)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	for _, e := range ents {
		if err := walkNoFollow(path+"/"+e.Name(), visit); err != nil {
			return err
		}
	}
	return nil
}
