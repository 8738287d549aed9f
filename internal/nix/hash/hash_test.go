package hash

import "testing"

func TestParseForms(t *testing.T) {
	empty := Sum(SHA256, nil)
	forms := []string{
		"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
		"sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
		"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
		"sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
	}
	for _, f := range forms {
		h, err := Parse(f)
		if err != nil {
			t.Fatalf("Parse(%q): %v", f, err)
		}
		if !h.Equal(empty) {
			t.Errorf("Parse(%q) = %s", f, h)
		}
	}
	if got := empty.String(); got != forms[1] {
		t.Errorf("String = %s", got)
	}
	if got := empty.SRI(); got != forms[2] {
		t.Errorf("SRI = %s", got)
	}
	h, err := ParseAny("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", SHA256)
	if err != nil || !h.Equal(empty) {
		t.Fatalf("ParseAny base16: %v %v", h, err)
	}
	for _, bad := range []string{"sha256:abc", "md4:00", "e3b0", "sha1:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73")
	f.Add("sha512-AAAA")
	f.Fuzz(func(t *testing.T, s string) {
		h, err := Parse(s)
		if err != nil {
			return
		}
		for _, form := range []string{h.String(), h.SRI(), h.StringBase16()} {
			back, err := Parse(form)
			if err != nil || !back.Equal(h) {
				t.Fatalf("round trip %q -> %q: %v", s, form, err)
			}
		}
	})
}
