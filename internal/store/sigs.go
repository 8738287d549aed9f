package store

import (
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// sigChecker decides whether a path's signatures are by a trusted key.
type sigChecker struct{ keys []signature.PublicKey }

func newSigChecker(keys []string) (sigChecker, error) {
	pk, err := signature.ParsePublicKeys(keys)
	if err != nil {
		return sigChecker{}, err
	}
	return sigChecker{keys: pk}, nil
}

// trusted reports whether one of info's signatures is by a trusted key
// (Nix's checkSignatures with one signature needed).
func (c sigChecker) trusted(dir storepath.Dir, info *PathInfo) bool {
	if len(c.keys) == 0 || len(info.Sigs) == 0 {
		return false
	}
	fp := signature.Fingerprint(dir, info.Path, info.NarHash, info.NarSize, info.References)
	return signature.VerifyAny(fp, info.Sigs, c.keys)
}

// sign adds a signature by each of the store's secret keys (nix.conf
// secret-key-files) to info, as Nix signs the outputs it builds.
func (s *Store) sign(info *PathInfo) {
	if len(s.cfg.SecretKeys) == 0 {
		return
	}
	fp := signature.Fingerprint(s.dir, info.Path, info.NarHash, info.NarSize, info.References)
	for _, k := range s.cfg.SecretKeys {
		info.Sigs = append(info.Sigs, k.Sign(fp))
	}
}
