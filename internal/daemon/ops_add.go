package daemon

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// withFramed runs fn over the framed stream that follows the arguments,
// then drains it to its zero chunk whatever fn did, so that STDERR_LAST or
// STDERR_ERROR is only sent once the client has finished uploading (§3.3).
// A failure to drain leaves the stream out of sync and is fatal.
//
// The daemon's stop is the exception: an upload it ends is told so at
// once, without waiting for the rest of the upload (which could take
// longer than the stop). The Nix client reads the daemon's messages while
// it uploads and stops uploading at the first error; told only once the
// daemon has hung up, Nix 2.8's client drops the error and exits 0
// without the paths.
func (c *conn) withFramed(ctx context.Context, fn func(fr *wire.FramedReader) error) error {
	watch := c.watchStall(c.br)
	fr := wire.NewFramedReader(watch)
	stopped := c.interruptReadsOnStop(ctx)
	err := fn(fr)
	cut := errors.Is(context.Cause(ctx), errStopping) // fn ended as the stop came
	if err == nil && stopped() {
		// fn read the upload as the stop came: only its end is left to
		// read, and its client hears how it went.
		c.setReadDeadline(time.Now().Add(stoppingDelay))
	}
	derr := fr.Drain() // cut short by a stop, if fn failed
	if watch.stop() {
		return fatal(watch.err())
	}
	if err != nil && stopped() {
		// Told now, not once the rest is read: the stop's reason, or
		// fn's own if the stop only came while the rest was read.
		if cut {
			err = errStopping
		}
		c.tun.stopWork(err)
		if c.out.Flush() == nil {
			linger(c.raw) // until the client, told, hangs up
		}
		return fatal(errStopping)
	}
	if derr != nil {
		if err == nil {
			err = derr
		}
		return fatal(err)
	}
	return err
}

// interruptReadsOnStop makes a read of the connection that waits for the
// client return at once when the daemon's stop ends ctx. The function it
// returns ends that (the first call), and reports whether the stop came.
func (c *conn) interruptReadsOnStop(ctx context.Context) (stopped func() bool) {
	dl, ok := c.raw.(readDeadliner)
	if !ok {
		return func() bool { return errors.Is(context.Cause(ctx), errStopping) }
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		if errors.Is(context.Cause(ctx), errStopping) {
			dl.SetReadDeadline(time.Now())
		}
	})
	end := sync.OnceFunc(func() {
		if !stop() {
			<-fired // its deadline is set before the caller sets another
		}
	})
	return func() bool {
		end()
		return errors.Is(context.Cause(ctx), errStopping)
	}
}

// defaultUploadStall is how long an upload may send nothing before the
// daemon abandons it. An upload holds the locks of the paths it adds
// (whoever else adds, builds or substitutes them waits), and a client
// that stops sending, or a job that does so on purpose, would hold them
// for as long as it keeps its connection. Nix's own downloads give up
// after 300 s without data (stalled-download-timeout).
const defaultUploadStall = 10 * time.Minute

// stallWatch reads an upload, and abandons it (its connection's reads
// fail at once) once a read has waited for the client for the daemon's
// uploadStall: only the client's silence counts, not the daemon's own
// waits between reads (for a path's lock, a collection, the disk).
type stallWatch struct {
	r     io.Reader
	after time.Duration
	timer *time.Timer

	mu      sync.Mutex
	reading bool // a read waits for the client; only then does the timer act
	stalls  bool // the timer fired during a read
}

// watchStall watches the upload that c reads through r.
func (c *conn) watchStall(r io.Reader) *stallWatch {
	w := &stallWatch{r: r, after: c.srv.opts.uploadStall}
	w.timer = time.AfterFunc(w.after, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.reading {
			w.stalls = true
			c.setReadDeadline(time.Now())
		}
	})
	w.timer.Stop()
	return w
}

func (w *stallWatch) Read(p []byte) (int, error) {
	w.mu.Lock()
	w.reading = true
	w.mu.Unlock()
	w.timer.Reset(w.after)
	n, err := w.r.Read(p)
	w.timer.Stop()
	w.mu.Lock()
	w.reading = false
	w.mu.Unlock()
	return n, err
}

// stop reports, once the upload's reads are over, whether it was
// abandoned (each read stops the timer as it returns).
func (w *stallWatch) stop() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.stalls
}

// err is the error of an abandoned upload.
func (w *stallWatch) err() error {
	return fmt.Errorf("upload stalled: the client sent nothing for %v, and the upload was abandoned (it held the locks of the paths it was adding)", w.after)
}

// setReadDeadline sets the deadline of the client's stream's reads, if it
// has one.
func (c *conn) setReadDeadline(t time.Time) {
	if dl, ok := c.raw.(readDeadliner); ok {
		dl.SetReadDeadline(t)
	}
}

