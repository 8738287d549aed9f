// Package hash implements Nix's hash values: the algorithms Nix names (md5,
// sha1, sha256, sha512) and the textual forms it reads and writes (base16,
// Nix base-32, base64, each with or without an "algo:" prefix, and SRI).
package hash

import (
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	gohash "hash"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/nixbase32"
)

// Algo is a hash algorithm Nix knows.
type Algo int

// The algorithms, in Nix's spelling.
const (
	MD5 Algo = iota + 1
	SHA1
	SHA256
	SHA512
)

// ErrUnknownAlgo is returned for an algorithm name Nix does not know.
var ErrUnknownAlgo = errors.New("unknown hash algorithm")

// ParseAlgo parses "md5", "sha1", "sha256" or "sha512".
func ParseAlgo(s string) (Algo, error) {
	switch s {
	case "md5":
		return MD5, nil
	case "sha1":
		return SHA1, nil
	case "sha256":
		return SHA256, nil
	case "sha512":
		return SHA512, nil
	}
	return 0, fmt.Errorf("%w %q", ErrUnknownAlgo, s)
}

// String returns Nix's name of the algorithm.
func (a Algo) String() string {
	switch a {
	case MD5:
		return "md5"
	case SHA1:
		return "sha1"
	case SHA256:
		return "sha256"
	case SHA512:
		return "sha512"
	}
	return fmt.Sprintf("Algo(%d)", int(a))
}

// Size returns the digest size in bytes.
func (a Algo) Size() int {
	switch a {
	case MD5:
		return md5.Size
	case SHA1:
		return sha1.Size
	case SHA256:
		return sha256.Size
	case SHA512:
		return sha512.Size
	}
	return 0
}

// New returns a new hash.Hash computing this algorithm.
func (a Algo) New() gohash.Hash {
	switch a {
	case MD5:
		return md5.New()
	case SHA1:
		return sha1.New()
	case SHA256:
		return sha256.New()
	case SHA512:
		return sha512.New()
	}
	panic("hash: New of invalid algorithm " + a.String())
}

// Hash is a digest together with its algorithm. The zero Hash is "no hash".
type Hash struct {
	Algo   Algo
	Digest []byte
}

// IsZero reports whether h holds no hash.
func (h Hash) IsZero() bool { return h.Algo == 0 }

// Equal reports whether two hashes have the same algorithm and digest.
func (h Hash) Equal(o Hash) bool {
	return h.Algo == o.Algo && string(h.Digest) == string(o.Digest)
}

// Sum hashes data with algo.
func Sum(algo Algo, data []byte) Hash {
	w := algo.New()
	w.Write(data)
	return Hash{Algo: algo, Digest: w.Sum(nil)}
}

// FromHasher returns the current digest of w as a Hash of algo.
func FromHasher(algo Algo, w gohash.Hash) Hash {
	return Hash{Algo: algo, Digest: w.Sum(nil)}
}

// Base16 returns the lowercase hex digest without prefix.
func (h Hash) Base16() string { return hex.EncodeToString(h.Digest) }

// NixBase32 returns the Nix base-32 digest without prefix.
func (h Hash) NixBase32() string { return nixbase32.EncodeToString(h.Digest) }

// Base64 returns the standard base64 digest without prefix.
func (h Hash) Base64() string { return base64.StdEncoding.EncodeToString(h.Digest) }

// SRI returns "algo-<base64>".
func (h Hash) SRI() string { return h.Algo.String() + "-" + h.Base64() }

// String returns "algo:<nix32>", the form Nix prints in narinfo and CA fields.
func (h Hash) String() string { return h.Algo.String() + ":" + h.NixBase32() }

// StringBase16 returns "algo:<base16>", the form of the database's hash column.
func (h Hash) StringBase16() string { return h.Algo.String() + ":" + h.Base16() }

// Parse parses a hash that names its algorithm: "algo:<digest>" with the digest
// in base16, Nix base-32 or base64, or SRI "algo-<base64>".
func Parse(s string) (Hash, error) {
	if i := strings.IndexByte(s, ':'); i >= 0 {
		algo, err := ParseAlgo(s[:i])
		if err != nil {
			return Hash{}, fmt.Errorf("hash %q: %w", s, err)
		}
		return decode(algo, s[i+1:], false)
	}
	if i := strings.IndexByte(s, '-'); i >= 0 {
		algo, err := ParseAlgo(s[:i])
		if err != nil {
			return Hash{}, fmt.Errorf("hash %q: %w", s, err)
		}
		return decode(algo, s[i+1:], true)
	}
	return Hash{}, fmt.Errorf("hash %q: no algorithm prefix", s)
}

// ParseAny parses a hash of a known algorithm: a bare digest in any encoding,
// or a prefixed or SRI form whose algorithm must equal algo.
func ParseAny(s string, algo Algo) (Hash, error) {
	if strings.IndexByte(s, ':') >= 0 || (strings.IndexByte(s, '-') >= 0 && strings.HasPrefix(s, algo.String()+"-")) {
		h, err := Parse(s)
		if err != nil {
			return Hash{}, err
		}
		if h.Algo != algo {
			return Hash{}, fmt.Errorf("hash %q: algorithm %s, want %s", s, h.Algo, algo)
		}
		return h, nil
	}
	return decode(algo, s, false)
}

func decode(algo Algo, s string, sri bool) (Hash, error) {
	size := algo.Size()
	var (
		digest []byte
		err    error
	)
	switch {
	case !sri && len(s) == hex.EncodedLen(size):
		digest, err = hex.DecodeString(s)
	case !sri && len(s) == nixbase32.EncodedLen(size):
		digest, err = nixbase32.DecodeString(s)
	case len(s) == base64.StdEncoding.EncodedLen(size):
		digest, err = base64.StdEncoding.DecodeString(s)
	default:
		return Hash{}, fmt.Errorf("hash %q: wrong length %d for %s", s, len(s), algo)
	}
	if err != nil {
		return Hash{}, fmt.Errorf("hash %q: %w", s, err)
	}
	if len(digest) != size {
		return Hash{}, fmt.Errorf("hash %q: decodes to %d bytes, want %d", s, len(digest), size)
	}
	return Hash{Algo: algo, Digest: digest}, nil
}
