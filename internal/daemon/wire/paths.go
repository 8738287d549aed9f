package wire

import (
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// Path reads an absolute store path that must lie in dir.
func (d *Decoder) Path(field string, dir storepath.Dir) storepath.Path {
	s := d.String(field, MaxPathLen)
	if d.err != nil {
		return storepath.Path{}
	}
	p, err := dir.Parse(s)
	if err != nil {
		d.SetErr(field, err)
		return storepath.Path{}
	}
	return p
}

// OptPath reads an optional store path: "" is the zero Path.
func (d *Decoder) OptPath(field string, dir storepath.Dir) storepath.Path {
	s := d.String(field, MaxPathLen)
	if d.err != nil || s == "" {
		return storepath.Path{}
	}
	p, err := dir.Parse(s)
	if err != nil {
		d.SetErr(field, err)
		return storepath.Path{}
	}
	return p
}

// Paths reads a list or set of store paths in dir.
func (d *Decoder) Paths(field string, dir storepath.Dir) []storepath.Path {
	n := d.Count(field)
	out := make([]storepath.Path, 0, min(n, 1024))
	for i := 0; i < n && d.err == nil; i++ {
		p := d.Path(field, dir)
		if d.err == nil {
			out = append(out, p)
		}
	}
	if d.err != nil {
		return nil
	}
	return out
}

// Path writes the absolute form of p in dir.
func (e *Encoder) Path(dir storepath.Dir, p storepath.Path) { e.String(dir.Abs(p)) }

// OptPath writes p, or "" for the zero Path.
func (e *Encoder) OptPath(dir storepath.Dir, p storepath.Path) {
	if p.IsZero() {
		e.String("")
		return
	}
	e.String(dir.Abs(p))
}

// Paths writes a set of store paths, sorted by base name as Nix does. It
// sorts a copy; ps is left as it is.
func (e *Encoder) Paths(dir storepath.Dir, ps []storepath.Path) {
	sorted := storepath.Sort(append([]storepath.Path(nil), ps...))
	e.U64(uint64(len(sorted)))
	for _, p := range sorted {
		e.Path(dir, p)
	}
}
