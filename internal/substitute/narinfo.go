package substitute

import (
	"github.com/nixyard/nixyard/internal/nix/narinfo"
)

// Info is what an upstream says about a store path: its narinfo, and the
// upstream it came from. An Info is immutable once returned.
type Info struct {
	narinfo.NarInfo

	// Upstream is the base URL of the upstream that served this narinfo.
	Upstream string
}
