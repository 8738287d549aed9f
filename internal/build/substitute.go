package build

import (
	"context"
	"maps"
	"slices"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// realiseOpaque makes a plain store path valid (by substitution only).
func (c *call) realiseOpaque(ctx context.Context, req store.DerivedPath) Result {
	b := c.b
	ok, err := b.st.IsValidPath(ctx, req.Path)
	if err != nil {
		return b.fail(req, MiscFailure, "%v", err)
	}
	if ok {
		return Result{Path: req, Status: AlreadyValid}
	}
	if c.opts.Substituter != nil {
		ok, err := c.opts.Substituter.Substitute(ctx, []storepath.Path{req.Path})
		if ok && err == nil {
			return Result{Path: req, Status: Substituted}
		}
		if err != nil {
			b.log.Warn("substitution failed", "path", b.abs(req.Path), "err", err)
		}
	}
	return b.fail(req, NoSubstituters, "path '%s' is required, but there is no substituter that can build it", b.abs(req.Path))
}

// substituteWanted fetches the wanted outputs of drv from c's caches
// (unless drv forbids substitutes); ok is false when they must be built.
func (c *call) substituteWanted(ctx context.Context, drvPath storepath.Path, drv *derivation.Derivation, wanted []string) (Result, bool) {
	if c.opts.Substituter == nil {
		return Result{}, false
	}
	attrs, err := drv.Attrs(drvPath.String())
	if err != nil {
		return Result{}, false // the goal reports it
	}
	if allow, err := attrs.Bool("allowSubstitutes", true); err != nil || !allow {
		return Result{}, false
	}
	outs := map[string]storepath.Path{}
	for _, n := range wanted {
		p, err := c.b.st.Dir().Parse(drv.Outputs[n].Path)
		if err != nil {
			return Result{}, false // no path known (floating): the goal says why
		}
		outs[n] = p
	}
	r, ok := c.trySubstitute(ctx, drvPath, outs)
	if ok && r.Status.Success() {
		r.BuiltOutputs = outs
	}
	return r, ok
}

// trySubstitute fetches the outputs outs of drvPath from c's caches if
// they have them all (valid ones are skipped). ok is false when they must
// be built.
func (c *call) trySubstitute(ctx context.Context, drvPath storepath.Path, outs map[string]storepath.Path) (Result, bool) {
	b := c.b
	found, err := c.opts.Substituter.Substitute(ctx, slices.Collect(maps.Values(outs)))
	switch {
	case !found:
		return Result{}, false
	case err != nil:
		if c.opts.TryFallback {
			b.log.Warn("substitution failed, building", "drv", b.abs(drvPath), "err", err)
			return Result{}, false
		}
		return Result{Status: MiscFailure, ErrorMsg: hint.Fmt("some substitutes for the outputs of derivation '%s' failed (usually happens due to networking issues); try '--fallback' to build derivation from source ", b.abs(drvPath))}, true
	}
	return Result{Status: Substituted}, true
}
