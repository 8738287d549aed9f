package cache

// Pushing to a fleet cache. The Pusher keeps a durable queue of paths to
// push (a file per path under its queue directory, written and synced
// before Enqueue returns, removed once the path and its closure are in
// the cache; queued paths are held by temporary roots, so no collection
// takes them first), and a worker that pushes them: for each path of the
// closure, references first, that the cache lacks, the NAR compressed
// as the URL's parameters ask, zstd by default (and checked against the
// path's NAR hash as it is read), then its narinfo, signed with the
// daemon's keys (so that a reader never finds a narinfo whose NAR is
// missing). While the cache cannot be
// reached (or fails), everything waits and is retried with backoff; a path
// the cache refuses is retried on a backoff of its own, the others going
// on meanwhile, and set aside in the queue's failed/ directory after
// maxAttempts refusals. The queue survives restarts.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// maxAttempts is how many times a queued path is tried before it is put
// aside in the queue's failed/ directory.
const maxAttempts = 10

// Pusher pushes queued paths, with their closures, to a Target.
type Pusher struct {
	st     *store.Store
	target Target
	opts   Options
	dir    string
	keys   []signature.SecretKey
	log    *slog.Logger
	wake   chan struct{}

	// OnPushed, if set, is told of each path written to the target.
	OnPushed func()

	// enqMu keeps a path's root and queue entry, as Enqueue makes them,
	// together against releaseUnqueued.
	enqMu sync.Mutex

	mu        sync.Mutex
	infoDone  bool                              // nix-cache-info is in the target
	present   map[string]bool                   // hash parts whose narinfo the target has
	held      map[storepath.Path]*store.Session // temporary roots on queued paths
	notBefore map[storepath.Path]time.Time      // refused paths: when to try again
}

// NewPusher returns a Pusher writing to target as opts asks, whose queue
// is the directory dir (made if missing); paths left in it by an earlier
// run are pushed first (and held from now). Narinfos are signed with keys
// and opts.Keys.
func NewPusher(ctx context.Context, st *store.Store, target Target, opts Options, dir string, keys []signature.SecretKey, log *slog.Logger) (*Pusher, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("push queue: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Pusher{st: st, target: target, opts: opts, dir: dir, keys: slices.Concat(keys, opts.Keys), log: log, wake: make(chan struct{}, 1),
		present: map[string]bool{}, held: map[storepath.Path]*store.Session{}, notBefore: map[storepath.Path]time.Time{}}
	if err := p.HoldQueue(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// HoldQueue holds every path in the queue (NewPusher does, and so must a
// daemon that started while the one before it still pushed the same
// queue, once that one has gone: what it queued meanwhile is held by
// nothing else). Held until pushed, whatever ctx does.
func (p *Pusher) HoldQueue(ctx context.Context) error {
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return fmt.Errorf("push queue: %w", err)
	}
	for _, e := range entries {
		if sp, err := storepath.ParseBase(e.Name()); err == nil {
			p.hold(context.WithoutCancel(ctx), sp)
		} else if strings.HasPrefix(e.Name(), ".nar-") {
			os.Remove(filepath.Join(p.dir, e.Name())) // left by an earlier version's push cut short
		}
	}
	return nil
}

// hold takes a temporary root on a queued path, until it is pushed.
func (p *Pusher) hold(ctx context.Context, sp storepath.Path) {
	p.mu.Lock()
	held := p.held[sp] != nil
	p.mu.Unlock()
	if held {
		return
	}
	// Outside p.mu: taking a root waits for a collection deleting sp.
	ss := p.st.OpenSession()
	if err := ss.AddTempRoot(ctx, sp); err != nil {
		p.log.Warn("cannot hold a queued path", "path", p.st.Dir().Abs(sp), "err", err)
		ss.Close()
		return
	}
	p.mu.Lock()
	if p.held[sp] == nil {
		p.held[sp], ss = ss, nil
	}
	p.mu.Unlock()
	if ss != nil {
		ss.Close() // held meanwhile by another call
	}
}

// release drops the temporary root hold took.
func (p *Pusher) release(sp storepath.Path) {
	p.mu.Lock()
	ss := p.held[sp]
	delete(p.held, sp)
	p.mu.Unlock()
	if ss != nil {
		ss.Close()
	}
}

// Enqueue adds paths to the queue; they are in it, durably, when it
// returns.
func (p *Pusher) Enqueue(ctx context.Context, paths ...storepath.Path) error {
	for _, sp := range paths {
		if err := p.enqueue(ctx, sp); err != nil {
			return fmt.Errorf("push queue: %w", err)
		}
	}
	if err := syncDir(p.dir); err != nil {
		return fmt.Errorf("push queue: syncing %s: %w", p.dir, err)
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
	return nil
}

// Start runs the worker (Run) in the background, once after is closed (at
// once if nil: a daemon still stopping pushes the same queue until then);
// the returned stop ends it and waits for it to end.
func (p *Pusher) Start(ctx context.Context, after <-chan struct{}) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if after != nil {
			select {
			case <-after:
			case <-ctx.Done():
				return
			}
		}
		p.Run(ctx)
	}()
	return func() {
		cancel()
		<-done
	}
}

