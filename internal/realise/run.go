package realise

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute"
)

// ErrNeedsBuild is wrapped by the failure of a target that only a build
// could realise when no Builder is plugged in.
var ErrNeedsBuild = errors.New("building is not implemented by nixyard yet")

// Realise makes targets valid: valid paths are taken as they are, invalid
// ones are substituted (their whole closure, in parallel and shared with
// every other caller), and derivation outputs that no cache has go to the
// Builder. It returns one Result per target, in order; failures are in the
// Results. The error is for what stops the whole request (cancellation,
// store errors). prog (may be nil) sees the activities of every download
// this call waits for and must be safe for concurrent use.
func (r *Realiser) Realise(ctx context.Context, targets []store.DerivedPath, prog Progress) ([]Result, error) {
	ctx = substitute.WithProgress(ctx, prog) // the lookups' activities too
	results := make([]Result, len(targets))
	needBuild := make([]bool, len(targets))
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	var opaqueErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		opaqueErr = r.realiseOpaque(ctx, targets, results, prog)
	}()
	for i, t := range targets {
		if !t.Built {
			continue // realiseOpaque's
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], needBuild[i], errs[i] = r.realiseOne(ctx, t, prog)
		}()
	}
	wg.Wait()
	if err := errors.Join(append(errs, opaqueErr)...); err != nil {
		return nil, err
	}
	var build []store.DerivedPath
	var idx []int
	for i, nb := range needBuild {
		if nb {
			build = append(build, targets[i])
			idx = append(idx, i)
		}
	}
	if len(build) == 0 {
		return results, nil
	}
	if r.m.builder == nil {
		for _, i := range idx {
			t := targets[i]
			results[i] = Result{Target: t, Status: MiscFailure,
				ErrorMsg: fmt.Sprintf("cannot build '%s': %v and no binary cache has its outputs", r.format(t), ErrNeedsBuild)}
		}
		return results, nil
	}
	if err := r.buildInto(ctx, results, build, idx, prog); err != nil {
		return nil, err
	}
	return results, nil
}

// buildInto has the builder build targets and puts its results at their
// indexes idx in results. What the client has heard of the substitutions
// so far (one that failed before a fallback, say) is delivered first.
func (r *Realiser) buildInto(ctx context.Context, results []Result, targets []store.DerivedPath, idx []int, prog Progress) error {
	flush(prog)
	built, err := r.m.builder.Build(ctx, targets, BuildOptions{Session: r.session, Substituter: r.Substituter(ctx, prog)})
	if err != nil {
		return err // the Builder's errors say what failed
	}
	if len(built) != len(targets) {
		return fmt.Errorf("realise: builder returned %d results for %d targets", len(built), len(targets))
	}
	for j, i := range idx {
		results[i] = built[j]
	}
	return nil
}

// Check builds the outputs of the derivation targets again to compare
// them with the valid ones (nix-build --check): the builder, asked in
// check mode through ctx, substitutes outputs that are not valid first,
// then builds and compares. Plain paths among the targets are realised as
// usual.
func (r *Realiser) Check(ctx context.Context, targets []store.DerivedPath, prog Progress) ([]Result, error) {
	st := r.m.st
	results := make([]Result, len(targets))
	var opaque, build []store.DerivedPath
	var opaqueIdx, buildIdx []int
	for i, t := range targets {
		if !t.Built {
			opaque, opaqueIdx = append(opaque, t), append(opaqueIdx, i)
			continue
		}
		if err := r.root(ctx, t.Path); err != nil {
			return nil, err
		}
		if ok, err := st.IsValidPath(ctx, t.Path); err != nil {
			return nil, err
		} else if !ok {
			results[i] = Result{Target: t, Status: MiscFailure, ErrorMsg: fmt.Sprintf("path '%s' is not valid", st.Dir().Abs(t.Path))}
			continue
		}
		// Wanted outputs that are not valid are substituted first, as
		// Nix does; what is still missing cannot be checked.
		res, needBuild, err := r.realiseOne(ctx, t, prog)
		switch {
		case err != nil:
			return nil, err
		case needBuild:
			results[i] = Result{Target: t, Status: MiscFailure,
				ErrorMsg: hint.Fmt("some outputs of '%s' are not valid, so checking is not possible", st.Dir().Abs(t.Path))}
			continue
		case !res.Status.Success():
			results[i] = res // a substitution that failed
			continue
		}
		build, buildIdx = append(build, t), append(buildIdx, i)
	}
	if len(opaque) > 0 {
		res, err := r.Realise(ctx, opaque, prog)
		if err != nil {
			return nil, err
		}
		for j, i := range opaqueIdx {
			results[i] = res[j]
		}
	}
	if len(build) == 0 {
		return results, nil
	}
	if r.m.builder == nil {
		return nil, fmt.Errorf("realise: checking: %w", ErrNeedsBuild)
	}
	if err := r.buildInto(ctx, results, build, buildIdx, prog); err != nil {
		return nil, err
	}
	return results, nil
}

