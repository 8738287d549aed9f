package wire

import (
	"slices"

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

// Path writes the absolute form of p in dir (without building it).
func (e *Encoder) Path(dir storepath.Dir, p storepath.Path) {
	base := p.String()
	n := len(dir) + 1 + len(base)
	e.U64(uint64(n))
	if e.err != nil {
		return
	}
	if _, e.err = e.w.WriteString(string(dir)); e.err != nil {
		return
	}
	if e.err = e.w.WriteByte('/'); e.err != nil {
		return
	}
	if _, e.err = e.w.WriteString(base); e.err != nil {
		return
	}
	e.Write(zeros[:padLen(uint64(n))])
}

// OptPath writes p, or "" for the zero Path.
func (e *Encoder) OptPath(dir storepath.Dir, p storepath.Path) {
	if p.IsZero() {
		e.String("")
		return
	}
	e.Path(dir, p)
}

// Paths writes a set of store paths, sorted by base name as Nix does. It
// sorts a copy unless ps is already sorted; ps is left as it is.
func (e *Encoder) Paths(dir storepath.Dir, ps []storepath.Path) {
	sorted := ps
	for i := 1; i < len(ps); i++ {
		if storepath.Compare(ps[i-1], ps[i]) >= 0 { // unsorted or repeated
			sorted = storepath.Sort(slices.Clone(ps))
			break
		}
	}
	e.U64(uint64(len(sorted)))
	for _, p := range sorted {
		e.Path(dir, p)
	}
}