// enqueue holds sp and writes its queue entry.
func (p *Pusher) enqueue(ctx context.Context, sp storepath.Path) error {
	p.enqMu.Lock()
	defer p.enqMu.Unlock()
	p.hold(ctx, sp)
	f, err := os.OpenFile(filepath.Join(p.dir, sp.String()), os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	return f.Close()
}

// releaseUnqueued drops the roots of held paths whose queue entry is gone:
// pushed, or set aside, by a daemon that pushed the same queue while this
// one started (one still stopping).
func (p *Pusher) releaseUnqueued() {
	p.enqMu.Lock()
	defer p.enqMu.Unlock()
	p.mu.Lock()
	held := slices.Collect(maps.Keys(p.held))
	p.mu.Unlock()
	for _, sp := range held {
		if _, err := os.Lstat(filepath.Join(p.dir, sp.String())); errors.Is(err, os.ErrNotExist) {
			p.release(sp)
		}
	}
}

// EnqueueBuilt queues a build's outputs (build.Config.OnBuilt): a queue
// that cannot be written is logged, and the build stands. The outputs are
// held whether the build's clients are still there or not.
func (p *Pusher) EnqueueBuilt(ctx context.Context, outputs []storepath.Path) {
	if err := p.Enqueue(context.WithoutCancel(ctx), outputs...); err != nil {
		p.log.Warn("cannot queue built outputs for pushing", "err", err)
	}
}

// Run pushes what is queued until ctx ends.
func (p *Pusher) Run(ctx context.Context) {
	failures := 0
	for {
		wait := time.Minute
		if err := p.pushQueued(ctx); err != nil && ctx.Err() == nil {
			failures++
			wait = backoff(failures)
			p.log.Warn("push to the fleet cache failed; retrying", "target", p.target.String(), "in", wait, "err", err)
		} else {
			failures = 0
		}
		wake := p.wake
		if failures > 0 {
			wake = nil // new work waits for the backoff too
			wait += time.Duration(rand.Int64N(int64(wait/4) + 1))
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// backoff is the wait after n failures in a row, of the cache (the
// worker's) or of one path (refused): 2^n seconds, at most 5 minutes.
func backoff(n int) time.Duration {
	return min(time.Duration(1<<min(n, 9))*time.Second, 5*time.Minute)
}

// pushQueued tries every queued path that is due. A path the cache
// refuses (refusedError) is tried again later, after its own backoff,
// and set aside after maxAttempts; any other error is the cache's and
// ends the round (returned, for the worker's backoff), counted against
// no path.
func (p *Pusher) pushQueued(ctx context.Context) error {
	p.releaseUnqueued()
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return fmt.Errorf("push queue: %w", err)
	}
	now := time.Now()
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		name := filepath.Join(p.dir, e.Name())
		sp, err := storepath.ParseBase(e.Name())
		if err != nil {
			continue // the failed/ directory, a compressed NAR being written
		}
		p.mu.Lock()
		due := p.notBefore[sp]
		p.mu.Unlock()
		if now.Before(due) {
			continue
		}
		err = p.Push(ctx, sp)
		var refused *refusedError
		switch {
		case err == nil:
		case errors.Is(err, store.ErrNotValid):
			p.log.Warn("queued for pushing but gone from the store; dropped", "path", p.st.Dir().Abs(sp))
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.As(err, &refused):
			n := p.attempted(name)
			if n < maxAttempts {
				wait := backoff(n)
				p.log.Warn("the cache refused a path; trying it again later", "path", p.st.Dir().Abs(sp), "attempts", n, "in", wait, "err", err)
				p.mu.Lock()
				p.notBefore[sp] = now.Add(wait)
				p.mu.Unlock()
				continue
			}
			if aerr := setAside(p.dir, e.Name()); aerr != nil {
				// Queued still, and rooted: the next round tries again.
				p.log.Error("the cache refused a path too often, and it cannot be set aside; it stays queued", "path", p.st.Dir().Abs(sp), "err", err, "set-aside", aerr)
				p.mu.Lock()
				p.notBefore[sp] = now.Add(backoff(n))
				p.mu.Unlock()
				continue
			}
			p.log.Error("the cache refused a path too often; set aside", "path", p.st.Dir().Abs(sp), "in", filepath.Join(p.dir, "failed"), "err", err)
		default:
			return err
		}
		p.dequeue(sp, name, err == nil || !errors.As(err, &refused))
	}
	return nil
}

// dequeue ends sp's turn in the queue: its entry name goes (if remove; a
// path set aside has gone already), and its root with it, unless an
// Enqueue has queued it again meanwhile.
func (p *Pusher) dequeue(sp storepath.Path, name string, remove bool) {
	p.enqMu.Lock()
	defer p.enqMu.Unlock()
	if remove {
		os.Remove(name)
	}
	p.mu.Lock()
	delete(p.notBefore, sp)
	p.mu.Unlock()
	if _, err := os.Lstat(name); errors.Is(err, os.ErrNotExist) {
		p.release(sp)
	}
}

// setAside moves the queue entry name in dir to dir/failed.
func setAside(dir, name string) error {
	if err := os.MkdirAll(filepath.Join(dir, "failed"), 0o700); err != nil {
		return err
	}
	return os.Rename(filepath.Join(dir, name), filepath.Join(dir, "failed", name))
}

// attempted counts one more failed attempt in the queue entry name and
// returns the count.
func (p *Pusher) attempted(name string) int {
	data, _ := os.ReadFile(name)
	n, _ := strconv.Atoi(strings.TrimSpace(string(data)))
	n++
	os.WriteFile(name, []byte(strconv.Itoa(n)+"\n"), 0o600)
	return n
}

// Push copies sp and its closure to the target now, references first,
// each path the target lacks.
func (p *Pusher) Push(ctx context.Context, sp storepath.Path) error {
	ss := p.st.OpenSession()
	defer ss.Close()
	if err := ss.AddTempRoot(ctx, sp); err != nil {
		return err
	}
	if ok, err := p.st.IsValidPathFresh(ctx, sp); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("pushing %s: %w", p.st.Dir().Abs(sp), store.ErrNotValid)
	}
	closure, err := p.st.QueryClosure(ctx, []storepath.Path{sp})
	if err != nil {
		return err
	}
	order, err := p.st.SortByReferences(ctx, closure)
	if err != nil {
		return err
	}
	if err := p.cacheInfo(ctx); err != nil {
		return err
	}
	for _, q := range order {
		if err := p.pushOne(ctx, q); err != nil {
			return fmt.Errorf("pushing %s to %s: %w", p.st.Dir().Abs(q), p.target, err)
		}
	}
	return nil
}

// cacheInfo writes nix-cache-info once, unless the target has one.
func (p *Pusher) cacheInfo(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.infoDone {
		return nil
	}
	has, err := p.target.Has(ctx, "nix-cache-info")
	if err == nil && !has {
		err = p.putBytes(ctx, "nix-cache-info", "text/x-nix-cache-info", narinfo.NixCacheInfo{StoreDir: string(p.st.Dir())}.Marshal())
	}
	if err != nil {
		return fmt.Errorf("nix-cache-info in %s: %w", p.target, err)
	}
	p.infoDone = true
	return nil
}

// pushOne uploads q's NAR, compressed as p.opts asks, then (if asked) its
// listing and debug info index, then its narinfo, unless the target has
// the narinfo.
func (p *Pusher) pushOne(ctx context.Context, q storepath.Path) error {
	name := q.HashPart() + ".narinfo"
	p.mu.Lock()
	known := p.present[q.HashPart()]
	p.mu.Unlock()
	if known {
		return nil
	}
	if has, err := p.target.Has(ctx, name); err != nil {
		return err
	} else if has {
		p.markPresent(q)
		return nil
	}
	info, err := p.st.QueryPathInfo(ctx, q)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(p.dir, ".nar-")
	if err != nil {
		return err
	}
	// Only its descriptor is used: unlinked at once, it leaves nothing
	// behind a daemon killed mid-push.
	os.Remove(tmp.Name())
	defer tmp.Close()
	size, fileHash, listing, err := p.writeNAR(ctx, info, tmp)
	if err != nil {
		return err
	}
	ni, err := signedNarinfo(p.st.Dir(), info, p.keys)
	if err != nil {
		return &refusedError{fmt.Errorf("content address %q: %w", info.CA, err)}
	}
	ni.URL = "nar/" + fileHash.NixBase32() + ".nar" + narExtension(p.opts.Compression)
	ni.Compression, ni.FileHash, ni.FileSize = p.opts.Compression, fileHash, uint64(size)
	// The same contents make the same NAR file: one sent before (its
	// narinfo failed) is not sent again.
	if has, err := p.target.Has(ctx, ni.URL); err != nil {
		return err
	} else if !has {
		if err := p.target.Put(ctx, ni.URL, ctxReader{ctx, tmp}, size, "application/x-nix-nar"); err != nil {
			return err
		}
	}
	if p.opts.Listing {
		ls, err := listingFile(listing)
		if err != nil {
			return err
		}
		if err := p.putBytes(ctx, q.HashPart()+".ls", "application/json", ls); err != nil {
			return err
		}
	}
	if p.opts.DebugInfo {
		if err := p.indexDebugInfo(ctx, listing, ni.URL); err != nil {
			return err
		}
	}
	if err := p.putBytes(ctx, name, "text/x-nix-narinfo", ni.Marshal(p.st.Dir())); err != nil {
		return err
	}
	p.markPresent(q)
	if p.OnPushed != nil {
		p.OnPushed()
	}
	return nil
}

// writeNAR writes the NAR of the path info describes to f, compressed as
// p.opts asks, and leaves f at its start. It returns the file's size and
// hash, and the NAR's listing if p.opts asks for one or for the debug
// info index (else nil). A NAR that does not hash to info's NAR hash is
// refused.
func (p *Pusher) writeNAR(ctx context.Context, info *store.PathInfo, f *os.File) (size int64, fileHash hash.Hash, listing *nar.Listing, err error) {
	fileSum, narSum := sha256.New(), sha256.New()
	cw, err := p.opts.compressor(io.MultiWriter(f, fileSum))
	if err != nil {
		return 0, hash.Hash{}, nil, err
	}
	if p.opts.Listing || p.opts.DebugInfo {
		listing, err = listWhile(io.MultiWriter(cw, narSum), func(w io.Writer) error {
			return p.st.NarFromPath(ctx, info.Path, ctxWriter{ctx, w})
		})
	} else {
		err = p.st.NarFromPath(ctx, info.Path, ctxWriter{ctx, io.MultiWriter(cw, narSum)})
	}
	if cerr := cw.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, hash.Hash{}, nil, err
	}
	if got := hash.FromHasher(hash.SHA256, narSum); !got.Equal(info.NarHash) {
		return 0, hash.Hash{}, nil, &refusedError{fmt.Errorf("its contents hash to %s, not to the registered %s (run nix-store --verify --check-contents --repair)", got, info.NarHash)}
	}
	size, err = f.Seek(0, io.SeekCurrent)
	if err != nil {
		return 0, hash.Hash{}, nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return 0, hash.Hash{}, nil, err
	}
	return size, hash.FromHasher(hash.SHA256, fileSum), listing, nil
}

