package substitute

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

const sampleNarinfo = `StorePath: /nix/store/8lwdbfh1dibrxqv0j9cc34gm6lb2v8rl-b
URL: nar/1jn5baly8b5jmsc1ky8ir3jh2bc3si8n737v5nax9xp5jx1cz638.nar.zst
Compression: zstd
FileHash: sha256:1jn5baly8b5jmsc1ky8ir3jh2bc3si8n737v5nax9xp5jx1cz638
FileSize: 129
NarHash: sha256:1phha55j801cnfhhx5q0di414g51nxfjjy7l7fvn3v9x34l05lkg
NarSize: 168
References: vmg5na96ajnh1v932j9jdzfc3022vbh9-a
Sig: k1:gEP/fJihZpD5KmM/5ZxcCQGtXi7g6JdF3QH5GzAzbWBBCck0fK/9yHQ5wEwh5kKApFrgZOcAjXe5eyMzW5kwBQ==
CA: text:sha256:0s8059pgs6l7yvi6pkyk9rma365hgx0dmqgv3ixmdkj8s0ymbnfw
`

func TestParseNarinfo(t *testing.T) {
	info, err := parseInfo([]byte(sampleNarinfo))
	if err != nil {
		t.Fatal(err)
	}
	if info.StorePath.String() != "8lwdbfh1dibrxqv0j9cc34gm6lb2v8rl-b" || info.NarSize != 168 || info.FileSize != 129 ||
		len(info.References) != 1 || len(info.Sigs) != 1 || info.Compression != "zstd" {
		t.Errorf("parsed %+v", info)
	}
	if !contentAddressed(storepath.DefaultDir, info) {
		t.Error("CA of a text path built by Nix not recognised")
	}
	noComp := strings.Replace(sampleNarinfo, "Compression: zstd\n", "", 1)
	if info, err := parseInfo([]byte(noComp)); err != nil || info.Compression != "bzip2" {
		t.Errorf("no Compression: %v, %v; want bzip2", info, err)
	}
	for _, bad := range []string{
		strings.Replace(sampleNarinfo, "NarSize: 168", "NarSize: x", 1),
		strings.Replace(sampleNarinfo, "StorePath: /nix/store/", "StorePath: /gnu/store/", 1),
		strings.Replace(sampleNarinfo, "URL: ", "Url: ", 1),
		strings.Replace(sampleNarinfo, "NarHash: sha256:", "NarHash: md5:", 1),
		strings.Replace(sampleNarinfo, "-a\n", "-a bad\n", 1),
		"StorePath: " + strings.Repeat("x", narinfo.MaxSize+10),
	} {
		if _, err := parseInfo([]byte(bad)); err == nil {
			t.Errorf("accepted:\n%.200s", bad)
		}
	}
}

func FuzzParseNarinfo(f *testing.F) {
	f.Add([]byte(sampleNarinfo))
	f.Add([]byte("StorePath: /nix/store/8lwdbfh1dibrxqv0j9cc34gm6lb2v8rl-b\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		info, err := parseInfo(data)
		if err != nil {
			return
		}
		if info.StorePath.IsZero() || info.URL == "" || info.NarSize == 0 || info.Compression == "" {
			t.Fatalf("accepted incomplete narinfo %+v", info)
		}
		signedBy(storepath.DefaultDir, nil, info)
		contentAddressed(storepath.DefaultDir, info)
	})
}

// parseInfo parses a .narinfo in /nix/store as lookup does.
func parseInfo(data []byte) (*Info, error) {
	ni, err := narinfo.Parse(storepath.DefaultDir, data)
	if err != nil {
		return nil, err
	}
	return &Info{NarInfo: *ni}, nil
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"7":                             7 * time.Second,
		"-3":                            0,
		"soon":                          0,
		"Sun, 01 Nov 2026 00:01:00 GMT": time.Minute,
		"Sat, 31 Oct 2026 00:00:00 GMT": 0,
	} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestBackoff(t *testing.T) {
	s, err := New(Config{Rand: rand.New(rand.NewPCG(1, 1))}, newMemStore())
	if err != nil {
		t.Fatal(err)
	}
	for attempt := range 12 {
		d := s.backoff(attempt)
		full := min(s.cfg.BaseBackoff<<attempt, s.cfg.MaxBackoff)
		if d < full/2 || d >= full {
			t.Errorf("attempt %d: backoff %v outside [%v, %v)", attempt, d, full/2, full)
		}
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{
		{Upstreams: []string{"s3://bucket"}},
		{Upstreams: []string{"http://"}},
		{Upstreams: []string{"http://h?priority=x"}},
		{TrustedPublicKeys: []string{"nocolon"}},
		{TrustedPublicKeys: []string{"k:AAAA"}},
	} {
		if _, err := New(cfg, newMemStore()); err == nil {
			t.Errorf("New(%+v) accepted", cfg)
		}
	}
}

func TestProgressGate(t *testing.T) {
	clk := newClock()
	g := newProgressGate(clk.Now)
	const step = progressStep
	for i, c := range []struct {
		advance time.Duration
		n       int64
		final   bool
		want    bool
	}{
		{0, step, false, false},                        // too soon after the start
		{progressInterval, step - 1, false, false},     // too few bytes
		{0, step, false, true},                         // both
		{progressInterval, 2*step - 1, false, false},   // too few bytes since the last
		{0, 3 * step, false, true},                     //
		{progressInterval / 2, 5 * step, false, false}, // too soon since the last
		{0, 5*step + 1, true, true},                    // the last is always sent
		{0, 5*step + 1, true, false},                   // but once
	} {
		clk.Advance(c.advance)
		if got := g.pass(c.n, c.final); got != c.want {
			t.Errorf("step %d: pass(%d, %v) = %v, want %v", i, c.n, c.final, got, c.want)
		}
	}
}

// TestGone: only failures that are all missing NARs count as gone.
func TestGone(t *testing.T) {
	gone := &missingNARError{url: "http://c/nar/x.nar", upstream: "http://c"}
	other := errors.New("connection reset")
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{gone, true},
		{fmt.Errorf("substituting p: %w", errors.Join(gone, gone)), true},
		{fmt.Errorf("substituting p: %w", errors.Join(gone, other)), false},
		{other, false},
		{errors.Join(), false},
	} {
		if got := Gone(tc.err); got != tc.want {
			t.Errorf("Gone(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
