// Package realise decides and carries out what it takes to make store
// paths valid, as Nix's queryMissing and buildPaths do for a daemon: a
// valid path is taken as is, an invalid one is substituted from binary
// caches (internal/substitute), and a derivation output that no cache has
// is handed to a Builder.
//
// One Manager serves the whole host. It keeps one Substituter per distinct
// set of upstreams, keys and signature policy, so every connection that
// uses the same caches shares one narinfo cache, one circuit breaker per
// upstream and one single-flight table: any number of clients asking for
// the same path cause one download. A Realiser is one client's view: the
// caches it selected (or none), its temporary-root session and its
// fallback setting.
package realise

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute"
)

// Status is the outcome of one target, numbered as BuildResult's status on
// the wire.
type Status int

// The statuses a Realiser reports (a Builder may report others).
const (
	Built                  Status = 0
	Substituted            Status = 1
	AlreadyValid           Status = 2
	TransientFailure       Status = 6
	MiscFailure            Status = 9
	ResolvesToAlreadyValid Status = 13
	NoSubstituters         Status = 14
)

// Success reports whether s means the target's paths are valid.
func (s Status) Success() bool {
	return s == Built || s == Substituted || s == AlreadyValid || s == ResolvesToAlreadyValid
}

// Result is the outcome of one target.
type Result struct {
	Target   store.DerivedPath
	Status   Status
	ErrorMsg string                    // "" on success
	Outputs  map[string]storepath.Path // output name -> path, for derivation targets
	// DrvHash is the derivation's hash modulo ("sha256:<base16>"), the
	// first half of its outputs' realisation ids; set by
	// RecordRealisations, "" if unknown.
	DrvHash string
	// Stopped: the target failed only because another one failed first
	// and the client did not ask to keep going.
	Stopped bool
	// TimesBuilt, StartTime and StopTime are the build's, for a target
	// that was built (or failed building); zero otherwise.
	TimesBuilt          int
	StartTime, StopTime time.Time
	// NonDeterministic: rounds of a repeated build (repeat) differed.
	NonDeterministic bool
	// noneHad: no cache had the path (NoSubstituters, not a failed fetch).
	noneHad bool
	// told: the cause was told to the client when it happened (a failed
	// download, shown with its activity), so the request's error does not
	// repeat it, as Nix's substitution goals leave no error of their own.
	told bool
}

// Builder builds derivation outputs that no cache has. It is plugged in by
// the build package; nil means nixyard does not build.
type Builder interface {
	// Build realises targets (derivation outputs) and returns one Result
	// per target, in order.
	Build(ctx context.Context, targets []store.DerivedPath, opts BuildOptions) ([]Result, error)
}

// BuildOptions are what the Realiser tells its Builder with a request.
type BuildOptions struct {
	// Session gets temporary roots on the outputs.
	Session *store.Session
	// Substituter, if not nil, is asked for the outputs of the targets'
	// inputs before they are built (the targets' own were looked for
	// already).
	Substituter BuildSubstituter
	// Repair builds the targets again, inputs as usual, and replaces
	// those of their outputs that are missing or damaged (Nix's repair
	// mode): how a damaged output that no cache has is repaired.
	Repair bool
}

// BuildSubstituter is how a Builder reaches a client's binary caches: it
// asks for the outputs of each derivation before building it, as Nix
// does, so that the inputs of a build come from the caches that have them.
type BuildSubstituter interface {
	// Substitute makes paths and the paths they need valid from the
	// caches. ok is false, and nothing is fetched, when the caches do not
	// have all of that (a build, then, as Nix decides); err with ok is a
	// download that failed.
	Substitute(ctx context.Context, paths []storepath.Path) (ok bool, err error)
	// Incomplete reports whether the caches have paths but not all that
	// they refer to, directly or not: what Nix's retrySubstitution is
	// for, where the missing ones are a derivation's inputs, which it
	// builds before it looks again.
	Incomplete(ctx context.Context, paths []storepath.Path) bool
}

// Progress receives the activities of the substitutions a caller waits
// for (see substitute.Progress).
type Progress = substitute.Progress

// Warner is implemented by a Progress whose caller wants to hear of the
// failures a realisation works around, as Nix's warnings: a cache that
// could not be read while deciding whether to substitute or build. Warn
// is called from several goroutines at once.
type Warner interface {
	Warn(err error)
}

// Flusher is implemented by a Progress that delivers events later than
// they happen: Flush returns once every event so far is delivered. The
// Realiser calls it before the Builder starts and after each substitution
// the Builder asks for, so that what the client hears of substitutions
// comes before what it hears of the builds that follow them.
type Flusher interface {
	Flush()
}

