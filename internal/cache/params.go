package cache

// The parameters of a push URL. Nix's binary cache stores take their
// settings from the URL's query (`nix copy --to
// 's3://bucket?compression=zstd&secret-key=/etc/nix/key'`); --push-to takes
// the same ones. One that nixyard does not implement is refused by name,
// and so is an unknown one (where Nix warns and goes on) rather than a
// typo silently ignored by a daemon.

import (
	"compress/gzip"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/nix/signature"
)

// Options are what a push URL's parameters ask of the files written.
type Options struct {
	// Compression of NARs: zstd (nixyard's default; Nix's is xz), xz,
	// bzip2, br, gzip or none.
	Compression string
	// Level is the compression level (compression-level), -1 for the
	// method's default.
	Level int
	// Parallel (parallel-compression) lets xz and zstd use every core;
	// otherwise each NAR is compressed on one.
	Parallel bool
	// Listing (write-nar-listing) writes HASH.ls, the JSON listing of the
	// NAR, next to each narinfo.
	Listing bool
	// DebugInfo (index-debug-info) writes debuginfo/BUILDID for each
	// lib/debug/.build-id/XX/YYYY.debug file, naming its NAR and member.
	DebugInfo bool
	// Keys (secret-key) sign each narinfo, besides the daemon's own
	// secret-key-files.
	Keys []signature.SecretKey
}

// levels are the compression methods and the levels each takes.
var levels = map[string][2]int{
	"zstd": {1, 22}, "xz": {0, 9}, "bzip2": {1, 9}, "gzip": {0, 9}, "br": {0, 11}, "none": {},
}

// parseOptions reads the binary cache parameters from q. own lists the
// parameters the target's scheme reads itself; any other is an error, and
// so is one given twice (Nix would take the first).
func parseOptions(q url.Values, log *slog.Logger, own ...string) (Options, error) {
	o := Options{Compression: "zstd", Level: -1}
	for k, vs := range q {
		if len(vs) > 1 {
			return Options{}, fmt.Errorf("%s is given %d times", k, len(vs))
		}
		if err := o.set(k, vs[0], own); err != nil {
			return Options{}, fmt.Errorf("%s=%s: %w", k, vs[0], err)
		}
	}
	if r := levels[o.Compression]; o.Level != -1 && (o.Compression == "none" || o.Level < r[0] || o.Level > r[1]) {
		if o.Compression == "none" {
			return Options{}, fmt.Errorf("compression-level=%d: compression=none has no levels", o.Level)
		}
		return Options{}, fmt.Errorf("compression-level=%d: %s takes %d to %d", o.Level, o.Compression, r[0], r[1])
	}
	switch _, err := exec.LookPath(o.Compression); {
	case err == nil:
	case o.Compression == "bzip2":
		return Options{}, fmt.Errorf("compression=bzip2 needs the bzip2 command: %w", err)
	case o.Compression == "xz":
		log.Warn("no xz command: NARs are compressed with a pure-Go encoder, several times slower", "err", err)
	}
	return o, nil
}

// set sets the parameter k to v.
func (o *Options) set(k, v string, own []string) error {
	var err error
	switch k {
	case "compression":
		if _, ok := levels[v]; !ok {
			return fmt.Errorf("want one of zstd, xz, bzip2, br, gzip or none")
		}
		o.Compression = v
	case "compression-level":
		o.Level, err = strconv.Atoi(v)
	case "parallel-compression":
		o.Parallel, err = config.ParseBool(v)
	case "write-nar-listing":
		o.Listing, err = config.ParseBool(v)
	case "index-debug-info":
		o.DebugInfo, err = config.ParseBool(v)
	case "secret-key":
		var data []byte
		if data, err = os.ReadFile(v); err == nil {
			var key signature.SecretKey
			key, err = signature.ParseSecretKey(string(data))
			o.Keys = append(o.Keys, key)
		}
	case "local-nar-cache":
		err = fmt.Errorf("not supported (it caches what is read from a cache, and nixyard only writes to this one)")
	default:
		if !slices.Contains(own, k) {
			err = fmt.Errorf("unknown parameter")
		}
	}
	return err
}

