package nar

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// storeMtime is the modification time Nix gives every file in the store
// (mtimeStore in Nix).
const storeMtime = 1

// Canonicalise sets the metadata of the tree at path the way Nix's
// canonicalisePathMetaData does for a new store path: regular files and
// directories whose mode is neither 0444 nor 0555 become 0444, or 0555 when
// the owner-execute bit is set (so directories become 0555); symlinks keep
// their mode; every inode gets mtime 1 (symlinks via lutimes), keeping its
// atime. Ownership is left to the caller. Directories are walked through
// descriptors opened with O_NOFOLLOW, and a directory is changed after its
// contents.
func Canonicalise(path string) error {
	if err := canonicaliseAt(unix.AT_FDCWD, path, path, 0); err != nil {
		return fmt.Errorf("nar: canonicalise: %w", err)
	}
	return nil
}

func canonicaliseAt(dirfd int, name, display string, depth int) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("stat %s: %w", display, err)
	}
	typ := st.Mode & unix.S_IFMT
	if typ == unix.S_IFDIR {
		if depth > MaxDepth {
			return fmt.Errorf("%s: nesting deeper than %d levels", display, MaxDepth)
		}
		fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening %s: %w", display, err)
		}
		err = canonicaliseDir(fd, display, depth)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	if typ != unix.S_IFLNK {
		if mode := st.Mode &^ unix.S_IFMT; mode != 0o444 && mode != 0o555 {
			mode = 0o444
			if st.Mode&unix.S_IXUSR != 0 {
				mode = 0o555
			}
			// fchmodat cannot refuse to follow symlinks on Linux; the
			// Fstatat above saw a non-symlink, and the tree is private to
			// the caller while it is being imported.
			if err := unix.Fchmodat(dirfd, name, mode, 0); err != nil {
				return fmt.Errorf("chmod %s: %w", display, err)
			}
		}
	}
	if st.Mtim.Sec != storeMtime {
		ts := []unix.Timespec{st.Atim, {Sec: storeMtime}}
		if err := unix.UtimesNanoAt(dirfd, name, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("setting mtime of %s: %w", display, err)
		}
	}
	return nil
}

func canonicaliseDir(fd int, display string, depth int) error {
	// Read all names first: changing entries while reading is fine, but
	// keeping the reading simple is worth more.
	var names []string
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			return fmt.Errorf("reading directory %s: %w", display, err)
		}
		if n == 0 {
			break
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
	for _, n := range names {
		if err := canonicaliseAt(fd, n, display+"/"+n, depth+1); err != nil {
			return err
		}
	}
	return nil
}