// warnEach passes errs to prog's Warn, if it has one.
func warnEach(prog Progress, errs []error) {
	if warn := warnerOf(prog); warn != nil {
		for _, err := range errs {
			warn(err)
		}
	}
}

// warnerOf returns prog's Warn, or nil if it has none.
func warnerOf(prog Progress) func(error) {
	if w, ok := prog.(Warner); ok {
		return w.Warn
	}
	return nil
}

// Config is the daemon's own substitution configuration (nix.conf).
type Config struct {
	Substituters      []string // substituters (extra-substituters merged in)
	TrustedPublicKeys []string
	RequireSigs       bool
	Fallback          bool // build from source when substitution fails
	MaxJobs           int  // max-substitution-jobs, per set of upstreams; default 16
	ConnectTimeout    time.Duration
	PositiveTTL       time.Duration                   // narinfo-cache-positive-ttl; 0: default, < 0: no caching
	NegativeTTL       time.Duration                   // narinfo-cache-negative-ttl
	CAFile            string                          // ssl-cert-file: CAs for https upstreams; "": the system's
	OnFetched         func(narSize uint64, err error) // told of each NAR download that ends (monitoring)
	Logger            *slog.Logger
	// Tune, if set, adjusts each substitute.Config before use (tests).
	Tune func(*substitute.Config)
}

// maxSubstituters bounds the Substituters kept for reuse; clients that
// keep inventing new sets of caches get fresh, unshared ones beyond it.
const maxSubstituters = 64

// Manager is the host-wide state. It is safe for concurrent use.
type Manager struct {
	cfg     Config
	st      *store.Store
	builder Builder
	log     *slog.Logger

	mu   sync.Mutex
	subs map[string]*substitute.Substituter

	hashes *derivation.HashCache // hashes modulo of derivations, for realisations
}