func (p *Pusher) putBytes(ctx context.Context, rel, contentType string, body []byte) error {
	return p.target.Put(ctx, rel, bytes.NewReader(body), int64(len(body)), contentType)
}

// listingFile is the HASH.ls file of a NAR with that listing, as Nix
// writes it: {"version":1,"root":LISTING}.
func listingFile(l *nar.Listing) ([]byte, error) {
	root, err := l.MarshalJSON()
	if err != nil {
		return nil, err
	}
	return fmt.Appendf(nil, `{"version":1,"root":%s}`, root), nil
}

// listWhile runs write with a writer that passes what it is given to w
// and lists it as a NAR on the way.
func listWhile(w io.Writer, write func(io.Writer) error) (*nar.Listing, error) {
	pr, pw := io.Pipe()
	type result struct {
		l   *nar.Listing
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := nar.List(bufio.NewReaderSize(pr, 64<<10))
		io.Copy(io.Discard, pr) // after an error, let the rest through
		done <- result{l, err}
	}()
	err := write(io.MultiWriter(w, pw))
	pw.CloseWithError(err)
	r := <-done
	if err != nil {
		return nil, err
	}
	if r.err != nil {
		return nil, &refusedError{fmt.Errorf("listing its NAR: %w", r.err)}
	}
	return r.l, nil
}

