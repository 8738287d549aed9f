package narinfo

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

const dir = storepath.DefaultDir

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkSigned checks ni's signature against pub with the signature package.
func checkSigned(t *testing.T, ni *NarInfo, pub string) {
	t.Helper()
	pk, err := signature.ParsePublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	fp := signature.Fingerprint(dir, ni.StorePath, ni.NarHash, ni.NarSize, ni.References)
	if !signature.VerifyAny(fp, ni.Sigs, []signature.PublicKey{pk}) {
		t.Errorf("%s: signatures %v do not verify", ni.StorePath, ni.Sigs)
	}
}

func TestGolden(t *testing.T) {
	pub := string(readTestdata(t, "nik1.pub"))
	for _, name := range []string{"top.narinfo", "dep.narinfo"} {
		raw := readTestdata(t, name)
		ni, err := Parse(dir, raw)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := ni.Marshal(dir); !bytes.Equal(got, raw) {
			t.Errorf("%s: Marshal differs:\n%s\nwant\n%s", name, got, raw)
		}
		checkSigned(t, ni, pub)
	}
	ni, _ := Parse(dir, readTestdata(t, "top.narinfo"))
	if ni.StorePath.String() != "hvqa8v5c1k3mirayh48y4zv1g3blcbwp-top" ||
		ni.URL != "nar/164amqsb1rqzvj3bjzjiv9n20j1mjnv9qp0jxc1r479rjcs6442p.nar.xz" ||
		ni.Compression != "xz" || ni.FileSize != 172 || ni.NarSize != 160 ||
		ni.FileHash.String() != "sha256:164amqsb1rqzvj3bjzjiv9n20j1mjnv9qp0jxc1r479rjcs6442p" ||
		ni.NarHash.String() != "sha256:1x806ih2vprjzicnpgig2fr80fwsrsa9adc75sv7ka9f73m6vnfh" ||
		len(ni.References) != 1 || ni.References[0].String() != "f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep" ||
		ni.Deriver.String() != "nd6bjm19kxyhmgf6qrsqb7zwiarig9mh-top.drv" || len(ni.Sigs) != 1 || !ni.CA.IsZero() {
		t.Errorf("parsed %+v", ni)
	}
}

const minimal = "StorePath: /nix/store/f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep\n" +
	"URL: nar/x.nar\n" +
	"NarHash: sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv\n" +
	"NarSize: 120\n"

func TestParseDefaultsAndOptional(t *testing.T) {
	ni, err := Parse(dir, []byte(minimal+"Deriver: unknown-deriver\nReferences: \nCA: \nSystem: x86_64-linux\nFutureField: whatever\n"))
	if err != nil {
		t.Fatal(err)
	}
	if ni.Compression != "bzip2" || !ni.Deriver.IsZero() || ni.References != nil || !ni.CA.IsZero() || !ni.FileHash.IsZero() || ni.System != "x86_64-linux" {
		t.Errorf("parsed %+v", ni)
	}
	want := strings.Replace(minimal, "NarHash", "Compression: bzip2\nNarHash", 1) + "References: \nSystem: x86_64-linux\n"
	if got := string(ni.Marshal(dir)); got != want {
		t.Errorf("Marshal =\n%s\nwant\n%s", got, want)
	}
	// Base16 and SRI hashes are accepted; CA is parsed; sigs are sorted and
	// deduplicated on output; references are sorted.
	ni, err = Parse(dir, []byte(strings.Replace(minimal, "sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv",
		"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=", 1)+
		"CA: fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw\nSig: b:x\nSig: a:y\nSig: b:x\n"+
		"References: f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep 0000000000000000000000000000000a-a\n"))
	if err != nil {
		t.Fatal(err)
	}
	if ni.CA.Method != contentaddress.NAR || len(ni.Sigs) != 3 {
		t.Errorf("parsed %+v", ni)
	}
	out := string(ni.Marshal(dir))
	if !strings.Contains(out, "Sig: a:y\nSig: b:x\nCA: fixed:r:sha256:04zw") ||
		!strings.Contains(out, "References: 0000000000000000000000000000000a-a f44j") ||
		!strings.Contains(out, "NarHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw\n") {
		t.Errorf("Marshal =\n%s", out)
	}
}

