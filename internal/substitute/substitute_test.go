package substitute

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

func TestRealiseClosureEachCompression(t *testing.T) {
	for _, comp := range compress {
		t.Run(comp, func(t *testing.T) {
			srv := serve(t, fixture(t, comp))
			st := newMemStore()
			s := newSub(t, st, newClock(), []string{srv.URL}, nil)
			var mu sync.Mutex
			var maxDone, expected uint64
			stops := 0
			prog := ProgressFunc(func(e Event) {
				mu.Lock()
				defer mu.Unlock()
				if e.Type == ActCopyPath && e.Path == fixBig && e.Kind == EventProgress {
					maxDone, expected = max(maxDone, e.Done), e.Expected
				}
				if e.Type == ActSubstitute && e.Kind == EventStop {
					if e.Err != nil {
						t.Errorf("substitute %s: %v", e.Path, e.Err)
					}
					stops++
				}
			})
			if err := s.Realise(context.Background(), fixAll[len(fixAll)-1:], prog); err != nil {
				// fixAll is sorted by nix-store -qR: the root comes last.
				t.Fatal(err)
			}
			st.check(t, fixAll)
			if maxDone == 0 || maxDone != expected {
				t.Errorf("CopyPath progress of big: done %d of %d", maxDone, expected)
			}
			if stops != len(fixAll) {
				t.Errorf("%d Substitute stops, want %d", stops, len(fixAll))
			}
			// Everything valid now: a second Realise fetches nothing.
			before := srv.Counts()
			if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
				t.Fatal(err)
			}
			for k, v := range srv.Counts() {
				if strings.HasPrefix(k, "nar/") && v != before[k] {
					t.Errorf("%s fetched again", k)
				}
			}
		})
	}
}

func TestFileUpstream(t *testing.T) {
	cache := fixture(t, "xz")
	st := newMemStore()
	s := newSub(t, st, newClock(), []string{"file://" + cache}, nil)
	if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
		t.Fatal(err)
	}
	st.check(t, fixAll)
}

func TestSignatures(t *testing.T) {
	// Same key name as the signer, another key: the name must not be enough.
	wrongKey := "k1:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
	tests := []struct {
		name    string
		keys    []string
		edit    func(string) string
		wantErr error
	}{
		// Without CA lines the paths are input-addressed: signatures decide.
		{"signed, trusted key", []string{fixPub}, dropPrefix("CA:"), nil},
		{"signed, wrong key", []string{wrongKey}, dropPrefix("CA:"), ErrUntrusted},
		{"unsigned, no CA", []string{fixPub}, both(dropPrefix("CA:"), dropPrefix("Sig:")), ErrUntrusted},
		// Content-addressed paths whose CA computes their path need no signature.
		{"unsigned CA", []string{wrongKey}, dropPrefix("Sig:"), nil},
		// A CA that does not compute the path does not count.
		{"unsigned, CA of another path", []string{wrongKey}, both(dropPrefix("Sig:"), func(l string) string {
			if strings.HasPrefix(l, "CA: text:sha256:") {
				return "CA: text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
			}
			return l
		}), ErrUntrusted},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cache := fixture(t, "zstd")
			editNarinfos(t, cache, tc.edit)
			srv := serve(t, cache)
			st := newMemStore()
			s := newSub(t, st, newClock(), []string{srv.URL}, func(c *Config) {
				c.RequireSigs, c.TrustedPublicKeys = true, tc.keys
			})
			err := s.Realise(context.Background(), []storepathT{fixRoot}, nil)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				st.check(t, fixAll)
				return
			}
			if !errors.Is(err, tc.wantErr) || !errors.Is(err, ErrNotFound) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			for k, v := range srv.Counts() {
				if strings.HasPrefix(k, "nar/") && v > 0 {
					t.Errorf("untrusted NAR %s downloaded", k)
				}
			}
		})
	}
}

func dropPrefix(prefix string) func(string) string {
	return func(l string) string {
		if strings.HasPrefix(l, prefix) {
			return ""
		}
		return l
	}
}

func both(f, g func(string) string) func(string) string {
	return func(l string) string {
		if l = f(l); l == "" {
			return ""
		}
		return g(l)
	}
}

