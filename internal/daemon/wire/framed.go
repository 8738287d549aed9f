package wire

import (
	"encoding/binary"
	"fmt"
	"io"
)

// FramedReader reads a framed stream: chunks of u64 length plus that many
// unpadded bytes, ended by a zero-length chunk. Read returns io.EOF once the
// zero chunk has been read. It reads nothing beyond the zero chunk and does
// no buffering of its own.
type FramedReader struct {
	r      io.Reader
	remain uint64 // bytes left in the current chunk
	done   bool   // the zero chunk was read
	err    error
	buf    [8]byte
}

// NewFramedReader returns a FramedReader over r.
func NewFramedReader(r io.Reader) *FramedReader { return &FramedReader{r: r} }

// Done reports whether the terminating zero chunk has been read.
func (f *FramedReader) Done() bool { return f.done }

func (f *FramedReader) Read(p []byte) (int, error) {
	if f.err != nil {
		return 0, f.err
	}
	for f.remain == 0 {
		if f.done {
			return 0, io.EOF
		}
		if _, err := io.ReadFull(f.r, f.buf[:]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			f.err = fmt.Errorf("framed stream: chunk length: %w", err)
			return 0, f.err
		}
		n := binary.LittleEndian.Uint64(f.buf[:])
		if n == 0 {
			f.done = true
			return 0, io.EOF
		}
		if n > MaxFrameLen {
			f.err = fmt.Errorf("framed stream: chunk of %d bytes: %w (limit %d)", n, ErrLimit, MaxFrameLen)
			return 0, f.err
		}
		f.remain = n
	}
	if len(p) == 0 {
		return 0, nil
	}
	if uint64(len(p)) > f.remain {
		p = p[:f.remain]
	}
	n, err := f.r.Read(p)
	f.remain -= uint64(n)
	if err == io.EOF {
		if f.remain > 0 {
			err = io.ErrUnexpectedEOF
		} else {
			err = nil
		}
	}
	if err != nil {
		f.err = fmt.Errorf("framed stream: chunk data: %w", err)
		return n, f.err
	}
	return n, nil
}

// Drain reads and discards everything up to and including the zero chunk.
// After a successful Drain the underlying stream is positioned after the
// framed data, so the protocol can go on.
func (f *FramedReader) Drain() error {
	_, err := io.Copy(io.Discard, f)
	if err != nil {
		return err
	}
	return nil
}

// FramedWriter writes a framed stream. Each Write becomes one chunk (split
// at MaxFrameLen); Close writes the zero chunk. It does not flush.
type FramedWriter struct {
	w   io.Writer
	buf [8]byte
}

// NewFramedWriter returns a FramedWriter over w.
func NewFramedWriter(w io.Writer) *FramedWriter { return &FramedWriter{w: w} }

func (f *FramedWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := min(len(p), MaxFrameLen)
		binary.LittleEndian.PutUint64(f.buf[:], uint64(n))
		if _, err := f.w.Write(f.buf[:]); err != nil {
			return written, err
		}
		m, err := f.w.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

// Close writes the terminating zero chunk. It does not close the underlying
// writer.
func (f *FramedWriter) Close() error {
	binary.LittleEndian.PutUint64(f.buf[:], 0)
	_, err := f.w.Write(f.buf[:])
	return err
}
