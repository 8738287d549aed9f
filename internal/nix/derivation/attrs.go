package derivation

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/nixbase32"
)

// HashPlaceholder is what `builtins.placeholder output` evaluates to: "/"
// and the base-32 SHA-256 of "nix-output:" and the output's name. A build
// replaces it with the output's path wherever the builder gets it (its
// arguments, environment, passAsFile files and structured attributes).
func HashPlaceholder(output string) string {
	return "/" + nixbase32.EncodeToString(hash.Sum(hash.SHA256, []byte("nix-output:"+output)).Digest)
}

// Attrs are a derivation's attributes as Nix's build logic reads them
// (Nix's ParsedDerivation): from the environment, or, for a derivation
// with structured attributes (__structuredAttrs, written as the "__json"
// variable), from that JSON object.
type Attrs struct {
	drvName    string // the .drv's base name, for errors
	env        map[string]string
	structured map[string]any // nil without structured attributes
}

// Attrs parses d's attributes. drvName names the .drv in errors (Nix
// names it by its base name, "<hash>-<name>.drv").
func (d *Derivation) Attrs(drvName string) (*Attrs, error) {
	a := &Attrs{drvName: drvName, env: d.Env}
	j, ok := d.Env["__json"]
	if !ok {
		return a, nil
	}
	fail := func(why string) (*Attrs, error) {
		return nil, fmt.Errorf("cannot process __json attribute of '%s': %s", drvName, why)
	}
	// Nix's JSON library refuses what encoding/json would let through:
	// invalid UTF-8 (Go would put U+FFFD in its place) and numbers no
	// double can hold.
	if !utf8.ValidString(j) || (strings.Contains(strings.ToLower(j), `\ud`) && checkSurrogates(j) != nil) {
		return fail("invalid UTF-8")
	}
	dec := json.NewDecoder(strings.NewReader(j))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return fail(err.Error())
	}
	if _, err := dec.Token(); err != io.EOF {
		return fail("data after the JSON value")
	}
	switch v := v.(type) {
	case map[string]any:
		a.structured = v
	case nil:
		a.structured = map[string]any{} // null is taken as an empty object, as Nix does
	default:
		return fail("not a JSON object")
	}
	if err := checkNumbers(a.structured); err != nil {
		return fail(err.Error())
	}
	return a, nil
}

// checkSurrogates refuses \u escapes of unpaired UTF-16 surrogates, which
// encoding/json turns into U+FFFD (so does a U+FFFD the JSON holds as it
// is, when the text also has a surrogate escape: too rare to tell apart).
func checkSurrogates(j string) error {
	dec := json.NewDecoder(strings.NewReader(j))
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return nil // a syntax error, reported by the decoding proper
		}
		if s, ok := tok.(string); ok && strings.ContainsRune(s, utf8.RuneError) {
			return fmt.Errorf("invalid UTF-8")
		}
	}
}

// checkNumbers refuses numbers that overflow a double.
func checkNumbers(v any) error {
	switch v := v.(type) {
	case json.Number:
		if _, err := strconv.ParseFloat(string(v), 64); err != nil {
			return fmt.Errorf("number overflow parsing '%s'", v)
		}
	case []any:
		for _, e := range v {
			if err := checkNumbers(e); err != nil {
				return err
			}
		}
	case map[string]any:
		for _, e := range v {
			if err := checkNumbers(e); err != nil {
				return err
			}
		}
	}
	return nil
}

// Structured returns the structured attributes, or nil if the derivation
// has none. The caller must not modify them.
func (a *Attrs) Structured() map[string]any { return a.structured }

// Bool returns a Boolean attribute, def when it is not set. In the
// environment, only "1" is true.
func (a *Attrs) Bool(name string, def bool) (bool, error) {
	if a.structured == nil {
		v, ok := a.env[name]
		if !ok {
			return def, nil
		}
		return v == "1", nil
	}
	v, ok := a.structured[name]
	if !ok {
		return def, nil
	}
	b, isBool := v.(bool)
	if !isBool {
		return false, fmt.Errorf("attribute '%s' of derivation '%s' must be a Boolean", name, a.drvName)
	}
	return b, nil
}

// Strings returns a list-of-strings attribute and whether it is set. In
// the environment, the list is the variable's whitespace-separated words.
func (a *Attrs) Strings(name string) ([]string, bool, error) {
	if a.structured == nil {
		v, ok := a.env[name]
		if !ok {
			return nil, false, nil
		}
		return Tokenize(v), true, nil
	}
	v, ok := a.structured[name]
	if !ok {
		return nil, false, nil
	}
	ss, err := stringList(v)
	if err != nil {
		return nil, false, fmt.Errorf("attribute '%s' of derivation '%s' must be a list of strings", name, a.drvName)
	}
	return ss, true, nil
}

