package daemon

import (
	"fmt"
	"slices"
	"strings"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// readBasicDerivation reads the BasicDerivation of BuildDerivation (§5.6)
// sent for drvPath. Its name is drvPath's without ".drv"; it has no input
// derivations (their outputs are among the input sources). The total size
// of its strings is bounded by derivation.MaxSize, the bound on a .drv
// file, so a client cannot make us hold more than a .drv could need.
// Errors are left in c.in.
func (c *conn) readBasicDerivation(drvPath storepath.Path) *derivation.Derivation {
	in := c.in
	budget := derivation.MaxSize
	str := func(field string, max int) string {
		s := in.String(field, min(max, budget))
		budget -= len(s)
		if budget <= 0 && in.Err() == nil {
			in.SetErr(field, fmt.Errorf("%w: derivation larger than %d bytes", wire.ErrLimit, derivation.MaxSize))
		}
		return s
	}
	d := &derivation.Derivation{
		Name:    strings.TrimSuffix(drvPath.Name(), ".drv"),
		Outputs: map[string]derivation.Output{},
		Env:     map[string]string{},
	}
	n := min(in.Count("outputs"), derivation.MaxItems)
	for i := 0; i < n && in.Err() == nil; i++ {
		name := str("output name", wire.MaxSmallString)
		o := derivation.Output{
			Path:     str("output path", wire.MaxPathLen),
			HashAlgo: str("output hashAlgo", wire.MaxSmallString),
			Hash:     str("output hash", wire.MaxSmallString),
		}
		if in.Err() != nil {
			break
		}
		if err := storepath.CheckName(name); err != nil {
			in.SetErr("output name", fmt.Errorf("output %q: %w", name, err))
			break
		}
		if _, dup := d.Outputs[name]; dup {
			in.SetErr("output name", fmt.Errorf("output %q appears twice", name))
			break
		}
		if o.Path != "" {
			if _, err := c.dir.Parse(o.Path); err != nil {
				in.SetErr("output path", fmt.Errorf("output %q: %w", name, err))
				break
			}
		}
		d.Outputs[name] = o
	}
	for _, p := range in.Paths("inputSrcs", c.dir) {
		d.InputSrcs = append(d.InputSrcs, c.dir.Abs(p))
	}
	slices.Sort(d.InputSrcs)
	d.InputSrcs = slices.Compact(d.InputSrcs)
	d.Platform = str("platform", wire.MaxSmallString)
	d.Builder = str("builder", wire.MaxPathLen)
	nArgs := in.Count("args")
	for i := 0; i < nArgs && in.Err() == nil; i++ {
		a := str("arg", wire.MaxStringLen)
		if in.Err() == nil {
			d.Args = append(d.Args, a)
		}
	}
	nEnv := in.Count("env")
	for i := 0; i < nEnv && in.Err() == nil; i++ {
		k := str("env name", wire.MaxSmallString)
		v := str("env value", wire.MaxStringLen)
		if in.Err() == nil {
			d.Env[k] = v
		}
	}
	if in.Err() != nil {
		return nil
	}
	return d
}
