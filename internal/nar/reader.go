package nar

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// Reader reads one NAR from an io.Reader, entry by entry, in the order the
// entries appear (pre-order, directory entries sorted). It reads exactly the
// NAR's bytes and never past its end, so NARs concatenated on a stream can be
// read one after the other. It does no buffering of its own: wrap slow
// sources in a bufio.Reader. A Reader is not safe for concurrent use.
type Reader struct {
	r       io.Reader
	started bool
	err     error // sticky: the first error, or io.EOF once done

	stack []readerDir // open directories, root first

	// The current regular file, if inFile.
	inFile    bool
	filePath  string
	remaining int64 // unread contents
	pad       int   // padding after the contents

	buf  [MaxTargetLen]byte // scratch for strings; MaxTargetLen is the largest string limit and a multiple of 8
	skip []byte             // lazily allocated, for skipping unread contents
}

type readerDir struct {
	path    string
	prev    string // previous entry name
	hasPrev bool
}

// NewReader returns a Reader for the NAR at the start of r.
func NewReader(r io.Reader) *Reader {
	return &Reader{r: r}
}

// Next advances to the next entry and returns its header. Unread contents of
// the previous regular file are skipped. Next returns io.EOF once the whole
// NAR, closing parentheses included, has been read and validated. Any other
// error is sticky and about a malformed NAR wraps ErrInvalid.
func (r *Reader) Next() (*Header, error) {
	if r.err != nil {
		return nil, r.err
	}
	h, err := r.next()
	if err != nil {
		r.err = err
		return nil, err
	}
	return h, nil
}

// Read reads the contents of the current regular file. It returns io.EOF at
// the end of the contents, and 0, io.EOF when the current entry is not a
// regular file.
func (r *Reader) Read(p []byte) (int, error) {
	if r.err != nil && r.err != io.EOF {
		return 0, r.err
	}
	if !r.inFile || r.remaining == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.remaining {
		p = p[:r.remaining]
	}
	n, err := r.r.Read(p)
	r.remaining -= int64(n)
	switch {
	case err == io.EOF && r.remaining > 0:
		err = r.ioErr(r.filePath, "contents", io.ErrUnexpectedEOF)
		r.err = err
	case err == io.EOF:
		err = nil // the next call reports io.EOF
	case err != nil:
		err = r.ioErr(r.filePath, "contents", err)
		r.err = err
	}
	return n, err
}

func (r *Reader) next() (*Header, error) {
	if !r.started {
		r.started = true
		tok, err := r.readString("", "magic", len(magic))
		if err != nil {
			if errors.Is(err, ErrInvalid) && !errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, invalidf("", "input does not start with %q", magic)
			}
			return nil, err
		}
		if string(tok) != magic {
			return nil, invalidf("", "magic %q, want %q", tok, magic)
		}
		return r.readNode("")
	}
	if r.inFile {
		if err := r.finishFile(); err != nil {
			return nil, err
		}
	}
	for len(r.stack) > 0 {
		dir := &r.stack[len(r.stack)-1]
		tok, err := r.readString(dir.path, "directory entry", maxTokenLen)
		if err != nil {
			return nil, err
		}
		switch string(tok) {
		case "entry":
			return r.readEntry(dir)
		case ")":
			path := dir.path
			r.stack = r.stack[:len(r.stack)-1]
			if err := r.closeEntry(path); err != nil {
				return nil, err
			}
		default:
			return nil, invalidf(dir.path, "in directory: unexpected token %q, want \"entry\" or \")\"", tok)
		}
	}
	return nil, io.EOF
}

// readEntry reads `( name N node <node>` of an entry of dir, up to the
// point readNode stops.
func (r *Reader) readEntry(dir *readerDir) (*Header, error) {
	if err := r.expect(dir.path, "entry", "("); err != nil {
		return nil, err
	}
	if err := r.expect(dir.path, "entry", "name"); err != nil {
		return nil, err
	}
	b, err := r.readString(dir.path, "entry name", MaxNameLen)
	if err != nil {
		return nil, err
	}
	name := string(b)
	if err := checkName(name); err != nil {
		return nil, invalidf(dir.path, "entry name: %v", err)
	}
	if dir.hasPrev && name <= dir.prev {
		if name == dir.prev {
			return nil, invalidf(dir.path, "duplicate entry %q", name)
		}
		return nil, invalidf(dir.path, "entry %q follows %q: entries not sorted", name, dir.prev)
	}
	dir.prev, dir.hasPrev = name, true
	path := name
	if dir.path != "" {
		path = dir.path + "/" + name
	}
	if d := depthOf(path); d > MaxDepth {
		return nil, invalidf(dir.path, "nesting deeper than %d levels", MaxDepth)
	}
	if err := r.expect(path, "entry", "node"); err != nil {
		return nil, err
	}
	return r.readNode(path)
}