// stringList converts a JSON array of strings (a value of the structured
// attributes) to a slice.
func stringList(v any) ([]string, error) {
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("not a list")
	}
	ss := make([]string, len(list))
	for i, e := range list {
		if ss[i], ok = e.(string); !ok {
			return nil, fmt.Errorf("element %d is not a string", i)
		}
	}
	return ss, nil
}

// values returns what iterating v yields in Nix's JSON library: an
// array's elements, an object's values (in key order), nothing for null,
// and any other value itself. Nix reads some lists of structured
// attributes that way (outputChecks, exportReferencesGraph).
func values(v any) []any {
	switch v := v.(type) {
	case nil:
		return nil
	case []any:
		return v
	case map[string]any:
		vals := make([]any, 0, len(v))
		for _, k := range slices.Sorted(maps.Keys(v)) {
			vals = append(vals, v[k])
		}
		return vals
	}
	return []any{v}
}

// StringValues is values of v, which must all be strings.
func StringValues(v any) ([]string, error) {
	vals := values(v)
	ss := make([]string, len(vals))
	for i, e := range vals {
		s, ok := e.(string)
		if !ok {
			return nil, fmt.Errorf("element %d is not a string", i)
		}
		ss[i] = s
	}
	return ss, nil
}

// Tokenize splits s into words as Nix's tokenizeString does with its
// default separators: space, tab, newline and carriage return.
func Tokenize(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == '\t' || r == '\n' || r == '\r' })
}

// EncodeJSON writes v (a value as encoding/json decodes it with UseNumber:
// map[string]any, []any, string, bool, nil, json.Number; or uint64) as the JSON library of Nix writes it: compact, object keys in
// byte order, only '"', '\\' and control characters escaped, numbers
// normalised as that library prints them. Builders read .attrs.json in
// this form.
func EncodeJSON(v any) ([]byte, error) {
	var b bytes.Buffer
	if err := encodeJSON(&b, v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func encodeJSON(b *bytes.Buffer, v any) error {
	switch v := v.(type) {
	case nil:
		b.WriteString("null")
	case bool:
		b.WriteString(strconv.FormatBool(v))
	case string:
		writeJSONString(b, v)
	case uint64:
		b.WriteString(strconv.FormatUint(v, 10))
	case json.Number:
		s, err := normaliseNumber(v)
		if err != nil {
			return err
		}
		b.WriteString(s)
	case []any:
		b.WriteByte('[')
		for i, e := range v {
			if i > 0 {
				b.WriteByte(',')
			}
			if err := encodeJSON(b, e); err != nil {
				return err
			}
		}
		b.WriteByte(']')
	case map[string]any:
		b.WriteByte('{')
		for i, k := range slices.Sorted(maps.Keys(v)) {
			if i > 0 {
				b.WriteByte(',')
			}
			writeJSONString(b, k)
			b.WriteByte(':')
			if err := encodeJSON(b, v[k]); err != nil {
				return err
			}
		}
		b.WriteByte('}')
	default:
		return fmt.Errorf("cannot encode %T as JSON", v)
	}
	return nil
}

func writeJSONString(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\t':
			b.WriteString(`\t`)
		case '\n':
			b.WriteString(`\n`)
		case '\f':
			b.WriteString(`\f`)
		case '\r':
			b.WriteString(`\r`)
		default:
			if c < 0x20 {
				fmt.Fprintf(b, `\u%04x`, c)
			} else {
				b.WriteByte(c)
			}
		}
	}
	b.WriteByte('"')
}

