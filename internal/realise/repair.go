package realise

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"

	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute"
)

// Messenger is implemented by a Progress whose caller wants the messages
// Nix prints while it repairs: "checking path '…'..." (Info) and "path
// '…' is corrupted or missing!" (Error), after what it has heard so far.
type Messenger interface {
	Info(msg string)
	Error(msg string)
}

// contentsGood checks p's files against its NAR hash, telling prog (if a
// Messenger) as Nix's pathContentsGood does.
func (r *Realiser) contentsGood(ctx context.Context, p storepath.Path, prog Progress) (bool, error) {
	abs := r.m.st.Dir().Abs(p)
	m, _ := prog.(Messenger)
	if m != nil {
		m.Info(fmt.Sprintf("checking path '%s'...", abs))
	}
	good, err := r.m.st.ContentsGood(ctx, p)
	if errors.Is(err, fs.ErrNotExist) {
		good, err = false, nil
	}
	if err == nil && !good && m != nil {
		m.Error(fmt.Sprintf("path '%s' is corrupted or missing!", abs))
	}
	return good, err
}

// Repair realises targets in repair mode (BuildPaths with build mode
// repair: `nix-store -r --repair`, `nix-build --repair`): what is not
// valid is realised as usual, then every wanted path that was valid
// already but whose files no longer match its NAR hash is repaired as
// RepairPath does: fetched again from the caches and swapped in, or, where
// no cache has it, rebuilt from its derivation in repair mode. For a
// derivation, every path its outputs refer to, directly or not, is
// checked and repaired the same way, as Nix's repairClosure does.
func (r *Realiser) Repair(ctx context.Context, targets []store.DerivedPath, prog Progress) ([]Result, error) {
	ctx = substitute.WithProgress(ctx, prog) // the repairs' downloads too
	results, err := r.Realise(ctx, targets, prog)
	if err != nil {
		return nil, err
	}
	for i, t := range targets {
		res := &results[i]
		if err := r.repairNamed(ctx, t, res, prog); err != nil {
			return nil, err
		}
		if t.Built && res.Status.Success() {
			if err := r.repairClosure(ctx, t, res, prog); err != nil {
				return nil, err
			}
		}
	}
	return results, nil
}

// repairNamed checks the paths that target t names (its outputs, for a
// derivation) and repairs those damaged or missing, updating res.
func (r *Realiser) repairNamed(ctx context.Context, t store.DerivedPath, res *Result, prog Progress) error {
	switch {
	case !res.Status.Success(), res.Status == Built, !t.Built && res.Status == Substituted:
		return nil // failed, or every path just built or fetched (and checked then)
	}
	paths := []storepath.Path{t.Path}
	if t.Built {
		paths = paths[:0]
		for _, n := range slices.Sorted(maps.Keys(res.Outputs)) {
			paths = append(paths, res.Outputs[n])
		}
	}
	for _, p := range paths {
		how, failure, err := r.repairDamaged(ctx, p, prog, "")
		switch {
		case err != nil:
			return err
		case failure != "":
			res.Status, res.ErrorMsg = MiscFailure, failure
			return nil
		case how != 0:
			res.Status = how
		}
	}
	return nil
}

// repairDamaged checks p and, if it is damaged or missing, says note (if
// any) and repairs it. how is 0 if p was good; failure, if not "", is why
// p could not be repaired; err ends the request.
func (r *Realiser) repairDamaged(ctx context.Context, p storepath.Path, prog Progress, note string) (how Status, failure string, err error) {
	abs := r.m.st.Dir().Abs(p)
	good, err := r.contentsGood(ctx, p, prog)
	if err != nil {
		return 0, "", fmt.Errorf("repairing %s: %w", abs, err)
	}
	if good {
		return 0, "", nil
	}
	if m, ok := prog.(Messenger); ok && note != "" {
		m.Error(note)
	}
	how, err = r.repairPath(ctx, p, false)
	if err != nil {
		if ctx.Err() != nil {
			return 0, "", ctx.Err()
		}
		return 0, fmt.Sprintf("cannot repair path '%s': %v", abs, err), nil
	}
	return how, "", nil
}

