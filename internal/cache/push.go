package cache

// Pushing to a fleet cache. The Pusher keeps a durable queue of paths to
// push (a file per path under its queue directory, written and synced
// before Enqueue returns, removed once the path and its closure are in
// the cache), and a worker that pushes them: for each path of the
// closure, references first, that the cache lacks, the NAR compressed
// with zstd, then its narinfo, signed with the daemon's keys (so that a
// reader never finds a narinfo whose NAR is missing). A push that fails is
// retried with backoff, and the queue survives restarts.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// Target is a binary cache that files can be written to.
type Target interface {
	// Has reports whether the cache has the file at rel (e.g.
	// "HASH.narinfo").
	Has(ctx context.Context, rel string) (bool, error)
	// Put writes the file at rel, size bytes from body.
	Put(ctx context.Context, rel string, body io.ReadSeeker, size int64, contentType string) error
	// String is the cache's URL.
	String() string
}

// OpenTarget returns the target a URL names: file:///DIR (a directory, as
// `nix copy --to file://DIR` writes it), http(s)://… (a cache that takes
// PUT, as Nix's HTTP binary cache store writes it) or s3://BUCKET?… (see
// s3.go).
func OpenTarget(rawURL string) (Target, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("push target %q: %w", rawURL, err)
	}
	switch u.Scheme {
	case "file":
		// As Nix: everything after "file://" is the directory.
		dir, _, _ := strings.Cut(strings.TrimPrefix(rawURL, "file://"), "?")
		if !strings.HasPrefix(rawURL, "file://") || !filepath.IsAbs(dir) {
			return nil, fmt.Errorf("push target %q: want file:///ABSOLUTE/DIR", rawURL)
		}
		return dirTarget(filepath.Clean(dir)), nil
	case "http", "https":
		return &httpTarget{base: strings.TrimSuffix(rawURL, "/"), client: &http.Client{Timeout: 10 * time.Minute}}, nil
	case "s3":
		return openS3(u, rawURL)
	}
	return nil, fmt.Errorf("push target %q: want file://, http(s):// or s3://", rawURL)
}

// dirTarget is a binary cache in a directory.
type dirTarget string

func (d dirTarget) String() string { return "file://" + string(d) }

func (d dirTarget) Has(_ context.Context, rel string) (bool, error) {
	_, err := os.Stat(filepath.Join(string(d), rel))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// Put writes a new file and renames it into place.
func (d dirTarget) Put(_ context.Context, rel string, body io.ReadSeeker, _ int64, _ string) error {
	dst := filepath.Join(string(d), rel)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(dst), ".tmp-")
	if err != nil {
		return err
	}
	_, err = io.Copy(f, body)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(f.Name(), dst)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing %s: %w", dst, err)
	}
	return nil
}

// httpTarget is a binary cache over HTTP that takes PUT.
type httpTarget struct {
	base   string
	client *http.Client
}

func (h *httpTarget) String() string { return h.base }

func (h *httpTarget) Has(ctx context.Context, rel string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, h.base+"/"+rel, nil)
	if err != nil {
		return false, err
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return false, err
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusOK:
		return true, nil
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
		return false, nil // S3 answers 403 for a missing object without list rights
	}
	return false, fmt.Errorf("HEAD %s/%s: %s", h.base, rel, resp.Status)
}

func (h *httpTarget) Put(ctx context.Context, rel string, body io.ReadSeeker, size int64, contentType string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, h.base+"/"+rel, body)
	if err != nil {
		return err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", contentType)
	resp, err := h.client.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("PUT %s/%s: %s", h.base, rel, resp.Status)
	}
	return nil
}

// Pusher pushes queued paths, with their closures, to a Target.
type Pusher struct {
	st     *store.Store
	target Target
	dir    string
	keys   []signature.SecretKey
	log    *slog.Logger
	wake   chan struct{}

	mu       sync.Mutex
	infoDone bool // nix-cache-info is in the target
}

