package nar

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"unsafe"

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
func Restore(ctx context.Context, r io.Reader, dest string) error {
	return restore(ctx, r, dest, false)
}

// RestoreCanonical is Restore that also gives every inode the metadata
// Canonicalise would give it: regular files 0444, or 0555 if executable,
// directories 0555, and mtime 1 everywhere (atimes left alone). Each inode
// is set through the descriptor Restore already holds (symlinks by name in
// their open parent, directories once their last entry is written), so no
// second walk of the tree is needed.
func RestoreCanonical(ctx context.Context, r io.Reader, dest string) error {
	return restore(ctx, r, dest, true)
}

func restore(ctx context.Context, r io.Reader, dest string, canonical bool) (err error) {
	if _, err := os.Lstat(dest); err == nil {
		return fmt.Errorf("nar: restore %s: destination already exists", dest)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("nar: restore: %w", err)
	}
	rs := restorer{ctx: ctx, nr: NewReader(r), dest: dest, canonical: canonical}
	defer func() {
		for _, fd := range rs.dirs {
			unix.Close(fd)
		}
		if rs.big != nil {
			bigBufs.Put(rs.big)
		}
		if err != nil && rs.created {
			if rerr := removeRestored(dest); rerr != nil {
				err = fmt.Errorf("%w (and cleaning up: %v)", err, rerr)
			}
		}
	}()
	if err := rs.run(); err != nil {
		// Not named after dest, a temporary directory the client has no
		// use for: a file system error names its file itself.
		if errors.Is(err, ErrInvalid) {
			return err
		}
		return fmt.Errorf("nar: restore: %w", err)
	}
	return nil
}

// removeRestored removes a partly restored tree. Directories that
// RestoreCanonical had finished are read-only; they are made writable first
// (for callers without CAP_DAC_OVERRIDE).
func removeRestored(dest string) error {
	filepath.WalkDir(dest, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			os.Chmod(p, 0o755) // a directory: WalkDir does not follow symlinks
		}
		return nil
	})
	return os.RemoveAll(dest)
}

type restorer struct {
	ctx       context.Context
	nr        *Reader
	dest      string
	canonical bool  // give inodes the store's final metadata (RestoreCanonical)
	created   bool  // dest exists and is ours
	dirs      []int // open descriptors of the directories on the current path; dirs[0] is dest
	buf       []byte
	big       *[]byte // rs.buf when it is a copyBufSize buffer from bigBufs
}

// bigBufs holds copyBufSize buffers for Restore: a stream of paths with
// large files would otherwise allocate (and zero, and collect) one per path.
var bigBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// CopyBuffer returns a buffer of the size Restore and DumpPath copy file
// contents with, from the pool Restore uses; give it back with
// PutCopyBuffer once done with it.
func CopyBuffer() *[]byte { return bigBufs.Get().(*[]byte) }

// PutCopyBuffer returns a buffer from CopyBuffer to the pool.
func PutCopyBuffer(b *[]byte) { bigBufs.Put(b) }

func (rs *restorer) run() error {
	for {
		if err := rs.ctx.Err(); err != nil {
			return err
		}
		h, err := rs.nr.Next()
		if err == io.EOF {
			return rs.closeDirs(0)
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
	if err := rs.closeDirs(depth); err != nil {
		return err
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
		if rs.canonical {
			if err := unix.UtimesNanoAt(dirfd, name, storeTimes, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fmt.Errorf("setting mtime: %w", err)
			}
		}
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
		err = rs.contents(fd, h.Size)
		if err == nil && rs.canonical {
			err = setStoreMetadata(fd, mode&^0o222)
		}
		if cerr := unix.Close(fd); err == nil && cerr != nil {
			err = fmt.Errorf("closing file: %w", cerr)
		}
		return err
	default:
		return fmt.Errorf("unknown type %v", h.Type)
	}
	return nil
}

// storeTimes keeps an inode's atime and sets its mtime to storeMtime.
var storeTimes = []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Sec: storeMtime}}

// setStoreMetadata gives the inode open as fd the mode and the store's
// mtime. It comes last: writing to a file, or adding entries to a
// directory, changes its mtime.
func setStoreMetadata(fd int, mode uint32) error {
	if err := unix.Fchmod(fd, mode); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	// futimens(fd, times): utimensat with a NULL path acts on fd itself.
	if _, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&storeTimes[0])), 0, 0, 0); e != 0 {
		return fmt.Errorf("setting mtime: %w", e)
	}
	return nil
}

// closeDirs closes the open directories below depth, innermost first,
// giving each the store's metadata first if rs.canonical (all its entries
// are written by then).
func (rs *restorer) closeDirs(depth int) error {
	for len(rs.dirs) > depth {
		fd := rs.dirs[len(rs.dirs)-1]
		var err error
		if rs.canonical {
			err = setStoreMetadata(fd, 0o555)
		}
		unix.Close(fd)
		rs.dirs = rs.dirs[:len(rs.dirs)-1]
		if err != nil {
			return fmt.Errorf("directory: %w", err)
		}
	}
	return nil
}

// Restore starts the writeback of file contents as they are written
// (sync_file_range(SYNC_FILE_RANGE_WRITE), which does not wait for the
// disk): every writebackChunk bytes while a file is written, and the rest
// of any file of at least writebackMin bytes when it is complete. The
// caller's fsync or syncfs after the whole tree (or batch) then finds most
// of the data on its way, the disk having worked while the next files were
// received and unpacked. Only a hint: errors are ignored. Smaller files are
// left to the page cache's own batching (and the caller's sync).
const (
	writebackMin   = 64 << 10
	writebackChunk = 2 << 20
)

// contents copies the current file's contents from the Reader to the file
// fd in large chunks, starting their writeback as it goes.
func (rs *restorer) contents(fd int, size int64) error {
	if size == 0 {
		return nil
	}
	if int64(len(rs.buf)) < size && len(rs.buf) < copyBufSize {
		// Sized to the file, up to copyBufSize: a store path of small
		// files should not cost a copyBufSize allocation per file.
		if n := max(size, 2*int64(len(rs.buf))); n < copyBufSize {
			rs.buf = make([]byte, n)
		} else {
			rs.big = bigBufs.Get().(*[]byte)
			rs.buf = *rs.big
		}
	}
	var off, synced int64 // bytes written; bytes whose writeback was started
	for off < size {
		p := rs.buf
		if int64(len(p)) > size-off {
			p = p[:size-off]
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
		if err := writeAll(fd, p[:n]); err != nil {
			return fmt.Errorf("writing contents: %w", err)
		}
		off += int64(n)
		if off-synced >= writebackChunk {
			unix.SyncFileRange(fd, synced, off-synced, unix.SYNC_FILE_RANGE_WRITE)
			synced = off
		}
		if err := rs.ctx.Err(); err != nil {
			return err
		}
	}
	if size >= writebackMin && off > synced {
		unix.SyncFileRange(fd, synced, off-synced, unix.SYNC_FILE_RANGE_WRITE)
	}
	return nil
}

// writeAll writes p to fd, retrying short writes and EINTR.
func writeAll(fd int, p []byte) error {
	for len(p) > 0 {
		n, err := unix.Write(fd, p)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		p = p[n:]
	}
	return nil
}
