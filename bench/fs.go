package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Scratch is a file system made for one benchmark run and mounted at Dir.
type Scratch struct {
	Dir   string // mount point
	Kind  string // "ext4" (journaled, on a loop file) or "tmpfs"
	image string // loop image file, for ext4
}

// MountScratch makes a fresh file system of the given kind and size at dir.
// For "ext4" the image lives in imageDir and is written with zeros first, so
// that no measurement pays for allocating blocks of a sparse backing file
// (without this, the first store written ran up to 2.5× slower than later
// ones); it is formatted with a journal, without discard (which would punch
// the holes back) and with inode tables and journal initialised up front (so
// no lazy-init thread writes in the background while measuring), and is
// loop-mounted.
func MountScratch(ctx context.Context, kind, dir, imageDir string, size int64) (*Scratch, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating mount point: %w", err)
	}
	s := &Scratch{Dir: dir, Kind: kind}
	switch kind {
	case "tmpfs":
		if err := run(ctx, "mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d,mode=755", size), "tmpfs", dir); err != nil {
			return nil, err
		}
	case "ext4":
		s.image = filepath.Join(imageDir, "scratch-ext4.img")
		f, err := os.OpenFile(s.image, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return nil, fmt.Errorf("creating loop image: %w", err)
		}
		err = zeroFill(ctx, f, size)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(s.image)
			return nil, fmt.Errorf("writing loop image: %w", err)
		}
		if err := run(ctx, "mkfs.ext4", "-q", "-F", "-O", "has_journal", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", s.image); err != nil {
			os.Remove(s.image)
			return nil, err
		}
		if err := run(ctx, "mount", "-o", "loop", s.image, dir); err != nil {
			os.Remove(s.image)
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown scratch file system %q (want ext4 or tmpfs)", kind)
	}
	return s, nil
}

// Describe says what the scratch file system is, for reports.
func (s *Scratch) Describe() string {
	out, err := exec.Command("findmnt", "-n", "-o", "FSTYPE,OPTIONS", s.Dir).Output()
	desc := s.Kind
	if s.Kind == "ext4" {
		desc = "ext4 with journal on a loop file"
		if d, err := exec.Command("findmnt", "-n", "-o", "FSTYPE", "-T", filepath.Dir(s.image)).Output(); err == nil {
			desc += " (backing file on " + strings.TrimSpace(string(d)) + ")"
		}
	}
	if err == nil {
		desc += ", mounted " + strings.Join(strings.Fields(string(out)), " ")
	}
	return desc
}

// Unmount unmounts the file system (retrying briefly while busy) and removes
// the loop image. A loop device set up by `mount -o loop` is released on
// unmount (autoclear).
func (s *Scratch) Unmount() error {
	var err error
	for range 50 {
		if err = run(context.Background(), "umount", s.Dir); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("unmounting %s: %w", s.Dir, err)
	}
	var errs []error
	if s.image != "" {
		if rerr := os.Remove(s.image); rerr != nil {
			errs = append(errs, rerr)
		}
	}
	if rerr := os.Remove(s.Dir); rerr != nil {
		errs = append(errs, rerr)
	}
	return errors.Join(errs...)
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// zeroFill writes size zero bytes to f and syncs it.
func zeroFill(ctx context.Context, f *os.File, size int64) error {
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(int64(len(buf)), size-off)
		if _, err := f.Write(buf[:n]); err != nil {
			return err
		}
	}
	return f.Sync()
}
