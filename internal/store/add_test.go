package store

import (
	"bytes"
	"compress/bzip2"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// assertNothing checks that p is neither registered nor on disk.
func assertNothing(t *testing.T, s *Store, p storepath.Path) {
	t.Helper()
	if ok, err := s.IsValidPath(context.Background(), p); ok || err != nil {
		t.Errorf("%s valid=%v err=%v", p, ok, err)
	}
	ents, _ := os.ReadDir(s.realDir)
	for _, e := range ents {
		if e.Name() != ".links" {
			t.Errorf("left in store: %s", e.Name())
		}
	}
}

func TestAddRefusals(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	data := narOf(t, map[string]string{"f": "content"})
	good := caNARInfo(t, s, "x", data, nil)
	missing, _ := storepath.ParseBase("11111111111111111111111111111111-missing")
	inputAddressed, _ := storepath.ParseBase("22222222222222222222222222222222-ia")

	for _, tc := range []struct {
		name string
		mod  func(*PathInfo)
		opts AddOptions
		want string
	}{
		{"nar hash", func(i *PathInfo) { i.NarHash = hash.Sum(hash.SHA256, []byte("other")) }, AddOptions{}, "hash mismatch"},
		{"nar size", func(i *PathInfo) { i.NarSize++ }, AddOptions{}, "size mismatch"},
		{"missing reference", func(i *PathInfo) { i.References = []storepath.Path{missing}; i.CA = "" }, AddOptions{}, "because its reference '/nix/store/11111111111111111111111111111111-missing' is not valid"},
		{"bad signature", func(i *PathInfo) { i.Path = inputAddressed; i.CA = ""; i.Sigs = []string{"k:AAAA"} }, AddOptions{CheckSigs: true}, "lacks a valid signature"},
		{"false ca", func(i *PathInfo) { i.Path = inputAddressed }, AddOptions{}, "claims to be content-addressed"},
		// The path and CA of other content, with this NAR's own hash and size: an
		// untrusted client's way to forge a content-addressed path (no signature needed).
		{"ca of other content", func(i *PathInfo) {
			o := caNARInfo(t, s, "x", narOf(t, map[string]string{"f": "forged"}), nil)
			i.Path, i.CA = o.Path, o.CA
		}, AddOptions{CheckSigs: true}, "ca hash mismatch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info := good
			tc.mod(&info)
			err := s.AddToStoreNar(ctx, info, bytes.NewReader(data), tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			assertNothing(t, s, info.Path)
			if tc.name == "missing reference" && (!errors.Is(err, ErrNotValid) || !strings.HasSuffix(err.Error(), "is not valid")) {
				t.Errorf("missing reference error does not wrap ErrNotValid, or says so twice: %v", err)
			}
		})
	}
	// Truncated NAR.
	err := s.AddToStoreNar(ctx, good, bytes.NewReader(data[:len(data)-9]), AddOptions{})
	if err == nil {
		t.Fatal("truncated NAR accepted")
	}
	assertNothing(t, s, good.Path)
	// And the good one still goes in.
	if err := s.AddToStoreNar(ctx, good, bytes.NewReader(data), AddOptions{}); err != nil {
		t.Fatal(err)
	}
}

// inParallel runs f in n goroutines at once and fails t if any fails.
func inParallel(t *testing.T, n int, f func() error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f()
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentAddSamePath(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	data := narOf(t, map[string]string{"a": strings.Repeat("x", 100000), "b/c": "y"})
	info := caNARInfo(t, s, "same", data, nil)
	inParallel(t, 8, func() error { return s.AddToStoreNar(ctx, info, bytes.NewReader(data), AddOptions{}) })
	var n int
	s.db.r.QueryRow("select count(*) from ValidPaths").Scan(&n)
	if n != 1 {
		t.Errorf("%d registrations", n)
	}
	if _, err := os.Stat(s.RealPath(info.Path) + ".lock"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file left: %v", err)
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

// A text addition is moved into place before it is made durable and
// registered, so a killed daemon may leave it there unregistered: the next
// addition of the same path replaces that leftover, and eight callers
// adding one path at once all succeed, leaving it valid and intact.
func TestAddContentOverLeftover(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	const content = "Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",[],[])"
	ca := contentaddress.CA{Method: contentaddress.Text, Hash: hash.Sum(hash.SHA256, []byte(content))}
	p, err := ca.StorePath(s.Dir(), "left.drv", nil, false)
	if err != nil {
		t.Fatal(err)
	}
	// What a kill could leave: a read-only tree where the path goes.
	leftover := s.RealPath(p)
	if err := os.MkdirAll(filepath.Join(leftover, "junk"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(leftover, "junk", "half"), []byte("half"), 0o444); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{filepath.Join(leftover, "junk"), leftover} {
		if err := os.Chmod(d, 0o555); err != nil {
			t.Fatal(err)
		}
	}

	inParallel(t, 8, func() error {
		_, err := s.AddToStoreContent(ctx, "left.drv", contentaddress.Text, hash.SHA256, nil, strings.NewReader(content), false)
		return err
	})
	if got, err := os.ReadFile(leftover); err != nil || string(got) != content {
		t.Errorf("%s holds %q, %v; want the added text", leftover, got, err)
	}
	if ok, err := s.IsValidPath(ctx, p); err != nil || !ok {
		t.Errorf("%s not valid after the additions: %v", p, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(leftover))
	var names []string
	for _, e := range entries {
		if e.Name() != ".links" {
			names = append(names, e.Name())
		}
	}
	if len(names) != 1 {
		t.Errorf("store directory holds %q, want only the path (no temporary directory or lock)", names)
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

func TestAddMultiple(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	var infos []PathInfo
	var nars [][]byte
	var prev []storepath.Path
	for i := range 20 {
		d := narOf(t, map[string]string{"f": strings.Repeat("z", i+1)})
		info := caNARInfo(t, s, "m", d, prev)
		infos = append(infos, info)
		nars = append(nars, d)
		prev = []storepath.Path{info.Path}
	}
	// All NARs back to back on one stream, as on the wire.
	var stream bytes.Buffer
	for _, d := range nars {
		stream.Write(d)
	}
	i := 0
	err := s.AddMultipleToStoreNar(ctx, func() (PathInfo, io.Reader, error) {
		if i == len(infos) {
			return PathInfo{}, nil, io.EOF
		}
		i++
		return infos[i-1], &stream, nil
	}, AddOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if stream.Len() != 0 {
		t.Errorf("%d bytes left on the stream", stream.Len())
	}
	c, err := s.QueryClosure(ctx, []storepath.Path{infos[19].Path})
	if err != nil || len(c) != 20 {
		t.Errorf("closure %d %v", len(c), err)
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

// TestAddMultipleBackgroundFlushFailure streams more paths than one
// background flush takes, with a bad NAR hash near the end: whatever was
// flushed before stays valid, as a prefix of the chain (references first),
// and nothing of the failed path or later ones is registered or left.
func TestAddMultipleBackgroundFlushFailure(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	const n, bad = 3*batchMinPaths + 5, 3 * batchMinPaths
	var infos []PathInfo
	var stream bytes.Buffer
	var prev []storepath.Path
	for i := range n {
		d := narOf(t, map[string]string{"f": strings.Repeat("y", i+1)})
		info := caNARInfo(t, s, "m", d, prev)
		if i == bad {
			info.NarHash = infos[0].NarHash
		}
		infos = append(infos, info)
		stream.Write(d)
		prev = []storepath.Path{info.Path}
	}
	i := 0
	err := s.AddMultipleToStoreNar(ctx, func() (PathInfo, io.Reader, error) {
		if i == len(infos) {
			return PathInfo{}, nil, io.EOF
		}
		i++
		return infos[i-1], &stream, nil
	}, AddOptions{})
	if err == nil || !strings.Contains(err.Error(), "hash mismatch") {
		t.Fatalf("err = %v, want a hash mismatch", err)
	}
	// The first batchMinPaths paths went to a background flush at once
	// (none was running), which completed.
	if ok, err := s.IsValidPath(ctx, infos[batchMinPaths-1].Path); err != nil || !ok {
		t.Errorf("path %d of the first flushed batch: valid %v, %v", batchMinPaths-1, ok, err)
	}
	seenInvalid := false
	for j, info := range infos {
		ok, err := s.IsValidPath(ctx, info.Path)
		if err != nil {
			t.Fatal(err)
		}
		if ok && (seenInvalid || j >= bad) {
			t.Errorf("path %d valid after an invalid one or the bad one", j)
		}
		if !ok {
			seenInvalid = true
			if _, err := os.Lstat(s.RealPath(info.Path)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("path %d: invalid but present (%v)", j, err)
			}
		}
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

func TestAddBuildLog(t *testing.T) {
	s, root := testStore(t)
	drv, _ := storepath.ParseBase("33333333333333333333333333333333-x.drv")
	if err := s.AddBuildLog(context.Background(), drv, strings.NewReader("build output\n")); err != nil {
		t.Fatal(err)
	}
	matches, _ := filepath.Glob(filepath.Join(root, "nix/var/log/nix/drvs/33/333333333333333333333333333333-x.drv*"))
	if len(matches) != 1 {
		t.Fatalf("log files: %v", matches)
	}
}

// TestPutBuildLogReplaces: a client's log (AddBuildLog) does not replace
// one already there, as Nix's addBuildLog; the log of a build that ran
// here (PutBuildLog) does, whichever of the two names the earlier one
// has, as Nix writes each build's log afresh.
func TestPutBuildLogReplaces(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	drv, _ := storepath.ParseBase("55555555555555555555555555555555-x.drv")
	plain := filepath.Join(root, "nix/var/log/nix/drvs/55/555555555555555555555555555555-x.drv")
	read := func() string {
		t.Helper()
		matches, _ := filepath.Glob(plain + "*")
		if len(matches) != 1 {
			t.Fatalf("log files: %v", matches)
		}
		f, err := os.Open(matches[0])
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var r io.Reader = f
		if strings.HasSuffix(matches[0], ".bz2") {
			r = bzip2.NewReader(f)
		}
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if err := s.PutBuildLog(ctx, drv, strings.NewReader("first build\n")); err != nil {
		t.Fatal(err)
	}
	if err := s.AddBuildLog(ctx, drv, strings.NewReader("a client's log\n")); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "first build\n" {
		t.Errorf("after a client's log: %q, want the first build's", got)
	}
	logs := []string{"second build\n"}
	if _, err := exec.LookPath("bzip2"); err == nil {
		// A large log (compressed), then a small one again: one file each time.
		logs = append(logs, strings.Repeat("a long build\n", 1000), "fourth build\n")
	}
	for _, log := range logs {
		if err := s.PutBuildLog(ctx, drv, strings.NewReader(log)); err != nil {
			t.Fatal(err)
		}
		if got := read(); got != log {
			t.Errorf("after a build: %d bytes %.20q, want %.20q", len(got), got, log)
		}
	}
}

func TestAddBuildLogLargeCompressed(t *testing.T) {
	if _, err := exec.LookPath("bzip2"); err != nil {
		t.Skip("no bzip2")
	}
	s, root := testStore(t)
	drv, _ := storepath.ParseBase("44444444444444444444444444444444-x.drv")
	log := strings.Repeat("a line of build output\n", 1000)
	if err := s.AddBuildLog(context.Background(), drv, strings.NewReader(log)); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(root, "nix/var/log/nix/drvs/44/444444444444444444444444444444-x.drv.bz2"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := io.ReadAll(bzip2.NewReader(f))
	if err != nil || string(got) != log {
		t.Fatalf("log: %d bytes, %v; want %d bytes", len(got), err, len(log))
	}
}

// TestRepairPathNar: a repair that fails (a NAR that is not the path's)
// leaves the path's files as they were; one that succeeds replaces them,
// and nothing of the repair stays in the store's directory.
func TestRepairPathNar(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	files := map[string]string{"a": "the right contents"}
	info := addNAR(t, s, "repair", files)
	real := s.RealPath(info.Path)
	tamper := func() {
		os.Chmod(real, 0o755)
		os.Chmod(real+"/a", 0o644)
		if err := os.WriteFile(real+"/a", []byte("tampered"), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	// A signature the path has here, which the repair's sender lacks.
	const localSig = "local-1:c2lnbmF0dXJlLWJ5dGVz"
	if err := s.AddSignatures(ctx, info.Path, []string{localSig}); err != nil {
		t.Fatal(err)
	}
	tamper()
	wrong := narOf(t, map[string]string{"a": "other contents"})
	if err := s.RepairPathNar(ctx, info, bytes.NewReader(wrong)); err == nil {
		t.Fatal("a repair with another NAR succeeded")
	}
	if got, _ := os.ReadFile(real + "/a"); string(got) != "tampered" {
		t.Errorf("after a failed repair the path holds %q", got)
	}
	if err := s.RepairPathNar(ctx, info, bytes.NewReader(narOf(t, files))); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(real + "/a"); string(got) != "the right contents" {
		t.Errorf("after the repair the path holds %q", got)
	}
	if got, err := s.QueryPathInfo(ctx, info.Path); err != nil || !slices.Contains(got.Sigs, localSig) {
		t.Errorf("after the repair, signatures %q (%v): the local one was dropped", got.Sigs, err)
	}
	if errs, err := s.VerifyStore(ctx, true, false, nil, nil); err != nil || errs {
		t.Errorf("verify after the repair: %v, %v", errs, err)
	}
	ents, _ := os.ReadDir(filepath.Dir(real))
	for _, e := range ents {
		if strings.Contains(e.Name(), tempDirSuffix) {
			t.Errorf("left in the store: %s", e.Name())
		}
	}
}
