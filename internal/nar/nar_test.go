package nar

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// raw builds NAR bytes token by token: a string becomes a padded string,
// a uint64 a bare little-endian number, and []byte is copied verbatim (for
// contents, bad padding and the like).
func raw(parts ...any) []byte {
	var b bytes.Buffer
	for _, p := range parts {
		switch v := p.(type) {
		case string:
			b.Write(binary.LittleEndian.AppendUint64(nil, uint64(len(v))))
			b.WriteString(v)
			b.Write(make([]byte, padding(uint64(len(v)))))
		case uint64:
			b.Write(binary.LittleEndian.AppendUint64(nil, v))
		case []byte:
			b.Write(v)
		default:
			panic(fmt.Sprintf("raw: unsupported %T", p))
		}
	}
	return b.Bytes()
}

// file returns the tokens of a regular file node with contents c.
func file(exec bool, c string) []any {
	t := []any{"(", "type", "regular"}
	if exec {
		t = append(t, "executable", "")
	}
	return append(t, "contents", c, ")") // contents encode exactly like a padded string
}

// entry wraps a node's tokens in an entry of the given name.
func entry(name string, node ...any) []any {
	return append(append([]any{"entry", "(", "name", name, "node"}, node...), ")")
}

// dir returns the tokens of a directory node with the given entries.
func dir(entries ...[]any) []any {
	t := []any{"(", "type", "directory"}
	for _, e := range entries {
		t = append(t, e...)
	}
	return append(t, ")")
}

func symlink(target string) []any { return []any{"(", "type", "symlink", "target", target, ")"} }

func narOf(node ...any) []byte { return raw(append([]any{magic}, node...)...) }