func setPriority(t *testing.T, cache string, prio string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(cache, "nix-cache-info"), []byte("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: "+prio+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func narGets(srv *cachetest.Server) int {
	n := 0
	for k, v := range srv.Counts() {
		if strings.HasPrefix(k, "nar/") {
			n += v
		}
	}
	return n
}

func TestPriorities(t *testing.T) {
	ca, cb := fixture(t, "zstd"), fixture(t, "xz")
	setPriority(t, ca, "50")
	setPriority(t, cb, "10")
	a, b := serve(t, ca), serve(t, cb)

	st := newMemStore()
	s := newSub(t, st, newClock(), []string{a.URL, b.URL}, nil)
	if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
		t.Fatal(err)
	}
	st.check(t, fixAll)
	if narGets(a) != 0 || narGets(b) != len(fixAll) {
		t.Errorf("NAR GETs: a=%d b=%d, want 0 and %d (b has the lower priority)", narGets(a), narGets(b), len(fixAll))
	}

	// ?priority= in the URL overrides nix-cache-info.
	st2 := newMemStore()
	s2 := newSub(t, st2, newClock(), []string{a.URL + "?priority=5", b.URL}, nil)
	info, err := s2.QueryPathInfo(context.Background(), fixRoot)
	if err != nil {
		t.Fatal(err)
	}
	if info.Upstream != a.URL || info.Compression != "zstd" {
		t.Errorf("info from %s (%s), want %s", info.Upstream, info.Compression, a.URL)
	}
}

func TestStoreDirMismatch(t *testing.T) {
	cache := fixture(t, "none")
	os.WriteFile(filepath.Join(cache, "nix-cache-info"), []byte("StoreDir: /gnu/store\n"), 0o644)
	srv := serve(t, cache)
	s := newSub(t, newMemStore(), newClock(), []string{srv.URL}, nil)
	// The lookup that read nix-cache-info says why the cache is skipped
	// (the client's warning, in Nix's words); later ones find it disabled.
	want := fmt.Sprintf("binary cache '%s' is for Nix stores with prefix '/gnu/store', not '/nix/store'", srv.URL)
	if _, err := s.QueryPathInfo(context.Background(), fixRoot); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("err = %v, want %q", err, want)
	}
	if _, err := s.QueryPathInfo(context.Background(), fixRoot); !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound (upstream disabled)", err)
	}
	if n := srv.Count(fixRoot.HashPart() + ".narinfo"); n != 0 {
		t.Errorf("narinfo asked %d times of a cache with another store dir", n)
	}
}

func TestFaultsRetried(t *testing.T) {
	tests := []struct {
		name   string
		inject func(srv *cachetest.Server, bigNar string)
		edit   func(*Config)
		// NAR GETs of big expected, and sleeps expected (nil: don't check)
		bigGets int
		sleeps  []time.Duration
	}{
		{"reset mid-body", func(s *cachetest.Server, n string) {
			s.Inject(n, cachetest.Fault{ResetAfter: 100_000})
		}, nil, 2, nil},
		{"truncated body", func(s *cachetest.Server, n string) {
			s.Inject(n, cachetest.Fault{CutAfter: 700_000}, cachetest.Fault{CutAfter: 10})
		}, nil, 3, nil},
		{"truncated body of unknown length", func(s *cachetest.Server, n string) {
			s.Inject(n, cachetest.Fault{CutAfter: 700_000, Unmeasured: true})
		}, nil, 2, nil},
		{"500s then success", func(s *cachetest.Server, n string) {
			s.Inject("*.narinfo", cachetest.Fault{Status: 500}, cachetest.Fault{Status: 502})
			s.Inject(n, cachetest.Fault{Status: 503})
		}, nil, 2, nil},
		{"429 honours Retry-After", func(s *cachetest.Server, n string) {
			s.Inject(n, cachetest.Fault{Status: 429, RetryAfter: "7"})
		}, nil, 2, []time.Duration{7 * time.Second}},
		{"slow first byte", func(s *cachetest.Server, n string) {
			s.Inject(n, cachetest.Fault{Delay: time.Minute})
		}, func(c *Config) { c.FirstByteTimeout = time.Second }, 2, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cache := fixture(t, "zstd")
			srv := serve(t, cache)
			bigNar := narOf(t, cache, fixBig)
			tc.inject(srv, bigNar)
			st := newMemStore()
			clk := newClock()
			s := newSub(t, st, clk, []string{srv.URL}, tc.edit)
			if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
				t.Fatal(err)
			}
			st.check(t, fixAll)
			if n := srv.Count(bigNar); n != tc.bigGets {
				t.Errorf("big NAR fetched %d times, want %d", n, tc.bigGets)
			}
			sl := clk.Sleeps()
			if len(sl) == 0 {
				t.Error("no backoff sleep")
			}
			for _, d := range sl {
				if d <= 0 || d > 30*time.Second {
					t.Errorf("sleep %v out of range", d)
				}
			}
			if tc.sleeps != nil && (len(sl) != len(tc.sleeps) || sl[0] != tc.sleeps[0]) {
				t.Errorf("sleeps %v, want %v", sl, tc.sleeps)
			}
		})
	}
}

