package jobs

import (
	"strings"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/config"
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

func TestOptionsFromSettings(t *testing.T) {
	read := func(kv ...string) (Options, error) {
		var s config.Settings
		for i := 0; i < len(kv); i += 2 {
			s.Set(kv[i], kv[i+1])
		}
		return OptionsFromSettings(&s)
	}
	if o, err := read(); err != nil || o.Lease != DefaultLease || o.MaxConns != 0 || o.Depth != 0 {
		t.Errorf("defaults: %+v, %v", o, err)
	}
	if o, err := read("job-lease", "2h", "job-max-connections", "8", "job-namespace-depth", "2"); err != nil ||
		o.Lease != 2*time.Hour || o.MaxConns != 8 || o.Depth != 2 {
		t.Errorf("set: %+v, %v", o, err)
	}
	for _, bad := range [][]string{{"job-max-connections", "0"}, {"job-namespace-depth", "0"}, {"job-namespace-depth", "33"}, {"job-namespace-depth", "deep"}} {
		if _, err := read(bad...); err == nil || !strings.Contains(err.Error(), bad[0]) {
			t.Errorf("%s = %s: %v, want an error naming the setting", bad[0], bad[1], err)
		}
	}
}
