package substitute

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/ulikunitz/xz"
)

// xzOf compresses data into one .xz stream.
func xzOf(t *testing.T, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := xz.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// oddReader returns at most 7777 bytes per Read, so buffer boundaries fall
// anywhere in the stream.
type oddReader struct{ r io.Reader }

func (o oddReader) Read(p []byte) (int, error) { return o.r.Read(p[:min(len(p), 7777)]) }

func TestLiblzmaReader(t *testing.T) {
	if _, release, ok, err := newLiblzmaReader(bytes.NewReader(nil)); !ok {
		t.Skip("liblzma.so.5 cannot be loaded")
	} else if err != nil {
		t.Fatal(err)
	} else {
		release()
	}
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = "nixyard!"[rng.IntN(8)] // compressible, like store paths
	}
	one := xzOf(t, data)
	two := append(append([]byte{}, one...), xzOf(t, data[:1000])...)
	corrupt := bytes.Clone(one)
	corrupt[len(corrupt)/2] ^= 0x55

	for _, tc := range []struct {
		name    string
		in      []byte
		want    []byte
		wantErr error // nil: any error will do when want is nil
	}{
		{"one stream", one, data, nil},
		{"concatenated streams", two, append(append([]byte{}, data...), data[:1000]...), nil},
		{"truncated", one[:len(one)-100], nil, io.ErrUnexpectedEOF},
		{"corrupt", corrupt, nil, nil},
		{"not xz", []byte("this is not an xz stream at all"), nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, release, _, err := newLiblzmaReader(oddReader{bytes.NewReader(tc.in)})
			if err != nil {
				t.Fatal(err)
			}
			defer release()
			got, err := io.ReadAll(oddReader{r})
			if tc.want != nil {
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, tc.want) {
					t.Fatalf("decoded %d bytes, want %d (contents differ)", len(got), len(tc.want))
				}
				return
			}
			if err == nil {
				t.Fatalf("decoded %d bytes without error, want an error", len(got))
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
		})
	}
}