// TestUnmeasuredBodies: NARs sent without their length (chunked) are
// fetched once each when whole: only one that ends before its NAR does is
// tried again (TestFaultsRetried).
func TestUnmeasuredBodies(t *testing.T) {
	cache := fixture(t, "zstd")
	srv := serve(t, cache)
	srv.Always("nar/*", cachetest.Fault{Unmeasured: true})
	st := newMemStore()
	clk := newClock()
	s := newSub(t, st, clk, []string{srv.URL}, nil)
	if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
		t.Fatal(err)
	}
	st.check(t, fixAll)
	if n := srv.Count(narOf(t, cache, fixBig)); n != 1 {
		t.Errorf("big NAR fetched %d times, want 1", n)
	}
	if sl := clk.Sleeps(); len(sl) != 0 {
		t.Errorf("backoff sleeps %v, want none", sl)
	}
}

func TestRetryAfterAboveCapFailsOver(t *testing.T) {
	ca, cb := fixture(t, "zstd"), fixture(t, "xz")
	a, b := serve(t, ca), serve(t, cb)
	a.Always("nar/*", cachetest.Fault{Status: 429, RetryAfter: "3600"})
	clk := newClock()
	st := newMemStore()
	s := newSub(t, st, clk, []string{a.URL + "?priority=1", b.URL + "?priority=2"}, nil)
	if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
		t.Fatal(err)
	}
	st.check(t, fixAll)
	for _, d := range clk.Sleeps() {
		if d >= time.Hour {
			t.Errorf("slept %v for a Retry-After above the cap", d)
		}
	}
}

func TestWrongHashNeverRegistered(t *testing.T) {
	cache := fixture(t, "none")
	srv := serve(t, cache)
	bigNar := narOf(t, cache, fixBig)
	srv.Always(bigNar, cachetest.Fault{FlipByte: 1_000_000})
	st := newMemStore()
	s := newSub(t, st, newClock(), []string{srv.URL}, nil)
	err := s.Realise(context.Background(), []storepathT{fixRoot}, nil)
	if err == nil {
		t.Fatal("corrupt NAR accepted")
	}
	if !strings.Contains(err.Error(), "hash mismatch") {
		t.Errorf("error does not say the hash differs: %v", err)
	}
	if ok, _ := st.IsValidPath(context.Background(), fixBig); ok {
		t.Error("corrupt path registered")
	}
	if ok, _ := st.IsValidPath(context.Background(), fixRoot); ok {
		t.Error("referrer of a failed path registered")
	}
	if n := srv.Count(bigNar); n != 1 {
		t.Errorf("corrupt NAR fetched %d times, want 1 (content errors are not retried)", n)
	}
}

func TestMissingNar(t *testing.T) {
	ca, cb := fixture(t, "zstd"), fixture(t, "xz")
	bigNar := narOf(t, ca, fixBig)
	os.Remove(filepath.Join(ca, bigNar))
	a := serve(t, ca)

	// Alone: Nix's error, naming the NAR as the narinfo does.
	s := newSub(t, newMemStore(), newClock(), []string{a.URL}, nil)
	err := s.Realise(context.Background(), []storepathT{fixRoot}, nil)
	if err == nil || !strings.Contains(hint.Strip(err.Error()), "file '"+bigNar+"' does not exist in binary cache '"+a.URL+"'") {
		t.Fatalf("err = %v, want a missing-NAR error naming the NAR", err)
	}

	// With a second upstream: it is used.
	b := serve(t, cb)
	st := newMemStore()
	s = newSub(t, st, newClock(), []string{a.URL + "?priority=1", b.URL + "?priority=2"}, nil)
	if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
		t.Fatal(err)
	}
	st.check(t, fixAll)
	if narGets(b) != 1 {
		t.Errorf("second upstream served %d NARs, want 1 (only big)", narGets(b))
	}
}

