package realise

import (
	"context"
	"errors"
	"fmt"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// RecordRealisations records a realisation for every output of the
// derivation targets among results that succeeded, and sets their DrvHash,
// as Nix 2.8 with ca-derivations does for every derivation it builds or
// finds built: a client with that feature asks for the realisation of
// each output it wants, input-addressed ones included. Derivations whose
// hash modulo nixyard cannot compute (floating content-addressed ones)
// get none; other failures are logged, not returned: the build itself
// succeeded.
func (r *Realiser) RecordRealisations(ctx context.Context, results []Result) {
	for i := range results {
		res := &results[i]
		if !res.Target.Built || !res.Status.Success() || len(res.Outputs) == 0 {
			continue
		}
		h, err := r.drvHash(ctx, res.Target.Path)
		if err != nil {
			if !errors.Is(err, derivation.ErrNotSupported) && ctx.Err() == nil {
				r.m.log.Warn("cannot record realisations", "drv", r.m.st.Dir().Abs(res.Target.Path), "err", err)
			}
			continue
		}
		res.DrvHash = h
		for name, p := range res.Outputs {
			if known, err := r.m.st.QueryRealisation(ctx, h, name); err == nil && known != nil && known.Path == p {
				continue // recorded before: no write
			}
			if err := r.m.st.RegisterRealisation(ctx, store.Realisation{DrvHash: h, Output: name, Path: p}); err != nil {
				r.m.log.Warn("cannot record a realisation", "drv", r.m.st.Dir().Abs(res.Target.Path), "output", name, "err", err)
			}
		}
	}
}

// drvHash returns the hash modulo of the derivation at p, as a realisation
// id writes it.
func (r *Realiser) drvHash(ctx context.Context, p storepath.Path) (string, error) {
	d, err := r.readDerivation(p)
	if err != nil {
		return "", err
	}
	load := func(ctx context.Context, abs string) (*derivation.Derivation, error) {
		ip, err := r.m.st.Dir().Parse(abs)
		if err != nil {
			return nil, err
		}
		return r.readDerivation(ip)
	}
	h, err := r.m.hashes.HashModulo(ctx, d, load)
	if err != nil {
		return "", fmt.Errorf("hash modulo: %w", err)
	}
	return "sha256:" + h.Base16(), nil
}
