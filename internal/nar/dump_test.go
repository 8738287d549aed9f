package nar

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// makeTree builds a tree with every kind of node and some awkward cases
// at root (which must not exist yet).
func makeTree(t testing.TB, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	write := func(rel string, data string, mode os.FileMode) {
		t.Helper()
		p := filepath.Join(root, rel)
		must(os.WriteFile(p, []byte(data), 0o600))
		must(os.Chmod(p, mode)) // exact mode, whatever the umask
	}
	must(os.Mkdir(root, 0o755))
	for _, d := range []string{"bin", "share", "share/doc", "share/doc/deep", "empty-dir", "Zdir"} {
		must(os.Mkdir(filepath.Join(root, d), 0o755))
	}
	write("bin/hello", "#!/bin/sh\necho hello\n", 0o755)
	write("bin/owner-x", "x", 0o700)
	write("bin/other-x", "x", 0o601) // executable only for others: Nix says not executable
	write("bin/group-x", "x", 0o610)
	write("empty", "", 0o644)
	write("eight", "12345678", 0o644)
	write("share/doc/deep/README", strings.Repeat("lorem ipsum ", 1000), 0o444)
	write("with space", "s", 0o644)
	write("ünïcödé", "u", 0o644)
	write("new\nline", "n", 0o644)
	write("-dash", "d", 0o644)
	write("B", "upper", 0o644)
	write("a", "lower", 0o644)
	write("_", "under", 0o644)
	write(strings.Repeat("L", 255), "long name", 0o644)
	big := make([]byte, 3<<20+5) // bigger than the copy buffer, odd size
	for i := range big {
		big[i] = byte(i * 7)
	}
	write("big", string(big), 0o644)
	must(os.Symlink("hello", filepath.Join(root, "bin/rel-link")))
	must(os.Symlink("../../bin/hello", filepath.Join(root, "share/doc/up-link")))
	must(os.Symlink("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-foo/bin/foo", filepath.Join(root, "abs-link")))
	must(os.Symlink("dangling/target", filepath.Join(root, "dangling")))
	must(os.Symlink("Zdir", filepath.Join(root, "dir-link")))
}

// nixDump runs the real `nix-store --dump`, with Nix's state and store
// directories pointed into a temporary directory so that the machine's /nix
// is not touched.
func nixDump(t testing.TB, path string) []byte {
	t.Helper()
	nixStore, err := exec.LookPath("nix-store")
	if err != nil {
		t.Skip("nix-store not installed")
	}
	cmd := exec.Command(nixStore, "--dump", path)
	cmd.Env = nixEnv(t)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nix-store --dump %s: %v: %s", path, err, stderr.String())
	}
	return out
}

func nixEnv(t testing.TB) []string {
	state := t.TempDir()
	return append(os.Environ(),
		"NIX_STATE_DIR="+state+"/state",
		"NIX_STORE_DIR="+state+"/store",
		"NIX_LOG_DIR="+state+"/log",
		"NIX_CONF_DIR="+state+"/conf",
		"HOME="+state,
	)
}

func dump(t testing.TB, path string) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := DumpPath(&b, path); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestDumpPathMatchesNix(t *testing.T) {
	base := t.TempDir()
	tree := filepath.Join(base, "tree")
	makeTree(t, tree)
	for _, p := range []string{tree, filepath.Join(tree, "bin/hello"), filepath.Join(tree, "empty"), filepath.Join(tree, "abs-link"), filepath.Join(tree, "empty-dir")} {
		got, want := dump(t, p), nixDump(t, p)
		if !bytes.Equal(got, want) {
			t.Fatalf("DumpPath(%s) differs from nix-store --dump (%d vs %d bytes)", p, len(got), len(want))
		}
	}
	// Our Reader accepts what Nix produced, and sees the executable rule.
	es, err := readAll(bytes.NewReader(nixDump(t, tree)))
	if err != nil {
		t.Fatal(err)
	}
	execs := map[string]bool{}
	for _, e := range es {
		if e.h.Type == TypeRegular {
			execs[e.h.Path] = e.h.Executable
		}
	}
	for p, want := range map[string]bool{"bin/hello": true, "bin/owner-x": true, "bin/other-x": false, "bin/group-x": false, "empty": false} {
		if execs[p] != want {
			t.Errorf("%s: executable %v, want %v", p, execs[p], want)
		}
	}
}

func TestDumpPathUnsupported(t *testing.T) {
	base := t.TempDir()
	fifo := filepath.Join(base, "fifo")
	if err := mkfifo(fifo); err != nil {
		t.Skip(err)
	}
	if err := DumpPath(io.Discard, base); err == nil || !strings.Contains(err.Error(), "unsupported file type") {
		t.Fatalf("err = %v, want unsupported file type", err)
	}
}

