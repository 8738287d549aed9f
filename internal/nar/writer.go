package nar

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Writer writes one NAR. Call WriteHeader for each entry in NAR order (the
// root first, then pre-order with the entries of each directory in strictly
// increasing bytewise order), Write for the contents of regular files, and
// Close at the end. Headers that break NAR rules are refused with an error
// wrapping ErrInvalid; errors are sticky. The Writer does not enforce the
// store's symlink policy (see the package doc): it dumps what it is given,
// as `nix-store --dump` does. A Writer is not safe for concurrent use; it does
// not buffer, so each header is one Write to the underlying writer.
type Writer struct {
	w       io.Writer
	started bool
	closed  bool
	err     error

	stack []writerDir // open directories, root first

	inFile    bool
	filePath  string
	remaining int64
	pad       int

	buf []byte // encoding scratch
}

type writerDir struct {
	path    string
	prev    string
	hasPrev bool
}

// NewWriter returns a Writer that writes a NAR to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: w, buf: make([]byte, 0, 512)}
}

// WriteHeader starts a new entry. The previous regular file, if any, must
// have received exactly its Size bytes.
func (w *Writer) WriteHeader(h *Header) error {
	if w.err != nil {
		return w.err
	}
	if err := w.writeHeader(h); err != nil {
		w.err = err
		return err
	}
	return nil
}

func (w *Writer) writeHeader(h *Header) error {
	if w.closed {
		return errors.New("nar: WriteHeader after Close")
	}
	w.buf = w.buf[:0]
	if w.inFile {
		if err := w.endFile(); err != nil {
			return err
		}
	}
	if !w.started {
		if h.Path != "" {
			return invalidf(h.Path, "first entry must be the root (Path \"\")")
		}
		w.started = true
		w.str(magic)
		if err := w.node(h); err != nil {
			return err
		}
		return w.flush()
	}
	if h.Path == "" {
		return invalidf("", "second root entry")
	}
	parent, name := "", h.Path
	if i := strings.LastIndexByte(h.Path, '/'); i >= 0 {
		parent, name = h.Path[:i], h.Path[i+1:]
	}
	if err := checkName(name); err != nil {
		return invalidf(h.Path, "entry name: %v", err)
	}
	if depthOf(h.Path) > MaxDepth {
		return invalidf(h.Path, "nesting deeper than %d levels", MaxDepth)
	}
	i := len(w.stack) - 1
	for i >= 0 && w.stack[i].path != parent {
		i--
	}
	if i < 0 {
		return invalidf(h.Path, "parent %s is not an open directory (entries must come in NAR order)", entryName(parent))
	}
	dir := &w.stack[i]
	if dir.hasPrev && name <= dir.prev {
		if name == dir.prev {
			return invalidf(h.Path, "duplicate entry")
		}
		return invalidf(h.Path, "entry follows %q: entries not sorted", dir.prev)
	}
	dir.prev, dir.hasPrev = name, true
	for len(w.stack) > i+1 {
		w.closeDir()
	}
	w.str("entry")
	w.str("(")
	w.str("name")
	w.str(name)
	w.str("node")
	if err := w.node(h); err != nil {
		return err
	}
	return w.flush()
}

// node encodes the start of a node (all of it for symlinks) into w.buf.
func (w *Writer) node(h *Header) error {
	w.str("(")
	w.str("type")
	switch h.Type {
	case TypeRegular:
		if h.Size < 0 {
			return invalidf(h.Path, "negative size %d", h.Size)
		}
		w.str("regular")
		if h.Executable {
			w.str("executable")
			w.str("")
		}
		w.str("contents")
		w.buf = binary.LittleEndian.AppendUint64(w.buf, uint64(h.Size))
		w.inFile, w.filePath, w.remaining, w.pad = true, h.Path, h.Size, padding(uint64(h.Size))
	case TypeDirectory:
		w.str("directory")
		w.stack = append(w.stack, writerDir{path: h.Path})
	case TypeSymlink:
		if err := checkTarget(h.LinkTarget); err != nil {
			return invalidf(h.Path, "%v", err)
		}
		w.str("symlink")
		w.str("target")
		w.str(h.LinkTarget)
		w.str(")")
		if h.Path != "" {
			w.str(")")
		}
	default:
		return invalidf(h.Path, "unknown type %v", h.Type)
	}
	return nil
}

// Write writes contents of the current regular file. Writing more than its
// Size is an error; the bytes that fit are written.
func (w *Writer) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	if !w.inFile {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, fmt.Errorf("nar: Write outside a regular file: %w", ErrInvalid)
	}
	var tooLong bool
	if int64(len(p)) > w.remaining {
		p, tooLong = p[:w.remaining], true
	}
	n, err := w.w.Write(p)
	w.remaining -= int64(n)
	if err != nil {
		w.err = fmt.Errorf("nar: entry %s: writing contents: %w", entryName(w.filePath), err)
		return n, w.err
	}
	if tooLong {
		return n, invalidf(w.filePath, "contents longer than the header's Size")
	}
	return n, nil
}

// Close finishes the NAR, writing the closing parentheses. It does not close
// the underlying writer.
func (w *Writer) Close() error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return nil
	}
	w.buf = w.buf[:0]
	if !w.started {
		w.err = invalidf("", "no root entry written")
		return w.err
	}
	if w.inFile {
		if err := w.endFile(); err != nil {
			w.err = err
			return err
		}
	}
	for len(w.stack) > 0 {
		w.closeDir()
	}
	w.closed = true
	if err := w.flush(); err != nil {
		w.err = err
		return err
	}
	return nil
}

func (w *Writer) endFile() error {
	if w.remaining != 0 {
		return invalidf(w.filePath, "contents %d bytes shorter than the header's Size", w.remaining)
	}
	w.buf = append(w.buf, zeros[:w.pad]...)
	w.str(")")
	if w.filePath != "" {
		w.str(")")
	}
	w.inFile = false
	return nil
}

func (w *Writer) closeDir() {
	d := w.stack[len(w.stack)-1]
	w.stack = w.stack[:len(w.stack)-1]
	w.str(")")
	if d.path != "" {
		w.str(")")
	}
}

var zeros [8]byte

// str appends a padded string to w.buf.
func (w *Writer) str(s string) {
	w.buf = binary.LittleEndian.AppendUint64(w.buf, uint64(len(s)))
	w.buf = append(w.buf, s...)
	w.buf = append(w.buf, zeros[:padding(uint64(len(s)))]...)
}

func (w *Writer) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.w.Write(w.buf)
	w.buf = w.buf[:0]
	if err != nil {
		return fmt.Errorf("nar: writing: %w", err)
	}
	return nil
}