// deadUpstream accepts connections and closes them at once, counting them.
func deadUpstream(t *testing.T) (string, *atomic.Int64) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	return "http://" + ln.Addr().String(), &n
}

func TestDeadUpstreamBreaker(t *testing.T) {
	dead, conns := deadUpstream(t)
	live := serve(t, fixture(t, "zstd"))
	clk := newClock()
	st := newMemStore()
	s := newSub(t, st, clk, []string{dead + "?priority=1", live.URL + "?priority=2"}, func(c *Config) {
		c.BreakerThreshold, c.BreakerCooldown, c.MaxAttempts = 3, time.Minute, 5
	})
	if err := s.Realise(context.Background(), []storepathT{fixRoot}, nil); err != nil {
		t.Fatal(err)
	}
	st.check(t, fixAll)
	n := conns.Load()
	if n == 0 || n > 3 {
		t.Errorf("dead upstream contacted %d times, want 1..3 (breaker threshold)", n)
	}
	sleeps := len(clk.Sleeps())

	// The breaker is open: more lookups skip the dead upstream without waiting.
	for _, p := range fixAll {
		s.cfg.NegativeTTL = -1
		if _, err := s.QueryPathInfo(context.Background(), p); err != nil {
			t.Fatal(err)
		}
	}
	if conns.Load() != n || len(clk.Sleeps()) != sleeps {
		t.Errorf("open breaker: %d more connections, %d more sleeps", conns.Load()-n, len(clk.Sleeps())-sleeps)
	}

	// After the cool-down the upstream is tried again.
	clk.Advance(2 * time.Minute)
	s.QueryPathInfo(context.Background(), fixBig)
	if conns.Load() == n {
		t.Error("dead upstream not retried after the cool-down")
	}
}

func TestConcurrentRealiseFetchesOnce(t *testing.T) {
	cache := fixture(t, "xz")
	srv := serve(t, cache)
	// Slow the first byte of every NAR a little so the callers overlap.
	srv.Always("nar/*", cachetest.Fault{Delay: 50 * time.Millisecond})
	st := newMemStore()
	s := newSub(t, st, newClock(), []string{srv.URL}, nil)
	var wg sync.WaitGroup
	var events [8]atomic.Int64
	errs := make([]error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.Realise(context.Background(), []storepathT{fixRoot}, ProgressFunc(func(e Event) {
				if e.Type == ActSubstitute && e.Kind == EventStop {
					events[i].Add(1)
				}
			}))
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("caller %d: %v", i, err)
		}
	}
	st.check(t, fixAll)
	for k, v := range srv.Counts() {
		if strings.HasPrefix(k, "nar/") && v != 1 {
			t.Errorf("%s fetched %d times, want 1", k, v)
		}
	}
	got := 0
	for i := range events {
		got += int(events[i].Load())
	}
	if got < len(fixAll) {
		t.Errorf("callers saw %d Substitute stops, want at least %d", got, len(fixAll))
	}
}

func TestNarinfoCacheTTL(t *testing.T) {
	srv := serve(t, fixture(t, "none"))
	clk := newClock()
	s := newSub(t, newMemStore(), clk, []string{srv.URL}, func(c *Config) {
		c.NegativeTTL, c.PositiveTTL = time.Hour, 24*time.Hour
	})
	ctx := context.Background()
	absent := fixRoot.HashPart()[:31] + "z" // same shape, another hash
	p, err := storepathParseBase(absent + "-c")
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := s.QueryPathInfo(ctx, p); !errors.Is(err, ErrNotFound) {
			t.Fatalf("err = %v, want ErrNotFound", err)
		}
		if _, err := s.QueryPathInfo(ctx, fixRoot); err != nil {
			t.Fatal(err)
		}
	}
	if n, m := srv.Count(absent+".narinfo"), srv.Count(fixRoot.HashPart()+".narinfo"); n != 1 || m != 1 {
		t.Errorf("narinfo GETs: miss %d, hit %d; want 1 and 1 (cached)", n, m)
	}
	clk.Advance(61 * time.Minute)
	s.QueryPathInfo(ctx, p)
	s.QueryPathInfo(ctx, fixRoot)
	if n, m := srv.Count(absent+".narinfo"), srv.Count(fixRoot.HashPart()+".narinfo"); n != 2 || m != 1 {
		t.Errorf("after the negative TTL: miss %d, hit %d; want 2 and 1", n, m)
	}
	clk.Advance(24 * time.Hour)
	s.QueryPathInfo(ctx, fixRoot)
	if m := srv.Count(fixRoot.HashPart() + ".narinfo"); m != 2 {
		t.Errorf("after the positive TTL: hit fetched %d times, want 2", m)
	}
}

