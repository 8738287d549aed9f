package substitute

import (
	"compress/bzip2"
	"compress/gzip"
	"fmt"
	"io"
	"os/exec"
	"strings"
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

// Decompressor returns a streaming decoder for a narinfo Compression value
// ("none", "xz", "zstd", "bzip2", "br", "gzip") and a function to release
// it. Memory use is bounded by the format's window, never by the NAR
// size. The builtin builders and the channel unpacker use it too.
func Decompressor(method string, r io.Reader) (io.Reader, func(), error) {
	switch method {
	case "none", "":
		return r, func() {}, nil
	case "xz":
		if xr, release, ok, err := newLiblzmaReader(r); ok {
			return xr, release, err
		}
		if bin, err := exec.LookPath("xz"); err == nil {
			return xzProcess(bin, r)
		}
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
	case "gzip":
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, err // "gzip: invalid header"
		}
		return zr, func() {}, nil
	case "br":
		return brotli.NewReader(r), func() {}, nil
	}
	return nil, nil, fmt.Errorf("unsupported compression %q", method)
}

// xzProcess decompresses r with the system's xz, for hosts where
// liblzma cannot be loaded into the process (see newLiblzmaReader) but
// the xz command exists: liblzma decodes about twice as fast as the
// pure-Go decoder (a cold substitution from an xz cache measured 12 MB/s
// of NAR with the Go decoder against the stock daemon's 25 MB/s,
// docs/benchmarks.md), which remains for hosts with neither. release
// kills the process if it is still running and reaps it.
func xzProcess(bin string, r io.Reader) (io.Reader, func(), error) {
	cmd := exec.Command(bin, "--decompress", "--stdout", "--quiet")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, fmt.Errorf("xz: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, fmt.Errorf("xz: %w", err)
	}
	p := &xzProc{cmd: cmd, out: stdout}
	cmd.Stderr = &p.stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("xz: %w", err)
	}
	go func() {
		// A failed or cut transfer shows in r's own error (the caller
		// tracks it); closing stdin then makes xz report a truncated stream.
		io.Copy(stdin, r)
		stdin.Close()
	}()
	release := func() {
		p.cmd.Process.Kill()
		p.wait()
	}
	return p, release, nil
}

// xzProc reads an xz process's output and reports its failure at the end.
type xzProc struct {
	cmd     *exec.Cmd
	out     io.Reader
	stderr  limitedBuffer
	once    sync.Once
	waitErr error
}

func (p *xzProc) wait() error {
	p.once.Do(func() { p.waitErr = p.cmd.Wait() })
	return p.waitErr
}

func (p *xzProc) Read(b []byte) (int, error) {
	n, err := p.out.Read(b)
	if err == io.EOF {
		if werr := p.wait(); werr != nil {
			return n, fmt.Errorf("xz: %v: %s", werr, strings.TrimSpace(p.stderr.String()))
		}
	}
	return n, err
}

// limitedBuffer keeps the first 4 KiB written to it: enough for xz's
// error message, bounded whatever the process writes.
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := 4096 - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(len(p), room)]...)
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string { return string(l.b) }