// repairClosure checks every path that the outputs of derivation target t
// refer to, directly or not, and repairs those damaged or missing, as
// Nix's repairClosure does after a derivation's outputs are repaired
// (slow: every path of the closure is hashed).
func (r *Realiser) repairClosure(ctx context.Context, t store.DerivedPath, res *Result, prog Progress) error {
	st := r.m.st
	own := map[storepath.Path]bool{}
	var outs []storepath.Path
	for _, p := range res.Outputs {
		own[p] = true
		outs = append(outs, p)
	}
	closure, err := st.QueryClosure(ctx, outs)
	if err != nil {
		return fmt.Errorf("repairing the closure of %s: %w", st.Dir().Abs(t.Path), err)
	}
	for _, p := range storepath.Sort(closure) {
		if own[p] {
			continue
		}
		note := fmt.Sprintf("found corrupted or missing path '%s' in the output closure of '%s'", st.Dir().Abs(p), st.Dir().Abs(t.Path))
		_, failure, err := r.repairDamaged(ctx, p, prog, note)
		if err != nil {
			return err
		}
		if failure != "" {
			res.Status, res.ErrorMsg = MiscFailure, failure
			return nil
		}
	}
	return nil
}

// checkOutputs checks the contents of drv's valid outputs, in the order
// of their names, telling the client (see contentsGood).
func (r *Realiser) checkOutputs(ctx context.Context, drv storepath.Path) error {
	st := r.m.st
	outs, err := st.QueryDerivationOutputMap(ctx, drv)
	if err != nil {
		return fmt.Errorf("repairing: outputs of %s: %w", st.Dir().Abs(drv), err)
	}
	prog := substitute.ProgressFrom(ctx)
	for _, name := range slices.Sorted(maps.Keys(outs)) {
		if ok, err := st.IsValidPath(ctx, outs[name]); err != nil || !ok {
			continue
		}
		if _, err := r.contentsGood(ctx, outs[name], prog); err != nil {
			return fmt.Errorf("repairing: %w", err)
		}
	}
	return nil
}

// RepairPath fetches the valid path p again from the binary caches and
// replaces the store's copy (nix-store --verify --repair). If no cache
// gives it back, the derivation that made it, if valid, is built again in
// repair mode, which replaces it, as Nix's repairPath does; as Nix's
// derivation goal in repair mode, it first checks that derivation's
// valid outputs and says which are damaged (see contentsGood).
func (r *Realiser) RepairPath(ctx context.Context, p storepath.Path) error {
	_, err := r.repairPath(ctx, p, true)
	return err
}

// repairPath is RepairPath; it says how the path was repaired:
// Substituted or Built. checkOutputs: before a rebuild, the derivation's
// outputs are checked, and the client told, as Nix's derivation goal
// does (unset where p was checked and told of already).
func (r *Realiser) repairPath(ctx context.Context, p storepath.Path, checkOutputs bool) (Status, error) {
	err := store.ErrNotRepairable
	if r.sub != nil {
		if err = r.sub.Repair(ctx, p); err == nil || ctx.Err() != nil {
			return Substituted, err
		}
	}
	st := r.m.st
	if good, gerr := st.ContentsGood(ctx, p); gerr == nil && good {
		return Built, nil // the rebuild of another output of its derivation did it
	}
	info, ierr := st.QueryPathInfo(ctx, p)
	if ierr != nil || info.Deriver.IsZero() || r.m.builder == nil {
		return 0, err
	}
	if ok, verr := st.IsValidPath(ctx, info.Deriver); verr != nil || !ok {
		return 0, err
	}
	if checkOutputs {
		if err := r.checkOutputs(ctx, info.Deriver); err != nil {
			return 0, err
		}
	}
	target := store.DerivedPath{Path: info.Deriver, Built: true, AllOutputs: true}
	opts := BuildOptions{Session: r.session, Substituter: r.Substituter(ctx, substitute.ProgressFrom(ctx)), Repair: true}
	built, berr := r.m.builder.Build(ctx, []store.DerivedPath{target}, opts)
	switch {
	case berr != nil:
		return 0, fmt.Errorf("%w; building '%s' again: %w", err, st.Dir().Abs(info.Deriver), berr)
	case len(built) != 1:
		return 0, fmt.Errorf("realise: builder returned %d results for 1 target", len(built))
	case !built[0].Status.Success():
		return 0, fmt.Errorf("%w; building '%s' again: %s", err, st.Dir().Abs(info.Deriver), built[0].ErrorMsg)
	}
	if good, gerr := st.ContentsGood(ctx, p); gerr != nil || !good {
		return 0, fmt.Errorf("%w; building '%s' again did not give back '%s'", err, st.Dir().Abs(info.Deriver), st.Dir().Abs(p))
	}
	return Built, nil
}
