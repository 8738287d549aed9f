package nixbase32

import (
	"bytes"
	"encoding/hex"
	"testing"
)

func TestKnownVectors(t *testing.T) {
	// sha256 of "" as printed by `nix hash to-base32`.
	raw, _ := hex.DecodeString("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
	const want = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
	if got := EncodeToString(raw); got != want {
		t.Fatalf("EncodeToString = %s, want %s", got, want)
	}
	back, err := DecodeString(want)
	if err != nil || !bytes.Equal(back, raw) {
		t.Fatalf("DecodeString = %x, %v", back, err)
	}
}

func TestRejects(t *testing.T) {
	for _, s := range []string{"e", "u", "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7t", "zz"} {
		if _, err := DecodeString(s); err == nil {
			t.Errorf("DecodeString(%q) succeeded", s)
		}
	}
}

func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0xff, 0x00, 0x12})
	f.Fuzz(func(t *testing.T, b []byte) {
		s := EncodeToString(b)
		if len(s) != EncodedLen(len(b)) {
			t.Fatalf("length %d, want %d", len(s), EncodedLen(len(b)))
		}
		back, err := DecodeString(s)
		if err != nil || !bytes.Equal(back, b) {
			t.Fatalf("round trip of %x: %x, %v", b, back, err)
		}
	})
}
