package wire

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The handshake captured between a 2.8.0 client and a 2.8.0 daemon
// (worker-protocol.md §2.1).
func TestCapturedHandshake(t *testing.T) {
	client := unhex(t, "6378696e00000000"+ // WORKER_MAGIC_1
		"2201000000000000"+ // client version 1.34
		"0000000000000000"+ // no CPU affinity
		"0000000000000000") // reserveSpace
	d := NewDecoder(bytes.NewReader(client))
	if m := d.U64("magic"); m != 0x6e697863 {
		t.Errorf("magic = %#x", m)
	}
	if v := d.U64("version"); v != 0x122 {
		t.Errorf("version = %#x", v)
	}
	if d.Bool("affinity") || d.U64("reserveSpace") != 0 || d.Err() != nil {
		t.Errorf("tail: %v", d.Err())
	}

	var out bytes.Buffer
	e := NewEncoder(&out)
	e.U64(0x6478696f)
	e.U64(0x122)
	e.String("2.8.0")
	e.U64(0x616c7473) // STDERR_LAST
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	want := unhex(t, "6f69786400000000 2201000000000000 0500000000000000 322e382e30000000 73746c6100000000")
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("daemon bytes\n got %x\nwant %x", out.Bytes(), want)
	}
}

func TestRoundTrip(t *testing.T) {
	dir := storepath.Dir("/nix/store")
	p1, _ := storepath.ParseBase("00000000000000000000000000000000-a")
	p2, _ := storepath.ParseBase("11111111111111111111111111111111-b")
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	e.U64(42)
	e.Bool(true)
	e.String("")
	e.String("1234567")
	e.String("12345678")
	e.Bytes([]byte{0, 1, 2})
	e.StringSet([]string{"b", "a", "b"})
	e.StringMap(map[string]string{"k": "v", "a": "b"})
	e.Paths(dir, []storepath.Path{p2, p1})
	e.OptPath(dir, storepath.Path{})
	e.Path(dir, p1)
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%8 != 0 {
		t.Fatalf("encoding not 8-aligned: %d bytes", buf.Len())
	}
	d := NewDecoder(&buf)
	if d.U64("u") != 42 || !d.Bool("b") || d.String("s0", 10) != "" || d.String("s7", 10) != "1234567" || d.String("s8", 10) != "12345678" {
		t.Fatalf("scalars: %v", d.Err())
	}
	if b := d.Bytes("bytes", 10); !bytes.Equal(b, []byte{0, 1, 2}) {
		t.Errorf("bytes = %v", b)
	}
	if ss := d.Strings("set", 10); strings.Join(ss, ",") != "a,b" {
		t.Errorf("set = %v", ss)
	}
	if m := d.StringMap("map", 10); len(m) != 2 || m["k"] != "v" || m["a"] != "b" {
		t.Errorf("map = %v", m)
	}
	if ps := d.Paths("paths", dir); len(ps) != 2 || ps[0] != p1 || ps[1] != p2 {
		t.Errorf("paths = %v", ps)
	}
	if p := d.OptPath("opt", dir); !p.IsZero() {
		t.Errorf("optpath = %v", p)
	}
	if p := d.Path("path", dir); p != p1 {
		t.Errorf("path = %v", p)
	}
	if d.Err() != nil {
		t.Fatal(d.Err())
	}
	d.U64("past end")
	if !errors.Is(d.Err(), io.EOF) && !errors.Is(d.Err(), io.ErrUnexpectedEOF) {
		t.Errorf("read past end: %v", d.Err())
	}
}

func TestLenientBool(t *testing.T) {
	d := NewDecoder(bytes.NewReader(unhex(t, "0700000000000000")))
	if !d.Bool("b") {
		t.Error("7 should read as true")
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct {
		name, hex string
		read      func(*Decoder)
		want      string
	}{
		{"bad padding", "0100000000000000 4101000000000000", func(d *Decoder) { d.String("s", 10) }, "non-zero padding"},
		{"bad padding bytes", "0100000000000000 4101000000000000", func(d *Decoder) { d.Bytes("b", 10) }, "non-zero padding"},
		{"bad padding long string", "0110000000000000" + strings.Repeat("41", scratchMax+1) + "01000000000000", func(d *Decoder) { d.String("s", MaxStringLen) }, "non-zero padding"},
		{"too long", "0b00000000000000", func(d *Decoder) { d.String("s", 10) }, "exceeds limit"},
		{"huge length", "ffffffffffffffff", func(d *Decoder) { d.Bytes("b", MaxStringLen) }, "exceeds limit"},
		{"huge count", "ffffffffffffff00", func(d *Decoder) { d.Strings("l", 10) }, "exceeds limit"},
		{"truncated", "1000000000000000 41414141", func(d *Decoder) { d.String("s", 100) }, "unexpected EOF"},
		{"not a store path", "0400000000000000 2f746d7000000000", func(d *Decoder) { d.Path("p", "/nix/store") }, "not in the store directory"},
		{"value too big", "0300000000000000", func(d *Decoder) { d.U64Max("v", 2) }, "exceeds 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := NewDecoder(bytes.NewReader(unhex(t, tc.hex)))
			tc.read(d)
			if d.Err() == nil || !strings.Contains(d.Err().Error(), tc.want) {
				t.Errorf("err = %v, want %q", d.Err(), tc.want)
			}
			if !strings.Contains(d.Err().Error(), "field ") {
				t.Errorf("error does not name the field: %v", d.Err())
			}
		})
	}
}