// NewPusher returns a Pusher whose queue is the directory dir (made if
// missing); paths left in it by an earlier run are pushed first.
func NewPusher(st *store.Store, target Target, dir string, keys []signature.SecretKey, log *slog.Logger) (*Pusher, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("push queue: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Pusher{st: st, target: target, dir: dir, keys: keys, log: log, wake: make(chan struct{}, 1)}, nil
}

// Enqueue adds paths to the queue; they are in it, durably, when it
// returns.
func (p *Pusher) Enqueue(paths ...storepath.Path) error {
	for _, sp := range paths {
		f, err := os.OpenFile(filepath.Join(p.dir, sp.String()), os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("push queue: %w", err)
		}
		f.Close()
	}
	d, err := os.Open(p.dir)
	if err != nil {
		return fmt.Errorf("push queue: %w", err)
	}
	err = unix.Fsync(int(d.Fd()))
	d.Close()
	if err != nil {
		return fmt.Errorf("push queue: syncing %s: %w", p.dir, err)
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
	return nil
}

// Run pushes what is queued until ctx ends.
func (p *Pusher) Run(ctx context.Context) {
	failures := 0
	for {
		wait := time.Minute
		if err := p.pushQueued(ctx); err != nil {
			failures++
			wait = min(time.Duration(1<<min(failures, 8))*time.Second, 5*time.Minute)
			p.log.Warn("push to the fleet cache failed; retrying", "target", p.target.String(), "in", wait, "err", err)
		} else {
			failures = 0
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-p.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// pushQueued pushes every queued path, stopping at the first failure.
func (p *Pusher) pushQueued(ctx context.Context) error {
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return fmt.Errorf("push queue: %w", err)
	}
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		sp, err := storepath.ParseBase(e.Name())
		if err != nil {
			os.Remove(filepath.Join(p.dir, e.Name()))
			continue
		}
		if err := p.Push(ctx, sp); err != nil {
			if errors.Is(err, store.ErrNotValid) {
				p.log.Warn("queued for pushing but gone from the store; dropped", "path", p.st.Dir().Abs(sp))
			} else {
				return err
			}
		}
		os.Remove(filepath.Join(p.dir, e.Name()))
	}
	return nil
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
		body := narinfo.NixCacheInfo{StoreDir: string(p.st.Dir())}.Marshal()
		err = p.target.Put(ctx, "nix-cache-info", bytes.NewReader(body), int64(len(body)), "text/x-nix-cache-info")
	}
	if err != nil {
		return fmt.Errorf("nix-cache-info in %s: %w", p.target, err)
	}
	p.infoDone = true
	return nil
}

// pushOne uploads q's NAR, zstd-compressed, then its narinfo, unless the
// target has the narinfo.
func (p *Pusher) pushOne(ctx context.Context, q storepath.Path) error {
	name := q.HashPart() + ".narinfo"
	if has, err := p.target.Has(ctx, name); err != nil || has {
		return err
	}
	info, err := p.st.QueryPathInfo(ctx, q)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(p.dir, ".nar-")
	if err != nil {
		return err
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	sum := sha256.New()
	zw, err := zstd.NewWriter(io.MultiWriter(tmp, sum))
	if err != nil {
		return err
	}
	if err := p.st.NarFromPath(ctx, q, zw); err != nil {
		zw.Close()
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	size, err := tmp.Seek(0, io.SeekCurrent)
	if err != nil {
		return err
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	fileHash := hash.FromHasher(hash.SHA256, sum)
	ni := narinfo.NarInfo{
		StorePath: q, URL: "nar/" + fileHash.NixBase32() + ".nar.zst", Compression: "zstd",
		FileHash: fileHash, FileSize: uint64(size),
		NarHash: info.NarHash, NarSize: info.NarSize,
		References: info.References, Deriver: info.Deriver, Sigs: info.Sigs,
	}
	if info.CA != "" {
		if ca, err := contentaddress.Parse(info.CA); err == nil {
			ni.CA = ca
		}
	}
	fp := signature.Fingerprint(p.st.Dir(), q, info.NarHash, info.NarSize, info.References)
	for _, k := range p.keys {
		ni.Sigs = append(ni.Sigs, k.Sign(fp))
	}
	if err := p.target.Put(ctx, ni.URL, tmp, size, "application/x-nix-nar"); err != nil {
		return err
	}
	body := ni.Marshal(p.st.Dir())
	return p.target.Put(ctx, name, bytes.NewReader(body), int64(len(body)), "text/x-nix-narinfo")
}
