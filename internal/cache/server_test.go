package cache

import (
	"crypto/ed25519"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
)

func get(t *testing.T, method, url string) (int, string, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), resp.Header
}

// TestServer: a path's narinfo (signed with the server's key, with the
// path's references and content address) and its NAR (whose hash and
// size the narinfo gives), and what is not there.
func TestServer(t *testing.T) {
	st := testStore(t)
	dep, top := addPair(t, st)
	_, priv, _ := ed25519.GenerateKey(nil)
	key := signature.SecretKey{Name: "test-cache-1", Key: priv}
	srv := httptest.NewServer(New(st, Config{SecretKeys: []signature.SecretKey{key}}))
	defer srv.Close()

	if code, body, _ := get(t, "GET", srv.URL+"/nix-cache-info"); code != 200 || body != "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n" {
		t.Errorf("nix-cache-info: %d %q", code, body)
	}
	code, body, hdr := get(t, "GET", srv.URL+"/"+top.Path.HashPart()+".narinfo")
	if code != 200 || hdr.Get("Content-Type") != "text/x-nix-narinfo" {
		t.Fatalf("narinfo: %d %q", code, body)
	}
	ni, err := narinfo.Parse(st.Dir(), []byte(body))
	if err != nil {
		t.Fatalf("narinfo %q: %v", body, err)
	}
	fp := signature.Fingerprint(st.Dir(), ni.StorePath, ni.NarHash, ni.NarSize, ni.References)
	if ni.StorePath != top.Path || ni.Compression != "none" || len(ni.References) != 1 || ni.References[0] != dep.Path || !ni.NarHash.Equal(top.NarHash) || ni.NarSize != top.NarSize ||
		ni.CA.IsZero() || !signature.VerifyAny(fp, ni.Sigs, []signature.PublicKey{key.PublicKey()}) {
		t.Errorf("narinfo: %+v", ni)
	}
	code, nar, hdr := get(t, "GET", srv.URL+"/"+ni.URL)
	if code != 200 || uint64(len(nar)) != ni.NarSize || !hash.Sum(hash.SHA256, []byte(nar)).Equal(ni.NarHash) || hdr.Get("Content-Type") != "application/x-nix-nar" {
		t.Errorf("NAR: %d, %d bytes, want %d with hash %s", code, len(nar), ni.NarSize, ni.NarHash)
	}
	if code, body, _ := get(t, "HEAD", srv.URL+"/"+ni.URL); code != 200 || body != "" {
		t.Errorf("HEAD of the NAR: %d %q", code, body)
	}
	for _, path := range []string{
		"/00000000000000000000000000000000.narinfo", // no such path
		"/x.narinfo", // not a hash part
		"/nar/" + top.Path.HashPart() + "-0abc.nar",  // another NAR hash
		"/nar/" + dep.Path.HashPart() + ".nar",       // no NAR hash
		"/" + top.Path.HashPart() + ".narinfo/extra", // not a narinfo
	} {
		if code, _, _ := get(t, "GET", srv.URL+path); code != 404 {
			t.Errorf("GET %s: %d, want 404", path, code)
		}
	}
	if code, _, _ := get(t, "POST", srv.URL+"/nix-cache-info"); code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d", code)
	}
}