func TestQueryMissing(t *testing.T) {
	srv := serve(t, fixture(t, "zstd"))
	st := newMemStore()
	st.valid[fixBig] = true
	s := newSub(t, st, newClock(), []string{srv.URL}, nil)
	absent, _ := storepathParseBase("00000000000000000000000000000000-nope")
	m, err := s.QueryMissing(context.Background(), []storepathT{fixRoot, absent})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.WillSubstitute) != len(fixAll)-1 || m.WillSubstitute[fixBig] != nil {
		t.Errorf("WillSubstitute = %v, want the closure without big", m.WillSubstitute)
	}
	if len(m.Unknown) != 1 || m.Unknown[0] != absent {
		t.Errorf("Unknown = %v", m.Unknown)
	}
	var nar uint64
	for _, i := range m.WillSubstitute {
		nar += i.NarSize
	}
	if m.NarSize != nar || m.DownloadSize == 0 || m.DownloadSize > nar*2 {
		t.Errorf("sizes: nar %d download %d", m.NarSize, m.DownloadSize)
	}
	if err := s.Realise(context.Background(), []storepathT{absent}, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("Realise of an absent path: %v", err)
	}
}

func TestRealiseMissingEachStopsOnlyReferrers(t *testing.T) {
	ca := fixture(t, "zstd")
	bigNar := narOf(t, ca, fixBig)
	os.Remove(filepath.Join(ca, bigNar))
	srv := serve(t, ca)
	byName := map[string]storepathT{}
	for _, p := range fixAll {
		byName[p.Name()] = p
	}
	a, b := byName["a"], byName["b"]

	st := newMemStore()
	s := newSub(t, st, newClock(), []string{srv.URL}, nil)
	ctx := context.Background()
	m, err := s.QueryMissing(ctx, []storepathT{fixRoot, b})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.WillSubstitute) != len(fixAll) {
		t.Fatalf("QueryMissing: %d paths to substitute, want %d", len(m.WillSubstitute), len(fixAll))
	}
	failed, err := s.RealiseMissingEach(ctx, m, nil)
	if err != nil {
		t.Fatal(err)
	}
	// big fails; c, which references it, fails with big's error and is
	// never fetched; a and b, which do not need big, are fetched.
	for _, p := range []storepathT{fixBig, fixRoot} {
		if err := failed[p]; err == nil || !strings.Contains(err.Error(), "does not exist in binary cache") {
			t.Errorf("error of %s = %v, want the missing-NAR error of big", p, err)
		}
	}
	if len(failed) != 2 {
		t.Errorf("failed = %v, want only big and c", failed)
	}
	st.check(t, []storepathT{a, b})
	if n := srv.Counts()[narOf(t, ca, fixRoot)]; n != 0 {
		t.Errorf("the NAR of c was requested %d times, want 0", n)
	}

	// Unknown paths: nothing is fetched.
	m.Unknown = []storepathT{fixBig}
	if _, err := s.RealiseMissingEach(ctx, m, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("with unknown paths: err = %v, want ErrNotFound", err)
	}
}

// slotStore reads each NAR whole, then records how many download slots
// are taken before handing the NAR to the memStore (whose registration
// stands for the store's fsyncs and database transaction).
type slotStore struct {
	*memStore
	sub   *Substituter
	taken []int
}

func (s *slotStore) AddToStoreNar(ctx context.Context, info store.PathInfo, nar io.Reader, opts store.AddOptions) error {
	data, err := io.ReadAll(io.LimitReader(nar, int64(info.NarSize)))
	if err != nil {
		return err
	}
	s.taken = append(s.taken, len(s.sub.slots))
	return s.memStore.AddToStoreNar(ctx, info, bytes.NewReader(data), opts)
}

