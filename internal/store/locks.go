package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
	"golang.org/x/sys/unix"
)

// Nix locks with flock(2) (pathlocks.cc, util.cc lockFile), not fcntl: a
// flock lock belongs to an open file description, so two descriptors of
// the same file conflict even inside one process. Every lock file here is
// opened once per holder.

// openLockFile opens (creating) a lock file as Nix's openLockFile does.
func openLockFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock file %s: %w", path, err)
	}
	return f, nil
}

// tryLockFD tries to take a flock lock without waiting.
func tryLockFD(f *os.File, how int) (bool, error) {
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		switch {
		case err == nil:
			return true, nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EWOULDBLOCK):
			return false, nil
		default:
			return false, fmt.Errorf("locking %s: %w", f.Name(), err)
		}
	}
}

// lockFD takes a flock lock, polling so that ctx can cancel the wait
// (a blocking flock cannot be interrupted and would pin a thread).
// waiting, if not nil, is called once if the lock is not free at once.
func lockFD(ctx context.Context, f *os.File, how int, waiting func()) error {
	delay := time.Millisecond
	for first := true; ; first = false {
		ok, err := tryLockFD(f, how)
		if err != nil || ok {
			return err
		}
		if first && waiting != nil {
			waiting()
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
}

func unlockFD(f *os.File) error {
	return unix.Flock(int(f.Fd()), unix.LOCK_UN)
}

// pathLocks is the in-process half of the per-path locks: goroutines of
// this process queue here, and the winner then takes the flock on
// "<realpath>.lock" against other processes.
type pathLocks struct {
	mu    sync.Mutex
	locks map[string]*pathLockEntry
}

type pathLockEntry struct {
	ch   chan struct{} // holds one token while the lock is free
	refs int           // goroutines holding or waiting for it
}

func (l *pathLocks) init() { l.locks = map[string]*pathLockEntry{} }

func (l *pathLocks) entry(path string) *pathLockEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.locks[path]
	if e == nil {
		e = &pathLockEntry{ch: make(chan struct{}, 1)}
		e.ch <- struct{}{}
		l.locks[path] = e
	}
	e.refs++
	return e
}

func (l *pathLocks) release(path string, e *pathLockEntry, held bool) {
	if held {
		e.ch <- struct{}{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	e.refs--
	if e.refs == 0 {
		delete(l.locks, path)
	}
}

// PathLock is a held lock on one store path ("<realpath>.lock").
type pathLock struct {
	locks *pathLocks
	path  string
	entry *pathLockEntry
	file  *os.File
}

// lockPath locks store path p (its "<realpath>.lock") against other
// goroutines and processes, as Nix's PathLocks::lockPaths does: after
// taking the flock it checks that the lock file was not deleted by its
// previous holder (which writes a byte into it before unlinking), and
// starts again if it was.
//
// A client that has to wait is told so (WithClientLog), as Nix tells it:
// the holder may be a client still sending the path, or a build of it.
func (s *Store) lockPath(ctx context.Context, p storepath.Path) (*pathLock, error) {
	if l, err := s.tryLockPath(ctx, p); l != nil || err != nil {
		return l, err
	}
	clientLog(ctx)(fmt.Sprintf("waiting for lock on '%s'", s.abs(p)))
	return s.locks.lock(ctx, s.RealPath(p), true)
}

// tryLockPath is lockPath without waiting; it returns nil, nil when the
// lock is taken by someone else.
func (s *Store) tryLockPath(ctx context.Context, p storepath.Path) (*pathLock, error) {
	return s.locks.lock(ctx, s.RealPath(p), false)
}

func (l *pathLocks) lock(ctx context.Context, realPath string, wait bool) (*pathLock, error) {
	e := l.entry(realPath)
	if wait {
		select {
		case <-e.ch:
		case <-ctx.Done():
			l.release(realPath, e, false)
			return nil, ctx.Err()
		}
	} else {
		select {
		case <-e.ch:
		default:
			l.release(realPath, e, false)
			return nil, nil
		}
	}
	lockFile := realPath + ".lock"
	for {
		f, err := openLockFile(lockFile)
		if err != nil {
			l.release(realPath, e, true)
			return nil, err
		}
		if wait {
			err = lockFD(ctx, f, unix.LOCK_EX, nil)
		} else {
			var ok bool
			ok, err = tryLockFD(f, unix.LOCK_EX)
			if err == nil && !ok {
				f.Close()
				l.release(realPath, e, true)
				return nil, nil
			}
		}
		if err != nil {
			f.Close()
			l.release(realPath, e, true)
			return nil, fmt.Errorf("locking %s: %w", lockFile, err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			l.release(realPath, e, true)
			return nil, fmt.Errorf("stat %s: %w", lockFile, err)
		}
		if st.Size() == 0 {
			return &pathLock{locks: l, path: realPath, entry: e, file: f}, nil
		}
		// Stale: its holder deleted it after we opened it. Try again.
		f.Close()
	}
}

// unlock deletes the lock file and releases the lock, as Nix's PathLocks
// with deletion set: unlink, then mark the open file stale for anyone
// already waiting on it, then unlock by closing.
func (pl *pathLock) unlock() {
	if pl == nil || pl.file == nil {
		return
	}
	_ = os.Remove(pl.path + ".lock")
	_, _ = pl.file.Write([]byte("d"))
	pl.file.Close()
	pl.file = nil
	pl.locks.release(pl.path, pl.entry, true)
}
