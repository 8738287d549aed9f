package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// readDerivation reads and parses the .drv at realPath, reading at most
// derivation.MaxSize bytes.
func (s *Store) readDerivation(p storepath.Path, realPath string) (*derivation.Derivation, error) {
	data, err := readFileLimit(realPath, derivation.MaxSize+1)
	if err != nil {
		return nil, fmt.Errorf("store: reading derivation %s: %w", s.abs(p), err)
	}
	d, err := derivation.Parse(data, strings.TrimSuffix(p.Name(), ".drv"))
	if err != nil {
		return nil, fmt.Errorf("store: derivation %s: %w", s.abs(p), err)
	}
	return d, nil
}

// loadDerivation is a derivation.Loader reading valid .drv files of this
// store by their logical path.
func (s *Store) loadDerivation(ctx context.Context, abs string) (*derivation.Derivation, error) {
	p, err := s.dir.Parse(abs)
	if err != nil {
		return nil, err
	}
	return s.readDerivation(p, s.RealPath(p))
}

// drvHashCaches holds the hash-modulo cache of each real store directory
// opened in this process (one in a daemon), so that registering or building
// each derivation of a deep graph does not re-read the graph below it.
// Entries are keyed by .drv path, which names the file's contents, and the
// caches are per real directory so that stores never share entries.
var drvHashCaches struct {
	sync.Mutex
	m map[string]*derivation.HashCache
}

// DrvHashCache returns the hash-modulo cache of the store's .drv files,
// for derivation.HashCache.CheckOutputPaths with a loader of its valid
// .drv files. It is shared by every Store of this real store directory in
// the process and is safe for concurrent use.
func (s *Store) DrvHashCache() *derivation.HashCache {
	drvHashCaches.Lock()
	defer drvHashCaches.Unlock()
	if drvHashCaches.m == nil {
		drvHashCaches.m = map[string]*derivation.HashCache{}
	}
	c := drvHashCaches.m[s.realDir]
	if c == nil {
		c = derivation.NewHashCache(0)
		drvHashCaches.m[s.realDir] = c
	}
	return c
}

// readDrvOutputs reads the derivation at realPath, checks its output paths
// as Nix does before registering a .drv (checkInvariants), and returns
// the outputs whose paths are known, for DerivationOutputs.
func (s *Store) readDrvOutputs(ctx context.Context, p storepath.Path, realPath string) (map[string]storepath.Path, error) {
	d, err := s.readDerivation(p, realPath)
	if err != nil {
		return nil, err
	}
	err = s.DrvHashCache().CheckOutputPaths(ctx, d, s.dir, s.loadDerivation)
	if err != nil && !errors.Is(err, derivation.ErrNotSupported) {
		return nil, fmt.Errorf("store: derivation %s: %w", s.abs(p), err)
	}
	out := map[string]storepath.Path{}
	for name, o := range d.Outputs {
		if o.Path == "" {
			continue // floating or deferred: unknown until built
		}
		op, err := s.dir.Parse(o.Path)
		if err != nil {
			return nil, fmt.Errorf("store: derivation %s: output %s: %w", s.abs(p), name, err)
		}
		out[name] = op
	}
	return out, nil
}
