package cache

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ulikunitz/xz"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/store"
)

// debugBuildID is the build ID of the debug file in addDebugPath's path.
const debugBuildID = "ab" + "0123456789abcdef0123456789abcdef012345"

// addDebugPath adds a directory path with an executable, a symlink and a
// debug info file under lib/debug/.build-id.
func addDebugPath(t *testing.T, st *store.Store) *store.PathInfo {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pkg")
	debug := filepath.Join(dir, "lib/debug/.build-id", debugBuildID[:2])
	for _, d := range []string{debug, filepath.Join(dir, "lib/debug/.build-id/zz"), filepath.Join(dir, "bin")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(debug, debugBuildID[2:]+".debug"), "DWARF")
	writeFile(t, filepath.Join(debug, "not-a-build-id.debug"), "x")
	writeFile(t, filepath.Join(dir, "lib/debug/.build-id/zz", debugBuildID[2:]+".debug"), "not hex")
	writeFile(t, filepath.Join(dir, "bin/hello"), strings.Repeat("hello world\n", 4096))
	if err := os.Chmod(filepath.Join(dir, "bin/hello"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("hello", filepath.Join(dir, "bin/hi")); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := nar.DumpPath(&b, dir); err != nil {
		t.Fatal(err)
	}
	info, err := st.AddToStoreContent(t.Context(), "pkg", contentaddress.NAR, hash.SHA256, nil, &b, false)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// TestPushOptions: for each compression a push URL can ask for, the real
// Nix client substitutes the pushed path from the cache and finds it
// intact; the NAR listing is what the real client lists; the debug info
// index names the NAR and the member; a secret-key= key signs too.
func TestPushOptions(t *testing.T) {
	nixStore, err := exec.LookPath("nix-store")
	if err != nil {
		t.Skip("nix-store not installed")
	}
	st := testStore(t)
	info := addDebugPath(t, st)
	keyFile := filepath.Join(t.TempDir(), "key")
	key, pub := testKey(t, keyFile)
	for _, c := range []string{"zstd", "xz", "bzip2", "br", "gzip", "none"} {
		t.Run(c, func(t *testing.T) {
			dir := t.TempDir()
			tg, opts, err := OpenTarget(t.Context(), "file://"+dir+"?compression="+c+"&write-nar-listing=true&index-debug-info=true&secret-key="+keyFile, nil)
			if err != nil {
				t.Fatal(err)
			}
			p, err := NewPusher(t.Context(), st, tg, opts, filepath.Join(t.TempDir(), "queue"), nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Push(t.Context(), info.Path); err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(filepath.Join(dir, info.Path.HashPart()+".narinfo"))
			if err != nil {
				t.Fatal(err)
			}
			ni, err := narinfo.Parse(st.Dir(), data)
			ext := map[string]string{"zstd": ".nar.zst", "xz": ".nar.xz", "bzip2": ".nar.bz2", "br": ".nar.br", "gzip": ".nar", "none": ".nar"}[c]
			if err != nil || ni.Compression != c || !strings.HasSuffix(ni.URL, ext) {
				t.Fatalf("narinfo %+v %v", ni, err)
			}
			// Signed with secret-key='s key (the path is content-addressed:
			// Nix would take it unsigned).
			fp := signature.Fingerprint(st.Dir(), ni.StorePath, ni.NarHash, ni.NarSize, ni.References)
			if !signature.VerifyAny(fp, ni.Sigs, []signature.PublicKey{key.PublicKey()}) {
				t.Errorf("not signed with the secret-key= key: %v", ni.Sigs)
			}
			// The real client, trusting only secret-key='s key.
			other := t.TempDir()
			env := nixEnvFor(t)
			cmd := exec.Command(nixStore, "--store", "local?root="+other, "-r", st.Dir().Abs(info.Path),
				"--option", "substituters", "file://"+dir, "--option", "trusted-public-keys", pub)
			cmd.Env = env
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("nix-store -r from the cache: %v\n%s", err, out)
			}
			cmd = exec.Command(nixStore, "--store", "local?root="+other, "--verify", "--check-contents")
			cmd.Env = env
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("nix-store --verify: %v\n%s", err, out)
			}
			// The listing, against the real client's of the pushed NAR.
			ls, err := os.ReadFile(filepath.Join(dir, info.Path.HashPart()+".ls"))
			if err != nil {
				t.Fatal(err)
			}
			cmd = exec.Command(filepath.Join(filepath.Dir(nixStore), "nix"), "--extra-experimental-features", "nix-command",
				"store", "ls", "--store", "file://"+dir, "--json", "-R", st.Dir().Abs(info.Path))
			cmd.Env = env
			want, err := cmd.Output()
			if err != nil {
				t.Fatalf("nix store ls: %v", err)
			}
			if got := string(ls); got != `{"version":1,"root":`+strings.TrimSpace(string(want))+`}` {
				t.Errorf("listing:\n got %s\nwant the root to be %s", got, want)
			}
			entries, _ := os.ReadDir(filepath.Join(dir, "debuginfo"))
			if len(entries) != 1 || entries[0].Name() != debugBuildID+".debug" {
				t.Fatalf("debuginfo: %v", entries)
			}
			var idx map[string]string
			b, _ := os.ReadFile(filepath.Join(dir, "debuginfo", entries[0].Name()))
			if err := json.Unmarshal(b, &idx); err != nil || idx["archive"] != "../"+ni.URL ||
				idx["member"] != "lib/debug/.build-id/ab/"+debugBuildID[2:]+".debug" {
				t.Errorf("debuginfo entry %s: %v", b, err)
			}
		})
	}
}

// testKey writes a new secret key to file and returns it with its public
// key as nix.conf's trusted-public-keys takes it.
func testKey(t *testing.T, file string) (signature.SecretKey, string) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	k := signature.SecretKey{Name: "push-test-1", Key: priv}
	writeFile(t, file, k.String()+"\n")
	return k, k.PublicKey().String()
}

// nixEnvFor is an environment for the real Nix client that keeps it off
// the machine's own Nix state, configuration and caches.
func nixEnvFor(t *testing.T) []string {
	d := t.TempDir()
	return append(os.Environ(), "NIX_STATE_DIR="+d+"/state", "NIX_CONF_DIR="+d+"/conf", "NIX_LOG_DIR="+d+"/log",
		"HOME="+d, "XDG_CACHE_HOME="+d+"/cache")
}

// TestCompressionLevels: each method compresses at the level asked for.
func TestCompressionLevels(t *testing.T) {
	// Text of words drawn at random from a vocabulary: compressible, with
	// the longer matches and wider statistics that higher levels find.
	rng := rand.New(rand.NewChaCha8([32]byte{7}))
	var vocab []string
	for i := range 2000 {
		vocab = append(vocab, fmt.Sprintf("%x", rng.Uint64()>>(i%40+10)))
	}
	var data []byte
	for len(data) < 512<<10 {
		data = append(append(data, vocab[rng.IntN(len(vocab))]...), " \n"[rng.IntN(2)])
	}
	for _, c := range []string{"zstd", "xz", "bzip2", "br", "gzip"} {
		sizes := map[int]int{}
		for _, level := range []int{levels[c][0], levels[c][1]} {
			var b bytes.Buffer
			w, err := Options{Compression: c, Level: level}.compressor(&b)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(data); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			sizes[level] = b.Len()
		}
		if lo, hi := sizes[levels[c][0]], sizes[levels[c][1]]; hi >= lo {
			t.Errorf("%s: level %d made %d bytes, level %d %d", c, levels[c][0], lo, levels[c][1], hi)
		}
	}
}

// TestCompressorFailures: a compressing command whose output cannot be
// written says so, rather than that it died of a broken pipe; without
// the xz command, xz is written by the pure-Go encoder.
func TestCompressorFailures(t *testing.T) {
	full := errors.New("no space left on the test's device")
	w, err := Options{Compression: "xz", Level: -1}.compressor(failingWriter{full})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 4<<20)
	rand.NewChaCha8([32]byte{3}).Read(data)
	_, err = w.Write(data)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if !errors.Is(err, full) || !strings.Contains(err.Error(), "writing xz's output") {
		t.Errorf("error %v, want one naming the output's failure", err)
	}

	t.Setenv("PATH", "")
	var b bytes.Buffer
	if w, err = (Options{Compression: "xz", Level: 1}).compressor(&b); err != nil {
		t.Fatal(err)
	}
	if _, ok := w.(*procCompressor); ok {
		t.Fatal("an xz command was used without one on PATH")
	}
	if _, err := w.Write(data[:1<<20]); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := xz.NewReader(&b)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(r); err != nil || !bytes.Equal(got, data[:1<<20]) {
		t.Errorf("the pure-Go xz stream does not decompress to its input (%v)", err)
	}
}

type failingWriter struct{ err error }

func (f failingWriter) Write([]byte) (int, error) { return 0, f.err }
