package substitute

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// Missing is what QueryMissing finds.
type Missing struct {
	// WillSubstitute are the invalid paths of the closure, with the
	// narinfo that would be used.
	WillSubstitute map[storepath.Path]*Info
	// Unknown are invalid paths no upstream has (their references are
	// not explored).
	Unknown []storepath.Path
	// DownloadSize sums FileSize, NarSize sums NarSize over WillSubstitute.
	DownloadSize, NarSize uint64
	// Errors are the failed lookups behind Unknown paths, other than "not
	// there" (but with "there, unsigned"), for the client's warnings.
	Errors []error
}

// QueryMissing walks the closure of paths through the narinfos'
// References, skipping paths valid in the store (whose closure is valid
// too), and says what substitution would fetch. Lookups run in parallel,
// at most MaxJobs at once. Upstream failures for a path make it Unknown.
func (s *Substituter) QueryMissing(ctx context.Context, paths []storepath.Path) (*Missing, error) {
	m := &Missing{WillSubstitute: map[storepath.Path]*Info{}}
	var errs []error
	err := s.walk(ctx, paths, func(p storepath.Path, info *Info, err error) {
		if err != nil {
			m.Unknown = append(m.Unknown, p)
			if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrUntrusted) {
				errs = append(errs, err)
			}
			return
		}
		m.WillSubstitute[p] = info
		m.DownloadSize += info.FileSize
		m.NarSize += info.NarSize
	})
	if err != nil {
		return nil, err
	}
	storepath.Sort(m.Unknown)
	for _, e := range errs {
		s.log.Warn("path info query failed", "err", e)
	}
	if len(m.Unknown) > 0 {
		// Nix tells each client of a cache it disables: each cache left
		// out is said to this caller (the log said it when it began).
		for _, up := range s.ups {
			if err := s.skipped(up); err != nil {
				errs = append(errs, err)
			}
		}
	}
	m.Errors = errs
	return m, nil
}

// walk calls visit (serially) for every invalid path of the closure with
// its narinfo or the lookup error. It fails only on store errors or
// cancellation. Each path is looked up as soon as a referrer's narinfo
// names it, at most MaxJobs at once: walking level by level instead, each
// level waiting for its slowest lookup, took a tenth of a cold
// substitution's time before the first download could start.
func (s *Substituter) walk(ctx context.Context, roots []storepath.Path, visit func(storepath.Path, *Info, error)) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu   sync.Mutex // guards seen and calls of visit
		seen = map[storepath.Path]bool{}
		sem  = make(chan struct{}, s.cfg.MaxJobs)
		wg   sync.WaitGroup
	)
	var look func(p storepath.Path)
	// look starts the lookup of p unless seen; called with mu held.
	look = func(p storepath.Path) {
		if seen[p] {
			return
		}
		seen[p] = true
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			valid, err := s.st.IsValidPath(ctx, p)
			var info *Info
			var lerr error
			if err == nil && !valid {
				info, lerr = s.QueryPathInfo(ctx, p)
			}
			<-sem
			if err != nil {
				cancel(fmt.Errorf("store: %w", err))
				return
			}
			if valid || ctx.Err() != nil {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if lerr != nil {
				visit(p, nil, lerr)
				return
			}
			visit(p, info, nil)
			for _, r := range info.References {
				look(r)
			}
		}()
	}
	mu.Lock()
	for _, p := range roots {
		look(p)
	}
	mu.Unlock()
	wg.Wait()
	return context.Cause(ctx)
}

// Realise makes paths and their closures valid in the store by
// substitution. References are registered before their referrers; up to
// MaxJobs NARs download at once for each share of callers (WithShare), and
// a path another caller is already fetching is waited for, not fetched
// again. prog (may be nil) receives the activities of every path this call
// waits for. On the first failure the remaining work of this call is
// cancelled (downloads shared with other callers go on for them) and the
// errors are returned.
func (s *Substituter) Realise(ctx context.Context, paths []storepath.Path, prog Progress) error {
	ctx = WithProgress(ctx, prog)
	infos := map[storepath.Path]*Info{}
	var missing []error
	if err := s.walk(ctx, paths, func(p storepath.Path, info *Info, err error) {
		if err != nil {
			missing = append(missing, err)
			return
		}
		infos[p] = info
	}); err != nil {
		return err
	}
	if len(missing) > 0 {
		return fmt.Errorf("cannot substitute: %w", errors.Join(missing...))
	}
	_, err := s.fetchAll(ctx, infos, prog, true)
	return err
}

