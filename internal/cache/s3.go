package cache

// S3-compatible object storage as a push target: objects written with
// PutObject and checked with HeadObject, requests signed with AWS
// Signature Version 4 with credentials found as the AWS SDK finds them
// (awscreds.go). The URL is Nix's:
// s3://BUCKET[?region=R][&endpoint=HOST[:PORT]][&scheme=http|https][&profile=P],
// with the binary cache parameters of params.go; with an endpoint (MinIO,
// Ceph, Garage, R2, …) objects are addressed by path
// (ENDPOINT/BUCKET/KEY), without one at BUCKET.s3.REGION.amazonaws.com.

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/nixyard/nixyard/internal/config"
)

// s3Target is a bucket of S3-compatible object storage.
type s3Target struct {
	bucket, region string
	base           string // scheme://host[/bucket]: objects are base/KEY
	host           string
	creds          *awsCredentials
	client         *http.Client
	now            func() time.Time
}

// credsTimeout bounds the search for credentials when the target is
// opened (the instance metadata service answers within a second).
const credsTimeout = 10 * time.Second

func openS3(ctx context.Context, u *url.URL, log *slog.Logger) (*s3Target, Options, error) {
	q := u.Query()
	for _, k := range []string{"narinfo-compression", "ls-compression", "log-compression"} {
		if q.Get(k) != "" {
			return nil, Options{}, fmt.Errorf("%s=%s: not supported (files other than NARs are written uncompressed)", k, q.Get(k))
		}
	}
	if v := q.Get("multipart-upload"); v != "" {
		if on, err := config.ParseBool(v); err != nil || on {
			return nil, Options{}, fmt.Errorf("multipart-upload=%s: not supported (each file is one PutObject, up to 5 GB)", v)
		}
	}
	opts, err := parseOptions(q, log, "region", "aws-region", "scheme", "endpoint", "profile",
		"narinfo-compression", "ls-compression", "log-compression", "multipart-upload", "buffer-size")
	if err != nil {
		return nil, Options{}, err
	}
	t := &s3Target{bucket: u.Host, region: cmp.Or(q.Get("region"), q.Get("aws-region"), "us-east-1"), client: noRedirects(), now: time.Now}
	if t.bucket == "" {
		return nil, Options{}, errors.New("no bucket")
	}
	scheme := q.Get("scheme")
	if scheme == "" {
		scheme = "https"
	}
	if scheme != "http" && scheme != "https" {
		return nil, Options{}, fmt.Errorf("scheme=%s: want http or https", scheme)
	}
	if ep := q.Get("endpoint"); ep != "" {
		if e, err := url.Parse(ep); err == nil && e.Host != "" {
			scheme, ep = e.Scheme, e.Host // a URL rather than a host
		}
		t.host = ep
		t.base = scheme + "://" + ep + "/" + t.bucket
	} else {
		t.host = t.bucket + ".s3." + t.region + ".amazonaws.com"
		t.base = scheme + "://" + t.host
	}
	// Credentials are looked for now, so that a mistake in their
	// configuration stops the daemon at start-up. A source that cannot
	// be reached (the metadata service while the network comes up) is
	// only logged: pushes wait for it.
	t.creds = newAWSCredentials(q.Get("profile"), log)
	ctx, cancel := context.WithTimeout(ctx, credsTimeout)
	defer cancel()
	if _, err := t.creds.get(ctx); errors.As(err, new(configError)) {
		return nil, Options{}, err
	} else if err != nil {
		log.Warn("no AWS credentials yet; pushing waits for them", "err", err)
	}
	return t, opts, nil
}

func (t *s3Target) String() string { return "s3://" + t.bucket }

// emptyHash is the SHA-256 of no bytes, the payload hash of a HEAD.
const emptyHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