// buildIDDir is where a NAR's debug info files are indexed from.
const buildIDDir = "lib/debug/.build-id"

// indexDebugInfo writes, as Nix's index-debug-info does, debuginfo/KEY
// for each lib/debug/.build-id/XX/YYYY.debug file of the listed NAR (KEY
// is XXYYYY.debug, the build ID with its suffix): JSON naming the NAR
// file, relative to debuginfo/, and the member. A key the cache has is
// left as it is.
func (p *Pusher) indexDebugInfo(ctx context.Context, listing *nar.Listing, narURL string) error {
	dir := listing.Lookup(buildIDDir)
	if dir == nil || dir.Type != nar.TypeDirectory {
		return nil
	}
	for _, s1 := range slices.Sorted(maps.Keys(dir.Entries)) {
		sub := dir.Entries[s1]
		if sub.Type != nar.TypeDirectory || !isHex(s1, 2, "") {
			continue
		}
		for _, s2 := range slices.Sorted(maps.Keys(sub.Entries)) {
			if sub.Entries[s2].Type != nar.TypeRegular || !isHex(s2, 38, ".debug") {
				continue
			}
			key := "debuginfo/" + s1 + s2
			has, err := p.target.Has(ctx, key)
			if err != nil {
				return err
			}
			if has {
				continue
			}
			body, err := json.Marshal(map[string]string{"archive": "../" + narURL, "member": buildIDDir + "/" + s1 + "/" + s2})
			if err != nil {
				return err
			}
			if err := p.putBytes(ctx, key, "application/json", body); err != nil {
				return err
			}
		}
	}
	return nil
}

// isHex reports whether s is n lowercase hexadecimal digits then suffix.
func isHex(s string, n int, suffix string) bool {
	if len(s) != n+len(suffix) || !strings.HasSuffix(s, suffix) {
		return false
	}
	for _, c := range s[:n] {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// QueueLen is the number of queued paths, those set aside included.
func (p *Pusher) QueueLen() int {
	n := 0
	for _, dir := range []string{p.dir, filepath.Join(p.dir, "failed")} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if _, err := storepath.ParseBase(e.Name()); err == nil {
				n++
			}
		}
	}
	return n
}

func (p *Pusher) markPresent(q storepath.Path) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.present) >= 1<<20 {
		clear(p.present) // bounded: what is forgotten is asked again
	}
	p.present[q.HashPart()] = true
}

// ctxWriter and ctxReader stop a copy once ctx ends.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(b []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(b)
}

type ctxReader struct {
	ctx context.Context
	r   io.ReadSeeker
}

func (c ctxReader) Read(b []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(b)
}

func (c ctxReader) Seek(off int64, whence int) (int64, error) { return c.r.Seek(off, whence) }
