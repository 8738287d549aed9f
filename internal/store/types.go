package store

import (
	"errors"
	"fmt"
	"time"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// ErrNotValid is returned (wrapped) when a path is not valid in the store.
var ErrNotValid = errors.New("path is not valid")

// notValidError is ErrNotValid in words of its own (naming the path, and
// why it matters).
type notValidError string

func (e notValidError) Error() string        { return string(e) }
func (e notValidError) Is(target error) bool { return target == ErrNotValid }

// invalidReference is the error of adding p whose reference ref is not
// valid.
func invalidReference(p, ref string) error {
	return notValidError(fmt.Sprintf("store: cannot add path '%s' because its reference '%s' is not valid", p, ref))
}

// PathInfo is the metadata Nix keeps for a valid store path (a row of
// ValidPaths plus its references).
type PathInfo struct {
	Path             storepath.Path
	Deriver          storepath.Path // zero if unknown
	NarHash          hash.Hash      // always sha256
	References       []storepath.Path
	RegistrationTime time.Time
	NarSize          uint64
	Ultimate         bool
	Sigs             []string // "keyname:base64"
	CA               string   // content address, "" if none (e.g. "fixed:r:sha256:<nix32>")
}

// GCAction says what CollectGarbage does, with Nix's numbering.
type GCAction int

// The GC actions, as numbered on the wire.
const (
	GCReturnLive GCAction = iota
	GCReturnDead
	GCDeleteDead
	GCDeleteSpecific
)

// GCOptions are the arguments of a garbage collection.
type GCOptions struct {
	Action         GCAction
	Paths          []storepath.Path // for GCDeleteSpecific
	IgnoreLiveness bool
	MaxFreed       uint64 // stop once this many bytes are freed; math.MaxUint64 means no limit
	// LRU deletes the least recently used dead paths first (see
	// lastuse.go), instead of in the store directory's order, and counts
	// the NAR sizes of the paths it deletes towards MaxFreed (the size
	// budget's measure) instead of the bytes of their files.
	LRU bool
	// KeepOutputs and KeepDerivations, if not nil, replace the store's
	// keep-outputs and keep-derivations for this collection (a trusted
	// client's settings).
	KeepOutputs, KeepDerivations *bool
}

// GCResult is what a garbage collection reports.
type GCResult struct {
	Paths      []string // absolute paths returned or deleted
	BytesFreed uint64
	// NarBytesFreed is the sum of the NAR sizes of the valid paths
	// deleted.
	NarBytesFreed uint64
}

// DerivedPath is what clients ask to realise: an opaque store path, or
// outputs of a derivation ("drv!out,dev", or "drv!*" for all outputs).
type DerivedPath struct {
	Path       storepath.Path
	Outputs    []string // named outputs, sorted; empty with AllOutputs or for an opaque path
	AllOutputs bool     // "drv!*" (or a bare drv before protocol 1.30)
	Built      bool     // true: outputs of the derivation Path; false: Path itself (opaque)
}

// Missing is the answer of QueryMissing.
type Missing struct {
	WillBuild      []storepath.Path // derivations that would be built
	WillSubstitute []storepath.Path
	Unknown        []storepath.Path
	DownloadSize   uint64
	NarSize        uint64
}
