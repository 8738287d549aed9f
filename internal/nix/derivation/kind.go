package derivation

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// ErrNotSupported is wrapped by errors about derivations nixyard does not
// handle yet: floating content-addressed, deferred and impure ones (Nix 2.8
// experimental features ca-derivations and impure-derivations).
var ErrNotSupported = errors.New("not supported")

// Kind is the type of a derivation, from the kinds of its outputs (Nix's
// DerivationType).
type Kind int

// The derivation kinds of Nix 2.8.
const (
	InputAddressed Kind = iota + 1 // every output has a path computed from the hash modulo
	FixedOutput                    // a single output "out" with a known content hash
	FloatingCA                     // content-addressed outputs whose hash is known after the build
	Deferred                       // input-addressed, but paths unknown until CA inputs are built
	Impure                         // impure outputs (experimental)
)

func (k Kind) String() string {
	switch k {
	case InputAddressed:
		return "input-addressed"
	case FixedOutput:
		return "fixed-output"
	case FloatingCA:
		return "floating content-addressed"
	case Deferred:
		return "deferred"
	case Impure:
		return "impure"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// fixedHash parses the hash of a fixed output: recursive (NAR) or flat, and
// the digest, which must be lowercase base16 as Nix writes it.
func (o Output) fixedHash() (bool, hash.Hash, error) {
	algoName, recursive := strings.CutPrefix(o.HashAlgo, "r:")
	algo, err := hash.ParseAlgo(algoName)
	if err != nil {
		return false, hash.Hash{}, fmt.Errorf("%w: hash algorithm: %w", ErrFormat, err)
	}
	if len(o.Hash) != 2*algo.Size() || strings.ToLower(o.Hash) != o.Hash {
		return false, hash.Hash{}, fmt.Errorf("%w: hash %q: want %d lowercase base16 digits", ErrFormat, o.Hash, 2*algo.Size())
	}
	digest, err := hex.DecodeString(o.Hash)
	if err != nil {
		return false, hash.Hash{}, fmt.Errorf("%w: hash %q: %w", ErrFormat, o.Hash, err)
	}
	return recursive, hash.Hash{Algo: algo, Digest: digest}, nil
}

// kind classifies one output as Nix's parseDerivationOutput does, refusing
// field combinations Nix would not write back unchanged.
func (o Output) kind() (Kind, error) {
	if o.HashAlgo == "" {
		switch {
		case o.Hash != "":
			return 0, fmt.Errorf("%w: hash %q without a hash algorithm", ErrFormat, o.Hash)
		case o.Path == "":
			return Deferred, nil
		}
		return InputAddressed, checkAbs(o.Path)
	}
	switch o.Hash {
	case "", "impure":
		algoName, _ := strings.CutPrefix(o.HashAlgo, "r:")
		if _, err := hash.ParseAlgo(algoName); err != nil {
			return 0, fmt.Errorf("%w: hash algorithm: %w", ErrFormat, err)
		}
		if o.Path != "" {
			return 0, fmt.Errorf("%w: path %q given for an output without a known hash", ErrFormat, o.Path)
		}
		if o.Hash == "impure" {
			return Impure, nil
		}
		return FloatingCA, nil
	}
	if _, _, err := o.fixedHash(); err != nil {
		return 0, err
	}
	return FixedOutput, checkAbs(o.Path)
}

// Kind returns the type of d, with Nix's rules: all outputs of one kind, at
// least one output, a fixed-output derivation has exactly one output named
// "out", floating outputs share one hash algorithm.
func (d *Derivation) Kind() (Kind, error) {
	if len(d.Outputs) == 0 {
		return 0, fmt.Errorf("%w: no outputs", ErrFormat)
	}
	var kind Kind
	floatingAlgo := ""
	for _, id := range slices.Sorted(maps.Keys(d.Outputs)) {
		o := d.Outputs[id]
		k, err := o.kind()
		if err != nil {
			return 0, fmt.Errorf("output %q: %w", id, err)
		}
		if kind != 0 && k != kind {
			return 0, fmt.Errorf("%w: output %q is %s, others are %s: can't mix output types", ErrFormat, id, k, kind)
		}
		kind = k
		if k == FloatingCA {
			algo := strings.TrimPrefix(o.HashAlgo, "r:")
			if floatingAlgo != "" && algo != floatingAlgo {
				return 0, fmt.Errorf("%w: all floating outputs must use the same hash algorithm", ErrFormat)
			}
			floatingAlgo = algo
		}
	}
	if kind == FixedOutput {
		if len(d.Outputs) > 1 {
			return 0, fmt.Errorf("%w: only one fixed output is allowed", ErrFormat)
		}
		if _, ok := d.Outputs["out"]; !ok {
			return 0, fmt.Errorf("%w: single fixed output must be named \"out\"", ErrFormat)
		}
	}
	return kind, nil
}

// References returns the references of the .drv as a store text path: its
// input sources and input derivations, sorted.
func (d *Derivation) References(dir storepath.Dir) ([]storepath.Path, error) {
	refs := make([]storepath.Path, 0, len(d.InputSrcs)+len(d.InputDrvs))
	for _, s := range d.InputSrcs {
		p, err := dir.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("input source: %w", err)
		}
		refs = append(refs, p)
	}
	for drv := range d.InputDrvs {
		p, err := dir.Parse(drv)
		if err != nil {
			return nil, fmt.Errorf("input derivation: %w", err)
		}
		refs = append(refs, p)
	}
	return storepath.Sort(refs), nil
}

// Loader loads the derivation at an absolute .drv path (for HashModulo's
// recursion into input derivations).
type Loader func(ctx context.Context, drvPath string) (*Derivation, error)

// HashModulo computes Nix 2.8's hashDerivationModulo of d with its outputs
// masked (staticOutputHashes), the hash its input-addressed output paths are
// made from:
//   - fixed-output: sha256("fixed:out:<[r:]algo>:<base16 hash>:<out path>"),
//     with the output path as written in d (CheckOutputPaths verifies it);
//   - otherwise sha256 of the ATerm of d with output paths and the env
//     variables named after outputs emptied, and each input derivation
//     replaced by the base16 of its own hash modulo (computed unmasked, as
//     Nix's pathDerivationModulo).
//
// load reads input derivations; cache, if not nil, memoizes their hashes by
// absolute drv path and may be shared between calls (it is not safe for
// concurrent use). Floating, deferred and impure derivations, as d or among
// its inputs, give an error wrapping ErrNotSupported.
func HashModulo(ctx context.Context, d *Derivation, load Loader, cache map[string]hash.Hash) (hash.Hash, error) {
	if cache == nil {
		cache = map[string]hash.Hash{}
	}
	return hashModulo(ctx, d, load, mapMemo(cache))
}

// HashModulo is the package's HashModulo with the hashes of input
// derivations taken from and added to c.
func (c *HashCache) HashModulo(ctx context.Context, d *Derivation, load Loader) (hash.Hash, error) {
	return hashModulo(ctx, d, load, c)
}

func hashModulo(ctx context.Context, d *Derivation, load Loader, cache memo) (hash.Hash, error) {
	h := hasher{load: load, cache: cache, busy: map[string]bool{}}
	return h.hash(ctx, d, true)
}

// memo is where a hasher memoizes hashes modulo by absolute drv path.
type memo interface {
	get(drvPath string) (hash.Hash, bool)
	put(drvPath string, h hash.Hash)
}

type mapMemo map[string]hash.Hash

func (m mapMemo) get(p string) (hash.Hash, bool) { v, ok := m[p]; return v, ok }
func (m mapMemo) put(p string, h hash.Hash)      { m[p] = h }

// HashCache memoizes the (unmasked) hashes modulo of input derivations by
// absolute drv path across calls, so that checking each derivation of a
// deep graph does not re-read and re-hash the whole graph below it. A drv
// path is the hash of the file's contents, so an entry never goes stale as
// long as every caller loads the same store's .drv files. It holds at most
// a fixed number of entries (it is emptied when full). It is safe for
// concurrent use.
type HashCache struct {
	mu  sync.Mutex
	m   map[string]hash.Hash
	max int
}

// NewHashCache returns a cache of at most max entries (<= 0: 100,000,
// about 20 MB).
func NewHashCache(max int) *HashCache {
	if max <= 0 {
		max = 100_000
	}
	return &HashCache{m: map[string]hash.Hash{}, max: max}
}

func (c *HashCache) get(p string) (hash.Hash, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[p]
	return v, ok
}

func (c *HashCache) put(p string, h hash.Hash) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.max {
		clear(c.m)
	}
	c.m[p] = h
}

