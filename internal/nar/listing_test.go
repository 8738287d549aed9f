package nar

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestListMatchesNix: the listing of a NAR is byte for byte what the real
// `nix nar ls --json -R` prints for it, and each file's narOffset points at
// its contents in the NAR.
func TestListMatchesNix(t *testing.T) {
	nix, err := exec.LookPath("nix")
	if err != nil {
		t.Skip("nix not installed")
	}
	tree := filepath.Join(t.TempDir(), "tree")
	makeTree(t, tree)
	for name, data := range map[string][]byte{
		"entries": writeEntries(t, treeEntries), // a name that is not UTF-8, with a newline
		"tree":    dump(t, tree),
		"file":    narOf(file(true, "abc")...),
		"symlink": narOf(symlink("a\"b\\c\td\x01")...),
	} {
		l, err := List(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got, err := l.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(t.TempDir(), name+".nar")
		if err := os.WriteFile(f, data, 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(nix, "--extra-experimental-features", "nix-command", "nar", "ls", "--json", "-R", f, "/")
		cmd.Env = nixEnv(t)
		want, err := cmd.Output()
		if err != nil {
			t.Fatalf("nix nar ls %s: %v", name, err)
		}
		if !bytes.Equal(got, bytes.TrimSuffix(want, []byte("\n"))) {
			t.Errorf("%s: listing\n got %s\nwant %s", name, got, want)
		}
		checkOffsets(t, l, "", data)
	}
}

// checkOffsets checks that every regular file's narOffset and size
// delimit, in nar, contents followed by padding.
func checkOffsets(t *testing.T, l *Listing, path string, nar []byte) {
	t.Helper()
	switch l.Type {
	case TypeRegular:
		end := l.NarOffset + l.Size
		if l.NarOffset < 8 || end+int64(padding(uint64(l.Size))) > int64(len(nar)) {
			t.Fatalf("%q: narOffset %d, size %d, outside a NAR of %d bytes", path, l.NarOffset, l.Size, len(nar))
		}
		// The contents' length comes right before them.
		if got := binary.LittleEndian.Uint64(nar[l.NarOffset-8:]); got != uint64(l.Size) {
			t.Errorf("%q: the NAR has length %d before narOffset %d, want %d", path, got, l.NarOffset, l.Size)
		}
	case TypeDirectory:
		for name, e := range l.Entries {
			checkOffsets(t, e, path+"/"+name, nar)
		}
	}
}

func TestListLookup(t *testing.T) {
	l, err := List(bytes.NewReader(writeEntries(t, treeEntries)))
	if err != nil {
		t.Fatal(err)
	}
	if x := l.Lookup("a/deep/x"); x == nil || !x.Executable || x.Size != 8 {
		t.Errorf("a/deep/x: %+v", x)
	}
	for _, p := range []string{"a/missing", "b/under-a-file", "a/deep/x/y"} {
		if x := l.Lookup(p); x != nil {
			t.Errorf("Lookup(%q) = %+v, want nil", p, x)
		}
	}
}

func TestListInvalid(t *testing.T) {
	for _, tc := range hostileCases() {
		if _, err := List(bytes.NewReader(tc.nar)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want an invalid-NAR error", tc.name, err)
		}
	}
	if _, err := List(strings.NewReader("")); err == nil {
		t.Error("an empty NAR listed")
	}
}