func TestFramed(t *testing.T) {
	var buf bytes.Buffer
	fw := NewFramedWriter(&buf)
	fw.Write([]byte("hello "))
	fw.Write(nil)
	fw.Write([]byte("world"))
	fw.Close()
	buf.WriteString("TAIL")
	fr := NewFramedReader(&buf)
	got, err := io.ReadAll(fr)
	if err != nil || string(got) != "hello world" || !fr.Done() {
		t.Fatalf("got %q, %v, done=%v", got, err, fr.Done())
	}
	if buf.String() != "TAIL" {
		t.Errorf("read past the zero chunk: left %q", buf.String())
	}

	// Drain after a partial read.
	buf.Reset()
	fw.Write([]byte("abcdef"))
	fw.Close()
	buf.WriteString("X")
	fr = NewFramedReader(&buf)
	p := make([]byte, 2)
	fr.Read(p)
	if err := fr.Drain(); err != nil || buf.String() != "X" {
		t.Errorf("drain: %v, left %q", err, buf.String())
	}

	// A truncated stream is an error, not EOF.
	fr = NewFramedReader(bytes.NewReader(unhex(t, "0800000000000000 4141")))
	if _, err := io.ReadAll(fr); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated: %v", err)
	}
	fr = NewFramedReader(bytes.NewReader(unhex(t, "ffffffffffffffff")))
	if _, err := io.ReadAll(fr); !errors.Is(err, ErrLimit) {
		t.Errorf("huge chunk: %v", err)
	}
}

func TestReadNLarge(t *testing.T) {
	data := bytes.Repeat([]byte{7}, 300<<10)
	got, err := readN(bytes.NewReader(data), len(data))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("readN: %v", err)
	}
	// An announced length far beyond the data allocates only what arrives.
	if _, err := readN(bytes.NewReader(data[:10]), 60<<20); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short: %v", err)
	}
}

// FuzzDecode feeds random bytes through every reader: none may panic, and a
// successful decode must re-encode to a prefix-consistent form.
func FuzzDecode(f *testing.F) {
	f.Add(unhex(f, "6378696e00000000 2201000000000000 0000000000000000 0000000000000000"))
	f.Add(unhex(f, "0100000000000000 4100000000000000 0200000000000000 0100000000000000 6100000000000000 0100000000000000 6200000000000000"))
	f.Add(unhex(f, "0500000000000000 68656c6c6f 0000000000000000"))
	f.Add(unhex(f, "ffffffffffffffff ffffffffffffffff"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := NewDecoder(bytes.NewReader(data))
		d.U64("u")
		d.Bool("b")
		s := d.String("s", 1<<10)
		ss := d.Strings("l", 1<<10)
		m := d.StringMap("m", 1<<10)
		d.Paths("p", "/nix/store")
		d.OptPath("o", "/nix/store")
		if d.Err() == nil {
			var buf bytes.Buffer
			e := NewEncoder(&buf)
			e.U64(0)
			e.U64(0)
			e.String(s)
			e.Strings(ss)
			e.StringMap(m)
			e.Flush()
			d2 := NewDecoder(&buf)
			d2.U64("u")
			d2.U64("b")
			if got := d2.String("s", 1<<10); got != s {
				t.Fatalf("string round trip: %q != %q", got, s)
			}
		}
		fr := NewFramedReader(bytes.NewReader(data))
		io.Copy(io.Discard, fr)
	})
}

// The allocation-free encoders write what the plain ones do.
func TestEncoderFastPathsMatch(t *testing.T) {
	dir := storepath.Dir("/nix/store")
	p1, _ := storepath.ParseBase("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a")
	p2, _ := storepath.ParseBase("8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-bb")
	digest := unhex(t, "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	var fast, slow bytes.Buffer
	ef, es := NewEncoder(&fast), NewEncoder(&slow)
	ef.Path(dir, p1)
	es.String(dir.Abs(p1))
	ef.OptPath(dir, p2)
	es.String(dir.Abs(p2))
	ef.Hex(digest)
	es.String(hex.EncodeToString(digest))
	ef.Hex(digest[:3])
	es.String(hex.EncodeToString(digest[:3]))
	for _, ps := range [][]storepath.Path{{p1, p2}, {p2, p1}, {p1, p1, p2}} {
		ef.Paths(dir, ps)
		es.Strings([]string{dir.Abs(p1), dir.Abs(p2)})
	}
	for _, ss := range [][]string{{"a", "b"}, {"b", "a", "a"}} {
		ef.StringSet(ss)
		es.Strings([]string{"a", "b"})
	}
	ef.Flush()
	es.Flush()
	if !bytes.Equal(fast.Bytes(), slow.Bytes()) {
		t.Fatalf("fast encoders wrote\n%x\nwant\n%x", fast.Bytes(), slow.Bytes())
	}
	// Strings read through the scratch buffer, short and long.
	long := strings.Repeat("x", scratchMax+3)
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	e.String("abc")
	e.String(long)
	e.String("")
	e.Flush()
	d := NewDecoder(&buf)
	if a, b, c := d.String("a", 10), d.String("b", 1<<20), d.String("c", 1); a != "abc" || b != long || c != "" || d.Err() != nil {
		t.Fatalf("read %q, %d bytes, %q, err %v", a, len(b), c, d.Err())
	}
}