func TestParseErrors(t *testing.T) {
	r := func(old, new string) string { return strings.Replace(minimal, old, new, 1) }
	for _, tc := range []struct{ in, field string }{
		{"", ""},
		{strings.TrimSuffix(minimal, "\n"), ""},
		{minimal + "\n", ""},
		{minimal + "NoSeparator\n", "line 5"},
		{r("StorePath: /nix/store/f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep\n", ""), "StorePath"},
		{r("/nix/store/f44", "/other/store/f44"), "StorePath"},
		{r("URL: nar/x.nar\n", ""), "URL"},
		{r("nar/x.nar", ""), "URL"},
		{r("NarHash: sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv\n", ""), "NarHash"},
		{r("sha256:00kj", "sha256:xxkj"), "NarHash"},
		{r("sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv", "sha1:0000000000000000000000000000000000000000"), "NarHash"},
		{r("NarSize: 120", "NarSize: 0"), "NarSize"},
		{r("NarSize: 120", "NarSize: -1"), "NarSize"},
		{r("NarSize: 120", "NarSize: 99999999999999999999"), "NarSize"},
		{r("NarSize: 120\n", ""), "NarSize"},
		{minimal + "FileSize: x\n", "FileSize"},
		{minimal + "FileHash: sha256:short\n", "FileHash"},
		{minimal + "URL: again\n", "URL"},
		{minimal + "References: a\n", "References"},
		{minimal + "References: f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep  f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep\n", "References"},
		{minimal + "References: f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep\n", "References"},
		{minimal + "Deriver: /nix/store/nd6bjm19kxyhmgf6qrsqb7zwiarig9mh-top.drv\n", "Deriver"},
		{minimal + "CA: fixed:sha256\n", "CA"},
		{minimal + "Sig: \n", "Sig"},
		{minimal + "Compression: \n", "Compression"},
		{minimal + strings.Repeat("Sig: a:b\n", maxSigs+1), "Sig"},
		{minimal + strings.Repeat("X: y\n", MaxSize/5), ""},
	} {
		_, err := Parse(dir, []byte(tc.in))
		if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("Parse(%.80q) = %v, want an ErrFormat naming %q", tc.in, err, tc.field)
		}
	}
}

func TestNixCacheInfo(t *testing.T) {
	ci, err := ParseNixCacheInfo([]byte("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"))
	if err != nil || ci != (NixCacheInfo{StoreDir: "/nix/store", WantMassQuery: true, Priority: 40, HasPriority: true}) {
		t.Errorf("got %+v, %v", ci, err)
	}
	if got := string(ci.Marshal()); got != "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n" {
		t.Errorf("Marshal = %q", got)
	}
	ci, err = ParseNixCacheInfo([]byte("StoreDir:/s  \ngarbage\nWantMassQuery: yes\nOther: 1"))
	if err != nil || ci != (NixCacheInfo{StoreDir: "/s"}) {
		t.Errorf("got %+v, %v", ci, err)
	}
	for _, in := range []string{"", "WantMassQuery: 1\n", "StoreDir: /nix/store\nPriority: high\n", "StoreDir: /nix/store\nPriority: 99999999999\n",
		"StoreDir: /nix/store\n" + strings.Repeat(" ", MaxCacheInfoSize)} {
		if _, err := ParseNixCacheInfo([]byte(in)); err == nil {
			t.Errorf("ParseNixCacheInfo(%.40q) succeeded", in)
		}
	}
}