// narExtension is the suffix Nix gives a NAR file compressed with method
// (gzip and none have none).
func narExtension(method string) string {
	switch method {
	case "xz":
		return ".xz"
	case "bzip2":
		return ".bz2"
	case "zstd":
		return ".zst"
	case "br":
		return ".br"
	}
	return ""
}

// compressor returns a writer that compresses what it is given into w as
// o asks. Its Close finishes the stream; it must be called, also on
// errors, to release what it holds.
func (o Options) compressor(w io.Writer) (io.WriteCloser, error) {
	level := func(def int) int {
		if o.Level == -1 {
			return def
		}
		return o.Level
	}
	threads := "-T1"
	if o.Parallel {
		threads = "-T0"
	}
	switch o.Compression {
	case "zstd":
		opts := []zstd.EOption{zstd.WithEncoderConcurrency(1)}
		if o.Parallel {
			opts[0] = zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0))
		}
		if o.Level != -1 {
			opts = append(opts, zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(o.Level)))
		}
		return zstd.NewWriter(w, opts...)
	case "xz":
		if _, err := exec.LookPath("xz"); err == nil {
			return startCompressor(w, "xz", "-zcq", threads, "-"+strconv.Itoa(level(6)))
		}
		// The xz command is several times faster; without it, the
		// pure-Go encoder with the preset's dictionary size.
		dict := []int{256 << 10, 1 << 20, 2 << 20, 4 << 20, 4 << 20, 8 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20}[level(6)]
		return xz.WriterConfig{DictCap: dict}.NewWriter(w)
	case "bzip2":
		return startCompressor(w, "bzip2", "-zcq", "-"+strconv.Itoa(level(9)))
	case "gzip":
		return gzip.NewWriterLevel(w, level(gzip.DefaultCompression))
	case "br":
		return brotli.NewWriterLevel(w, level(brotli.BestCompression)), nil // Nix's default
	case "none":
		return nopCloser{w}, nil
	}
	return nil, fmt.Errorf("compression %q is not supported", o.Compression)
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// procCompressor compresses through a command reading its standard
// input and writing its standard output.
type procCompressor struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *errWriter
	stderr tailBuffer
}

func startCompressor(w io.Writer, name string, args ...string) (*procCompressor, error) {
	p := &procCompressor{cmd: exec.Command(name, args...), out: &errWriter{w: w}}
	p.cmd.Stdout, p.cmd.Stderr = p.out, &p.stderr
	stdin, err := p.cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	p.stdin = stdin
	return p, nil
}

func (p *procCompressor) Write(b []byte) (int, error) {
	n, err := p.stdin.Write(b)
	if err != nil {
		return n, p.failure(err)
	}
	return n, nil
}

// Close ends the input and waits for the command (and for its output to
// be written).
func (p *procCompressor) Close() error {
	p.stdin.Close()
	if err := p.cmd.Wait(); err != nil {
		return p.failure(err)
	}
	return nil
}

// failure names what made the command fail: where its output went
// failing (the command then dies of a broken pipe), else the command's own
// error message.
func (p *procCompressor) failure(err error) error {
	if werr := p.out.failed(); werr != nil {
		return fmt.Errorf("writing %s's output: %w", p.cmd.Args[0], werr)
	}
	if msg := strings.TrimSpace(p.stderr.String()); msg != "" {
		return fmt.Errorf("%s: %w: %s", strings.Join(p.cmd.Args, " "), err, msg)
	}
	return fmt.Errorf("%s: %w", strings.Join(p.cmd.Args, " "), err)
}

// errWriter keeps the first error of the writer it wraps.
type errWriter struct {
	w   io.Writer
	mu  sync.Mutex
	err error
}

func (e *errWriter) Write(b []byte) (int, error) {
	n, err := e.w.Write(b)
	if err != nil {
		e.mu.Lock()
		if e.err == nil {
			e.err = err
		}
		e.mu.Unlock()
	}
	return n, err
}

func (e *errWriter) failed() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// tailBuffer keeps the last 4 KiB written to it.
type tailBuffer struct{ b []byte }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if over := len(t.b) - 4096; over > 0 {
		t.b = t.b[over:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return string(t.b) }
