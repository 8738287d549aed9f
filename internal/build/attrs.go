package build

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// What a derivation's attributes ask of its build beyond running the
// builder, as Nix 2.8 does it: output placeholders replaced by paths,
// structured attributes (.attrs.json, .attrs.sh), exportReferencesGraph,
// and the output checks (allowedReferences and the like).

// placeholders replaces each output's placeholder (derivation.HashPlaceholder)
// with the output's path, as Nix's inputRewrites do in what the builder
// gets.
func (g *goal) placeholders() *strings.Replacer {
	var pairs []string
	for _, n := range slices.Sorted(maps.Keys(g.drv.Outputs)) {
		pairs = append(pairs, derivation.HashPlaceholder(n), g.b.abs(g.outputs[n]))
	}
	return strings.NewReplacer(pairs...)
}

// writeBuildFile writes a file the builder reads into the build
// directory; given to the builder's user if own. No process of that user
// runs yet (prepare), and the file is not followed if it is a symlink.
func (j *job) writeBuildFile(name string, data []byte, own bool) error {
	f, err := os.OpenFile(j.tmpDir+"/"+name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil && own {
		err = f.Chown(j.hostUID, j.hostGID)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// writeStructuredAttrs writes .attrs.json and .attrs.sh for a derivation
// with structured attributes and returns the environment variables that
// name them (top is the build directory as the builder sees it). Nix 2.8
// sets these variables to the files' paths outside the sandbox; nixyard
// gives their paths inside it, as later Nix does.
func (j *job) writeStructuredAttrs(ctx context.Context, top string) (map[string]string, error) {
	g := j.g
	src := g.attrs.Structured()
	attrs := make(map[string]any, len(src)+1)
	for k, v := range src {
		attrs[k] = v
	}
	outs := map[string]any{}
	for n := range g.drv.Outputs {
		outs[n] = g.b.abs(g.outputs[n])
	}
	attrs["outputs"] = outs
	if graphs, ok := src["exportReferencesGraph"].(map[string]any); ok {
		budget := &graphBudget{left: maxExportedPaths}
		sizes := map[storepath.Path]uint64{}
		for _, name := range slices.Sorted(maps.Keys(graphs)) {
			roots, err := graphRoots(graphs[name])
			if err != nil {
				return nil, rejected(fmt.Errorf("exportReferencesGraph '%s': %w", name, err))
			}
			infos, err := j.exportReferences(ctx, roots, budget)
			if err != nil {
				return nil, err
			}
			if attrs[name], err = j.pathInfosJSON(ctx, infos, sizes); err != nil {
				return nil, err
			}
		}
	}
	data, err := derivation.EncodeJSON(attrs)
	if err != nil {
		return nil, fmt.Errorf("structured attributes: %w", err)
	}
	if err := j.writeBuildFile(".attrs.json", []byte(j.rewrite.Replace(string(data))), true); err != nil {
		return nil, err
	}
	if err := j.writeBuildFile(".attrs.sh", []byte(j.rewrite.Replace(derivation.AttrsShell(attrs))), true); err != nil {
		return nil, err
	}
	return map[string]string{
		"NIX_ATTRS_JSON_FILE": top + "/.attrs.json",
		"NIX_ATTRS_SH_FILE":   top + "/.attrs.sh",
	}, nil
}

// graphRoots reads one entry of a structured exportReferencesGraph: store
// paths, as Nix iterates the value (a list; a single path counts as one).
func graphRoots(v any) ([]string, error) {
	roots, err := derivation.StringValues(v)
	if err != nil {
		return nil, fmt.Errorf("must be a list of store paths: %w", err)
	}
	return roots, nil
}

// pathInfosJSON is Nix's pathInfoToJSON of infos, with closure sizes and
// without the impure fields, for .attrs.json.
// sizes memoises closure sizes across calls.
func (j *job) pathInfosJSON(ctx context.Context, infos []*store.PathInfo, sizes map[storepath.Path]uint64) ([]any, error) {
	byPath := make(map[storepath.Path]*store.PathInfo, len(infos))
	for _, info := range infos {
		byPath[info.Path] = info
	}
	list := make([]any, 0, len(infos))
	lookup := func(p storepath.Path) (*store.PathInfo, error) {
		if info := byPath[p]; info != nil {
			return info, nil
		}
		return nil, fmt.Errorf("path '%s' is not in the exported closure", j.g.b.abs(p))
	}
	for _, info := range infos {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		closureSize, ok := sizes[info.Path]
		if !ok {
			_, size, err := walkClosure(info.Path, lookup)
			if err != nil {
				return nil, err
			}
			closureSize, sizes[info.Path] = size, size
		}
		refs := make([]any, 0, len(info.References))
		for _, r := range sortedPaths(info.References) {
			refs = append(refs, j.g.b.abs(r))
		}
		o := map[string]any{
			"path":        j.g.b.abs(info.Path),
			"narHash":     info.NarHash.String(),
			"narSize":     info.NarSize,
			"references":  refs,
			"closureSize": closureSize,
		}
		if info.CA != "" {
			o["ca"] = info.CA
		}
		list = append(list, o)
	}
	return list, nil
}

// walkClosure returns p's closure and the sum of its NAR sizes; lookup
// gives each path's info.
func walkClosure(p storepath.Path, lookup func(storepath.Path) (*store.PathInfo, error)) (map[storepath.Path]bool, uint64, error) {
	seen := map[storepath.Path]bool{p: true}
	todo := []storepath.Path{p}
	var size uint64
	for len(todo) > 0 {
		info, err := lookup(todo[len(todo)-1])
		if err != nil {
			return nil, 0, err
		}
		todo = todo[:len(todo)-1]
		size += info.NarSize
		for _, r := range info.References {
			if !seen[r] {
				seen[r] = true
				todo = append(todo, r)
			}
		}
	}
	return seen, size, nil
}

var graphFileName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]*$`)

// writeReferencesGraphs handles exportReferencesGraph without structured
// attributes: pairs of a file name and a store path; each file gets the
// closure of its path in the format of `nix-store --register-validity`
// (deriver lines left empty).
func (j *job) writeReferencesGraphs(ctx context.Context) error {
	s, ok := j.g.drv.Env["exportReferencesGraph"]
	if !ok {
		return nil
	}
	words := derivation.Tokenize(s)
	if len(words)%2 != 0 {
		return rejected(fmt.Errorf("odd number of tokens in 'exportReferencesGraph': '%s'", s))
	}
	budget := &graphBudget{left: maxExportedPaths}
	for i := 0; i < len(words); i += 2 {
		name, root := words[i], words[i+1]
		if !graphFileName.MatchString(name) {
			return rejected(fmt.Errorf("invalid file name '%s' in 'exportReferencesGraph'", name))
		}
		p, _, err := j.g.b.st.Dir().ParsePrefix(root)
		if err != nil {
			return rejected(fmt.Errorf("'exportReferencesGraph' contains a non-store path '%s'", root))
		}
		infos, err := j.exportReferences(ctx, []string{j.g.b.abs(p)}, budget)
		if err != nil {
			return err
		}
		var b strings.Builder
		for _, info := range infos {
			fmt.Fprintf(&b, "%s\n\n%d\n", j.g.b.abs(info.Path), len(info.References))
			for _, r := range sortedPaths(info.References) {
				b.WriteString(j.g.b.abs(r) + "\n")
			}
		}
		// Left to root, as Nix leaves it.
		if err := j.writeBuildFile(name, []byte(b.String()), false); err != nil {
			return err
		}
	}
	return nil
}

// maxExportedPaths bounds the paths that exportReferencesGraph may list in
// all, counting each graph's closure again: a .drv of many graphs of a
// large closure would otherwise make the daemon build huge files (Nix has
// no bound; real uses list one or a few closures).
const maxExportedPaths = 1 << 20

// graphBudget counts down the paths one build's graphs may still list.
type graphBudget struct{ left int }

// rejectedError is a derivation's attribute that the build refuses (Nix's
// BuildError while starting the builder): the build fails with
// InputRejected and the bare message.
type rejectedError struct{ error }

func rejected(err error) error { return rejectedError{err} }

// exportReferences is Nix's Store::exportReferences: the closure of roots,
// which must be in the closure of the build's inputs, and of the outputs
// of every derivation in it; sorted by path. budget is charged for them.
func (j *job) exportReferences(ctx context.Context, roots []string, budget *graphBudget) ([]*store.PathInfo, error) {
	b := j.g.b
	inputs := make(map[storepath.Path]bool, len(j.inputs))
	for _, p := range j.inputs {
		inputs[p] = true
	}
	var start []storepath.Path
	for _, r := range roots {
		p, err := b.st.Dir().Parse(r)
		if err != nil {
			return nil, rejected(fmt.Errorf("exportReferencesGraph: %w", err))
		}
		if !inputs[p] {
			return nil, rejected(errors.New(hint.Fmt("cannot export references of path '%s' because it is not in the input closure of the derivation", r)))
		}
		start = append(start, p)
	}
	closure, err := b.st.QueryClosure(ctx, start)
	if err != nil {
		return nil, err
	}
	// With the outputs of the derivations in it (for images of all of a
	// system's build-time dependencies, say).
	more := slices.Clone(closure)
	for _, p := range closure {
		if !p.IsDerivation() {
			continue
		}
		drv, err := derivation.ParseFile(b.st.RealPath(p))
		if err != nil {
			return nil, err
		}
		for _, n := range slices.Sorted(maps.Keys(drv.Outputs)) {
			if drv.Outputs[n].Path == "" {
				return nil, rejected(fmt.Errorf("exportReferences on CA derivations is not yet implemented"))
			}
			op, err := b.st.Dir().Parse(drv.Outputs[n].Path)
			if err != nil {
				return nil, err
			}
			more = append(more, op)
		}
	}
	if len(more) > len(closure) {
		if closure, err = b.st.QueryClosure(ctx, more); err != nil {
			return nil, err
		}
	}
	closure = sortedPaths(closure)
	if budget.left -= len(closure); budget.left < 0 {
		return nil, rejected(fmt.Errorf("exportReferencesGraph lists more than %d paths in all", maxExportedPaths))
	}
	infos := make([]*store.PathInfo, len(closure))
	for i, p := range closure {
		if infos[i], err = b.st.QueryPathInfo(ctx, p); err != nil {
			return nil, err
		}
	}
	return infos, nil
}

// sortedPaths returns ps sorted, without duplicates, leaving ps as it is.
func sortedPaths(ps []storepath.Path) []storepath.Path { return storepath.Sort(slices.Clone(ps)) }

// refCheck is one of the reference lists of an output's checks.
type refCheck struct {
	set   bool     // the derivation sets it (an empty "allowed" list allows nothing)
	specs []string // store paths and output names
}

// outputChecks are the restrictions a derivation puts on one output:
// Nix's allowedReferences, allowedRequisites, disallowedReferences,
// disallowedRequisites and, with structured attributes, maxSize and
// maxClosureSize.
type outputChecks struct {
	ignoreSelfRefs                                           bool // in the requisites checks
	maxSize, maxClosureSize                                  *uint64
	allowedRefs, allowedReqs, disallowedRefs, disallowedReqs refCheck
}

// checkLists names the reference lists of outputChecks by attribute.
func (c *outputChecks) checkLists() []struct {
	attr string
	dst  *refCheck
} {
	return []struct {
		attr string
		dst  *refCheck
	}{
		{"allowedReferences", &c.allowedRefs},
		{"allowedRequisites", &c.allowedReqs},
		{"disallowedReferences", &c.disallowedRefs},
		{"disallowedRequisites", &c.disallowedReqs},
	}
}

// checksFor returns the checks of output name; nil if it has none.
func (g *goal) checksFor(name string) (*outputChecks, error) {
	structured := g.attrs.Structured()
	if structured == nil {
		c := &outputChecks{ignoreSelfRefs: true}
		for _, l := range c.checkLists() {
			var err error
			if l.dst.specs, l.dst.set, err = g.attrs.Strings(l.attr); err != nil {
				return nil, err
			}
		}
		return c, nil
	}
	all, _ := structured["outputChecks"].(map[string]any)
	spec, ok := all[name].(map[string]any)
	if !ok {
		return nil, nil
	}
	c := &outputChecks{}
	for key, dst := range map[string]**uint64{"maxSize": &c.maxSize, "maxClosureSize": &c.maxClosureSize} {
		if v, ok := spec[key]; ok {
			n, err := jsonUint(v)
			if err != nil {
				return nil, fmt.Errorf("outputChecks.%s.%s of derivation '%s': %w", name, key, g.b.abs(g.drvPath), err)
			}
			*dst = &n
		}
	}
	for _, l := range c.checkLists() {
		v, ok := spec[l.attr]
		if !ok {
			continue
		}
		list, err := derivation.StringValues(v)
		if err != nil {
			return nil, fmt.Errorf("attribute '%s' of derivation '%s' must be a list of strings", l.attr, g.b.abs(g.drvPath))
		}
		*l.dst = refCheck{set: true, specs: list}
	}
	return c, nil
}

// checkOutputs applies the derivation's output checks to the outputs just
// built (infos, by output name), before they are registered, as Nix's
// checkOutputs. Requisites are closures over these outputs and the store.
func (j *job) checkOutputs(ctx context.Context, infos map[string]store.PathInfo) error {
	g := j.g
	b := g.b
	byPath := map[storepath.Path]*store.PathInfo{}
	for _, info := range infos {
		byPath[info.Path] = &info
	}
	lookup := func(p storepath.Path) (*store.PathInfo, error) {
		if info := byPath[p]; info != nil {
			return info, nil
		}
		return b.st.QueryPathInfoShared(ctx, p)
	}
	for _, name := range slices.Sorted(maps.Keys(infos)) {
		info := infos[name]
		c, err := g.checksFor(name)
		if err != nil {
			return err
		}
		if c == nil {
			continue // no checks for this output
		}
		pathAbs := b.abs(info.Path)
		if c.maxSize != nil && info.NarSize > *c.maxSize {
			return errors.New(hint.Fmt("path '%s' is too large at %d bytes; limit is %d bytes", pathAbs, info.NarSize, *c.maxSize))
		}
		if c.maxClosureSize != nil {
			_, size, err := walkClosure(info.Path, lookup)
			if err != nil {
				return err
			}
			if size > *c.maxClosureSize {
				return errors.New(hint.Fmt("closure of path '%s' is too large at %d bytes; limit is %d bytes", pathAbs, size, *c.maxClosureSize))
			}
		}
		checkRefs := func(rc refCheck, allowed, recursive bool) error {
			if !rc.set {
				return nil
			}
			spec := map[storepath.Path]bool{}
			for _, s := range rc.specs {
				if p, err := b.st.Dir().Parse(s); err == nil {
					spec[p] = true
				} else if o, ok := infos[s]; ok {
					spec[o.Path] = true
				} else {
					return errors.New(hint.Fmt("derivation contains an illegal reference specifier '%s'", s))
				}
			}
			used := map[storepath.Path]bool{}
			if recursive {
				var err error
				if used, _, err = walkClosure(info.Path, lookup); err != nil {
					return err
				}
				if c.ignoreSelfRefs {
					delete(used, info.Path)
				}
			} else {
				for _, r := range info.References {
					used[r] = true
				}
			}
			var bad []string
			for p := range used {
				if spec[p] != allowed {
					bad = append(bad, b.abs(p))
				}
			}
			if len(bad) == 0 {
				return nil
			}
			slices.Sort(bad)
			return errors.New(hint.Fmt("output '%s' is not allowed to refer to the following paths:%s", pathAbs, "\n  "+strings.Join(bad, "\n  ")))
		}
		if err := checkRefs(c.allowedRefs, true, false); err != nil {
			return err
		}
		if err := checkRefs(c.allowedReqs, true, true); err != nil {
			return err
		}
		if err := checkRefs(c.disallowedRefs, false, false); err != nil {
			return err
		}
		if err := checkRefs(c.disallowedReqs, false, true); err != nil {
			return err
		}
	}
	return nil
}

// jsonUint reads a JSON number as Nix's JSON library converts it to an
// unsigned 64-bit integer: a fraction is dropped, a negative number wraps.
func jsonUint(v any) (uint64, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("must be a number")
	}
	if u, err := strconv.ParseUint(string(n), 10, 64); err == nil {
		return u, nil
	}
	if i, err := strconv.ParseInt(string(n), 10, 64); err == nil {
		return uint64(i), nil
	}
	f, err := strconv.ParseFloat(string(n), 64)
	if err != nil {
		return 0, fmt.Errorf("%s is not a number", n)
	}
	if f < 0 {
		return uint64(int64(f)), nil
	}
	return uint64(f), nil
}