func (t *s3Target) Has(ctx context.Context, rel string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, t.base+"/"+s3Escape(rel), nil)
	if err != nil {
		return false, err
	}
	if err := t.sign(ctx, req, emptyHash); err != nil {
		return false, err
	}
	resp, err := t.client.Do(req)
	if err != nil {
		return false, err
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		return true, nil
	case http.StatusNotFound, http.StatusForbidden:
		// Without s3:ListBucket, a missing object is 403 (Nix takes it
		// as missing too).
		return false, nil
	}
	return false, statusError("HEAD", t.String()+"/"+rel, resp, "")
}

func (t *s3Target) Put(ctx context.Context, rel string, body io.ReadSeeker, size int64, contentType string) error {
	h := sha256.New()
	if _, err := io.Copy(h, body); err != nil {
		return err
	}
	if _, err := body.Seek(0, io.SeekStart); err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, t.base+"/"+s3Escape(rel), io.NopCloser(body))
	if err != nil {
		return err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", contentType)
	if err := t.sign(ctx, req, hex.EncodeToString(h.Sum(nil))); err != nil {
		return err
	}
	resp, err := t.client.Do(req)
	if err != nil {
		return err
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return statusError("PUT", t.String()+"/"+rel, resp, ": "+strings.TrimSpace(string(msg)))
	}
	return nil
}

// s3Escape encodes an object key for a URL path as S3 wants it signed:
// every byte but unreserved ones and '/'.
func s3Escape(key string) string {
	var b strings.Builder
	for i := 0; i < len(key); i++ {
		c := key[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || strings.IndexByte("-_.~/", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func (t *s3Target) sign(ctx context.Context, req *http.Request, payloadHash string) error {
	c, err := t.creds.get(ctx)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("X-Amz-Security-Token", c.token)
	}
	sigV4(req, payloadHash, c, t.region, "s3", t.now())
	return nil
}

// sigV4 signs req with AWS Signature Version 4: it sets X-Amz-Date,
// X-Amz-Content-Sha256 (payloadHash, hex) and Authorization, signing the
// host, the Range header if any and every X-Amz-* header. req.URL.Path
// must already be encoded as it is to be sent (EscapedPath is used).
func sigV4(req *http.Request, payloadHash string, c s3Creds, region, service string, now time.Time) {
	amzDate := now.UTC().Format("20060102T150405Z")
	day := amzDate[:8]
	req.Header.Set("X-Amz-Date", amzDate)
	req.Header.Set("X-Amz-Content-Sha256", payloadHash)
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	headers := map[string]string{"host": host}
	for k, v := range req.Header {
		lk := strings.ToLower(k)
		if lk == "range" || strings.HasPrefix(lk, "x-amz-") {
			headers[lk] = strings.Join(strings.Fields(strings.Join(v, ",")), " ")
		}
	}
	names := slices.Sorted(maps.Keys(headers))
	var canon strings.Builder
	for _, n := range names {
		canon.WriteString(n + ":" + headers[n] + "\n")
	}
	signed := strings.Join(names, ";")
	path := req.URL.EscapedPath()
	if path == "" {
		path = "/"
	}
	creq := strings.Join([]string{req.Method, path, canonicalQuery(req.URL.Query()), canon.String(), signed, payloadHash}, "\n")
	scope := day + "/" + region + "/" + service + "/aws4_request"
	sum := sha256.Sum256([]byte(creq))
	toSign := "AWS4-HMAC-SHA256\n" + amzDate + "\n" + scope + "\n" + hex.EncodeToString(sum[:])
	key := hmacSHA256([]byte("AWS4"+c.secret), day)
	for _, part := range []string{region, service, "aws4_request"} {
		key = hmacSHA256(key, part)
	}
	sig := hex.EncodeToString(hmacSHA256(key, toSign))
	req.Header.Set("Authorization", fmt.Sprintf("AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s", c.key, scope, signed, sig))
}

func canonicalQuery(q url.Values) string {
	var parts []string
	for k, vs := range q {
		for _, v := range vs {
			parts = append(parts, s3QueryEscape(k)+"="+s3QueryEscape(v))
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, "&")
}

func s3QueryEscape(s string) string {
	return strings.ReplaceAll(s3Escape(s), "/", "%2F")
}

func hmacSHA256(key []byte, data string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(data))
	return m.Sum(nil)
}
