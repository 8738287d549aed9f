package cache

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// noAWSConfig leaves the test no credentials from the machine: no
// environment, profiles in empty files of its own, no instance metadata.
func noAWSConfig(t *testing.T) {
	t.Helper()
	dir := t.TempDir()
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
		"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
		"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_EC2_METADATA_SERVICE_ENDPOINT"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestAWSProfiles: the environment first, then AWS_PROFILE's (or the
// default) profile from the credentials file, then from the config file;
// with profile=, only that profile; unsupported kinds of profile say so.
func TestAWSProfiles(t *testing.T) {
	noAWSConfig(t)
	ctx := t.Context()
	writeFile(t, os.Getenv("AWS_SHARED_CREDENTIALS_FILE"), `# comment
[default]
aws_access_key_id = AKDEFAULT
aws_secret_access_key = s-default

[ci]
aws_access_key_id=AKCI
aws_secret_access_key=s-ci
aws_session_token=tok-ci
[assumed]
role_arn = arn:aws:iam::1:role/x
source_profile = default
`)
	writeFile(t, os.Getenv("AWS_CONFIG_FILE"), `[profile fromconfig]
region = eu-west-1
aws_access_key_id = AKCONF
aws_secret_access_key = s-conf
[profile ci]
aws_access_key_id = AKNOTTHIS
aws_secret_access_key = s-notthis
`)
	get := func(profile string) (s3Creds, error) {
		return newAWSCredentials(profile, slog.New(slog.DiscardHandler)).get(ctx)
	}
	for _, tc := range []struct{ env, profile, key, token string }{
		{"", "", "AKDEFAULT", ""},
		{"ci", "", "AKCI", "tok-ci"},
		{"fromconfig", "", "AKCONF", ""},
		{"default", "ci", "AKCI", "tok-ci"},
		{"", "fromconfig", "AKCONF", ""},
	} {
		t.Setenv("AWS_PROFILE", tc.env)
		c, err := get(tc.profile)
		if err != nil || c.key != tc.key || c.token != tc.token {
			t.Errorf("AWS_PROFILE=%q profile=%q: %+v %v, want key %s", tc.env, tc.profile, c, err, tc.key)
		}
	}
	t.Setenv("AWS_PROFILE", "ci")
	t.Setenv("AWS_ACCESS_KEY_ID", "AKENV")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "s-env")
	if c, err := get(""); err != nil || c.key != "AKENV" {
		t.Errorf("with the environment set: %+v %v", c, err)
	}
	if c, err := get("ci"); err != nil || c.key != "AKCI" {
		t.Errorf("profile=ci with the environment set: %+v %v", c, err)
	}
	if _, err := get("missing"); err == nil || !strings.Contains(err.Error(), `no profile "missing"`) {
		t.Errorf("a missing profile: %v", err)
	}
	if _, err := get("assumed"); err == nil || !strings.Contains(err.Error(), "role_arn is not supported") {
		t.Errorf("a role profile: %v", err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_PROFILE", "nosuch")
	if _, err := get(""); err == nil || !strings.Contains(err.Error(), "instance metadata is disabled") {
		t.Errorf("no credentials anywhere: %v", err)
	}
}

// fakeIMDS is an EC2 instance metadata service that hands out a role's
// credentials with IMDSv2 session tokens, each set expiring in ttl.
type fakeIMDS struct {
	mu          sync.Mutex
	v1          bool // answers without a token, refuses the token PUT
	tokenStatus int  // if set, the status the token PUT gets (-1: none, the connection drops)
	issued      int
	requests    int
	expires     time.Time
}

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.requests++
	if r.URL.Path == "/latest/api/token" {
		if f.tokenStatus == -1 { // the connection drops
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
			return
		}
		if f.tokenStatus != 0 {
			http.Error(w, "", f.tokenStatus)
			return
		}
		if f.v1 {
			http.Error(w, "", http.StatusForbidden)
			return
		}
		if r.Method != http.MethodPut || r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds") == "" {
			http.Error(w, "", http.StatusBadRequest)
			return
		}
		w.Write([]byte("session-token"))
		return
	}
	if !f.v1 && f.tokenStatus == 0 && r.Header.Get("X-Aws-Ec2-Metadata-Token") != "session-token" {
		http.Error(w, "", http.StatusUnauthorized)
		return
	}
	switch r.URL.Path {
	case "/latest/meta-data/iam/security-credentials/":
		w.Write([]byte("ci-runner\n"))
	case "/latest/meta-data/iam/security-credentials/ci-runner":
		f.issued++
		json.NewEncoder(w).Encode(map[string]any{"Code": "Success", "AccessKeyId": "AKIMDS" + string(rune('0'+f.issued)),
			"SecretAccessKey": "s", "Token": "tok", "Expiration": f.expires})
	default:
		http.NotFound(w, r)
	}
}

