package substitute

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// Store is what a Substituter needs from the local store. Implementations
// must be safe for concurrent use. *store.Store implements it.
type Store interface {
	// IsValidPath reports whether p is registered in the store.
	IsValidPath(ctx context.Context, p storepath.Path) (bool, error)
	// AddToStoreNar reads exactly one NAR from nar, checks it against
	// info (NarHash, NarSize, CA, and signatures if opts.CheckSigs) and
	// registers it atomically; on any error nothing is registered. With
	// opts.Repair a valid path's files are replaced. It must not close
	// nar.
	AddToStoreNar(ctx context.Context, info store.PathInfo, nar io.Reader, opts store.AddOptions) error
}

// Config configures a Substituter. Zero fields get the defaults noted.
type Config struct {
	// Upstreams are binary cache URLs (http://, https://, file://), as in
	// nix.conf substituters; "?priority=N" overrides the cache's own
	// Priority.
	Upstreams []string
	// StoreDir is the logical store directory; upstreams must report the
	// same. Default /nix/store.
	StoreDir storepath.Dir
	// TrustedPublicKeys are "name:base64" ed25519 keys.
	TrustedPublicKeys []string
	// RequireSigs refuses narinfos that no trusted key signed, unless
	// content-addressed (nix.conf require-sigs).
	RequireSigs bool
	// MaxJobs bounds concurrent NAR downloads for each share of callers
	// (max-substitution-jobs; see WithShare), as nix-daemon's bounds each
	// client's; all shares together download at most hostJobs times as
	// many at once. Default 16.
	MaxJobs int
	// ConnectTimeout bounds connection set-up (connect-timeout) on the
	// HTTP client New builds; ignored when HTTPClient is set. Default 0:
	// the system's.
	ConnectTimeout time.Duration
	// FirstByteTimeout bounds the wait for response headers; StallTimeout
	// the wait for more body bytes (stalled-download-timeout). Defaults
	// 60 s and 300 s.
	FirstByteTimeout, StallTimeout time.Duration
	// PositiveTTL and NegativeTTL are how long narinfo hits and misses
	// are remembered (narinfo-cache-positive-ttl / -negative-ttl). Defaults
	// 30 days and 3600 s; negative values disable caching of that kind.
	PositiveTTL, NegativeTTL time.Duration
	// MaxAttempts is the number of tries of one request per upstream.
	// Default 5.
	MaxAttempts int
	// BaseBackoff and MaxBackoff shape the exponential backoff. Defaults
	// 250 ms and 10 s.
	BaseBackoff, MaxBackoff time.Duration
	// MaxRetryAfter caps how long a Retry-After is honoured; a longer one
	// counts as a failure of the upstream. Default 30 s.
	MaxRetryAfter time.Duration
	// BreakerThreshold consecutive failed attempts disable an upstream for
	// BreakerCooldown. Defaults 5 and 60 s (Nix disables a failing
	// substituter for 60 s).
	BreakerThreshold int
	BreakerCooldown  time.Duration
	// MaxCachedNarinfos bounds the narinfo cache. Default 100000.
	MaxCachedNarinfos int

	// CAFile is a PEM file of the certificate authorities trusted for
	// https upstreams, in place of the system's (ssl-cert-file); "" means
	// the system's. Ignored when HTTPClient is set.
	CAFile string

	// OnFetched, if set, is told of each path fetched (once, however many
	// callers wait for it): its NAR size, or the error it failed with
	// after every upstream was tried; not of a fetch its callers gave up
	// (for monitoring).
	OnFetched func(narSize uint64, err error)

	HTTPClient *http.Client
	Logger     *slog.Logger
	Now        func() time.Time
	Sleep      func(ctx context.Context, d time.Duration) error
	Rand       *rand.Rand // jitter; default seeded randomly
}