// withRawNAR is withFramed for an unframed NAR on the stream.
func (c *conn) withRawNAR(r io.Reader, fn func(x *narExtractor) error) error {
	watch := c.watchStall(r)
	x := newNarExtractor(watch)
	err := fn(x)
	derr := x.drain()
	if watch.stop() {
		return fatal(watch.err())
	}
	if derr != nil {
		if err == nil {
			err = derr
		}
		return fatal(err)
	}
	return err
}

// rootAdded gives a path this connection adds a temporary root that lasts
// as long as the connection, as Nix's addToStore does, so that a garbage
// collection between two requests of a client (say, adding a .drv and then
// building it) cannot delete it. Paths whose name is known in advance are
// rooted before they are added; content-addressed additions right after.
func (c *conn) rootAdded(ctx context.Context, p storepath.Path) error {
	if err := c.session.AddTempRoot(ctx, p); err != nil {
		return fmt.Errorf("adding a temporary root for '%s': %w", c.dir.Abs(p), err)
	}
	return nil
}

func opAddToStoreHandler(ctx context.Context, c *conn) error {
	if c.minor < 25 {
		return c.addToStoreOld(ctx)
	}
	name := c.in.String("name", wire.MaxSmallString)
	camStr := c.in.String("camStr", wire.MaxSmallString)
	refs := c.in.Paths("references", c.dir)
	repair := c.in.Bool("repair")
	if err := c.begin(wire.OpAddToStore); err != nil {
		return err
	}
	var info *store.PathInfo
	err := c.withFramed(ctx, func(fr *wire.FramedReader) error {
		method, algo, err := contentaddress.ParseMethodAlgo(camStr)
		if err != nil {
			return fmt.Errorf("adding '%s' to the store: %w", name, err)
		}
		info, err = c.st.AddToStoreContent(ctx, name, method, algo, refs, fr, repair)
		if err != nil {
			return err // the store's error names the path
		}
		return c.rootAdded(ctx, info.Path)
	})
	if err != nil {
		return err
	}
	c.stopWork()
	c.writePathInfo(info, true, c.minor)
	return nil
}

// addToStoreOld is AddToStore before 1.25: the data is a raw NAR.
func (c *conn) addToStoreOld(ctx context.Context) error {
	name := c.in.String("name", wire.MaxSmallString)
	fixed := c.in.Bool("fixed")
	recursive := c.in.U64Max("recursive", 1) == 1
	algoName := c.in.String("hashAlgo", wire.MaxSmallString)
	if !fixed { // compatibility hack, as in Nix
		algoName, recursive = "sha256", true
	}
	algo, err := hash.ParseAlgo(algoName)
	if err != nil {
		c.in.SetErr("hashAlgo", err)
	}
	if err := c.begin(wire.OpAddToStore); err != nil {
		return err
	}
	method := contentaddress.Flat
	if recursive {
		method = contentaddress.NAR
	}
	var info *store.PathInfo
	err = c.withRawNAR(c.br, func(x *narExtractor) error {
		var data io.Reader = x
		if !recursive {
			data = &flatFromNAR{nr: nar.NewReader(x)}
		}
		var err error
		info, err = c.st.AddToStoreContent(ctx, name, method, algo, nil, data, false)
		if err != nil {
			return err // the store's error names the path
		}
		return c.rootAdded(ctx, info.Path)
	})
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.Path(c.dir, info.Path)
	return nil
}

func opAddTextToStoreHandler(ctx context.Context, c *conn) error {
	name := c.in.String("name", wire.MaxSmallString)
	text := c.in.Bytes("text", wire.MaxStringLen)
	refs := c.in.Paths("references", c.dir)
	if err := c.begin(wire.OpAddTextToStore); err != nil {
		return err
	}
	info, err := c.st.AddToStoreContent(ctx, name, contentaddress.Text, hash.SHA256, refs, bytes.NewReader(text), false)
	if err != nil {
		return err // the store's error names the path
	}
	if err := c.rootAdded(ctx, info.Path); err != nil {
		return err
	}
	c.stopWork()
	c.out.Path(c.dir, info.Path)
	return nil
}

// readPathInfo reads the fields of a ValidPathInfo after the path, in the
// layout of minor (§5.1).
func (c *conn) readPathInfo(in *wire.Decoder, p storepath.Path, minor uint64) store.PathInfo {
	info := store.PathInfo{Path: p}
	info.Deriver = in.OptPath("deriver", c.dir)
	narHash := in.String("narHash", wire.MaxSmallString)
	info.References = in.Paths("references", c.dir)
	in.U64("registrationTime") // the daemon sets its own
	info.NarSize = in.U64("narSize")
	if minor >= 16 {
		info.Ultimate = in.Bool("ultimate")
		info.Sigs = in.Strings("sigs", wire.MaxSmallString)
		info.CA = in.String("ca", wire.MaxSmallString)
	}
	if in.Err() == nil {
		h, err := hash.ParseAny(narHash, hash.SHA256)
		if err != nil {
			in.SetErr("narHash", err)
		}
		info.NarHash = h
		if _, err := contentaddress.Parse(info.CA); err != nil {
			in.SetErr("ca", err)
		}
	}
	return info
}