// TestRealNix builds two paths in a chroot store, adds a content-addressed
// file, copies them to a file:// cache signed with a fresh key, and checks
// every .narinfo Nix wrote: byte-identical Marshal, fields equal to
// nix path-info --json, signatures that verify; and nix-cache-info.
func TestRealNix(t *testing.T) {
	if _, err := exec.LookPath("nix-build"); err != nil {
		t.Skip("nix not installed")
	}
	tmp := t.TempDir()
	root := filepath.Join(tmp, "root")
	cache := filepath.Join(tmp, "cache")
	run := func(args ...string) []byte {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), "NIX_CONFIG=", "HOME="+tmp, "XDG_CACHE_HOME="+tmp+"/xdg")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr.String())
		}
		return out
	}
	nixCmd := func(args ...string) []byte {
		return run(append([]string{"nix", "--extra-experimental-features", "nix-command", "--option", "substituters", ""}, args...)...)
	}
	bbdir := filepath.Join(tmp, "bb")
	os.Mkdir(bbdir, 0o755)
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("no /bin/busybox")
	}
	os.WriteFile(filepath.Join(bbdir, "busybox"), bb, 0o755)
	nixFile := filepath.Join(tmp, "ni.nix")
	os.WriteFile(nixFile, []byte(`{ bbdir }:
let bb = builtins.path { path = bbdir; name = "busybox-static"; };
    dep = builtins.derivation { name = "dep"; system = builtins.currentSystem; builder = "${bb}/busybox"; args = [ "sh" "-c" "echo dep > $out" ]; };
in builtins.derivation { name = "top"; system = builtins.currentSystem; builder = "${bb}/busybox"; inherit dep; args = [ "sh" "-c" "echo $dep > $out" ]; }
`), 0o644)
	top := strings.TrimSpace(string(run("nix-build", "--option", "substituters", "", "--store", root, nixFile, "--arg", "bbdir", bbdir, "--no-out-link")))
	f := filepath.Join(tmp, "file")
	os.WriteFile(f, []byte("content-addressed\n"), 0o644)
	store := "local?root=" + root
	caPath := strings.TrimSpace(string(run("nix-store", "--store", store, "--add", f)))
	sec, pub := filepath.Join(tmp, "sec"), filepath.Join(tmp, "pub")
	run("nix-store", "--generate-binary-cache-key", "test-1", sec, pub)
	nixCmd("copy", "--to", "file://"+cache+"?secret-key="+sec, "--from", store, top, caPath)

	var infos []struct {
		Path       string   `json:"path"`
		NarHash    string   `json:"narHash"`
		NarSize    uint64   `json:"narSize"`
		References []string `json:"references"`
		Deriver    string   `json:"deriver"`
		CA         string   `json:"ca"`
	}
	if err := json.Unmarshal(nixCmd("path-info", "--json", "--store", store, "-r", top, caPath), &infos); err != nil {
		t.Fatal(err)
	}
	if len(infos) != 3 {
		t.Fatalf("path-info gave %d paths, want 3", len(infos))
	}
	pubKey, _ := os.ReadFile(pub)
	for _, in := range infos {
		p, err := dir.Parse(in.Path)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := os.ReadFile(filepath.Join(cache, p.HashPart()+".narinfo"))
		if err != nil {
			t.Fatal(err)
		}
		ni, err := Parse(dir, raw)
		if err != nil {
			t.Fatalf("%s: %v\n%s", p, err, raw)
		}
		if got := ni.Marshal(dir); !bytes.Equal(got, raw) {
			t.Errorf("%s: Marshal differs:\n%s\nwant\n%s", p, got, raw)
		}
		wantHash, err := hash.Parse(in.NarHash)
		if err != nil {
			t.Fatal(err)
		}
		if ni.StorePath != p || !ni.NarHash.Equal(wantHash) || ni.NarSize != in.NarSize {
			t.Errorf("%s: narinfo says %s %s %d, path-info %s %s %d", p, ni.StorePath, ni.NarHash, ni.NarSize, p, wantHash, in.NarSize)
		}
		var refs []string
		for _, r := range ni.References {
			refs = append(refs, dir.Abs(r))
		}
		if strings.Join(refs, " ") != strings.Join(in.References, " ") {
			t.Errorf("%s: references %v, path-info %v", p, refs, in.References)
		}
		deriver := ""
		if !ni.Deriver.IsZero() {
			deriver = dir.Abs(ni.Deriver)
		}
		if deriver != in.Deriver || ni.CA.String() != in.CA {
			t.Errorf("%s: deriver %q ca %q, path-info %q %q", p, deriver, ni.CA, in.Deriver, in.CA)
		}
		if _, err := os.Stat(filepath.Join(cache, ni.URL)); err != nil {
			t.Errorf("%s: URL: %v", p, err)
		}
		checkSigned(t, ni, string(pubKey))
	}
	ciRaw, err := os.ReadFile(filepath.Join(cache, "nix-cache-info"))
	if err != nil {
		t.Fatal(err)
	}
	ci, err := ParseNixCacheInfo(ciRaw)
	if err != nil || ci.StoreDir != "/nix/store" || ci.HasPriority {
		t.Errorf("nix-cache-info %q: %+v, %v", ciRaw, ci, err)
	}
	if got := ci.Marshal(); !bytes.Equal(got, ciRaw) {
		t.Errorf("nix-cache-info Marshal = %q, Nix wrote %q", got, ciRaw)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	f.Add([]byte(minimal + "References: f44jpqy7ybs5x45xq6xcsa7g6kzlanlp-dep\nCA: text:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw\n"))
	for _, name := range []string{"top.narinfo", "dep.narinfo"} {
		if b, err := os.ReadFile(filepath.Join("testdata", name)); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ni, err := Parse(dir, data)
		if err != nil {
			return
		}
		out := ni.Marshal(dir)
		ni2, err := Parse(dir, out)
		if err != nil {
			t.Fatalf("Parse(Marshal()) failed: %v\n%s", err, out)
		}
		if out2 := ni2.Marshal(dir); !bytes.Equal(out, out2) {
			t.Fatalf("Marshal not stable:\n%s\n%s", out, out2)
		}
		ParseNixCacheInfo(data)
	})
}
