package substitute

import (
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// signedBy reports whether one of info's signatures verifies with one of
// keys (trusted-public-keys).
func signedBy(dir storepath.Dir, keys []signature.PublicKey, info *Info) bool {
	fp := signature.Fingerprint(dir, info.StorePath, info.NarHash, info.NarSize, info.References)
	return signature.VerifyAny(fp, info.Sigs, keys)
}

// contentAddressed reports whether info's CA field computes info's own
// path, which makes the path trustworthy without a signature (Nix's
// ValidPathInfo::isContentAddressed).
func contentAddressed(dir storepath.Dir, info *Info) bool {
	if info.CA.IsZero() {
		return false
	}
	var refs []storepath.Path
	self := false
	for _, r := range info.References {
		if r == info.StorePath {
			self = true
			continue
		}
		refs = append(refs, r)
	}
	p, err := info.CA.StorePath(dir, info.StorePath.Name(), refs, self)
	return err == nil && p == info.StorePath
}
