package storepath

import (
	"testing"

	"github.com/nixyard/nixyard/internal/nix/hash"
)

func TestParse(t *testing.T) {
	good := "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-busybox-static"
	p, err := DefaultDir.Parse(good)
	if err != nil {
		t.Fatal(err)
	}
	if p.HashPart() != "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz" || p.Name() != "busybox-static" || DefaultDir.Abs(p) != good {
		t.Fatalf("parts of %s wrong", p)
	}
	for _, bad := range []string{
		"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz",
		"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-",
		"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x",
		"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a/b",
		"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-..",
		"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a b",
		"/other/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a",
		"/nix/store/../7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a",
	} {
		if _, err := DefaultDir.Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
}

// The expected paths were computed by Nix 2.8: `nix-store --add-fixed` and
// `builtins.toFile`.
func TestMakePaths(t *testing.T) {
	// nix-store --print-fixed-path sha256 <sha256 of 'hello'> hello
	h, _ := hash.Parse("sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
	p, err := DefaultDir.MakeFixedOutputPath("hello", false, h, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := p.String(), "3fhdhfqli6qm669f7sz8d8v6xz24zrqc-hello"; got != want {
		t.Errorf("flat fixed path = %s, want %s", got, want)
	}
}

// TestCheckNameMessages: a forbidden printable character is named as it
// is; a byte of a UTF-8 sequence or a control character by its value,
// not as the Latin-1 character it would be alone.
func TestCheckNameMessages(t *testing.T) {
	for name, want := range map[string]string{
		"a b":    "name contains forbidden character ' '",
		"\u00fc": `name contains forbidden byte '\xc3'`,
		"a\tb":   `name contains forbidden byte '\x09'`,
	} {
		if err := CheckName(name); err == nil || err.Error() != want {
			t.Errorf("CheckName(%q) = %v, want %q", name, err, want)
		}
	}
}