// RealiseMissing fetches what QueryMissing found, m.WillSubstitute, as
// Realise would, without walking the closure again. It fails without
// fetching anything if m.Unknown is not empty (Realise says why each of
// those is missing). Paths that became valid since QueryMissing are not
// fetched again.
func (s *Substituter) RealiseMissing(ctx context.Context, m *Missing, prog Progress) error {
	if len(m.Unknown) > 0 {
		return s.unknownError(m)
	}
	_, err := s.fetchAll(ctx, m.WillSubstitute, prog, true)
	return err
}

// RealiseMissingEach is RealiseMissing for a caller that asked for several
// paths at once and reports on each: a failure stops only the paths that
// need the failed one (its referrers, recursively), and every path of
// m.WillSubstitute that could not be made valid is in the returned map
// with its error, or with the error of the reference it waited for. The
// error is for what stops everything (cancellation, m.Unknown not empty).
func (s *Substituter) RealiseMissingEach(ctx context.Context, m *Missing, prog Progress) (map[storepath.Path]error, error) {
	if len(m.Unknown) > 0 {
		return nil, s.unknownError(m)
	}
	return s.fetchAll(ctx, m.WillSubstitute, prog, false)
}

func (s *Substituter) unknownError(m *Missing) error {
	return fmt.Errorf("cannot substitute %s (and %d more): %w", s.cfg.StoreDir.Abs(m.Unknown[0]), len(m.Unknown)-1, ErrNotFound)
}

