// Package signature implements Nix's ed25519 signatures of store paths: the
// "name:base64" key and signature formats written by
// nix-store --generate-binary-cache-key and nix store sign, and the
// fingerprint of a path that is signed.
package signature

import (
	"crypto/ed25519"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// maxKeyLen caps the length of a key or signature string we parse. The
// longest legitimate one is a secret key: a name plus 88 base64 characters;
// names are short labels such as "cache.nixos.org-1".
const maxKeyLen = 4096

// PublicKey is a named ed25519 public key ("name:base64(32 bytes)").
type PublicKey struct {
	Name string
	Key  ed25519.PublicKey
}

// SecretKey is a named ed25519 private key ("name:base64(64 bytes)").
type SecretKey struct {
	Name string
	Key  ed25519.PrivateKey
}

// String returns the key in Nix's "name:base64" form.
func (k PublicKey) String() string {
	return k.Name + ":" + base64.StdEncoding.EncodeToString(k.Key)
}

// String returns the key in Nix's "name:base64" form.
func (k SecretKey) String() string {
	return k.Name + ":" + base64.StdEncoding.EncodeToString(k.Key)
}

// split parses "name:base64" into the name and decoded bytes of length want.
func split(what, s string, want int) (string, []byte, error) {
	if len(s) > maxKeyLen {
		return "", nil, fmt.Errorf("%s: longer than %d bytes", what, maxKeyLen)
	}
	name, b64, ok := strings.Cut(s, ":")
	if !ok {
		return "", nil, fmt.Errorf("%s: want <name>:<base64>, no colon", what)
	}
	if name == "" {
		return "", nil, fmt.Errorf("%s: empty name", what)
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return "", nil, fmt.Errorf("%s %q: base64: %w", what, name, err)
	}
	if len(raw) != want {
		return "", nil, fmt.Errorf("%s %q: %d bytes, want %d", what, name, len(raw), want)
	}
	return name, raw, nil
}

// ParsePublicKey parses "name:base64" with a 32-byte ed25519 public key, as
// written by nix-store --generate-binary-cache-key and trusted-public-keys.
func ParsePublicKey(s string) (PublicKey, error) {
	name, raw, err := split("public key", strings.TrimSpace(s), ed25519.PublicKeySize)
	if err != nil {
		return PublicKey{}, err
	}
	return PublicKey{Name: name, Key: ed25519.PublicKey(raw)}, nil
}

// ParsePublicKeys parses each of ss with ParsePublicKey.
func ParsePublicKeys(ss []string) ([]PublicKey, error) {
	keys := make([]PublicKey, 0, len(ss))
	for i, s := range ss {
		k, err := ParsePublicKey(s)
		if err != nil {
			return nil, fmt.Errorf("key %d: %w", i, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// ParseSecretKey parses "name:base64" with a 64-byte ed25519 private key
// (seed followed by public key), as in a secret-key-files file. The public
// half must match the seed.
func ParseSecretKey(s string) (SecretKey, error) {
	name, raw, err := split("secret key", strings.TrimSpace(s), ed25519.PrivateKeySize)
	if err != nil {
		return SecretKey{}, err
	}
	priv := ed25519.PrivateKey(raw)
	derived := ed25519.NewKeyFromSeed(priv.Seed())
	if !derived.Equal(priv) {
		return SecretKey{}, fmt.Errorf("secret key %q: public half does not match the seed", name)
	}
	return SecretKey{Name: name, Key: priv}, nil
}

// Sign signs fingerprint and returns "name:base64(signature)".
func (k SecretKey) Sign(fingerprint string) string {
	sig := ed25519.Sign(k.Key, []byte(fingerprint))
	return k.Name + ":" + base64.StdEncoding.EncodeToString(sig)
}

// PublicKey returns the public half of k, under the same name.
func (k SecretKey) PublicKey() PublicKey {
	return PublicKey{Name: k.Name, Key: k.Key.Public().(ed25519.PublicKey)}
}

// Verify reports whether sig ("name:base64") is a valid signature of
// fingerprint by a key in keys with the same name. A malformed signature is
// simply not valid.
func Verify(fingerprint, sig string, keys []PublicKey) bool {
	name, raw, err := split("signature", sig, ed25519.SignatureSize)
	if err != nil {
		return false
	}
	for _, k := range keys {
		if k.Name == name && len(k.Key) == ed25519.PublicKeySize &&
			ed25519.Verify(k.Key, []byte(fingerprint), raw) {
			return true
		}
	}
	return false
}

// VerifyAny reports whether any of sigs verifies fingerprint with keys.
func VerifyAny(fingerprint string, sigs []string, keys []PublicKey) bool {
	for _, s := range sigs {
		if Verify(fingerprint, s, keys) {
			return true
		}
	}
	return false
}

// Fingerprint returns the text Nix signs for a store path
// (ValidPathInfo::fingerprint):
// "1;<abs path>;sha256:<nix32 nar hash>;<nar size>;<sorted abs refs, comma-joined>".
func Fingerprint(dir storepath.Dir, p storepath.Path, narHash hash.Hash, narSize uint64, refs []storepath.Path) string {
	sorted := storepath.Sort(append([]storepath.Path(nil), refs...))
	abs := make([]string, len(sorted))
	for i, r := range sorted {
		abs[i] = dir.Abs(r)
	}
	return "1;" + dir.Abs(p) + ";" + narHash.String() + ";" +
		strconv.FormatUint(narSize, 10) + ";" + strings.Join(abs, ",")
}
