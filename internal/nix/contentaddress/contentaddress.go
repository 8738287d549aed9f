// Package contentaddress implements Nix content addresses: the "ca" field of
// path info ("text:sha256:<nix32>", "fixed:[r:]<algo>:<nix32>") and the
// method-and-algorithm strings of AddToStore ("fixed:r:sha256").
package contentaddress

import (
	"fmt"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// Method is how content is hashed for its address.
type Method int

// The methods Nix 2.8 knows.
const (
	Text Method = iota + 1 // flat file hashed as is; sha256 only; may have references
	Flat                   // flat file hashed as is
	NAR                    // NAR serialisation hashed ("recursive")
)

// CA is a content address: a method and a hash.
type CA struct {
	Method Method
	Hash   hash.Hash
}

// IsZero reports whether ca is "no content address".
func (ca CA) IsZero() bool { return ca.Method == 0 }

// prefix returns "text:", "fixed:" or "fixed:r:".
func (m Method) prefix() string {
	switch m {
	case Text:
		return "text:"
	case Flat:
		return "fixed:"
	case NAR:
		return "fixed:r:"
	}
	return ""
}

// String returns the ca field form, e.g. "fixed:r:sha256:<nix32>", or "".
func (ca CA) String() string {
	if ca.IsZero() {
		return ""
	}
	return ca.Method.prefix() + ca.Hash.String()
}

// MethodAlgo returns the AddToStore form, e.g. "fixed:r:sha256".
func MethodAlgo(m Method, a hash.Algo) string { return m.prefix() + a.String() }

// ParseMethodAlgo parses an AddToStore camStr: "text:sha256", "fixed:sha1",
// "fixed:r:sha256". The "git:" method is refused with a clear error.
func ParseMethodAlgo(s string) (Method, hash.Algo, error) {
	m, rest, err := parseMethod(s)
	if err != nil {
		return 0, 0, err
	}
	algo, err := hash.ParseAlgo(rest)
	if err != nil {
		return 0, 0, fmt.Errorf("content address method %q: %w", s, err)
	}
	if m == Text && algo != hash.SHA256 {
		return 0, 0, fmt.Errorf("content address method %q: text needs sha256", s)
	}
	return m, algo, nil
}

func parseMethod(s string) (Method, string, error) {
	switch {
	case strings.HasPrefix(s, "text:"):
		return Text, s[len("text:"):], nil
	case strings.HasPrefix(s, "fixed:r:"):
		return NAR, s[len("fixed:r:"):], nil
	case strings.HasPrefix(s, "fixed:git:"):
		return 0, "", fmt.Errorf("content address %q: git hashing is not supported", s)
	case strings.HasPrefix(s, "fixed:"):
		return Flat, s[len("fixed:"):], nil
	}
	return 0, "", fmt.Errorf("content address %q: unknown method", s)
}

// Parse parses a ca field. The empty string is the zero CA.
func Parse(s string) (CA, error) {
	if s == "" {
		return CA{}, nil
	}
	m, rest, err := parseMethod(s)
	if err != nil {
		return CA{}, err
	}
	h, err := hash.Parse(rest)
	if err != nil {
		return CA{}, fmt.Errorf("content address %q: %w", s, err)
	}
	if m == Text && h.Algo != hash.SHA256 {
		return CA{}, fmt.Errorf("content address %q: text needs sha256", s)
	}
	return CA{Method: m, Hash: h}, nil
}

// StorePath computes the store path that this content address gives name
// with the given references (self: the content refers to its own path).
func (ca CA) StorePath(dir storepath.Dir, name string, refs []storepath.Path, self bool) (storepath.Path, error) {
	switch ca.Method {
	case Text:
		if self {
			return storepath.Path{}, fmt.Errorf("text path %q cannot refer to itself", name)
		}
		return dir.MakeTextPath(name, ca.Hash, refs)
	case Flat:
		return dir.MakeFixedOutputPath(name, false, ca.Hash, refs, self)
	case NAR:
		return dir.MakeFixedOutputPath(name, true, ca.Hash, refs, self)
	}
	return storepath.Path{}, fmt.Errorf("no content address for %q", name)
}