// TestAWSInstanceMetadata: the instance's role through IMDSv2 (and v1),
// kept until five minutes before it expires, then fetched again; while
// the service cannot be reached, credentials that have not expired stay
// in use.
func TestAWSInstanceMetadata(t *testing.T) {
	for _, v1 := range []bool{false, true} {
		noAWSConfig(t)
		f := &fakeIMDS{v1: v1}
		srv := httptest.NewServer(f)
		t.Cleanup(srv.Close)
		t.Setenv("AWS_EC2_METADATA_DISABLED", "")
		t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.URL)
		now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
		f.expires = now.Add(time.Hour)
		a := newAWSCredentials("", slog.New(slog.DiscardHandler))
		a.now = func() time.Time { return now }
		get := func() string {
			t.Helper()
			c, err := a.get(t.Context())
			if err != nil {
				t.Fatalf("v1=%v: %v", v1, err)
			}
			if c.token != "tok" || c.secret != "s" {
				t.Errorf("v1=%v: %+v", v1, c)
			}
			return c.key
		}
		if k := get(); k != "AKIMDS1" {
			t.Errorf("v1=%v: first key %s", v1, k)
		}
		now = now.Add(50 * time.Minute)
		if k := get(); k != "AKIMDS1" {
			t.Errorf("v1=%v: fetched again 10 minutes before expiry: %s", v1, k)
		}
		now = now.Add(6 * time.Minute)
		f.expires = now.Add(time.Hour)
		if k := get(); k != "AKIMDS2" {
			t.Errorf("v1=%v: not renewed 4 minutes before expiry: %s", v1, k)
		}
		srv.Close()
		now = now.Add(58 * time.Minute)
		if k := get(); k != "AKIMDS2" {
			t.Errorf("v1=%v: the service down, credentials valid 2 more minutes: %s", v1, k)
		}
		now = now.Add(3 * time.Minute)
		if _, err := a.get(t.Context()); err == nil {
			t.Errorf("v1=%v: expired credentials used", v1)
		}
	}
}

// TestAWSCredentialRetries: a failed search is not repeated for every
// request, but again after retryEvery; a token PUT that fails falls back
// to IMDSv1, but for a 400; a redirect is not followed.
func TestAWSCredentialRetries(t *testing.T) {
	noAWSConfig(t)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "")
	f := &fakeIMDS{tokenStatus: http.StatusInternalServerError}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.URL)
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	f.expires = now.Add(time.Hour)
	a := newAWSCredentials("", slog.New(slog.DiscardHandler))
	a.now = func() time.Time { return now }
	if c, err := a.get(t.Context()); err != nil || c.key != "AKIMDS1" {
		t.Fatalf("a token PUT answered 500 did not fall back to IMDSv1: %+v %v", c, err)
	}

	f.tokenStatus = -1
	f.issued = 0
	if c, err := newAWSCredentials("", slog.New(slog.DiscardHandler)).get(t.Context()); err != nil || c.key != "AKIMDS1" {
		t.Fatalf("a token PUT without an answer did not fall back to IMDSv1: %+v %v", c, err)
	}

	f.tokenStatus = http.StatusBadRequest
	b := newAWSCredentials("", slog.New(slog.DiscardHandler))
	b.now = func() time.Time { return now }
	if _, err := b.get(t.Context()); err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("a token PUT answered 400: %v", err)
	}
	n := f.requests
	for range 5 {
		b.get(t.Context())
	}
	if f.requests != n {
		t.Errorf("%d requests to the metadata service within %v of a failure", f.requests-n, retryEvery)
	}
	f.tokenStatus = 0
	now = now.Add(retryEvery)
	if c, err := b.get(t.Context()); err != nil || c.key == "" {
		t.Errorf("not retried after %v: %+v %v", retryEvery, c, err)
	}

	f.v1 = true // following the redirect would get credentials
	redirect := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, srv.URL+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	t.Cleanup(redirect.Close)
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", redirect.URL)
	if _, err := newAWSCredentials("", slog.New(slog.DiscardHandler)).get(t.Context()); err == nil {
		t.Error("a redirect was followed")
	}
}

// TestS3StartUp: credentials missing by configuration stop a target from
// opening; a source that cannot be reached does not.
func TestS3StartUp(t *testing.T) {
	noAWSConfig(t)
	ctx := t.Context()
	if _, _, err := OpenTarget(ctx, "s3://b?profile=missing", nil); err == nil || !strings.Contains(err.Error(), `no profile "missing"`) {
		t.Errorf("a missing profile: %v", err)
	}
	if _, _, err := OpenTarget(ctx, "s3://b", nil); err == nil || !strings.Contains(err.Error(), "instance metadata is disabled") {
		t.Errorf("no source at all: %v", err)
	}
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()
	t.Setenv("AWS_EC2_METADATA_DISABLED", "")
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", down.URL)
	if _, _, err := OpenTarget(ctx, "s3://b", nil); err != nil {
		t.Errorf("an unreachable metadata service stopped the target: %v", err)
	}
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://credentials.example/role")
	if _, _, err := OpenTarget(ctx, "s3://b", nil); err == nil || !strings.Contains(err.Error(), "want https") {
		t.Errorf("a token sent in clear to another host: %v", err)
	}
}

// TestAWSContainerCredentials: a container's role from the full URI, with
// its authorization token.
func TestAWSContainerCredentials(t *testing.T) {
	noAWSConfig(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/creds" || r.Header.Get("Authorization") != "Bearer ecs" {
			http.Error(w, "", http.StatusUnauthorized)
			return
		}
		w.Write([]byte(`{"AccessKeyId":"AKECS","SecretAccessKey":"s","Token":"t","Expiration":"2099-01-01T00:00:00Z"}`))
	}))
	defer srv.Close()
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", srv.URL+"/creds")
	t.Setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "Bearer ecs")
	get := func() (s3Creds, error) { return newAWSCredentials("", slog.New(slog.DiscardHandler)).get(t.Context()) }
	c, err := get()
	if err != nil || c.key != "AKECS" || c.token != "t" || c.expires.Year() != 2099 {
		t.Errorf("%+v %v", c, err)
	}
	t.Setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "wrong")
	if _, err := get(); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("a refused token: %v", err)
	}
	// EKS Pod Identity: the token in a file, which wins.
	tokFile := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokFile, "Bearer ecs\n")
	t.Setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", tokFile)
	if c, err := get(); err != nil || c.key != "AKECS" {
		t.Errorf("the token from a file: %+v %v", c, err)
	}
}
