package substitute

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// defaultPriority is Nix's priority for a cache that does not state one.
const defaultPriority = 0

// errNotFound is an upstream's "not there" (HTTP 404/403, ENOENT).
var errNotFound = errors.New("not found")

// transientError is a failure worth retrying: connection errors, resets,
// timeouts, 5xx, 408, 429 and truncated bodies.
type transientError struct {
	err        error
	retryAfter time.Duration // from a Retry-After header, 0 if none
}

func (e *transientError) Error() string { return e.err.Error() }
func (e *transientError) Unwrap() error { return e.err }

func transient(err error) error { return &transientError{err: err} }

// upstream is one binary cache. Its mutable state is guarded by mu.
type upstream struct {
	base     string // URL as configured, without trailing slash or query
	u        *url.URL
	fileRoot string // for file:// upstreams
	prioSet  bool   // ?priority= given in the URL; overrides nix-cache-info

	mu       sync.Mutex
	inited   bool // nix-cache-info read successfully
	initErr  error
	priority int
	massQ    bool
	breaker  breaker
}

func newUpstream(raw string) (*upstream, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("substituter %q: %w", raw, err)
	}
	up := &upstream{u: u, priority: defaultPriority}
	if p := u.Query().Get("priority"); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil {
			return nil, fmt.Errorf("substituter %q: priority: %w", raw, err)
		}
		up.priority, up.prioSet = n, true
	}
	u.RawQuery = ""
	u.Path = strings.TrimRight(u.Path, "/")
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return nil, fmt.Errorf("substituter %q: no host", raw)
		}
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("substituter %q: file URL with a host", raw)
		}
		up.fileRoot = u.Path
		if up.fileRoot == "" {
			up.fileRoot = "/"
		}
	default:
		return nil, fmt.Errorf("substituter %q: unsupported scheme %q (want http, https or file)", raw, u.Scheme)
	}
	up.base = u.String()
	return up, nil
}

// urlOf returns the absolute URL of a file of the cache.
func (up *upstream) urlOf(rel string) string {
	if strings.HasPrefix(rel, "http://") || strings.HasPrefix(rel, "https://") {
		return rel
	}
	return up.base + "/" + strings.TrimLeft(rel, "/")
}

// body is an open download. size is -1 if unknown.
type body struct {
	rc   io.ReadCloser
	size int64
	url  string
}

// open starts one GET of rel (no retries). Not-found wraps errNotFound;
// retryable failures are *transientError. Errors name the URL.
func (s *Substituter) open(ctx context.Context, up *upstream, rel string) (*body, error) {
	full := up.urlOf(rel)
	if up.fileRoot != "" {
		if !filepath.IsLocal(rel) {
			return nil, fmt.Errorf("%s: path escapes the cache directory", full)
		}
		f, err := os.Open(filepath.Join(up.fileRoot, rel))
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", full, errNotFound)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", full, err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", full, err)
		}
		return &body{rc: f, size: st.Size(), url: full}, nil
	}
	if s.caErr != nil && strings.HasPrefix(full, "https:") {
		return nil, fmt.Errorf("%s: %w", full, s.caErr) // as curl fails https transfers, and only those
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, full, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", full, err)
	}
	req.Header.Set("User-Agent", "nixyard")
	resp, err := s.client.Do(req)
	if err != nil {
		// The client's error names the URL again ("Get \"…\": …").
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if ctx.Err() != nil && context.Cause(ctx) == ctx.Err() {
			// Our caller gave up: not the upstream's fault.
			return nil, fmt.Errorf("unable to download '%s': %w", full, err)
		}
		if c := context.Cause(ctx); c != nil {
			err = c
		}
		return nil, transient(fmt.Errorf("unable to download '%s': %w", full, err))
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		return &body{rc: resp.Body, size: resp.ContentLength, url: full}, nil
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
		drain(resp.Body)
		return nil, fmt.Errorf("%w: %w", httpError(full, resp), errNotFound)
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode >= 500:
		drain(resp.Body)
		return nil, &transientError{
			err:        httpError(full, resp),
			retryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), s.now()),
		}
	default:
		drain(resp.Body)
		return nil, httpError(full, resp)
	}
}

