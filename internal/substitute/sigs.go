package substitute

import (
	"crypto/ed25519"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// publicKeys maps key names to ed25519 public keys (trusted-public-keys).
type publicKeys map[string]ed25519.PublicKey

func parsePublicKeys(keys []string) (publicKeys, error) {
	pk := publicKeys{}
	for _, k := range keys {
		name, b64, ok := strings.Cut(k, ":")
		if !ok || name == "" {
			return nil, fmt.Errorf("public key %q: want <name>:<base64>", k)
		}
		raw, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, fmt.Errorf("public key %q: %w", name, err)
		}
		if len(raw) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("public key %q: %d bytes, want %d", name, len(raw), ed25519.PublicKeySize)
		}
		pk[name] = ed25519.PublicKey(raw)
	}
	return pk, nil
}

// fingerprint is the signed text of a path (Nix's ValidPathInfo::fingerprint):
// 1;<path>;<narHash sha256:nix32>;<narSize>;<comma-separated full refs>.
func fingerprint(dir storepath.Dir, info *Info) string {
	refs := make([]string, len(info.References))
	for i, r := range storepath.Sort(append([]storepath.Path(nil), info.References...)) {
		refs[i] = dir.Abs(r)
	}
	return "1;" + dir.Abs(info.Path) + ";" + info.NarHash.String() + ";" +
		strconv.FormatUint(info.NarSize, 10) + ";" + strings.Join(refs, ",")
}

// signedBy reports whether one of info's signatures verifies with a trusted key.
func (pk publicKeys) signedBy(dir storepath.Dir, info *Info) bool {
	fp := []byte(fingerprint(dir, info))
	for _, s := range info.Sigs {
		name, b64, ok := strings.Cut(s, ":")
		if !ok {
			continue
		}
		key, ok := pk[name]
		if !ok {
			continue
		}
		sig, err := base64.StdEncoding.DecodeString(b64)
		if err != nil || len(sig) != ed25519.SignatureSize {
			continue
		}
		if ed25519.Verify(key, fp, sig) {
			return true
		}
	}
	return false
}

// contentAddressed reports whether info's CA field computes info's own
// path, which makes the path trustworthy without a signature (Nix's
// ValidPathInfo::isContentAddressed).
func contentAddressed(dir storepath.Dir, info *Info) bool {
	if info.CA == "" {
		return false
	}
	ca, err := contentaddress.Parse(info.CA)
	if err != nil {
		return false
	}
	var refs []storepath.Path
	self := false
	for _, r := range info.References {
		if r == info.Path {
			self = true
			continue
		}
		refs = append(refs, r)
	}
	p, err := ca.StorePath(dir, info.Path.Name(), refs, self)
	return err == nil && p == info.Path
}
