package substitute

import (
	"compress/bzip2"
	"fmt"
	"io"
	"sync"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// zstdMaxWindow caps the zstd window (and so the decoder's memory). Nix
// compresses with libzstd's defaults, whose window is at most 8 MiB below
// level 20; 128 MiB leaves room for --long and ultra levels.
const zstdMaxWindow = 128 << 20

// zstdDecoders keeps zstd decoders for reuse: creating one allocates and
// zeroes its window buffers, which profiling showed as a fifth of the CPU
// of a cold substitution; Reset reuses them.
var zstdDecoders = sync.Pool{New: func() any {
	zr, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(zstdMaxWindow), zstd.WithDecoderLowmem(true))
	if err != nil {
		return err
	}
	return zr
}}

// decompressor returns a streaming decoder for a narinfo Compression value
// and a function to release it. Memory use is bounded by the format's
// window, never by the NAR size.
func decompressor(method string, r io.Reader) (io.Reader, func(), error) {
	switch method {
	case "none", "":
		return r, func() {}, nil
	case "xz":
		xr, err := xz.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("xz: %w", err)
		}
		return xr, func() {}, nil
	case "zstd":
		v := zstdDecoders.Get()
		zr, ok := v.(*zstd.Decoder)
		if !ok {
			return nil, nil, fmt.Errorf("zstd: %w", v.(error))
		}
		if err := zr.Reset(r); err != nil {
			zstdDecoders.Put(zr)
			return nil, nil, fmt.Errorf("zstd: %w", err)
		}
		release := func() {
			zr.Reset(nil) // drop the reference to r
			zstdDecoders.Put(zr)
		}
		return zr, release, nil
	case "bzip2":
		return bzip2.NewReader(r), func() {}, nil
	case "br":
		return brotli.NewReader(r), func() {}, nil
	}
	return nil, nil, fmt.Errorf("unsupported compression %q", method)
}
