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
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"

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

// Unpack extracts a tar archive, compressed or not, into the existing
// directory dest, as Nix's libarchive does with its secure-extraction
// flags: names are taken relative to dest (a leading "/" is dropped),
// names with ".." and entries that would go through a symlink are
// refused, and a later entry replaces an earlier file of the same name.
// Hard links must point at regular files unpacked before them; devices,
// FIFOs and sparse files are refused. Every operation goes through an
// os.Root at dest, so nothing outside it is touched whatever the archive
// holds. Modes keep only the executable bit, as the store's
// canonicalisation does anyway. ctx is checked between reads.
func Unpack(ctx context.Context, r io.Reader, dest string) error {
	root, err := os.OpenRoot(dest)
	if err != nil {
		return err
	}
	defer root.Close()
	in, release, err := decompress(r)
	if err != nil {
		return err
	}
	defer release()
	tr := tar.NewReader(&ctxReader{ctx: ctx, r: in})
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
		if err := unpackEntry(root, h, tr); err != nil {
			return err
		}
	}
}

// decompress detects the compression of r by its first bytes.
func decompress(r io.Reader) (io.Reader, func(), error) {
	br := bufio.NewReaderSize(r, 64<<10)
	head, _ := br.Peek(6)
	for _, m := range magics {
		switch {
		case !bytes.HasPrefix(head, m.magic):
		case m.method == "gzip":
			zr, err := gzip.NewReader(br)
			return zr, func() {}, err
		default:
			return substitute.Decompressor(m.method, br)
		}
	}
	return br, func() {}, nil
}

func unpackEntry(root *os.Root, h *tar.Header, contents io.Reader) error {
	name, err := entryName(h.Name)
	if err != nil || name == "." {
		return err
	}
	if err := makeParents(root, name); err != nil {
		return err
	}
	switch h.Typeflag {
	case tar.TypeDir:
		st, err := root.Lstat(name)
		if err == nil && st.IsDir() {
			return nil
		}
		if err := replace(root, name); err != nil {
			return err
		}
		return root.Mkdir(name, 0o755)
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
		if err := replace(root, name); err != nil {
			return err
		}
		f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, contents)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	case tar.TypeSymlink:
		if err := replace(root, name); err != nil {
			return err
		}
		return root.Symlink(h.Linkname, name)
	case tar.TypeLink:
		old, err := entryName(h.Linkname)
		if err != nil {
			return err
		}
		if st, err := root.Lstat(old); err != nil || !st.Mode().IsRegular() {
			return fmt.Errorf("hard link '%s' to '%s', which is not a regular file unpacked before it", h.Name, h.Linkname)
		}
		if err := replace(root, name); err != nil {
			return err
		}
		return root.Link(old, name)
	case tar.TypeXGlobalHeader:
		return nil
	}
	return fmt.Errorf("entry '%s' of type %q is not a file, directory or link", h.Name, h.Typeflag)
}

// entryName is the clean relative path of entry name below the output
// ("." for the output itself).
func entryName(name string) (string, error) {
	if name == "" || strings.Contains(name, "\x00") || slices.Contains(strings.Split(name, "/"), "..") {
		return "", fmt.Errorf("entry '%s' would be unpacked outside the output", name)
	}
	if clean := strings.TrimPrefix(path.Clean("/"+name), "/"); clean != "" {
		return clean, nil
	}
	return ".", nil
}

// makeParents makes the missing directories on the way to name; none of
// those there may be anything but a directory (a symlink, say).
func makeParents(root *os.Root, name string) error {
	dir := path.Dir(name)
	if dir == "." {
		return nil
	}
	parts := strings.Split(dir, "/")
	for i := range parts {
		p := strings.Join(parts[:i+1], "/")
		st, err := root.Lstat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if err := root.Mkdir(p, 0o755); err != nil {
				return err
			}
		case err != nil:
			return err
		case !st.IsDir():
			return fmt.Errorf("entry '%s' would be unpacked through '%s', which is not a directory", name, p)
		}
	}
	return nil
}

// replace removes what an entry named name replaces: nothing, or a file
// or symlink of an earlier entry; never a directory.
func replace(root *os.Root, name string) error {
	st, err := root.Lstat(name)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return err
	case st.IsDir():
		return fmt.Errorf("entry '%s' would replace a directory", name)
	}
	return root.Remove(name)
}

// ctxReader stops reading once its context is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
