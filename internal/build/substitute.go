package build

import (
	"context"
	"fmt"
	"slices"

	"github.com/nixyard/nixyard/internal/nix/derivation"
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
		if err := c.opts.Substituter.Realise(ctx, []storepath.Path{req.Path}); err == nil {
			return Result{Path: req, Status: Substituted}
		} else {
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

// trySubstitute asks c's substituter for the outputs outs of drvPath and
// fetches those that are not valid if it has them all. ok is false when
// they must be built.
func (c *call) trySubstitute(ctx context.Context, drvPath storepath.Path, outs map[string]storepath.Path) (Result, bool) {
	b := c.b
	paths := slices.Collect(mapValues(outs))
	var need []storepath.Path
	for _, p := range paths {
		if ok, err := b.st.IsValidPath(ctx, p); err == nil && !ok {
			need = append(need, p)
		}
	}
	if len(need) == 0 {
		return Result{Status: AlreadyValid}, true
	}
	subst := c.opts.Substituter
	have, err := subst.Substitutable(ctx, need)
	if err != nil || len(have) < len(need) {
		return Result{}, false
	}
	if err := subst.Realise(ctx, need); err != nil {
		if c.opts.TryFallback {
			b.log.Warn("substitution failed, building", "drv", b.abs(drvPath), "err", err)
			return Result{}, false
		}
		return Result{Status: MiscFailure, ErrorMsg: fmt.Sprintf("some substitutes for the outputs of derivation '%s' failed (usually happens due to networking issues); try '--fallback' to build derivation from source ", b.abs(drvPath))}, true
	}
	return Result{Status: Substituted}, true
}
