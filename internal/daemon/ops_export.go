package daemon

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

func opNarFromPathHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpNarFromPath)
	if err != nil {
		return err
	}
	// Check validity while an error can still be reported: after
	// STDERR_LAST the NAR follows unframed. The connection ends after the
	// error, as nix-daemon's does (it fails in the dump, after
	// STDERR_LAST): a Nix 2.8 client drops the error and reads the NAR,
	// which would never come.
	// The path is held while it is sent, as the binary cache server holds
	// what it sends: a collection does not delete it under a slow reader
	// (nix-daemon takes no root here). Taken before the validity check,
	// so that no collection can take the path in between.
	hold := c.st.OpenSession()
	defer hold.Close()
	if err := hold.AddTempRoot(ctx, p); err != nil {
		return fatal(fmt.Errorf("adding temporary root '%s': %w", c.dir.Abs(p), err))
	}
	if _, err := c.st.QueryPathInfo(ctx, p); err != nil {
		return fatal(c.storeErr(p, err))
	}
	c.st.Touch(p)
	c.stopWork()
	if err := c.st.NarFromPath(ctx, p, c.out); err != nil {
		return fmt.Errorf("dumping '%s': %w", c.dir.Abs(p), err)
	}
	return nil
}

// opExportPathHandler sends the export format of one path (as
// Store::exportPath: NAR, magic, path, references, deriver, 0) through
// STDERR_WRITE. The leading 1 and trailing 0 of a multi-path export are
// written by the client, not by this op.
func opExportPathHandler(ctx context.Context, c *conn) error {
	p := c.in.Path("path", c.dir)
	c.in.U64("sign") // obsolete
	if err := c.begin(wire.OpExportPath); err != nil {
		return err
	}
	info, err := c.st.QueryPathInfo(ctx, p)
	if err != nil {
		return c.storeErr(p, err)
	}
	sink := &chunkWriter{w: &tunnelSink{c: c}, buf: make([]byte, 0, 64<<10)}
	h := sha256.New()
	if err := c.st.NarFromPath(ctx, p, io.MultiWriter(sink, h)); err != nil {
		return fatal(fmt.Errorf("exporting '%s': %w", c.dir.Abs(p), err))
	}
	if got := hash.FromHasher(hash.SHA256, h); !got.Equal(info.NarHash) {
		return fmt.Errorf("hash of path '%s' has changed from '%s' to '%s'!", c.dir.Abs(p), info.NarHash, got)
	}
	sink.Write(c.exportTrailer(p, info)) // an error stays for Flush
	if err := sink.Flush(); err != nil {
		return fatal(fmt.Errorf("exporting '%s': %w", c.dir.Abs(p), err))
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}

// exportTrailer is what follows the NAR of p in the export format (which
// importOne reads): the magic, the path, its references (sorted), its
// deriver ("" for none) and 0, no legacy signature.
func (c *conn) exportTrailer(p storepath.Path, info *store.PathInfo) []byte {
	var b []byte
	b = appendU64(b, exportMagic)
	b = appendString(b, c.dir.Abs(p))
	refs := storepath.Sort(append([]storepath.Path(nil), info.References...))
	b = appendU64(b, uint64(len(refs)))
	for _, r := range refs {
		b = appendString(b, c.dir.Abs(r))
	}
	deriver := ""
	if !info.Deriver.IsZero() {
		deriver = c.dir.Abs(info.Deriver)
	}
	b = appendString(b, deriver)
	b = appendU64(b, 0)
	return b
}

// chunkWriter groups small writes into chunks of cap(buf) bytes.
type chunkWriter struct {
	w   io.Writer
	buf []byte
	err error
}

func (cw *chunkWriter) Write(p []byte) (int, error) {
	if cw.err != nil {
		return 0, cw.err
	}
	n := len(p)
	for len(p) > 0 {
		k := min(len(p), cap(cw.buf)-len(cw.buf))
		cw.buf = append(cw.buf, p[:k]...)
		p = p[k:]
		if len(cw.buf) == cap(cw.buf) {
			if err := cw.Flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (cw *chunkWriter) Flush() error {
	if cw.err == nil && len(cw.buf) > 0 {
		_, cw.err = cw.w.Write(cw.buf)
		cw.buf = cw.buf[:0]
	}
	return cw.err
}
