package realise

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// QueryMissing says what realising targets would take, as Nix's
// queryMissing with substituters: an invalid opaque path that a cache has
// will be substituted, and so will the invalid paths of its closure (sizes
// summed), else it is unknown; a derivation whose wanted outputs are not
// all valid has them substituted if caches have every one of them (and the
// derivation allows substitutes), else it will be built and its input
// derivations are looked at in turn; an invalid derivation is unknown.
// Without caches, every invalid opaque path is unknown and every derivation
// with an invalid wanted output will be built. Failed lookups count as "not there" and are passed to warn (may be nil).
func (r *Realiser) QueryMissing(ctx context.Context, targets []store.DerivedPath, warn func(error)) (*store.Missing, error) {
	st := r.m.st
	m := &store.Missing{}
	done := map[string]bool{}
	var opaque []storepath.Path
	var visit func(t store.DerivedPath) error
	visit = func(t store.DerivedPath) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		key := visitKey(t)
		if done[key] {
			return nil
		}
		done[key] = true
		if !t.Built {
			opaque = append(opaque, t.Path)
			return nil
		}
		valid, err := st.IsValidPath(ctx, t.Path)
		if err != nil {
			return err
		}
		if !valid {
			m.Unknown = append(m.Unknown, t.Path)
			return nil
		}
		d, err := r.readDerivation(t.Path)
		if err != nil {
			return err
		}
		wanted, unknown := wantedOutputs(t, d)
		if len(unknown) > 0 {
			return nil // as Nix: the build says so
		}
		switch fetch, build, err := r.missingOutputs(ctx, t, d, wanted, warn); {
		case err != nil:
			return err
		case !build:
			opaque = append(opaque, fetch...) // valid already if empty
			return nil
		}
		if !slices.Contains(m.WillBuild, t.Path) {
			m.WillBuild = append(m.WillBuild, t.Path)
		}
		for in, outs := range d.InputDrvs {
			ip, err := st.Dir().Parse(in)
			if err != nil {
				return fmt.Errorf("derivation '%s': input %s: %w", st.Dir().Abs(t.Path), in, err)
			}
			if err := visit(store.DerivedPath{Path: ip, Outputs: outs, Built: true}); err != nil {
				return err
			}
		}
		return nil
	}
	for _, t := range targets {
		if err := visit(t); err != nil {
			return nil, fmt.Errorf("realise: %w", err)
		}
	}
	if err := r.missingOpaque(ctx, dedupPaths(opaque), m, warn); err != nil {
		return nil, fmt.Errorf("realise: %w", err)
	}
	storepath.Sort(m.WillBuild)
	storepath.Sort(m.WillSubstitute)
	storepath.Sort(m.Unknown)
	return m, nil
}

// visitKey names what QueryMissing visits for t: a plain path, or a
// derivation with the outputs wanted of it.
func visitKey(t store.DerivedPath) string {
	key := t.Path.String()
	if t.Built {
		key += "!" + strings.Join(t.Outputs, ",")
		if t.AllOutputs || len(t.Outputs) == 0 {
			key += "*"
		}
	}
	return key
}

// missingOutputs says what realising the wanted outputs of the valid
// derivation d (of target t) would take: nothing, if they are valid;
// fetching the invalid ones (fetch), if their output paths are known and
// the caches have every one of them; else a build (build).
func (r *Realiser) missingOutputs(ctx context.Context, t store.DerivedPath, d *derivation.Derivation, wanted []string, warn func(error)) (fetch []storepath.Path, build bool, err error) {
	st := r.m.st
	known := true
	var invalid []storepath.Path
	for _, n := range wanted {
		o := d.Outputs[n]
		if o.Path == "" {
			known = false
			break
		}
		op, err := st.Dir().Parse(o.Path)
		if err != nil {
			return nil, false, fmt.Errorf("derivation '%s': output %s: %w", st.Dir().Abs(t.Path), n, err)
		}
		if ok, err := st.IsValidPath(ctx, op); err != nil {
			return nil, false, err
		} else if !ok {
			invalid = append(invalid, op)
		}
	}
	if known && len(invalid) == 0 {
		return nil, false, nil
	}
	if known && r.sub != nil && substitutesAllowed(d) {
		infos, err := r.QuerySubstitutable(ctx, invalid, warn)
		if err != nil {
			return nil, false, err
		}
		if len(infos) == len(invalid) {
			return invalid, false, nil
		}
	}
	return nil, true, nil
}

// missingOpaque adds to m what realising the opaque paths would take: with
// caches, what they have (and the sizes); without, every invalid path is
// unknown.
func (r *Realiser) missingOpaque(ctx context.Context, opaque []storepath.Path, m *store.Missing, warn func(error)) error {
	if len(opaque) == 0 {
		return nil
	}
	if r.sub == nil {
		valid, err := r.m.st.QueryValidPaths(ctx, opaque)
		if err != nil {
			return err
		}
		for _, p := range opaque {
			if !slices.Contains(valid, p) && !slices.Contains(m.Unknown, p) {
				m.Unknown = append(m.Unknown, p)
			}
		}
		return nil
	}
	sm, err := r.sub.QueryMissing(ctx, opaque)
	if err != nil {
		return err
	}
	if warn != nil {
		for _, e := range sm.Errors {
			warn(e)
		}
	}
	for p := range sm.WillSubstitute {
		m.WillSubstitute = append(m.WillSubstitute, p)
	}
	for _, p := range sm.Unknown {
		if !slices.Contains(m.Unknown, p) {
			m.Unknown = append(m.Unknown, p)
		}
	}
	m.DownloadSize, m.NarSize = sm.DownloadSize, sm.NarSize
	return nil
}
