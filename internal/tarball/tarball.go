// Package tarball unpacks tar archives (plain, gzip, bzip2, xz or zstd)
// into a directory, refusing every entry that would land outside it, for
// the builtin builders that unpack what clients give them.
package tarball

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/substitute"
)

// magics are the compressions a tarball may have, by their first
// bytes (as libarchive detects them for Nix).
var magics = []struct {
	magic  []byte
	method string
}{
	{[]byte{0x1f, 0x8b}, "gzip"},
	{[]byte("BZh"), "bzip2"},
	{[]byte{0xfd, '7', 'z', 'X', 'Z', 0}, "xz"},
	{[]byte{0x28, 0xb5, 0x2f, 0xfd}, "zstd"},
}

// Unpack extracts a tar archive, compressed or not, into the
// existing directory dest. Entries may not leave dest: names are
// relative, without "..", and never pass through a symlink; hard links
// point at regular files unpacked before them. Modes keep only the
// executable bit, as the store's canonicalisation does anyway.
func Unpack(ctx context.Context, r io.Reader, dest string) error {
	br := bufio.NewReaderSize(r, 64<<10)
	head, _ := br.Peek(6)
	var in io.Reader = br
	for _, m := range magics {
		if !bytes.HasPrefix(head, m.magic) {
			continue
		}
		if m.method == "gzip" {
			zr, err := gzip.NewReader(br)
			if err != nil {
				return err
			}
			in = zr
			break
		}
		dr, release, err := substitute.Decompressor(m.method, br)
		if err != nil {
			return err
		}
		defer release()
		in = dr
		break
	}
	tr := tar.NewReader(in)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p, err := entryPath(dest, h.Name)
		if err != nil {
			return err
		}
		if p == dest {
			continue // "./"
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				return err
			}
		case tar.TypeReg:
			for k := range h.PAXRecords {
				if strings.HasPrefix(k, "GNU.sparse.") {
					// Its holes would be written out as zeros.
					return fmt.Errorf("entry '%s' is a sparse file, which is not supported", h.Name)
				}
			}
			mode := os.FileMode(0o644)
			if h.Mode&0o100 != 0 {
				mode = 0o755
			}
			if err := writeFile(p, mode, tr); err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, p); err != nil {
				return err
			}
		case tar.TypeLink:
			old, err := entryPath(dest, h.Linkname)
			if err != nil {
				return err
			}
			var st unix.Stat_t
			if err := unix.Lstat(old, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
				return fmt.Errorf("hard link '%s' to '%s', which is not a regular file unpacked before it", h.Name, h.Linkname)
			}
			if err := os.Link(old, p); err != nil {
				return err
			}
		case tar.TypeXGlobalHeader:
		default:
			return fmt.Errorf("entry '%s' of type %q is not a file, directory or link", h.Name, h.Typeflag)
		}
	}
}

// entryPath is where entry name goes below dest. Directories on the
// way that are missing are made; none may be a symlink.
func entryPath(dest, name string) (string, error) {
	clean := path.Clean("/" + name)
	if name == "" || strings.Contains(name, "\x00") || path.IsAbs(name) || slices.Contains(strings.Split(name, "/"), "..") {
		return "", fmt.Errorf("entry '%s' would be unpacked outside the output", name)
	}
	p := dest
	parts := strings.Split(strings.TrimPrefix(clean, "/"), "/")
	for i, c := range parts {
		if c == "" {
			continue
		}
		p += "/" + c
		if i == len(parts)-1 {
			break
		}
		var st unix.Stat_t
		err := unix.Lstat(p, &st)
		switch {
		case err == unix.ENOENT:
			if err := os.Mkdir(p, 0o755); err != nil {
				return "", err
			}
		case err != nil:
			return "", err
		case st.Mode&unix.S_IFMT != unix.S_IFDIR:
			return "", fmt.Errorf("entry '%s' would be unpacked through '%s', which is not a directory", name, c)
		}
	}
	return p, nil
}

func writeFile(p string, mode os.FileMode, r io.Reader) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, mode)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
