package cache

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSigV4Vector: the signature of AWS's own example of a signed S3
// GetObject (Amazon S3 API Reference, "Example: GET Object").
func TestSigV4Vector(t *testing.T) {
	req, _ := http.NewRequest(http.MethodGet, "https://examplebucket.s3.amazonaws.com/test.txt", nil)
	req.Header.Set("Range", "bytes=0-9")
	now := time.Date(2013, 5, 24, 0, 0, 0, 0, time.UTC)
	sigV4(req, emptyHash, s3Creds{key: "AKIAIOSFODNN7EXAMPLE", secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}, "us-east-1", "s3", now)
	want := "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
	if got := req.Header.Get("Authorization"); got != want {
		t.Errorf("Authorization:\n got %s\nwant %s", got, want)
	}
}

// fakeS3 is a bucket that keeps objects PUT by path (ENDPOINT/BUCKET/KEY),
// checking that each request is signed for the right key and carries the
// hash of its body.
type fakeS3 struct {
	mu      sync.Mutex
	objects map[string]string
}

func (f *fakeS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	auth := r.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 Credential=AKIDTEST/") || !strings.Contains(auth, "/eu-west-3/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature=") || r.Header.Get("X-Amz-Security-Token") != "tok" {
		http.Error(w, "bad signature: "+auth, http.StatusForbidden)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	switch r.Method {
	case http.MethodPut:
		body, _ := io.ReadAll(r.Body)
		sum := sha256.Sum256(body)
		if r.Header.Get("X-Amz-Content-Sha256") != hex.EncodeToString(sum[:]) {
			http.Error(w, "content hash mismatch", http.StatusBadRequest)
			return
		}
		f.objects[r.URL.Path] = string(body)
	case http.MethodHead:
		if _, ok := f.objects[r.URL.Path]; !ok {
			// What S3 answers without s3:ListBucket.
			http.Error(w, "access denied", http.StatusForbidden)
		}
	}
}

func TestS3Target(t *testing.T) {
	f := &fakeS3{objects: map[string]string{}}
	srv := httptest.NewServer(f)
	defer srv.Close()
	noAWSConfig(t)
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_SESSION_TOKEN", "tok")
	tg, _, err := OpenTarget(t.Context(), "s3://fleet?region=eu-west-3&endpoint="+srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if ok, err := tg.Has(ctx, "x.narinfo"); ok || err != nil {
		t.Errorf("Has before Put: %v %v", ok, err)
	}
	if err := tg.Put(ctx, "nar/a b.nar.zst", strings.NewReader("data"), 4, "application/x-nix-nar"); err != nil {
		t.Fatal(err)
	}
	if got := f.objects["/fleet/nar/a b.nar.zst"]; got != "data" {
		t.Errorf("objects: %v", f.objects)
	}
	if ok, err := tg.Has(ctx, "nar/a b.nar.zst"); !ok || err != nil {
		t.Errorf("Has after Put: %v %v", ok, err)
	}
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	if _, _, err := OpenTarget(t.Context(), "s3://fleet", nil); err == nil {
		t.Error("an s3 target without credentials opened")
	}
}