// Len returns the number of cached hashes.
func (c *HashCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

type hasher struct {
	load  Loader
	cache memo
	busy  map[string]bool // drv paths being hashed, to refuse cycles
}

func (h *hasher) hash(ctx context.Context, d *Derivation, mask bool) (hash.Hash, error) {
	kind, err := d.Kind()
	if err != nil {
		return hash.Hash{}, err
	}
	switch kind {
	case FixedOutput:
		o := d.Outputs["out"]
		s := "fixed:out:" + o.HashAlgo + ":" + o.Hash + ":" + o.Path
		return hash.Sum(hash.SHA256, []byte(s)), nil
	case InputAddressed:
	default:
		return hash.Hash{}, fmt.Errorf("hash modulo of a %s derivation: %w", kind, ErrNotSupported)
	}
	inputs := make(map[string][]string, len(d.InputDrvs))
	for _, drvPath := range slices.Sorted(maps.Keys(d.InputDrvs)) {
		ih, err := h.pathHash(ctx, drvPath)
		if err != nil {
			return hash.Hash{}, err
		}
		key := ih.Base16()
		inputs[key] = append(inputs[key], d.InputDrvs[drvPath]...)
	}
	return hash.Sum(hash.SHA256, d.unparse(mask, inputs)), nil
}

// pathHash is Nix's pathDerivationModulo: the unmasked hash modulo of the
// derivation at drvPath, memoized.
func (h *hasher) pathHash(ctx context.Context, drvPath string) (hash.Hash, error) {
	if v, ok := h.cache.get(drvPath); ok {
		return v, nil
	}
	if err := ctx.Err(); err != nil {
		return hash.Hash{}, err
	}
	if h.busy[drvPath] {
		return hash.Hash{}, fmt.Errorf("%w: input derivation %s depends on itself", ErrFormat, drvPath)
	}
	h.busy[drvPath] = true
	defer delete(h.busy, drvPath)
	d, err := h.load(ctx, drvPath)
	if err != nil {
		return hash.Hash{}, fmt.Errorf("input derivation %s: %w", drvPath, err)
	}
	v, err := h.hash(ctx, d, false)
	if err != nil {
		return hash.Hash{}, fmt.Errorf("input derivation %s: %w", drvPath, err)
	}
	h.cache.put(drvPath, v)
	return v, nil
}

// CheckOutputPaths checks that the output paths written in d, and the env
// variables named after its outputs, are the ones Nix computes (as Nix's
// LocalStore::checkDerivationOutputs, and stricter: the path written for a
// fixed output is checked too). d.Name must be set. Floating, deferred and
// impure derivations give an error wrapping ErrNotSupported.
func (d *Derivation) CheckOutputPaths(ctx context.Context, dir storepath.Dir, load Loader, cache map[string]hash.Hash) error {
	if cache == nil {
		cache = map[string]hash.Hash{}
	}
	return d.checkOutputPaths(ctx, dir, load, mapMemo(cache))
}

// CheckOutputPaths is Derivation.CheckOutputPaths with the hashes modulo of
// input derivations taken from and added to c.
func (c *HashCache) CheckOutputPaths(ctx context.Context, d *Derivation, dir storepath.Dir, load Loader) error {
	return d.checkOutputPaths(ctx, dir, load, c)
}

func (d *Derivation) checkOutputPaths(ctx context.Context, dir storepath.Dir, load Loader, cache memo) error {
	kind, err := d.Kind()
	if err != nil {
		return err
	}
	want := map[string]storepath.Path{}
	switch kind {
	case FixedOutput:
		recursive, h, err := d.Outputs["out"].fixedHash()
		if err != nil {
			return fmt.Errorf("output \"out\": %w", err)
		}
		p, err := dir.MakeFixedOutputPath(d.Name, recursive, h, nil, false)
		if err != nil {
			return fmt.Errorf("output \"out\": %w", err)
		}
		want["out"] = p
	case InputAddressed:
		h, err := hashModulo(ctx, d, load, cache)
		if err != nil {
			return err
		}
		for id := range d.Outputs {
			p, err := dir.MakeOutputPath(id, h, d.Name)
			if err != nil {
				return fmt.Errorf("output %q: %w", id, err)
			}
			want[id] = p
		}
	default:
		return fmt.Errorf("checking the outputs of a %s derivation: %w", kind, ErrNotSupported)
	}
	for _, id := range slices.Sorted(maps.Keys(want)) {
		abs := dir.Abs(want[id])
		if got := d.Outputs[id].Path; got != abs {
			return fmt.Errorf("%w: output %q has path %s, should be %s", ErrFormat, id, got, abs)
		}
		if got, ok := d.Env[id]; !ok || got != abs {
			return fmt.Errorf("%w: env variable %q is %q, should be %s", ErrFormat, id, got, abs)
		}
	}
	return nil
}
