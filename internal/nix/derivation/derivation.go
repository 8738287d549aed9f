// Package derivation implements Nix derivations (.drv files): the ATerm text
// format Nix 2.8 reads and writes, the derivation types, and the "hash modulo"
// from which input-addressed output paths are computed.
package derivation

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"slices"
	"strings"
	"syscall"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// MaxSize caps the size of a .drv file Parse accepts. The largest nixpkgs
// derivations (long env values such as inlined scripts or package lists) are
// a few MiB; 64 MiB leaves a wide margin while bounding memory.
const MaxSize = 64 << 20

// MaxItems caps the number of elements in any one list of a .drv (outputs,
// input derivations, their output names, sources, args, env). Real
// derivations have at most a few thousand inputs; the cap stops a crafted
// file of tiny elements from building huge maps.
const MaxItems = 1 << 20

// ErrFormat is wrapped by every error about a malformed .drv.
var ErrFormat = errors.New("bad derivation")

// Output is one output of a derivation as written in the .drv.
type Output struct {
	Path     string // absolute store path; "" for deferred, floating and impure outputs
	HashAlgo string // "" (input-addressed), "sha256", "r:sha256", …
	Hash     string // base16 digest of a fixed output, "impure", or ""
}

// Derivation is a parsed .drv.
type Derivation struct {
	Name      string // the drv path's name minus ".drv" (set by the caller or ParseFile)
	Outputs   map[string]Output
	InputDrvs map[string][]string // absolute drv path -> sorted output names
	InputSrcs []string            // absolute, sorted
	Platform  string
	Builder   string
	Args      []string
	Env       map[string]string
}

// ParseFile reads and parses the .drv file at filename; Name is taken from the
// file's base name ("<hash>-<name>.drv").
func ParseFile(filename string) (*Derivation, error) {
	p, err := storepath.ParseBase(path.Base(filename))
	if err != nil {
		return nil, fmt.Errorf("derivation %s: %w", filename, err)
	}
	if !p.IsDerivation() {
		return nil, fmt.Errorf("derivation %s: %w: name does not end in .drv", filename, ErrFormat)
	}
	// A .drv is a regular file; a store path of that name that is a
	// symlink (to a FIFO or a device, say) is not followed.
	f, err := os.OpenFile(filename, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("derivation %s: %w", filename, err)
	} else if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("derivation %s: %w: not a regular file", filename, ErrFormat)
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("derivation %s: %w", filename, err)
	}
	d, err := Parse(data, strings.TrimSuffix(p.Name(), ".drv"))
	if err != nil {
		return nil, fmt.Errorf("derivation %s: %w", filename, err)
	}
	return d, nil
}

type parser struct {
	data []byte
	pos  int
}

func (p *parser) errorf(format string, args ...any) error {
	return fmt.Errorf("%w: at byte %d: %s", ErrFormat, p.pos, fmt.Sprintf(format, args...))
}

func (p *parser) expect(s string) error {
	if !bytes.HasPrefix(p.data[p.pos:], []byte(s)) {
		return p.errorf("expected %q", s)
	}
	p.pos += len(s)
	return nil
}

// endOfList consumes a ',' (more elements) or ']' (end), as Nix's endOfList.
// The first element of a list is not preceded by a comma, so the caller
// tracks whether it is at the start.
func (p *parser) endOfList(first bool) (bool, error) {
	if p.pos >= len(p.data) {
		return false, p.errorf("unexpected end of input in list")
	}
	switch c := p.data[p.pos]; {
	case c == ']':
		p.pos++
		return true, nil
	case first:
		return false, nil
	case c == ',':
		p.pos++
		return false, nil
	}
	return false, p.errorf("expected ',' or ']'")
}