func TestSlotFreedOnceNarRead(t *testing.T) {
	srv := serve(t, fixture(t, "zstd"))
	var a storepathT
	for _, p := range fixAll {
		if p.Name() == "a" {
			a = p
		}
	}
	st := &slotStore{memStore: newMemStore()}
	st.sub = newSub(t, st, newClock(), []string{srv.URL}, func(c *Config) { c.MaxJobs = 1 })
	if err := st.sub.Realise(context.Background(), []storepathT{a}, nil); err != nil {
		t.Fatal(err)
	}
	st.check(t, []storepathT{a})
	// The only download's slot is free once the store has its whole NAR,
	// before the store has made the path durable and registered it.
	if len(st.taken) != 1 || st.taken[0] != 0 {
		t.Errorf("slots taken after reading the NAR: %v, want [0]", st.taken)
	}
}

// TestLookupActivities checks the QueryPathInfo activities of narinfo
// lookups: the caller whose context carries a Progress gets a start and a
// stop for each lookup it makes, with the narinfo's FileTransfer under it;
// a lookup answered from the narinfo cache reports nothing. The first
// lookup also reads the cache's nix-cache-info, a FileTransfer of its own.
func TestLookupActivities(t *testing.T) {
	srv := serve(t, fixture(t, "xz"))
	s := newSub(t, newMemStore(), newClock(), []string{srv.URL}, nil)
	var mu sync.Mutex
	starts := map[ActivityType]int{}
	open := map[uint64]bool{}
	parents := map[uint64]uint64{}
	types := map[uint64]ActivityType{}
	urls := map[uint64]string{}
	prog := ProgressFunc(func(e Event) {
		mu.Lock()
		defer mu.Unlock()
		switch e.Kind {
		case EventStart:
			starts[e.Type]++
			open[e.ID] = true
			parents[e.ID] = e.Parent
			types[e.ID] = e.Type
			urls[e.ID] = e.URL
			if e.Type == ActQueryPathInfo && (e.Upstream != srv.URL || e.Path != fixRoot) {
				t.Errorf("QueryPathInfo activity for %s on %s, want %s on %s", e.Path, e.Upstream, fixRoot, srv.URL)
			}
		case EventStop:
			if !open[e.ID] {
				t.Errorf("stop of activity %d, which did not start", e.ID)
			}
			delete(open, e.ID)
		}
	})
	ctx := WithProgress(context.Background(), prog)
	if _, err := s.QueryPathInfo(ctx, fixRoot); err != nil {
		t.Fatal(err)
	}
	if starts[ActQueryPathInfo] != 1 || starts[ActFileTransfer] != 2 || len(open) != 0 {
		t.Fatalf("one lookup: %d QueryPathInfo and %d FileTransfer activities, %d left open; want 1, 2, 0",
			starts[ActQueryPathInfo], starts[ActFileTransfer], len(open))
	}
	for id, parent := range parents {
		cacheInfo := urls[id] == srv.URL+"/nix-cache-info"
		if (types[id] == ActFileTransfer && !cacheInfo) != (parent != 0) || parent != 0 && types[parent] != ActQueryPathInfo {
			t.Errorf("activity %d (type %d, %s) has parent %d (type %d); want the narinfo's FileTransfer under the QueryPathInfo, nix-cache-info's apart",
				id, types[id], urls[id], parent, types[parent])
		}
	}
	if _, err := s.QueryPathInfo(ctx, fixRoot); err != nil {
		t.Fatal(err)
	}
	if starts[ActQueryPathInfo] != 1 {
		t.Errorf("a cached narinfo started %d more QueryPathInfo activities", starts[ActQueryPathInfo]-1)
	}
}

