package signature

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// Produced by: nix-store --generate-binary-cache-key k1 sec pub (Nix 2.8.0),
// then nix-store --store 'local?root=R' --add f (f = "hello\n"),
// nix store sign --key-file sec, nix path-info --json.
const (
	goldenSec  = "k1:nEfrvQ7kS6RWWpyGLtBqqQ4vu4QHZxWKnnk9p/sOcilrWmavWfhPlvk2NiNq64ECaB3mtgrUdcFHzz2lwZ/IEw=="
	goldenPub  = "k1:a1pmr1n4T5b5NjYjauuBAmgd5rYK1HXBR889pcGfyBM="
	goldenPath = "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f"
	goldenNar  = "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM="
	goldenSize = 120
	goldenSig  = "k1:h7fNkhCaORwaY1QR4ZamTD4XCA6buFqUOcdBFSJrfOfmMwWSeyxy0i1BKdT2zMlnHcxrdmFaf0UsXu0EkabeDQ=="
)

func mustPath(t *testing.T, base string) storepath.Path {
	t.Helper()
	p, err := storepath.ParseBase(base)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestGolden(t *testing.T) {
	sk, err := ParseSecretKey(goldenSec)
	if err != nil {
		t.Fatal(err)
	}
	pk, err := ParsePublicKey(goldenPub + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if got := sk.PublicKey().String(); got != goldenPub {
		t.Errorf("PublicKey() = %s, want %s", got, goldenPub)
	}
	if sk.String() != goldenSec {
		t.Errorf("SecretKey.String() = %s", sk.String())
	}
	nh, err := hash.Parse(goldenNar)
	if err != nil {
		t.Fatal(err)
	}
	fp := Fingerprint(storepath.DefaultDir, mustPath(t, goldenPath), nh, goldenSize, nil)
	if want := "1;/nix/store/" + goldenPath + ";sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;"; fp != want {
		// The nix32 of a recursive sha256 over a one-file NAR equals the CA
		// hash nix path-info printed: fixed:r:sha256:04zw….
		t.Errorf("fingerprint = %q, want %q", fp, want)
	}
	if got := sk.Sign(fp); got != goldenSig {
		t.Errorf("Sign = %s, want %s", got, goldenSig)
	}
	keys := []PublicKey{pk}
	if !Verify(fp, goldenSig, keys) {
		t.Error("Verify rejected Nix's signature")
	}
	if Verify(fp+"x", goldenSig, keys) {
		t.Error("Verify accepted a signature of another fingerprint")
	}
	other := PublicKey{Name: "k2", Key: pk.Key}
	if Verify(fp, goldenSig, []PublicKey{other}) {
		t.Error("Verify accepted a signature under a key of another name")
	}
	if !VerifyAny(fp, []string{"junk", "k9:" + strings.Repeat("A", 88), goldenSig}, keys) {
		t.Error("VerifyAny rejected a list holding a good signature")
	}
	if VerifyAny(fp, []string{"junk", ""}, keys) || VerifyAny(fp, nil, keys) {
		t.Error("VerifyAny accepted without a good signature")
	}
}

func TestParseErrors(t *testing.T) {
	for _, s := range []string{
		"", "nocolon", ":a1pmr1n4T5b5NjYjauuBAmgd5rYK1HXBR889pcGfyBM=",
		"k1:not base64!", "k1:AAAA", "k1:" + strings.Repeat("A", maxKeyLen),
		goldenSec, // 64 bytes is not a public key
	} {
		if _, err := ParsePublicKey(s); err == nil {
			t.Errorf("ParsePublicKey(%q) succeeded", s)
		}
	}
	for _, s := range []string{"", "k1:AAAA", goldenPub,
		// seed of goldenSec with a wrong public half
		"k1:nEfrvQ7kS6RWWpyGLtBqqQ4vu4QHZxWKnnk9p/sOcilrWmavWfhPlvk2NiNq64ECaB3mtgrUdcFHzz2lwZ/IEA=="} {
		if _, err := ParseSecretKey(s); err == nil {
			t.Errorf("ParseSecretKey(%q) succeeded", s)
		}
	}
	if _, err := ParsePublicKeys([]string{goldenPub, "bad"}); err == nil || !strings.Contains(err.Error(), "key 1") {
		t.Errorf("ParsePublicKeys error = %v, want one naming key 1", err)
	}
}

func TestFingerprintSortsRefs(t *testing.T) {
	a := mustPath(t, "00000000000000000000000000000000-a")
	b := mustPath(t, "11111111111111111111111111111111-b")
	nh := hash.Sum(hash.SHA256, nil)
	got := Fingerprint("/s", a, nh, 7, []storepath.Path{b, a, b})
	want := "1;/s/" + a.String() + ";" + nh.String() + ";7;/s/" + a.String() + ",/s/" + b.String()
	if got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestRealNix generates a key with Nix, signs a .drv that has references
// (so the fingerprint's reference list is exercised) with nix store sign,
// and checks that we verify Nix's signature and produce the same one.
func TestRealNix(t *testing.T) {
	if _, err := exec.LookPath("nix-store"); err != nil {
		t.Skip("nix not installed")
	}
	tmp := t.TempDir()
	root := filepath.Join(tmp, "root")
	run := func(args ...string) []byte {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), "NIX_CONFIG=", "HOME="+tmp, "XDG_CACHE_HOME="+tmp+"/cache")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr.String())
		}
		return out
	}
	secFile, pubFile := filepath.Join(tmp, "sec"), filepath.Join(tmp, "pub")
	run("nix-store", "--generate-binary-cache-key", "test-key-1", secFile, pubFile)
	secText, _ := os.ReadFile(secFile)
	pubText, _ := os.ReadFile(pubFile)
	sk, err := ParseSecretKey(string(secText))
	if err != nil {
		t.Fatal(err)
	}
	pk, err := ParsePublicKey(string(pubText))
	if err != nil {
		t.Fatal(err)
	}
	if !sk.PublicKey().Key.Equal(pk.Key) || sk.PublicKey().Name != pk.Name {
		t.Fatalf("public key %s does not match secret key's %s", pk, sk.PublicKey())
	}
	nixFile := filepath.Join(tmp, "d.nix")
	os.WriteFile(nixFile, []byte(`
let a = builtins.derivation { name = "a"; system = "x86_64-linux"; builder = "/bin/busybox"; args = ["true"]; };
    s = builtins.toFile "s.txt" "src";
in builtins.derivation { name = "b"; system = "x86_64-linux"; builder = "/bin/busybox"; args = ["true"]; inherit a s; }
`), 0o644)
	drv := strings.TrimSpace(string(run("nix-instantiate", "--store", root, nixFile)))
	store := "local?root=" + root
	run("nix", "--extra-experimental-features", "nix-command", "store", "sign", "--option", "substituters", "", "--derivation", "--store", store, "--key-file", secFile, drv)
	var infos []struct {
		Path       string   `json:"path"`
		NarHash    string   `json:"narHash"`
		NarSize    uint64   `json:"narSize"`
		References []string `json:"references"`
		Signatures []string `json:"signatures"`
	}
	if err := json.Unmarshal(run("nix", "--extra-experimental-features", "nix-command", "path-info", "--option", "substituters", "", "--derivation", "--json", "--store", store, drv), &infos); err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 || len(infos[0].Signatures) != 1 || len(infos[0].References) != 2 {
		t.Fatalf("unexpected path-info: %+v", infos)
	}
	in := infos[0]
	dir := storepath.DefaultDir
	p, err := dir.Parse(in.Path)
	if err != nil {
		t.Fatal(err)
	}
	var refs []storepath.Path
	for _, r := range in.References {
		rp, err := dir.Parse(r)
		if err != nil {
			t.Fatal(err)
		}
		refs = append([]storepath.Path{rp}, refs...) // reversed: Fingerprint must sort
	}
	nh, err := hash.Parse(in.NarHash)
	if err != nil {
		t.Fatal(err)
	}
	fp := Fingerprint(dir, p, nh, in.NarSize, refs)
	if !Verify(fp, in.Signatures[0], []PublicKey{pk}) {
		t.Errorf("Verify rejected Nix's signature %s of %q", in.Signatures[0], fp)
	}
	if got := sk.Sign(fp); got != in.Signatures[0] {
		t.Errorf("Sign = %s, Nix signed %s", got, in.Signatures[0])
	}
}

func FuzzParseKey(f *testing.F) {
	for _, s := range []string{goldenPub, goldenSec, goldenSig, "k1:AAAA", ":", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if pk, err := ParsePublicKey(s); err == nil {
			again, err := ParsePublicKey(pk.String())
			if err != nil || again.String() != pk.String() {
				t.Fatalf("public key %q does not round-trip: %v", s, err)
			}
		}
		if sk, err := ParseSecretKey(s); err == nil {
			fp := "1;x;y;0;"
			if !Verify(fp, sk.Sign(fp), []PublicKey{sk.PublicKey()}) {
				t.Fatalf("secret key %q: own signature does not verify", s)
			}
		}
		Verify("fp", s, nil)
	})
}