// str parses a quoted string. Escapes (\" \\ \n \r \t) are allowed only when
// escaped is set: Nix writes the other fields without escaping, so an escape
// there would not survive a round trip.
func (p *parser) str(field string, escaped bool) (string, error) {
	if err := p.expect(`"`); err != nil {
		return "", fmt.Errorf("%s: %w", field, err)
	}
	start := p.pos
	var b []byte // nil until the first escape
	for {
		if p.pos >= len(p.data) {
			return "", fmt.Errorf("%s: %w", field, p.errorf("unterminated string"))
		}
		c := p.data[p.pos]
		switch c {
		case '"':
			var s string
			if b == nil {
				s = string(p.data[start:p.pos])
			} else {
				s = string(b)
			}
			p.pos++
			return s, nil
		case '\\':
			if !escaped {
				return "", fmt.Errorf("%s: %w", field, p.errorf("escape in a field Nix writes unescaped"))
			}
			if b == nil {
				b = append([]byte(nil), p.data[start:p.pos]...)
			}
			if p.pos+1 >= len(p.data) {
				return "", fmt.Errorf("%s: %w", field, p.errorf("unterminated escape"))
			}
			switch e := p.data[p.pos+1]; e {
			case '"', '\\':
				b = append(b, e)
			case 'n':
				b = append(b, '\n')
			case 'r':
				b = append(b, '\r')
			case 't':
				b = append(b, '\t')
			default:
				return "", fmt.Errorf("%s: %w", field, p.errorf("unknown escape \\%c", e))
			}
			p.pos += 2
		default:
			if escaped && (c == '\n' || c == '\r' || c == '\t') {
				return "", fmt.Errorf("%s: %w", field, p.errorf("unescaped control character %q", c))
			}
			if b != nil {
				b = append(b, c)
			}
			p.pos++
		}
	}
}

// absPath parses a string that must be an absolute path whose last element
// is a valid store path base name.
func (p *parser) absPath(field string) (string, error) {
	s, err := p.str(field, false)
	if err != nil {
		return "", err
	}
	if err := checkAbs(s); err != nil {
		return "", fmt.Errorf("%s: %w", field, err)
	}
	return s, nil
}

func checkAbs(s string) error {
	if !strings.HasPrefix(s, "/") {
		return fmt.Errorf("%w: path %q is not absolute", ErrFormat, s)
	}
	if _, err := storepath.ParseBase(path.Base(s)); err != nil || path.Clean(s) != s {
		return fmt.Errorf("%w: %q is not a store path", ErrFormat, s)
	}
	return nil
}

// list parses the elements of a list whose '[' has been consumed.
func (p *parser) list(field string, elem func(i int) error) error {
	for i := 0; ; i++ {
		end, err := p.endOfList(i == 0)
		if err != nil {
			return fmt.Errorf("%s: %w", field, err)
		}
		if end {
			return nil
		}
		if i >= MaxItems {
			return fmt.Errorf("%s: %w", field, p.errorf("more than %d elements", MaxItems))
		}
		if err := elem(i); err != nil {
			return err
		}
	}
}