// TestForbiddenIsNotThere: a 403 for a narinfo means "not there", as a
// 404 does (S3 answers 403 for a missing key without list rights): not
// retried, not an error, and the next upstream is asked.
func TestForbiddenIsNotThere(t *testing.T) {
	ca, cb := fixture(t, "zstd"), fixture(t, "xz")
	setPriority(t, ca, "10")
	setPriority(t, cb, "50")
	a, b := serve(t, ca), serve(t, cb)
	a.Always("*.narinfo", cachetest.Fault{Status: 403})

	s := newSub(t, newMemStore(), newClock(), []string{a.URL, b.URL}, nil)
	info, err := s.QueryPathInfo(context.Background(), fixRoot)
	if err != nil {
		t.Fatal(err)
	}
	if info.Upstream != b.URL {
		t.Errorf("info from %s, want %s (the first answered 403)", info.Upstream, b.URL)
	}
	if n := a.Count(fixRoot.HashPart() + ".narinfo"); n != 1 {
		t.Errorf("%d GETs of the 403 narinfo, want 1 (not retried)", n)
	}

	only := newSub(t, newMemStore(), newClock(), []string{a.URL}, nil)
	if _, err := only.QueryPathInfo(context.Background(), fixRoot); !errors.Is(err, ErrNotFound) {
		t.Errorf("with only the 403 upstream: err = %v, want ErrNotFound", err)
	}
}

// TestLookupActivitiesJoiner: a caller that joins a lookup another caller
// started sees none of its activities; the one that started it does.
func TestLookupActivitiesJoiner(t *testing.T) {
	srv := serve(t, fixture(t, "xz"))
	narinfo := fixRoot.HashPart() + ".narinfo"
	srv.Inject(narinfo, cachetest.Fault{Delay: 500 * time.Millisecond})
	s := newSub(t, newMemStore(), newClock(), []string{srv.URL}, nil)
	if _, err := s.QueryPathInfo(context.Background(), fixAll[0]); err != nil {
		t.Fatal(err) // nix-cache-info is fetched and cached: only the narinfo is delayed
	}
	var starts [2]atomic.Int32
	query := func(i int) error {
		prog := ProgressFunc(func(e Event) {
			if e.Kind == EventStart && e.Type == ActQueryPathInfo {
				starts[i].Add(1)
			}
		})
		_, err := s.QueryPathInfo(WithProgress(context.Background(), prog), fixRoot)
		return err
	}
	first := make(chan error, 1)
	go func() { first <- query(0) }()
	for srv.Count(narinfo) == 0 {
		time.Sleep(time.Millisecond) // the first lookup is under way, held by the delay
	}
	if err := query(1); err != nil {
		t.Fatal(err)
	}
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if n := srv.Count(narinfo); n != 1 {
		t.Fatalf("%d GETs of the narinfo, want 1 (the second caller joins the first lookup)", n)
	}
	if starts[0].Load() != 1 || starts[1].Load() != 0 {
		t.Errorf("QueryPathInfo activities: %d for the caller that started the lookup, %d for the one that joined it; want 1 and 0",
			starts[0].Load(), starts[1].Load())
	}
}

// TestCAFile: with CAFile naming the authority of an https cache, lookups
// there succeed; with an unreadable CAFile, https lookups fail saying so
// while an http cache still works (as Nix fails only the https transfers).
func TestCAFile(t *testing.T) {
	cache := fixture(t, "none")
	tlsSrv, err := cachetest.NewTLS(cache)
	if err != nil {
		t.Fatal(err)
	}
	defer tlsSrv.Close()
	plain := serve(t, cache)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, tlsSrv.CAPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	good := newSub(t, newMemStore(), newClock(), []string{tlsSrv.URL}, func(c *Config) { c.CAFile = ca })
	if _, err := good.QueryPathInfo(context.Background(), fixRoot); err != nil {
		t.Fatalf("https lookup with the cache's authority: %v", err)
	}
	missing := func(c *Config) { c.CAFile = filepath.Join(t.TempDir(), "none.pem"); c.MaxAttempts = 1 }
	bad := newSub(t, newMemStore(), newClock(), []string{tlsSrv.URL}, missing)
	if _, err := bad.QueryPathInfo(context.Background(), fixRoot); err == nil || !strings.Contains(err.Error(), "certificate authorities") {
		t.Errorf("https lookup with an unreadable CA file: err = %v, want it to name the certificate authorities", err)
	}
	httpOK := newSub(t, newMemStore(), newClock(), []string{plain.URL}, missing)
	if _, err := httpOK.QueryPathInfo(context.Background(), fixRoot); err != nil {
		t.Errorf("http lookup with an unreadable CA file: %v", err)
	}
}