// Substituter fetches paths from upstream binary caches into a Store. It
// is safe for concurrent use; all callers share its narinfo cache, its
// single-flight tables and its download slots.
type Substituter struct {
	cfg    Config
	st     Store
	keys   []signature.PublicKey
	client *http.Client
	caErr  error // Config.CAFile could not be loaded: https transfers fail with it
	log    *slog.Logger
	ups    []*upstream // in configuration order

	randMu sync.Mutex
	actID  atomic.Uint64
	slots  chan struct{} // the host's download slots (see acquireSlot)

	sharesMu sync.Mutex
	shares   map[string]*shareSlots // by WithShare's key

	cacheMu sync.Mutex
	cache   map[string]cacheEntry // upstream base + "/" + hash part
	// gone are the paths whose narinfo an upstream has but whose NAR it
	// did not (upstream base + "/" + hash part, until when they count as
	// not there): see markGone.
	gone map[string]time.Time

	infoFlights group[*Info]
	narFlights  group[struct{}]
	initFlights group[struct{}]
}

type cacheEntry struct {
	info    *Info // nil: a cached miss
	at      time.Time
	expires time.Time
}

// NarinfoTTLs are one caller's narinfo-cache-positive-ttl and
// narinfo-cache-negative-ttl (a trusted client's settings): a cached
// narinfo, or miss, older than its TTL is looked up again for that
// caller. A negative TTL leaves the Config's in force.
type NarinfoTTLs struct{ Positive, Negative time.Duration }

type ttlsKey struct{}

// WithNarinfoTTLs returns ctx carrying t for the lookups made on its
// behalf.
func WithNarinfoTTLs(ctx context.Context, t NarinfoTTLs) context.Context {
	return context.WithValue(ctx, ttlsKey{}, t)
}

// A ConnNarinfos keeps the narinfos that file:// caches gave one client
// connection's lookups, and their misses, for the narinfo cache's TTLs.
// The daemon-wide cache skips file:// caches, so that a path written there
// (by another host's push, say) is seen by the next connection; within
// one connection a path's narinfo is read once, as nix-daemon, whose
// store objects live as long as the connection, reads it. Safe for
// concurrent use.
type ConnNarinfos struct {
	mu sync.Mutex
	m  map[string]cacheEntry // upstream base + "/" + store path
}

type connNarinfosKey struct{}

// WithConnNarinfos returns ctx carrying c for the lookups made on its
// behalf.
func WithConnNarinfos(ctx context.Context, c *ConnNarinfos) context.Context {
	return context.WithValue(ctx, connNarinfosKey{}, c)
}

// connNarinfos returns ctx's ConnNarinfos, or nil.
func connNarinfos(ctx context.Context) *ConnNarinfos {
	c, _ := ctx.Value(connNarinfosKey{}).(*ConnNarinfos)
	return c
}

func (c *ConnNarinfos) get(key string) (cacheEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	return e, ok
}

// maxConnNarinfos bounds a ConnNarinfos, as Nix's path-info-cache-size
// bounds its per-store cache.
const maxConnNarinfos = 65536

func (c *ConnNarinfos) put(key string, e cacheEntry, now time.Time) {
	if !e.expires.After(now) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxConnNarinfos {
		c.m = make(map[string]cacheEntry)
	}
	c.m[key] = e
}

// usable reports whether a cached entry may answer a lookup made on
// ctx's behalf at now.
func (e cacheEntry) usable(ctx context.Context, now time.Time) bool {
	if !now.Before(e.expires) {
		return false
	}
	t, ok := ctx.Value(ttlsKey{}).(NarinfoTTLs)
	if !ok {
		return true
	}
	limit := t.Positive
	if e.info == nil {
		limit = t.Negative
	}
	return limit < 0 || now.Sub(e.at) < limit
}