// Parse parses the ATerm text of a .drv. It is stricter than Nix: it refuses
// duplicate keys, escapes other than \" \\ \n \r \t, escapes in fields Nix
// writes unescaped, and outputs that do not fit one of Nix's output kinds,
// so that Bytes of a parsed derivation is Nix's own unparse of it.
func Parse(data []byte, name string) (*Derivation, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrFormat, len(data), MaxSize)
	}
	p := &parser{data: data}
	d := &Derivation{
		Name:      name,
		Outputs:   map[string]Output{},
		InputDrvs: map[string][]string{},
		InputSrcs: []string{},
		Args:      []string{},
		Env:       map[string]string{},
	}
	if err := p.expect("Derive(["); err != nil {
		return nil, err
	}
	err := p.list("outputs", func(int) error {
		if err := p.expect("("); err != nil {
			return fmt.Errorf("outputs: %w", err)
		}
		id, err := p.str("output name", false)
		if err != nil {
			return err
		}
		var o Output
		for _, f := range []struct {
			name string
			dst  *string
		}{{"path", &o.Path}, {"hash algorithm", &o.HashAlgo}, {"hash", &o.Hash}} {
			if err := p.expect(","); err != nil {
				return fmt.Errorf("output %q: %w", id, err)
			}
			if *f.dst, err = p.str("output "+id+" "+f.name, false); err != nil {
				return err
			}
		}
		if err := p.expect(")"); err != nil {
			return fmt.Errorf("output %q: %w", id, err)
		}
		if err := checkOutputName(id); err != nil {
			return err
		}
		if _, dup := d.Outputs[id]; dup {
			return fmt.Errorf("%w: output %q: duplicate", ErrFormat, id)
		}
		if _, err := o.kind(); err != nil {
			return fmt.Errorf("output %q: %w", id, err)
		}
		d.Outputs[id] = o
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.expect(",["); err != nil {
		return nil, fmt.Errorf("input derivations: %w", err)
	}
	err = p.list("input derivations", func(int) error {
		if err := p.expect("("); err != nil {
			return fmt.Errorf("input derivations: %w", err)
		}
		drv, err := p.absPath("input derivation")
		if err != nil {
			return err
		}
		if !strings.HasSuffix(drv, ".drv") {
			return fmt.Errorf("%w: input derivation %q: not a .drv", ErrFormat, drv)
		}
		if err := p.expect(",["); err != nil {
			return fmt.Errorf("input derivation %q: %w", drv, err)
		}
		outs := []string{}
		field := "outputs of input derivation " + drv
		err = p.list(field, func(int) error {
			o, err := p.str(field, false)
			if err == nil {
				outs = append(outs, o)
			}
			return err
		})
		if err != nil {
			return err
		}
		if err := checkSet(field, outs); err != nil {
			return err
		}
		if err := p.expect(")"); err != nil {
			return fmt.Errorf("input derivation %q: %w", drv, err)
		}
		if _, dup := d.InputDrvs[drv]; dup {
			return fmt.Errorf("%w: input derivation %q: duplicate", ErrFormat, drv)
		}
		d.InputDrvs[drv] = outs
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.expect(",["); err != nil {
		return nil, fmt.Errorf("input sources: %w", err)
	}
	err = p.list("input sources", func(int) error {
		s, err := p.absPath("input source")
		if err == nil {
			d.InputSrcs = append(d.InputSrcs, s)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := checkSet("input sources", d.InputSrcs); err != nil {
		return nil, err
	}
	if err := p.expect(","); err != nil {
		return nil, fmt.Errorf("platform: %w", err)
	}
	if d.Platform, err = p.str("platform", false); err != nil {
		return nil, err
	}
	if err := p.expect(","); err != nil {
		return nil, fmt.Errorf("builder: %w", err)
	}
	if d.Builder, err = p.str("builder", true); err != nil {
		return nil, err
	}
	if err := p.expect(",["); err != nil {
		return nil, fmt.Errorf("args: %w", err)
	}
	err = p.list("args", func(int) error {
		a, err := p.str("arg", true)
		if err == nil {
			d.Args = append(d.Args, a)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := p.expect(",["); err != nil {
		return nil, fmt.Errorf("env: %w", err)
	}
	err = p.list("env", func(int) error {
		if err := p.expect("("); err != nil {
			return fmt.Errorf("env: %w", err)
		}
		k, err := p.str("env name", true)
		if err != nil {
			return err
		}
		if err := p.expect(","); err != nil {
			return fmt.Errorf("env %q: %w", k, err)
		}
		v, err := p.str("env "+k, true)
		if err != nil {
			return err
		}
		if err := p.expect(")"); err != nil {
			return fmt.Errorf("env %q: %w", k, err)
		}
		if _, dup := d.Env[k]; dup {
			return fmt.Errorf("%w: env %q: duplicate", ErrFormat, k)
		}
		d.Env[k] = v
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.expect(")"); err != nil {
		return nil, err
	}
	if p.pos != len(data) {
		return nil, p.errorf("trailing data")
	}
	return d, nil
}

// checkOutputName refuses names that cannot be part of a store path name
// (Nix appends "-<output>" to the derivation name for outputs other than out).
func checkOutputName(id string) error {
	if err := storepath.CheckName(id); err != nil {
		return fmt.Errorf("%w: output name %q: %v", ErrFormat, id, err)
	}
	return nil
}

// checkSet refuses duplicates in a list Nix keeps as a set.
func checkSet(field string, ss []string) error {
	sorted := slices.Clone(ss)
	slices.Sort(sorted)
	for i := 1; i < len(sorted); i++ {
		if sorted[i] == sorted[i-1] {
			return fmt.Errorf("%w: %s: duplicate %q", ErrFormat, field, sorted[i])
		}
	}
	return nil
}

// writeUnquoted writes s between quotes as is, as Nix's printUnquotedString
// (used for output names and paths, input paths and the platform).
func writeUnquoted(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	b.WriteString(s)
	b.WriteByte('"')
}

// writeQuoted writes s escaped, as Nix's printString (builder, args, env).
func writeQuoted(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '"', '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
}

// Bytes returns the ATerm text of d, byte-identical to Nix's unparse: maps
// and sets are written sorted by key.
func (d *Derivation) Bytes() []byte {
	return d.unparse(false, nil)
}

// unparse is Nix's Derivation::unparse. With mask, output paths and the env
// variables named after outputs are written empty; inputs, when not nil,
// replaces the input derivations (hash modulo in base16 -> output names).
func (d *Derivation) unparse(mask bool, inputs map[string][]string) []byte {
	var b bytes.Buffer
	b.WriteString("Derive([")
	for i, id := range slices.Sorted(maps.Keys(d.Outputs)) {
		o := d.Outputs[id]
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		writeUnquoted(&b, id)
		b.WriteByte(',')
		if mask {
			writeUnquoted(&b, "")
		} else {
			writeUnquoted(&b, o.Path)
		}
		b.WriteByte(',')
		writeUnquoted(&b, o.HashAlgo)
		b.WriteByte(',')
		writeUnquoted(&b, o.Hash)
		b.WriteByte(')')
	}
	b.WriteString("],[")
	if inputs == nil {
		inputs = d.InputDrvs
	}
	for i, drv := range slices.Sorted(maps.Keys(inputs)) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		writeUnquoted(&b, drv)
		b.WriteString(",[")
		outs := slices.Clone(inputs[drv])
		slices.Sort(outs)
		for j, o := range slices.Compact(outs) {
			if j > 0 {
				b.WriteByte(',')
			}
			writeUnquoted(&b, o)
		}
		b.WriteString("])")
	}
	b.WriteString("],[")
	srcs := slices.Clone(d.InputSrcs)
	slices.Sort(srcs)
	for i, s := range slices.Compact(srcs) {
		if i > 0 {
			b.WriteByte(',')
		}
		writeUnquoted(&b, s)
	}
	b.WriteString("],")
	writeUnquoted(&b, d.Platform)
	b.WriteByte(',')
	writeQuoted(&b, d.Builder)
	b.WriteString(",[")
	for i, a := range d.Args {
		if i > 0 {
			b.WriteByte(',')
		}
		writeQuoted(&b, a)
	}
	b.WriteString("],[")
	for i, k := range slices.Sorted(maps.Keys(d.Env)) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		writeQuoted(&b, k)
		b.WriteByte(',')
		if _, isOut := d.Outputs[k]; mask && isOut {
			writeQuoted(&b, "")
		} else {
			writeQuoted(&b, d.Env[k])
		}
		b.WriteByte(')')
	}
	b.WriteString("])")
	return b.Bytes()
}
