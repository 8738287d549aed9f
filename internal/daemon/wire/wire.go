// Package wire implements the primitives of the Nix daemon worker protocol:
// little-endian u64s, lenient booleans, padded byte strings, string lists
// and maps, store paths, and the framed stream used for uploads.
//
// Decoder and Encoder keep the first error they meet ("sticky"): after an
// error every further call is a no-op returning zero values, and Err reports
// the error, wrapped with the name of the field that failed. This lets a
// request be decoded field after field with one check at the end.
//
// Nothing here trusts a length read from the wire for an allocation: data is
// read first and buffers grow with it, so a hostile length costs at most the
// bytes the peer actually sends, up to the caller's limit.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Limits on lengths read from the wire. Nix itself has none; these are set
// well above anything a real client sends.
const (
	// MaxPathLen bounds absolute paths (store paths, GC root links):
	// PATH_MAX on Linux, so no longer path could be used on disk anyway.
	MaxPathLen = 4096
	// MaxSmallString bounds short fields: names, hash strings, content
	// addresses, settings names and values, signatures, output names.
	MaxSmallString = 64 << 10
	// MaxStringLen bounds the largest single string of the protocol, the
	// AddTextToStore contents (a .drv file). Real derivations are a few
	// hundred KiB at most.
	MaxStringLen = 64 << 20
	// MaxListLen bounds counts of lists, sets and maps: the closures that
	// clients send (QueryValidPaths, QueryMissing) hold thousands of paths;
	// a million is far beyond any real store operation.
	MaxListLen = 1 << 20
	// MaxFrameLen bounds one chunk of a framed stream. Nix clients write
	// 32 KiB chunks; frames are copied straight into the caller's buffer,
	// so this limit is only a sanity check.
	MaxFrameLen = 64 << 20
)

// ErrLimit is wrapped by errors about a length beyond its limit.
var ErrLimit = errors.New("length exceeds limit")

// ErrPadding is wrapped by errors about non-zero string padding.
var ErrPadding = errors.New("non-zero padding")

// padLen returns the number of zero bytes after a string of length n.
func padLen(n uint64) int { return int(-n & 7) }

// Decoder reads protocol values from a stream. It does not buffer: give it
// a bufio.Reader. A Decoder is not safe for concurrent use.
type Decoder struct {
	r   io.Reader
	err error
	buf [8]byte
	// scratch receives short strings before they are copied into a Go
	// string, so that reading one costs a single allocation.
	scratch []byte
}

// scratchMax bounds the strings read through Decoder.scratch.
const scratchMax = 4096

// NewDecoder returns a Decoder reading from r.
func NewDecoder(r io.Reader) *Decoder { return &Decoder{r: r} }

// Err returns the first error met, or nil.
func (d *Decoder) Err() error { return d.err }

// SetErr records err (with the field name) unless an error is already kept.
func (d *Decoder) SetErr(field string, err error) {
	if d.err == nil && err != nil {
		d.err = fmt.Errorf("field %s: %w", field, err)
	}
}

func (d *Decoder) fill(field string, p []byte) bool {
	if d.err != nil {
		return false
	}
	if _, err := io.ReadFull(d.r, p); err != nil {
		if err == io.EOF && len(p) > 0 {
			err = io.ErrUnexpectedEOF
		}
		d.SetErr(field, err)
		return false
	}
	return true
}

// U64 reads a u64.
func (d *Decoder) U64(field string) uint64 {
	if !d.fill(field, d.buf[:]) {
		return 0
	}
	return binary.LittleEndian.Uint64(d.buf[:])
}

// U64Max reads a u64 and fails if it exceeds max.
func (d *Decoder) U64Max(field string, max uint64) uint64 {
	v := d.U64(field)
	if v > max {
		d.SetErr(field, fmt.Errorf("value %d exceeds %d", v, max))
		return 0
	}
	return v
}

// Bool reads a boolean. Like Nix, any non-zero value is true.
func (d *Decoder) Bool(field string) bool { return d.U64(field) != 0 }

