package derivation

import (
	"encoding/json"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

func TestHashPlaceholder(t *testing.T) {
	// The value every Nix user meets as `placeholder "out"`.
	if got, want := HashPlaceholder("out"), "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"; got != want {
		t.Errorf("HashPlaceholder(out) = %s, want %s", got, want)
	}
}

func TestAttrsEnv(t *testing.T) {
	d := &Derivation{Env: map[string]string{"list": " a\tb\nc ", "yes": "1", "no": "true", "s": "x"}}
	a, err := d.Attrs("x.drv")
	if err != nil || a.Structured() != nil {
		t.Fatalf("Attrs: %v, structured %v", err, a.Structured())
	}
	if l, ok, _ := a.Strings("list"); !ok || !reflect.DeepEqual(l, []string{"a", "b", "c"}) {
		t.Errorf("list = %q, %v", l, ok)
	}
	if _, ok, _ := a.Strings("missing"); ok {
		t.Error("missing list is set")
	}
	// Only "1" is true in the environment.
	if y, _ := a.Bool("yes", false); !y {
		t.Error("yes is false")
	}
	if n, _ := a.Bool("no", true); n {
		t.Error(`"true" is true`)
	}
	if d, _ := a.Bool("missing", true); !d {
		t.Error("default not used")
	}
}

func TestAttrsStructured(t *testing.T) {
	d := &Derivation{Env: map[string]string{"__json": `{"l":["a","b"],"bad":["a",1],"b":true,"s":"x","n":1}`}}
	a, err := d.Attrs("h-x.drv")
	if err != nil {
		t.Fatal(err)
	}
	if l, ok, err := a.Strings("l"); err != nil || !ok || !reflect.DeepEqual(l, []string{"a", "b"}) {
		t.Errorf("l = %q, %v, %v", l, ok, err)
	}
	if _, _, err := a.Strings("bad"); err == nil || err.Error() != "attribute 'bad' of derivation 'h-x.drv' must be a list of strings" {
		t.Errorf("bad list: %v", err)
	}
	if _, err := a.Bool("s", false); err == nil || !strings.Contains(err.Error(), "must be a Boolean") {
		t.Errorf("string as Boolean: %v", err)
	}
	// As Nix's JSON library: null is an empty object; invalid UTF-8,
	// unpaired surrogates, numbers beyond a double and trailing data are
	// refused.
	if a, err := (&Derivation{Env: map[string]string{"__json": "null"}}).Attrs("h-x.drv"); err != nil || a.Structured() == nil {
		t.Errorf("__json null: %v", err)
	}
	for _, j := range []string{`[1]`, `{"a":`, `{} {}`, `{}]`, "{\"a\":\"\xff\"}", `{"a":"\ud800"}`, `{"a":1e400}`} {
		d := &Derivation{Env: map[string]string{"__json": j}}
		if _, err := d.Attrs("h-x.drv"); err == nil || !strings.HasPrefix(err.Error(), "cannot process __json attribute of 'h-x.drv'") {
			t.Errorf("__json %s: %v", j, err)
		}
	}
}

func TestEncodeJSON(t *testing.T) {
	for in, want := range map[string]string{
		`{"b":1,"a":[true,false,null],"c":{"z":"","y":-0}}`: `{"a":[true,false,null],"b":1,"c":{"y":0,"z":""}}`,
		`"<&>\u2028/\u0001\b\f\n\r\t\"\\é"`:                 "\"<&>\u2028/\\u0001\\b\\f\\n\\r\\t\\\"\\\\é\"",
		`[1.5, 2.0, 1e20, 1e15, 1e14, 0.0001, 1e-5, -0.0, 0.0, 123.456e5, 18446744073709551615, 18446744073709551616, -9223372036854775808]`: `[1.5,2.0,1e+20,1e+15,100000000000000.0,0.0001,1e-05,-0.0,0.0,12345600.0,18446744073709551615,1.8446744073709552e+19,-9223372036854775808]`,
	} {
		dec := json.NewDecoder(strings.NewReader(in))
		dec.UseNumber()
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatal(err)
		}
		got, err := EncodeJSON(v)
		if err != nil || string(got) != want {
			t.Errorf("EncodeJSON(%s) = %s, %v\nwant %s", in, got, err, want)
		}
	}
}

func TestAttrsShell(t *testing.T) {
	dec := json.NewDecoder(strings.NewReader(`{"s":"it's","i":42,"f":1.5,"g":2.0,"big":1e20,"wrap":4294967297,"t":true,"no":false,"n":null,
		"l":["a",1,true,null],"m":{"k'":"v","n":3},"nested":["a",["b"]],"deep":{"a":{}},"bad-name":"x","e":[]}`))
	dec.UseNumber()
	var attrs map[string]any
	if err := dec.Decode(&attrs); err != nil {
		t.Fatal(err)
	}
	want := `declare -a e=()
declare g=2
declare i=42
declare -a l=('a' 1 1 '' )
declare -A m=(['k'\''']='v' ['n']=3 )
declare n=''
declare no=
declare s='it'\''s'
declare t=1
declare wrap=1
`
	// A double out of the range of int: as x86 converts it.
	if runtime.GOARCH == "amd64" {
		want = "declare big=-2147483648\n" + want
	} else {
		delete(attrs, "big")
	}
	if got := AttrsShell(attrs); got != want {
		t.Errorf("AttrsShell:\n%s\nwant:\n%s", got, want)
	}
}

// FuzzEncodeJSON: whatever JSON a derivation holds, EncodeJSON writes
// JSON that reads back as the same values.
func FuzzEncodeJSON(f *testing.F) {
	f.Add(`{"a":[1,2.5,"x\u0000y",null,true],"b":{"c":-1e300}}`)
	f.Add(`"\ud800"`)
	f.Fuzz(func(t *testing.T, in string) {
		// What Attrs accepts must come out of EncodeJSON as the same values.
		a, err := (&Derivation{Env: map[string]string{"__json": `{"v":` + in + `}`}}).Attrs("x.drv")
		if err != nil {
			return
		}
		v := a.Structured()["v"]
		out, err := EncodeJSON(v)
		if err != nil {
			t.Fatalf("EncodeJSON(%q): %v", in, err)
		}
		var want, got any
		if err := json.Unmarshal([]byte(in), &want); err != nil {
			t.Fatalf("Attrs accepted %q, which encoding/json refuses: %v", in, err)
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("EncodeJSON(%q) = %q, not JSON: %v", in, out, err)
		}
		if !reflect.DeepEqual(want, got) {
			t.Fatalf("EncodeJSON(%q) = %q: reads back as %v, want %v", in, out, got, want)
		}
		AttrsShell(map[string]any{"v": v})
	})
}

func TestValues(t *testing.T) {
	for _, c := range []struct {
		in   any
		want []string
		err  bool
	}{
		{nil, []string{}, false},
		{"a", []string{"a"}, false},
		{[]any{"a", "b"}, []string{"a", "b"}, false},
		{map[string]any{"y": "2", "x": "1"}, []string{"1", "2"}, false},
		{[]any{"a", json.Number("1")}, nil, true},
		{json.Number("1"), nil, true},
	} {
		got, err := StringValues(c.in)
		if (err != nil) != c.err || (!c.err && !reflect.DeepEqual(got, c.want)) {
			t.Errorf("StringValues(%v) = %q, %v", c.in, got, err)
		}
	}
}
