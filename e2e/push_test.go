package e2e

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// objectStore is a writable binary cache over HTTP that keeps objects in
// memory: PUT writes, HEAD and GET read (GET without authentication, as a
// public bucket or a cache's read side serves them). With secret set it
// is an S3 bucket that checks each write and HEAD for a valid AWS
// Signature Version 4 by key and for a body matching its signed hash.
type objectStore struct {
	key, secret string // "" for a cache that takes any PUT

	mu      sync.Mutex
	objects map[string][]byte
	refused []string // why requests were refused
}

func (s *objectStore) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body []byte
	if r.Method == http.MethodPut {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = b
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.secret != "" && r.Method != http.MethodGet {
		if err := s.checkSigV4(r, body); err != nil {
			s.refused = append(s.refused, r.Method+" "+r.URL.Path+": "+err.Error())
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
	}
	switch r.Method {
	case http.MethodPut:
		s.objects[r.URL.Path] = body
	case http.MethodHead, http.MethodGet:
		b, ok := s.objects[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(b)))
		if r.Method == http.MethodGet {
			w.Write(b)
		}
	default:
		http.Error(w, "", http.StatusMethodNotAllowed)
	}
}

// checkSigV4 verifies r's signature as S3 does, from the request as it
// arrived: a second implementation of the signing nixyard does.
func (s *objectStore) checkSigV4(r *http.Request, body []byte) error {
	const prefix = "AWS4-HMAC-SHA256 Credential="
	auth, ok := strings.CutPrefix(r.Header.Get("Authorization"), prefix)
	if !ok {
		return fmt.Errorf("no AWS4-HMAC-SHA256 authorization")
	}
	fields := map[string]string{}
	for i, part := range strings.Split(auth, ", ") {
		if i == 0 {
			fields["Credential"] = part
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		fields[k] = v
	}
	cred := strings.Split(fields["Credential"], "/") // KEY/DAY/REGION/s3/aws4_request
	if len(cred) != 5 || cred[0] != s.key || cred[3] != "s3" || cred[4] != "aws4_request" {
		return fmt.Errorf("credential %q", fields["Credential"])
	}
	payload := r.Header.Get("X-Amz-Content-Sha256")
	if sum := sha256.Sum256(body); payload != hex.EncodeToString(sum[:]) {
		return fmt.Errorf("payload hash %q does not match the body", payload)
	}
	signed := strings.Split(fields["SignedHeaders"], ";")
	if !slices.Contains(signed, "host") || !slices.Contains(signed, "x-amz-date") || !slices.Contains(signed, "x-amz-content-sha256") {
		return fmt.Errorf("signed headers %q", fields["SignedHeaders"])
	}
	var canon strings.Builder
	for _, h := range signed {
		v := r.Header.Get(h)
		if h == "host" {
			v = r.Host
		}
		canon.WriteString(h + ":" + strings.TrimSpace(v) + "\n")
	}
	date := r.Header.Get("X-Amz-Date")
	if len(date) != 16 || date[:8] != cred[1] {
		return fmt.Errorf("date %q for credential day %q", date, cred[1])
	}
	if t, err := time.Parse("20060102T150405Z", date); err != nil || time.Since(t).Abs() > 15*time.Minute {
		return fmt.Errorf("date %q: out of range (%v)", date, err)
	}
	creq := strings.Join([]string{r.Method, r.URL.EscapedPath(), r.URL.RawQuery, canon.String(), fields["SignedHeaders"], payload}, "\n")
	sum := sha256.Sum256([]byte(creq))
	scope := strings.Join(cred[1:], "/")
	mac := func(key []byte, data string) []byte {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(data))
		return m.Sum(nil)
	}
	k := mac([]byte("AWS4"+s.secret), cred[1])
	for _, p := range cred[2:] {
		k = mac(k, p)
	}
	want := hex.EncodeToString(mac(k, "AWS4-HMAC-SHA256\n"+date+"\n"+scope+"\n"+hex.EncodeToString(sum[:])))
	if !hmac.Equal([]byte(fields["Signature"]), []byte(want)) {
		return fmt.Errorf("signature does not match")
	}
	return nil
}