// normaliseNumber prints a JSON number as Nix's JSON library does after
// parsing it: integers that fit 64 bits as they are, other numbers as the
// shortest decimal that reads back as the same double, with ".0" added to
// integral values and an exponent outside 1e-4 … 1e15.
func normaliseNumber(n json.Number) (string, error) {
	s := string(n)
	if !strings.ContainsAny(s, ".eE") {
		if i, err := strconv.ParseInt(s, 10, 64); err == nil {
			return strconv.FormatInt(i, 10), nil
		}
		if u, err := strconv.ParseUint(s, 10, 64); err == nil {
			return strconv.FormatUint(u, 10), nil
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil && !math.IsInf(f, 0) {
		return "", fmt.Errorf("number %s: %w", s, err)
	}
	return formatDouble(f), nil
}

// formatDouble is the JSON library's printing of a double (Grisu's
// shortest digits, laid out by its format_buffer).
func formatDouble(f float64) string {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return "null"
	}
	sign := ""
	if math.Signbit(f) {
		sign, f = "-", -f
	}
	if f == 0 {
		return sign + "0.0"
	}
	e := strconv.FormatFloat(f, 'e', -1, 64) // d.ddde±XX
	mant, expS, _ := strings.Cut(e, "e")
	digits := strings.Replace(mant, ".", "", 1)
	exp, _ := strconv.Atoi(expS)
	k, n := len(digits), exp+1 // value = 0.digits × 10^n
	const minExp, maxExp = -4, 15
	switch {
	case k <= n && n <= maxExp:
		return sign + digits + strings.Repeat("0", n-k) + ".0"
	case 0 < n && n <= maxExp:
		return sign + digits[:n] + "." + digits[n:]
	case minExp < n && n <= 0:
		return sign + "0." + strings.Repeat("0", -n) + digits
	}
	m := digits
	if k > 1 {
		m = digits[:1] + "." + digits[1:]
	}
	x := n - 1
	xs := "+"
	if x < 0 {
		xs, x = "-", -x
	}
	return fmt.Sprintf("%s%se%s%02d", sign, m, xs, x)
}

var shVarName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// AttrsShell writes structured attributes as the .attrs.sh that Nix gives
// builders: a bash "declare" for every attribute whose name is a shell
// variable name and whose value is a string, an integral number, null, a
// Boolean, or an array or object of those; other attributes are left out.
func AttrsShell(attrs map[string]any) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(attrs)) {
		if !shVarName.MatchString(k) {
			continue
		}
		v := attrs[k]
		if s, ok := shellSimple(v); ok {
			fmt.Fprintf(&b, "declare %s=%s\n", k, s)
			continue
		}
		switch v := v.(type) {
		case []any:
			var s2 strings.Builder
			good := true
			for _, e := range v {
				s, ok := shellSimple(e)
				if !ok {
					good = false
					break
				}
				s2.WriteString(s + " ")
			}
			if good {
				fmt.Fprintf(&b, "declare -a %s=(%s)\n", k, s2.String())
			}
		case map[string]any:
			var s2 strings.Builder
			good := true
			for _, k2 := range slices.Sorted(maps.Keys(v)) {
				s, ok := shellSimple(v[k2])
				if !ok {
					good = false
					break
				}
				fmt.Fprintf(&s2, "[%s]=%s ", shellEscape(k2), s)
			}
			if good {
				fmt.Fprintf(&b, "declare -A %s=(%s)\n", k, s2.String())
			}
		}
	}
	return b.String()
}

// shellSimple is a simple value in shell syntax. Numbers are written as
// Nix 2.8 writes them: integral ones (judged in single precision) as a C
// int, others not at all.
func shellSimple(v any) (string, bool) {
	switch v := v.(type) {
	case string:
		return shellEscape(v), true
	case nil:
		return "''", true
	case bool:
		if v {
			return "1", true
		}
		return "", true
	case json.Number:
		f, err := strconv.ParseFloat(string(v), 64)
		if err != nil && !math.IsInf(f, 0) {
			return "", false
		}
		if f32 := float32(f); float32(math.Ceil(float64(f32))) != f32 {
			return "", false
		}
		return strconv.Itoa(int(cInt(v, f))), true
	}
	return "", false
}

// cInt converts a JSON number to a C int as Nix's JSON library does: an
// integer is truncated to 32 bits, a double converted as the CPU converts
// it (x86 gives INT_MIN for values out of range, ARM saturates).
func cInt(n json.Number, f float64) int32 {
	if i, err := strconv.ParseInt(string(n), 10, 64); err == nil {
		return int32(i)
	}
	if u, err := strconv.ParseUint(string(n), 10, 64); err == nil {
		return int32(u)
	}
	switch {
	case f > -2147483649 && f < 2147483648:
		return int32(f)
	case runtime.GOARCH == "amd64" || runtime.GOARCH == "386" || math.IsNaN(f):
		return math.MinInt32
	case f > 0:
		return math.MaxInt32
	}
	return math.MinInt32
}

// shellEscape quotes s for a POSIX shell, as Nix's shellEscape: in single
// quotes, each single quote written as '\”.
func shellEscape(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