// New checks cfg (every configured substituter must parse) and returns a
// Manager. builder may be nil.
func New(cfg Config, st *store.Store, builder Builder) (*Manager, error) {
	if st == nil {
		return nil, errors.New("realise: nil store")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Manager{cfg: cfg, st: st, builder: builder, log: cfg.Logger, subs: map[string]*substitute.Substituter{},
		hashes: derivation.NewHashCache(0)}
	if _, err := m.substituter(cfg.Substituters, cfg.TrustedPublicKeys); err != nil {
		return nil, fmt.Errorf("realise: substituters: %w", err)
	}
	return m, nil
}

// Settings returns the daemon's configuration.
func (m *Manager) Settings() Config { return m.cfg }

// substituter returns the shared Substituter for upstreams and keys, or
// nil if upstreams is empty.
func (m *Manager) substituter(upstreams, keys []string) (*substitute.Substituter, error) {
	if len(upstreams) == 0 {
		return nil, nil
	}
	key := strings.Join(upstreams, " ") + "\x00" + strings.Join(keys, " ")
	m.mu.Lock()
	defer m.mu.Unlock()
	if s, ok := m.subs[key]; ok {
		return s, nil
	}
	sc := substitute.Config{
		Upstreams:         upstreams,
		StoreDir:          m.st.Dir(),
		TrustedPublicKeys: keys,
		RequireSigs:       m.cfg.RequireSigs,
		MaxJobs:           m.cfg.MaxJobs,
		ConnectTimeout:    m.cfg.ConnectTimeout,
		CAFile:            m.cfg.CAFile,
		PositiveTTL:       m.cfg.PositiveTTL,
		NegativeTTL:       m.cfg.NegativeTTL,
		OnFetched:         m.cfg.OnFetched,
		Logger:            m.log,
	}
	if m.cfg.Tune != nil {
		m.cfg.Tune(&sc)
	}
	s, err := substitute.New(sc, m.st)
	if err != nil {
		return nil, err
	}
	if len(m.subs) < maxSubstituters {
		m.subs[key] = s
	}
	return s, nil
}

// Selection is what one client chose (from SetOptions, already filtered
// for trust by the daemon).
type Selection struct {
	// Substituters replaces the daemon's when not nil; an empty, non-nil
	// list turns caches off.
	Substituters []string
	// ExtraSubstituters are added to them.
	ExtraSubstituters []string
	// TrustedPublicKeys replaces the daemon's when not nil;
	// ExtraTrustedPublicKeys are added.
	TrustedPublicKeys, ExtraTrustedPublicKeys []string
	// NoSubstitutes is useSubstitutes = false.
	NoSubstitutes bool
	// Fallback is the client's tryFallback; the daemon's setting also
	// applies.
	Fallback bool
}

// Realiser is one client's view of the Manager. It is cheap; make one per
// request.
type Realiser struct {
	m        *Manager
	sub      *substitute.Substituter // nil: no caches
	session  *store.Session
	fallback bool
}

// For returns the Realiser for a client's selection; session (may be nil)
// receives the temporary roots of what it fetches.
func (m *Manager) For(sel Selection, session *store.Session) (*Realiser, error) {
	r := &Realiser{m: m, session: session, fallback: sel.Fallback || m.cfg.Fallback}
	if sel.NoSubstitutes {
		return r, nil
	}
	ups := m.cfg.Substituters
	if sel.Substituters != nil {
		ups = sel.Substituters
	}
	ups = dedup(append(slices.Clone(ups), sel.ExtraSubstituters...))
	keys := m.cfg.TrustedPublicKeys
	if sel.TrustedPublicKeys != nil {
		keys = sel.TrustedPublicKeys
	}
	keys = dedup(append(slices.Clone(keys), sel.ExtraTrustedPublicKeys...))
	var err error
	if r.sub, err = m.substituter(ups, keys); err != nil {
		return nil, err
	}
	return r, nil
}

func dedup(ss []string) []string {
	var out []string
	for _, s := range ss {
		if s != "" && !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// HasSubstituters reports whether any cache is in use.
func (r *Realiser) HasSubstituters() bool { return r.sub != nil }

// SubstitutableInfo is what a cache says about a path.
type SubstitutableInfo struct {
	Deriver      storepath.Path
	References   []storepath.Path
	DownloadSize uint64
	NarSize      uint64
}

// QuerySubstitutable returns the narinfos of those of paths that some
// cache has (whether valid locally or not). Lookups run in parallel;
// a failed lookup counts as "not there" and is passed to warn (may be nil),
// as is a narinfo that no trusted key signed.
func (r *Realiser) QuerySubstitutable(ctx context.Context, paths []storepath.Path, warn func(error)) (map[storepath.Path]SubstitutableInfo, error) {
	out := map[storepath.Path]SubstitutableInfo{}
	if r.sub == nil {
		return out, nil
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, p := range dedupPaths(paths) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			info, err := r.sub.QueryPathInfo(ctx, p)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				out[p] = SubstitutableInfo{Deriver: info.Deriver, References: info.References, DownloadSize: info.FileSize, NarSize: info.NarSize}
			case errors.Is(err, substitute.ErrUntrusted) && warn != nil:
				warn(err) // as Nix warns: the cache has it, unsigned
			case errors.Is(err, substitute.ErrNotFound), ctx.Err() != nil:
			case warn != nil:
				warn(err)
			}
		}()
	}
	wg.Wait()
	return out, ctx.Err()
}

func dedupPaths(ps []storepath.Path) []storepath.Path {
	seen := map[storepath.Path]bool{}
	var out []storepath.Path
	for _, p := range ps {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// readDerivation reads a valid .drv of the store.
func (r *Realiser) readDerivation(p storepath.Path) (*derivation.Derivation, error) {
	d, err := derivation.ParseFile(r.m.st.RealPath(p))
	if err != nil {
		return nil, fmt.Errorf("reading derivation '%s': %w", r.m.st.Dir().Abs(p), err)
	}
	return d, nil
}

// substitutesAllowed is Nix's ParsedDerivation::substitutesAllowed: the
// allowSubstitutes attribute, true by default (and when it cannot be read).
func substitutesAllowed(d *derivation.Derivation) bool {
	a, err := d.Attrs(d.Name + ".drv")
	if err != nil {
		return true
	}
	ok, err := a.Bool("allowSubstitutes", true)
	return ok || err != nil
}

// wantedOutputs returns the output names t asks for, sorted, and those
// it asks for that d does not have.
func wantedOutputs(t store.DerivedPath, d *derivation.Derivation) (wanted, unknown []string) {
	if t.AllOutputs || len(t.Outputs) == 0 {
		return slices.Sorted(maps.Keys(d.Outputs)), nil
	}
	for _, n := range t.Outputs {
		if _, ok := d.Outputs[n]; !ok {
			unknown = append(unknown, n)
		}
	}
	return t.Outputs, unknown
}

// unknownOutputsError is Nix's error for a request of outputs a
// derivation does not have.
func unknownOutputsError(drv string, unknown []string) string {
	return fmt.Sprintf("derivation '%s' does not have wanted outputs '%s'", drv, strings.Join(unknown, "', '"))
}

// NoCaches returns a Manager without substituters or builder: it answers
// from the store alone.
func NoCaches(st *store.Store) *Manager {
	return &Manager{st: st, log: slog.New(slog.DiscardHandler), subs: map[string]*substitute.Substituter{}}
}
