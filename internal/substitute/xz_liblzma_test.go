package substitute

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

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

// TestLiblzmaReaderThreads decodes many streams at once, releasing half of
// the decoders part-way through, and checks that at most xzPoolMax are
// kept and that every decoder thread is gone once the pool is drained.
func TestLiblzmaReaderThreads(t *testing.T) {
	needLiblzma(t)
	data := bytes.Repeat([]byte("nixyard decodes on threads of its own\n"), 40000)
	comp := xzOf(t, data)
	before := threads(t)
	var wg sync.WaitGroup
	for i := range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, release, _, err := newLiblzmaReader(oddReader{bytes.NewReader(comp)})
			if err != nil {
				t.Error(err)
				return
			}
			defer release()
			if i%2 == 1 { // released with most of the stream unread
				if _, err := io.ReadFull(r, make([]byte, 1000)); err != nil {
					t.Error(err)
				}
				return
			}
			got, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(got, data) {
				t.Errorf("decoded %d bytes, err %v; want %d bytes", len(got), err, len(data))
			}
		}()
	}
	wg.Wait()
	if n := len(xzPool.idle); n == 0 || n > xzPoolMax {
		t.Errorf("%d idle decoders kept, want 1 to %d", n, xzPoolMax)
	}
	xzPool.drain()
	// The Go runtime may have started threads of its own meanwhile; 24
	// decoder threads left behind would be far more.
	if after := threads(t); after > before+8 {
		t.Errorf("%d threads before, %d after: decoder threads left running", before, after)
	}
}

// threads counts this process's threads.
func threads(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Skipf("cannot count threads: %v", err)
	}
	return len(ents)
}

// TestLiblzmaReaderReuse decodes one stream after another on the same kept
// decoder: after a stream read to its end, after one released part-way
// through, and after a corrupt one.
func TestLiblzmaReaderReuse(t *testing.T) {
	needLiblzma(t)
	xzPool.drain()
	defer xzPool.drain()
	a := bytes.Repeat([]byte("first stream\n"), 50000)
	b := bytes.Repeat([]byte("the second, different stream\n"), 30000)
	ca, cb := xzOf(t, a), xzOf(t, b)
	corrupt := bytes.Clone(ca)
	corrupt[len(corrupt)/2] ^= 0x55
	var first *lzmaDecoder
	for i, step := range []struct {
		comp    []byte
		want    []byte // nil: a part is read, then the decoder released
		wantErr bool
	}{
		{ca, a, false},
		{cb, nil, false},
		{corrupt, a, true},
		{cb, b, false},
		{ca, a, false},
	} {
		r, release, _, err := newLiblzmaReader(bytes.NewReader(step.comp))
		if err != nil {
			t.Fatal(err)
		}
		d := r.(*liblzmaReader).d
		if first == nil {
			first = d
		} else if d != first {
			t.Errorf("step %d: a new decoder, not the kept one", i)
		}
		switch {
		case step.want == nil:
			if _, err := io.ReadFull(r, make([]byte, 5000)); err != nil {
				t.Errorf("step %d: %v", i, err)
			}
		case step.wantErr:
			if _, err := io.ReadAll(r); err == nil {
				t.Errorf("step %d: corrupt stream decoded without error", i)
			}
		default:
			got, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(got, step.want) {
				t.Errorf("step %d: decoded %d bytes, err %v; want %d bytes", i, len(got), err, len(step.want))
			}
		}
		release()
		if _, err := r.Read(make([]byte, 1)); err == nil {
			t.Errorf("step %d: read after release succeeded", i)
		}
	}
}

// TestLiblzmaPoolExpiry checks that decoders idle for xzPoolIdle are freed
// and the others kept, with the sweep re-armed for them.
func TestLiblzmaPoolExpiry(t *testing.T) {
	needLiblzma(t)
	xzPool.drain()
	defer xzPool.drain()
	var ds []*lzmaDecoder
	for range 3 {
		d, err := xzPool.get()
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	for _, d := range ds {
		xzPool.put(d)
	}
	xzPool.mu.Lock()
	xzPool.idle[0].idleSince = time.Now().Add(-2 * xzPoolIdle)
	xzPool.idle[1].idleSince = time.Now().Add(-2 * xzPoolIdle)
	xzPool.mu.Unlock()
	xzPool.freeIdle()
	xzPool.mu.Lock()
	defer xzPool.mu.Unlock()
	if len(xzPool.idle) != 1 || xzPool.idle[0] != ds[2] {
		t.Errorf("after the sweep %d idle decoders, want the one used last", len(xzPool.idle))
	}
	if xzPool.sweep == nil {
		t.Error("no sweep armed for the decoder still kept")
	}
	if ds[0].s != nil || ds[1].s != nil {
		t.Error("expired decoders not freed")
	}
}

// needLiblzma skips the test when liblzma.so.5 cannot be loaded.
func needLiblzma(t *testing.T) {
	t.Helper()
	_, release, ok, err := newLiblzmaReader(bytes.NewReader(nil))
	if !ok || err != nil {
		t.Skip("liblzma.so.5 cannot be loaded")
	}
	release()
}