func TestRestoreRoundTrip(t *testing.T) {
	base := t.TempDir()
	tree := filepath.Join(base, "tree")
	makeTree(t, tree)
	nar := dump(t, tree)

	out := filepath.Join(base, "out")
	src := bytes.NewReader(append(append([]byte{}, nar...), "NEXT"...))
	if err := Restore(context.Background(), src, out); err != nil {
		t.Fatal(err)
	}
	if rest, _ := io.ReadAll(src); string(rest) != "NEXT" {
		t.Fatalf("Restore consumed the wrong amount: left %q", rest)
	}
	if again := dump(t, out); !bytes.Equal(again, nar) {
		t.Fatal("DumpPath(Restore(nar)) != nar")
	}
	for p, want := range map[string]os.FileMode{"bin/hello": 0o755, "bin/other-x": 0o644, "empty": 0o644, "share/doc": os.ModeDir | 0o755} {
		fi, err := os.Lstat(filepath.Join(out, p))
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode() &^ 0o022; got != want&^0o022 { // tolerate the umask
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), want)
		}
	}

	// Nix restores our NAR to the same tree.
	nixOut := filepath.Join(base, "nix-out")
	cmd := exec.Command("nix-store", "--restore", nixOut)
	cmd.Env = nixEnv(t)
	cmd.Stdin = bytes.NewReader(nar)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nix-store --restore: %v: %s", err, msg)
	}
	if again := dump(t, nixOut); !bytes.Equal(again, nar) {
		t.Fatal("nix-store --restore of our NAR dumps differently")
	}
}

func TestRestoreRootKinds(t *testing.T) {
	base := t.TempDir()
	for name, nar := range map[string][]byte{
		"file": narOf(file(true, "abc")...),
		"link": narOf(symlink("/abs/target")...),
		"dir":  narOf(dir()...),
	} {
		out := filepath.Join(base, name)
		if err := Restore(context.Background(), bytes.NewReader(nar), out); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := dump(t, out); !bytes.Equal(got, nar) {
			t.Fatalf("%s: round trip differs", name)
		}
	}
}

func TestRestoreHostileLeavesNothing(t *testing.T) {
	base := t.TempDir()
	for _, tc := range hostileCases() {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(base, "out")
			err := Restore(context.Background(), bytes.NewReader(tc.nar), out)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
			if _, serr := os.Lstat(out); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("%s left behind (%v)", out, serr)
			}
		})
	}
	if ents, _ := os.ReadDir(base); len(ents) != 0 {
		t.Fatalf("left behind in %s: %v", base, ents)
	}
}

func TestRestoreDestExists(t *testing.T) {
	out := t.TempDir()
	marker := filepath.Join(out, "keep")
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Restore(context.Background(), bytes.NewReader(narOf(dir()...)), out); err == nil {
		t.Fatal("Restore into an existing directory succeeded")
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("existing destination damaged: %v", err)
	}
}

func TestRestoreCancel(t *testing.T) {
	base := t.TempDir()
	tree := filepath.Join(base, "tree")
	makeTree(t, tree)
	nar := dump(t, tree)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	out := filepath.Join(base, "out")
	if err := Restore(ctx, bytes.NewReader(nar), out); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	// Cancelled half-way: the reader cancels after the first entries.
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	r := &cancelAfter{r: bytes.NewReader(nar), n: len(nar) / 2, cancel: cancel}
	if err := Restore(ctx, r, out); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if _, err := os.Lstat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("cancelled Restore left %s behind", out)
	}
}

type cancelAfter struct {
	r      io.Reader
	n      int
	cancel func()
}

func (c *cancelAfter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if c.n -= n; c.n <= 0 {
		c.cancel()
	}
	return n, err
}

// FuzzRestore checks that Restore of arbitrary input either fails leaving
// nothing behind, or produces a tree that dumps to exactly the bytes read.
func FuzzRestore(f *testing.F) {
	for _, tc := range hostileCases() {
		f.Add(tc.nar)
	}
	f.Add(writeEntries(f, treeEntries))
	f.Fuzz(func(t *testing.T, data []byte) {
		out := filepath.Join(t.TempDir(), "out")
		br := bytes.NewReader(data)
		if err := Restore(context.Background(), br, out); err != nil {
			if _, serr := os.Lstat(out); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("failed Restore (%v) left %s behind", err, out)
			}
			return
		}
		if got := dump(t, out); !bytes.Equal(got, data[:len(data)-br.Len()]) {
			t.Fatal("restored tree dumps differently")
		}
	})
}