// realiseOpaque sets the results of the targets that are plain paths (not
// derivation outputs). The invalid ones are substituted together, so that
// the client's request costs one walk of their joint closure: `nix-store
// -r` of a closure's 150 roots used to walk each root's (overlapping)
// closure twice, which with several clients at once cost the daemon more
// CPU than the downloads. A failure stops only the targets that need the
// failed path. If some path of the closure is in no cache, each target is
// realised on its own, so that each result says what it misses.
func (r *Realiser) realiseOpaque(ctx context.Context, targets []store.DerivedPath, results []Result, prog Progress) error {
	var idx []int
	var paths []storepath.Path
	for i, t := range targets {
		if t.Built {
			continue
		}
		results[i].Target = t
		if err := r.root(ctx, t.Path); err != nil {
			return err
		}
		valid, err := r.m.st.IsValidPath(ctx, t.Path)
		if err != nil {
			return err
		}
		if valid {
			results[i].Status = AlreadyValid
			continue
		}
		idx = append(idx, i)
		paths = append(paths, t.Path)
	}
	if len(idx) == 0 {
		return nil
	}
	if r.sub != nil {
		failed, err := r.substituteEach(ctx, dedupPaths(paths), prog)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err == nil {
			for _, i := range idx {
				results[i].Status = Substituted
				if ferr := failed[targets[i].Path]; ferr != nil {
					results[i].Status, results[i].told = NoSubstituters, substitute.Shown(ferr)
					results[i].ErrorMsg = notSubstituted(r.m.st.Dir().Abs(targets[i].Path), ferr, results[i].told)
				}
			}
			return nil
		}
		if !errors.Is(err, substitute.ErrNotFound) {
			return err
		}
	}
	errs := make([]error, len(idx))
	var wg sync.WaitGroup
	for j, i := range idx {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], _, errs[j] = r.realiseOne(ctx, targets[i], prog)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// substituteEach is substitute for several paths reported on one by one
// (see substitute.Substituter.RealiseMissingEach): it returns the error of
// each path that could not be made valid. Its error wraps
// substitute.ErrNotFound if some path of the closures is in no cache, and
// then nothing was fetched.
func (r *Realiser) substituteEach(ctx context.Context, paths []storepath.Path, prog Progress) (map[storepath.Path]error, error) {
	m, err := r.queryMissing(ctx, paths)
	if err != nil {
		return nil, err
	}
	warnEach(prog, m.Errors)
	if len(m.Unknown) > 0 {
		return nil, fmt.Errorf("%s: %w", r.m.st.Dir().Abs(m.Unknown[0]), substitute.ErrNotFound)
	}
	return r.sub.RealiseMissingEach(ctx, m, prog)
}

// format writes t as a DerivedPath string.
func (r *Realiser) format(t store.DerivedPath) string {
	s := r.m.st.Dir().Abs(t.Path)
	switch {
	case !t.Built:
		return s
	case t.AllOutputs || len(t.Outputs) == 0:
		return s + "!*"
	}
	return s + "!" + strings.Join(t.Outputs, ",")
}

// realiseOne handles one target: its own path (a plain path, or the
// derivation), then, for a derivation, its wanted outputs. needBuild says
// it is for the Builder.
func (r *Realiser) realiseOne(ctx context.Context, t store.DerivedPath, prog Progress) (res Result, needBuild bool, err error) {
	if res, done, err := r.realisePath(ctx, t, prog); err != nil || done {
		return res, false, err
	}
	return r.realiseOutputs(ctx, t, prog)
}

// realisePath makes t's own path valid, substituting it if it is not (an
// invalid .drv can come from a cache too, as in Nix). done says res is
// t's result: t is a plain path, or its derivation could not be had;
// otherwise t is a derivation target whose outputs are next.
func (r *Realiser) realisePath(ctx context.Context, t store.DerivedPath, prog Progress) (res Result, done bool, err error) {
	st := r.m.st
	abs := st.Dir().Abs(t.Path)
	res.Target = t
	if err := r.root(ctx, t.Path); err != nil {
		return res, true, err
	}
	valid, err := st.IsValidPath(ctx, t.Path)
	switch {
	case err != nil:
		return res, true, err
	case valid && t.Built:
		return res, false, nil
	case valid:
		res.Status = AlreadyValid
		return res, true, nil
	case t.Built && r.sub == nil:
		res.Status = MiscFailure
		res.ErrorMsg = missingDerivation(abs)
		return res, true, nil
	}
	fetched, ferr := r.substitute(ctx, []storepath.Path{t.Path}, prog)
	switch {
	case ferr == nil && t.Built:
		return res, false, nil
	case ferr == nil:
		res.Status = Substituted
		if !fetched {
			res.Status = AlreadyValid
		}
	case ctx.Err() != nil:
		return res, true, ctx.Err()
	case t.Built && (errors.Is(ferr, substitute.ErrNotFound) || r.sub == nil):
		res.Status = MiscFailure
		res.ErrorMsg = missingDerivation(abs)
	case errors.Is(ferr, substitute.ErrNotFound) || r.sub == nil:
		res.Status, res.noneHad = NoSubstituters, true
		res.ErrorMsg = fmt.Sprintf("path '%s' is required, but there is no substituter that can build it", abs)
	default:
		res.Status, res.told = NoSubstituters, substitute.Shown(ferr)
		res.ErrorMsg = notSubstituted(abs, ferr, res.told)
	}
	return res, true, nil
}

// realiseOutputs realises the wanted outputs of derivation target t,
// whose derivation is valid: those valid are taken, the others
// substituted if the caches have all they need; needBuild says they are
// for the Builder.
func (r *Realiser) realiseOutputs(ctx context.Context, t store.DerivedPath, prog Progress) (res Result, needBuild bool, err error) {
	st := r.m.st
	abs := st.Dir().Abs(t.Path)
	res.Target = t
	d, err := r.readDerivation(t.Path)
	if err != nil {
		return res, false, err
	}
	wanted, unknown := wantedOutputs(t, d)
	if len(unknown) > 0 {
		res.Status = MiscFailure
		res.ErrorMsg = unknownOutputsError(abs, unknown)
		return res, false, nil
	}
	outMap, err := st.QueryDerivationOutputMap(ctx, t.Path)
	if err != nil {
		return res, false, err
	}
	res.Outputs = map[string]storepath.Path{}
	known := true
	var invalid []storepath.Path
	for _, n := range wanted {
		op, ok := outMap[n]
		if !ok || op.IsZero() {
			known = false
			continue
		}
		res.Outputs[n] = op
		if ok, err := st.IsValidPath(ctx, op); err != nil {
			return res, false, err
		} else if !ok {
			invalid = append(invalid, op)
		}
	}
	if known && len(invalid) == 0 {
		for _, op := range res.Outputs {
			if err := r.root(ctx, op); err != nil {
				return res, false, err
			}
		}
		res.Status = AlreadyValid
		return res, false, nil
	}
	if !known || r.sub == nil || !substitutesAllowed(d) {
		return res, true, nil
	}
	if ok, err := r.substituteComplete(ctx, invalid, prog); !ok {
		if err != nil {
			return res, false, err
		}
		return res, true, nil // some output, or a path it needs, is in no cache: build
	} else if err != nil {
		if ctx.Err() != nil {
			return res, false, ctx.Err()
		}
		if substitute.Gone(err) {
			// As Nix: a cache that lost a NAR is as one that never had it.
			r.m.log.Info("a cache no longer has a NAR of the outputs; building", "drv", abs, "err", err)
			return res, true, nil
		}
		if r.fallback {
			r.m.log.Warn("substituting outputs failed; falling back to building", "drv", abs, "err", err)
			return res, true, nil
		}
		res.Status = TransientFailure
		res.ErrorMsg = substitutesFailed(abs)
		if !substitute.Shown(err) {
			res.ErrorMsg += fmt.Sprintf("(%v)", err) // the client has not heard why
		}
		return res, false, nil
	}
	res.Status = Substituted
	return res, false, nil
}

// substitute fetches paths and their closures, after giving every path it
// will fetch a temporary root in the session (so a garbage collector
// cannot take a reference before its referrer is registered). fetched
// says whether anything was missing.
func (r *Realiser) substitute(ctx context.Context, paths []storepath.Path, prog Progress) (fetched bool, err error) {
	if r.sub == nil {
		return false, fmt.Errorf("%s: %w", r.m.st.Dir().Abs(paths[0]), substitute.ErrNotFound)
	}
	m, err := r.queryMissing(ctx, paths)
	if err != nil {
		return false, err
	}
	warnEach(prog, m.Errors)
	if len(m.WillSubstitute) == 0 && len(m.Unknown) == 0 {
		return false, nil
	}
	if len(m.Unknown) > 0 {
		// Realise walks the closure again and says why each is missing.
		err = r.sub.Realise(ctx, paths, prog)
	} else {
		err = r.sub.RealiseMissing(ctx, m, prog)
	}
	if err != nil {
		return false, err
	}
	return true, nil
}

// queryMissing is the substituter's QueryMissing, with what it found
// held by the session: the paths asked for, those to fetch, and the valid
// paths these refer to (Nix's substitution goals take a root on a path
// before they look at it: a collection must not take the part of a
// closure that is there already while the rest downloads). If a valid
// path was collected before it was held, the closure is looked at again.
func (r *Realiser) queryMissing(ctx context.Context, paths []storepath.Path) (*substitute.Missing, error) {
	for try := 1; ; try++ {
		m, err := r.sub.QueryMissing(ctx, paths)
		if err != nil {
			return nil, err
		}
		gone, err := r.hold(ctx, paths, m)
		if err != nil || !gone || try == 3 {
			return m, err
		}
	}
}

// hold gives paths, everything m will fetch and the valid paths those
// refer to a temporary root in the session; gone reports that one of the
// valid ones is no longer valid once held.
func (r *Realiser) hold(ctx context.Context, paths []storepath.Path, m *substitute.Missing) (gone bool, err error) {
	if r.session == nil {
		return false, nil
	}
	roots := slices.Clone(paths)
	boundary := map[storepath.Path]bool{}
	for p, info := range m.WillSubstitute {
		roots = append(roots, p)
		for _, ref := range info.References {
			if _, fetched := m.WillSubstitute[ref]; !fetched && !slices.Contains(m.Unknown, ref) {
				boundary[ref] = true
			}
		}
	}
	held := slices.Collect(maps.Keys(boundary))
	if err := r.session.AddTempRoots(ctx, append(roots, held...)); err != nil {
		return false, fmt.Errorf("adding temporary roots: %w", err)
	}
	valid, err := r.m.st.QueryValidPaths(ctx, held)
	if err != nil {
		return false, err
	}
	return len(valid) < len(held), nil
}

// substitutesFailed is Nix's error for a derivation whose outputs a cache
// has but could not give (with its trailing space).
func substitutesFailed(drv string) string {
	return hint.Fmt("some substitutes for the outputs of derivation '%s' failed (usually happens due to networking issues); try '--fallback' to build derivation from source ", drv)
}

// notSubstituted is the error of a path whose download failed: with its
// cause, unless the client was told of it when it happened.
func notSubstituted(abs string, cause error, told bool) string {
	if told {
		return fmt.Sprintf("path '%s' is required, but it could not be substituted", abs)
	}
	return fmt.Sprintf("path '%s' is required, but it could not be substituted: %v", abs, cause)
}

// missingDerivation is Nix's error for a derivation to build that is not
// there.
func missingDerivation(drv string) string {
	return hint.Fmt("cannot build missing derivation '%s'", drv)
}

// EnsurePath makes p valid by substitution if it is not.
func (r *Realiser) EnsurePath(ctx context.Context, p storepath.Path, prog Progress) error {
	res, err := r.Realise(ctx, []store.DerivedPath{{Path: p}}, prog)
	if err != nil {
		return err
	}
	switch st := res[0].Status; {
	case res[0].noneHad:
		// Nix's words for EnsurePath (what a failed substitution says
		// is for --verbose and nix build).
		return fmt.Errorf("path '%s' does not exist and cannot be created", r.m.st.Dir().Abs(p))
	case !st.Success():
		return errors.New(res[0].ErrorMsg)
	}
	return nil
}

// SubstitutePaths substitutes those of paths (not derivations) that caches
// have, as Nix's Store::substitutePaths: failures are returned for the
// caller to report as warnings, not to fail on.
func (r *Realiser) SubstitutePaths(ctx context.Context, paths []storepath.Path, prog Progress) error {
	if r.sub == nil {
		return nil
	}
	ctx = substitute.WithProgress(ctx, prog)
	var targets []store.DerivedPath
	for _, p := range paths {
		if !p.IsDerivation() {
			targets = append(targets, store.DerivedPath{Path: p})
		}
	}
	m, err := r.QueryMissing(ctx, targets, nil)
	if err != nil || len(m.WillSubstitute) == 0 {
		return err
	}
	_, err = r.substitute(ctx, m.WillSubstitute, prog)
	return err
}

// CombinedError is the error Nix's buildPaths throws for results: the one
// failure's message, or "build of … failed" naming every failed target;
// nil if all succeeded. A path that no cache has, or whose download
// failed (its error shown then), fails with no message of its own (Nix's
// substitution goal ends without an error to log), so `nix-store -r` of
// it says only "build of … failed", after the client's "don't know how to
// build these paths" or the download's error.
func (r *Realiser) CombinedError(results []Result) error {
	type goalMsg struct{ key, msg string }
	var failed []string
	var msgs []goalMsg
	for _, res := range results {
		if res.Status.Success() {
			continue
		}
		abs := r.m.st.Dir().Abs(res.Target.Path)
		failed = append(failed, abs)
		if !res.Stopped && !res.noneHad && !res.told {
			msgs = append(msgs, goalMsg{nixGoalKey(res.Target, abs), res.ErrorMsg})
		}
	}
	slices.Sort(failed)
	failed = slices.Compact(failed)
	// Nix keeps its goals in the order of their keys, one per target.
	slices.SortStableFunc(msgs, func(a, b goalMsg) int { return strings.Compare(a.key, b.key) })
	msgs = slices.CompactFunc(msgs, func(a, b goalMsg) bool { return a.key == b.key })
	switch {
	case len(failed) == 0:
		return nil
	case len(failed) == 1 && len(msgs) > 0:
		// One derivation (asked for with several outputs, say): its error.
		return errors.New(msgs[0].msg)
	}
	// The first goal's error is logged last, after the others', as Nix's
	// buildPaths keeps it to throw and logs the rest as it meets them.
	var logged []string
	for _, m := range msgs[min(1, len(msgs)):] {
		logged = append(logged, m.msg)
	}
	if len(msgs) > 0 {
		logged = append(logged, msgs[0].msg)
	}
	return &CombinedFailure{Failures: logged, msg: fmt.Sprintf("build of %s failed", hint.Y("'"+strings.Join(failed, "', '")+"'"))}
}

// nixGoalKey is the key of the goal Nix's Worker makes for t (abs is its
// path in full), which orders its goals: substitutions before builds, then
// by name.
func nixGoalKey(t store.DerivedPath, abs string) string {
	kind := "a$"
	if t.Built {
		kind = "b$"
	}
	return kind + t.Path.Name() + "$" + abs
}

// CombinedFailure is the error of a request with several failed targets:
// "build of '…', '…' failed", naming each failed derivation (or path).
// Failures are the messages of the targets that failed by themselves, in
// the order Nix logs them before it.
type CombinedFailure struct {
	Failures []string
	msg      string
}

func (e *CombinedFailure) Error() string { return e.msg }

// Substituter returns what a Builder asks for the outputs of the
// derivations it would build: the client's caches, with its progress
// (may be nil), warnings and temporary roots, and the download share of
// ctx (substitute.WithShare; builds run on contexts of their own). nil
// when the client uses no caches.
func (r *Realiser) Substituter(ctx context.Context, prog Progress) BuildSubstituter {
	if r.sub == nil {
		return nil
	}
	share, _ := substitute.ShareOf(ctx)
	return buildSubstituter{r: r, prog: prog, share: share}
}

type buildSubstituter struct {
	r     *Realiser
	prog  Progress
	share string
}

// substituteComplete fetches paths and every path of their closures that
// is not valid, if the caches have all of it, with one walk of the
// closure: as Nix's goals decide between fetching a derivation's outputs
// and building it, a closure that the caches have only part of means a
// build, not a failed download. ok is false, and nothing is fetched, when
// they have not (err then is a failed query); err with ok is a failed
// download.
func (r *Realiser) substituteComplete(ctx context.Context, paths []storepath.Path, prog Progress) (ok bool, err error) {
	if r.sub == nil {
		return false, nil
	}
	m, err := r.queryMissing(ctx, paths)
	if err != nil {
		return false, err
	}
	warnEach(prog, m.Errors)
	switch {
	case len(m.Unknown) > 0:
		return false, nil
	case len(m.WillSubstitute) == 0:
		return true, nil
	}
	return true, r.sub.RealiseMissing(ctx, m, prog)
}

// Substitute implements BuildSubstituter. A NAR that a cache no longer
// has counts as a path it does not have (see substitute.Gone).
func (s buildSubstituter) Substitute(ctx context.Context, paths []storepath.Path) (bool, error) {
	ctx = substitute.WithShare(ctx, s.share)
	ok, err := s.r.substituteComplete(ctx, paths, s.prog)
	if errors.Is(err, store.ErrSessionClosed) {
		// The client left while a build that others wait for goes on:
		// fetched without its roots (and its progress); the builder
		// roots what it uses.
		r := *s.r
		r.session = nil
		ok, err = r.substituteComplete(ctx, paths, nil)
	}
	flush(s.prog)
	if ok && substitute.Gone(err) {
		return false, nil
	}
	return ok, err
}

// Incomplete implements BuildSubstituter: every one of paths that is not
// valid is in a cache, but some path of their closures is in none. A
// failed lookup counts as "not there".
func (s buildSubstituter) Incomplete(ctx context.Context, paths []storepath.Path) bool {
	m, err := s.r.sub.QueryMissing(ctx, paths)
	if err != nil || len(m.Unknown) == 0 {
		return false
	}
	for _, p := range m.Unknown {
		if slices.Contains(paths, p) {
			return false // not in a cache itself
		}
	}
	return true
}

// flush delivers what prog has queued, if it queues (see Flusher).
func flush(prog Progress) {
	if f, ok := prog.(Flusher); ok {
		f.Flush()
	}
}
