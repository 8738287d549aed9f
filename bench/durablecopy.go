package bench

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/nixyard/nixyard/internal/pagecache"
	"golang.org/x/sys/unix"
)

// DurableCopy copies the tree at src to dst (which must not exist) as
// plainly as a program can while making it durable: files written through
// a 256 KiB buffer, the writeback of each file of 64 KiB or more started
// as soon as it is written (sync_file_range), then one syncfs of dst's file
// system. No protocol, no hashing, no database: its time is the least a
// daemon that makes what it receives durable before answering can take
// for the same bytes on this machine, while the stock nix-daemon leaves
// the writeback for after it has answered. It returns the time taken.
func DurableCopy(ctx context.Context, src, dst string) (time.Duration, error) {
	start := time.Now()
	buf := make([]byte, 256<<10)
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		to := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.Mkdir(to, 0o755)
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			return os.Symlink(target, to)
		case d.Type().IsRegular():
			return copyFile(path, to, buf)
		}
		return fmt.Errorf("%s: unexpected file type %v", path, d.Type())
	})
	if err != nil {
		return 0, fmt.Errorf("durable copy: %w", err)
	}
	if err := pagecache.SyncFS(dst); err != nil {
		return 0, fmt.Errorf("durable copy: %w", err)
	}
	return time.Since(start), nil
}

func copyFile(from, to string, buf []byte) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	// The wrappers hide ReadFrom and WriteTo, so that the bytes go through
	// buf by read and write as a daemon's do, not by copy_file_range.
	n, err := io.CopyBuffer(struct{ io.Writer }{out}, struct{ io.Reader }{in}, buf)
	if err == nil && n >= 64<<10 {
		err = unix.SyncFileRange(int(out.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}