// httpError is a failed download's error in Nix's words: "unable to
// download 'URL': HTTP error 404 ('Not Found')".
func httpError(full string, resp *http.Response) error {
	reason := strings.TrimSpace(strings.TrimPrefix(resp.Status, strconv.Itoa(resp.StatusCode)))
	return fmt.Errorf("unable to download '%s': HTTP error %d ('%s')", full, resp.StatusCode, reason)
}

// drain reads a little of an unwanted body so the connection can be reused.
func drain(rc io.ReadCloser) {
	io.Copy(io.Discard, io.LimitReader(rc, 64<<10))
	rc.Close()
}

// parseRetryAfter reads delay-seconds or an HTTP date; 0 if absent or bad.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 32); err == nil {
		if n < 0 {
			return 0
		}
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d
		}
	}
	return 0
}

// readSmall GETs rel (with retries) and returns its content, refusing more
// than limit bytes.
func (s *Substituter) readSmall(ctx context.Context, up *upstream, rel string, limit int64) ([]byte, error) {
	var data []byte
	err := s.retry(ctx, up, rel, func(ctx context.Context) error {
		return s.watchedOpen(ctx, up, rel, func(ctx context.Context, b *body, tr *transferReader) error {
			var err error
			data, err = io.ReadAll(io.LimitReader(tr, limit+1))
			if tr.err != nil {
				return tr.err
			}
			if err != nil {
				return fmt.Errorf("%s: %w", b.url, err)
			}
			if int64(len(data)) > limit {
				return fmt.Errorf("%s: larger than %d bytes", b.url, limit)
			}
			return nil
		})
	})
	return data, err
}

// errStalled is the cancellation cause when an upstream sends nothing for
// too long.
var errStalled = errors.New("upstream stalled (no data within the timeout)")

// watchedOpen opens rel under a watchdog (first-byte and stall timeouts)
// and calls use with a reader that records transfer failures. The body is
// closed when use returns.
func (s *Substituter) watchedOpen(ctx context.Context, up *upstream, rel string, use func(ctx context.Context, b *body, tr *transferReader) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	timer := time.AfterFunc(s.cfg.FirstByteTimeout, func() { cancel(errStalled) })
	defer timer.Stop()
	b, err := s.open(ctx, up, rel)
	if err != nil {
		return err
	}
	defer b.rc.Close()
	tr := &transferReader{r: b.rc, url: b.url, expected: b.size, ctx: ctx, kick: func() { timer.Reset(s.cfg.StallTimeout) }}
	tr.kick()
	return use(ctx, b, tr)
}

// transferReader reads a download body, resetting the stall watchdog on
// every read and remembering the first transfer failure (a reset, a stall,
// a body shorter than its Content-Length) in err, so the caller can tell a
// broken transfer (retry) from bad content (do not).
type transferReader struct {
	r        io.Reader
	url      string
	ctx      context.Context
	kick     func()
	n        int64
	expected int64 // < 0: unknown (no Content-Length)
	err      error
	onRead   func(n int64)
	// endedUnmeasured: a body of unknown length ended (EOF), which a
	// connection cut cleanly looks like too.
	endedUnmeasured bool
}

func (t *transferReader) Read(p []byte) (int, error) {
	if t.err != nil {
		return 0, t.err
	}
	n, err := t.r.Read(p)
	t.n += int64(n)
	if n > 0 {
		t.kick()
		if t.onRead != nil {
			t.onRead(t.n)
		}
	}
	switch {
	case err == nil:
	case errors.Is(err, io.EOF):
		t.endedUnmeasured = t.expected < 0
		if t.expected >= 0 && t.n < t.expected {
			t.err = transient(fmt.Errorf("%s: body truncated at %d of %d bytes", t.url, t.n, t.expected))
			return n, t.err
		}
	default:
		if c := context.Cause(t.ctx); c != nil && !errors.Is(c, context.Canceled) {
			err = c
		}
		t.err = transient(fmt.Errorf("%s: after %d bytes: %w", t.url, t.n, err))
		return n, t.err
	}
	return n, err
}
