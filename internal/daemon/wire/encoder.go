package wire

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"io"
	"slices"
)

// Encoder writes protocol values to a buffered stream; nothing reaches the
// peer before Flush. An Encoder is not safe for concurrent use.
type Encoder struct {
	w   *bufio.Writer
	err error
	buf [8]byte
}

// NewEncoder returns an Encoder writing to w through a 32 KiB buffer.
func NewEncoder(w io.Writer) *Encoder { return &Encoder{w: bufio.NewWriterSize(w, 32<<10)} }

// Err returns the first write error, or nil.
func (e *Encoder) Err() error { return e.err }

// Flush sends buffered data to the underlying writer.
func (e *Encoder) Flush() error {
	if e.err != nil {
		return e.err
	}
	e.err = e.w.Flush()
	return e.err
}

// Write writes raw bytes (a NAR after STDERR_LAST, or pre-encoded messages).
func (e *Encoder) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	e.err = err
	return n, err
}

// U64 writes a u64.
func (e *Encoder) U64(v uint64) {
	binary.LittleEndian.PutUint64(e.buf[:], v)
	e.Write(e.buf[:])
}

// Bool writes 1 or 0.
func (e *Encoder) Bool(b bool) {
	if b {
		e.U64(1)
	} else {
		e.U64(0)
	}
}

var zeros [8]byte

// Bytes writes a padded byte string.
func (e *Encoder) Bytes(b []byte) {
	e.U64(uint64(len(b)))
	e.Write(b)
	e.Write(zeros[:padLen(uint64(len(b)))])
}

// String writes a padded string.
func (e *Encoder) String(s string) {
	e.U64(uint64(len(s)))
	if e.err == nil {
		_, e.err = e.w.WriteString(s)
	}
	e.Write(zeros[:padLen(uint64(len(s)))])
}

// Hex writes b in lower-case base 16 as a padded string (a hash digest),
// without building the string first.
func (e *Encoder) Hex(b []byte) {
	n := 2 * len(b)
	e.U64(uint64(n))
	if e.err != nil {
		return
	}
	if e.w.Available() >= n {
		_, e.err = e.w.Write(hex.AppendEncode(e.w.AvailableBuffer(), b))
	} else {
		_, e.err = e.w.WriteString(hex.EncodeToString(b))
	}
	e.Write(zeros[:padLen(uint64(n))])
}

// Strings writes a list of strings in the given order.
func (e *Encoder) Strings(ss []string) {
	e.U64(uint64(len(ss)))
	for _, s := range ss {
		e.String(s)
	}
}

// StringSet writes strings sorted bytewise and without duplicates, as Nix
// writes a std::set<std::string>.
func (e *Encoder) StringSet(ss []string) {
	if isStrictlySorted(ss) {
		e.Strings(ss) // the usual case (no or one signature): no copy
		return
	}
	sorted := slices.Compact(slices.Sorted(slices.Values(ss)))
	e.Strings(sorted)
}

func isStrictlySorted(ss []string) bool {
	for i := 1; i < len(ss); i++ {
		if ss[i-1] >= ss[i] {
			return false
		}
	}
	return true
}

// StringMap writes a map<string,string> sorted by key.
func (e *Encoder) StringMap(m map[string]string) {
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	})
	e.U64(uint64(len(keys)))
	for _, k := range keys {
		e.String(k)
		e.String(m[k])
	}
}