func opAddToStoreNarHandler(ctx context.Context, c *conn) error {
	p := c.in.Path("path", c.dir)
	info := c.readPathInfo(c.in, p, 16)
	repair := c.in.Bool("repair")
	dontCheckSigs := c.in.Bool("dontCheckSigs")
	if !c.peer.trusted {
		dontCheckSigs = false
		info.Ultimate = false
	}
	if err := c.begin(wire.OpAddToStoreNar); err != nil {
		return err
	}
	opts := store.AddOptions{Repair: repair, CheckSigs: !dontCheckSigs}
	add := func(r io.Reader) error {
		if err := c.rootAdded(ctx, p); err != nil {
			return err
		}
		if err := c.st.AddToStoreNar(ctx, info, r, opts); err != nil {
			return err // the store's error names the path
		}
		return nil
	}
	var err error
	switch {
	case c.minor >= 23:
		err = c.withFramed(ctx, func(fr *wire.FramedReader) error { return add(fr) })
	case c.minor >= 21:
		ts := &tunnelSource{c: c}
		err = c.withRawNAR(ts, func(x *narExtractor) error { return add(x) })
	default:
		err = c.withRawNAR(c.br, func(x *narExtractor) error { return add(x) })
	}
	if err != nil {
		return err
	}
	c.stopWork()
	return nil
}

// exactReader passes on exactly left bytes of r, then io.EOF
// (AddMultipleToStore: each NAR is exactly narSize bytes); left says how
// many its consumer did not read.
type exactReader struct {
	r    io.Reader
	left uint64
}

