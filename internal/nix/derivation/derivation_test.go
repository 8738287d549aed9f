package derivation

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// instantiate runs nix-instantiate on testdata/drvs.nix into a fresh chroot
// store and returns the directory holding the .drv files.
func instantiate(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("nix-instantiate"); err != nil {
		t.Skip("nix not installed")
	}
	tmp := t.TempDir()
	root := filepath.Join(tmp, "root")
	src, err := filepath.Abs("testdata/drvs.nix")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nix-instantiate", "--store", root, src)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=", "HOME="+tmp, "XDG_CACHE_HOME="+tmp+"/cache")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nix-instantiate: %v\n%s", err, stderr.String())
	}
	if n := len(strings.Fields(string(out))); n != 9 {
		t.Fatalf("nix-instantiate printed %d paths, want 9:\n%s", n, out)
	}
	return filepath.Join(root, "nix", "store")
}

// chrootLoader loads /nix/store/... drv paths from the chroot store dir.
func chrootLoader(storeDir string, loads *int) Loader {
	return func(ctx context.Context, drvPath string) (*Derivation, error) {
		*loads++
		return ParseFile(filepath.Join(storeDir, filepath.Base(drvPath)))
	}
}

func TestRealDerivations(t *testing.T) {
	storeDir := instantiate(t)
	files, err := filepath.Glob(filepath.Join(storeDir, "*.drv"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 9 {
		t.Fatalf("%d .drv files, want 9", len(files))
	}
	dir := storepath.DefaultDir
	loads := 0
	load := chrootLoader(storeDir, &loads)
	cache := map[string]hash.Hash{}
	kinds := map[Kind]int{}
	for _, f := range files {
		base := filepath.Base(f)
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		d, err := ParseFile(f)
		if err != nil {
			t.Fatalf("%s: %v", base, err)
		}
		if got := d.Bytes(); !bytes.Equal(got, raw) {
			t.Errorf("%s: Bytes differs from Nix's:\n got %s\nwant %s", base, got, raw)
		}
		refs, err := d.References(dir)
		if err != nil {
			t.Fatalf("%s: %v", base, err)
		}
		p, err := dir.MakeTextPath(d.Name+".drv", hash.Sum(hash.SHA256, raw), refs)
		if err != nil {
			t.Fatal(err)
		}
		if p.String() != base {
			t.Errorf("text path of %s computed as %s", base, p)
		}
		if err := d.CheckOutputPaths(context.Background(), dir, load, cache); err != nil {
			t.Errorf("%s: CheckOutputPaths: %v", base, err)
		}
		k, err := d.Kind()
		if err != nil {
			t.Fatalf("%s: %v", base, err)
		}
		kinds[k]++
	}
	if kinds[FixedOutput] != 6 || kinds[InputAddressed] != 3 {
		t.Errorf("kinds = %v, want 6 fixed-output and 3 input-addressed", kinds)
	}
	// Input derivations are loaded once each thanks to the cache: fixed-flat
	// twice (two of them), fixed-rec, multi, c1.
	if loads != 5 {
		t.Errorf("loader called %d times, want 5", loads)
	}
}

func readDrv(t *testing.T, storeDir, suffix string) (*Derivation, string) {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(storeDir, "*-"+suffix+".drv"))
	if err != nil || len(m) != 1 {
		t.Fatalf("glob %s: %v %v", suffix, m, err)
	}
	d, err := ParseFile(m[0])
	if err != nil {
		t.Fatal(err)
	}
	return d, m[0]
}

func TestTampered(t *testing.T) {
	storeDir := instantiate(t)
	dir := storepath.DefaultDir
	ctx := context.Background()
	loads := 0
	load := chrootLoader(storeDir, &loads)

	// An output path swapped for another valid one.
	c2, _ := readDrv(t, storeDir, "c2")
	o := c2.Outputs["out"]
	o.Path = "/nix/store/00000000000000000000000000000000-c2"
	c2.Outputs["out"] = o
	if err := c2.CheckOutputPaths(ctx, dir, load, nil); err == nil || !strings.Contains(err.Error(), `output "out" has path`) {
		t.Errorf("tampered output path: err = %v", err)
	}

	// The env variable out disagreeing with the output path.
	c2, _ = readDrv(t, storeDir, "c2")
	c2.Env["out"] = "/nix/store/00000000000000000000000000000000-c2"
	if err := c2.CheckOutputPaths(ctx, dir, load, nil); !errors.Is(err, ErrFormat) {
		t.Error("tampered env out accepted")
	}

	// Any other change to the derivation changes its hash, so the paths
	// written in it no longer match.
	multi, _ := readDrv(t, storeDir, "multi")
	multi.Args = append(multi.Args, "extra")
	if err := multi.CheckOutputPaths(ctx, dir, load, nil); !errors.Is(err, ErrFormat) {
		t.Error("changed args accepted")
	}

	// A changed input derivation changes the dependent's hash: c2 loaded
	// with a multi.drv whose builder differs.
	c2, _ = readDrv(t, storeDir, "c2")
	badLoad := func(ctx context.Context, p string) (*Derivation, error) {
		d, err := load(ctx, p)
		if err == nil && d.Name == "multi" {
			d.Builder = "/bin/sh"
		}
		return d, err
	}
	if err := c2.CheckOutputPaths(ctx, dir, badLoad, nil); !errors.Is(err, ErrFormat) {
		t.Error("changed input derivation accepted")
	}

	// A fixed output whose hash changed no longer matches its path.
	ff, _ := readDrv(t, storeDir, "fixed-rec")
	o = ff.Outputs["out"]
	o.Hash = strings.Repeat("0", 64)
	ff.Outputs["out"] = o
	if err := ff.CheckOutputPaths(ctx, dir, load, nil); !errors.Is(err, ErrFormat) {
		t.Error("fixed output with a changed hash accepted")
	}
	// flat vs recursive matters too.
	ff, _ = readDrv(t, storeDir, "fixed-rec")
	o = ff.Outputs["out"]
	o.HashAlgo = "sha256"
	ff.Outputs["out"] = o
	if err := ff.CheckOutputPaths(ctx, dir, load, nil); !errors.Is(err, ErrFormat) {
		t.Error("fixed output with a changed method accepted")
	}

	// A loader failure is reported with the input's path.
	c2, _ = readDrv(t, storeDir, "c2")
	boom := errors.New("boom")
	failLoad := func(context.Context, string) (*Derivation, error) { return nil, boom }
	if err := c2.CheckOutputPaths(ctx, dir, failLoad, nil); !errors.Is(err, boom) || !strings.Contains(err.Error(), "-c1.drv") && !strings.Contains(err.Error(), "-multi.drv") {
		t.Errorf("loader error = %v", err)
	}
}

// TestFixedOutputPathMatchesNix cross-checks the fixed-output path against
// nix-store --print-fixed-path, independently of the .drv files.
func TestFixedOutputPathMatchesNix(t *testing.T) {
	storeDir := instantiate(t)
	for _, name := range []string{"fixed-flat", "fixed-rec", "fixed-sha1", "fixed-sha512", "fixed-md5"} {
		m, _ := filepath.Glob(filepath.Join(storeDir, "*-"+name+".drv"))
		d, err := ParseFile(m[0])
		if err != nil {
			t.Fatal(err)
		}
		o := d.Outputs["out"]
		algo, recursive := strings.CutPrefix(o.HashAlgo, "r:")
		args := []string{"--print-fixed-path"}
		if recursive {
			args = append(args, "--recursive")
		}
		args = append(args, algo, o.Hash, d.Name)
		out, err := exec.Command("nix-store", args...).Output()
		if err != nil {
			t.Fatalf("nix-store %v: %v", args, err)
		}
		if got := strings.TrimSpace(string(out)); got != o.Path {
			t.Errorf("%s: nix-store --print-fixed-path = %s, drv says %s", name, got, o.Path)
		}
	}
}

func TestKindAndNotSupported(t *testing.T) {
	ctx := context.Background()
	noLoad := func(context.Context, string) (*Derivation, error) { return nil, errors.New("unexpected load") }
	base := func(outs map[string]Output) *Derivation {
		return &Derivation{Name: "x", Outputs: outs, InputDrvs: map[string][]string{}, Env: map[string]string{}}
	}
	for _, tc := range []struct {
		outs map[string]Output
		kind Kind
	}{
		{map[string]Output{"out": {HashAlgo: "r:sha256"}, "dev": {HashAlgo: "r:sha256"}}, FloatingCA},
		{map[string]Output{"out": {}}, Deferred},
		{map[string]Output{"out": {HashAlgo: "r:sha256", Hash: "impure"}}, Impure},
	} {
		d := base(tc.outs)
		k, err := d.Kind()
		if err != nil || k != tc.kind {
			t.Errorf("Kind = %v, %v; want %v", k, err, tc.kind)
		}
		if _, err := HashModulo(ctx, d, noLoad, nil); !errors.Is(err, ErrNotSupported) {
			t.Errorf("%v: HashModulo err = %v, want ErrNotSupported", tc.kind, err)
		}
		if err := d.CheckOutputPaths(ctx, storepath.DefaultDir, noLoad, nil); !errors.Is(err, ErrNotSupported) {
			t.Errorf("%v: CheckOutputPaths err = %v, want ErrNotSupported", tc.kind, err)
		}
	}
	fixed := Output{Path: "/nix/store/00000000000000000000000000000000-x", HashAlgo: "sha1", Hash: strings.Repeat("a", 40)}
	for _, outs := range []map[string]Output{
		{},
		{"out": fixed, "dev": fixed},
		{"dev": fixed},
		{"out": fixed, "dev": {Path: fixed.Path}},
		{"out": {HashAlgo: "r:sha256"}, "dev": {HashAlgo: "sha1"}},
	} {
		if k, err := base(outs).Kind(); err == nil {
			t.Errorf("Kind(%v) = %v, want an error", outs, k)
		}
	}
}

// TestHashModuloInputNotSupported: an input-addressed derivation whose input
// is floating content-addressed is refused, not hashed wrongly.
func TestHashModuloInputNotSupported(t *testing.T) {
	in := &Derivation{Name: "in", Outputs: map[string]Output{"out": {HashAlgo: "r:sha256"}}}
	d := &Derivation{Name: "x",
		Outputs:   map[string]Output{"out": {}}, // deferred itself would be refused first
		InputDrvs: map[string][]string{"/nix/store/00000000000000000000000000000000-in.drv": {"out"}},
	}
	d.Outputs["out"] = Output{Path: "/nix/store/00000000000000000000000000000000-x"}
	load := func(context.Context, string) (*Derivation, error) { return in, nil }
	if _, err := HashModulo(context.Background(), d, load, nil); !errors.Is(err, ErrNotSupported) {
		t.Errorf("err = %v, want ErrNotSupported", err)
	}
	// A cycle made by a lying loader is refused.
	d.InputDrvs = map[string][]string{"/nix/store/00000000000000000000000000000000-x.drv": {"out"}}
	cyc := func(context.Context, string) (*Derivation, error) { return d, nil }
	if _, err := HashModulo(context.Background(), d, cyc, nil); err == nil || !strings.Contains(err.Error(), "depends on itself") {
		t.Errorf("cycle: err = %v", err)
	}
}

const okDrv = `Derive([("out","/nix/store/w820yxin79rb8qpy473i07r8mvpxppgg-c2","","")],[("/nix/store/66nn967dvzr0h8aqlqjq6jzwkac986f5-multi.drv",["dev","out"])],["/nix/store/mah1kvppfy3l1ww31xrvv5xszinaf9sa-s.txt"],"x86_64-linux","/bin/busybox",["sh","-c","a\"b\\c\nd\re\tf"],[("out","/nix/store/w820yxin79rb8qpy473i07r8mvpxppgg-c2"),("x\ty","")])`

func TestParse(t *testing.T) {
	d, err := Parse([]byte(okDrv), "c2")
	if err != nil {
		t.Fatal(err)
	}
	if d.Args[2] != "a\"b\\c\nd\re\tf" || d.Env["x\ty"] != "" || d.Platform != "x86_64-linux" {
		t.Errorf("parsed %+v", d)
	}
	if got := string(d.Bytes()); got != okDrv {
		t.Errorf("Bytes = %s", got)
	}
	// Bytes sorts what a caller left unsorted.
	d.InputSrcs = []string{"/nix/store/b0000000000000000000000000000000-b", "/nix/store/a0000000000000000000000000000000-a"}
	d.InputDrvs["/nix/store/66nn967dvzr0h8aqlqjq6jzwkac986f5-multi.drv"] = []string{"out", "dev"}
	if !strings.Contains(string(d.Bytes()), `["dev","out"])],["/nix/store/a000`) {
		t.Errorf("Bytes does not sort: %s", d.Bytes())
	}
}

func TestParseErrors(t *testing.T) {
	r := strings.NewReplacer
	for name, s := range map[string]string{
		"empty":               "",
		"prefix":              "Derivation(" + okDrv[7:],
		"trailing":            okDrv + "\n",
		"truncated":           okDrv[:len(okDrv)-3],
		"unknown escape":      r(`\nd`, `\qd`).Replace(okDrv),
		"raw newline in arg":  r(`\nd`, "\nd").Replace(okDrv),
		"escape in platform":  r(`"x86_64-linux"`, `"x86\\_64"`).Replace(okDrv),
		"relative input src":  r(`"/nix/store/mah1`, `"nix/store/mah1`).Replace(okDrv),
		"bad input src name":  r(`-s.txt"`, `-s!txt"`).Replace(okDrv),
		"input not a drv":     r(`-multi.drv"`, `-multi"`).Replace(okDrv),
		"duplicate output":    r(`[("out",`, `[("out","/nix/store/w820yxin79rb8qpy473i07r8mvpxppgg-c2","",""),("out",`).Replace(okDrv),
		"duplicate env":       r(`,("x\ty","")`, `,("x\ty",""),("x\ty","")`).Replace(okDrv),
		"duplicate in set":    r(`["dev","out"]`, `["out","out"]`).Replace(okDrv),
		"hash without algo":   r(`-c2","","")`, `-c2","","00")`).Replace(okDrv),
		"bad hash algo":       r(`-c2","","")`, `-c2","sha3","00")`).Replace(okDrv),
		"short fixed hash":    r(`-c2","","")`, `-c2","sha256","00")`).Replace(okDrv),
		"nix32 fixed hash":    r(`-c2","","")`, `-c2","sha1","0000000000000000000000000000000a")`).Replace(okDrv),
		"floating with path":  r(`-c2","","")`, `-c2","r:sha256","")`).Replace(okDrv),
		"missing comma":       r(`],["/nix/store/mah1`, `]["/nix/store/mah1`).Replace(okDrv),
		"leading comma":       r(`[("out","/nix`, `[,("out","/nix`).Replace(okDrv),
		"trailing list comma": r(`"dev","out"]`, `"dev","out",]`).Replace(okDrv),
		"bad output name":     r(`("out","/nix`, `("o/t","/nix`).Replace(okDrv),
	} {
		if _, err := Parse([]byte(s), "c2"); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: err = %v, want ErrFormat", name, err)
		}
	}
	big := make([]byte, MaxSize+1)
	if _, err := Parse(big, "x"); err == nil {
		t.Error("oversized input accepted")
	}
}