// TestDownloadSlotsShared: each share of callers (a client, a CI job) has
// its own MaxJobs download slots: one whose downloads hang (a slow cache
// edge trickling them) does not hold up another's, as one client's do not
// hold up another's with nix-daemon.
func TestDownloadSlotsShared(t *testing.T) {
	cache := fixture(t, "zstd")
	srv := serve(t, cache)
	held, release := make(chan struct{}), make(chan struct{})
	srv.Inject(narOf(t, cache, fixBig), cachetest.Fault{Held: func() { close(held) }, Release: release})
	var a storepathT
	for _, p := range fixAll {
		if p.Name() == "a" {
			a = p
		}
	}
	st := newMemStore()
	s := newSub(t, st, newClock(), []string{srv.URL}, func(c *Config) { c.MaxJobs = 1 })
	bigDone := make(chan error, 1)
	go func() {
		bigDone <- s.Realise(WithShare(context.Background(), "job a"), []storepathT{fixBig}, nil)
	}()
	<-held // job a's one slot is taken
	ctx, cancel := context.WithTimeout(WithShare(context.Background(), "job b"), time.Minute)
	defer cancel()
	if err := s.Realise(ctx, []storepathT{a}, nil); err != nil {
		t.Fatalf("job b's download, while job a's hangs: %v", err)
	}
	close(release)
	if err := <-bigDone; err != nil {
		t.Fatal(err)
	}
	st.check(t, []storepathT{fixBig, a})
}

// TestUnmeasuredCutShortAlways: a NAR of unknown length that always ends
// short (the cache's file, not a connection) is tried once more, then
// fails as Nix says it ("… is incomplete"), and the cache stays usable for
// the other paths: one path's file does not count the cache broken.
func TestUnmeasuredCutShortAlways(t *testing.T) {
	cache := fixture(t, "zstd")
	srv := serve(t, cache)
	bigNar := narOf(t, cache, fixBig)
	srv.Always(bigNar, cachetest.Fault{CutAfter: 700_000, Unmeasured: true})
	st := newMemStore()
	s := newSub(t, st, newClock(), []string{srv.URL}, func(c *Config) { c.BreakerThreshold = 2 })
	err := s.Realise(context.Background(), []storepathT{fixBig}, nil)
	if err == nil || !strings.Contains(err.Error(), "is incomplete") {
		t.Fatalf("err = %v, want the NAR incomplete", err)
	}
	if n := srv.Count(bigNar); n != 2 {
		t.Errorf("big NAR fetched %d times, want 2 (one more try)", n)
	}
	var a storepathT
	for _, p := range fixAll {
		if p.Name() == "a" {
			a = p
		}
	}
	if err := s.Realise(context.Background(), []storepathT{a}, nil); err != nil {
		t.Errorf("another path from the same cache: %v", err)
	}
}

// TestDownloadSlotsFirstAlwaysRuns: every share may have one download
// under way however full the host's slots are (hanging downloads of
// other jobs, say); the host's slots bound the rest.
func TestDownloadSlotsFirstAlwaysRuns(t *testing.T) {
	srv := serve(t, fixture(t, "zstd"))
	s := newSub(t, newMemStore(), newClock(), []string{srv.URL}, func(c *Config) { c.MaxJobs = 2 })
	acquire := func(share string, wait time.Duration) (func(), error) {
		ctx, cancel := context.WithTimeout(WithShare(context.Background(), share), wait)
		defer cancel()
		return s.acquireSlot(ctx)
	}
	var held []func()
	for _, share := range []string{"a", "b", "c", "d"} { // 4 passes, 4 host slots: full
		for range 2 {
			rel, err := acquire(share, time.Minute)
			if err != nil {
				t.Fatalf("share %s: %v", share, err)
			}
			held = append(held, rel)
		}
	}
	first, err := acquire("e", time.Minute)
	if err != nil {
		t.Fatalf("a share's first download, with the host's slots full: %v", err)
	}
	if _, err := acquire("e", 100*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a share's second download, with the host's slots full: %v, want to wait", err)
	}
	held[1]() // a's second: a host slot
	second, err := acquire("e", time.Minute)
	if err != nil {
		t.Fatalf("once a host slot is free: %v", err)
	}
	first()
	second()
	for i, rel := range held {
		if i != 1 {
			rel()
		}
	}
	if len(s.slots) != 0 || len(s.shares) != 0 {
		t.Errorf("after every release: %d host slots taken, shares %v", len(s.slots), s.shares)
	}
}
