package nar

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// Listing is one node of a NAR's listing, the JSON that Nix writes next to
// a narinfo in a binary cache (HASH.ls, with write-nar-listing) and that
// `nix store ls --json -R` prints: every node's type; for a regular file
// its size, whether it is executable and where its contents start in the
// NAR (narOffset, in bytes from the NAR's start); for a symlink its
// target; for a directory its entries.
type Listing struct {
	Type       Type
	Size       int64
	Executable bool
	NarOffset  int64
	Target     string
	Entries    map[string]*Listing
}

// List reads a whole NAR from r and returns the listing of its root. Like
// Reader, it refuses a malformed NAR with an error wrapping ErrInvalid.
func List(r io.Reader) (*Listing, error) {
	cr := &countingReader{r: r}
	nr := NewReader(cr)
	var root *Listing
	for {
		h, err := nr.Next()
		if err == io.EOF {
			return root, nil
		}
		if err != nil {
			return nil, err
		}
		n := &Listing{Type: h.Type, Target: h.LinkTarget}
		switch h.Type {
		case TypeRegular:
			// The Reader stops right before a file's contents.
			n.Size, n.Executable, n.NarOffset = h.Size, h.Executable, cr.n
		case TypeDirectory:
			n.Entries = map[string]*Listing{}
		}
		if h.Path == "" {
			root = n
			continue
		}
		parent := root
		dir, name := "", h.Path
		if i := strings.LastIndexByte(h.Path, '/'); i >= 0 {
			dir, name = h.Path[:i], h.Path[i+1:]
		}
		if dir != "" {
			parent = root.Lookup(dir)
		}
		// The Reader checked that each entry's parent is an open directory.
		parent.Entries[name] = n
	}
}

// Lookup returns the node at the slash-separated path below l ("" for l
// itself), or nil.
func (l *Listing) Lookup(path string) *Listing {
	if path == "" {
		return l
	}
	for _, name := range strings.Split(path, "/") {
		if l == nil || l.Type != TypeDirectory {
			return nil
		}
		l = l.Entries[name]
	}
	return l
}

// MarshalJSON writes the node as Nix does, byte for byte: keys in Nix's
// order, entries sorted by name, "executable" only when true.
func (l *Listing) MarshalJSON() ([]byte, error) {
	var b []byte
	switch l.Type {
	case TypeRegular:
		b = append(b, `{"type":"regular","size":`...)
		b = strconv.AppendInt(b, l.Size, 10)
		if l.Executable {
			b = append(b, `,"executable":true`...)
		}
		b = append(b, `,"narOffset":`...)
		b = strconv.AppendInt(b, l.NarOffset, 10)
	case TypeSymlink:
		b = appendJSONString(append(b, `{"type":"symlink","target":`...), l.Target)
	case TypeDirectory:
		b = append(b, `{"type":"directory","entries":{`...)
		for i, name := range slices.Sorted(maps.Keys(l.Entries)) {
			if i > 0 {
				b = append(b, ',')
			}
			v, err := l.Entries[name].MarshalJSON()
			if err != nil {
				return nil, err
			}
			b = append(append(appendJSONString(b, name), ':'), v...)
		}
		b = append(b, '}')
	default:
		return nil, fmt.Errorf("NAR listing: unknown node type %v", l.Type)
	}
	return append(b, '}'), nil
}

// appendJSONString appends s as a JSON string the way Nix writes one:
// quotes, backslashes and control characters escaped, every other byte as
// it is (names in a NAR need not be UTF-8, and Nix does not replace them).
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c == '\n':
			b = append(b, '\\', 'n')
		case c == '\r':
			b = append(b, '\\', 'r')
		case c == '\t':
			b = append(b, '\\', 't')
		case c < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