// TestPushToObjectStores: --push-to an S3 bucket (credentials from an
// AWS profile, every request's signature checked) and to an HTTP cache
// that takes PUT; from each, another store substitutes the pushed build
// over HTTP with the real client, which checks the daemon's signature.
func TestPushToObjectStores(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon pushes nothing by itself")
	}
	for _, tc := range []struct {
		name  string
		store *objectStore
		url   func(srv string) (push, read string)
	}{
		{"s3", &objectStore{key: "AKIDE2E", secret: "e2e-secret"}, func(srv string) (string, string) {
			return "s3://fleet?region=eu-north-1&compression=xz&endpoint=" + url.QueryEscape(srv), srv + "/fleet"
		}},
		{"http", &objectStore{}, func(srv string) (string, string) { return srv + "/cache/", srv + "/cache" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			sec, pub := e.generateKey(t, "fleet-objects-1")
			creds := filepath.Join(e.dir, "aws-credentials")
			if err := os.WriteFile(creds, []byte("[ci]\naws_access_key_id = AKIDE2E\naws_secret_access_key = e2e-secret\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			args := e.expr(t, "objects", `rec {
  dep = mk { name = "objects-dep"; script = "echo dep > $out"; };
  top = mk { name = "objects-top"; inherit dep; script = "echo top $dep > $out"; };
}`)
			tc.store.objects = map[string][]byte{}
			srv := httptest.NewServer(tc.store)
			defer srv.Close()
			push, read := tc.url(srv.URL)
			d := e.startDaemon(t, withDaemonArgs("--push-to", push), withConf("secret-key-files = "+sec),
				withDaemonEnv("AWS_PROFILE=ci", "AWS_SHARED_CREDENTIALS_FILE="+creds, "AWS_CONFIG_FILE="+filepath.Join(e.dir, "no-aws-config"),
					"AWS_EC2_METADATA_DISABLED=true", "AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY="))
			top := oneLine(t, "top", d.nixBuild(append(args, "-A", "top", "--no-out-link")...).ok(t))
			narinfo := strings.TrimPrefix(read, srv.URL) + "/" + filepath.Base(top)[:32] + ".narinfo"
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				tc.store.mu.Lock()
				_, ok := tc.store.objects[narinfo]
				refused := slices.Clone(tc.store.refused)
				tc.store.mu.Unlock()
				if len(refused) > 0 {
					t.Fatalf("requests refused: %q", refused)
				}
				if ok {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s was not pushed", narinfo)
				}
			}
			other := e.otherStore("from-" + tc.name)
			e.cmd("nix-store", "--store", directStore(other), "-r", top,
				"--option", "substituters", read, "--option", "trusted-public-keys", pub).ok(t)
			e.local(other, "nix-store", "--verify", "--check-contents").ok(t)
			if got, err := os.ReadFile(filepath.Join(other, top)); err != nil || !strings.HasPrefix(string(got), "top /nix/store/") {
				t.Errorf("%s from the %s cache: %q %v", top, tc.name, got, err)
			}
		})
	}
}

// TestPushQueueHeldAcrossUpgrade: an output a daemon builds and queues for
// pushing while the next daemon has started (an upgrade, the old one
// draining) is held by the next one once the old one has gone, before any
// collection there: it was collected, and then dropped from the queue as
// gone, never pushed.
func TestPushQueueHeldAcrossUpgrade(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nixyard's --push-to and --shutdown-grace")
	}
	e := newEnv(t)
	// The cache cannot be reached: the queue keeps what it is given.
	b := e.startBuildDaemonWith(t, withDaemonArgs("--push-to", deadURL(t), "--shutdown-grace", "1m"))
	old := b.daemon
	next, done := b.upgradeDuringBuild(t, "push-held", "go")
	writeFile(t, filepath.Join(b.marks, "go"), "", 0o644)
	r := <-done
	if r.err != nil {
		t.Fatalf("the build under way during the upgrade:\n%s", r)
	}
	out := oneLine(t, "nix-build", r.stdout)
	select {
	case <-old.exited:
	case <-time.After(time.Minute):
		t.Fatal("the old daemon did not exit once its last connection ended")
	}
	next.nixStore(t, "--gc")
	if !next.isValid(t, out) {
		t.Errorf("%s, queued for pushing by the old daemon, was collected through the new one", out)
	}
	// Held by the queue, not only while a push (to the dead cache) tries
	// it: the collection above may have run during such a try.
	files, _ := filepath.Glob(filepath.Join(next.root, "nix/var/nix/temproots/*"))
	held := false
	for _, f := range files {
		b, _ := os.ReadFile(f)
		held = held || strings.Contains(string(b), out)
	}
	if !held {
		t.Errorf("%s, queued for pushing, is in no temporary roots file of the new daemon", out)
	}
}
