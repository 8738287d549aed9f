package nar

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Restore unpacks one NAR read from r into dest, which must not exist yet.
// It reads exactly the NAR's bytes from r. Everything below dest is created
// relative to an open descriptor of its parent directory with
// O_NOFOLLOW|O_EXCL, so nothing can be written outside dest whatever the NAR
// contains. Files are created 0644 (0755 if executable) and directories 0755,
// minus the umask; see Canonicalise for the store's final permissions.
// Cancellation of ctx is checked between entries and between chunks of file
// contents. On error, whatever Restore created (dest) is removed.
func Restore(ctx context.Context, r io.Reader, dest string) (err error) {
	if _, err := os.Lstat(dest); err == nil {
		return fmt.Errorf("nar: restore %s: destination already exists", dest)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("nar: restore: %w", err)
	}
	rs := restorer{ctx: ctx, nr: NewReader(r), dest: dest}
	defer func() {
		for _, fd := range rs.dirs {
			unix.Close(fd)
		}
		if err != nil && rs.created {
			if rerr := os.RemoveAll(dest); rerr != nil {
				err = fmt.Errorf("%w (and cleaning up: %v)", err, rerr)
			}
		}
	}()
	if err := rs.run(); err != nil {
		return fmt.Errorf("nar: restore %s: %w", dest, err)
	}
	return nil
}

type restorer struct {
	ctx     context.Context
	nr      *Reader
	dest    string
	created bool  // dest exists and is ours
	dirs    []int // open descriptors of the directories on the current path; dirs[0] is dest
	buf     []byte
}

func (rs *restorer) run() error {
	for {
		if err := rs.ctx.Err(); err != nil {
			return err
		}
		h, err := rs.nr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := rs.entry(h); err != nil {
			return fmt.Errorf("entry %s: %w", entryName(h.Path), err)
		}
	}
}

func (rs *restorer) entry(h *Header) error {
	depth := depthOf(h.Path)
	for len(rs.dirs) > depth {
		unix.Close(rs.dirs[len(rs.dirs)-1])
		rs.dirs = rs.dirs[:len(rs.dirs)-1]
	}
	// The root is created by path in the caller's (trusted) parent directory.
	dirfd, name := unix.AT_FDCWD, rs.dest
	if depth > 0 {
		if len(rs.dirs) != depth {
			// The Reader guarantees pre-order; this is a bug, not bad input.
			return fmt.Errorf("internal error: parent not open (have %d levels, need %d)", len(rs.dirs), depth)
		}
		dirfd, name = rs.dirs[depth-1], h.Path[strings.LastIndexByte(h.Path, '/')+1:]
	}
	switch h.Type {
	case TypeDirectory:
		if err := unix.Mkdirat(dirfd, name, 0o755); err != nil {
			return fmt.Errorf("mkdir: %w", err)
		}
		rs.created = true
		fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening directory: %w", err)
		}
		rs.dirs = append(rs.dirs, fd)
	case TypeSymlink:
		if err := unix.Symlinkat(h.LinkTarget, dirfd, name); err != nil {
			return fmt.Errorf("symlink: %w", err)
		}
		rs.created = true
	case TypeRegular:
		mode := uint32(0o644)
		if h.Executable {
			mode = 0o755
		}
		fd, err := unix.Openat(dirfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
		if err != nil {
			return fmt.Errorf("creating file: %w", err)
		}
		rs.created = true
		f := os.NewFile(uintptr(fd), h.Path)
		err = rs.contents(f, h.Size)
		if err == nil && h.Size >= writebackMin {
			// Start writing it to disk now (without waiting), so that the
			// caller's fsync or syncfs after the whole tree (or batch) is
			// written finds most of it done: the disk works while the
			// next files are unpacked. Only a hint: errors are ignored.
			unix.SyncFileRange(fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
		}
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("closing file: %w", cerr)
		}
		return err
	default:
		return fmt.Errorf("unknown type %v", h.Type)
	}
	return nil
}

// writebackMin is the size from which Restore starts a file's writeback as
// soon as the file is written; smaller files are left to the page cache's
// own batching.
const writebackMin = 256 << 10

// contents copies the current file's contents from the Reader to f in large
// chunks.
func (rs *restorer) contents(f *os.File, size int64) error {
	if size == 0 {
		return nil
	}
	if int64(len(rs.buf)) < size && len(rs.buf) < copyBufSize {
		// Sized to the file, up to copyBufSize: a store path of small
		// files should not cost a 1 MiB allocation per file.
		rs.buf = make([]byte, min(int64(copyBufSize), max(size, 2*int64(len(rs.buf)))))
	}
	for size > 0 {
		p := rs.buf
		if int64(len(p)) > size {
			p = p[:size]
		}
		n, err := io.ReadFull(rs.nr, p)
		if err != nil {
			if err == io.ErrUnexpectedEOF || err == io.EOF {
				// The Reader reports truncation itself; this cannot be
				// reached with a well-behaved Reader.
				return fmt.Errorf("contents: %w: %w", ErrInvalid, io.ErrUnexpectedEOF)
			}
			return err
		}
		if _, err := f.Write(p[:n]); err != nil {
			return fmt.Errorf("writing contents: %w", err)
		}
		size -= int64(n)
		if err := rs.ctx.Err(); err != nil {
			return err
		}
	}
	return nil
}
