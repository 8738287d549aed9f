package cache

// The caches a Pusher writes to: a Target per kind of URL (a directory,
// an HTTP cache taking PUT; S3 in s3.go), and how their answers are
// told apart as a refusal of one file (refusedError, counted against the
// path) or a failure of the cache (retried for every path).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
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

// OpenTarget returns the target a URL names, and what its parameters (see
// params.go) ask of the files written: file:///DIR (a directory, as `nix
// copy --to file://DIR` writes it), http(s)://… (a cache that takes PUT,
// as Nix's HTTP binary cache store writes it) or s3://BUCKET?… (see
// s3.go, which looks for credentials within ctx). log (nil for none) is
// told what does not stop the target from opening.
func OpenTarget(ctx context.Context, rawURL string, log *slog.Logger) (Target, Options, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t, o, err := openTarget(ctx, rawURL, log)
	if err != nil {
		return nil, Options{}, fmt.Errorf("push target %q: %w", rawURL, err)
	}
	return t, o, nil
}

func openTarget(ctx context.Context, rawURL string, log *slog.Logger) (Target, Options, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, Options{}, err
	}
	if u.Fragment != "" {
		return nil, Options{}, errors.New("a fragment is not supported")
	}
	switch u.Scheme {
	case "file":
		// As Nix: everything after "file://" up to the query is the directory.
		dir, _, _ := strings.Cut(strings.TrimPrefix(rawURL, "file://"), "?")
		if !strings.HasPrefix(rawURL, "file://") || !filepath.IsAbs(dir) {
			return nil, Options{}, errors.New("want file:///ABSOLUTE/DIR")
		}
		o, err := parseOptions(u.Query(), log)
		return dirTarget(filepath.Clean(dir)), o, err
	case "http", "https":
		o, err := parseOptions(u.Query(), log)
		u.RawQuery = "" // parameters of the store, not of the server
		u.Path = strings.TrimSuffix(u.Path, "/")
		return &httpTarget{base: u, client: noRedirects()}, o, err
	case "s3":
		return openS3(ctx, u, log)
	}
	return nil, Options{}, errors.New("want file://, http(s):// or s3://")
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
	if err == nil {
		err = syncDir(filepath.Dir(dst)) // the NAR before its narinfo
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing %s: %w", dst, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return unix.Fsync(int(d.Fd()))
}

// noRedirects is an HTTP client for writing to a cache: a redirect is an
// answer of its own (Go would turn a redirected PUT into a GET, whose 200
// would pass for a write), and only the response's headers are waited
// for with a deadline (an upload may take long).
func noRedirects() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = 2 * time.Minute
	return &http.Client{
		Transport:     tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// httpTarget is a binary cache over HTTP that takes PUT.
type httpTarget struct {
	base   *url.URL
	client *http.Client
}

func (h *httpTarget) String() string { return h.base.Redacted() }

func (h *httpTarget) url(rel string) string { return h.base.JoinPath(rel).String() }

func (h *httpTarget) Has(ctx context.Context, rel string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, h.url(rel), nil)
	if err != nil {
		return false, err
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return false, redact(err, h.base)
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusOK:
		return true, nil
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
		return false, nil // S3 answers 403 for a missing object without list rights
	}
	return false, statusError("HEAD", h.String()+"/"+rel, resp, "")
}

func (h *httpTarget) Put(ctx context.Context, rel string, body io.ReadSeeker, size int64, contentType string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, h.url(rel), io.NopCloser(body))
	if err != nil {
		return err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", contentType)
	resp, err := h.client.Do(req)
	if err != nil {
		return redact(err, h.base)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return statusError("PUT", h.String()+"/"+rel, resp, "")
	}
	return nil
}

// refusedError is the cache refusing one file (a 4xx other than a
// timeout or throttling), or a path that cannot be pushed as it is: an
// error of that path, counted against it, where other errors (the network,
// the cache's 5xx, local I/O) are the cache's, retried for every path.
type refusedError struct{ err error }

func (e *refusedError) Error() string { return e.err.Error() }
func (e *refusedError) Unwrap() error { return e.err }

// statusError is the error of an HTTP answer that is not a success.
func statusError(method, what string, resp *http.Response, msg string) error {
	err := fmt.Errorf("%s %s: %s%s", method, what, resp.Status, msg)
	if c := resp.StatusCode; c >= 400 && c < 500 && c != http.StatusRequestTimeout && c != http.StatusTooManyRequests {
		return &refusedError{err}
	}
	return err
}

// redact removes u's password from err's text (url.Error names the URL).
func redact(err error, u *url.URL) error {
	if pw, ok := u.User.Password(); ok && pw != "" {
		return errors.New(strings.ReplaceAll(err.Error(), pw, "xxxxx"))
	}
	return err
}
