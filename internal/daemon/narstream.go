package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/nixyard/nixyard/internal/nar"
)

// narExtractor yields the bytes of exactly one NAR read from an unframed
// stream (old AddToStore, AddToStoreNar below 1.21, ImportPaths). The NAR
// marks its own end, so the stream is parsed as it is copied; nothing past
// the NAR is read. Its buffer holds at most one parser step (a string of
// nar.MaxTargetLen or one contents read).
type narExtractor struct {
	nr      *nar.Reader
	buf     bytes.Buffer // bytes the parser consumed, not yet returned
	inFile  bool
	done    bool
	err     error
	scratch []byte
}

func newNarExtractor(r io.Reader) *narExtractor {
	x := &narExtractor{scratch: make([]byte, 32<<10)}
	x.nr = nar.NewReader(io.TeeReader(r, &x.buf))
	return x
}

func (x *narExtractor) Read(p []byte) (int, error) {
	for x.buf.Len() == 0 {
		if x.err != nil {
			return 0, x.err
		}
		if x.done {
			return 0, io.EOF
		}
		x.step()
	}
	return x.buf.Read(p)
}

// step advances the parser once; the tee collects what it read.
func (x *narExtractor) step() {
	if x.inFile {
		// Unread contents go through the tee into buf; the copy in
		// scratch is not needed.
		_, err := x.nr.Read(x.scratch)
		if err == io.EOF {
			x.inFile = false
		} else if err != nil {
			x.err = fmt.Errorf("reading NAR: %w", err)
		}
		return
	}
	h, err := x.nr.Next()
	switch {
	case err == io.EOF:
		x.done = true
	case err != nil:
		x.err = fmt.Errorf("reading NAR: %w", err)
	case h.Type == nar.TypeRegular:
		x.inFile = true
	}
}

// drain consumes the rest of the NAR, so the stream is positioned after it.
func (x *narExtractor) drain() error {
	_, err := io.Copy(io.Discard, x)
	return err
}

// flatFromNAR yields the contents of the single regular file a NAR holds
// (old AddToStore with flat ingestion).
type flatFromNAR struct {
	nr      *nar.Reader
	started bool
}

func (f *flatFromNAR) Read(p []byte) (int, error) {
	if !f.started {
		f.started = true
		h, err := f.nr.Next()
		if err != nil {
			return 0, fmt.Errorf("reading NAR: %w", err)
		}
		if h.Type != nar.TypeRegular {
			return 0, errors.New("regular file expected")
		}
	}
	n, err := f.nr.Read(p)
	if err == io.EOF {
		if _, err := f.nr.Next(); err != io.EOF {
			if err == nil {
				err = errors.New("regular file expected")
			}
			return n, fmt.Errorf("reading NAR: %w", err)
		}
		return n, io.EOF
	}
	return n, err
}

// tunnelSource pulls data from the client with STDERR_READ (AddToStoreNar
// at 1.21–1.22, ImportPaths). Each Read asks for at most len(p) bytes, so
// it never asks for more than its consumer wants.
type tunnelSource struct {
	c   *conn
	err error
}

// maxTunnelRead bounds one STDERR_READ request.
const maxTunnelRead = 64 << 10

func (t *tunnelSource) Read(p []byte) (int, error) {
	if t.err != nil {
		return 0, t.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	want := min(len(p), maxTunnelRead)
	if err := t.c.tun.askRead(want); err != nil {
		t.err = fmt.Errorf("STDERR_READ: %w", err)
		return 0, t.err
	}
	b := t.c.in.Bytes("STDERR_READ reply", want)
	if err := t.c.in.Err(); err != nil {
		t.err = err
		return 0, err
	}
	if len(b) == 0 {
		t.err = fmt.Errorf("STDERR_READ: %w", io.ErrUnexpectedEOF)
		return 0, t.err
	}
	return copy(p, b), nil
}

// tunnelSink sends data to the client as STDERR_WRITE messages (ExportPath).
type tunnelSink struct{ c *conn }

func (t *tunnelSink) Write(p []byte) (int, error) {
	if err := t.c.tun.writeData(p); err != nil {
		return 0, err
	}
	return len(p), nil
}
