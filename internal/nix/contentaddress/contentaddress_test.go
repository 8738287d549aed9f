package contentaddress

import (
	"testing"

	"github.com/nixyard/nixyard/internal/nix/hash"
)

func TestParseRoundTrip(t *testing.T) {
	for _, s := range []string{
		"fixed:r:sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh",
		"text:sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh",
		"fixed:sha1:0gbv0gnwmzq6bbvzm5z8hdpkwq6c4sgr",
	} {
		ca, err := Parse(s)
		if err != nil {
			t.Fatalf("Parse(%q): %v", s, err)
		}
		if ca.String() != s {
			t.Errorf("String() = %q, want %q", ca.String(), s)
		}
	}
	for _, bad := range []string{"fixed:git:sha1:0gbv0gnwmzq6bbvzm5z8hdpkwq6c4sgr", "text:sha1:0gbv0gnwmzq6bbvzm5z8hdpkwq6c4sgr", "nar:x", "fixed:r:sha256:zz"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
	m, a, err := ParseMethodAlgo("fixed:r:sha1")
	if err != nil || m != NAR || a != hash.SHA1 {
		t.Fatalf("ParseMethodAlgo: %v %v %v", m, a, err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("fixed:r:sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh")
	f.Fuzz(func(t *testing.T, s string) {
		ca, err := Parse(s)
		if err != nil || ca.IsZero() {
			return
		}
		back, err := Parse(ca.String())
		if err != nil || back.String() != ca.String() {
			t.Fatalf("round trip %q: %v", s, err)
		}
	})
}
