package jobs

import (
	"testing"
	"time"
)

func TestParseLease(t *testing.T) {
	for in, want := range map[string]time.Duration{"6h": 6 * time.Hour, "90m": 90 * time.Minute, "3600": time.Hour} {
		if got, err := parseLease(in); err != nil || got != want {
			t.Errorf("parseLease(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1h", "soon", "12x"} {
		if _, err := parseLease(in); err == nil {
			t.Errorf("parseLease(%q) succeeded", in)
		}
	}
}