// fetchAll substitutes the paths of infos, each after those of its
// references that are in infos too (the others must be valid), and
// returns the errors by path (a path whose reference failed gets that
// reference's error). With failFast the first failure cancels the rest
// and the error joins the failures; without, independent paths go on and
// the error is only the context's.
func (s *Substituter) fetchAll(ctx context.Context, infos map[storepath.Path]*Info, prog Progress, failFast bool) (map[storepath.Path]error, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(map[storepath.Path]chan struct{}, len(infos))
	for p, info := range infos {
		done[p] = make(chan struct{})
		if prog != nil {
			prog.Event(Event{Kind: EventPlanned, Path: p, NarSize: info.NarSize, FileSize: info.FileSize})
		}
	}
	var (
		mu     sync.Mutex
		errs   []error                      // the paths' own failures
		failed = map[storepath.Path]error{} // including failed references
		wg     sync.WaitGroup
	)
	for p, info := range infos {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(done[p])
			if prog != nil {
				defer prog.Event(Event{Kind: EventSettled, Path: p})
			}
			for _, r := range info.References {
				ch, ok := done[r]
				if !ok || r == p {
					continue // valid already, or a self-reference
				}
				select {
				case <-ch:
				case <-ctx.Done():
					return
				}
				mu.Lock()
				err := failed[r]
				if err != nil {
					failed[p] = err
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
			if err := s.substitute(ctx, p, prog); err != nil {
				mu.Lock()
				failed[p] = err
				if ctx.Err() == nil || !errors.Is(err, context.Canceled) {
					errs = append(errs, err)
				}
				mu.Unlock()
				if failFast {
					cancel()
				}
			}
		}()
	}
	wg.Wait()
	if failFast && len(errs) > 0 {
		return failed, errors.Join(errs...)
	}
	return failed, context.Cause(ctx)
}

// substitute fetches one path whose references are valid, sharing the work
// with concurrent callers.
func (s *Substituter) substitute(ctx context.Context, p storepath.Path, prog Progress) error {
	_, err := s.narFlights.do(ctx, p.String(), prog, func(ctx context.Context, h *hub) (struct{}, error) {
		return struct{}{}, s.fetchPath(ctx, p, h)
	})
	return err
}

// repairKey marks the context of a Repair.
type repairKey struct{}

// Repair fetches the valid path p again from the caches and has the store
// replace its files with it (nix-store --verify --repair): a copy that
// was modified on disk comes back as the cache has it. p's references are
// not fetched.
func (s *Substituter) Repair(ctx context.Context, p storepath.Path) error {
	ctx = context.WithValue(ctx, repairKey{}, true)
	_, err := s.narFlights.do(ctx, "repair "+p.String(), ProgressFrom(ctx), func(ctx context.Context, h *hub) (struct{}, error) {
		return struct{}{}, s.fetchPath(ctx, p, h)
	})
	return err
}

func repairing(ctx context.Context) bool { return ctx.Value(repairKey{}) != nil }

// fetchPath tries the upstreams by priority until one delivers p.
func (s *Substituter) fetchPath(ctx context.Context, p storepath.Path, h *hub) (err error) {
	if ok, err := s.st.IsValidPath(ctx, p); err != nil {
		return fmt.Errorf("store: %w", err)
	} else if ok && !repairing(ctx) {
		return nil
	}
	var narSize uint64
	if f := s.cfg.OnFetched; f != nil {
		defer func() {
			if ctx.Err() == nil {
				f(narSize, err)
			}
		}()
	}

	abs := s.cfg.StoreDir.Abs(p)
	var errs []error
	ups, initErr := s.upstreams(ctx)
	if initErr != nil {
		errs = append(errs, initErr)
	}
	for _, up := range ups {
		info, err := s.lookup(ctx, up, p)
		if errors.Is(err, errNotFound) {
			continue
		}
		if err == nil && !s.trusted(info) {
			err = &untrustedError{path: abs, upstream: up.base}
			s.log.Warn("refusing untrusted substitute", "path", abs, "upstream", up.base)
		}
		if err == nil {
			err = s.fetchNar(ctx, up, info, h)
			if err == nil {
				narSize = info.NarSize
				return nil
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		errs = append(errs, err)
		narURL := ""
		if info != nil {
			narURL = up.urlOf(info.URL)
		}
		s.log.Warn("substitution from upstream failed; trying the next", "path", abs, "upstream", up.base, "nar", narURL, "err", err)
	}
	if len(errs) == 0 {
		return fmt.Errorf("substituting %s: %w", abs, ErrNotFound)
	}
	return fmt.Errorf("substituting %s: %w", abs, errors.Join(errs...))
}

// fetchNar downloads info's NAR from up and streams it into the store,
// retrying broken transfers from the start.
func (s *Substituter) fetchNar(ctx context.Context, up *upstream, info *Info, h *hub) error {
	subID := s.actID.Add(1)
	h.emit(Event{Kind: EventStart, Type: ActSubstitute, ID: subID, Path: info.StorePath, Upstream: up.base, NarSize: info.NarSize, FileSize: info.FileSize})
	// As Nix's copyStorePath: "copying path", once however many tries its
	// download takes, with each try's download under it.
	cpID := s.actID.Add(1)
	h.emit(Event{Kind: EventStart, Type: ActCopyPath, ID: cpID, Parent: subID, Path: info.StorePath, Upstream: up.base, Expected: info.NarSize})
	cutShort := false
	err := s.retry(ctx, up, info.URL, func(ctx context.Context) error {
		release, err := s.acquireSlot(ctx)
		if err != nil {
			return err
		}
		defer release()
		err = s.watchedOpen(ctx, up, info.URL, func(ctx context.Context, b *body, tr *transferReader) error {
			return s.streamInto(ctx, up, info, b, tr, h, cpID, release)
		})
		if cs := (*cutShortError)(nil); errors.As(err, &cs) {
			if cutShort {
				return cs.final // cut short again
			}
			cutShort = true
		}
		return err
	})
	if errors.Is(err, errNotFound) {
		err = &missingNARError{url: info.URL, upstream: up.base}
		s.markGone(up, info.StorePath)
	}
	h.emit(Event{Kind: EventStop, Type: ActCopyPath, ID: cpID, Parent: subID, Path: info.StorePath, Err: err})
	h.emit(Event{Kind: EventStop, Type: ActSubstitute, ID: subID, Path: info.StorePath, Upstream: up.base, Err: err, NarSize: info.NarSize, FileSize: info.FileSize})
	if err != nil && ctx.Err() == nil {
		err = &shownError{err}
	}
	return err
}

// hostJobs is how many shares' worth of downloads (Config.MaxJobs each)
// run at once on the host, beyond each share's first (see acquireSlot).
const hostJobs = 2

// shareSlots are one share's download slots, and how many downloads use
// or wait for them.
type shareSlots struct {
	sem   chan struct{}
	users int
	// passed: one of its downloads runs outside the host's slots.
	passed bool
}

type shareKey struct{}

// WithShare returns ctx saying whose downloads the substitutions made on
// ctx's behalf count with: each share (a client process, a CI job's
// clients) downloads at most Config.MaxJobs NARs at once, as each of
// nix-daemon's clients does, so that one client's many slow downloads do
// not hold up the others'. Calls without a share count together, as one.
// A download shared by several callers counts with the share of the one
// who started it.
func WithShare(ctx context.Context, key string) context.Context {
	return context.WithValue(ctx, shareKey{}, key)
}

// ShareOf returns the share of WithShare, if ctx has one.
func ShareOf(ctx context.Context) (string, bool) {
	key, ok := ctx.Value(shareKey{}).(string)
	return key, ok
}

// acquireSlot waits for one of the download slots of the share of ctx (see
// WithShare), then for one of the host's, unless no other download of
// the share runs outside them: every share may always have one download
// under way, however many the others have (hanging ones, say), and the
// host's slots bound the rest. release (safe to call more than once) gives
// back what it took.
func (s *Substituter) acquireSlot(ctx context.Context) (release func(), err error) {
	key, _ := ShareOf(ctx)
	s.sharesMu.Lock()
	sh := s.shares[key]
	if sh == nil {
		sh = &shareSlots{sem: make(chan struct{}, s.cfg.MaxJobs)}
		s.shares[key] = sh
	}
	sh.users++
	s.sharesMu.Unlock()
	leave := func(passed bool) {
		s.sharesMu.Lock()
		defer s.sharesMu.Unlock()
		if passed {
			sh.passed = false
		}
		if sh.users--; sh.users == 0 {
			delete(s.shares, key)
		}
	}
	select {
	case sh.sem <- struct{}{}:
	case <-ctx.Done():
		leave(false)
		return nil, ctx.Err()
	}
	s.sharesMu.Lock()
	passed := !sh.passed
	sh.passed = true
	s.sharesMu.Unlock()
	if !passed {
		select {
		case s.slots <- struct{}{}:
		case <-ctx.Done():
			<-sh.sem
			leave(false)
			return nil, ctx.Err()
		}
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			if !passed {
				<-s.slots
			}
			<-sh.sem
			leave(passed)
		})
	}, nil
}

// Progress events of one activity, besides its last, are at least
// progressStep bytes and progressInterval apart: every event goes to every
// client waiting for the path, and a client's progress bar needs no more.
// With 8 clients realising 400 paths, writing the events was a tenth of the
// daemon's CPU, and most paths take less than progressInterval.
const (
	progressStep     = 256 << 10
	progressInterval = 100 * time.Millisecond
)

// progressGate picks which running totals of one activity are reported.
type progressGate struct {
	now   func() time.Time
	lastN int64
	lastT time.Time
}

func newProgressGate(now func() time.Time) *progressGate {
	return &progressGate{now: now, lastT: now()}
}

// pass reports whether total n is to be sent; final says it is the
// activity's last.
func (g *progressGate) pass(n int64, final bool) bool {
	if n == g.lastN || (!final && n-g.lastN < progressStep) {
		return false
	}
	t := g.now()
	if !final && t.Sub(g.lastT) < progressInterval {
		return false
	}
	g.lastN, g.lastT = n, t
	return true
}

// streamInto streams one download into the store, under the CopyPath
// activity cpID. It calls downloaded once the store has read the whole
// NAR: the download slot is given back then, while the store makes the
// path durable and registers it (on a cold substitution that wait, fsyncs
// mostly, took more of a slot's time than the download).
func (s *Substituter) streamInto(ctx context.Context, up *upstream, info *Info, b *body, tr *transferReader, h *hub, cpID uint64, downloaded func()) (err error) {
	expected := info.FileSize
	if b.size >= 0 {
		expected = uint64(b.size)
	}
	// The NAR's download under "copying path" (a file:// cache's NAR is
	// read, not downloaded).
	if up.fileRoot == "" {
		ftID := s.actID.Add(1)
		h.emit(Event{Kind: EventStart, Type: ActFileTransfer, ID: ftID, Parent: cpID, Path: info.StorePath, Upstream: up.base, URL: b.url, Expected: expected})
		trGate := newProgressGate(s.now)
		tr.onRead = func(n int64) {
			if trGate.pass(n, expected > 0 && uint64(n) == expected) {
				h.emit(Event{Kind: EventProgress, Type: ActFileTransfer, ID: ftID, Parent: cpID, Path: info.StorePath, URL: b.url, Done: uint64(n), Expected: expected})
			}
		}
		defer func() {
			h.emit(Event{Kind: EventStop, Type: ActFileTransfer, ID: ftID, Parent: cpID, Path: info.StorePath, URL: b.url, Done: uint64(tr.n), Expected: expected, Err: err})
		}()
	}

	dec, release, err := Decompressor(info.Compression, tr)
	if err != nil {
		if tr.err != nil {
			return tr.err
		}
		return fmt.Errorf("%s: %w", b.url, err)
	}
	// Once the store has the whole NAR, the decompressor (and its window
	// buffers) goes back too, not after the store's fsyncs: many paths can
	// be waiting for those at once.
	finished := sync.OnceFunc(func() {
		release()
		downloaded()
	})
	defer finished()
	// The store must see exactly NarSize bytes: a longer stream is cut off
	// here (and fails the store's NAR parse or hash), so a hostile upstream
	// cannot make us read without end. The LimitReader never reads dec
	// again once it has passed NarSize bytes.
	nr := &countReader{r: io.LimitReader(dec, int64(info.NarSize)), gate: newProgressGate(s.now), total: int64(info.NarSize), atTotal: finished, onRead: func(n int64) {
		h.emit(Event{Kind: EventProgress, Type: ActCopyPath, ID: cpID, Path: info.StorePath, Done: uint64(n), Expected: info.NarSize})
	}}
	pi := store.PathInfo{
		Path:       info.StorePath,
		Deriver:    info.Deriver,
		NarHash:    info.NarHash,
		References: info.References,
		NarSize:    info.NarSize,
		Sigs:       info.Sigs,
		CA:         info.CA.String(), // "" when not content-addressed
	}
	// Signatures were checked against our trusted keys before the
	// download; the store verifies NarHash, NarSize and CA as it reads.
	err = s.st.AddToStoreNar(ctx, pi, nr, store.AddOptions{Repair: repairing(ctx)})
	if err == nil {
		return nil
	}
	if tr.err != nil {
		return tr.err // the transfer broke: retry (the store kept nothing)
	}
	if ctx.Err() != nil {
		return err
	}
	final := s.narError(up, info, nr.n, err)
	if tr.endedUnmeasured && nr.n < int64(info.NarSize) {
		// A body sent without its length (chunked) ended before the NAR
		// did: a connection cut cleanly (a proxy, a CDN edge) looks just
		// so, and is tried again once as a broken transfer.
		return &cutShortError{
			retry: transient(fmt.Errorf("%s: the download ended after %d bytes, before its NAR was whole (its length was not given): %w", b.url, tr.n, err)),
			final: final,
		}
	}
	return final
}

// narError is the error of a NAR from up that the store refused with err
// after n bytes of it: in Nix's words, naming the path and the cache.
func (s *Substituter) narError(up *upstream, info *Info, n int64, err error) error {
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		return err
	}
	if n == int64(info.NarSize) {
		// Cut off at NarSize, and the NAR went on: its narinfo is wrong,
		// not the transfer.
		return &saidError{hint.Fmt("size mismatch importing path '%s' from '%s'; specified: %d; got: more", s.cfg.StoreDir.Abs(info.StorePath), up.base, info.NarSize), err}
	}
	return &saidError{hint.Fmt("NAR for '%s' fetched from '%s' is incomplete", s.cfg.StoreDir.Abs(info.StorePath), up.base), err}
}

// cutShortError is a download of unknown length that ended before its
// NAR: tried again once (retry, a transient error), then final, as the
// cache's file rather than the connection is then the likelier cause (and
// a cache is not to be counted broken for one path's file).
type cutShortError struct{ retry, final error }

func (e *cutShortError) Error() string { return e.retry.Error() }
func (e *cutShortError) Unwrap() error { return e.retry }

// countReader reports the running totals that gate passes, the last at
// EOF or total, and calls atTotal (if set) once total bytes have been read.
type countReader struct {
	r       io.Reader
	n       int64
	gate    *progressGate
	onRead  func(n int64)
	total   int64
	atTotal func()
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.gate.pass(c.n, err == io.EOF || c.n == c.total) {
		c.onRead(c.n)
	}
	if c.n == c.total && c.atTotal != nil {
		c.atTotal()
		c.atTotal = nil
	}
	return n, err
}