func TestWriterGolden(t *testing.T) {
	// The NAR of a root regular file "hi\n": every token is a length
	// (u64 little-endian) followed by the bytes, zero-padded to 8.
	want := []byte{
		13, 0, 0, 0, 0, 0, 0, 0, 'n', 'i', 'x', '-', 'a', 'r', 'c', 'h', 'i', 'v', 'e', '-', '1', 0, 0, 0, // magic
		1, 0, 0, 0, 0, 0, 0, 0, '(', 0, 0, 0, 0, 0, 0, 0, // (
		4, 0, 0, 0, 0, 0, 0, 0, 't', 'y', 'p', 'e', 0, 0, 0, 0, // type
		7, 0, 0, 0, 0, 0, 0, 0, 'r', 'e', 'g', 'u', 'l', 'a', 'r', 0, // regular
		8, 0, 0, 0, 0, 0, 0, 0, 'c', 'o', 'n', 't', 'e', 'n', 't', 's', // contents
		3, 0, 0, 0, 0, 0, 0, 0, 'h', 'i', '\n', 0, 0, 0, 0, 0, // size 3, data, padding
		1, 0, 0, 0, 0, 0, 0, 0, ')', 0, 0, 0, 0, 0, 0, 0, // )
	}
	var b bytes.Buffer
	w := NewWriter(&b)
	if err := w.WriteHeader(&Header{Type: TypeRegular, Size: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(w, "hi\n"); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.Bytes(), want) {
		t.Fatalf("got\n%x\nwant\n%x", b.Bytes(), want)
	}
	if !bytes.Equal(want, narOf(file(false, "hi\n")...)) {
		t.Fatal("raw helper disagrees with the byte fixture")
	}
}

type ent struct {
	h    Header
	data string
}

// treeEntries is a NAR with every kind of node, in NAR order.
var treeEntries = []ent{
	{h: Header{Path: "", Type: TypeDirectory}},
	{h: Header{Path: "B", Type: TypeRegular, Size: 0}},
	{h: Header{Path: "a", Type: TypeDirectory}},
	{h: Header{Path: "a/deep", Type: TypeDirectory}},
	{h: Header{Path: "a/deep/x", Type: TypeRegular, Executable: true, Size: 8}, data: "12345678"},
	{h: Header{Path: "a/empty", Type: TypeDirectory}},
	{h: Header{Path: "a/link", Type: TypeSymlink, LinkTarget: "../B"}},
	{h: Header{Path: "abs", Type: TypeSymlink, LinkTarget: "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x/bin"}},
	{h: Header{Path: "b", Type: TypeRegular, Size: 13}, data: "hello, world\n"},
	{h: Header{Path: "\xff odd\nname", Type: TypeRegular, Size: 1}, data: "z"},
}

func writeEntries(t testing.TB, es []ent) []byte {
	t.Helper()
	var b bytes.Buffer
	w := NewWriter(&b)
	for _, e := range es {
		h := e.h
		if err := w.WriteHeader(&h); err != nil {
			t.Fatalf("WriteHeader %q: %v", e.h.Path, err)
		}
		if _, err := io.WriteString(w, e.data); err != nil {
			t.Fatalf("Write %q: %v", e.h.Path, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// readAll reads a whole NAR, contents included.
func readAll(r io.Reader) ([]ent, error) {
	nr := NewReader(r)
	var es []ent
	for {
		h, err := nr.Next()
		if err == io.EOF {
			return es, nil
		}
		if err != nil {
			return es, err
		}
		data, err := io.ReadAll(nr)
		if err != nil {
			return es, err
		}
		es = append(es, ent{h: *h, data: string(data)})
	}
}

func TestRoundTrip(t *testing.T) {
	b := writeEntries(t, treeEntries)
	want := narOf(dir(
		entry("B", file(false, "")...),
		entry("a", dir(
			entry("deep", dir(entry("x", file(true, "12345678")...))...),
			entry("empty", dir()...),
			entry("link", symlink("../B")...),
		)...),
		entry("abs", symlink("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x/bin")...),
		entry("b", file(false, "hello, world\n")...),
		entry("\xff odd\nname", file(false, "z")...),
	)...)
	if !bytes.Equal(b, want) {
		t.Fatalf("Writer output differs from hand-built NAR")
	}
	for name, r := range map[string]io.Reader{
		"plain":    bytes.NewReader(b),
		"onebyte":  iotest.OneByteReader(bytes.NewReader(b)),
		"dataeof":  iotest.DataErrReader(bytes.NewReader(b)),
		"halfread": iotest.HalfReader(bytes.NewReader(b)),
	} {
		got, err := readAll(r)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if fmt.Sprint(got) != fmt.Sprint(treeEntries) {
			t.Fatalf("%s: got\n%v\nwant\n%v", name, got, treeEntries)
		}
	}
}

func TestNextSkipsUnreadContents(t *testing.T) {
	b := writeEntries(t, treeEntries)
	nr := NewReader(bytes.NewReader(b))
	var paths []string
	for {
		h, err := nr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Path == "b" { // read part of it only
			p := make([]byte, 3)
			if _, err := io.ReadFull(nr, p); err != nil || string(p) != "hel" {
				t.Fatalf("partial read: %q %v", p, err)
			}
		}
		paths = append(paths, h.Path)
	}
	if len(paths) != len(treeEntries) {
		t.Fatalf("got %d entries, want %d", len(paths), len(treeEntries))
	}
	if _, err := nr.Next(); err != io.EOF {
		t.Fatalf("Next after EOF: %v", err)
	}
}

func TestNoOverRead(t *testing.T) {
	a := writeEntries(t, treeEntries)
	b := narOf(symlink("/x")...)
	c := narOf(file(true, "abc")...)
	trailer := []byte("TRAILER")
	stream := bytes.NewReader(bytes.Join([][]byte{a, b, c, trailer}, nil))
	for i, want := range [][]byte{a, b, c} {
		before := stream.Len()
		if _, err := readAll(stream); err != nil {
			t.Fatalf("NAR %d: %v", i, err)
		}
		if consumed := before - stream.Len(); consumed != len(want) {
			t.Fatalf("NAR %d: consumed %d bytes, want %d", i, consumed, len(want))
		}
	}
	rest, _ := io.ReadAll(stream)
	if !bytes.Equal(rest, trailer) {
		t.Fatalf("left over %q, want %q", rest, trailer)
	}
}

type hostileCase struct {
	name string
	nar  []byte
	msg  string // substring of the error
}

func deepNAR(levels int) []byte {
	node := file(false, "x")
	for i := 0; i < levels; i++ {
		node = dir(entry("d", node...))
	}
	return narOf(node...)
}

func hostileCases() []hostileCase {
	long := strings.Repeat("n", MaxNameLen+1)
	return []hostileCase{
		{"empty input", nil, "truncated"},
		{"bad magic", raw("nix-archive-2"), "magic"},
		{"long magic", raw("nix-archive-1xx"), "does not start"},
		{"magic padding", append(raw(uint64(13)), "nix-archive-1\x00\x00\x01"...), "does not start"},
		{"no root", raw(magic), "truncated"},
		{"unknown type", narOf("(", "type", "fifo", ")"), `unknown node type "fifo"`},
		{"type twice", narOf("(", "type", "regular", "type", "regular", "contents", "", ")"), `want "contents"`},
		{"missing contents", narOf("(", "type", "regular", ")"), `want "contents"`},
		{"executable value", narOf("(", "type", "regular", "executable", "x", "contents", "", ")"), "executable marker"},
		{"executable after contents", narOf("(", "type", "regular", "contents", "", "executable", "", ")"), `want ")"`},
		{"unknown field", narOf("(", "type", "regular", "mode", "", ")"), `"mode"`},
		{"huge token", narOf("(", "type", uint64(1)<<62), "exceeds limit"},
		{"truncated contents", narOf("(", "type", "regular", "contents", uint64(100), []byte("short")), "truncated"},
		{"size beyond int64", narOf("(", "type", "regular", "contents", uint64(1)<<63, []byte("x")), "out of range"},
		{"nonzero content padding", narOf("(", "type", "regular", "contents", uint64(1), []byte("x\x00\x00\x00\x00\x00\x00\x01"), ")"), "padding"},
		{"nonzero token padding", append(raw(magic, "(", "type", uint64(7)), "regular\x01"...), "padding"},
		{"missing close", narOf("(", "type", "regular", "contents", ""), "truncated"},
		{"missing entry close", narOf(dir([]any{"entry", "(", "name", "a", "node", "(", "type", "symlink", "target", "x", ")"})...), "truncated"},
		{"entry in file", narOf(append(file(false, "")[:5], entry("a", file(false, "")...)...)...), `want ")"`},
		{"entry without name", narOf(dir([]any{"entry", "(", "node", "(", "type", "regular", "contents", "", ")", ")"})...), ""},
		{"name empty", narOf(dir(entry("", file(false, "")...))...), "empty name"},
		{"name dot", narOf(dir(entry(".", file(false, "")...))...), `"."`},
		{"name dotdot", narOf(dir(entry("..", file(false, "")...))...), `".."`},
		{"name slash", narOf(dir(entry("a/b", file(false, "")...))...), "contains '/'"},
		{"name NUL", narOf(dir(entry("a\x00b", file(false, "")...))...), "contains NUL"},
		{"name too long", narOf(dir(entry(long, file(false, "")...))...), "exceeds limit 255"},
		{"duplicate", narOf(dir(entry("a", file(false, "")...), entry("a", file(false, "")...))...), `duplicate entry "a"`},
		{"unsorted", narOf(dir(entry("b", file(false, "")...), entry("a", file(false, "")...))...), "not sorted"},
		{"unsorted bytewise", narOf(dir(entry("a", file(false, "")...), entry("B", file(false, "")...))...), "not sorted"},
		{"target empty", narOf(symlink("")...), "empty symlink target"},
		{"target NUL", narOf(symlink("a\x00b")...), "contains NUL"},
		{"target too long", narOf(symlink(strings.Repeat("a", MaxTargetLen+1))...), "exceeds limit 4096"},
		{"too deep", deepNAR(MaxDepth + 1), "deeper than 256"},
		{"directory bad token", narOf("(", "type", "directory", "name", ")"), `want "entry"`},
		{"content then garbage", narOf("(", "type", "regular", "contents", "abc", "entry"), `want ")"`},
	}
}

func TestHostile(t *testing.T) {
	for _, tc := range hostileCases() {
		t.Run(tc.name, func(t *testing.T) {
			_, err := readAll(bytes.NewReader(tc.nar))
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.msg)
			}
			if strings.Contains(tc.msg, "truncated") && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("err = %v, want io.ErrUnexpectedEOF", err)
			}
		})
	}
}

func TestAccepted(t *testing.T) {
	for name, b := range map[string][]byte{
		"root file":           narOf(file(false, "")...),
		"root link absolute":  narOf(symlink("/etc/passwd")...),
		"root link sibling":   narOf(symlink("other-path")...),
		"entry link sibling":  narOf(dir(entry("l", symlink("../other/bin")...))...),
		"nested link to root": narOf(dir(entry("d", dir(entry("l", symlink("../../x/./y/..")...))...))...),
		// Out of the store, as absolute links are (Nix keeps both).
		"root link climbs":   narOf(symlink("../etc")...),
		"entry link climbs":  narOf(dir(entry("l", symlink("../../etc/passwd")...))...),
		"nested link climbs": narOf(dir(entry("d", dir(entry("l", symlink("x/../../../../y")...))...))...),
		"max name":           narOf(dir(entry(strings.Repeat("n", MaxNameLen), file(false, "")...))...),
		"max depth":          deepNAR(MaxDepth),
		"max target":         narOf(symlink(strings.Repeat("a", MaxTargetLen))...),
	} {
		if _, err := readAll(bytes.NewReader(b)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestWriterRefuses(t *testing.T) {
	reg := func(p string) Header { return Header{Path: p, Type: TypeRegular} }
	root := Header{Type: TypeDirectory}
	for _, tc := range []struct {
		name string
		hs   []Header
		msg  string
	}{
		{"no root", nil, "no root"},
		{"child first", []Header{reg("a")}, "first entry must be the root"},
		{"two roots", []Header{root, {Type: TypeDirectory}}, "second root"},
		{"unsorted", []Header{root, reg("b"), reg("a")}, "not sorted"},
		{"duplicate", []Header{root, reg("a"), reg("a")}, "duplicate"},
		{"bad name", []Header{root, reg("..")}, `".."`},
		{"empty name", []Header{root, reg("a/")}, "empty name"},
		{"parent not open", []Header{root, reg("a/b")}, "not an open directory"},
		{"back into closed dir", []Header{root, {Path: "a", Type: TypeDirectory}, reg("b"), reg("a/c")}, "not an open directory"},
		{"child of file", []Header{root, reg("a"), reg("a/b")}, "not an open directory"},
		{"empty target", []Header{{Type: TypeSymlink}}, "empty symlink target"},
		{"negative size", []Header{{Type: TypeRegular, Size: -1}}, "negative"},
		{"short file", []Header{root, {Path: "a", Type: TypeRegular, Size: 2}, reg("b")}, "shorter"},
		{"bad type", []Header{{}}, "unknown type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := NewWriter(io.Discard)
			var err error
			for i := range tc.hs {
				if err = w.WriteHeader(&tc.hs[i]); err != nil {
					break
				}
			}
			if err == nil {
				err = w.Close()
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want ErrInvalid mentioning %q", err, tc.msg)
			}
		})
	}
	t.Run("too long", func(t *testing.T) {
		var b bytes.Buffer
		w := NewWriter(&b)
		if err := w.WriteHeader(&Header{Type: TypeRegular, Size: 2}); err != nil {
			t.Fatal(err)
		}
		n, err := w.Write([]byte("abc"))
		if n != 2 || !errors.Is(err, ErrInvalid) {
			t.Fatalf("Write = %d, %v; want 2, ErrInvalid", n, err)
		}
	})
}

// FuzzReader checks that the Reader never panics, that whatever it accepts
// re-encodes through the Writer to exactly the bytes it consumed, and that
// List accepts it too, with each file's narOffset at its contents.
func FuzzReader(f *testing.F) {
	for _, tc := range hostileCases() {
		f.Add(tc.nar)
	}
	f.Add(narOf(file(true, "abc")...))
	f.Add(narOf(symlink("/x")...))
	f.Add(writeEntries(f, treeEntries))
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bytes.NewReader(data)
		es, err := readAll(br)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error not wrapping ErrInvalid: %v", err)
			}
			return
		}
		consumed := data[:len(data)-br.Len()]
		if again := writeEntries(t, es); !bytes.Equal(again, consumed) {
			t.Fatalf("re-encoding differs:\n got %x\nwant %x", again, consumed)
		}
		l, err := List(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("List refused what the Reader accepted: %v", err)
		}
		for _, e := range es {
			n := l.Lookup(e.h.Path)
			if n == nil || n.Type != e.h.Type {
				t.Fatalf("%q: listed as %+v, read as %+v", e.h.Path, n, e.h)
			}
			if n.Type == TypeRegular && string(data[n.NarOffset:n.NarOffset+n.Size]) != e.data {
				t.Fatalf("%q: narOffset %d does not point at its contents", e.h.Path, n.NarOffset)
			}
		}
	})
}
