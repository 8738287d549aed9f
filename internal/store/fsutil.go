package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

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

// syncTree makes a freshly written tree durable: every regular file and
// directory is fsynced, then the directory that holds it. For trees of
// more than syncfsThreshold files one syncfs(2) of the store's file system
// is cheaper than the fsyncs, and is used instead.
const syncfsThreshold = 64

func syncTree(path string) error {
	n := 0
	var paths []string
	err := walkNoFollow(path, func(p string, isDir, isReg bool) error {
		if isDir || isReg {
			n++
			if n <= syncfsThreshold {
				paths = append(paths, p)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if n > syncfsThreshold {
		return syncFS(path)
	}
	for _, p := range paths {
		if err := fsyncPath(p); err != nil {
			return err
		}
	}
	return fsyncPath(parentDir(path))
}

func parentDir(p string) string {
	for i := len(p) - 1; i > 0; i-- {
		if p[i] == '/' {
			return p[:i]
		}
	}
	return "/"
}

// syncFS flushes the whole file system that holds path.
func syncFS(path string) error {
	dir := parentDir(path)
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
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