func (e *exactReader) Read(p []byte) (int, error) {
	if e.left == 0 {
		return 0, io.EOF
	}
	if uint64(len(p)) > e.left {
		p = p[:e.left]
	}
	n, err := e.r.Read(p)
	e.left -= uint64(n)
	if err == io.EOF && e.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func opAddMultipleToStoreHandler(ctx context.Context, c *conn) error {
	repair := c.in.Bool("repair")
	dontCheckSigs := c.in.Bool("dontCheckSigs")
	if !c.peer.trusted {
		dontCheckSigs = false
	}
	if err := c.begin(wire.OpAddMultipleToStore); err != nil {
		return err
	}
	err := c.withFramed(ctx, func(fr *wire.FramedReader) error {
		in := wire.NewDecoder(fr)
		count := in.Count("count")
		if err := in.Err(); err != nil {
			return fmt.Errorf("AddMultipleToStore: %w", err)
		}
		up := &multiUpload{c: c, in: in, data: fr, count: count}
		next := func() (store.PathInfo, io.Reader, error) { return up.next(ctx) }
		if err := c.st.AddMultipleToStoreNar(ctx, next, store.AddOptions{Repair: repair, CheckSigs: !dontCheckSigs}); err != nil {
			return err
		}
		return up.finished()
	})
	if err != nil {
		return err
	}
	c.stopWork()
	return nil
}

// multiUpload reads the paths of an AddMultipleToStore upload for the
// store, one at a time: each path's ValidPathInfo, then its NAR, exactly
// narSize bytes of the framed stream.
type multiUpload struct {
	c     *conn
	in    *wire.Decoder // the framed stream's
	data  io.Reader     // the framed stream, which the NARs are read from
	count int           // the paths the client said it sends
	read  int           // the paths read so far

	cur     *exactReader // the NAR of the path read last
	curPath storepath.Path
}

// next is store.AddMultipleToStoreNar's next: the next path's info and
// NAR, rooted for the connection, or io.EOF after the last. The previous
// path's NAR must have been read whole.
func (u *multiUpload) next(ctx context.Context) (store.PathInfo, io.Reader, error) {
	c := u.c
	if u.cur != nil && u.cur.left > 0 {
		return store.PathInfo{}, nil, fmt.Errorf("AddMultipleToStore: path '%s': NAR is shorter than its narSize (%d bytes left)", c.dir.Abs(u.curPath), u.cur.left)
	}
	if u.read == u.count {
		return store.PathInfo{}, nil, io.EOF
	}
	u.read++
	p := u.in.Path("path", c.dir)
	info := c.readPathInfo(u.in, p, 16)
	if err := u.in.Err(); err != nil {
		return store.PathInfo{}, nil, fmt.Errorf("AddMultipleToStore: path %d of %d: %w", u.read, u.count, err)
	}
	info.Ultimate = false
	if err := c.rootAdded(ctx, p); err != nil {
		return store.PathInfo{}, nil, err
	}
	u.cur, u.curPath = &exactReader{r: u.data, left: info.NarSize}, p
	return info, u.cur, nil
}

// finished checks, once the store has returned, that it took every path
// the client sent, and the whole of each NAR.
func (u *multiUpload) finished() error {
	if u.read != u.count || (u.cur != nil && u.cur.left > 0) {
		return fmt.Errorf("AddMultipleToStore: the store stopped after %d of %d paths", u.read, u.count)
	}
	return nil
}

func opImportPathsHandler(ctx context.Context, c *conn) error {
	if err := c.begin(wire.OpImportPaths); err != nil {
		return err
	}
	src := &tunnelSource{c: c} // unbuffered: ask the client only for what is parsed
	in := wire.NewDecoder(src)
	var imported []storepath.Path
	for {
		marker := in.U64("marker")
		if err := in.Err(); err != nil {
			return fatal(fmt.Errorf("ImportPaths: %w", err))
		}
		if marker == 0 {
			break
		}
		if marker != 1 {
			return fatal(errors.New("ImportPaths: input doesn't look like something created by 'nix-store --export'"))
		}
		p, err := c.importOne(ctx, src, in)
		if err != nil {
			return fatal(err)
		}
		imported = append(imported, p)
	}
	c.stopWork()
	ss := make([]string, len(imported))
	for i, p := range imported {
		ss[i] = c.dir.Abs(p)
	}
	c.out.Strings(ss)
	return nil
}

// importOne reads one path of the export format (NAR, magic, path, refs,
// deriver, legacy signature flag) and adds it. The NAR comes before its
// metadata, so it is spooled to a temporary file first.
func (c *conn) importOne(ctx context.Context, src io.Reader, in *wire.Decoder) (storepath.Path, error) {
	spool, err := os.CreateTemp("", "nixyard-import-*.nar")
	if err != nil {
		return storepath.Path{}, fmt.Errorf("ImportPaths: spooling NAR: %w", err)
	}
	defer os.Remove(spool.Name())
	defer spool.Close()
	h := sha256.New()
	size, err := io.Copy(io.MultiWriter(spool, h), newNarExtractor(src))
	if err != nil {
		return storepath.Path{}, fmt.Errorf("ImportPaths: %w", err)
	}
	if m := in.U64("magic"); in.Err() == nil && m != exportMagic {
		return storepath.Path{}, errors.New("ImportPaths: Nix archive cannot be imported; wrong format")
	}
	p := in.Path("path", c.dir)
	info := store.PathInfo{Path: p, NarSize: uint64(size), NarHash: hash.FromHasher(hash.SHA256, h)}
	info.References = in.Paths("references", c.dir)
	info.Deriver = in.OptPath("deriver", c.dir)
	if in.U64("signature flag") == 1 {
		in.String("legacy signature", wire.MaxSmallString)
	}
	if err := in.Err(); err != nil {
		return storepath.Path{}, fmt.Errorf("ImportPaths: %w", err)
	}
	if _, err := spool.Seek(0, io.SeekStart); err != nil {
		return storepath.Path{}, fmt.Errorf("ImportPaths: %w", err)
	}
	if err := c.rootAdded(ctx, p); err != nil {
		return storepath.Path{}, err
	}
	opts := store.AddOptions{CheckSigs: !c.peer.trusted}
	if err := c.st.AddToStoreNar(ctx, info, bufio.NewReader(spool), opts); err != nil {
		return storepath.Path{}, fmt.Errorf("importing '%s': %w", c.dir.Abs(p), err)
	}
	return p, nil
}

func opAddSignaturesHandler(ctx context.Context, c *conn) error {
	p := c.in.Path("path", c.dir)
	sigs := c.in.Strings("sigs", wire.MaxSmallString)
	if err := c.begin(wire.OpAddSignatures); err != nil {
		return err
	}
	if !c.peer.trusted {
		return c.untrusted("you are not privileged to add signatures")
	}
	if err := c.st.AddSignatures(ctx, p, sigs); err != nil {
		return c.storeErr(p, err)
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}

func opAddBuildLogHandler(ctx context.Context, c *conn) error {
	base := c.in.String("drv", wire.MaxPathLen)
	drv, err := storepath.ParseBase(base)
	if err != nil {
		c.in.SetErr("drv", err)
	}
	if err := c.begin(wire.OpAddBuildLog); err != nil {
		return err
	}
	err = c.withFramed(ctx, func(fr *wire.FramedReader) error {
		if !c.peer.trusted {
			return c.untrusted("you are not privileged to add logs")
		}
		if err := c.st.AddBuildLog(ctx, drv, fr); err != nil {
			return fmt.Errorf("adding build log of '%s': %w", c.dir.Abs(drv), err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}