// Bytes reads a padded byte string of at most max bytes.
func (d *Decoder) Bytes(field string, max int) []byte {
	n := d.U64(field)
	if d.err != nil {
		return nil
	}
	if n > uint64(max) {
		d.SetErr(field, fmt.Errorf("%w: %d bytes, limit %d", ErrLimit, n, max))
		return nil
	}
	b, err := readN(d.r, int(n))
	if err != nil {
		d.SetErr(field, err)
		return nil
	}
	if pad := padLen(n); pad > 0 {
		if !d.fill(field, d.buf[:pad]) {
			return nil
		}
		for _, c := range d.buf[:pad] {
			if c != 0 {
				d.SetErr(field, ErrPadding)
				return nil
			}
		}
	}
	return b
}

// readN reads exactly n bytes, growing the buffer as data arrives so that a
// large announced length is only paid for once the bytes are there.
func readN(r io.Reader, n int) ([]byte, error) {
	const step = 64 << 10
	if n <= step {
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			if err == io.EOF && n > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		return b, nil
	}
	b := make([]byte, 0, step)
	for len(b) < n {
		chunk := min(n-len(b), max(len(b), step))
		b = append(b, make([]byte, chunk)...)
		if _, err := io.ReadFull(r, b[len(b)-chunk:]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return b, nil
}

// String reads a padded string of at most max bytes.
func (d *Decoder) String(field string, max int) string {
	n := d.U64(field)
	if d.err != nil {
		return ""
	}
	if n > uint64(max) {
		d.SetErr(field, fmt.Errorf("%w: %d bytes, limit %d", ErrLimit, n, max))
		return ""
	}
	if n > scratchMax {
		b, err := readN(d.r, int(n))
		if err != nil {
			d.SetErr(field, err)
			return ""
		}
		if !d.padding(field, n) {
			return ""
		}
		return string(b)
	}
	// Short strings (store paths, hashes, names) are read with their
	// padding into the scratch buffer, then copied once.
	padded := int(n) + padLen(n)
	if cap(d.scratch) < padded {
		d.scratch = make([]byte, scratchMax+8)
	}
	b := d.scratch[:padded]
	if !d.fill(field, b) {
		return ""
	}
	for _, c := range b[n:] {
		if c != 0 {
			d.SetErr(field, ErrPadding)
			return ""
		}
	}
	return string(b[:n])
}

// padding reads and checks the padding after a string of length n.
func (d *Decoder) padding(field string, n uint64) bool {
	pad := padLen(n)
	if pad == 0 {
		return true
	}
	if !d.fill(field, d.buf[:pad]) {
		return false
	}
	for _, c := range d.buf[:pad] {
		if c != 0 {
			d.SetErr(field, ErrPadding)
			return false
		}
	}
	return true
}

// Count reads a list/set/map count of at most MaxListLen.
func (d *Decoder) Count(field string) int {
	n := d.U64(field)
	if d.err != nil {
		return 0
	}
	if n > MaxListLen {
		d.SetErr(field, fmt.Errorf("%w: %d elements, limit %d", ErrLimit, n, MaxListLen))
		return 0
	}
	return int(n)
}

// Strings reads a list (or set) of strings, each at most max bytes.
func (d *Decoder) Strings(field string, max int) []string {
	n := d.Count(field)
	out := make([]string, 0, min(n, 1024))
	for i := 0; i < n && d.err == nil; i++ {
		s := d.String(field, max)
		if d.err == nil {
			out = append(out, s)
		}
	}
	if d.err != nil {
		return nil
	}
	return out
}

// StringMap reads a map<string,string>, keys and values at most max bytes.
// A repeated key keeps its last value.
func (d *Decoder) StringMap(field string, max int) map[string]string {
	n := d.Count(field)
	out := make(map[string]string, min(n, 64))
	for i := 0; i < n && d.err == nil; i++ {
		k := d.String(field, max)
		v := d.String(field, max)
		if d.err == nil {
			out[k] = v
		}
	}
	if d.err != nil {
		return nil
	}
	return out
}
