// Package storepath implements Nix store paths: validated base names
// ("<32-char nix32 hash>-<name>"), store directories, and the computation of
// store paths from hashes (input-addressed, text and fixed-output paths).
package storepath

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"unicode"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/nixbase32"
)

// HashLen is the length of the hash part of a store path base name.
const HashLen = 32

// MaxNameLen is the longest name Nix accepts in a store path.
const MaxNameLen = 211

// DefaultDir is the store directory Nix uses unless NIX_STORE_DIR says otherwise.
const DefaultDir Dir = "/nix/store"

// ErrBadPath is wrapped by every error about a malformed store path.
var ErrBadPath = errors.New("bad store path")

// Path is a store path without its directory: "<hash>-<name>". The zero Path
// means "no path" (an empty optional path on the wire).
type Path struct{ base string }

// ParseBase validates a base name such as "dxa4…-hello-2.12".
func ParseBase(base string) (Path, error) {
	if len(base) < HashLen+2 || base[HashLen] != '-' {
		return Path{}, fmt.Errorf("%w %q: expected <32-char hash>-<name>", ErrBadPath, base)
	}
	if !nixbase32.Is(base[:HashLen]) {
		return Path{}, fmt.Errorf("%w %q: hash part is not nix base-32", ErrBadPath, base)
	}
	if err := CheckName(base[HashLen+1:]); err != nil {
		return Path{}, fmt.Errorf("%w %q: %v", ErrBadPath, base, err)
	}
	return Path{base: base}, nil
}

// CheckName validates the name part of a store path.
func CheckName(name string) error {
	if name == "" {
		return errors.New("empty name")
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("name longer than %d characters", MaxNameLen)
	}
	if name == "." || name == ".." {
		return fmt.Errorf("name %q is not allowed", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case strings.IndexByte("+-._?=", c) >= 0:
		case c < 0x80 && unicode.IsPrint(rune(c)):
			return fmt.Errorf("name contains forbidden character '%c'", c)
		default: // a control character, or a byte of a UTF-8 sequence
			return fmt.Errorf("name contains forbidden byte '\\x%02x'", c)
		}
	}
	return nil
}

// String returns the base name.
func (p Path) String() string { return p.base }

// IsZero reports whether p is the empty path.
func (p Path) IsZero() bool { return p.base == "" }

// HashPart returns the 32-character hash part.
func (p Path) HashPart() string { return p.base[:HashLen] }

// Name returns the part after the hash and dash.
func (p Path) Name() string { return p.base[HashLen+1:] }

// IsDerivation reports whether the name ends in ".drv".
func (p Path) IsDerivation() bool { return strings.HasSuffix(p.base, ".drv") }

// Compare orders paths by base name, the order Nix writes sets in.
func Compare(a, b Path) int { return strings.Compare(a.base, b.base) }

// Sort sorts paths by base name and removes duplicates.
func Sort(ps []Path) []Path {
	slices.SortFunc(ps, Compare)
	return slices.Compact(ps)
}

// Dir is a logical store directory such as "/nix/store".
type Dir string

// Abs returns the absolute path of p in d.
func (d Dir) Abs(p Path) string { return string(d) + "/" + p.base }

// Parse validates an absolute store path in d. Paths below a store path
// ("/nix/store/x-foo/bin") are refused; see ParsePrefix for those.
func (d Dir) Parse(abs string) (Path, error) {
	dir, base := path.Split(abs)
	if strings.TrimSuffix(dir, "/") != string(d) {
		return Path{}, fmt.Errorf("%w %q: not in the store directory %s", ErrBadPath, abs, d)
	}
	return ParseBase(base)
}

// ParsePrefix returns the store path that abs lies in, and the rest of abs
// after it ("" or "/bin/foo").
func (d Dir) ParsePrefix(abs string) (Path, string, error) {
	prefix := string(d) + "/"
	if !strings.HasPrefix(abs, prefix) {
		return Path{}, "", fmt.Errorf("%w %q: not in the store directory %s", ErrBadPath, abs, d)
	}
	rest := abs[len(prefix):]
	base, tail, _ := strings.Cut(rest, "/")
	p, err := ParseBase(base)
	if err != nil {
		return Path{}, "", err
	}
	if tail != "" {
		tail = "/" + tail
	}
	return p, tail, nil
}

// MakeStorePath computes the store path of a typed hash, as Nix's
// makeStorePath: sha256 of "<type>:<algo>:<base16>:<dir>:<name>", folded to
// 160 bits and written in nix base-32.
func (d Dir) MakeStorePath(typ string, h hash.Hash, name string) (Path, error) {
	if err := CheckName(name); err != nil {
		return Path{}, fmt.Errorf("%w: %v", ErrBadPath, err)
	}
	s := typ + ":" + h.StringBase16() + ":" + string(d) + ":" + name
	sum := sha256.Sum256([]byte(s))
	return Path{base: nixbase32.EncodeToString(compress(sum[:], 20)) + "-" + name}, nil
}

func compress(h []byte, size int) []byte {
	out := make([]byte, size)
	for i, b := range h {
		out[i%size] ^= b
	}
	return out
}

// makeType builds "<type>:<ref>…[:self]" as Nix's makeType.
func (d Dir) makeType(typ string, refs []Path, self bool) string {
	var b strings.Builder
	b.WriteString(typ)
	for _, r := range Sort(slices.Clone(refs)) {
		b.WriteString(":")
		b.WriteString(d.Abs(r))
	}
	if self {
		b.WriteString(":self")
	}
	return b.String()
}

// MakeTextPath computes the path of a text file (e.g. a .drv) whose sha256
// is h and which references refs.
func (d Dir) MakeTextPath(name string, h hash.Hash, refs []Path) (Path, error) {
	if h.Algo != hash.SHA256 {
		return Path{}, fmt.Errorf("%w: text path %q needs a sha256 hash, got %s", ErrBadPath, name, h.Algo)
	}
	return d.MakeStorePath(d.makeType("text", refs, false), h, name)
}

// MakeFixedOutputPath computes the path of fixed-output content. recursive
// means the hash is over the NAR serialisation; only recursive sha256 paths
// may have references.
func (d Dir) MakeFixedOutputPath(name string, recursive bool, h hash.Hash, refs []Path, self bool) (Path, error) {
	if recursive && h.Algo == hash.SHA256 {
		return d.MakeStorePath(d.makeType("source", refs, self), h, name)
	}
	if len(refs) > 0 || self {
		return Path{}, fmt.Errorf("%w: fixed-output path %q cannot have references", ErrBadPath, name)
	}
	r := ""
	if recursive {
		r = "r:"
	}
	inner := hash.Sum(hash.SHA256, []byte("fixed:out:"+r+h.StringBase16()+":"))
	return d.MakeStorePath("output:out", inner, name)
}

// MakeOutputPath computes an input-addressed derivation output path from the
// derivation's hash modulo (h) as Nix's makeOutputPath.
func (d Dir) MakeOutputPath(output string, h hash.Hash, drvName string) (Path, error) {
	name := drvName
	if output != "out" {
		name += "-" + output
	}
	return d.MakeStorePath("output:"+output, h, name)
}