// readNode reads a node up to its contents (regular files), up to its end
// (symlinks, including the closing parenthesis of the enclosing entry), or up
// to its first entry (directories).
func (r *Reader) readNode(path string) (*Header, error) {
	if err := r.expect(path, "node", "("); err != nil {
		return nil, err
	}
	if err := r.expect(path, "node", "type"); err != nil {
		return nil, err
	}
	tok, err := r.readString(path, "type", maxTokenLen)
	if err != nil {
		return nil, err
	}
	switch string(tok) {
	case "regular":
		h := &Header{Path: path, Type: TypeRegular}
		tok, err := r.readString(path, "regular file field", maxTokenLen)
		if err != nil {
			return nil, err
		}
		if string(tok) == "executable" {
			if _, err := r.readString(path, "executable marker", 0); err != nil {
				return nil, err
			}
			h.Executable = true
			if tok, err = r.readString(path, "regular file field", maxTokenLen); err != nil {
				return nil, err
			}
		}
		if string(tok) != "contents" {
			return nil, invalidf(path, "regular file: unexpected token %q, want \"contents\"", tok)
		}
		size, err := r.readUint64(path, "contents size")
		if err != nil {
			return nil, err
		}
		if size > math.MaxInt64 {
			return nil, invalidf(path, "contents size %d out of range", size)
		}
		h.Size = int64(size)
		r.inFile, r.filePath, r.remaining, r.pad = true, path, h.Size, padding(size)
		return h, nil
	case "symlink":
		if err := r.expect(path, "symlink", "target"); err != nil {
			return nil, err
		}
		b, err := r.readString(path, "symlink target", MaxTargetLen)
		if err != nil {
			return nil, err
		}
		target := string(b)
		if err := checkTarget(target); err != nil {
			return nil, invalidf(path, "%v", err)
		}
		if err := r.expect(path, "symlink", ")"); err != nil {
			return nil, err
		}
		if err := r.closeEntry(path); err != nil {
			return nil, err
		}
		return &Header{Path: path, Type: TypeSymlink, LinkTarget: target}, nil
	case "directory":
		r.stack = append(r.stack, readerDir{path: path})
		return &Header{Path: path, Type: TypeDirectory}, nil
	}
	return nil, invalidf(path, "unknown node type %q", tok)
}

// finishFile skips the rest of the current file, checks its padding and reads
// the closing parentheses.
func (r *Reader) finishFile() error {
	if r.remaining > 0 {
		if r.skip == nil {
			r.skip = make([]byte, 64<<10)
		}
		for r.remaining > 0 {
			n := int64(len(r.skip))
			if n > r.remaining {
				n = r.remaining
			}
			m, err := io.ReadFull(r.r, r.skip[:n])
			r.remaining -= int64(m)
			if err != nil {
				return r.ioErr(r.filePath, "contents", err)
			}
		}
	}
	r.inFile = false
	if r.pad > 0 {
		p := r.buf[:r.pad]
		if _, err := io.ReadFull(r.r, p); err != nil {
			return r.ioErr(r.filePath, "contents padding", err)
		}
		if !allZero(p) {
			return invalidf(r.filePath, "contents padding: non-zero padding")
		}
	}
	if err := r.expect(r.filePath, "regular file", ")"); err != nil {
		return err
	}
	return r.closeEntry(r.filePath)
}

// closeEntry reads the parenthesis closing the entry of a non-root node.
func (r *Reader) closeEntry(path string) error {
	if path == "" {
		return nil
	}
	return r.expect(path, "entry", ")")
}

func (r *Reader) expect(path, field, want string) error {
	tok, err := r.readString(path, field, maxTokenLen)
	if err != nil {
		return err
	}
	if string(tok) != want {
		return invalidf(path, "%s: unexpected token %q, want %q", field, tok, want)
	}
	return nil
}

func (r *Reader) readUint64(path, field string) (uint64, error) {
	if _, err := io.ReadFull(r.r, r.buf[:8]); err != nil {
		return 0, r.ioErr(path, field, err)
	}
	return binary.LittleEndian.Uint64(r.buf[:8]), nil
}

// readString reads a padded string of at most max bytes into r.buf and
// returns it; the result is valid until the next read.
func (r *Reader) readString(path, field string, max int) ([]byte, error) {
	n, err := r.readUint64(path, field+" length")
	if err != nil {
		return nil, err
	}
	if n > uint64(max) {
		return nil, invalidf(path, "%s: length %d exceeds limit %d", field, n, max)
	}
	padded := (int(n) + 7) &^ 7
	p := r.buf[:padded]
	if _, err := io.ReadFull(r.r, p); err != nil {
		return nil, r.ioErr(path, field, err)
	}
	if !allZero(p[n:]) {
		return nil, invalidf(path, "%s: non-zero padding", field)
	}
	return p[:n], nil
}

// ioErr wraps an error of the underlying reader; running out of input is
// truncation, a malformed NAR.
func (r *Reader) ioErr(path, field string, err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("nar: entry %s: %s: truncated input: %w: %w", entryName(path), field, ErrInvalid, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("nar: entry %s: reading %s: %w", entryName(path), field, err)
}

func padding(n uint64) int { return int(-n & 7) }

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