func TestParseFileName(t *testing.T) {
	tmp := t.TempDir()
	for _, name := range []string{"notastorepath.drv", "w820yxin79rb8qpy473i07r8mvpxppgg-c2"} {
		f := filepath.Join(tmp, name)
		os.WriteFile(f, []byte(okDrv), 0o644)
		if _, err := ParseFile(f); err == nil {
			t.Errorf("ParseFile(%s) succeeded", name)
		}
	}
	f := filepath.Join(tmp, "lxcrqjvaviq4ai3fibh7cqpvv3d3gyn7-c2.drv")
	os.WriteFile(f, []byte(okDrv), 0o644)
	d, err := ParseFile(f)
	if err != nil || d.Name != "c2" {
		t.Errorf("ParseFile = %+v, %v", d, err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(okDrv))
	f.Add([]byte(`Derive([("out","","r:sha256","")],[],[],"","",[],[])`))
	f.Add([]byte(`Derive([("out","/nix/store/00000000000000000000000000000000-x","sha1","aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")],[],[],"","",[],[])`))
	if files, _ := filepath.Glob("testdata/*.drv"); len(files) > 0 {
		for _, file := range files {
			if b, err := os.ReadFile(file); err == nil {
				f.Add(b)
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Parse(data, "x")
		if err != nil {
			return
		}
		out := d.Bytes()
		if !bytes.Equal(out, data) {
			// Accepted input may be unsorted; it must then be stable
			// after one normalisation.
			d2, err := Parse(out, "x")
			if err != nil {
				t.Fatalf("Parse(Bytes()) failed: %v\n%s", err, out)
			}
			if !bytes.Equal(d2.Bytes(), out) {
				t.Fatalf("Bytes not stable:\n%s\n%s", out, d2.Bytes())
			}
		}
		d.Kind()
		d.References(storepath.DefaultDir)
	})
}

// TestHashCache: a shared HashCache gives the same results as a per-call
// map, loads each input derivation once across calls, is safe for
// concurrent use and stays within its bound.
func TestHashCache(t *testing.T) {
	storeDir := instantiate(t)
	files, err := filepath.Glob(filepath.Join(storeDir, "*.drv"))
	if err != nil {
		t.Fatal(err)
	}
	dir := storepath.DefaultDir
	var drvs []*Derivation
	for _, f := range files {
		d, err := ParseFile(f)
		if err != nil {
			t.Fatal(err)
		}
		drvs = append(drvs, d)
	}
	var mu sync.Mutex
	loads := 0
	unsafeLoad := chrootLoader(storeDir, new(int)) // counts without locking
	inner := func(ctx context.Context, p string) (*Derivation, error) {
		mu.Lock()
		defer mu.Unlock()
		return unsafeLoad(ctx, p)
	}
	load := func(ctx context.Context, p string) (*Derivation, error) {
		mu.Lock()
		loads++
		mu.Unlock()
		return inner(ctx, p)
	}
	c := NewHashCache(0)
	for range 2 {
		var wg sync.WaitGroup
		for _, d := range drvs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := c.CheckOutputPaths(context.Background(), d, dir, load); err != nil {
					t.Errorf("%s: %v", d.Name, err)
				}
				want, err1 := HashModulo(context.Background(), d, inner, nil)
				got, err2 := c.HashModulo(context.Background(), d, load)
				if err1 != nil || err2 != nil || !got.Equal(want) {
					t.Errorf("%s: HashModulo %v (%v), want %v (%v)", d.Name, got, err2, want, err1)
				}
			}()
		}
		wg.Wait()
	}
	// Concurrent first calls may each load an input once; the second
	// round loads nothing.
	if c.Len() != 5 || loads > 5*len(drvs) {
		t.Errorf("cache holds %d hashes after %d loads, want 5 (fixed-flat ×2, fixed-rec, multi, c1)", c.Len(), loads)
	}
	before := loads
	for _, d := range drvs {
		if err := c.CheckOutputPaths(context.Background(), d, dir, load); err != nil {
			t.Fatal(err)
		}
	}
	if loads != before {
		t.Errorf("warm cache: %d more loads, want 0", loads-before)
	}
	small := NewHashCache(2)
	for _, d := range drvs {
		if err := small.CheckOutputPaths(context.Background(), d, dir, load); err != nil {
			t.Fatal(err)
		}
		if small.Len() > 2 {
			t.Fatalf("bounded cache holds %d entries, max 2", small.Len())
		}
	}
}