// New validates cfg and returns a Substituter. No network I/O happens
// until the first query.
func New(cfg Config, st Store) (*Substituter, error) {
	if st == nil {
		return nil, errors.New("substitute: nil store")
	}
	if cfg.StoreDir == "" {
		cfg.StoreDir = storepath.DefaultDir
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if cfg.MaxJobs <= 0 {
		cfg.MaxJobs = 16
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = 5
	}
	if cfg.BreakerThreshold <= 0 {
		cfg.BreakerThreshold = 5
	}
	if cfg.MaxCachedNarinfos <= 0 {
		cfg.MaxCachedNarinfos = 100000
	}
	def(&cfg.FirstByteTimeout, 60*time.Second)
	def(&cfg.StallTimeout, 300*time.Second)
	def(&cfg.PositiveTTL, 30*24*time.Hour)
	def(&cfg.NegativeTTL, 3600*time.Second)
	def(&cfg.BaseBackoff, 250*time.Millisecond)
	def(&cfg.MaxBackoff, 10*time.Second)
	def(&cfg.MaxRetryAfter, 30*time.Second)
	def(&cfg.BreakerCooldown, 60*time.Second)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Sleep == nil {
		cfg.Sleep = sleepCtx
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	s := &Substituter{
		cfg:    cfg,
		st:     st,
		log:    cfg.Logger,
		slots:  make(chan struct{}, cfg.MaxJobs*hostJobs),
		shares: map[string]*shareSlots{},
		cache:  map[string]cacheEntry{},
	}
	var err error
	if s.keys, err = signature.ParsePublicKeys(cfg.TrustedPublicKeys); err != nil {
		return nil, fmt.Errorf("substitute: trusted-public-keys: %w", err)
	}
	for _, raw := range cfg.Upstreams {
		up, err := newUpstream(raw)
		if err != nil {
			return nil, fmt.Errorf("substitute: %w", err)
		}
		s.ups = append(s.ups, up)
	}
	s.client = cfg.HTTPClient
	if s.client == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.DialContext = (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext
		tr.DisableCompression = true // NARs are compressed already; we want the bytes as stored
		tr.MaxIdleConnsPerHost = cfg.MaxJobs
		if cfg.CAFile != "" {
			// An unreadable bundle fails the https transfers (open), as
			// with Nix, not the daemon or the other caches.
			pool, err := loadCAFile(cfg.CAFile)
			if err != nil {
				s.caErr = err
				s.log.Warn("https caches will fail", "err", err)
				pool = x509.NewCertPool()
			}
			tr.TLSClientConfig = &tls.Config{RootCAs: pool}
		}
		s.client = &http.Client{Transport: tr}
	}
	return s, nil
}

// caPools holds each CA bundle loadCAFile has read (path -> *caPool): a
// Substituter is made for every new set of caches a client picks, and a
// system bundle is hundreds of certificates to parse.
var caPools sync.Map

type caPool struct {
	once sync.Once
	pool *x509.CertPool
	err  error
}

// loadCAFile reads a PEM bundle of certificate authorities, once per path
// for the life of the process.
func loadCAFile(path string) (*x509.CertPool, error) {
	v, _ := caPools.LoadOrStore(path, &caPool{})
	c := v.(*caPool)
	c.once.Do(func() {
		pem, err := os.ReadFile(path)
		if err != nil {
			c.err = fmt.Errorf("reading the certificate authorities for https: %w", err)
			return
		}
		c.pool = x509.NewCertPool()
		if !c.pool.AppendCertsFromPEM(pem) {
			c.pool, c.err = nil, fmt.Errorf("certificate authorities for https: no PEM certificate in %s", path)
		}
	})
	return c.pool, c.err
}

func (s *Substituter) now() time.Time { return s.cfg.Now() }

// upstreams returns the usable upstreams by priority (lower first, then
// configuration order), reading nix-cache-info of those not yet read.
// Upstreams whose breaker is open or whose StoreDir differs are left out.
//
// The error joins the failures of the nix-cache-info reads this call
// waited for (a cache that cannot be reached, or is not one): callers pass
// it on with "not found" so that the client hears why a cache was skipped.
func (s *Substituter) upstreams(ctx context.Context) ([]*upstream, error) {
	err := s.initPending(ctx)
	return s.byPriority(), err
}

// initPending reads, in parallel, the nix-cache-info of each upstream not
// read yet whose breaker lets it through, and joins the failures.
func (s *Substituter) initPending(ctx context.Context) error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, up := range s.ups {
		up.mu.Lock()
		need := !up.inited
		up.mu.Unlock()
		if need && s.allow(up) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// As Nix, the caller that reads an HTTP cache's
				// nix-cache-info first sees its download (talkative).
				prog := &callerProgress{p: ProgressFrom(ctx)}
				defer prog.close()
				_, err := s.initFlights.do(ctx, up.base, nil, func(ctx context.Context, _ *hub) (_ struct{}, err error) {
					if up.fileRoot == "" {
						id, url := s.actID.Add(1), up.urlOf("nix-cache-info")
						prog.Event(Event{Kind: EventStart, Type: ActFileTransfer, ID: id, Upstream: up.base, URL: url})
						defer func() {
							prog.Event(Event{Kind: EventStop, Type: ActFileTransfer, ID: id, Upstream: up.base, URL: url, Err: err})
						}()
					}
					return struct{}{}, s.initUpstream(ctx, up)
				})
				if err != nil && ctx.Err() == nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	return errors.Join(errs...)
}

// byPriority returns the upstreams that may be used, by priority (lower
// first, then configuration order; those not read yet last).
func (s *Substituter) byPriority() []*upstream {
	type cand struct {
		up     *upstream
		uninit bool
		prio   int
	}
	var cs []cand
	for _, up := range s.ups {
		up.mu.Lock()
		bad := up.inited && up.initErr != nil
		prio := up.priority
		uninit := !up.inited
		up.mu.Unlock()
		if bad || !s.allow(up) {
			continue
		}
		cs = append(cs, cand{up, uninit, prio})
	}
	// One whose nix-cache-info could not be read (yet) comes last: its
	// priority is unknown, and it is likely unreachable.
	sort.SliceStable(cs, func(i, j int) bool {
		if cs[i].uninit != cs[j].uninit {
			return !cs[i].uninit
		}
		return cs[i].prio < cs[j].prio
	})
	out := make([]*upstream, len(cs))
	for i, c := range cs {
		out[i] = c.up
	}
	return out
}

// initUpstream reads nix-cache-info. A transport failure leaves the
// upstream uninitialised (tried again next time, default priority); a
// missing file (but in a file:// cache, which Nix would make) or a
// StoreDir mismatch disables it for this Substituter's lifetime, as Nix
// refuses such a cache. It returns the failure.
func (s *Substituter) initUpstream(ctx context.Context, up *upstream) error {
	data, err := s.readSmall(ctx, up, "nix-cache-info", narinfo.MaxCacheInfoSize)
	var ci narinfo.NixCacheInfo
	if err == nil {
		ci, err = narinfo.ParseNixCacheInfo(data)
		if err != nil {
			err = fmt.Errorf("%s/nix-cache-info: %w", up.base, err)
		} else if ci.StoreDir != string(s.cfg.StoreDir) {
			err = fmt.Errorf("binary cache '%s' is for Nix stores with prefix '%s', not '%s'", up.base, ci.StoreDir, s.cfg.StoreDir)
		}
	} else if errors.Is(err, errNotFound) && up.fileRoot != "" {
		// Nix makes a file:// cache's directory and nix-cache-info when it
		// opens one; nixyard only reads it: a cache with Nix's defaults,
		// empty until something is copied there, and left uninitialised,
		// so that the nix-cache-info a copy writes is read (cheap, for a
		// local file).
		return nil
	} else if errors.Is(err, errNotFound) {
		err = fmt.Errorf("%s does not appear to be a binary cache: %w", up.base, err)
	} else {
		s.log.Warn("cannot read nix-cache-info", "upstream", up.base, "err", err)
		if skip := s.skipped(up); skip != nil {
			return skip // in the words later lookups use while it is skipped
		}
		return fmt.Errorf("%s is skipped for now: %w", up.base, err)
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	up.inited, up.initErr = true, err
	if err != nil {
		s.log.Error("upstream disabled", "upstream", up.base, "err", err)
		return err
	}
	up.massQ = ci.WantMassQuery
	if ci.HasPriority && !up.prioSet {
		up.priority = ci.Priority
	}
	return nil
}

// lookup returns up's narinfo for p, from the cache or the network.
// A miss wraps errNotFound.
func (s *Substituter) lookup(ctx context.Context, up *upstream, p storepath.Path) (*Info, error) {
	if s.isGone(up, p) {
		return nil, fmt.Errorf("%s: %s: %w (its NAR is gone)", up.base, p.HashPart(), errNotFound)
	}
	conn := connNarinfos(ctx)
	if up.fileRoot == "" || conn == nil {
		return s.lookupShared(ctx, up, p)
	}
	key := up.base + "/" + p.String()
	now := s.now()
	if e, ok := conn.get(key); ok && e.usable(ctx, now) {
		if e.info == nil {
			return nil, fmt.Errorf("%s: %s.narinfo: %w (read before)", up.base, p.HashPart(), errNotFound)
		}
		return e.info, nil
	}
	info, err := s.lookupShared(ctx, up, p)
	switch {
	case err == nil:
		conn.put(key, s.entry(info, now), now)
	case errors.Is(err, errNotFound):
		conn.put(key, s.entry(nil, now), now)
	}
	return info, err
}

// entry is a cache entry for info (nil: a miss) found at now, with the
// daemon's TTL.
func (s *Substituter) entry(info *Info, now time.Time) cacheEntry {
	ttl := s.cfg.PositiveTTL
	if info == nil {
		ttl = s.cfg.NegativeTTL
	}
	return cacheEntry{info: info, at: now, expires: now.Add(ttl)}
}

// lookupShared returns up's narinfo for p from the daemon-wide cache or
// the network, one flight for all callers.
func (s *Substituter) lookupShared(ctx context.Context, up *upstream, p storepath.Path) (*Info, error) {
	key := up.base + "/" + p.HashPart()
	s.cacheMu.Lock()
	e, ok := s.cache[key]
	s.cacheMu.Unlock()
	if ok && e.usable(ctx, s.now()) {
		if e.info == nil {
			return nil, fmt.Errorf("%s: %s.narinfo: %w (cached)", up.base, p.HashPart(), errNotFound)
		}
		if e.info.StorePath == p {
			return e.info, nil
		}
	}
	// The lookup's activities go to the caller that starts it, as Nix
	// reports a lookup to the client it makes it for; a caller that joins
	// it is like one that finds the narinfo cached, and sees none.
	// The flight may outlive this call (others joined it, or it has not
	// seen the cancellation yet): callerProgress keeps its events from this
	// caller once the call has returned.
	prog := &callerProgress{p: ProgressFrom(ctx)}
	defer prog.close()
	return s.infoFlights.do(ctx, key, nil, func(ctx context.Context, _ *hub) (_ *Info, err error) {
		// As Nix's binary cache store: a QueryPathInfo activity, and the
		// narinfo's download as a FileTransfer activity under it.
		rel := p.HashPart() + ".narinfo"
		url := up.urlOf(rel)
		id, ftID := s.actID.Add(1), s.actID.Add(1)
		prog.Event(Event{Kind: EventStart, Type: ActQueryPathInfo, ID: id, Path: p, Upstream: up.base})
		defer func() {
			prog.Event(Event{Kind: EventStop, Type: ActQueryPathInfo, ID: id, Path: p, Upstream: up.base, Err: err})
		}()
		if up.fileRoot == "" { // a file:// cache's narinfo is read, not downloaded
			prog.Event(Event{Kind: EventStart, Type: ActFileTransfer, ID: ftID, Parent: id, Path: p, Upstream: up.base, URL: url})
		}
		data, err := s.readSmall(ctx, up, rel, narinfo.MaxSize)
		if up.fileRoot == "" {
			prog.Event(Event{Kind: EventStop, Type: ActFileTransfer, ID: ftID, Parent: id, Path: p, URL: url, Err: err})
		}
		if errors.Is(err, errNotFound) {
			s.remember(up, key, nil)
			return nil, err
		}
		if err != nil {
			return nil, err
		}
		ni, err := narinfo.Parse(s.cfg.StoreDir, data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", url, err)
		}
		info := &Info{NarInfo: *ni, Upstream: up.base}
		if info.StorePath.HashPart() != p.HashPart() {
			return nil, fmt.Errorf("%s: narinfo is for %s, not %s", url, info.StorePath, p)
		}
		s.remember(up, key, info)
		if info.StorePath != p {
			return nil, fmt.Errorf("%s: %w (it has %s)", url, errNotFound, info.StorePath)
		}
		return info, nil
	})
}

// remember caches up's narinfo (nil: a miss) under key. As with Nix,
// whose narinfo disk cache is for HTTP caches only, a file:// cache's
// narinfos are read afresh each time: a path written there (by another
// host's push, say) is seen at once.
func (s *Substituter) remember(up *upstream, key string, info *Info) {
	now := s.now()
	e := s.entry(info, now)
	if !e.expires.After(now) || up.fileRoot != "" {
		return
	}
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if len(s.cache) >= s.cfg.MaxCachedNarinfos {
		for k, e := range s.cache {
			if !now.Before(e.expires) {
				delete(s.cache, k)
			}
		}
		for k := range s.cache { // still full: drop arbitrary entries
			if len(s.cache) < s.cfg.MaxCachedNarinfos {
				break
			}
			delete(s.cache, k)
		}
	}
	s.cache[key] = e
}

// goneTTL bounds how long a NAR found missing counts as gone: long enough
// for the request that found it so to decide to build what needs it, and
// short, since a 404 may be passing (a CDN, a cache being filled) and
// every client of the daemon sees the mark.
const goneTTL = time.Minute

// markGone remembers that up has p's narinfo but not its NAR (a 404, or
// S3's 403). As Nix (SubstituteGone), such a path counts as one up does
// not have: lookups say so for goneTTL (or the negative TTL, if shorter;
// not at all if misses are not cached), so that a derivation whose output
// needs it builds it, then fetches the output (see realise's Incomplete).
func (s *Substituter) markGone(up *upstream, p storepath.Path) {
	ttl := min(s.cfg.NegativeTTL, goneTTL)
	if ttl <= 0 {
		return
	}
	now := s.now()
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if s.gone == nil || len(s.gone) >= s.cfg.MaxCachedNarinfos {
		s.gone = map[string]time.Time{}
	}
	s.gone[up.base+"/"+p.HashPart()] = now.Add(ttl)
}

// isGone reports whether markGone's mark on p at up holds.
func (s *Substituter) isGone(up *upstream, p storepath.Path) bool {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	until, ok := s.gone[up.base+"/"+p.HashPart()]
	return ok && s.now().Before(until)
}

// trusted reports whether info may be used under RequireSigs.
func (s *Substituter) trusted(info *Info) bool {
	return !s.cfg.RequireSigs || signedBy(s.cfg.StoreDir, s.keys, info) || contentAddressed(s.cfg.StoreDir, info)
}

// QueryPathInfo returns the narinfo of p from the first upstream by
// priority that has a usable (trusted, if RequireSigs) one. If none has it
// the error wraps ErrNotFound (and ErrUntrusted if only untrusted ones
// exist); if some upstream failed and none had it, the error says why
// and does not wrap ErrNotFound.
func (s *Substituter) QueryPathInfo(ctx context.Context, p storepath.Path) (*Info, error) {
	var errs []error
	ups, initErr := s.upstreams(ctx)
	var untrusted error
	for _, up := range ups {
		info, err := s.lookup(ctx, up, p)
		if errors.Is(err, errNotFound) {
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			errs = append(errs, err)
			continue
		}
		if !s.trusted(info) {
			s.log.Warn("substitute is not signed by a trusted key", "path", p.String(), "upstream", up.base)
			if untrusted == nil {
				untrusted = &untrustedError{path: s.cfg.StoreDir.Abs(p), upstream: up.base}
			}
			continue
		}
		return info, nil
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("querying %s: %w", s.cfg.StoreDir.Abs(p), errors.Join(errs...))
	}
	if untrusted != nil {
		return nil, untrusted
	}
	if initErr != nil {
		// The same words for every path, so that a client's warnings
		// about one cache can be told apart and shown once.
		return nil, initErr
	}
	return nil, fmt.Errorf("%s: %w", s.cfg.StoreDir.Abs(p), ErrNotFound)
}
