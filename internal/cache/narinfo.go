package cache

import (
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// signedNarinfo is the narinfo of the path that info describes, as the
// Server serves it and the Pusher writes it: its signatures, then one by
// each of keys. The caller sets where the NAR is (URL, Compression,
// FileHash, FileSize). A content address that does not parse is left out
// and its parse error returned, with the rest of the narinfo: the Server
// serves the path without it, the Pusher refuses the path.
func signedNarinfo(dir storepath.Dir, info *store.PathInfo, keys []signature.SecretKey) (narinfo.NarInfo, error) {
	ni := narinfo.NarInfo{
		StorePath: info.Path, NarHash: info.NarHash, NarSize: info.NarSize,
		References: info.References, Deriver: info.Deriver, Sigs: info.Sigs,
	}
	if len(keys) > 0 {
		fp := signature.Fingerprint(dir, info.Path, info.NarHash, info.NarSize, info.References)
		for _, k := range keys {
			ni.Sigs = append(ni.Sigs, k.Sign(fp))
		}
	}
	if info.CA == "" {
		return ni, nil
	}
	ca, err := contentaddress.Parse(info.CA)
	if err != nil {
		return ni, err
	}
	ni.CA = ca
	return ni, nil
}
